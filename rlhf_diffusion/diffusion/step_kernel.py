"""The reverse (denoising) step a step-wise method samples and re-scores, for ε-prediction and flow-matching models:
one object per model family with everything the step-wise methods (DDPO, GRPO: `algorithms/ddpo.py`,
`algorithms/grpo.py`; D3PO's step log-ratios: `algorithms/common.py`; TailorPO's candidates and previews:
`algorithms/tailorpo.py`) need to know about the sampler's step policy π(x_prev | x, c) = N(μ, s² I), so that
their code is one code for both. The counterpart, for the reverse step, of `forward_process.py`.

- `DDIMKernel` (SD1.5 / SDXL): the stochastic DDIM step at the grid's η (`ddim.ddim_step_with_logprob`), the UNet
  called at the integer timestep τ;
- `FlowKernel` (SD3 / SD3.5, FLUX): Flow-GRPO's SDE step, or Flow-CPS's (the grid's kind), at the grid's noise
  level a (`flow.sde_step_with_logprob`), the transformer called at σ·N.

Each re-scores a stored action with the very function the sampler drew it with (`diffusion/sampling.py`,
`diffusion/flow_sampling.py`), so sampling and training cannot disagree. In both families the two policies
(θ and the reference) share s at a step and their means differ only through the prediction, so the closed forms of
docs/algorithms.md §5.5 / §10 (`ddim.kl_same_std`, `ddim.log_ratio_same_std`, the same functions as `flow.kl_same_std`,
`flow.log_ratio_same_std`) hold for both: the kernel supplies μ and s, the maths is in `ddim.py` and `flow.py`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from rlhf_diffusion.diffusion import ddim, flow
from rlhf_diffusion.diffusion.flow import FlowGrid
from rlhf_diffusion.diffusion.sampling import DDIMGrid

__all__ = ["DDIMKernel", "FlowKernel", "StepKernel", "step_kernel_for"]


@dataclass(frozen=True)
class DDIMKernel:
    """The stochastic DDIM step of an ε-prediction model on its K-step grid (η > 0)."""

    grid: DDIMGrid

    def timesteps(self, step_index: Tensor) -> Tensor:
        """What the UNet is called with at steps (M,): τ (long, CPU)."""
        return self.grid.scalars(step_index)[0]

    def std(self, step_index: Tensor) -> Tensor:
        """σ_τ(η) (M,) float32, CPU."""
        return self.grid.scalars(step_index)[3]

    def kappa(self) -> Tensor:
        """(K,) κ_τ, the coefficient of ε̂ in μ at a fixed state: μ_θ − μ_ref = κ_τ (ε̂_θ − ε̂_ref) (`ddim.ddim_kappa`)."""
        return ddim.ddim_kappa(self.grid.alpha_prod, self.grid.alpha_prod_prev, self.grid.std_dev)

    def mean(self, state: Tensor, pred: Tensor, step_index: Tensor) -> Tensor:
        """μ (M, C, h, w) float32 of the step from `state` with noise prediction `pred` (`ddim.ddim_step_mean`)."""
        _, a, a_prev, std = (v.to(state.device) for v in self.grid.scalars(step_index))
        return ddim.ddim_step_mean(state, pred, a, a_prev, std)[0]

    def x0_after(self, x: Tensor, pred: Tensor, step_index: Tensor) -> Tensor:
        """x̂_0 (M, C, h, w) of a latent at the noise level step i lands on (ᾱ_prev(τ)), from the prediction
        at (x, `timesteps` of step i + 1): `ddim.pred_x0_from_eps` (TailorPO's candidate preview, §2a)."""
        a_prev = self.grid.scalars(step_index)[2].to(x.device)
        return ddim.pred_x0_from_eps(x, pred, a_prev)

    def log_prob(
        self, state: Tensor, pred: Tensor, step_index: Tensor, action: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(ℓ (M,) per-element-mean log π(action | state), μ, σ_τ (M,)) by `ddim.ddim_step_with_logprob`, the
        sampler's function; differentiable through `pred`."""
        _, a, a_prev, _ = (v.to(state.device) for v in self.grid.scalars(step_index))
        _, log_prob, mean, std = ddim.ddim_step_with_logprob(
            state, pred, a, a_prev, self.grid.eta, prev_sample=action.to(state.device)
        )
        return log_prob, mean, std


@dataclass(frozen=True)
class FlowKernel:
    """Flow-GRPO's SDE step (or Flow-CPS's: `grid.kind`) of a flow-matching model on its K-step grid (noise level
    a > 0: at a = 0 the step is the ODE's and has no density, and `log_prob` is NaN; so is CPS's last step)."""

    grid: FlowGrid

    def timesteps(self, step_index: Tensor) -> Tensor:
        """What the transformer is called with at steps (M,): σ_i · N (float32, CPU)."""
        return self.grid.scalars(step_index)[0]

    def std(self, step_index: Tensor) -> Tensor:
        """s_i (M,) float32, CPU (`FlowGrid.std_dev`)."""
        return self.grid.scalars(step_index)[3]

    def kappa(self) -> Tensor:
        """(K,) κ_i, the coefficient of v̂ in μ at a fixed state: μ_θ − μ_ref = κ_i (v̂_θ − v̂_ref) (`flow.sde_kappa`,
        `flow.cps_kappa`)."""
        return self.grid.kappa

    def mean(self, state: Tensor, pred: Tensor, step_index: Tensor) -> Tensor:
        """μ (M, C, h, w) float32 of the step from `state` with velocity prediction `pred` (`flow.step_mean_and_std`
        of the grid's kind at its noise level)."""
        _, sigma, sigma_next, _ = (v.to(state.device) for v in self.grid.scalars(step_index))
        return flow.step_mean_and_std(state, pred, sigma, sigma_next, self.grid.noise_level, self.grid.kind)[0]

    def x0_after(self, x: Tensor, pred: Tensor, step_index: Tensor) -> Tensor:
        """x̂_0 = x − σ_{i+1} v̂ (M, C, h, w) float32 of a latent at the noise level step i lands on, from the velocity
        at (x, σ_{i+1}·N) (`flow.pred_x0_from_velocity`; TailorPO's candidate preview on a flow model)."""
        sigma_next = self.grid.sigmas[step_index.long().cpu() + 1].to(x.device)
        return flow.pred_x0_from_velocity(x, pred, sigma_next)

    def log_prob(
        self, state: Tensor, pred: Tensor, step_index: Tensor, action: Tensor
    ) -> tuple[Tensor, Tensor, Tensor]:
        """(ℓ (M,) per-element-mean log π(action | state), μ, s (M,)) by `flow.sde_step_with_logprob` at the grid's
        noise level, the sampler's function; differentiable through `pred`."""
        _, sigma, sigma_next, _ = (v.to(state.device) for v in self.grid.scalars(step_index))
        _, log_prob, mean, std = flow.sde_step_with_logprob(
            state,
            pred,
            sigma,
            sigma_next,
            self.grid.noise_level,
            prev_sample=action.to(state.device),
            kind=self.grid.kind,
        )
        return log_prob, mean, std


StepKernel = DDIMKernel | FlowKernel


def step_kernel_for(grid: DDIMGrid | FlowGrid) -> StepKernel:
    """The step policy a sampling grid samples with: a `DDIMGrid`'s stochastic DDIM step, a `FlowGrid`'s SDE step."""
    if isinstance(grid, FlowGrid):
        return FlowKernel(grid)
    if isinstance(grid, DDIMGrid):
        return DDIMKernel(grid)
    raise TypeError(f"no step kernel for a {type(grid).__name__}")

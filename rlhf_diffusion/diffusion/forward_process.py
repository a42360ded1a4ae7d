"""The forward (noising) process a final-image loss trains on, for ε-prediction (DDPM) and flow-matching models: one
object per model family with everything the final-pair methods (Diffusion-DPO, DDE, `algorithms/diffusion_dpo.py`,
`algorithms/dde.py`) need to know about it, so that their loss code is one code for both.

Both processes are indexed by an integer training timestep t ∈ {0, …, N−1}, larger t = noisier:

- `EpsilonProcess` (SD1.5 / SDXL): x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε, target ε, the UNet sees t;
- `FlowProcess` (SD3 / SD3.5): x_σ = (1 − σ_t) x_0 + σ_t ε on the scheduler's training table σ_t
  (`flow.train_sigmas`), target v = ε − x_0, the transformer sees σ_t · N.

A draw of t is therefore a draw of σ on the flow model's own training table, which is how flow_grpo's SD3 DPO draws
it (an index into the shifted 1000-step schedule). The maths is in `ddim.py` and `flow.py`; this module only
binds it to a model's tables. Section numbers (§) refer to docs/algorithms.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from rlhf_diffusion.diffusion import ddim, flow
from rlhf_diffusion.diffusion.flow import FlowGrid
from rlhf_diffusion.diffusion.sampling import DDIMGrid

__all__ = ["EpsilonProcess", "FlowProcess", "ForwardProcess", "forward_process_for"]


@dataclass(frozen=True)
class EpsilonProcess:
    """The DDPM forward process of an ε-prediction model on its N-step training table.

    Attributes:
        alphas_cumprod: (N,) ᾱ_t.
        betas: (N,) β_t.
    """

    alphas_cumprod: Tensor
    betas: Tensor

    prediction: ClassVar[str] = "eps"  # what the network predicts (names the diagnostics: kl/eps_sq_diff_t)
    default_density: ClassVar[str] = "uniform"  # Diffusion-DPO train.py's t ~ U{lo..hi} [C]

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def model_timesteps(self, t: Tensor) -> Tensor:
        """What the UNet is called with at t: t itself (long)."""
        return t.long()

    def noised(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε (`ddim.add_noise`), on x0's device."""
        return ddim.add_noise(x0, noise.to(x0.device), ddim.gather_alpha(self.alphas_cumprod, t).to(x0.device))

    def target(self, x0: Tensor, noise: Tensor) -> Tensor:
        """The regression target of the prediction: ε."""
        return noise.to(torch.float32)

    def x0_error_weight(self, t: Tensor) -> Tensor:
        """(1 − ᾱ_t)/ᾱ_t (`ddim.x0_error_coefficient`): an ε-MSE times it is the x_0-MSE (DDE's S_t, §3b)."""
        return ddim.x0_error_coefficient(ddim.gather_alpha(self.alphas_cumprod, t))

    def kl_weights(self) -> Tensor:
        """(N,) λ_t of the DDPM reverse-step KL, λ_t ||ε_θ − ε_ref||² (`ddim.ddpm_kl_weights`)."""
        return ddim.ddpm_kl_weights(self.betas)


@dataclass(frozen=True)
class FlowProcess:
    """The rectified-flow forward process of a velocity-prediction model on its N-step training table.

    Attributes:
        sigmas: (N,) σ_t, ascending in t (`flow.train_sigmas`).
    """

    sigmas: Tensor

    prediction: ClassVar[str] = "v"  # names the diagnostics: kl/v_sq_diff_t
    # flow_grpo's SD3 DPO draws u ~ logit-normal(0, 1) and takes index ⌊N u⌋ of the shifted training schedule [C]
    default_density: ClassVar[str] = "logit_normal"

    @property
    def num_train_timesteps(self) -> int:
        return int(self.sigmas.shape[0])

    def sigma(self, t: Tensor) -> Tensor:
        """σ_t (B,) float32 on CPU."""
        return self.sigmas[t.long().cpu()]

    def model_timesteps(self, t: Tensor) -> Tensor:
        """What the transformer is called with at t: σ_t · N (float, as the scheduler's `timesteps`)."""
        return self.sigma(t) * self.num_train_timesteps

    def noised(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """x_σ = (1 − σ_t) x_0 + σ_t ε (`flow.add_noise`), on x0's device."""
        return flow.add_noise(x0, noise.to(x0.device), self.sigma(t).to(x0.device))

    def target(self, x0: Tensor, noise: Tensor) -> Tensor:
        """The regression target of the prediction: v = ε − x_0 (`flow.velocity_target`)."""
        return flow.velocity_target(x0, noise.to(x0.device))

    def x0_error_weight(self, t: Tensor) -> Tensor:
        """σ_t² (`flow.x0_error_weight`): a velocity-MSE times it is the x_0-MSE (DDE's S_t on flows, derived)."""
        return flow.x0_error_weight(self.sigma(t))

    def kl_weights(self) -> Tensor:
        """(N,) λ_t in velocity units (`flow.vp_equivalent_kl_weights`, derived)."""
        return flow.vp_equivalent_kl_weights(self.sigmas)


ForwardProcess = EpsilonProcess | FlowProcess


def forward_process_for(grid: DDIMGrid | FlowGrid) -> ForwardProcess:
    """The forward process of the model a sampling grid was built for: a `DDIMGrid`'s ε-model (its ᾱ and β tables)
    or a `FlowGrid`'s flow model (the training table of its scheduler's shift and N)."""
    if isinstance(grid, FlowGrid):
        return FlowProcess(sigmas=flow.train_sigmas(grid.num_train_timesteps, grid.shift))
    if isinstance(grid, DDIMGrid):
        return EpsilonProcess(alphas_cumprod=grid.alphas_cumprod, betas=grid.betas)
    raise TypeError(f"no forward process for a {type(grid).__name__}")

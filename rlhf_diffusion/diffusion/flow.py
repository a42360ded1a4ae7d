"""Rectified-flow maths for preference RL: the sampling grid, the ODE (Euler) step, Flow-GRPO's SDE step with its
Gaussian log-prob, and closed-form log-ratios and KLs between two policies' steps. Pure functions over tensors, in
the style of `ddim.py` (docs/algorithms.md §10).

Every function takes tensors and returns tensors: no config objects, no I/O, no Python branching on tensor values;
σ may be batched (one per sample, (B,)) and is broadcast over the latent's other dimensions. Arithmetic is fp32.

Convention (diffusers' flow-matching models, SD3 / FLUX): σ ∈ [0, 1] is the noise level,

    x_σ = (1 − σ) x_0 + σ ε,   ε ~ N(0, I),       velocity  v = dx_σ/dσ = ε − x_0,

and sampling runs σ from 1 (pure noise) down to 0 (data) over a grid σ_0 = 1 > σ_1 > … > σ_K = 0. Step i maps
σ = σ_i to σ' = σ_{i+1}, step size Δ = σ − σ' > 0.

Notation (code name -> symbol):

    v_pred       -> v̂           (CFG-combined) velocity prediction at (x_σ, σ)
    x0_pred      -> x̂_0         x_σ − σ v̂, the model's E[x_0 | x_σ]
    noise_pred   -> ε̂           x_σ + (1 − σ) v̂, the model's E[ε | x_σ]
    noise_level  -> a           Flow-GRPO's `noise_level` (0 = the ODE)
    kind                        the step's noise schedule: "flow_grpo" (Flow-GRPO's SDE) or "cps" (Flow-CPS)
    noise_scale  -> g           the SDE's diffusion coefficient, Flow-GRPO's σ_t = a sqrt(σ / (1 − σ))
    std          -> s           std of the step, g sqrt(Δ) ("flow_grpo") or σ' sin(aπ/2) ("cps")
    mean         -> μ           mean of the step π(x_{σ'} | x_σ) = N(μ, s² I)
    kappa        -> κ           coefficient of v̂ in μ once x_σ is fixed: μ_θ − μ_ref = κ (v̂_θ − v̂_ref)

Section numbers (§) refer to docs/algorithms.md.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf_diffusion.diffusion import ddim
from rlhf_diffusion.diffusion.ddim import _per_sample, _reduce

__all__ = [
    "FlowGrid",
    "SDE_KINDS",
    "add_noise",
    "cps_kappa",
    "cps_std",
    "cps_step_mean",
    "euler_step",
    "flow_sigmas",
    "flux_base_sigmas",
    "flux_mu",
    "flux_sigmas",
    "kl_same_std",
    "log_ratio_same_std",
    "pair_log_ratio_from_means",
    "pred_noise_from_velocity",
    "pred_x0_from_velocity",
    "sde_kappa",
    "sde_noise_scale",
    "sde_std",
    "sde_step_mean",
    "sde_step_with_logprob",
    "step_mean_and_std",
    "shift_sigmas",
    "train_sigmas",
    "velocity_target",
    "vp_equivalent_alpha_prod",
    "vp_equivalent_kl_weights",
    "x0_error_weight",
]

# The Gaussian KL and the single-action log-ratio of two policies that share the step's std are the same
# computation for a flow step as for a DDIM step (§5.5): the functions of ddim.py, under the same names.
kl_same_std = ddim.kl_same_std
log_ratio_same_std = ddim.log_ratio_same_std

# The step's noise schedules (`sampling.flow_sde`): Flow-GRPO's Euler–Maruyama SDE step, and Flow-CPS's
# coefficients-preserving step (Wang & Yu 2025, arXiv 2509.05952; flow_grpo's `sde_type: cps`).
SDE_KINDS = ("flow_grpo", "cps")


# --------------------------------------------------------------------------------------------------------------
# The forward process and the predictions derived from a velocity
# --------------------------------------------------------------------------------------------------------------


def add_noise(x0: Tensor, noise: Tensor, sigma: Tensor) -> Tensor:
    """x_σ = (1 − σ) x_0 + σ ε (diffusers `FlowMatchEulerDiscreteScheduler.scale_noise`).

    Args:
        x0, noise: (B, C, H, W).
        sigma: (B,) or scalar.
    """
    s = _per_sample(torch.as_tensor(sigma), x0)
    return (1 - s) * x0.to(torch.float32) + s * noise.to(torch.float32)


def velocity_target(x0: Tensor, noise: Tensor) -> Tensor:
    """The flow-matching regression target v = ε − x_0 (independent of σ)."""
    return noise.to(torch.float32) - x0.to(torch.float32)


def pred_x0_from_velocity(x: Tensor, v_pred: Tensor, sigma: Tensor) -> Tensor:
    """x̂_0 = x_σ − σ v̂: exact when v̂ = E[ε − x_0 | x_σ] (then x̂_0 = E[x_0 | x_σ], Tweedie for flows).

    Args:
        x, v_pred: (B, C, H, W).
        sigma: (B,) or scalar.
    """
    s = _per_sample(torch.as_tensor(sigma), x)
    return x.to(torch.float32) - s * v_pred.to(torch.float32)


def pred_noise_from_velocity(x: Tensor, v_pred: Tensor, sigma: Tensor) -> Tensor:
    """ε̂ = x_σ + (1 − σ) v̂, so that x_σ = (1 − σ) x̂_0 + σ ε̂ for any v̂.

    Args:
        x, v_pred: (B, C, H, W).
        sigma: (B,) or scalar.
    """
    s = _per_sample(torch.as_tensor(sigma), x)
    return x.to(torch.float32) + (1 - s) * v_pred.to(torch.float32)


def x0_error_weight(sigma: Tensor) -> Tensor:
    """σ²: ||x_0 − x̂_0(x_σ)||² = σ² ||v − v̂||² at x_σ = add_noise(x_0, ε, σ) (x̂_0 = x_σ − σ v̂): the weight that
    turns a velocity-MSE difference into an x_0-MSE difference, the flow form of `ddim.x0_error_coefficient`
    (DDE's single-shot weight, §3b; derived, docs/algorithms.md "Final-pair methods on flow models")."""
    return sigma.to(torch.float32) ** 2


def vp_equivalent_alpha_prod(sigma: Tensor) -> Tensor:
    """ᾱ(σ) = (1 − σ)² / ((1 − σ)² + σ²): the variance-preserving ᾱ with the same signal-to-noise ratio as x_σ,
    ᾱ/(1 − ᾱ) = ((1 − σ)/σ)². x_σ / sqrt((1 − σ)² + σ²) = sqrt(ᾱ) x_0 + sqrt(1 − ᾱ) ε is then the DDPM forward
    process at that ᾱ, with the same ε; the ε-prediction a velocity implies, ε̂ = x_σ + (1 − σ) v̂, has
    ε − ε̂ = (1 − σ)(v − v̂). (So (1 − ᾱ)/ᾱ · (1 − σ)² = σ² = `x0_error_weight`.)"""
    s = sigma.to(torch.float64)
    return ((1 - s) ** 2 / ((1 - s) ** 2 + s**2)).to(torch.float32)


def vp_equivalent_kl_weights(sigmas: Tensor) -> Tensor:
    """λ_t in velocity units on a training table σ_0 < … < σ_{N−1} (`train_sigmas`): the DDPM reverse-step KL
    weight (`ddim.ddpm_kl_weights`, β_t / (2 α_t (1 − ᾱ_{t−1}))) of the variance-preserving chain with
    ᾱ_t = `vp_equivalent_alpha_prod(σ_t)`, times (1 − σ_t)², the factor from an ε-MSE to a velocity-MSE. So
    λ_t · mean (v_θ − v_ref)² is that chain's step KL at t (derived: the flow samplers' own SDE kernel has another
    one; docs/algorithms.md "Final-pair methods on flow models"). With α_t = ᾱ_t/ᾱ_{t−1} the product simplifies to

        λ_t = (ᾱ_{t−1} − ᾱ_t) ((1 − σ_t)² + σ_t²) / (2 (1 − ᾱ_{t−1})),

    which stays finite at σ = 1 (ᾱ = 0), where the ε-unit weight does not. λ_0 = 0, as in `ddim.ddpm_kl_weights`.

    Args:
        sigmas: (N,) ascending in t.

    Returns:
        (N,) float32.
    """
    s = sigmas.to(torch.float64)
    norm = (1 - s) ** 2 + s**2
    alpha_prod, one_minus = (1 - s) ** 2 / norm, s**2 / norm  # ᾱ and 1 − ᾱ, each without cancellation (fp64)
    lam = (alpha_prod[:-1] - alpha_prod[1:]) * norm[1:] / (2 * one_minus[:-1].clamp(min=1e-300))
    return torch.cat([torch.zeros(1, dtype=torch.float64), lam]).to(torch.float32)


# --------------------------------------------------------------------------------------------------------------
# The sampling grid
# --------------------------------------------------------------------------------------------------------------


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """The timestep shift of SD3 / FLUX: σ ↦ s σ / (1 + (s − 1) σ). It fixes 0 and 1 and, for s > 1, spends more of
    the grid at high noise. FLUX's resolution-dependent ("exponential") shift with parameter μ is the same map with
    s = e^μ: e^μ / (e^μ + 1/σ − 1).
    """
    sigmas = sigmas.to(torch.float64)
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def train_sigmas(num_train_timesteps: int = 1000, shift: float | None = 1.0) -> Tensor:
    """The scheduler's training table indexed by t = 0 … N−1 from data to noise: σ_t = shift((t + 1)/N), ascending
    (diffusers' `FlowMatchEulerDiscreteScheduler` builds the same N values, σ = shift(n/N) for n = N … 1, in
    descending order; the transformer sees timestep σ_t · N). `shift` None (a dynamic-shift scheduler, FLUX): the
    unshifted table, as that scheduler keeps it.

    For shift 3, N = 1000: σ_0 = 3·0.001/1.002 = 0.0029940, σ_499 = 0.75, σ_999 = 1.

    Returns:
        (N,) float32.
    """
    base = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64) / num_train_timesteps
    return (base if shift is None else shift_sigmas(base, shift)).to(torch.float32)


def flow_sigmas(num_steps: int, shift: float = 1.0, mu: float | None = None, num_train_timesteps: int = 1000) -> Tensor:
    """The K + 1 sigmas of diffusers' `FlowMatchEulerDiscreteScheduler.set_timesteps(K)` with its default spacing.

    The scheduler's own training table is σ = shift(n/N), n = N … 1, so its smallest σ is σ_min = shift(1/N); the
    inference grid is K points evenly spaced from 1 to σ_min, shifted again, with σ_K = 0 appended. With a dynamic
    shift (`mu`, FLUX) the training table is unshifted (σ_min = 1/N) and the grid is shifted once, by e^μ.

    For shift 3, K = 10: linspace(1, 0.0029940, 10)[1] = 0.889222, shifted 3·0.889222/(1 + 2·0.889222) = 0.960130;
    the whole grid is 1, .9601, .9133, .8577, .7904, .7073, .6022, .4649, .2780, .0089, 0.

    Args:
        num_steps: K ≥ 1.
        shift: static shift (SD3 / SD3.5: 3.0); ignored when `mu` is given.
        mu: dynamic-shift parameter (FLUX: 0.5 … 1.15 by image size), or None for the static shift.
        num_train_timesteps: N.

    Returns:
        (K + 1,) float32, descending from 1 to 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    n = num_train_timesteps
    if mu is None:
        sigma_min = shift_sigmas(torch.tensor([1.0 / n]), shift).to(torch.float32).item()
        grid = shift_sigmas(torch.linspace(n, sigma_min * n, num_steps, dtype=torch.float64) / n, shift)
    else:
        grid = shift_sigmas(torch.linspace(n, 1.0, num_steps, dtype=torch.float64) / n, math.exp(mu))
    return torch.cat([grid.to(torch.float32), torch.zeros(1)])


def flux_mu(
    image_seq_len: int,
    base_seq_len: int = 256,
    max_seq_len: int = 4096,
    base_shift: float = 0.5,
    max_shift: float = 1.15,
) -> float:
    """FLUX's dynamic-shift parameter μ for an image of L packed tokens: the line through (base_seq_len, base_shift)
    and (max_seq_len, max_shift) at L (diffusers `pipeline_flux.calculate_shift`; the defaults are FLUX.1's
    scheduler config). L = (h/2)(w/2) for latents h x w, so 1024 px on FLUX.1 (h = w = 128) gives L = 4096, μ = 1.15,
    and 512 px gives L = 1024, μ = 0.5 + 0.65 · 768/3840 = 0.63.
    """
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + (base_shift - slope * base_seq_len)


def flux_base_sigmas(num_steps: int) -> list[float]:
    """The K un-shifted sigmas `FluxPipeline` passes to `set_timesteps`: linspace(1, 1/K, K)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return torch.linspace(1.0, 1.0 / num_steps, num_steps, dtype=torch.float64).tolist()


def flux_sigmas(num_steps: int, mu: float) -> Tensor:
    """The K + 1 sigmas `FluxPipeline` samples on: linspace(1, 1/K, K) shifted by e^μ (`shift_sigmas`), then 0 (its
    scheduler's `set_timesteps(sigmas=linspace(1, 1/K, K), mu=μ)`). Unlike `flow_sigmas(K, mu=μ)` (the scheduler's
    own spacing, linspace(1, 1/N, K)), the last step starts from the shifted 1/K, not from the shifted 1/N.

    For K = 4, μ = 1.15 (e^μ = 3.158): 1, 0.9045, 0.7595, 0.5128, 0.

    Returns:
        (K + 1,) float32, descending from 1 to 0.
    """
    base = torch.tensor(flux_base_sigmas(num_steps), dtype=torch.float64)
    return torch.cat([shift_sigmas(base, math.exp(mu)).to(torch.float32), torch.zeros(1)])


@dataclass(frozen=True)
class FlowGrid:
    """The K-step flow grid with every per-step scalar of the SDE step, index i = 0 … K−1 from noise to data.

    Attributes:
        sigmas: (K + 1,) σ_0 = 1 > … > σ_K = 0 (the scheduler's `sigmas` after `set_timesteps`).
        timesteps: (K,) σ_i · N, what the transformer is called with (the scheduler's `timesteps`).
        noise_scale: (K,) g_i with s_i = g_i sqrt(σ_i − σ_{i+1}): Flow-GRPO's σ_t at the grid's noise level
            (`sde_noise_scale`); for "cps" the equivalent s_i / sqrt(σ_i − σ_{i+1}).
        std_dev: (K,) s_i, the std of step i (`step_mean_and_std`).
        kappa: (K,) κ_i, the coefficient of v̂ in the mean of step i (`sde_kappa`, `cps_kappa`).
        noise_level: a (0 = the ODE; every std_dev is then 0).
        shift: the scheduler's static shift (None with a dynamic shift).
        mu: the dynamic-shift parameter passed to `set_timesteps` (None with a static shift).
        num_train_timesteps: N.
        kind: the step's noise schedule, one of `SDE_KINDS`. With "cps" the last step (σ' = 0) has s = 0 and no
            density.
    """

    sigmas: Tensor
    timesteps: Tensor
    noise_scale: Tensor
    std_dev: Tensor
    kappa: Tensor
    noise_level: float
    shift: float | None
    mu: float | None
    num_train_timesteps: int
    kind: str = "flow_grpo"

    @classmethod
    def from_scheduler(
        cls,
        scheduler,
        num_steps: int,
        noise_level: float,
        mu: float | None = None,
        sigmas: Sequence[float] | None = None,
        kind: str = "flow_grpo",
    ) -> FlowGrid:
        """Builds the grid from a diffusers `FlowMatchEulerDiscreteScheduler`: `set_timesteps(num_steps, mu=mu,
        sigmas=sigmas)` on a copy (the caller's scheduler is not touched), so every option of its config (shift,
        dynamic shift, shift_terminal, Karras sigmas, ...) is honoured exactly as the stock pipelines do.

        Args:
            scheduler: a `FlowMatchEulerDiscreteScheduler` (or a scheduler with the same `set_timesteps` / `sigmas`).
            num_steps: K.
            noise_level: a ≥ 0 (Flow-GRPO: 0.7 on SD3.5, 0.9 on FLUX).
            mu: the dynamic-shift parameter (required when the config has `use_dynamic_shifting`).
            sigmas: custom un-shifted sigmas (K,), as FLUX's pipeline passes (linspace(1, 1/K, K)).
            kind: the step's noise schedule, one of `SDE_KINDS`.
        """
        config = scheduler.config
        if getattr(config, "invert_sigmas", False):
            raise ValueError("scheduler invert_sigmas must be False (σ must run from 1 down to 0)")
        if not noise_level >= 0:
            raise ValueError(f"noise_level must be >= 0, got {noise_level}")
        if kind not in SDE_KINDS:
            raise ValueError(f"kind must be one of {SDE_KINDS}, got {kind!r}")
        local = copy.deepcopy(scheduler)
        local.set_timesteps(num_steps, mu=mu, sigmas=None if sigmas is None else list(sigmas))
        table = local.sigmas.detach().to("cpu", torch.float32)
        if not (table[-1] == 0 and bool((table[:-1] > table[1:]).all()) and table[0] <= 1):
            raise ValueError(f"the scheduler's sigmas must descend from at most 1 to 0, got {table.tolist()}")
        sigma, sigma_next = table[:-1], table[1:]
        if kind == "cps":
            std = cps_std(sigma_next, noise_level)
            g, kappa = std / (sigma - sigma_next).sqrt(), cps_kappa(sigma, sigma_next, std)
        else:
            g = sde_noise_scale(sigma, sigma_next, noise_level)
            std, kappa = sde_std(sigma, sigma_next, g), sde_kappa(sigma, sigma_next, g)
        dynamic = bool(getattr(config, "use_dynamic_shifting", False))
        return cls(
            sigmas=table,
            timesteps=local.timesteps.detach().to("cpu", torch.float32),
            noise_scale=g,
            std_dev=std,
            kappa=kappa,
            noise_level=float(noise_level),
            shift=None if dynamic else float(local.shift),
            mu=mu,
            num_train_timesteps=int(config.num_train_timesteps),
            kind=kind,
        )

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def scalars(self, step_index: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-sample (timestep, σ_i, σ_{i+1}, s_i) for step indices (B,) → four (B,) tensors."""
        i = step_index.long().cpu()
        return self.timesteps[i], self.sigmas[i], self.sigmas[i + 1], self.std_dev[i]


# --------------------------------------------------------------------------------------------------------------
# The ODE step and Flow-GRPO's SDE step  π(x_{σ'} | x_σ, c) = N(μ, s² I)
# --------------------------------------------------------------------------------------------------------------


def euler_step(x: Tensor, v_pred: Tensor, sigma: Tensor, sigma_next: Tensor) -> Tensor:
    """The probability-flow ODE dx/dσ = v integrated by one Euler step: x_{σ'} = x_σ + (σ' − σ) v̂.

    This is diffusers' `FlowMatchEulerDiscreteScheduler.step` (without `stochastic_sampling`), computed in fp32.

    Args:
        x, v_pred: (B, C, H, W).
        sigma, sigma_next: (B,) or scalars, σ > σ'.

    Returns:
        (B, C, H, W) in x's dtype.
    """
    x32 = x.to(torch.float32)
    dt = _per_sample(torch.as_tensor(sigma_next), x32) - _per_sample(torch.as_tensor(sigma), x32)
    return (x32 + dt * v_pred.to(torch.float32)).to(x.dtype)


def sde_noise_scale(sigma: Tensor, sigma_next: Tensor, noise_level: float | Tensor) -> Tensor:
    """Flow-GRPO's diffusion coefficient g = σ_t = a sqrt(σ / (1 − σ)), with 1 − σ replaced by σ − σ' at σ = 1.

    At σ = 1 the formula is infinite; Flow-GRPO uses the grid's second sigma σ_1 in the denominator there, which for
    the step out of σ = 1 is σ' itself, so that the step's std g sqrt(Δ) is exactly a.

    Args:
        sigma, sigma_next: (B,) or scalars.
        noise_level: a ≥ 0, a float or per-sample (B,).

    Returns:
        (B,) float32 (or a scalar tensor for scalar inputs).
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=sigma.device)
    a = torch.as_tensor(noise_level, dtype=torch.float32, device=sigma.device)
    denominator = 1 - torch.where(sigma >= 1, sigma_next, sigma)
    return a * (sigma / denominator).sqrt()


def sde_std(sigma: Tensor, sigma_next: Tensor, noise_scale: Tensor) -> Tensor:
    """The step's std s = g sqrt(σ − σ'): Euler–Maruyama's noise over one step. (B,) float32."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    delta = sigma - torch.as_tensor(sigma_next, dtype=torch.float32, device=sigma.device)
    return torch.as_tensor(noise_scale, dtype=torch.float32, device=sigma.device) * delta.sqrt()


def sde_kappa(sigma: Tensor, sigma_next: Tensor, noise_scale: Tensor) -> Tensor:
    """κ with μ = (1 − g²Δ/(2σ)) x_σ + κ v̂, so that μ_θ − μ_ref = κ (v̂_θ − v̂_ref) at a shared x_σ (§10).

    κ = −Δ (1 + g² (1 − σ)/(2σ)): −Δ = σ' − σ for the ODE (g = 0); for Flow-GRPO's g at σ < 1,
    κ = −Δ (1 + a²/2). Returns (B,) float32.
    """
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    delta = sigma - torch.as_tensor(sigma_next, dtype=torch.float32, device=sigma.device)
    g2 = torch.as_tensor(noise_scale, dtype=torch.float32, device=sigma.device) ** 2
    return -delta * (1 + g2 * (1 - sigma) / (2 * sigma))


def sde_step_mean(
    x: Tensor, v_pred: Tensor, sigma: Tensor, sigma_next: Tensor, noise_scale: Tensor
) -> tuple[Tensor, Tensor]:
    """The mean of the Euler–Maruyama step of the reverse SDE with diffusion coefficient g (§10):

        μ = x_σ + (σ' − σ) v̂ − (g² Δ / (2σ)) ε̂,     ε̂ = x_σ + (1 − σ) v̂,  Δ = σ − σ'

    i.e. the Euler step of the ODE plus the score term (g²/2) ∇log p_σ ≈ −(g²/(2σ)) ε̂ over Δ. With g = 0 it is the
    Euler step exactly. Equivalent forms: μ = (1 − g²Δ/(2σ)) x_σ + κ v̂ (Flow-GRPO's code) and
    μ = (1 − σ') x̂_0 + (σ' − g²Δ/(2σ)) ε̂.

    Args:
        x, v_pred: (B, C, H, W).
        sigma, sigma_next, noise_scale: (B,) or scalars.

    Returns:
        (mean, x0_pred), each (B, C, H, W) float32.
    """
    x32, v32 = x.to(torch.float32), v_pred.to(torch.float32)
    s = _per_sample(torch.as_tensor(sigma), x32)
    s_next = _per_sample(torch.as_tensor(sigma_next), x32)
    g2 = _per_sample(torch.as_tensor(noise_scale), x32) ** 2
    noise_pred = x32 + (1 - s) * v32
    mean = x32 + (s_next - s) * v32 - (g2 * (s - s_next) / (2 * s)) * noise_pred
    return mean, x32 - s * v32


def cps_std(sigma_next: Tensor, noise_level: float | Tensor) -> Tensor:
    """Flow-CPS's step std s = σ' sin(aπ/2): a fraction of the noise the next state carries, 0 at the last step
    (σ' = 0) and a = 1 replacing all of it with fresh noise. (B,) float32."""
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32)
    a = torch.as_tensor(noise_level, dtype=torch.float32, device=sigma_next.device)
    return sigma_next * torch.sin(a * math.pi / 2)


def cps_kappa(sigma: Tensor, sigma_next: Tensor, std: Tensor) -> Tensor:
    """κ with μ = c x_σ + κ v̂ for the CPS step (`cps_step_mean`): κ = (1 − σ) sqrt(σ'² − s²) − σ (1 − σ'), so that
    μ_θ − μ_ref = κ (v̂_θ − v̂_ref) at a shared x_σ. At s = 0 it is σ' − σ, the Euler step's. (B,) float32."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32)
    sigma_next = torch.as_tensor(sigma_next, dtype=torch.float32, device=sigma.device)
    std = torch.as_tensor(std, dtype=torch.float32, device=sigma.device)
    return (1 - sigma) * (sigma_next**2 - std**2).clamp_min(0).sqrt() - sigma * (1 - sigma_next)


def cps_step_mean(x: Tensor, v_pred: Tensor, sigma: Tensor, sigma_next: Tensor, std: Tensor) -> tuple[Tensor, Tensor]:
    """The mean of Flow-CPS's coefficients-preserving step (Wang & Yu 2025):

        μ = (1 − σ') x̂_0 + sqrt(σ'² − s²) ε̂,      x̂_0 = x_σ − σ v̂,  ε̂ = x_σ + (1 − σ) v̂

    so that x_{σ'} = μ + s z has data coefficient 1 − σ' and total noise variance (σ'² − s²) + s² = σ'² when the
    predictions are exact: the next state is on the forward process's marginal at σ', which Flow-GRPO's
    Euler–Maruyama step only approximates. At s = 0 it is the Euler step exactly.

    Args:
        x, v_pred: (B, C, H, W).
        sigma, sigma_next, std: (B,) or scalars; s ≤ σ'.

    Returns:
        (mean, x0_pred), each (B, C, H, W) float32.
    """
    x32, v32 = x.to(torch.float32), v_pred.to(torch.float32)
    s = _per_sample(torch.as_tensor(sigma), x32)
    s_next = _per_sample(torch.as_tensor(sigma_next), x32)
    keep = (s_next**2 - _per_sample(torch.as_tensor(std), x32) ** 2).clamp_min(0).sqrt()
    x0_pred = x32 - s * v32
    return (1 - s_next) * x0_pred + keep * (x32 + (1 - s) * v32), x0_pred


def step_mean_and_std(
    x: Tensor, v_pred: Tensor, sigma: Tensor, sigma_next: Tensor, noise_level: float | Tensor, kind: str = "flow_grpo"
) -> tuple[Tensor, Tensor]:
    """(μ (B, C, H, W) float32, s (B,) or scalar float32) of one step of the `kind` schedule at noise level a:
    Flow-GRPO's SDE step (`sde_step_mean`, s = g sqrt(Δ)) or Flow-CPS's (`cps_step_mean`, s = σ' sin(aπ/2))."""
    if kind == "cps":
        std = cps_std(sigma_next, noise_level)
        return cps_step_mean(x, v_pred, sigma, sigma_next, std)[0], std
    if kind != "flow_grpo":
        raise ValueError(f"kind must be one of {SDE_KINDS}, got {kind!r}")
    g = sde_noise_scale(sigma, sigma_next, noise_level)
    return sde_step_mean(x, v_pred, sigma, sigma_next, g)[0], sde_std(sigma, sigma_next, g)


def sde_step_with_logprob(
    x: Tensor,
    v_pred: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    noise_level: float | Tensor,
    prev_sample: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
    kind: str = "flow_grpo",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One step of Flow-GRPO's SDE sampler (or Flow-CPS's, `kind="cps"`) and the log-prob of its action: the flow
    model's step policy (§10).

    The same function samples (prev_sample=None) and re-scores a stored action (prev_sample given), so sampling and
    training cannot disagree. Gradients flow into the mean (through v_pred), never into the action.

    Steps ("flow_grpo"; "cps" takes s and μ from `cps_std` and `cps_step_mean`):
        1. g = a sqrt(σ/(1 − σ)) (σ = 1: 1 − σ → σ − σ') and s = g sqrt(σ − σ').
        2. μ = x_σ + (σ' − σ) v̂ − (g²Δ/(2σ)) ε̂ (`sde_step_mean`).
        3. x_{σ'} = μ + s z, z ~ N(0, I), unless `prev_sample` is given.
        4. log π(x_{σ'} | x_σ) = reduce[−(x_{σ'} − μ)²/(2s²) − log s − log sqrt(2π)].

    With a = 0 the step is the ODE's Euler step exactly (s = 0, x_{σ'} = μ bit for bit) and has no density: its
    log-prob is NaN (a per-sample a may mix ODE and SDE rows; train only on rows with a > 0). So is "cps"'s last
    step (σ' = 0). Flow-CPS's code drops the density's 1/(2s²) and normaliser ("remove all constants"), which
    rescales each step's log-ratio by 2s²; here the log-prob is the Gaussian density's under either kind, so the
    importance ratio is the true likelihood ratio (ours).

    Args:
        x: (B, C, H, W) current state x_σ.
        v_pred: (B, C, H, W) CFG-combined velocity prediction at (x_σ, σ).
        sigma, sigma_next: (B,) σ and σ' (σ' < σ; σ' = 0 at the last step).
        noise_level: a ≥ 0, a float or per-sample (B,).
        prev_sample: (B, C, H, W) stored action to re-score, or None to sample.
        noise: (B, C, H, W) z to use when sampling (else drawn from `generator`).
        generator: RNG for z.
        reduction: "mean" (Flow-GRPO, ddpo-pytorch: a per-element mean) or "sum".
        kind: the step's noise schedule, one of `SDE_KINDS`.

    Returns:
        (x_prev in x's dtype, log_prob (B,), mean (B, C, H, W) float32, std (B,) s — the step's std, not g).
    """
    mean, std = step_mean_and_std(x, v_pred, sigma, sigma_next, noise_level, kind)  # steps 1 and 2
    if prev_sample is None:  # step 3
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        prev_sample = mean + _per_sample(std, mean) * noise.to(mean)
    std_b = std.expand(x.shape[0]) if std.ndim == 0 else std
    safe_std = torch.where(std_b > 0, std_b, torch.ones_like(std_b))
    log_prob = ddim.gaussian_log_prob(prev_sample.detach(), mean, safe_std, reduction)  # step 4
    log_prob = torch.where(std_b.to(log_prob.device) > 0, log_prob, torch.full_like(log_prob, math.nan))
    return prev_sample.to(x.dtype), log_prob, mean, std_b


# --------------------------------------------------------------------------------------------------------------
# Closed-form log-ratios for two policies whose steps share s (§10)
# --------------------------------------------------------------------------------------------------------------


def pair_log_ratio_from_means(
    x_a: Tensor, x_b: Tensor, mean_theta: Tensor, mean_ref: Tensor, std: Tensor, reduction: str = "mean"
) -> Tensor:
    """Δ_a − Δ_b for two actions drawn from the same state x_σ, Δ = log π_θ(x) − log π_ref(x), in closed form:

        Δ_a − Δ_b = reduce[(μ_θ − μ_ref)(x_a − x_b)] / s²

    Both policies are Gaussians with the same std s at that state, so in each Δ the normalisers cancel, and in the
    difference the quadratic terms cancel too. With μ_θ − μ_ref = κ (v̂_θ − v̂_ref) (`sde_kappa`) this is
    (κ/s²) reduce[(v̂_θ − v̂_ref)(x_a − x_b)]; its gradient pulls μ_θ toward x_a and away from x_b.

    Args:
        x_a, x_b: (B, C, H, W) the two actions (treated as data: detached).
        mean_theta, mean_ref: (B, C, H, W) the two policies' means at the shared x_σ.
        std: (B,) the shared s (> 0).

    Returns:
        (B,).
    """
    delta_x = (x_a - x_b).detach().to(torch.float32)
    diff = (mean_theta.to(torch.float32) - mean_ref.to(torch.float32)) * delta_x
    return _reduce(diff / _per_sample(std, delta_x) ** 2, reduction)

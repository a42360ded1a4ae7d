"""DDIM maths for preference RL: x0 prediction, the DDIM step with its Gaussian log-prob, closed-form
log-ratios, the single-shot DDIM jump and DDPM quantities (CFG: `models.conditioning.predict_noise_cfg`). Pure
functions over tensors.

Every function takes tensors and returns tensors: no config objects, no I/O, no Python branching on tensor
values, and timesteps may be batched (one per sample). Scheduler scalars are gathered per sample from the
`alphas_cumprod` table (N,) of a diffusers scheduler and broadcast over (C, H, W).

Notation (code name -> paper symbol; DDIM = Song et al. 2021, arXiv 2010.02502):

    alpha_prod_t       -> ᾱ_τ          cumulative product of (1 - β) at the current timestep τ
    alpha_prod_t_prev  -> ᾱ_{prev(τ)}  at the previous timestep of the K-step grid (ᾱ_0 when prev(τ) < 0)
    eps_pred           -> ε̂           (CFG-combined) noise prediction
    x0_pred            -> x̂_0         predicted clean sample, DDIM eq. 12 ("predicted x_0")
    std_dev_t          -> σ_τ(η)       DDIM eq. 16
    mean               -> μ_τ          mean of the DDIM transition p(x_prev | x_τ), DDIM eq. 12 without noise
    kappa_t            -> κ_τ          coefficient of ε̂ in μ_τ once x_τ is fixed (docs/algorithms.md §5.5)

Section numbers (§) in this file refer to docs/algorithms.md.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "add_noise",
    "ddim_jump",
    "ddim_kappa",
    "ddim_std",
    "ddim_step_mean",
    "ddim_step_with_logprob",
    "ddim_timesteps",
    "ddpm_kl_weights",
    "ddpm_step_kl",
    "gather_alpha",
    "gather_alpha_prev",
    "gaussian_log_prob",
    "kl_same_std",
    "log_ratio_same_std",
    "pair_log_ratio_same_state",
    "previous_timesteps",
    "pred_x0_from_eps",
    "x0_error_coefficient",
]

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


def _per_sample(values: Tensor, like: Tensor) -> Tensor:
    """Reshapes per-sample scalars (B,) or () to broadcast against `like` (B, C, H, W)."""
    values = values.to(device=like.device, dtype=torch.float32)
    return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def _reduce(x: Tensor, reduction: str) -> Tensor:
    """Mean or sum over every non-batch dimension: (B, ...) -> (B,)."""
    dims = tuple(range(1, x.ndim))
    if reduction == "mean":
        return x.mean(dim=dims)
    if reduction == "sum":
        return x.sum(dim=dims)
    raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


# --------------------------------------------------------------------------------------------------------------
# Timestep grids and scheduler gathers
# --------------------------------------------------------------------------------------------------------------


def ddim_timesteps(num_train_timesteps: int, num_steps: int, steps_offset: int = 1) -> Tensor:
    """The K DDIM timesteps with "leading" spacing, descending: τ_i = (K−1−i)·(N/K) + offset.

    For N = 1000, K = 20, offset 1 this is 951, 901, ..., 51, 1 (diffusers `DDIMScheduler.set_timesteps`).

    Returns:
        Long tensor (K,).
    """
    if not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}")
    step_ratio = num_train_timesteps // num_steps
    return torch.arange(num_steps - 1, -1, -1, dtype=torch.long) * step_ratio + steps_offset


def previous_timesteps(timesteps: Tensor, num_train_timesteps: int, num_steps: int) -> Tensor:
    """prev(τ) = τ − N/K on the K-step grid; negative values mean "before the first training step" (ᾱ_0 is used).

    Args:
        timesteps: long tensor of any shape.

    Returns:
        Long tensor, same shape.
    """
    return timesteps - num_train_timesteps // num_steps


def gather_alpha(alphas_cumprod: Tensor, timesteps: Tensor) -> Tensor:
    """ᾱ_t for a batch of timesteps: (N,), (B,) -> (B,) float32."""
    return alphas_cumprod.to(torch.float32)[timesteps.long().to(alphas_cumprod.device)]


def gather_alpha_prev(alphas_cumprod: Tensor, prev_timesteps: Tensor, final_alpha_cumprod: Tensor | float) -> Tensor:
    """ᾱ_{prev(τ)}, with `final_alpha_cumprod` where prev(τ) < 0 (diffusers `set_alpha_to_one=False` → ᾱ_0).

    Args:
        alphas_cumprod: (N,).
        prev_timesteps: (B,) long, may be negative.
        final_alpha_cumprod: scalar used for negative previous timesteps.

    Returns:
        (B,) float32.
    """
    table = alphas_cumprod.to(torch.float32)
    prev = prev_timesteps.long().to(table.device)
    final = torch.as_tensor(final_alpha_cumprod, dtype=torch.float32, device=table.device)
    return torch.where(prev >= 0, table[prev.clamp(min=0)], final)


# --------------------------------------------------------------------------------------------------------------
# Predictions
# --------------------------------------------------------------------------------------------------------------


def pred_x0_from_eps(x_t: Tensor, eps_pred: Tensor, alpha_prod_t: Tensor) -> Tensor:
    """Tweedie / DDIM eq. 12 "predicted x_0": x̂_0 = (x_t − sqrt(1 − ᾱ_t) ε̂) / sqrt(ᾱ_t).

    Args:
        x_t: (B, C, H, W).
        eps_pred: (B, C, H, W).
        alpha_prod_t: (B,) or scalar.
    """
    a = _per_sample(alpha_prod_t, x_t)
    return (x_t - (1 - a).sqrt() * eps_pred) / a.sqrt()


def add_noise(x0: Tensor, noise: Tensor, alpha_prod_t: Tensor) -> Tensor:
    """Forward process q(x_t | x_0): x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε (DDPM eq. 4; `scheduler.add_noise`)."""
    a = _per_sample(alpha_prod_t, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def x0_error_coefficient(alpha_prod_t: Tensor) -> Tensor:
    """(1 − ᾱ_t)/ᾱ_t: ||x_0 − x̂_0(x_t)||² = coefficient · ||ε − ε̂||² when x_t = add_noise(x_0, ε) (DDE, §3b)."""
    a = alpha_prod_t.to(torch.float32)
    return (1 - a) / a


# --------------------------------------------------------------------------------------------------------------
# The DDIM step as a Gaussian policy  π(x_prev | x_τ, c) = N(μ_τ, σ_τ² I)
# --------------------------------------------------------------------------------------------------------------


def ddim_std(alpha_prod_t: Tensor, alpha_prod_t_prev: Tensor, eta: float) -> Tensor:
    """DDIM eq. 16: σ_τ(η) = η · sqrt((1 − ᾱ_prev)/(1 − ᾱ_τ)) · sqrt(1 − ᾱ_τ/ᾱ_prev).

    Args:
        alpha_prod_t, alpha_prod_t_prev: (B,) or scalars.

    Returns:
        (B,) float32; zero where eta == 0.
    """
    a, a_prev = alpha_prod_t.to(torch.float32), alpha_prod_t_prev.to(torch.float32)
    variance = (1 - a_prev) / (1 - a) * (1 - a / a_prev)
    return eta * variance.clamp(min=0).sqrt()


def ddim_step_mean(
    x_t: Tensor, eps_pred: Tensor, alpha_prod_t: Tensor, alpha_prod_t_prev: Tensor, std_dev_t: Tensor
) -> tuple[Tensor, Tensor]:
    """DDIM eq. 12 without the noise term: μ = sqrt(ᾱ_prev) x̂_0 + sqrt(1 − ᾱ_prev − σ²) ε̂.

    Args:
        x_t, eps_pred: (B, C, H, W).
        alpha_prod_t, alpha_prod_t_prev, std_dev_t: (B,).

    Returns:
        (mean, x0_pred), each (B, C, H, W).
    """
    x0_pred = pred_x0_from_eps(x_t, eps_pred, alpha_prod_t)  # DDIM eq. 12, "predicted x_0"
    a_prev = _per_sample(alpha_prod_t_prev, x_t)
    std = _per_sample(std_dev_t, x_t)
    direction = (1 - a_prev - std**2).clamp(min=0).sqrt() * eps_pred  # "direction pointing to x_t"
    return a_prev.sqrt() * x0_pred + direction, x0_pred


def ddim_kappa(alpha_prod_t: Tensor, alpha_prod_t_prev: Tensor, std_dev_t: Tensor) -> Tensor:
    """κ_τ with μ_τ = sqrt(ᾱ_prev/ᾱ_τ) x_τ + κ_τ ε̂ (§5.5), so μ_θ − μ_ref = κ_τ (ε̂_θ − ε̂_ref).

    κ_τ = sqrt(1 − ᾱ_prev − σ²) − sqrt(ᾱ_prev) · sqrt(1 − ᾱ_τ)/sqrt(ᾱ_τ). Returns (B,) float32.
    """
    a, a_prev = alpha_prod_t.to(torch.float32), alpha_prod_t_prev.to(torch.float32)
    s = std_dev_t.to(torch.float32)
    return (1 - a_prev - s**2).clamp(min=0).sqrt() - a_prev.sqrt() * (1 - a).sqrt() / a.sqrt()


def gaussian_log_prob(x: Tensor, mean: Tensor, std: Tensor, reduction: str = "mean") -> Tensor:
    """Per-element Gaussian log-density log N(x; μ, σ²), reduced over non-batch dims.

    `reduction="mean"` is what ddpo-pytorch, D3PO and SPO use (their β values assume it); "sum" is the true
    log-density of the D-dimensional latent (= D × mean).

    Args:
        x, mean: (B, C, H, W).
        std: (B,) per-sample σ (must be > 0).

    Returns:
        (B,).
    """
    s = _per_sample(std, x)
    log_density = -((x.to(torch.float32) - mean.to(torch.float32)) ** 2) / (2 * s**2) - torch.log(s) - _LOG_SQRT_2PI
    return _reduce(log_density, reduction)


def ddim_step_with_logprob(
    x_t: Tensor,
    eps_pred: Tensor,
    alpha_prod_t: Tensor,
    alpha_prod_t_prev: Tensor,
    eta: float,
    prev_sample: Tensor | None = None,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
    reduction: str = "mean",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One stochastic DDIM step and the log-prob of its action: the policy of D3PO / TailorPO (§4.2).

    The same function samples (prev_sample=None) and re-scores a stored action (prev_sample given), so sampling
    and training cannot disagree. Gradients flow into the mean (through eps_pred), never into the action.

    Steps:
        1. σ_τ(η) (DDIM eq. 16); defined only for η > 0 (σ sits in the log-prob's denominator).
        2. μ_τ and x̂_0 (DDIM eq. 12).
        3. x_prev = μ_τ + σ_τ z, z ~ N(0, I), unless `prev_sample` is given.
        4. log π(x_prev | x_τ) with the requested reduction.

    Args:
        x_t: (B, C, H, W) current state x_τ.
        eps_pred: (B, C, H, W) CFG-combined noise prediction at (x_τ, τ).
        alpha_prod_t, alpha_prod_t_prev: (B,) ᾱ_τ and ᾱ_{prev(τ)}.
        eta: DDIM η > 0.
        prev_sample: (B, C, H, W) stored action to re-score, or None to sample.
        noise: (B, C, H, W) z to use when sampling (else drawn from `generator`).
        generator: RNG for z.
        reduction: "mean" (official codes) or "sum".

    Returns:
        (x_prev, log_prob (B,), mean (B, C, H, W), std_dev_t (B,)).
    """
    if not eta > 0:
        raise ValueError(f"eta must be > 0 for a DDIM log-prob (σ_τ = 0 at eta = 0), got {eta}")
    std_dev_t = ddim_std(alpha_prod_t, alpha_prod_t_prev, eta)  # step 1
    mean, _ = ddim_step_mean(x_t, eps_pred, alpha_prod_t, alpha_prod_t_prev, std_dev_t)  # step 2
    if prev_sample is None:  # step 3
        if noise is None:
            noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=torch.float32)
        prev_sample = mean + _per_sample(std_dev_t, x_t) * noise.to(mean)
    log_prob = gaussian_log_prob(prev_sample.detach(), mean, std_dev_t, reduction)  # step 4
    return prev_sample.to(x_t.dtype), log_prob, mean, std_dev_t


# --------------------------------------------------------------------------------------------------------------
# Closed-form log-ratios for Gaussians that share σ (§5.5)
# --------------------------------------------------------------------------------------------------------------


def log_ratio_same_std(x: Tensor, mean_theta: Tensor, mean_ref: Tensor, std: Tensor, reduction: str = "mean") -> Tensor:
    """log π_θ(x) − log π_ref(x) for N(μ_θ, σ²I) vs N(μ_ref, σ²I): reduce[(x − μ_ref)² − (x − μ_θ)²] / (2σ²).

    The −log σ and 2π terms cancel exactly because both policies share σ_τ (D3PO §1b).

    Args:
        x: (B, C, H, W) the action (treated as data: detached).
        mean_theta, mean_ref: (B, C, H, W).
        std: (B,).

    Returns:
        (B,) log-ratio Δ.
    """
    x = x.detach().to(torch.float32)
    s = _per_sample(std, x)
    diff = (x - mean_ref.to(torch.float32)) ** 2 - (x - mean_theta.to(torch.float32)) ** 2
    return _reduce(diff / (2 * s**2), reduction)


def kl_same_std(mean_theta: Tensor, mean_ref: Tensor, std: Tensor, reduction: str = "mean") -> Tensor:
    """KL(N(μ_θ, σ²I) ‖ N(μ_ref, σ²I)) = reduce[(μ_θ − μ_ref)²] / (2σ²): the per-step KL of the policy to the
    reference (§5.5; the trace and log-det terms cancel because both policies share σ_τ).

    With `reduction="mean"` it is in nats per latent element, the unit of `log_ratio_same_std`'s "mean" Δ, whose
    expectation under x ~ π_θ it is; "sum" is the KL of the whole D-dimensional latent (= D × mean).

    Args:
        mean_theta, mean_ref: (B, C, H, W).
        std: (B,) σ_τ (> 0).

    Returns:
        (B,) KL ≥ 0.
    """
    s = _per_sample(std, mean_theta)
    diff = (mean_theta.to(torch.float32) - mean_ref.to(torch.float32)) ** 2
    return _reduce(diff / (2 * s**2), reduction)


def pair_log_ratio_same_state(
    x_winner: Tensor,
    x_loser: Tensor,
    eps_theta: Tensor,
    eps_ref: Tensor,
    kappa_t: Tensor,
    std: Tensor,
    reduction: str = "mean",
) -> Tensor:
    """Δ_w − Δ_l for two actions drawn from the same state x_τ (TailorPO / SPO), in closed form.

    (Δ_w − Δ_l) = (κ_τ/σ_τ²) · reduce[(x^w − x^l)(ε̂_θ − ε̂_ref)]  (§2b, §5.5). Its θ-gradient is
    ∝ ∇_θ μ_θ(x_τ)ᵀ (x^w − x^l)/σ_τ²: the mean is pulled toward the winner and away from the loser (TailorPO Eq. 11).

    Args:
        x_winner, x_loser: (B, C, H, W).
        eps_theta, eps_ref: (B, C, H, W) predictions at the shared state.
        kappa_t, std: (B,).

    Returns:
        (B,).
    """
    delta_x = (x_winner - x_loser).detach().to(torch.float32)
    coef = _per_sample(kappa_t, delta_x) / _per_sample(std, delta_x) ** 2
    return _reduce(coef * delta_x * (eps_theta.to(torch.float32) - eps_ref.to(torch.float32)), reduction)


# --------------------------------------------------------------------------------------------------------------
# Single-shot DDIM jump and DDPM quantities (DDE)
# --------------------------------------------------------------------------------------------------------------


def ddim_jump(
    x_t: Tensor,
    eps_pred: Tensor,
    alpha_prod_t: Tensor,
    alpha_prod_s: Tensor,
    eta: float,
    noise: Tensor | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """DDIM from x_t to any earlier s in one call (§5.8):

    x_s = sqrt(ᾱ_s) x̂_0 + sqrt(1 − ᾱ_s − σ²_{t→s}) ε̂ + σ_{t→s} z,  σ_{t→s} = η sqrt((1−ᾱ_s)/(1−ᾱ_t)(1 − ᾱ_t/ᾱ_s)).

    Args:
        x_t, eps_pred: (B, C, H, W).
        alpha_prod_t, alpha_prod_s: (B,).
        eta: η ≥ 0 (0 = deterministic).

    Returns:
        (x_s (B, C, H, W), std (B,)).
    """
    std = ddim_std(alpha_prod_t, alpha_prod_s, eta)
    mean, _ = ddim_step_mean(x_t, eps_pred, alpha_prod_t, alpha_prod_s, std)
    if noise is None:
        noise = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=torch.float32)
    return mean + _per_sample(std, x_t) * noise.to(mean), std


def ddpm_kl_weights(betas: Tensor) -> Tensor:
    """Per-step ELBO weight λ_t = β_t / (2 α_t (1 − ᾱ_{t−1})) on the training grid (§5.2).

    With the DDPM posterior variance β̃_t, KL(q(x_{t−1}|x_t,x_0) || p_θ(x_{t−1}|x_t)) = λ_t ||ε − ε_θ||².
    λ_0 is set to 0: the step into x_0 is not a Gaussian-to-Gaussian KL (ᾱ_{−1} = 1 makes the formula divide by 0).

    Args:
        betas: (N,).

    Returns:
        (N,) float32.
    """
    betas = betas.to(torch.float32)
    alphas = 1 - betas
    alphas_cumprod = torch.cumprod(alphas, dim=0)
    alpha_prod_prev = torch.cat([torch.ones(1), alphas_cumprod[:-1]])
    lam = betas / (2 * alphas * (1 - alpha_prod_prev).clamp(min=torch.finfo(torch.float32).tiny))
    lam[0] = 0.0
    return lam


def ddpm_step_kl(eps_theta: Tensor, eps_ref: Tensor, kl_weight: Tensor, reduction: str = "mean") -> Tensor:
    """KL(p_θ(x_{t−1} | x_t) ‖ p_ref(x_{t−1} | x_t)) of the DDPM reverse step at t with the posterior variance
    β̃_t (§5.2): the means differ by β_t/(sqrt(α_t) sqrt(1 − ᾱ_t)) (ε_ref − ε_θ), so the KL is
    λ_t · reduce[(ε_θ − ε_ref)²] with λ_t = `ddpm_kl_weights(betas)[t]` = β_t / (2 α_t (1 − ᾱ_{t−1})).

    Args:
        eps_theta, eps_ref: (B, C, H, W) noise predictions at the same x_t.
        kl_weight: (B,) λ_t.
        reduction: "mean" (nats per latent element) or "sum" (the whole latent).

    Returns:
        (B,) KL ≥ 0.
    """
    diff = (eps_theta.to(torch.float32) - eps_ref.to(torch.float32)) ** 2
    return kl_weight.to(device=diff.device, dtype=torch.float32) * _reduce(diff, reduction)

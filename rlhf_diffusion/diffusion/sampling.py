"""Denoising trajectories for preference RL: plain, paired (shared x_T) and branched (n candidates from one x_τ).

The maths lives in `ddim.py`; this module owns the loop over the K-step grid, the noise predictor that wraps
the (LoRA) UNet with classifier-free guidance, and latent decoding. Everything here runs without gradients
unless a caller asks for them (TailorPO-G's reward gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf_diffusion.diffusion import ddim
from rlhf_diffusion.models.conditioning import (
    TextConditioning,
    encode_negative,
    predict_noise_cfg,
)
from rlhf_diffusion.models.loading import DiffusionModel, lora_disabled

__all__ = [
    "DDIMGrid",
    "NoisePredictor",
    "Trajectory",
    "decode_latents",
    "decode_preview",
    "draw_candidates",
    "encode_images",
    "initial_noise",
    "sample_trajectory",
]


@dataclass(frozen=True)
class DDIMGrid:
    """The K-step DDIM grid with every per-step scheduler scalar, index i = 0 … K−1 from noise to data.

    Attributes:
        timesteps: (K,) long τ_i, descending (951 … 1 for K = 20).
        prev_timesteps: (K,) long prev(τ_i) (may be negative at the last step → ᾱ_0 is used).
        alpha_prod: (K,) ᾱ_{τ_i}.
        alpha_prod_prev: (K,) ᾱ_{prev(τ_i)}.
        std_dev: (K,) σ_{τ_i}(η).
        eta: DDIM η.
        alphas_cumprod: (N,) the whole training-grid table (for DDE / Diffusion-DPO, which sample t on it).
        betas: (N,).
    """

    timesteps: Tensor
    prev_timesteps: Tensor
    alpha_prod: Tensor
    alpha_prod_prev: Tensor
    std_dev: Tensor
    eta: float
    alphas_cumprod: Tensor
    betas: Tensor

    @classmethod
    def from_scheduler(cls, scheduler, num_steps: int, eta: float) -> DDIMGrid:
        """Builds the grid from a diffusers `DDIMScheduler` (its config: N, offset, betas, ᾱ table)."""
        n_train = scheduler.config.num_train_timesteps
        if scheduler.config.timestep_spacing != "leading":
            raise ValueError(
                f"scheduler timestep_spacing must be 'leading' (SD / DDPO / D3PO), got "
                f"{scheduler.config.timestep_spacing!r}"
            )
        if scheduler.config.prediction_type != "epsilon":
            raise ValueError(f"only epsilon-prediction models are supported, got {scheduler.config.prediction_type!r}")
        timesteps = ddim.ddim_timesteps(n_train, num_steps, scheduler.config.steps_offset)
        prev = ddim.previous_timesteps(timesteps, n_train, num_steps)
        table = scheduler.alphas_cumprod.to(torch.float32)
        alpha_prod = ddim.gather_alpha(table, timesteps)
        alpha_prod_prev = ddim.gather_alpha_prev(table, prev, scheduler.final_alpha_cumprod)
        return cls(
            timesteps=timesteps,
            prev_timesteps=prev,
            alpha_prod=alpha_prod,
            alpha_prod_prev=alpha_prod_prev,
            std_dev=ddim.ddim_std(alpha_prod, alpha_prod_prev, eta),
            eta=eta,
            alphas_cumprod=table,
            betas=scheduler.betas.to(torch.float32),
        )

    @property
    def num_steps(self) -> int:
        return int(self.timesteps.shape[0])

    def scalars(self, step_index: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-sample (τ, ᾱ_τ, ᾱ_prev, σ_τ) for step indices (B,) → four (B,) tensors."""
        i = step_index.long().cpu()
        return self.timesteps[i], self.alpha_prod[i], self.alpha_prod_prev[i], self.std_dev[i]


class NoisePredictor:
    """The policy's CFG noise prediction ε̂_θ(x, τ, c) and its reference twin (LoRA disabled, or the frozen
    `reference_unet` of full fine-tuning; docs/algorithms.md §5.12).

    Args:
        model: loaded pipeline components (LoRA attached or not).
        guidance_scale: CFG weight w (1.0 = conditional only).
        height, width: image size in pixels (SDXL micro-conditioning); default the model's native size.
        negative_prompt: the CFG branch's prompt (`sampling.negative_prompt`), or None for the stock pipelines'
            default (`encode_negative`).
    """

    def __init__(
        self,
        model: DiffusionModel,
        guidance_scale: float,
        height: int | None = None,
        width: int | None = None,
        negative_prompt: str | None = None,
    ):
        self.model = model
        self.guidance_scale = guidance_scale
        self.height = height or model.resolution
        self.width = width or model.resolution
        self.negative_prompt = negative_prompt
        self._uncond_row = encode_negative(
            model, 1, height=self.height, width=self.width, negative_prompt=negative_prompt
        )
        # What the policy's (θ) forward calls: the UNet, or a wrapper of it such as DistributedDataParallel (set by
        # a data-parallel learner so that the backward pass all-reduces the gradients).
        self.forward_module: torch.nn.Module | None = None

    # The guided network call (`conditioning.predict_noise_cfg`; the flow `VelocityPredictor` overrides both) and the
    # dtype of the timesteps it takes (the 1000-step grid's integers).
    guided = staticmethod(predict_noise_cfg)
    timestep_dtype = torch.long

    @property
    def unet(self):
        return self.model.unet

    def __call__(self, x_t: Tensor, timesteps: Tensor, cond: TextConditioning, *, reference: bool = False) -> Tensor:
        """ε̂ at (x_t, τ) for each sample.

        Args:
            x_t: (B, C, h, w) latents.
            timesteps: (B,) long or a scalar.
            cond: B conditionings (one per sample).
            reference: evaluate the reference policy (LoRA disabled), without gradients.

        Returns:
            (B, C, h, w) float32.
        """
        batch = x_t.shape[0]
        t = torch.as_tensor(timesteps, device=x_t.device).to(self.timestep_dtype)
        if t.ndim == 0:
            t = t.expand(batch)
        uncond = self._uncond_row.repeat_interleave(batch) if self.guidance_scale != 1.0 else None
        dtype = self.model.unet.dtype
        x_in = x_t.to(dtype)
        cond = cond.to(device=x_t.device)
        if reference and self.model.reference_unet is not None:  # full fine-tuning: the frozen copy
            ref = self.model.reference_unet
            with torch.no_grad():
                out = self.guided(ref, x_t.to(ref.dtype), t, cond, uncond, self.guidance_scale)
        elif reference:
            with torch.no_grad(), lora_disabled(self.model.unet):
                out = self.guided(self.model.unet, x_in, t, cond, uncond, self.guidance_scale)
        else:
            out = self.guided(self.forward_module or self.model.unet, x_in, t, cond, uncond, self.guidance_scale)
        return out.to(torch.float32)


@dataclass
class Trajectory:
    """A batch of denoising trajectories on the K-step grid.

    Attributes:
        latents: (B, K+1, C, h, w): x_{τ_0} = x_T, x_{τ_1}, …, x_0.
        log_probs: (B, K) per-element-mean log π(x_{τ_{i+1}} | x_{τ_i}) under the sampling policy.
    """

    latents: Tensor
    log_probs: Tensor

    @property
    def final(self) -> Tensor:
        """(B, C, h, w) x_0."""
        return self.latents[:, -1]


def initial_noise(
    batch: int, model: DiffusionModel, generator: torch.Generator, height: int | None = None, width: int | None = None
) -> Tensor:
    """x_T ~ N(0, I) of shape (B, C, h, w), h = height / vae_scale_factor, drawn on CPU for reproducibility."""
    f = model.vae_scale_factor
    h, w = (height or model.resolution) // f, (width or model.resolution) // f
    return torch.randn((batch, model.latent_channels, h, w), generator=generator, dtype=torch.float32)


@torch.no_grad()
def sample_trajectory(
    predictor: NoisePredictor,
    cond: TextConditioning,
    x_T: Tensor,
    grid: DDIMGrid,
    generator: torch.Generator | Sequence[torch.Generator],
) -> Trajectory:
    """Samples a plain stochastic DDIM trajectory (η = grid.eta) and records every state and log-prob.

    Two calls with the same x_T give D3PO's paired trajectories (shared x_T, fresh noise at every step).

    A flow model's grid (`flow.FlowGrid`, with its `flow_sampling.VelocityPredictor`) samples its own loop,
    `flow_sampling.sample_flow_trajectory` (the SDE at the grid's noise level, the ODE at 0), so every caller (the
    final-pair rollouts, evaluation) samples either model family through this one entry point.

    Args:
        predictor: the policy's noise prediction.
        cond: B conditionings.
        x_T: (B, C, h, w) initial noise.
        grid: the K-step grid.
        generator: CPU RNG for the per-step noise, or one per row (row b's noise from generator b: a row's
            trajectory then does not depend on which other rows share its batch).
    """
    if not isinstance(grid, DDIMGrid):  # a FlowGrid: flow_sampling imports this module, hence the local import
        from rlhf_diffusion.diffusion.flow_sampling import sample_flow_trajectory

        return sample_flow_trajectory(predictor, cond, x_T, grid, generator)
    device = predictor.model.device
    x = x_T.to(device)
    states, log_probs = [x.cpu()], []
    for i in range(grid.num_steps):
        idx = torch.full((x.shape[0],), i, dtype=torch.long)
        t, a, a_prev, _ = grid.scalars(idx)
        eps = predictor(x, t, cond)
        if isinstance(generator, torch.Generator):
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).to(device)
        else:
            noise = torch.cat([torch.randn((1, *x.shape[1:]), generator=g, dtype=torch.float32) for g in generator]).to(
                device
            )
        if grid.eta > 0:
            x, logp, _, _ = ddim.ddim_step_with_logprob(x, eps, a.to(device), a_prev.to(device), grid.eta, noise=noise)
        else:  # deterministic DDIM (evaluation): no policy log-prob exists
            std = torch.zeros_like(a)
            x, _ = ddim.ddim_step_mean(x, eps, a.to(device), a_prev.to(device), std.to(device))
            logp = torch.zeros(x.shape[0])
        states.append(x.cpu())
        log_probs.append(logp.cpu())
    return Trajectory(latents=torch.stack(states, dim=1), log_probs=torch.stack(log_probs, dim=1))


@torch.no_grad()
def ddim_completion(
    predictor: NoisePredictor,
    grid: DDIMGrid,
    cond: TextConditioning,
    x: Tensor,
    step: int,
    eps_first: Tensor | None,
    jumps: int,
) -> Tensor:
    """A deterministic DDIM (η = 0) completion to x_0 of latents x produced by grid step `step` (they sit at the
    timestep prev(τ_step) = τ_{step+1}), in `jumps` jumps over evenly spaced remaining grid points.

    Args:
        x: (B, C, h, w) latents at τ_{step+1}.
        eps_first: ε̂ at (x, τ_{step+1}) if already computed (it is the first jump's), else None.
        jumps: UNet calls to spend (more than the K − step − 1 remaining steps = every one of them; 1 = one jump to
            the end of the grid, which is x̂_0 up to ᾱ at the final timestep).

    Returns:
        (B, C, h, w) x_0.
    """
    k = grid.num_steps
    points = list(range(step + 1, k))
    if not points:
        return x
    if jumps < len(points):
        picked = torch.linspace(0, len(points) - 1, max(1, jumps)).round().long().tolist()
        points = [points[i] for i in sorted(set(picked))]
    b = x.shape[0]
    device = x.device
    for n, i in enumerate(points):
        a_t = grid.alpha_prod[i].expand(b).to(device)
        a_s = (grid.alpha_prod[points[n + 1]] if n + 1 < len(points) else grid.alpha_prod_prev[k - 1]).expand(b)
        eps = eps_first if (n == 0 and eps_first is not None) else predictor(x, grid.timesteps[i].expand(b), cond)
        x, _ = ddim.ddim_step_mean(x, eps, a_t, a_s.to(device), torch.zeros(b, device=device))
    return x


def draw_candidates(mean: Tensor, std_dev: Tensor, num_candidates: int, generator: torch.Generator) -> Tensor:
    """n candidates x^(j) = μ_τ + σ_τ z^(j) from the same state (TailorPO / SPO branching).

    Args:
        mean: (B, C, h, w) DDIM mean at the shared state.
        std_dev: (B,) σ_τ.
        num_candidates: n ≥ 2.

    Returns:
        (B, n, C, h, w).
    """
    z = torch.randn(
        (mean.shape[0], num_candidates) + tuple(mean.shape[1:]), generator=generator, dtype=torch.float32
    ).to(mean.device)
    return mean.unsqueeze(1) + std_dev.to(mean.device).view(-1, 1, 1, 1, 1) * z


def decode_latents(model: DiffusionModel, latents: Tensor, clamp: bool = True) -> Tensor:
    """VAE decode: (B, C, h, w) latents → (B, 3, H, W) float32 images in [0, 1] (differentiable).

    Latents are divided by the VAE scaling factor (and shifted where the VAE defines a shift); the decoder's
    [−1, 1] output maps to [0, 1]. With `clamp=False` out-of-range values are kept, which keeps the reward
    gradient alive for guidance on predicted x̂_0 (docs/rewards.md §1, point 4).
    """
    return _decode(model.vae, latents, clamp)


def encode_images(model: DiffusionModel, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """VAE encode: (B, 3, H, W) images in [0, 1] → (B, C, h, w) latents as the UNet sees them (× scaling factor,
    minus the shift where the VAE defines one), drawn from the posterior with `generator` (its mean when None)."""
    vae = model.vae
    pixels = images.to(device=vae.device, dtype=vae.dtype) * 2 - 1
    posterior = vae.encode(pixels).latent_dist
    z = posterior.mode() if generator is None else posterior.sample(generator)
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        z = z - shift
    return (z * vae.config.scaling_factor).to(torch.float32)


def decode_preview(model: DiffusionModel, latents: Tensor) -> Tensor:
    """Cheap approximate decode of intermediate x̂_0 for per-step rewards: (B, C, h, w) → (B, 3, H, W) float32 in
    [0, 1], with `model.preview_vae` (a TAESD `AutoencoderTiny`, `sampling.preview_decoder`) when the model has
    one, else exactly `decode_latents`."""
    if model.preview_vae is None:
        return decode_latents(model, latents)
    return _decode(model.preview_vae, latents, clamp=True)


def _decode(vae, latents: Tensor, clamp: bool) -> Tensor:
    """`decode_latents` with a given decoder (`AutoencoderKL`, or `AutoencoderTiny`: scaling 1, shift 0)."""
    z = latents.to(device=vae.device, dtype=vae.dtype) / vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        z = z + shift
    images = (vae.decode(z).sample.to(torch.float32) + 1) / 2
    return images.clamp(0, 1) if clamp else images

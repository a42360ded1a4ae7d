"""Denoising trajectories of flow-matching models (SD3 / SD3.5, FLUX.1) for preference RL: the counterpart of
`sampling.py`.

The maths lives in `flow.py`; this module owns the loop over the K-step σ grid, the velocity predictor that wraps
the (LoRA) transformer with classifier-free guidance, and the grid built from a loaded model's scheduler. Latents,
initial noise (`sampling.initial_noise`), trajectories (`sampling.Trajectory`) and decoding
(`sampling.decode_latents`, which honours the SD3 VAE's shift) are shared with the DDIM models.

At noise level a > 0 each step is Flow-GRPO's SDE step, a Gaussian policy with a log-prob; at a = 0 the loop is the
probability-flow ODE integrated by Euler steps, which is what `StableDiffusion3Pipeline` samples, and then has no
log-prob (NaN, as `flow.sde_step_with_logprob` defines it).

FLUX's latents stay (B, 16, h, w) here as well: only its transformer call packs them into 2x2-patch tokens
(`conditioning.predict_velocity`). Every step is elementwise, so it is the same on either layout.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from rlhf_diffusion.diffusion import flow
from rlhf_diffusion.diffusion.flow import FlowGrid
from rlhf_diffusion.diffusion.sampling import NoisePredictor, Trajectory
from rlhf_diffusion.models.conditioning import TextConditioning, predict_cfg, predict_velocity
from rlhf_diffusion.models.loading import FLOW_KINDS, DiffusionModel

__all__ = [
    "VelocityPredictor",
    "flow_grid_for",
    "predict_velocity_cfg",
    "sample_flow_trajectory",
]


def predict_velocity_cfg(
    transformer,
    x_t: Tensor,
    t: Tensor,
    cond: TextConditioning,
    uncond: TextConditioning | None,
    guidance_scale: float,
) -> Tensor:
    """Classifier-free guided velocity v̂ = v_θ(x_σ, ∅) + w · (v_θ(x_σ, c) − v_θ(x_σ, ∅)), differentiable.

    Both branches run in one batched transformer call on [x_σ; x_σ] with [uncond; cond], the order of
    `StableDiffusion3Pipeline.__call__`. With w = 1 or no `uncond` only the conditional branch runs.

    Args:
        transformer: `SD3Transformer2DModel` (or a DistributedDataParallel wrapping one).
        x_t: (B, 16, h, w) noisy latents x_σ.
        t: (B,) or scalar timesteps σ·N (floats).
        cond: B conditional rows.
        uncond: B unconditional rows (`encode_negative`), or None.
        guidance_scale: w.

    Returns:
        (B, 16, h, w) guided velocity, in x_t's dtype.
    """
    return predict_cfg(predict_velocity, transformer, x_t, t, cond, uncond, guidance_scale)


class VelocityPredictor(NoisePredictor):
    """The policy's CFG velocity v̂_θ(x_σ, σ, c) of an SD3 / SD3.5 or FLUX model and its reference twin (LoRA disabled,
    or the frozen `reference_unet` of full fine-tuning): `sampling.NoisePredictor` with the transformer's guided
    velocity call and float timesteps σ·N (`FlowGrid.timesteps`); its call returns (B, 16, h, w) float32.

    Args:
        model: loaded SD3 or FLUX components (`kind` in `FLOW_KINDS`; the transformer sits in `model.unet`), LoRA
            attached or not.
        guidance_scale: CFG weight w (1.0 = conditional only). On FLUX this is `FluxPipeline`'s `true_cfg_scale`
            with `negative_prompt` (FLUX.1-dev samples without it, w = 1); its guidance-distillation value is
            `model.flux_guidance`, part of the conditioning.
        height, width: image size in pixels the rollouts sample at (`initial_noise`); default the model's native
            size. SD3 has no size conditioning, so the prediction itself does not depend on them.
        negative_prompt: the CFG branch's prompt, or None for "" (`conditioning.encode_negative`).

    Raises:
        ValueError: the model is not a flow-matching (SD3, FLUX) model.
    """

    guided = staticmethod(predict_velocity_cfg)
    timestep_dtype = torch.float32

    def __init__(self, model: DiffusionModel, *args: Any, **kwargs: Any):
        """`NoisePredictor`'s arguments (above), after checking that the model is a flow-matching one."""
        if model.kind not in FLOW_KINDS:
            raise ValueError(f"VelocityPredictor needs a flow-matching (SD3, FLUX) model, got kind {model.kind!r}")
        super().__init__(model, *args, **kwargs)


def flow_grid_for(
    model: DiffusionModel,
    num_steps: int,
    noise_level: float,
    height: int | None = None,
    width: int | None = None,
    kind: str = "flow_grpo",
) -> FlowGrid:
    """The K-step flow grid of a loaded SD3 model's scheduler, as `StableDiffusion3Pipeline` sets it, or of a FLUX
    model's, as `FluxPipeline` sets it: un-shifted sigmas linspace(1, 1/K, K) (`flow.flux_base_sigmas`) shifted by
    e^μ, μ = `flow.flux_mu` of the packed token count (h/2)(w/2) with the scheduler config's line (FLUX.1: 0.5 at 256
    tokens, 1.15 at 4096).

    A static shift (SD3 / SD3.5: 3.0) is the scheduler's own. With `use_dynamic_shifting` the pipeline's μ is
    computed from the image's token count L = (h / p)(w / p) (latent side h = height / vae_scale_factor, patch p):
    μ = b + m L, the line through (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift).

    Args:
        model: loaded SD3 components.
        num_steps: K.
        noise_level: a ≥ 0 (0 = the ODE the stock pipeline samples).
        height, width: image size in pixels (only the dynamic shift depends on it); default the model's native size.
        kind: the SDE step's noise schedule (`flow.SDE_KINDS`: Flow-GRPO's or Flow-CPS's).

    Returns:
        The grid (`FlowGrid.from_scheduler`; the model's scheduler is not touched).
    """
    config = model.scheduler.config
    flux = model.kind == "flux"
    mu = None
    if flux or config.get("use_dynamic_shifting", False):
        f = model.vae_scale_factor
        patch = 2 if flux else model.unet.config.patch_size  # FLUX packs 2x2 latent patches into one token
        h, w = (height or model.resolution) // f, (width or model.resolution) // f
        mu = flow.flux_mu(
            (h // patch) * (w // patch),
            config.get("base_image_seq_len", 256),
            config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5),
            config.get("max_shift", 1.15 if flux else 1.16),
        )
    sigmas = flow.flux_base_sigmas(num_steps) if flux else None
    return FlowGrid.from_scheduler(model.scheduler, num_steps, noise_level, mu=mu, sigmas=sigmas, kind=kind)


def _step_noise(generator: torch.Generator | Sequence[torch.Generator] | None, shape: torch.Size) -> Tensor:
    """(B, C, h, w) N(0, I) on CPU from one generator, or row b from generator b."""
    if generator is None:
        raise ValueError("an SDE trajectory (noise_level > 0) needs a generator")
    if isinstance(generator, torch.Generator):
        return torch.randn(shape, generator=generator, dtype=torch.float32)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    return torch.cat([torch.randn((1, *shape[1:]), generator=g, dtype=torch.float32) for g in generator])


@torch.no_grad()
def sample_flow_trajectory(
    predictor: VelocityPredictor,
    cond: TextConditioning,
    x_T: Tensor,
    grid: FlowGrid,
    generator: torch.Generator | Sequence[torch.Generator] | None,
) -> Trajectory:
    """Samples a flow trajectory σ_0 = 1 → σ_K = 0 and records every state and log-prob.

    At grid.noise_level a > 0 every step is Flow-GRPO's SDE step x_{σ'} = μ + s z (or Flow-CPS's: `grid.kind`;
    `flow.sde_step_with_logprob`, z drawn on CPU from `generator`), and log_probs holds its per-element-mean
    log-prob (NaN at CPS's last step, whose s is 0). At a = 0 every step is the
    ODE's Euler step x_{σ'} = x_σ + (σ' − σ) v̂ (`flow.euler_step`, the stock pipeline's sampler): no noise is drawn
    and log_probs is all NaN (a deterministic step has no density; never train on it).

    Args:
        predictor: the policy's velocity prediction.
        cond: B conditionings.
        x_T: (B, 16, h, w) initial noise (`sampling.initial_noise`).
        grid: the K-step grid (`flow_grid_for`); the transformer is called at grid.timesteps (σ·N floats).
        generator: CPU RNG for the per-step noise, or one per row (row b's noise from generator b: a row's
            trajectory then does not depend on which other rows share its batch). Unused (may be None) at
            noise level 0.

    Returns:
        latents (B, K+1, 16, h, w): x_T, …, x_0 (on CPU); log_probs (B, K).
    """
    device = predictor.model.device
    x = x_T.to(device=device, dtype=torch.float32)
    batch = x.shape[0]
    states, log_probs = [x.cpu()], []
    for i in range(grid.num_steps):
        t, sigma, sigma_next = grid.timesteps[i], grid.sigmas[i], grid.sigmas[i + 1]
        v = predictor(x, t.expand(batch), cond)
        if grid.noise_level > 0:
            noise = _step_noise(generator, x.shape).to(device)
            x, logp, _, _ = flow.sde_step_with_logprob(
                x, v, sigma.to(device), sigma_next.to(device), grid.noise_level, noise=noise, kind=grid.kind
            )
        else:  # the ODE (evaluation, the stock pipeline): no policy log-prob exists
            x = flow.euler_step(x, v, sigma.to(device), sigma_next.to(device))
            logp = torch.full((batch,), math.nan)
        states.append(x.cpu())
        log_probs.append(logp.cpu())
    return Trajectory(latents=torch.stack(states, dim=1), log_probs=torch.stack(log_probs, dim=1))

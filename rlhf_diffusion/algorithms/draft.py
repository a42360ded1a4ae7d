"""DRaFT (Clark et al., ICLR 2024, "Directly Fine-Tuning Diffusion Models on Differentiable Rewards"): the reward's
gradient back-propagated through the last K steps of the sampling chain (docs/algorithms.md, "DRaFT").

Not a preference method: no pairs, no reference model, no β. It needs a differentiable reward (the testbed reward,
the aesthetic predictor, CLIP, PickScore, HPSv2, ImageReward; `RolloutContext.reward_grad_fn`).

Samples: one stochastic DDIM chain per prompt (η = `sampling.eta`, CFG as sampled), its final image decoded and
    scored; the reward server also returns g = ∂r/∂image at that image (r the weighted total reward).
Example: `ChainBatch`: the chain's latents x_T … x_0 and g.
Loss:    the learner replays the last K steps with the current weights, each step as
             x_{i+1} = x^s_{i+1} + μ_θ(x_i) − sg(μ_θ(x_i))        (x^s the sampled state, sg: stop-gradient)
         whose value is the sampled state (the noise the sampler drew is kept, as DRaFT keeps it) and whose
         derivative is the chain's: ∂x_{i+1}/∂x_i = ∂μ_θ/∂x_i and ∂x_{i+1}/∂θ = ∂μ_θ/∂θ. Then
             L = −mean_i ⟨g_i, D(x_0)⟩
         with D the VAE decoder (unclamped, so every pixel passes the gradient; g was taken at the clamped image the
         reward scored). ∇_θ L = −∂r/∂θ through the last K steps at the sampled chain: DRaFT-K's gradient [P]. On
         policy (`train.max_staleness: 0`) the sampled chain is the current weights' own; one version stale, it is
         the previous weights' chain (a first-order approximation, as every pipelined method here makes).
K:       `grad_steps` = 1 is DRaFT-1, the paper's efficient variant [P]; K ≥ `sampling.num_steps` back-propagates
         through the whole chain (AlignProp's full back-propagation [P], without its random truncation).
Ours:    replaying the stored chain in the learner instead of sampling with the graph (so the sampler actors stay
         gradient-free and the reward server only ships g): same gradient on policy.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_diffusion.algorithms.base import Algorithm, LossOutput, RolloutContext, register_algorithm
from rlhf_diffusion.batches import ChainBatch, RolloutBatch
from rlhf_diffusion.diffusion import ddim
from rlhf_diffusion.diffusion.sampling import (
    DDIMGrid,
    NoisePredictor,
    decode_latents,
    initial_noise,
    sample_trajectory,
)
from rlhf_diffusion.models.conditioning import TextConditioning

__all__ = ["DRaFT", "replay_chain"]


def replay_chain(predictor: NoisePredictor, grid: DDIMGrid, cond: TextConditioning, latents: Tensor, k: int) -> Tensor:
    """x_0 of the sampled chains `latents` (M, K+1, C, h, w) with the last `k` steps replayed under the current
    weights: the value is the sampled x_0, the gradient flows through each replayed step's mean μ_θ (into θ and
    into the state before it); the states before the last k steps are constants."""
    steps = grid.num_steps
    if latents.shape[1] != steps + 1:
        raise ValueError(f"a chain of {latents.shape[1] - 1} steps does not fit the {steps}-step grid")
    device = predictor.model.device
    latents = latents.to(device)
    first = max(steps - k, 0)
    x = latents[:, first]
    m = latents.shape[0]
    for i in range(first, steps):
        t, a, a_prev, std = grid.scalars(torch.full((m,), i, dtype=torch.long))
        eps = predictor(x, t, cond)
        mean, _ = ddim.ddim_step_mean(x, eps, a.to(device), a_prev.to(device), std.to(device))
        x = latents[:, i + 1] + (mean - mean.detach())
    return x


@register_algorithm("draft")
class DRaFT(Algorithm):
    """DRaFT-K on sampled chains (`ChainBatch`), the CFG-guided ε̂ as sampled (`cfg_in_training`)."""

    name = "draft"
    cfg_in_training = True  # the loss replays the sampler's guided chain
    needs_reward_gradient = True

    @torch.no_grad()
    def rollout(self, ctx: RolloutContext, prompts: list[str], cond: TextConditioning) -> RolloutBatch:
        reward_grad_fn = ctx.require_reward_grad(self.name)
        p = len(prompts)
        x_T = initial_noise(p, ctx.model, ctx.generator, ctx.predictor.height, ctx.predictor.width)
        trajectory = sample_trajectory(ctx.predictor, cond, x_T, ctx.grid, ctx.generator)
        images = decode_latents(ctx.model, trajectory.final).cpu()
        result, image_grad = reward_grad_fn(images, list(prompts))
        image_grad = image_grad.detach().to("cpu", torch.float32)
        chains = ChainBatch(prompt_index=torch.arange(p), latents=trajectory.latents.cpu(), image_grad=image_grad)
        return RolloutBatch(
            prompts=list(prompts),
            pairs=chains,
            rewards=result.total.detach().cpu().view(p, 1),
            final_images=images,
            metrics={"image_grad_norm": image_grad.flatten(1).norm(dim=1).mean().item()},
            per_reward={name: value.detach().cpu().view(p, 1) for name, value in result.per_reward.items()},
        )

    def loss(
        self, predictor: NoisePredictor, cond: TextConditioning, examples: ChainBatch, generator: torch.Generator
    ) -> LossOutput:
        x0 = replay_chain(predictor, self.grid, cond, examples.latents, self.config.grad_steps)
        images = decode_latents(predictor.model, x0, clamp=False)
        gain = (examples.image_grad.to(images) * images).flatten(1).sum(dim=1)  # ⟨g, D(x_0)⟩ per chain
        return LossOutput(
            loss=-gain.mean(), metrics={"replayed_steps": float(min(self.config.grad_steps, self.grid.num_steps))}
        )

    def signal_groups(self, examples: ChainBatch, generator: torch.Generator) -> tuple[Tensor, dict[int, str]]:
        """One group: every chain trains the same replayed steps."""
        return torch.zeros(len(examples), dtype=torch.long), {0: "chain"}

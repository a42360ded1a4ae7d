"""DDPO (Black et al., ICLR 2024, arXiv 2305.13301; code kvablack/ddpo-pytorch): PPO-clip on the per-step
log-probabilities of the stochastic DDIM policy (docs/algorithms.md §8; § numbers in this file refer to that page).

Samples: `samples_per_prompt` independent stochastic DDIM trajectories per prompt (fresh x_T each), recording every
         state, action and the per-element-mean log-prob ℓ_old of each action under the sampling policy (§8a) [C].
Example: one DDIM step of one trajectory, `batches.TrajectoryStepBatch`: (prompt, sample, step i, x_τ, x_prev,
         ℓ_old, A); a random floor(`timestep_fraction` · K) of the steps per trajectory [C].
Advantage: per-prompt reward statistics (`PerPromptStatTracker`, a FIFO buffer of each prompt's last rewards kept
         across iterations), the iteration's statistics while a prompt's buffer is short [C]. Computed by the
         learner (`prepare_examples`), the one place whose state persists across iterations and is checkpointed.
Loss:    L = mean_examples max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε)), ρ = exp(ℓ_θ − ℓ_old), A clipped to ±adv_clip_max,
         ℓ_θ recomputed with the CFG prediction exactly as the sampler computed ℓ_old (§8b) [C]. No reference term.
Ours:    the step subset is drawn once at rollout (ddpo-pytorch redraws it every inner epoch);
         `skip_final_steps` (off by default); `samples_per_prompt` > 1 (1 = ddpo-pytorch).

The trajectory sampler, the example type and the PPO loss here are shared with GRPO (`algorithms/grpo.py`), which
changes only the advantage (group-normalised at rollout) and adds an optional KL to the reference. Both train flow
models (SD3 / SD3.5) with the same code: the step policy is then Flow-GRPO's SDE step instead of the DDIM step
(`diffusion/step_kernel.py`; docs/algorithms.md §10(c)).
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from rlhf_diffusion.algorithms.base import Algorithm, LossOutput, RolloutContext, register_algorithm
from rlhf_diffusion.algorithms.common import step_kl_diagnostics, trainable_step_count
from rlhf_diffusion.batches import RolloutBatch, TrajectoryStepBatch
from rlhf_diffusion.diffusion import ddim
from rlhf_diffusion.diffusion.flow import FlowGrid
from rlhf_diffusion.diffusion.sampling import (
    DDIMGrid,
    NoisePredictor,
    decode_latents,
    initial_noise,
    sample_trajectory,
)
from rlhf_diffusion.diffusion.step_kernel import step_kernel_for
from rlhf_diffusion.models.conditioning import TextConditioning

__all__ = [
    "DDPO",
    "PerPromptStatTracker",
    "PolicyGradientAlgorithm",
    "SampledTrajectories",
    "batch_advantages",
    "clipped_surrogate",
    "policy_gradient_loss",
    "sample_trajectory_steps",
    "select_trajectory_steps",
    "step_log_probs",
]


# ----------------------------------------------------------------------------------------------------------------
# Pure pieces
# ----------------------------------------------------------------------------------------------------------------


def clipped_surrogate(log_ratio: Tensor, advantage: Tensor, clip_range: float) -> Tensor:
    """PPO's clipped surrogate as a loss, per example: max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε)), ρ = exp(log_ratio)
    (Schulman et al. 2017, Eq. 7, negated; ddpo-pytorch train.py [C]).

    Args:
        log_ratio: (M,) ℓ_θ − ℓ_old (differentiable).
        advantage: (M,) A (already clipped).
        clip_range: ε.

    Returns:
        (M,) loss terms; their gradient is 0 where the clip is active on the side A pushes toward.
    """
    ratio = torch.exp(log_ratio)
    advantage = advantage.to(ratio)
    unclipped = -advantage * ratio
    clipped = -advantage * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped)


def batch_advantages(rewards: Tensor, eps: float = 1e-8) -> Tensor:
    """(r − mean)/(std + eps) over all the rewards given, population std (ddpo-pytorch without the tracker [C])."""
    rewards = rewards.double()
    return ((rewards - rewards.mean()) / (rewards.std(unbiased=False) + eps)).float()


class PerPromptStatTracker:
    """ddpo-pytorch's per-prompt reward statistics [C ddpo_pytorch/stat_tracking.py], in our code.

    Each prompt has a FIFO buffer of its last `buffer_size` rewards that persists across iterations. `update(prompts,
    rewards)` appends the new rewards (in the given order) to their prompts' buffers, then normalises each reward
    with its prompt's buffer — A = (r − mean)/(std + 1e-6), population std — or, while that buffer holds fewer than
    `min_count` values, with the mean and std of all the rewards of this call.
    """

    EPS = 1e-6  # ddpo-pytorch stat_tracking.py [C]

    def __init__(self, buffer_size: int, min_count: int):
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, deque[float]] = {}

    def update(self, prompts: Sequence[str], rewards: Tensor) -> tuple[Tensor, float]:
        """Advantages (N,) float32 of `rewards` (N,) for `prompts` (N), and the fraction that used the batch
        statistics (their prompt's buffer was still shorter than `min_count`)."""
        if len(prompts) != len(rewards):
            raise ValueError(f"{len(prompts)} prompts for {len(rewards)} rewards")
        values = rewards.double()
        batch_mean, batch_std = values.mean(), values.std(unbiased=False)
        out = torch.empty_like(values)
        fallback = 0
        for prompt in dict.fromkeys(prompts):  # each prompt once, in order of first appearance
            rows = torch.tensor([i for i, p in enumerate(prompts) if p == prompt])
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(values[rows].tolist())
            if len(buffer) < self.min_count:
                mean, std = batch_mean, batch_std
                fallback += len(rows)
            else:
                held = torch.tensor(list(buffer), dtype=torch.float64)
                mean, std = held.mean(), held.std(unbiased=False)
            out[rows] = (values[rows] - mean) / (std + self.EPS)
        return out.float(), fallback / max(len(prompts), 1)

    def state_dict(self) -> dict[str, Tensor]:
        """Tensors only (checkpointed as safetensors): `stat_tracker/prompt_<n>` the prompt's UTF-8 bytes (uint8),
        `stat_tracker/rewards_<n>` its buffer (float64, oldest first)."""
        state: dict[str, Tensor] = {}
        for n, (prompt, buffer) in enumerate(self.buffers.items()):
            state[f"stat_tracker/prompt_{n}"] = torch.tensor(list(prompt.encode("utf-8")), dtype=torch.uint8)
            state[f"stat_tracker/rewards_{n}"] = torch.tensor(list(buffer), dtype=torch.float64)
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        unknown = [k for k in state if not k.startswith("stat_tracker/")]
        if unknown:
            raise ValueError(f"unexpected keys in the DDPO stat tracker state: {sorted(unknown)}")
        count = sum(k.startswith("stat_tracker/prompt_") for k in state)
        buffers: dict[str, deque[float]] = {}
        for n in range(count):
            try:
                prompt = bytes(state[f"stat_tracker/prompt_{n}"].tolist()).decode("utf-8")
                rewards = state[f"stat_tracker/rewards_{n}"]
            except KeyError as e:
                raise ValueError(f"DDPO stat tracker state lacks {e.args[0]!r}") from None
            buffers[prompt] = deque(rewards.double().tolist(), maxlen=self.buffer_size)
        self.buffers = buffers


def select_trajectory_steps(
    num_trajectories: int, num_steps: int, fraction: float, generator: torch.Generator
) -> Tensor:
    """floor(fraction · num_steps) (at least 1) distinct step indices per trajectory, a random subset of
    0 … num_steps − 1 (ddpo-pytorch permutes the steps per sample and keeps that many [C]), sorted.

    Returns:
        (num_trajectories, k) long.
    """
    k = max(1, math.floor(fraction * num_steps))
    scores = torch.rand((num_trajectories, num_steps), generator=generator)
    return scores.argsort(dim=1)[:, :k].sort(dim=1).values


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class SampledTrajectories:
    """G trajectories per prompt as training examples, with their rewards.

    Attributes:
        steps: the selected steps of every trajectory (advantage 0: the method fills it).
        rewards: (P, G) weighted total reward of sample g of prompt p.
        per_reward: reward name → (P, G) raw scores.
        images: (P, 3, H, W) decoded final image of each prompt's first sample (for grids).
    """

    steps: TrajectoryStepBatch
    rewards: Tensor
    per_reward: dict[str, Tensor]
    images: Tensor


@torch.no_grad()
def sample_trajectory_steps(
    ctx: RolloutContext,
    prompts: list[str],
    cond: TextConditioning,
    samples: int,
    timestep_fraction: float,
    skip_final_steps: int,
) -> SampledTrajectories:
    """Samples `samples` trajectories per prompt (independent x_T, one G·P batch, row g·P + p = sample g of prompt
    p) with the policy's sampler, which records each action's log-prob (`sample_trajectory`), scores the final
    images with `ctx.reward_fn`, and keeps a random `timestep_fraction` of the first K − `skip_final_steps` steps of
    each trajectory (`select_trajectory_steps`, drawn from `ctx.generator` after the sampling)."""
    p, g = len(prompts), samples
    h, w = ctx.predictor.height, ctx.predictor.width
    x_T = initial_noise(g * p, ctx.model, ctx.generator, h, w)
    traj = sample_trajectory(ctx.predictor, TextConditioning.cat([cond] * g), x_T, ctx.grid, ctx.generator)
    images = decode_latents(ctx.model, traj.final).cpu()
    result = ctx.reward_fn(images, list(prompts) * g)
    rewards = result.total.view(g, p).T  # (P, G)
    per_reward = {k: v.view(g, p).T for k, v in result.per_reward.items()}
    trainable = trainable_step_count(ctx.grid.num_steps, skip_final_steps)
    chosen = select_trajectory_steps(g * p, trainable, timestep_fraction, ctx.generator)  # (G·P, k)
    k = chosen.shape[1]
    rows = torch.arange(g * p).repeat_interleave(k)  # trajectory of each example
    step_index = chosen.reshape(-1)
    steps = TrajectoryStepBatch(
        prompt_index=rows % p,
        sample_index=torch.div(rows, p, rounding_mode="floor"),
        step_index=step_index,
        state=traj.latents[rows, step_index],
        action=traj.latents[rows, step_index + 1],
        log_prob=traj.log_probs[rows, step_index].float(),
        advantage=torch.zeros(len(rows)),
    )
    return SampledTrajectories(steps=steps, rewards=rewards, per_reward=per_reward, images=images[:p])


# ----------------------------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------------------------


def step_log_probs(
    predictor: NoisePredictor,
    grid: DDIMGrid | FlowGrid,
    cond: TextConditioning,
    step_index: Tensor,
    state: Tensor,
    action: Tensor,
    *,
    reference: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """ℓ = per-element-mean log π(action | state) of the sampler's step policy, by the same calls the sampler made:
    the predictor (CFG as configured) at (x_τ, τ), then the grid's step kernel with the stored action
    (`step_kernel.step_kernel_for`: the stochastic DDIM step, `ddim.ddim_step_with_logprob`, or on a flow model
    Flow-GRPO's SDE step, `flow.sde_step_with_logprob`).

    Returns:
        (ℓ (M,) differentiable w.r.t. the LoRA unless `reference`, the step mean μ (M, C, h, w), its std (M,)).
    """
    kernel = step_kernel_for(grid)
    state = state.to(predictor.model.device)
    pred = predictor(state, kernel.timesteps(step_index), cond, reference=reference)
    return kernel.log_prob(state, pred, step_index, action)


def policy_gradient_loss(
    predictor: NoisePredictor,
    grid: DDIMGrid | FlowGrid,
    cond: TextConditioning,
    examples: TrajectoryStepBatch,
    *,
    clip_range: float,
    adv_clip_max: float,
    kl_beta: float = 0.0,
) -> LossOutput:
    """mean(PPO-clip surrogate) + β · mean KL(π_θ ‖ π_ref) over the examples (DDPO: β = 0; GRPO: `kl_beta`).

    Metrics (ddpo-pytorch's [C]): `approx_kl` = ½ mean((ℓ_θ − ℓ_old)²), `clipfrac` = fraction with |ρ − 1| > ε; and
    ours: `log_ratio_abs_max` (0 on the first step of an on-policy round: the learner recomputes exactly what the
    sampler recorded), `advantage_abs_mean` (after clipping); with β > 0 also `kl` (the mean KL term).
    Grouped by step: `signal/clip_step_<k>` (clipped fraction); with β > 0 `kl/step_<k>` and `kl/log_ratio_step_<k>`.
    """
    log_prob, mean_theta, std = step_log_probs(
        predictor, grid, cond, examples.step_index, examples.state, examples.action
    )
    log_ratio = log_prob - examples.log_prob.to(log_prob)
    advantage = examples.advantage.to(log_prob).clamp(-adv_clip_max, adv_clip_max)
    loss = clipped_surrogate(log_ratio, advantage, clip_range).mean()
    steps = examples.step_index
    with torch.no_grad():
        clipped = ((torch.exp(log_ratio) - 1).abs() > clip_range).float()
        metrics = {
            "approx_kl": 0.5 * log_ratio.pow(2).mean().item(),
            "clipfrac": clipped.mean().item(),
            "log_ratio_abs_max": log_ratio.abs().max().item(),
            "advantage_abs_mean": advantage.abs().mean().item(),
        }
    grouped = {"signal/clip_step": (steps.detach().cpu(), clipped.cpu())}
    if kl_beta > 0:
        device = log_prob.device
        kernel = step_kernel_for(grid)
        state = examples.state.to(device)
        pred_ref = predictor(state, kernel.timesteps(steps), cond, reference=True)
        mean_ref = kernel.mean(state, pred_ref, steps)
        kl = ddim.kl_same_std(mean_theta, mean_ref, std)  # differentiable through μ_θ; = flow.kl_same_std
        loss = loss + kl_beta * kl.mean()
        metrics["kl"] = kl.mean().item()
        log_ratio_ref = ddim.log_ratio_same_std(examples.action.to(device), mean_theta.detach(), mean_ref, std)
        grouped.update(step_kl_diagnostics(steps, kl, steps, log_ratio_ref))
    return LossOutput(loss=loss, metrics=metrics, grouped=grouped)


class PolicyGradientAlgorithm(Algorithm):
    """What DDPO and GRPO share beyond the pieces above: the loss, `policy_gradient_loss` with the config's PPO-clip
    ε (`clip_range`) and advantage clip (`adv_clip_max`) and the method's KL weight `kl_beta()` (0: no reference
    term). A subclass supplies the rollout (and with it the advantages).

    Both train ε-models (the stochastic DDIM step) and flow models (Flow-GRPO's SDE step at
    `sampling.flow_noise_level` > 0): the rollout and the loss are the same code, only the step kernel differs
    (`step_kernel.step_kernel_for`; docs/algorithms.md §10(c))."""

    flow_models = True
    needs_step_density = True

    def kl_beta(self) -> float:
        """β of the per-step KL to the reference policy; 0 (none) unless the method has one."""
        return 0.0

    def loss(
        self,
        predictor: NoisePredictor,
        cond: TextConditioning,
        examples: TrajectoryStepBatch,
        generator: torch.Generator,
    ) -> LossOutput:
        return policy_gradient_loss(
            predictor,
            self.grid,
            cond,
            examples,
            clip_range=self.config.clip_range,
            adv_clip_max=self.config.adv_clip_max,
            kl_beta=self.kl_beta(),
        )


# ----------------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------------


@register_algorithm("ddpo")
class DDPO(PolicyGradientAlgorithm):
    """DDPO with ddpo-pytorch's choices: PPO-clip ε = 1e-4, advantages clipped at 5, per-prompt tracker 16 / 16."""

    name = "ddpo"
    cfg_in_training = True  # ddpo-pytorch train.cfg = True: ℓ_θ with the same CFG as sampling [C]

    def __init__(self, config, grid: DDIMGrid):
        super().__init__(config, grid)
        self.tracker = PerPromptStatTracker(config.stat_buffer_size, config.stat_min_count)

    def rollout(self, ctx: RolloutContext, prompts: list[str], cond: TextConditioning) -> RolloutBatch:
        sampled = sample_trajectory_steps(
            ctx,
            prompts,
            cond,
            self.config.samples_per_prompt,
            self.config.timestep_fraction,
            self.config.skip_final_steps,
        )
        return RolloutBatch(
            prompts=list(prompts),
            pairs=sampled.steps,
            rewards=sampled.rewards,
            final_images=sampled.images,
            per_reward=sampled.per_reward,
        )

    def prepare_examples(self, batch: RolloutBatch) -> TrajectoryStepBatch:
        """Fills every example's advantage from its trajectory's reward: the per-prompt tracker (updated with this
        iteration's rewards, prompt by prompt, samples in order) or, with `per_prompt_stat_tracking` off, the
        iteration's z-score."""
        p, g = batch.rewards.shape
        flat = batch.rewards.reshape(-1)  # prompt-major: (p, g) → p·G + g
        if self.config.per_prompt_stat_tracking:
            prompts = [prompt for prompt in batch.prompts for _ in range(g)]
            advantages, _ = self.tracker.update(prompts, flat)
        else:
            advantages = batch_advantages(flat)
        examples = batch.pairs
        rows = examples.prompt_index * g + examples.sample_index
        return dataclasses.replace(examples, advantage=advantages[rows])

    # loss: PolicyGradientAlgorithm's, the PPO-clip surrogate alone (no reference term)

    def state_dict(self) -> dict[str, Tensor]:
        return self.tracker.state_dict()

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        self.tracker.load_state_dict(state)

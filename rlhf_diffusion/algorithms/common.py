"""Primitives shared by several methods (docs/algorithms.md §5): the clamped DPO step loss (D3PO / TailorPO / SPO),
step log-ratios and KLs under the DDIM policy and their diagnostics, preference labels (weighted sum or Pareto), and
the ranked-pair sampler (D3PO's trajectory pairs, the final-image pairs of Diffusion-DPO and DDE). What is one
method's own is in its file (Diffusion-DPO's ε-MSE Δ_t, rollout and (t, ε) draws: `diffusion_dpo.py`).
Section numbers (§) in this file refer to docs/algorithms.md."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_diffusion.algorithms.base import RolloutContext
from rlhf_diffusion.batches import FinalPairBatch, RolloutBatch, StepPairBatch
from rlhf_diffusion.diffusion import ddim
from rlhf_diffusion.diffusion.flow import FlowGrid
from rlhf_diffusion.diffusion.sampling import (
    DDIMGrid,
    NoisePredictor,
    Trajectory,
    decode_latents,
    initial_noise,
    sample_trajectory,
)
from rlhf_diffusion.diffusion.step_kernel import step_kernel_for
from rlhf_diffusion.models.conditioning import TextConditioning

__all__ = [
    "RankedPairs",
    "dpo_step_loss",
    "preference_labels",
    "sample_ranked_pairs",
    "step_clamp_diagnostics",
    "step_kl_diagnostics",
    "step_log_ratios",
    "step_log_ratios_and_kl",
    "step_weights",
    "trainable_step_count",
]


def step_weights(grid: DDIMGrid | FlowGrid, mode: str) -> Tensor:
    """The factor each step's log-ratio is multiplied by before the clamp (`algorithm.step_weight`): (K,).

    'uniform' = 1 (the papers). 'eps_scale' (ours) = σ_τ/|κ_τ|: Δ changes by |κ_τ|/σ_τ per unit of ε̂ along the
    sampled noise (μ_θ − μ_ref = κ_τ (ε̂_θ − ε̂_ref), Δ ∝ (x − μ)·(μ_θ − μ_ref)/σ²), so the weighted Δ measures
    every step in units of ε̂ (on a flow model s_i/|κ_i|, in units of v̂: `step_kernel`'s κ and std).
    """
    if mode == "uniform":
        return torch.ones(grid.num_steps)
    if mode == "eps_scale":
        kappa = step_kernel_for(grid).kappa()
        return grid.std_dev.to(torch.float32) / kappa.abs().clamp(min=1e-12)
    raise ValueError(f"unknown step_weight {mode!r}; expected 'uniform' or 'eps_scale'")


def trainable_step_count(num_steps: int, skip_final_steps: int) -> int:
    """The steps whose pairs are trained: the first K − `skip_final_steps` (`algorithm.skip_final_steps`)."""
    return max(1, num_steps - skip_final_steps)


def dpo_step_loss(
    delta_w: Tensor, delta_l: Tensor, beta: float, clip_epsilon: float, weight: Tensor | None = None
) -> tuple[Tensor, dict[str, float]]:
    """Clamped DPO loss on one denoising step (D3PO §1b; TailorPO Eq. 10 with D3PO's ratio constraint, §5.6).

    log ρ = clamp(w Δ, log(1 − ε), log(1 + ε));  L = −log σ(β (log ρ_w − log ρ_l)), averaged over the batch.

    Args:
        delta_w, delta_l: (M,) log π_θ/π_ref of the winner's and the loser's action.
        beta: DPO temperature β.
        clip_epsilon: ε of the ratio clamp [1 − ε, 1 + ε].
        weight: (M,) per-example step weight w (`step_weights`), or None = 1 (the papers).

    Returns:
        (scalar loss, metrics): implicit accuracy (Δ_w > Δ_l), fraction of clamped ratios, mean |Δ|.
    """
    lo, hi = math.log(1 - clip_epsilon), math.log(1 + clip_epsilon)
    if weight is not None:
        weight = weight.to(delta_w)
        delta_w, delta_l = weight * delta_w, weight * delta_l
    log_ratio_w = delta_w.clamp(lo, hi)
    log_ratio_l = delta_l.clamp(lo, hi)
    logits = beta * (log_ratio_w - log_ratio_l)
    loss = -F.logsigmoid(logits).mean()
    with torch.no_grad():
        both = torch.cat([delta_w, delta_l])
        metrics = {
            "implicit_accuracy": (delta_w > delta_l).float().mean().item(),
            "clamp_fraction": ((both <= lo) | (both >= hi)).float().mean().item(),
            "mean_abs_log_ratio": both.abs().mean().item(),
        }
    return loss, metrics


def step_log_ratios(
    predictor: NoisePredictor,
    grid: DDIMGrid | FlowGrid,
    cond: TextConditioning,
    step_index: Tensor,
    states: Tensor,
    *actions: Tensor,
) -> tuple[Tensor, ...]:
    """Δ = log π_θ(action | state) − log π_ref(action | state) under the sampler's step policy (the DDIM step, or on
    a flow model Flow-GRPO's SDE step: `step_kernel.step_kernel_for`), per example.

    Both policies share the step's std, so Δ is the closed form of §5.5 / §10 (per-element mean, as the official
    codes). One evaluation of θ and of ref at `states` serves every action given (TailorPO's winner and loser share
    x_τ).

    Args:
        predictor: CFG noise prediction (θ with gradient; reference without).
        grid: the DDIM or flow grid of the rollout.
        cond: M conditionings.
        step_index: (M,) grid indices.
        states: (M, C, h, w) x_τ.
        *actions: one or more (M, C, h, w) x_prev taken from `states`.

    Returns:
        One (M,) Δ per action, differentiable w.r.t. the LoRA parameters.
    """
    return step_log_ratios_and_kl(predictor, grid, cond, step_index, states, *actions)[1]


def step_log_ratios_and_kl(
    predictor: NoisePredictor,
    grid: DDIMGrid | FlowGrid,
    cond: TextConditioning,
    step_index: Tensor,
    states: Tensor,
    *actions: Tensor,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """`step_log_ratios` plus the exact per-step KL(π_θ(·|x_τ) ‖ π_ref(·|x_τ)) at each state, from the same two
    UNet evaluations (`ddim.kl_same_std`, per-element mean: the unit of Δ).

    Returns:
        (kl (M,) detached, one (M,) Δ per action differentiable w.r.t. the LoRA parameters).
    """
    device = predictor.model.device
    kernel = step_kernel_for(grid)  # the DDIM step, or a flow model's SDE step: the same closed forms (§10)
    t, std = kernel.timesteps(step_index), kernel.std(step_index).to(device)
    states = states.to(device)
    pred_theta = predictor(states, t, cond)
    pred_ref = predictor(states, t, cond, reference=True)
    mean_theta = kernel.mean(states, pred_theta, step_index)
    mean_ref = kernel.mean(states, pred_ref, step_index)
    kl = ddim.kl_same_std(mean_theta.detach(), mean_ref.detach(), std)
    return kl, tuple(ddim.log_ratio_same_std(x.to(device), mean_theta, mean_ref, std) for x in actions)


def step_kl_diagnostics(
    state_steps: Tensor, kl: Tensor, action_steps: Tensor, log_ratios: Tensor
) -> dict[str, tuple[Tensor, Tensor]]:
    """The step-wise methods' `LossOutput.grouped` KL diagnostics, grouped by DDIM step index k:

    - `kl/step_<k>`: the closed-form KL(π_θ ‖ π_ref) of step k at the trained states (per latent element);
    - `kl/log_ratio_step_<k>`: the mean log π_θ/π_ref of the stored actions — a Monte-Carlo estimate of the same
      KL only when the actions are samples of the current policy (on-policy D3PO, TailorPO with two candidates);
      selection (more candidates) and TailorPO-G's guidance bias it.

    Args:
        state_steps, kl: (S,) step index and KL of each state.
        action_steps, log_ratios: (A,) step index and Δ of each action.
    """
    return {
        "kl/step": (state_steps.detach().cpu(), kl.detach().float().cpu()),
        "kl/log_ratio_step": (action_steps.detach().cpu(), log_ratios.detach().float().cpu()),
    }


def step_clamp_diagnostics(
    steps: Tensor, delta_w: Tensor, delta_l: Tensor, clip_epsilon: float
) -> dict[str, tuple[Tensor, Tensor]]:
    """`signal/clamp_step_<k>`: the fraction of the step-k log-ratios (winner's and loser's) outside the clamp
    [log(1 − ε), log(1 + ε)], which therefore give no gradient (`LossOutput.grouped`).

    Args:
        steps: (M,) step index of each pair; delta_w, delta_l: (M,) Δ of the winner's and the loser's action.
    """
    lo, hi = math.log(1 - clip_epsilon), math.log(1 + clip_epsilon)
    both = torch.cat([delta_w, delta_l]).detach()
    return {"signal/clamp_step": (steps.repeat(2).detach().cpu(), ((both <= lo) | (both >= hi)).float().cpu())}


def preference_labels(per_reward: dict[str, Tensor], weights: dict[str, float], rule: str) -> Tensor:
    """Which of two samples wins, from their rewards (D3PO §1a step 4).

    Args:
        per_reward: name → (P, 2) raw scores of sample 0 and sample 1 of each pair.
        weights: name → weight (its sign says whether higher is better).
        rule: "weighted_sum" (compare Σ w_i r_i) or "pareto" (sample 0 wins iff it is at least as good on every
            reward and strictly better on one; non-dominated pairs are ties).

    Returns:
        (P,) long: 0 if sample 0 wins, 1 if sample 1 wins, −1 for a tie.
    """
    if rule == "weighted_sum":
        total = sum(weights[name] * scores for name, scores in per_reward.items())
        diff = total[:, 0] - total[:, 1]
        return torch.where(diff > 0, 0, torch.where(diff < 0, 1, -1))
    if rule == "pareto":
        signed = torch.stack([math.copysign(1.0, weights[n]) * s for n, s in per_reward.items()])  # (R, P, 2)
        d = signed[..., 0] - signed[..., 1]  # (R, P)
        zero_wins = (d >= 0).all(0) & (d > 0).any(0)
        one_wins = (d <= 0).all(0) & (d < 0).any(0)
        return torch.where(zero_wins, 0, torch.where(one_wins, 1, -1))
    raise ValueError(f"unknown preference rule {rule!r}; expected 'weighted_sum' or 'pareto'")


@dataclass
class RankedPairs:
    """S sampled trajectories per prompt, and which two of them make its pair.

    Attributes:
        trajectory: S·P trajectories, sample-major: rows [s·P, (s + 1)·P) are sample s of each prompt.
        winner, loser: (P,) long, the sample index of each prompt's winner and loser.
        keep: (P,) bool, False for a tie (no preference: the pair is dropped).
        rewards: (P, S) weighted total reward of each sample.
        images: (P, 3, H, W) decoded final images of sample 0 (for grids).
        per_reward: reward name → (P, S) raw scores of each sample.
    """

    trajectory: Trajectory
    winner: Tensor
    loser: Tensor
    keep: Tensor
    rewards: Tensor
    images: Tensor
    per_reward: dict[str, Tensor] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """`tie_fraction` (pairs dropped) and `reward_gap` (mean |r_winner − r_loser| over all prompts)."""
        rows = torch.arange(len(self.winner))
        gap = self.rewards[rows, self.winner] - self.rewards[rows, self.loser]
        return {"tie_fraction": (~self.keep).float().mean().item(), "reward_gap": gap.abs().mean().item()}

    def rollout_batch(self, prompts: list[str], pairs: StepPairBatch | FinalPairBatch) -> RolloutBatch:
        """The rollout's answer: `pairs` (the examples made from these samples) with the rewards, the grid images
        and the ranking's metrics."""
        return RolloutBatch(
            prompts=list(prompts),
            pairs=pairs,
            rewards=self.rewards,
            final_images=self.images,
            metrics=self.metrics(),
            per_reward=self.per_reward,
        )


@torch.no_grad()
def sample_ranked_pairs(
    ctx: RolloutContext,
    prompts: list[str],
    cond: TextConditioning,
    *,
    shared_initial_noise: bool,
    rule: str = "weighted_sum",
    samples: int = 2,
) -> RankedPairs:
    """Samples S trajectories per prompt in one S·P batch, decodes and scores the finals, and picks each prompt's pair.

    S = 2: the two samples, labelled by `preference_labels` with `rule` (a tie: neither wins). S > 2 (the final-pair
    methods' `samples_per_prompt`): the best against the worst by the weighted total reward (a tie: equal totals).

    Args:
        shared_initial_noise: every sample starts from the same x_T (D3PO §1a.3) or from independent noise.
        rule: "weighted_sum" or "pareto" (see `preference_labels`); S > 2 ranks by the weighted sum only.
        samples: S.
    """
    p = len(prompts)
    h, w = ctx.predictor.height, ctx.predictor.width
    if shared_initial_noise:
        x_T = initial_noise(p, ctx.model, ctx.generator, h, w).repeat(samples, 1, 1, 1)
    else:
        x_T = initial_noise(samples * p, ctx.model, ctx.generator, h, w)
    traj = sample_trajectory(ctx.predictor, TextConditioning.cat([cond] * samples), x_T, ctx.grid, ctx.generator)
    images = decode_latents(ctx.model, traj.final).cpu()
    result = ctx.reward_fn(images, list(prompts) * samples)
    per_reward = {k: v.view(samples, p).T for k, v in result.per_reward.items()}  # (P, S)
    rewards = result.total.view(samples, p).T  # (P, S)
    if samples == 2:
        labels = preference_labels(per_reward, ctx.reward_weights, rule)  # 0 / 1 = the winner, −1 = tie
        winner = labels.clamp(min=0)
        loser, keep = 1 - winner, labels >= 0
    elif rule == "weighted_sum":
        winner, loser = rewards.argmax(1), rewards.argmin(1)
        rows = torch.arange(p)
        keep = rewards[rows, winner] - rewards[rows, loser] > 0
    else:
        raise ValueError(f"ranking {samples} samples per prompt needs rule 'weighted_sum', got {rule!r}")
    return RankedPairs(
        trajectory=traj,
        winner=winner,
        loser=loser,
        keep=keep,
        rewards=rewards,
        images=images[:p],
        per_reward=per_reward,
    )

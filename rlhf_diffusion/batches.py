"""Every dataclass the driver, the samplers and the learner hand each other: one home for the data that crosses an
actor boundary (docs/architecture.md, "What crosses each boundary"). All tensors in them are on the CPU.

  driver → sampler    `RolloutRequest` (with a `PublishedWeights`), and for an evaluation pass the weights alone
  sampler → driver    `RolloutBatch`, whose `pairs` are a `StepPairBatch`, a `FinalPairBatch`, a
                      `TrajectoryStepBatch` or a `ChainBatch` (`TensorBatch`s);
                      `EvalShard`
  driver → learner    the joined `RolloutBatch`
  learner → driver    `TrainResult`; `PublishedWeights` for the samplers

Pure data: this module imports nothing from the rest of the package, so the algorithms, the workers, the offline
data reader and the tests all build and read batches without importing one another. (The reward server's request
and answer are the reward contract's own, images in and `rewards.base.RewardResult` out.)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ChainBatch",
    "EvalShard",
    "FinalPairBatch",
    "PublishedWeights",
    "RolloutBatch",
    "RolloutRequest",
    "StepPairBatch",
    "TensorBatch",
    "TrainResult",
    "TrajectoryStepBatch",
]


class TensorBatch:
    """Mixin for dataclasses whose tensor fields share the leading example dimension M."""

    def __len__(self) -> int:
        return int(getattr(self, dataclasses.fields(self)[0].name).shape[0])

    def select(self, index: Tensor):
        """The examples at `index` (M',) → a batch of the same type."""
        return type(self)(**{f.name: getattr(self, f.name)[index] for f in dataclasses.fields(self)})

    @classmethod
    def concat(cls, batches: Sequence[TensorBatch]):
        """Concatenates batches along the example dimension (prompt indices must already be global)."""
        return cls(**{f.name: torch.cat([getattr(b, f.name) for b in batches]) for f in dataclasses.fields(cls)})

    def validate(self) -> None:
        """Asserts every field has the same leading length and every tensor is on CPU."""
        n = len(self)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value.shape[0] != n:
                raise ValueError(f"{type(self).__name__}.{f.name} has {value.shape[0]} rows, expected {n}")
            if value.device.type != "cpu":
                raise ValueError(f"{type(self).__name__}.{f.name} must be on CPU to cross an actor boundary")


@dataclass
class StepPairBatch(TensorBatch):
    """Step-level preference pairs (D3PO, TailorPO): one denoising step of a winner and of a loser.

    For TailorPO both actions come from the same state (state_w == state_l); for D3PO the states are the
    two trajectories' states at the same step index.

    Attributes:
        prompt_index: (M,) long, index into `RolloutBatch.prompts`.
        step_index: (M,) long, index i into the DDIM grid (τ_i → prev(τ_i)).
        state_w, action_w: (M, C, h, w) x_τ and x_prev of the winner.
        state_l, action_l: (M, C, h, w) x_τ and x_prev of the loser.
    """

    prompt_index: Tensor
    step_index: Tensor
    state_w: Tensor
    action_w: Tensor
    state_l: Tensor
    action_l: Tensor


@dataclass
class FinalPairBatch(TensorBatch):
    """Preference pairs of final images (DDE, Diffusion-DPO), as latents x_0 (already × VAE scaling factor).

    Attributes:
        prompt_index: (M,) long, index into `RolloutBatch.prompts`.
        x0_w, x0_l: (M, C, h, w) winner and loser latents.
    """

    prompt_index: Tensor
    x0_w: Tensor
    x0_l: Tensor


@dataclass
class TrajectoryStepBatch(TensorBatch):
    """One DDIM step of one sampled trajectory with the log-prob the sampler recorded (the policy-gradient methods
    DDPO and GRPO).

    Attributes:
        prompt_index: (M,) long, index into `RolloutBatch.prompts`.
        sample_index: (M,) long, which of the prompt's samples: the column of `RolloutBatch.rewards`.
        step_index: (M,) long, grid index i (τ_i → prev(τ_i)).
        state, action: (M, C, h, w) x_τ and the sampled x_prev.
        log_prob: (M,) float32 ℓ_old, the per-element-mean log π_old(action | state) at sampling time.
        advantage: (M,) float32 A of the trajectory (all its steps share it); DDPO fills it in the learner
            (`Algorithm.prepare_examples`), GRPO at rollout.
    """

    prompt_index: Tensor
    sample_index: Tensor
    step_index: Tensor
    state: Tensor
    action: Tensor
    log_prob: Tensor
    advantage: Tensor


@dataclass
class ChainBatch(TensorBatch):
    """Sampled denoising chains with the reward's gradient at their final images (DRaFT): the learner replays the
    chain's last steps with the current weights and moves the image along the gradient.

    Attributes:
        prompt_index: (M,) long, index into `RolloutBatch.prompts`.
        latents: (M, K+1, C, h, w) the chain as sampled: x_T, x_{τ_1}, …, x_0.
        image_grad: (M, 3, H, W) float32 ∂r/∂image of the weighted total reward at the chain's decoded final image.
    """

    prompt_index: Tensor
    latents: Tensor
    image_grad: Tensor


@dataclass
class RolloutBatch:
    """What a sampler returns for one slice of prompts. All tensors on CPU.

    Attributes:
        prompts: the P prompts of this slice.
        pairs: the training examples.
        final_images: (P, 3, H, W) in [0, 1], one final image per prompt (for grids), or None.
        rewards: (P, n) final-image rewards of every sampled trajectory (n = 2 for pairs, G for DDPO / GRPO).
        metrics: scalar rollout statistics (tie fraction, reward gap per step, ...).
        weights_version: version of the LoRA weights the rollout was sampled with.
        per_reward: reward name → (P, n) raw (unweighted) final-image scores, for logging each reward.
    """

    prompts: list[str]
    pairs: StepPairBatch | FinalPairBatch | TrajectoryStepBatch | ChainBatch
    rewards: Tensor
    final_images: Tensor | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    weights_version: int = 0
    per_reward: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def concat(cls, batches: Sequence[RolloutBatch]) -> RolloutBatch:
        """Joins the shards of one iteration in order: prompts are appended and each shard's `prompt_index` is
        offset by the prompts before it. Metrics are averaged weighted by prompt count, except `*_seconds` (busy
        time) and `*_count` (counters), which are summed. All shards must carry the same `weights_version`."""
        if not batches:
            raise ValueError("RolloutBatch.concat needs at least one batch")
        versions = {b.weights_version for b in batches}
        if len(versions) != 1:
            raise ValueError(f"shards of one iteration were sampled with different weights versions {sorted(versions)}")
        offset, pairs = 0, []
        for b in batches:
            shifted = dataclasses.replace(b.pairs, prompt_index=b.pairs.prompt_index + offset)
            pairs.append(shifted)
            offset += len(b.prompts)
        images = [b.final_images for b in batches]
        counts = [len(b.prompts) for b in batches]
        metrics: dict[str, float] = {}
        for key in {k for b in batches for k in b.metrics}:
            values = [(b.metrics[key], n) for b, n in zip(batches, counts) if key in b.metrics]
            if key.endswith("_seconds") or key.endswith("_count"):
                metrics[key] = sum(v for v, _ in values)
            else:
                metrics[key] = sum(v * n for v, n in values) / sum(n for _, n in values)
        names = [set(b.per_reward) for b in batches if b.rewards.numel()]  # offline pairs carry no rewards
        return cls(
            prompts=[p for b in batches for p in b.prompts],
            pairs=type(pairs[0]).concat(pairs),
            rewards=torch.cat([b.rewards for b in batches]),
            final_images=torch.cat(images) if all(i is not None for i in images) else None,
            metrics=metrics,
            weights_version=versions.pop(),
            per_reward={
                name: torch.cat([b.per_reward[name] for b in batches if b.rewards.numel()])
                for name in set.intersection(*names)
            }
            if names
            else {},
        )


@dataclass
class PublishedWeights:
    """One version of the LoRA weights, as the learner publishes it.

    Under Ray `ref` holds `[ObjectRef]` of the state dict in the object store (wrapped in a list so that Ray
    passes the reference instead of resolving it on every call); in one process `state` holds the dict itself.

    Attributes:
        version: number of optimizer rounds (iterations) trained into these weights; 0 = the initial LoRA.
        state: peft-format LoRA state dict (CPU float32), or None when `ref` is set.
        ref: `[ObjectRef]` of that dict in the Ray object store, or None.
        average: the exponential moving average of the weights up to `version` (`train.ema_decay`), which the
            held-out evaluations use, not the weights of `version` themselves, which the rollouts use.
    """

    version: int
    state: dict[str, torch.Tensor] | None = None
    ref: list[Any] | None = None
    average: bool = False

    def resolve(self) -> dict[str, torch.Tensor]:
        if self.state is not None:
            return self.state
        import ray

        return ray.get(self.ref[0])


@dataclass
class RolloutRequest:
    """One sampler's share of one iteration.

    Attributes:
        iteration: the iteration whose data this is (0-based).
        shard: which slice of the iteration's prompts (0 .. num_samplers - 1).
        prompts: the slice's prompts.
        seed: seeds every random draw of this rollout.
        weights: the LoRA version to sample with (the sampler loads it if it holds another one).
    """

    iteration: int
    shard: int
    prompts: list[str]
    seed: int
    weights: PublishedWeights


@dataclass
class TrainResult:
    """What the learner returns for one iteration.

    Attributes:
        version: the weights version after this training round.
        metrics: mean loss / implicit accuracy / grad norm / ... over the optimizer steps, plus `staleness`
            (learner version before the round − the rollout's weights version) and `train_seconds`.
        dropped: True when the batch was staler than `train.max_staleness` and was not trained on.
        diagnostics: metrics logged under their own names (not under train/): the per-step KL of the policy to the
            reference, `kl/...` (`guards.log_kl`), each the mean over the round's training examples, taken at the
            weights before each optimizer step.
    """

    version: int
    metrics: dict[str, float] = field(default_factory=dict)
    dropped: bool = False
    diagnostics: dict[str, float] = field(default_factory=dict)


@dataclass
class EvalShard:
    """Held-out samples of some eval prompts. All CPU.

    Attributes:
        prompt_indices: the global indices j of the prompts, in order.
        images: (len(prompt_indices) * S, 3, H, W) in [0, 1], prompt-major.
        totals: (len * S,) weighted reward totals.
        per_reward: reward name → (len * S,) raw scores.
        heldout: held-out reward key → (len * S,) raw scores (`guards.heldout_rewards`; empty without them).
    """

    prompt_indices: list[int]
    images: Tensor
    totals: Tensor
    per_reward: dict[str, Tensor]
    heldout: dict[str, Tensor] = field(default_factory=dict)

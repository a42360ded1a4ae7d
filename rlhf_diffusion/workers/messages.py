"""What crosses an actor boundary: CPU tensors in dataclasses with named fields (docs/architecture.md,
"What crosses each boundary").

Every random draw of a run is derived from `(config.seed, iteration, shard)` with `derive_seed`, so a rollout or a
training step redone after a crash or a resume draws exactly the same numbers as the first attempt.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["PublishedWeights", "RolloutRequest", "TrainResult", "derive_seed", "prompts_for_iteration"]

# Streams of derived seeds; one per purpose so they never collide.
ROLLOUT_STREAM = 1
TRAIN_STREAM = 2
PROMPT_STREAM = 3
SIGNAL_STREAM = 4


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that depends on `seed` and every key (NumPy SeedSequence hashing: well mixed, no overlap
    between nearby keys)."""
    words = np.random.SeedSequence([int(seed), *(int(k) for k in keys)]).generate_state(2, dtype=np.uint32)
    return int((int(words[0]) << 31) ^ int(words[1]))


def prompts_for_iteration(prompts: list[str], seed: int, iteration: int, count: int) -> list[str]:
    """The `count` prompts of `iteration`: position `iteration * count + j` of an endless stream of epochs, each
    epoch a permutation of `prompts` seeded by (seed, epoch). A pure function, so nothing needs checkpointing."""
    n = len(prompts)
    out = []
    for position in range(iteration * count, (iteration + 1) * count):
        epoch, offset = divmod(position, n)
        order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, PROMPT_STREAM, epoch)))
        out.append(prompts[int(order[offset])])
    return out


@dataclass
class PublishedWeights:
    """One version of the LoRA weights, as the learner publishes it.

    Under Ray `ref` holds `[ObjectRef]` of the state dict in the object store (wrapped in a list so that Ray
    passes the reference instead of resolving it on every call); in one process `state` holds the dict itself.

    Attributes:
        version: number of optimizer rounds (iterations) trained into these weights; 0 = the initial LoRA.
        state: peft-format LoRA state dict (CPU float32), or None when `ref` is set.
        ref: `[ObjectRef]` of that dict in the Ray object store, or None.
    """

    version: int
    state: dict[str, torch.Tensor] | None = None
    ref: list[Any] | None = None

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

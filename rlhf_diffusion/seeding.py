"""The run's seeds and its prompt schedule, pure functions of (seed, iteration, shard) (docs/architecture.md,
"Determinism").

Every random draw of a run is derived from `(config.seed, iteration, shard)` with `derive_seed`, so a rollout or a
training step redone after a crash or a resume draws exactly the same numbers as the first attempt.
"""

from __future__ import annotations

import numpy as np
import torch

from rlhf_diffusion.batches import PublishedWeights, RolloutRequest

__all__ = [
    "PROMPT_STREAM",
    "ROLLOUT_STREAM",
    "SIGNAL_STREAM",
    "TRAIN_STREAM",
    "derive_seed",
    "prompts_for_iteration",
    "rollout_requests",
]

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


def rollout_requests(
    prompts: list[str], seed: int, iteration: int, batch_size: int, num_shards: int, weights: PublishedWeights
) -> list[RolloutRequest]:
    """The rollout requests of `iteration`, one per sampler (shard k: its `batch_size` prompts of the iteration's
    schedule and the seed of (seed, iteration, k)), all sampling with `weights`."""
    schedule = prompts_for_iteration(prompts, seed, iteration, batch_size * num_shards)
    return [
        RolloutRequest(
            iteration=iteration,
            shard=k,
            prompts=schedule[k * batch_size : (k + 1) * batch_size],
            seed=derive_seed(seed, ROLLOUT_STREAM, iteration, k),
            weights=weights,
        )
        for k in range(num_shards)
    ]

"""Offline preference pairs as training examples: a sampler's deterministic per-iteration slice of its shard of
the source (`OfflinePairStream`) and its VAE encoding into a `FinalPairBatch` (`encode_pairs`).

Determinism: iteration i (0-based, as `RolloutRequest.iteration`) takes pairs i·n … (i+1)·n−1 of the reader's
stream, where the stream is the
shard's pairs in the order fixed by (seed, pass) (see `preference.PreferenceSource`). A redone shard, a restarted
sampler or a resumed run therefore trains on exactly the same pairs; a reader asked for an iteration other than
the next one reopens its source and skips to it (reading, not training on, the pairs before it).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator

import torch

from rlhf_diffusion.batches import FinalPairBatch, RolloutBatch
from rlhf_diffusion.data.preference import DataStats, PreferencePair, PreferenceSource, pairs_to_tensors
from rlhf_diffusion.diffusion.sampling import encode_images
from rlhf_diffusion.models.loading import DiffusionModel

__all__ = ["OfflinePairStream", "encode_pairs"]


class OfflinePairStream:
    """One sampler's offline pairs, `pairs_per_iteration` per iteration.

    Args:
        data: the run's `DataConfig`.
        seed: the run seed (fixes the shuffle order of every pass).
        shard_index, num_shards: this reader's part of the source (sampler rank, number of samplers).
    """

    def __init__(self, data, seed: int, shard_index: int, num_shards: int):
        self.data, self.seed = data, seed
        self.shard_index, self.num_shards = shard_index, num_shards
        self.source = self._open()  # a source that cannot be read at all fails here, at sampler start
        self._iterator: Iterator[PreferencePair] | None = None
        self._position = 0
        self._reported = DataStats()

    def _open(self) -> PreferenceSource:
        return PreferenceSource(
            self.data.format,
            self.data.path,
            epochs=None,
            shuffle_buffer=self.data.shuffle_buffer,
            seed=self.seed,
            batch_size=self.data.read_batch_size,
            shard_index=self.shard_index,
            num_shards=self.num_shards,
        )

    def take(self, iteration: int) -> tuple[list[PreferencePair], dict[str, float]]:
        """The pairs of `iteration` (0-based) and this iteration's data counters (pairs, ties dropped, corrupt rows
        read while producing them; `*_count` metrics, summed over samplers)."""
        if iteration < 0:
            raise ValueError(f"iterations start at 0, got {iteration}")
        n = self.data.pairs_per_iteration
        start = iteration * n
        if self._iterator is None or start != self._position:
            if self._iterator is not None:  # the open source has been read from: start it over
                self.source = self._open()
                self._reported = DataStats()
            self._iterator = iter(self.source)
            for _ in itertools.islice(self._iterator, start):
                pass
            self._position = start
        pairs = list(itertools.islice(self._iterator, n))
        self._position += len(pairs)
        stats, before = self.source.stats, self._reported
        metrics = {
            "offline_pairs_count": float(len(pairs)),
            "offline_ties_dropped_count": float(stats.ties_dropped - before.ties_dropped),
            "offline_corrupt_rows_count": float(stats.corrupt_total - before.corrupt_total),
        }
        self._reported = dataclasses.replace(stats, corrupt=stats.corrupt.copy())
        return pairs, metrics


@torch.no_grad()
def encode_pairs(
    model: DiffusionModel,
    pairs: list[PreferencePair],
    resolution: int,
    generator: torch.Generator,
    weights_version: int,
) -> RolloutBatch:
    """VAE-encodes offline pairs (resize + centre crop to `resolution`, as Diffusion-DPO) into a `RolloutBatch`
    of `FinalPairBatch` examples, one prompt per pair. Latents are drawn from the VAE posterior with `generator`
    (`latent_dist.sample()`, as Diffusion-DPO's train.py [C]) and scaled by the VAE scaling factor. The batch has
    no sampled rewards (`rewards` is empty): the pairs are labelled by the data set."""
    prompts, images_w, images_l = pairs_to_tensors(pairs, resolution)
    latents = encode_images(model, torch.cat([images_w, images_l]), generator)
    m = len(pairs)
    examples = FinalPairBatch(prompt_index=torch.arange(m), x0_w=latents[:m].cpu(), x0_l=latents[m:].cpu())
    return RolloutBatch(
        prompts=list(prompts), pairs=examples, rewards=torch.zeros(0, 2), weights_version=weights_version
    )

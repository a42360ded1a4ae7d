"""`LocalTrainer`: the whole loop in this process (`Trainer(config, use_ray=False)`), plus handles on the model
and ad-hoc rollout / train calls for tests and benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from rlhf_diffusion.algorithms import RolloutContext
from rlhf_diffusion.batches import RolloutBatch
from rlhf_diffusion.config import RunConfig
from rlhf_diffusion.models.conditioning import TextConditioning
from rlhf_diffusion.trainer import Trainer
from rlhf_diffusion.workers.sampler import Sampler

__all__ = ["LocalTrainer"]


class LocalTrainer(Trainer):
    """The whole loop in this process (no Ray): one policy shared by sampler and learner when on-policy.

    Besides `fit`, it exposes the pieces for tests: `model`, `encode`, `rollout(prompts)`, `rollout_context()`,
    `train_on(batch)`, `sample_predictor`, `train_predictor`, `grid`, `algorithm`, `reward`, `train_generator`.
    """

    def __init__(self, config: RunConfig, **kwargs):
        kwargs.setdefault("log", print)
        super().__init__(config, use_ray=False, **kwargs)
        self.sampler: Sampler = self.sampler_objs[0]
        self.model = self.learner_obj.model
        self.grid = self.learner_obj.grid
        self.algorithm = self.learner_obj.algorithm
        self.sample_predictor = self.sampler.predictor
        self.train_predictor = self.learner_obj.predictor
        self.rollout_generator = torch.Generator().manual_seed(config.seed)
        self.train_generator = torch.Generator().manual_seed(config.seed + 1)

    def encode(self, prompts: Sequence[str]) -> TextConditioning:
        return self.sampler.encode(prompts)

    def rollout_context(self) -> RolloutContext:
        return self.sampler.rollout_context(self.rollout_generator)

    def rollout(self, prompts: list[str]) -> RolloutBatch:
        """One rollout of `prompts` with the current weights (ad-hoc, outside the iteration schedule)."""
        self.sampler.weights_version = self.learner_obj.version  # shares the learner's UNet
        self.model.unet.eval()
        batch = self.algorithm.rollout(self.rollout_context(), list(prompts), self.encode(prompts))
        batch.pairs.validate()
        batch.weights_version = self.learner_obj.version
        return batch

    def train_on(self, batch: RolloutBatch) -> dict[str, float]:
        """One learner round on `batch` (ad-hoc, outside the iteration schedule); returns its metrics."""
        return self.learner_obj.train(batch, self.learner_obj.version).metrics

"""SamplerWorker: holds the pipeline and a copy of the current LoRA, runs the algorithm's rollout.

A sampler owns no randomness of its own: every rollout seeds its generator from the request
(`RolloutRequest.seed`, derived from the run seed, the iteration and the shard), and loads the weights version the
request names. So a rollout redone on a restarted actor returns the same batch as the first attempt.

Rewards come from a `RewardClient`: the reward servers under Ray (`RemoteReward`), or a `WeightedReward` in this
process. TailorPO calls it at every denoising step with all of the sampler's candidates in one batch; TailorPO-G
gets d reward / d image from it and chains it through this sampler's VAE decoder (`algorithms/tailorpo.py`).
Evaluation passes (`evaluate`, the loop in `rlhf_diffusion.evaluation`) also score their images with the held-out
rewards (`guards.heldout_rewards`), which the client reaches only through `score_heldout`: rollouts never see them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
from torch import Tensor

from rlhf_diffusion.algorithms import RolloutContext, build_algorithm
from rlhf_diffusion.batches import EvalShard, PublishedWeights, RolloutBatch, RolloutRequest
from rlhf_diffusion.config import RunConfig
from rlhf_diffusion.data.offline import OfflinePairStream, encode_pairs
from rlhf_diffusion.evaluation import evaluate_shard
from rlhf_diffusion.models.conditioning import TextConditioning, encode_prompts
from rlhf_diffusion.models.loading import DiffusionModel, get_trainable_state, set_trainable_state
from rlhf_diffusion.rewards.base import RewardResult, WeightedReward
from rlhf_diffusion.workers.policy import load_policy, policy_grid, policy_predictor, resolve_device
from rlhf_diffusion.workers.reward_server import build_heldout_reward

__all__ = ["RemoteReward", "Sampler"]

T = TypeVar("T")


class _CountedRewardCalls:
    """What both reward clients count of the rollouts' reward calls (`score`, `score_and_grad`; not
    `score_heldout`): the images handed over (`images_scored`, the reward budget) and the seconds spent waiting
    (`wait_seconds`, reported as `reward_seconds`)."""

    wait_seconds: float
    images_scored: int

    def _counted(self, images: Tensor, call: Callable[[], T]) -> T:
        start = time.perf_counter()
        self.images_scored += images.shape[0]
        try:
            return call()
        finally:
            self.wait_seconds += time.perf_counter() - start


class RemoteReward(_CountedRewardCalls):
    """The reward-server side of a sampler: `score` / `score_and_grad` as blocking calls to one RewardServer
    actor (sampler `rank` talks to server `rank % M`, spreading samplers over servers). Counts the seconds spent
    waiting, which the sampler reports as `reward_seconds`."""

    def __init__(self, servers: Sequence, rank: int, differentiable: bool, heldout_names: Sequence[str] = ()):
        if not servers:
            raise ValueError("RemoteReward needs at least one reward server")
        self.server = servers[rank % len(servers)]
        self.differentiable = differentiable
        self.heldout_names = list(heldout_names)
        self.wait_seconds = 0.0
        self.images_scored = 0  # images handed to score / score_and_grad (the rollouts' reward budget)

    def score(self, images: Tensor, prompts: Sequence[str]) -> RewardResult:
        import ray

        return self._counted(images, lambda: ray.get(self.server.score.remote(images.detach().cpu(), list(prompts))))

    def score_and_grad(self, images: Tensor, prompts: Sequence[str]) -> tuple[RewardResult, Tensor]:
        import ray

        return self._counted(
            images, lambda: ray.get(self.server.score_and_grad.remote(images.detach().cpu(), list(prompts)))
        )

    def score_heldout(self, images: Tensor, prompts: Sequence[str]) -> RewardResult:
        """The held-out rewards' raw scores (`per_reward`), for evaluation passes only."""
        import ray

        return ray.get(self.server.score_heldout.remote(images.detach().cpu(), list(prompts)))


class _LocalRewardClient(_CountedRewardCalls):
    """A `WeightedReward` in this process, with the same interface and timing as `RemoteReward`."""

    def __init__(self, reward: WeightedReward, heldout: WeightedReward | None = None):
        self.reward = reward
        self.heldout = heldout
        self.differentiable = reward.differentiable
        self.heldout_names = heldout.names if heldout is not None else []
        self.wait_seconds = 0.0
        self.images_scored = 0

    def score(self, images: Tensor, prompts: Sequence[str]) -> RewardResult:
        return self._counted(images, lambda: self.reward.score(images, prompts))

    def score_and_grad(self, images: Tensor, prompts: Sequence[str]) -> tuple[RewardResult, Tensor]:
        return self._counted(images, lambda: self.reward.score_and_grad(images, prompts))

    def score_heldout(self, images: Tensor, prompts: Sequence[str]) -> RewardResult:
        if self.heldout is None:
            raise ValueError("no held-out rewards are configured (guards.heldout_rewards is empty)")
        return self.heldout.score(images, prompts)


class Sampler:
    """One sampler: policy pipeline + rollout.

    Args:
        config: the run config.
        source: the pipeline directory or hub id (already resolved, see `policy.resolve_model_source`).
        rank: this sampler's index (picks its reward server).
        reward_servers: RewardServer actor handles; None = build the rewards in this process.
        model: share an already loaded policy instead of loading one (the single-process trainer).
        reward: share an already built `WeightedReward` (single process; requires `reward_servers=None`).
        heldout_reward: share the already built held-out rewards (single process; `build_heldout_reward`); None
            = build them from `config.guards.heldout_rewards` when there are any.
        num_threads: torch intra-op threads (under Ray: the CPUs the actor reserved).
    """

    def __init__(
        self,
        config: RunConfig,
        source: str,
        *,
        rank: int = 0,
        reward_servers: Sequence | None = None,
        model: DiffusionModel | None = None,
        reward: WeightedReward | None = None,
        heldout_reward: WeightedReward | None = None,
        num_threads: int | None = None,
    ):
        if num_threads:
            torch.set_num_threads(num_threads)
        self._incarnation = uuid.uuid4().hex
        self.config = config
        self.rank = rank
        self.device = resolve_device(config.device) if model is None else model.device
        self.model = model if model is not None else load_policy(config, source, self.device)
        self.resolution = config.model.resolution or self.model.resolution
        if reward_servers is not None:  # the server knows which rewards (custom ones included) have gradients
            import ray

            server = reward_servers[rank % len(reward_servers)]
            info, heldout_names = ray.get([server.describe.remote(), server.heldout_names.remote()])
            self.reward = RemoteReward(reward_servers, rank, info["differentiable"], heldout_names)
            not_differentiable = info["not_differentiable"]
        else:
            local = reward or WeightedReward.from_specs(config.rewards, device=self.device)
            heldout = (
                heldout_reward
                if heldout_reward is not None
                else build_heldout_reward(config.guards.heldout_rewards, device=self.device)
            )
            self.reward = _LocalRewardClient(local, heldout)
            not_differentiable = local.not_differentiable
        self.reward_weights = {spec.key: spec.weight for spec in config.rewards}  # keyed as the scores are
        self.grid = policy_grid(config, self.model)
        self.eval_grid = policy_grid(config, self.model, evaluation=True)  # `sampling.eval_num_steps`
        self.algorithm = build_algorithm(config.algorithm, self.grid)
        if self.algorithm.needs_reward_gradient and not_differentiable:
            raise ValueError(
                f"algorithm {config.algorithm.name} needs a reward gradient, but reward(s) "
                f"{', '.join(not_differentiable)} are not differentiable; use a differentiable reward, or a method "
                "without a reward gradient (tailorpo for tailorpo_g)"
            )
        self.predictor = policy_predictor(
            self.model, config.sampling.guidance_scale, self.resolution, config.sampling.negative_prompt
        )
        # Version of the LoRA in `self.model`; -1 = not set by a learner yet (a fresh or restarted actor).
        self.weights_version = -1
        # Offline preference pairs (DDE / Diffusion-DPO): this sampler reads shard `rank` of the source.
        self.offline = None
        if config.data is not None:
            self.offline = OfflinePairStream(
                config.data, config.seed, shard_index=rank, num_shards=config.resources.num_samplers
            )

    def ready(self) -> int:
        """Returns the rank once the actor is constructed (the driver waits on it to surface load errors)."""
        return self.rank

    def incarnation(self) -> str:
        """A token of this instance, new each time Ray restarts the actor: the driver counts a restart when it
        changes (`actors.Actors`), so one death is counted once however many calls it failed."""
        return self._incarnation

    def encode(self, prompts: Sequence[str]) -> TextConditioning:
        return encode_prompts(self.model, list(prompts), height=self.resolution, width=self.resolution)

    def load_weights(self, weights: PublishedWeights) -> None:
        """Loads `weights` into the policy unless it already holds that version."""
        if weights.average:
            raise ValueError("a moving average of the weights is for evaluations only (Sampler.evaluate)")
        if weights.version != self.weights_version:
            set_trainable_state(self.model.unet, weights.resolve())
            self.weights_version = weights.version

    def rollout_context(self, generator: torch.Generator) -> RolloutContext:
        return RolloutContext(
            model=self.model,
            predictor=self.predictor,
            grid=self.grid,
            reward_fn=self.reward.score,
            reward_grad_fn=self.reward.score_and_grad if self.reward.differentiable else None,
            generator=generator,
            reward_weights=self.reward_weights,
        )

    def rollout(self, request: RolloutRequest) -> RolloutBatch:
        """Samples the request's prompts with its weights version and seed; returns the labelled examples with
        `weights_version` set, timings in `metrics` (rollout_seconds, reward_seconds) and the number of images the
        rollout handed to the reward (reward_images_count: final images, TailorPO's per-step candidates and
        TailorPO-G's guided winners)."""
        start = time.perf_counter()
        self.load_weights(request.weights)
        waited, scored = self.reward.wait_seconds, self.reward.images_scored
        self.model.unet.eval()
        generator = torch.Generator().manual_seed(request.seed)
        parts = []
        if self.offline is None or self.config.data.online:
            parts.append(
                self.algorithm.rollout(
                    self.rollout_context(generator), list(request.prompts), self.encode(request.prompts)
                )
            )
            parts[-1].weights_version = self.weights_version
        if self.offline is not None:
            pairs, data_metrics = self.offline.take(request.iteration)
            parts.append(encode_pairs(self.model, pairs, self.resolution, generator, self.weights_version))
            parts[-1].metrics.update(data_metrics)
        batch = parts[0] if len(parts) == 1 else RolloutBatch.concat(parts)
        batch.pairs.validate()
        batch.weights_version = self.weights_version
        batch.metrics["rollout_seconds"] = time.perf_counter() - start
        batch.metrics["reward_seconds"] = self.reward.wait_seconds - waited
        batch.metrics["reward_images_count"] = float(self.reward.images_scored - scored)
        return batch

    @torch.no_grad()
    def evaluate(
        self,
        prompts: Sequence[str],
        prompt_indices: Sequence[int],
        num_seeds: int,
        weights: PublishedWeights | None = None,
    ) -> EvalShard:
        """Held-out samples: `num_seeds` images of each prompt, seeded by (global prompt index, seed) only, scored
        by the training rewards and, when configured, the held-out rewards. A moving average of the weights
        (`weights.average`, `train.ema_decay`) is loaded for this pass only: the policy's own weights come back
        after it (an on-policy sampler in one process shares the learner's UNet)."""
        kept = None
        if weights is not None and weights.average:
            kept = get_trainable_state(self.model.unet)
            set_trainable_state(self.model.unet, weights.resolve())
        elif weights is not None:
            self.load_weights(weights)
        self.model.unet.eval()
        try:
            return evaluate_shard(
                self.model,
                self.predictor,
                self.eval_grid,
                self.reward,
                prompts,
                prompt_indices,
                num_seeds,
                self.resolution,
            )
        finally:
            if kept is not None:
                set_trainable_state(self.model.unet, kept)

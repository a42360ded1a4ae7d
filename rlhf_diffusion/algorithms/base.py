"""The Algorithm interface, the batch types that cross the sampler → learner boundary, and the registry.

An algorithm owns three things; its file holds it whole (docs/architecture.md, docs/extending.md):
  1. `rollout(ctx, prompts)`: what it samples (plain / paired / branched trajectories) and how it labels pairs;
  2. the training example it emits (`StepPairBatch` or `FinalPairBatch`);
  3. `loss(predictor, cond, examples)`: its loss on a minibatch of examples.

The same code runs in one process (tests, `trainer.run_local`) and under Ray: the rollout context's
`reward_fn` is a local call or a RewardServer call.
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from rlhf_diffusion.diffusion.sampling import DDIMGrid, NoisePredictor
from rlhf_diffusion.models.conditioning import TextConditioning
from rlhf_diffusion.models.loading import DiffusionModel
from rlhf_diffusion.rewards.base import RewardResult

__all__ = [
    "ALGORITHM_REGISTRY",
    "Algorithm",
    "FinalPairBatch",
    "LossOutput",
    "RolloutBatch",
    "RolloutContext",
    "StepPairBatch",
    "build_algorithm",
    "register_algorithm",
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
class RolloutBatch:
    """What a sampler returns for one slice of prompts. All tensors on CPU.

    Attributes:
        prompts: the P prompts of this slice.
        pairs: the training examples.
        final_images: (P, 3, H, W) in [0, 1], one final image per prompt (for grids), or None.
        rewards: (P, n) final-image rewards of every sampled trajectory (n = 2 for pairs), for logging.
        metrics: scalar rollout statistics (tie fraction, reward gap per step, ...).
        weights_version: version of the LoRA weights the rollout was sampled with.
        per_reward: reward name → (P, n) raw (unweighted) final-image scores, for logging each reward.
    """

    prompts: list[str]
    pairs: StepPairBatch | FinalPairBatch
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
class RolloutContext:
    """Everything a rollout needs from its host (a sampler actor or the local trainer).

    Attributes:
        model: the pipeline components (policy UNet with LoRA, VAE, text encoders).
        predictor: the policy's CFG noise prediction.
        grid: the K-step DDIM grid (η > 0).
        reward_fn: images (N, 3, H, W) in [0, 1], prompts → RewardResult (no gradient).
        reward_grad_fn: images, prompts → (RewardResult, d total / d images (N, 3, H, W)); None when the
            configured rewards are not differentiable.
        generator: CPU RNG for every random draw of the rollout.
        reward_weights: reward name → weight (the sign says whether higher is better; Pareto ranking uses it).
    """

    model: DiffusionModel
    predictor: NoisePredictor
    grid: DDIMGrid
    reward_fn: Callable[[Tensor, Sequence[str]], RewardResult]
    reward_grad_fn: Callable[[Tensor, Sequence[str]], tuple[RewardResult, Tensor]] | None
    generator: torch.Generator
    reward_weights: dict[str, float]


@dataclass
class LossOutput:
    """A minibatch loss and its diagnostics.

    Attributes:
        loss: scalar to back-propagate.
        metrics: detached scalars (implicit accuracy, clamp fraction, ...).
        state_update: algorithm state to apply after the optimizer step (DDE's EMA statistics), or None.
        grouped: per-example diagnostics the learner averages per group over a whole training round (all
            minibatches, all data-parallel ranks) and logs as `<name>_<group>` and `<name>_mean`: name →
            (groups (N,) long, values (N,) float, detached). The KL of the policy to the reference per step index
            or timestep bucket (`kl/...`, `guards.log_kl`).
    """

    loss: Tensor
    metrics: dict[str, float]
    state_update: Any = None
    grouped: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)


class Algorithm(abc.ABC):
    """A preference-optimisation method: what it samples, what a training example is, and its loss.

    Subclasses set `name` (the config's `algorithm.name`) and `cfg_in_training` (whether the loss evaluates the
    CFG-combined ε̂ like D3PO, or the conditional ε like Diffusion-DPO).
    """

    name: ClassVar[str]
    cfg_in_training: ClassVar[bool]

    def __init__(self, config: Any, grid: DDIMGrid):
        self.config = config
        self.grid = grid

    @abc.abstractmethod
    def rollout(self, ctx: RolloutContext, prompts: list[str], cond: TextConditioning) -> RolloutBatch:
        """Samples trajectories for `prompts` (with their encoded `cond`) and returns labelled examples."""

    @abc.abstractmethod
    def loss(
        self, predictor: NoisePredictor, cond: TextConditioning, examples: Any, generator: torch.Generator
    ) -> LossOutput:
        """The loss on a minibatch of examples; `cond` holds one conditioning per example."""

    def loss_on_rows(
        self, predictor: NoisePredictor, cond: TextConditioning, examples: Any, generator: torch.Generator, rows: Tensor
    ) -> LossOutput:
        """The loss of the minibatch examples at `rows` (a data-parallel rank's share), with every random draw made
        for the whole minibatch first, so that R ranks together compute exactly the single-process loss: the
        size-weighted mean of the R shard losses equals `loss(...)` on all rows, whatever R is.

        The default suits losses that draw nothing (D3PO, TailorPO); a method whose loss draws from `generator`
        (DDE, Diffusion-DPO: t and ε per pair) must override it. `cond` holds one conditioning per example of the
        whole minibatch; a `state_update` covers only `rows` (see `merge_state_updates`).
        """
        return self.loss(predictor, cond.index(rows), examples.select(rows), generator)

    @staticmethod
    def merge_state_updates(updates: Sequence[Any]) -> Any:
        """Joins the `state_update`s of the ranks' shards (in rank order) into the update of the whole minibatch.
        A state update is None or a tuple of per-example tensors (DDE: timesteps, statistics), so joining is
        concatenation field by field; contiguous shards in rank order restore the single-process order."""
        present = [u for u in updates if u is not None]
        if not present:
            return None
        return tuple(torch.cat(parts) for parts in zip(*present))

    def signal_groups(self, examples: Any, generator: torch.Generator) -> tuple[Tensor, dict[int, str]]:
        """How the learning-signal diagnostics (`algorithms.signal`) group the examples: (M,) long group ids and
        id → name. Default: the DDIM step index of a `StepPairBatch` (`step_<k>`). `generator` is seeded as the
        loss's own draws are, for methods whose groups depend on them (DDE / Diffusion-DPO: the t bucket)."""
        steps = examples.step_index.long()
        return steps, {k: f"step_{k}" for k in steps.unique().tolist()}

    def apply_state_update(self, update: Any) -> None:  # noqa: B027 - an optional hook, not an abstract method
        """Applies the state statistics of one loss call after the optimizer step (no-op by default)."""

    def state_dict(self) -> dict[str, Tensor]:
        """Algorithm state to checkpoint (DDE's EMA array); empty by default."""
        return {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if state:
            raise ValueError(f"algorithm {self.name!r} has no state, got keys {sorted(state)}")


ALGORITHM_REGISTRY: dict[str, type[Algorithm]] = {}


def register_algorithm(*names: str):
    """Class decorator registering an Algorithm under one or more config names."""

    def decorator(cls: type[Algorithm]) -> type[Algorithm]:
        for name in names:
            if name in ALGORITHM_REGISTRY:
                raise ValueError(f"algorithm {name!r} is already registered")
            ALGORITHM_REGISTRY[name] = cls
        return cls

    return decorator


def build_algorithm(config: Any, grid: DDIMGrid) -> Algorithm:
    """The algorithm for `config.name` (an algorithm config section) on the given DDIM grid."""
    try:
        cls = ALGORITHM_REGISTRY[config.name]
    except KeyError:
        raise ValueError(
            f"unknown algorithm {config.name!r}; registered: {', '.join(sorted(ALGORITHM_REGISTRY))}"
        ) from None
    return cls(config, grid)

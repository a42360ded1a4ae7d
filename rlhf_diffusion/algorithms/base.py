"""The Algorithm interface, its rollout context and loss output, and the registry (the batch types it emits are in
`rlhf_diffusion.batches`).

An algorithm owns three things; its file holds it whole (docs/architecture.md, docs/extending.md):
  1. `rollout(ctx, prompts)`: what it samples (plain / paired / branched trajectories) and how it labels pairs;
  2. the training example it emits (`StepPairBatch` or `FinalPairBatch`);
  3. `loss(predictor, cond, examples)`: its loss on a minibatch of examples.

The same code runs in one process (tests, `trainer.run_local`) and under Ray: the rollout context's
`reward_fn` is a local call or a RewardServer call.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from rlhf_diffusion.batches import RolloutBatch
from rlhf_diffusion.diffusion.flow import FlowGrid
from rlhf_diffusion.diffusion.sampling import DDIMGrid, NoisePredictor
from rlhf_diffusion.models.conditioning import TextConditioning
from rlhf_diffusion.models.loading import DiffusionModel
from rlhf_diffusion.rewards.base import RewardResult

__all__ = [
    "ALGORITHM_REGISTRY",
    "Algorithm",
    "LossOutput",
    "RolloutContext",
    "build_algorithm",
    "register_algorithm",
]


@dataclass
class RolloutContext:
    """Everything a rollout needs from its host (a sampler actor or the local trainer).

    Attributes:
        model: the pipeline components (policy UNet with LoRA, VAE, text encoders).
        predictor: the policy's CFG noise prediction (a flow model's: its `VelocityPredictor`).
        grid: the K-step DDIM grid (η > 0), or a flow model's `FlowGrid` (methods with `flow_models` only).
        reward_fn: images (N, 3, H, W) in [0, 1], prompts → RewardResult (no gradient).
        reward_grad_fn: images, prompts → (RewardResult, d total / d images (N, 3, H, W)); None when the
            configured rewards are not differentiable.
        generator: CPU RNG for every random draw of the rollout.
        reward_weights: reward name → weight (the sign says whether higher is better; Pareto ranking uses it).
    """

    model: DiffusionModel
    predictor: NoisePredictor
    grid: DDIMGrid | FlowGrid
    reward_fn: Callable[[Tensor, Sequence[str]], RewardResult]
    reward_grad_fn: Callable[[Tensor, Sequence[str]], tuple[RewardResult, Tensor]] | None
    generator: torch.Generator
    reward_weights: dict[str, float]

    def require_reward_grad(self, method: str) -> Callable[[Tensor, Sequence[str]], tuple[RewardResult, Tensor]]:
        """`reward_grad_fn`, or a ValueError naming `method` when the configured rewards are not differentiable."""
        if self.reward_grad_fn is None:
            raise ValueError(
                f"algorithm {method} needs differentiable rewards (a reward gradient); the configured rewards are not "
                "differentiable"
            )
        return self.reward_grad_fn


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
    CFG-combined ε̂ like D3PO, or the conditional ε like Diffusion-DPO), and `flow_models` True when the method
    also trains flow-matching (SD3) models (on a `flow.FlowGrid` with a `flow_sampling.VelocityPredictor`;
    `workers.policy` refuses the others on such a model). `needs_step_density` True when the loss re-scores the
    sampler's per-step actions (DDPO, GRPO): on a flow model it then needs the SDE sampler
    (`sampling.flow_noise_level` > 0; the ODE's steps have no density). `needs_reward_gradient` True when the
    rollout uses the reward's gradient (TailorPO-G, DRaFT): a sampler refuses rewards without one when it is built.
    """

    name: ClassVar[str]
    cfg_in_training: ClassVar[bool]
    flow_models: ClassVar[bool] = False
    needs_step_density: ClassVar[bool] = False
    needs_reward_gradient: ClassVar[bool] = False

    @classmethod
    def flow_problem(cls, config: Any) -> str | None:
        """Why this method, configured by `config` (a `RunConfig`), cannot train a flow model although it has
        `flow_models` (a setting with no flow counterpart), as "<field>: <why>", or None."""
        return None

    def __init__(self, config: Any, grid: DDIMGrid | FlowGrid):
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

    def prepare_examples(self, batch: RolloutBatch) -> Any:
        """The examples the learner trains on this round, from the whole joined rollout batch: called once per round
        on every learner rank, after the staleness check and before the learning-signal diagnostics and the
        minibatches. Default `batch.pairs`. A method whose examples depend on state kept across iterations overrides
        it (DDPO: each trajectory's advantage from its per-prompt reward statistics, checkpointed by `state_dict`);
        it must give the same examples for the same state and batch, so that every rank trains on the same data."""
        return batch.pairs

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

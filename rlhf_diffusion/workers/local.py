"""The in-process stand-in for Ray: the same worker classes, built in this process, behind the call shape of Ray
actor handles (`handle.method.remote(...)`, results read with `get`), so the driver loop runs unchanged without Ray
(`Trainer(config, use_ray=False)`, `launch --no-ray`, `LocalTrainer`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rlhf_diffusion.config import RunConfig
from rlhf_diffusion.rewards.base import WeightedReward
from rlhf_diffusion.workers.learner import GroupRef, Learner
from rlhf_diffusion.workers.policy import load_policy, resolve_device
from rlhf_diffusion.workers.reward_server import build_heldout_reward
from rlhf_diffusion.workers.sampler import Sampler

__all__ = ["LocalHandle", "LocalWorkers", "get", "start_local"]


class _Done:
    """An already computed result, shaped like an ObjectRef for `get`."""

    def __init__(self, value: Any = None, error: BaseException | None = None):
        self.value, self.error = value, error


class _LocalMethod:
    def __init__(self, method: Callable):
        self.method = method

    def remote(self, *args, **kwargs) -> _Done:
        try:
            return _Done(self.method(*args, **kwargs))
        except Exception as error:  # raised at get, as Ray would
            return _Done(error=error)


class LocalHandle:
    """Calls an object's methods in this process with the call shape of a Ray actor handle (`h.m.remote(...)`)."""

    def __init__(self, obj: Any):
        self.obj = obj

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self.obj, name))


def get(ref: Any) -> Any:
    """The result of a call on any handle: a `LocalHandle`'s (its error raised here, as Ray would), a
    `LearnerGroup`'s (every rank) or a Ray actor's (`ray.get`)."""
    if isinstance(ref, _Done):
        if ref.error is not None:
            raise ref.error
        return ref.value
    if isinstance(ref, GroupRef):  # a call on every rank of a LearnerGroup
        return ref.get()
    import ray

    return ray.get(ref)


@dataclass
class LocalWorkers:
    """The workers of a run in this process: the objects, and `LocalHandle`s on them for the driver."""

    learner_obj: Learner
    sampler_objs: list[Sampler]
    reward: WeightedReward
    heldout_reward: WeightedReward | None
    learner: LocalHandle
    samplers: list[LocalHandle]


def start_local(config: RunConfig, source: str) -> LocalWorkers:
    """Builds the learner and `resources.num_samplers` samplers in this process (one learner only)."""
    if config.resources.num_learners > 1:
        raise ValueError(
            f"resources.num_learners={config.resources.num_learners} needs Ray (data-parallel "
            "learner actors); set it to 1 to run in one process"
        )
    device = resolve_device(config.device)
    model = load_policy(config, source, device, for_training=True)
    reward = WeightedReward.from_specs(config.rewards, device=device)
    heldout_reward = build_heldout_reward(config.guards.heldout_rewards, device=device)
    learner_obj = Learner(config, source, model=model)
    # Strictly on-policy samplers share the learner's UNet; a pipelined schedule samples with older weights,
    # so each sampler then holds its own copy.
    share = config.train.max_staleness == 0
    sampler_objs = [
        Sampler(
            config,
            source,
            rank=i,
            model=model if share else load_policy(config, source, device),
            reward=reward,
            heldout_reward=heldout_reward,
        )
        for i in range(config.resources.num_samplers)
    ]
    return LocalWorkers(
        learner_obj=learner_obj,
        sampler_objs=sampler_objs,
        reward=reward,
        heldout_reward=heldout_reward,
        learner=LocalHandle(learner_obj),
        samplers=[LocalHandle(s) for s in sampler_objs],
    )

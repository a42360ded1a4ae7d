"""The run's actors: starting them (Ray actors, or the same classes in this process, `workers/local.py`), calling
them, surviving their faults, stopping them (docs/architecture.md, "Faults").

A sampler or reward server that dies is restarted by Ray (`resources.max_actor_restarts`); `Actors.sampler_result`
waits for the restart and repeats the call (sampler calls are pure functions of their arguments, so the repeat
returns the same result). A learner that dies ends the run with `LearnerCrashed`, which names the checkpoint to
resume from.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf_diffusion.batches import EvalShard, PublishedWeights, RolloutBatch, RolloutRequest
from rlhf_diffusion.checkpoint import latest_checkpoint, load_checkpoint
from rlhf_diffusion.config import RunConfig
from rlhf_diffusion.workers.learner import Learner, LearnerGroup
from rlhf_diffusion.workers.local import LocalWorkers, get, start_local
from rlhf_diffusion.workers.reward_server import RewardServer
from rlhf_diffusion.workers.sampler import Sampler

__all__ = ["Actors", "LearnerCrashed", "actor_died", "required_resources", "start_ray_actors"]


class LearnerCrashed(RuntimeError):
    """The learner actor died; the message names the checkpoint to resume from."""


def actor_died(error: BaseException) -> bool:
    """True when `error` means an actor died (directly, or inside a call the failed task made)."""
    try:
        from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    seen = 0
    while error is not None and seen < 5:
        if isinstance(error, (RayActorError, ActorUnavailableError)):
            return True
        if isinstance(error, RayTaskError):
            error = getattr(error, "cause", None)
        else:
            error = error.__cause__
        seen += 1
    return False


def required_resources(config: RunConfig) -> dict[str, float]:
    """Logical CPUs and GPUs the configured actors reserve."""
    r = config.resources
    actors = r.num_samplers + r.num_reward_servers + r.num_learners
    return {
        "CPU": actors * r.cpus_per_actor,
        "GPU": r.num_samplers * r.sampler_gpus
        + r.num_reward_servers * r.reward_server_gpus
        + r.num_learners * r.learner_gpus,
    }


def start_ray_actors(config: RunConfig, source: str) -> tuple[list, Any, list]:
    """Starts the reward servers, samplers and learner(s) on the connected Ray cluster and waits until each is
    constructed (`resources.actor_start_timeout_s`). Returns (samplers, learner or `LearnerGroup`, reward servers).

    Raises:
        RuntimeError: the cluster lacks the resources, or an actor failed or timed out starting.
    """
    import ray

    res = config.resources
    need = required_resources(config)
    have = ray.cluster_resources()
    for kind, amount in need.items():
        if amount > have.get(kind, 0.0) + 1e-9:
            raise RuntimeError(
                f"the configured actors need {amount:g} {kind} but the Ray cluster has {have.get(kind, 0.0):g}; "
                f"lower resources.cpus_per_actor / resources.*_gpus / resources.num_samplers, or add nodes"
            )
    threads = max(1, int(res.cpus_per_actor))
    restarts = res.max_actor_restarts
    reward_servers = [
        ray.remote(RewardServer)
        .options(
            num_cpus=res.cpus_per_actor,
            num_gpus=res.reward_server_gpus,
            max_restarts=restarts,
            max_task_retries=restarts,
            name=None,
        )
        .remote(
            list(config.rewards),
            config.device,
            res.reward_batch_window_ms,
            res.reward_max_batch_images,
            threads,
            heldout_specs=list(config.guards.heldout_rewards),
        )
        for _ in range(res.num_reward_servers)
    ]
    sampler_cls = ray.remote(Sampler)
    samplers = [
        sampler_cls.options(
            num_cpus=res.cpus_per_actor, num_gpus=res.sampler_gpus, max_restarts=restarts, max_task_retries=0
        ).remote(config, source, rank=i, reward_servers=reward_servers, num_threads=threads)
        for i in range(res.num_samplers)
    ]
    learner_cls = ray.remote(Learner).options(num_cpus=res.cpus_per_actor, num_gpus=res.learner_gpus, max_restarts=0)
    if res.num_learners == 1:
        learner = learner_cls.remote(config, source, num_threads=threads)
        learner_ready = [learner.ready.remote()]
    else:
        try:
            learner = LearnerGroup(
                learner_cls,
                config,
                source,
                world_size=res.num_learners,
                num_threads=threads,
                timeout_s=res.actor_start_timeout_s,
            )
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(
                f"the {res.num_learners} learner ranks did not start and connect within "
                f"resources.actor_start_timeout_s={res.actor_start_timeout_s:g} s"
            ) from None
        learner_ready = []
    pending = {
        "reward server": [s.ready.remote() for s in reward_servers],
        "sampler": [s.ready.remote() for s in samplers],
        "learner": learner_ready,
    }
    for role, refs in pending.items():
        try:
            ray.get(refs, timeout=res.actor_start_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise RuntimeError(
                f"the {role} actors did not start within resources.actor_start_timeout_s="
                f"{res.actor_start_timeout_s:g} s (is the cluster out of CPUs/GPUs?)"
            ) from None
        except ray.exceptions.RayActorError as error:
            raise RuntimeError(f"the {role} actor failed to start: {error}") from None
    return samplers, learner, reward_servers


class Actors:
    """The actors of one run, started here, and the calls the driver makes on them with their fault handling.

    Args:
        config: the validated run config.
        source: the resolved pipeline directory or hub id.
        use_ray: Ray actors (`ray.init` must have run), or the same classes in this process (`start_local`).
        checkpoint_root: where the checkpoints go (named by `LearnerCrashed`).
        log: where fault lines go.

    Attributes:
        samplers, learner, reward_servers: the handles (`reward_servers` is empty without Ray).
        local: the objects behind the handles without Ray (`LocalWorkers`), else None.
        faults: sampler_restarts / shards_redone counters.
    """

    def __init__(
        self, config: RunConfig, source: str, *, use_ray: bool, checkpoint_root: Path, log: Callable[[str], None]
    ):
        self.config = config
        self.use_ray = use_ray
        self.checkpoint_root = checkpoint_root
        self.log = log
        self.faults = {"sampler_restarts": 0, "shards_redone": 0}
        self.reward_servers: list = []
        self.local: LocalWorkers | None = None
        if use_ray:
            self.samplers, self.learner, self.reward_servers = start_ray_actors(config, source)
        else:
            self.local = start_local(config, source)
            self.samplers, self.learner = self.local.samplers, self.local.learner

    def shutdown(self) -> None:
        """Kills the actors started here (Ray) — the cluster itself is left running."""
        if not self.use_ray:
            return
        import ray

        learners = self.learner.actors if isinstance(self.learner, LearnerGroup) else [self.learner]
        for actor in [*self.samplers, *self.reward_servers, *learners]:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already dead
                pass

    def publish(self) -> PublishedWeights:
        """The learner's current weights, published for the samplers (through the object store under Ray)."""
        return get(self.learner.publish.remote() if self.use_ray else self.learner.weights.remote())

    def restore_weights(self, history: dict[int, dict[str, Any]]) -> dict[int, PublishedWeights]:
        """Published weights again from a checkpoint's weights history (version → state), for the samplers."""
        published = {v: PublishedWeights(version=v, state=w) for v, w in history.items()}
        if self.use_ray:
            import ray

            published = {v: PublishedWeights(version=v, ref=[ray.put(w.state)]) for v, w in published.items()}
        return published

    def learner_call(self, iteration: int, method: str, *args) -> Any:
        """The result of `learner.method(*args)`; `LearnerCrashed` (naming the checkpoint to resume from) when the
        learner died."""
        try:
            return get(getattr(self.learner, method).remote(*args))
        except Exception as error:
            if not actor_died(error):
                raise
            latest = latest_checkpoint(self.checkpoint_root)
            where = (
                (
                    f"the last checkpoint is {latest} (iteration {load_checkpoint(latest).iteration}); continue "
                    f"with: python -m rlhf_diffusion.launch <config> --resume"
                )
                if latest
                else "no checkpoint was written yet (checkpoint.every); the run must start over"
            )
            raise LearnerCrashed(
                f"the learner actor died during iteration {iteration} ({type(error).__name__}); {where}"
            ) from None

    def sampler_result(self, rank: int, ref: Any, resubmit: Callable[[], Any], what: str) -> Any:
        """The result of a sampler call; when the sampler died, waits for Ray to restart it and calls again
        (sampler calls are pure functions of their arguments, so a repeat returns the same result)."""
        retries = self.config.resources.max_actor_restarts
        for attempt in range(retries + 1):
            try:
                return get(ref)
            except Exception as error:
                if not actor_died(error):
                    raise
                if attempt == retries:
                    raise RuntimeError(
                        f"sampler {rank} kept dying ({retries} restarts, "
                        f"resources.max_actor_restarts) during {what}: {error}"
                    ) from None
                self.faults["shards_redone"] += 1
                self.log(f"[fault] sampler {rank} died during {what}")
                self.wait_until_restarted(self.samplers[rank], f"sampler {rank}")
                ref = resubmit()
        raise AssertionError("unreachable")

    def submit(self, requests: list[RolloutRequest]) -> list[tuple[RolloutRequest, Any]]:
        """Queues the rollout requests of one iteration, each on its shard's sampler."""
        return [(req, self.samplers[req.shard].rollout.remote(req)) for req in requests]

    def gather(self, iteration: int, entries: list[tuple[RolloutRequest, Any]]) -> RolloutBatch:
        """Waits for the shards of `iteration` in shard order; a shard whose sampler died is redone (same request,
        same seed) on the restarted actor."""
        shards = []
        for request, ref in entries:
            shards.append(
                self.sampler_result(
                    request.shard,
                    ref,
                    lambda r=request: self.samplers[r.shard].rollout.remote(r),
                    f"iteration {iteration}; the shard is redone with the same seed and weights version "
                    f"{request.weights.version}",
                )
            )
        return RolloutBatch.concat(shards)

    def evaluate(self, prompts: list[str], seeds: int, weights: PublishedWeights) -> list[EvalShard]:
        """The samplers' held-out shards with `weights` (`Sampler.evaluate`): `prompts` dealt round-robin to the
        samplers (prompt j to sampler j mod n), `seeds` images each; a shard whose sampler died is redone."""
        n = len(self.samplers)
        calls = []
        for k in range(n):
            idx = list(range(k, len(prompts), n))
            if idx:

                def call(k=k, idx=idx):
                    return self.samplers[k].evaluate.remote([prompts[j] for j in idx], idx, seeds, weights)

                calls.append((k, call(), call))
        return [self.sampler_result(k, ref, call, "evaluation") for k, ref, call in calls]

    def wait_until_restarted(self, actor: Any, role: str) -> None:
        """Blocks until Ray has restarted `actor` (calls meanwhile fail with ActorUnavailableError)."""
        import ray

        deadline = time.monotonic() + self.config.resources.actor_start_timeout_s
        while True:
            try:
                ray.get(actor.ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
                self.faults["sampler_restarts"] += 1
                return
            except ray.exceptions.ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{role} was not restarted within resources.actor_start_timeout_s") from None
                time.sleep(0.2)
            except ray.exceptions.GetTimeoutError:
                raise RuntimeError(f"{role} was not restarted within resources.actor_start_timeout_s") from None

    def reward_server_stats(self) -> dict[str, float]:
        """reward_server/...: mean requests per batched call and the servers' busy fraction ({} without Ray)."""
        if not self.reward_servers:
            return {}
        import ray

        stats = ray.get([s.stats.remote() for s in self.reward_servers])
        out: dict[str, float] = {}
        for key in ("score/requests_per_batch", "grad/requests_per_batch"):
            values = [s[key] for s in stats if s.get(key)]
            if values:
                out[f"reward_server/{key.replace('/', '_')}"] = sum(values) / len(values)
        busy = sum(s["score/busy_seconds"] + s["grad/busy_seconds"] + s.get("heldout/busy_seconds", 0.0) for s in stats)
        up = sum(s["uptime_seconds"] for s in stats)
        out["reward_server/busy_fraction"] = busy / up if up else 0.0
        return out

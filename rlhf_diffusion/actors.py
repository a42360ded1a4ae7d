"""The run's actors: starting them (Ray actors, or the same classes in this process, `workers/local.py`), calling
them, surviving their faults, stopping them (docs/architecture.md, "Faults").

A sampler or reward server that dies is restarted by Ray (`resources.max_actor_restarts`); `Actors.sampler_result`
waits for the restart and repeats the call (sampler calls are pure functions of their arguments, so the repeat
returns the same result). Each restart is counted once (`faults/sampler_restarts`, `faults/reward_server_restarts`):
every sampler and reward server answers `incarnation()` with a token that is new after each restart, and a restart
is counted when the driver sees the token change, however many calls the one death failed. A sampler or reward
server that Ray does not restart (`max_actor_restarts` 0 or used up), and a learner that dies (never restarted),
end the run with `ActorCrashed` (`LearnerCrashed`), whose message names the actor, why it was not restarted and
the newest complete checkpoint to resume from. Iterations in messages count from 1, as in metrics.jsonl.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf_diffusion.batches import EvalShard, PublishedWeights, RolloutBatch, RolloutRequest
from rlhf_diffusion.checkpoint import latest_checkpoint
from rlhf_diffusion.config import RunConfig
from rlhf_diffusion.workers.learner import Learner, LearnerGroup
from rlhf_diffusion.workers.local import LocalWorkers, get, start_local
from rlhf_diffusion.workers.reward_server import RewardServer
from rlhf_diffusion.workers.sampler import Sampler

__all__ = [
    "ActorCrashed",
    "Actors",
    "LearnerCrashed",
    "actor_died",
    "death_of",
    "required_resources",
    "resume_hint",
    "start_ray_actors",
]


class ActorCrashed(RuntimeError):
    """An actor died and the run cannot go on without it (a sampler or reward server Ray did not restart, or the
    learner); the message names the actor, why, and the newest complete checkpoint to resume from."""


class LearnerCrashed(ActorCrashed):
    """The learner actor died (it is never restarted); the message names the checkpoint to resume from."""


def resume_hint(checkpoint_root: Path) -> str:
    """Where a crashed run continues from: the newest complete checkpoint (what `--resume` starts from) and the
    command, or that there is none."""
    latest = latest_checkpoint(checkpoint_root)
    if latest is None:
        return (
            f"no checkpoint was written yet under {checkpoint_root} (checkpoint.every), so there is nothing to "
            "resume: the run must start over"
        )
    try:
        done = int(json.loads((latest / "state.json").read_text(encoding="utf-8"))["iteration"])
    except (OSError, ValueError, KeyError, TypeError):
        done = int(latest.name.rpartition("_")[2])
    return (
        f"the newest complete checkpoint is {latest} (after iteration {done}); continue the run with: "
        "python -m rlhf_diffusion.launch <config> --resume"
    )


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


def death_of(error: BaseException) -> str | None:
    """Whose death `error` reports: "self" when the actor the call went to died, "callee" when the call ran and
    failed because an actor it called died (a sampler's call to a reward server), None when no actor died."""
    try:
        from ray.exceptions import RayActorError, RayTaskError
    except ImportError:  # pragma: no cover - ray is a dependency
        return None
    inside = False
    for _ in range(6):
        if error is None:
            return None
        if isinstance(error, RayTaskError):  # first: Ray makes it an instance of its cause's class too
            inside = True
            error = getattr(error, "cause", None)
        elif isinstance(error, RayActorError):  # ActorDiedError, ActorUnavailableError
            return "callee" if inside else "self"
        else:
            error = error.__cause__
    return None


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
        checkpoint_root: where the checkpoints go (named by `ActorCrashed` as the place to resume from).
        log: where fault lines go.

    Attributes:
        samplers, learner, reward_servers: the handles (`reward_servers` is empty without Ray).
        local: the objects behind the handles without Ray (`LocalWorkers`), else None.
        faults: the counters sampler_restarts, reward_server_restarts (each restart once) and shards_redone
            (rollout or evaluation shards sampled again), for the whole run (`restore_faults` on resume).
    """

    def __init__(
        self, config: RunConfig, source: str, *, use_ray: bool, checkpoint_root: Path, log: Callable[[str], None]
    ):
        self.config = config
        self.use_ray = use_ray
        self.checkpoint_root = checkpoint_root
        self.log = log
        self.faults = {"sampler_restarts": 0, "reward_server_restarts": 0, "shards_redone": 0}
        self.reward_servers: list = []
        self.local: LocalWorkers | None = None
        # (role, index) → the incarnation token the driver last saw (Ray): a new token = one restart.
        self.incarnations: dict[tuple[str, int], str] = {}
        if use_ray:
            import ray

            self.samplers, self.learner, self.reward_servers = start_ray_actors(config, source)
            actors = self._restartable()
            tokens = ray.get([actor.incarnation.remote() for _, _, actor in actors])
            self.incarnations = {(role, index): token for (role, index, _), token in zip(actors, tokens)}
        else:
            self.local = start_local(config, source)
            self.samplers, self.learner = self.local.samplers, self.local.learner

    def _restartable(self) -> list[tuple[str, int, Any]]:
        return [("sampler", k, s) for k, s in enumerate(self.samplers)] + [
            ("reward server", k, s) for k, s in enumerate(self.reward_servers)
        ]

    def restore_faults(self, saved: dict[str, Any] | None) -> None:
        """Continues the fault counters of a checkpoint's meta (resume), so that they count the whole run."""
        for key, value in (saved or {}).items():
            if key in self.faults:
                self.faults[key] = int(value)

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

    def publish(self, during: str, average: bool = False) -> PublishedWeights:
        """The learner's current weights (`average`: their moving average, `train.ema_decay`), published for the
        samplers (through the object store under Ray); `during` says when, for the message should the learner have
        died."""
        return self.learner_call(during, "publish" if self.use_ray else "weights", average)

    def restore_weights(self, history: dict[int, dict[str, Any]]) -> dict[int, PublishedWeights]:
        """Published weights again from a checkpoint's weights history (version → state), for the samplers."""
        published = {v: PublishedWeights(version=v, state=w) for v, w in history.items()}
        if self.use_ray:
            import ray

            published = {v: PublishedWeights(version=v, ref=[ray.put(w.state)]) for v, w in published.items()}
        return published

    def learner_call(self, during: str, method: str, *args) -> Any:
        """The result of `learner.method(*args)`; `LearnerCrashed` (naming the checkpoint to resume from) when the
        learner died. `during` says what the run was doing, e.g. "iteration 4" (1-based, as metrics.jsonl)."""
        try:
            return get(getattr(self.learner, method).remote(*args))
        except Exception as error:
            if not actor_died(error):
                raise
            raise LearnerCrashed(
                f"the learner actor died during {during} ({type(error).__name__}; the learner is never restarted: "
                f"its state is the run's); {resume_hint(self.checkpoint_root)}"
            ) from None

    def sampler_result(self, rank: int, ref: Any, resubmit: Callable[[], Any], during: str) -> Any:
        """The result of a sampler call; when the sampler died, waits for Ray to restart it and calls again
        (sampler calls are pure functions of their arguments, so a repeat returns the same result); when a reward
        server it called died, waits for that one instead. `ActorCrashed` when the dead actor is not restarted."""
        # Each repeat goes to a live incarnation, so it fails again only after a new death, and Ray restarts an
        # actor at most max_actor_restarts times: the bound is a safety net.
        for _ in range(self.config.resources.max_actor_restarts + 2):
            try:
                return get(ref)
            except Exception as error:
                where = death_of(error)
                if where is None or not self.use_ray:
                    raise
                if where == "self":
                    self.log(f"[fault] sampler {rank} died during {during}")
                    self.await_restart("sampler", rank, during)
                else:
                    self.log(f"[fault] a reward server died while sampler {rank} waited on it during {during}")
                    self.check_reward_servers(during)
                # reached only once the dead actor is back (await_restart / check_reward_servers raise otherwise)
                self.log(f"[fault] the shard of sampler {rank} is redone with the same seed and weights")
                self.faults["shards_redone"] += 1
                ref = resubmit()
        raise ActorCrashed(
            f"sampler {rank} kept failing during {during} after {self.faults['sampler_restarts']} sampler and "
            f"{self.faults['reward_server_restarts']} reward-server restarts (resources.max_actor_restarts="
            f"{self.config.resources.max_actor_restarts}); {resume_hint(self.checkpoint_root)}"
        )

    def submit(self, requests: list[RolloutRequest]) -> list[tuple[RolloutRequest, Any]]:
        """Queues the rollout requests of one iteration, each on its shard's sampler."""
        return [(req, self.samplers[req.shard].rollout.remote(req)) for req in requests]

    def gather(self, iteration: int, entries: list[tuple[RolloutRequest, Any]]) -> RolloutBatch:
        """Waits for the shards of `iteration` (0-based, as `RolloutRequest.iteration`) in shard order; a shard whose
        sampler died is redone (same request, same seed) on the restarted actor."""
        shards = []
        for request, ref in entries:
            shards.append(
                self.sampler_result(
                    request.shard,
                    ref,
                    lambda r=request: self.samplers[r.shard].rollout.remote(r),
                    f"iteration {iteration + 1} (shard {request.shard}, weights version {request.weights.version})",
                )
            )
        return RolloutBatch.concat(shards)

    def evaluate(self, prompts: list[str], seeds: int, weights: PublishedWeights, during: str) -> list[EvalShard]:
        """The samplers' held-out shards with `weights` (`Sampler.evaluate`): `prompts` dealt round-robin to the
        samplers (prompt j to sampler j mod n), `seeds` images each; a shard whose sampler died is redone.
        `during` names the pass in messages, e.g. "the evaluation after iteration 3"."""
        n = len(self.samplers)
        calls = []
        for k in range(n):
            idx = list(range(k, len(prompts), n))
            if idx:

                def call(k=k, idx=idx):
                    return self.samplers[k].evaluate.remote([prompts[j] for j in idx], idx, seeds, weights)

                calls.append((k, call(), call))
        return [self.sampler_result(k, ref, call, during) for k, ref, call in calls]

    def await_restart(self, role: str, index: int, during: str) -> bool:
        """Waits until Ray has restarted (or still runs) the sampler or reward server `index` and counts one restart
        when its incarnation token changed since the driver last saw it; a second failed call of the same death
        finds the token it already counted. Returns whether it counted one.

        Raises:
            ActorCrashed: the actor is dead for good (restarts disabled or used up), or was not back within
                resources.actor_start_timeout_s.
        """
        import ray

        actor = (self.samplers if role == "sampler" else self.reward_servers)[index]
        timeout = self.config.resources.actor_start_timeout_s
        deadline = time.monotonic() + timeout
        while True:
            try:
                token = ray.get(actor.incarnation.remote(), timeout=max(1.0, deadline - time.monotonic()))
                break
            except ray.exceptions.ActorUnavailableError:  # restarting, or briefly unreachable
                if time.monotonic() > deadline:
                    raise ActorCrashed(self._not_back(role, index, during, timeout)) from None
                time.sleep(0.2)
            except ray.exceptions.GetTimeoutError:
                raise ActorCrashed(self._not_back(role, index, during, timeout)) from None
            except ray.exceptions.RayActorError:  # ActorDiedError: Ray will not restart it
                raise ActorCrashed(self._dead_for_good(role, index, during)) from None
        if token == self.incarnations.get((role, index)):
            return False
        self.incarnations[(role, index)] = token
        self.faults[f"{role.replace(' ', '_')}_restarts"] += 1
        self.log(f"[fault] {role} {index} was restarted by Ray")
        return True

    def check_reward_servers(self, during: str) -> None:
        """Counts the reward servers Ray restarted since the last check (their calls in flight were retried by Ray,
        so nothing else saw it); `ActorCrashed` naming one that is dead for good. Once per iteration (Ray)."""
        for index in range(len(self.reward_servers)):
            self.await_restart("reward server", index, during)

    def _dead_for_good(self, role: str, index: int, during: str) -> str:
        restarts = self.config.resources.max_actor_restarts
        why = (
            "restarts are disabled (resources.max_actor_restarts=0; set it above 0 to have Ray restart a dead "
            "sampler or reward server)"
            if restarts == 0
            else f"Ray will not restart it again (its resources.max_actor_restarts={restarts} restarts are used up)"
        )
        return f"{role} {index} died during {during} and {why}; {resume_hint(self.checkpoint_root)}"

    def _not_back(self, role: str, index: int, during: str, timeout: float) -> str:
        return (
            f"{role} {index} died during {during} and was not restarted within resources.actor_start_timeout_s="
            f"{timeout:g} s; {resume_hint(self.checkpoint_root)}"
        )

    def reward_server_stats(self, during: str) -> dict[str, float]:
        """reward_server/...: mean requests per batched call and the servers' busy fraction ({} without Ray)."""
        if not self.reward_servers:
            return {}
        import ray

        try:
            stats = ray.get([s.stats.remote() for s in self.reward_servers])
        except ray.exceptions.RayActorError:
            self.check_reward_servers(during)  # ActorCrashed naming the dead one, or counts its restart
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

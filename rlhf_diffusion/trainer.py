"""The driver loop: schedule rollouts, train, publish weights, log, checkpoint (docs/architecture.md, "The shape":
one driver controls every actor).

    Trainer(config).fit()                    samplers, reward servers and the learner as Ray actors
    Trainer(config, use_ray=False).fit()     the same loop with the same classes in this process
    LocalTrainer(config)                     = use_ray=False, plus handles on the model for tests

One iteration i: the prompts of i (a pure function of seed and i) are split into one shard per sampler; each
sampler samples its shard with weights version v(i) = max(0, i − max_staleness) and a seed derived from
(seed, i, shard); the learner trains on the joined batch (version i → i + 1) and publishes the new weights through
the object store. With `train.max_staleness = s >= 1` the rollouts of iterations i+1 .. i+s are already queued on
the samplers while the learner trains on i, so sampling and training overlap; every batch is trained at staleness
exactly min(i, s). Because the schedule and every random draw are fixed by (seed, iteration, shard), a shard redone
after a sampler crash, or an iteration redone after a resume, produces the same data: a faulted or resumed run
ends with the same LoRA as an uninterrupted one.

Faults: a sampler or reward server that dies is restarted by Ray (`resources.max_actor_restarts`); the driver redoes
the dead sampler's shard (a reward call in flight is retried by Ray on the restarted server). A learner that dies
ends the run with `LearnerCrashed`, which names the checkpoint to resume from.

Evaluation passes (fixed prompts and seeds) run before training, every `tracking.image_grid_every` (with an image
grid) and `guards.every` iterations, and at the end; each scores the same images with the training rewards
(eval/...) and the held-out rewards (heldout/..., `guards.heldout_rewards`). `guards.early_stop` ends the run
cleanly after a pass whose held-out reward fell too far below its value before training (`EarlyStopGuard`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rlhf_diffusion.algorithms import RolloutBatch, RolloutContext
from rlhf_diffusion.checkpoint import (
    LORA_FILE,
    CheckpointState,
    latest_checkpoint,
    load_checkpoint,
    load_resumable,
    save_checkpoint,
)
from rlhf_diffusion.config import RunConfig, flatten_config
from rlhf_diffusion.evaluation import (
    EvalResult,
    EvalShard,
    eval_grid_row,
    eval_metrics,
    merge_shards,
    paired_heldout,
    save_grid,
)
from rlhf_diffusion.guards import EarlyStop, EarlyStopGuard, relative_drop
from rlhf_diffusion.models.conditioning import TextConditioning
from rlhf_diffusion.models.loading import UNET_EXPORT_DIR
from rlhf_diffusion.prompts import load_prompts
from rlhf_diffusion.rewards.base import WeightedReward
from rlhf_diffusion.run_dir import check_run_dir, clear_run_dir, lock_run_dir
from rlhf_diffusion.tracking import NullTracker, build_tracker
from rlhf_diffusion.workers.learner import GroupRef, Learner, LearnerGroup
from rlhf_diffusion.workers.messages import (
    ROLLOUT_STREAM,
    PublishedWeights,
    RolloutRequest,
    TrainResult,
    derive_seed,
    prompts_for_iteration,
)
from rlhf_diffusion.workers.policy import load_policy, resolve_device, resolve_model_source
from rlhf_diffusion.workers.reward_server import RewardServer, build_heldout_reward
from rlhf_diffusion.workers.sampler import Sampler

__all__ = [
    "EarlyStop",
    "EarlyStopGuard",
    "EvalResult",
    "LearnerCrashed",
    "LocalTrainer",
    "RunResult",
    "Trainer",
    "resolve_device",
    "resolve_model_source",
    "relative_drop",
    "save_grid",
]

# Settings of resume that may differ from the checkpoint's config (everything else must match). The guards only
# watch the run (they never change what is trained), so they may change too, e.g. a looser early stop.
RESUMABLE_CHANGES = ("train.iterations", "tracking.", "checkpoint.", "resources.", "guards.")


class LearnerCrashed(RuntimeError):
    """The learner actor died; the message names the checkpoint to resume from."""


class ResumeError(RuntimeError):
    """`--resume` was asked for but there is nothing (compatible) to resume."""


@dataclass
class RunResult:
    """What `Trainer.fit` returns."""

    run_dir: Path
    eval_before: EvalResult | None
    eval_after: EvalResult
    history: list[dict[str, float]] = field(default_factory=list)
    lora_file: Path | None = None
    unet_dir: Path | None = None  # model.finetune: full — the diffusers UNet directory instead of a LoRA file
    mlflow_run_id: str | None = None
    faults: dict[str, int] = field(default_factory=dict)
    early_stop: EarlyStop | None = None  # set when guards.early_stop ended the run before train.iterations
    paired: dict[str, dict[str, float]] = field(default_factory=dict)  # eval.json "paired" (`paired_heldout`)


# ---------------------------------------------------------------------------------------------------------------
# Backends: the same calls on Ray actors or on objects in this process
# ---------------------------------------------------------------------------------------------------------------


class _Done:
    """An already computed result, shaped like an ObjectRef for `_get`."""

    def __init__(self, value: Any = None, error: BaseException | None = None):
        self.value, self.error = value, error


class _LocalMethod:
    def __init__(self, method: Callable):
        self.method = method

    def remote(self, *args, **kwargs) -> _Done:
        try:
            return _Done(self.method(*args, **kwargs))
        except Exception as error:  # raised at _get, as Ray would
            return _Done(error=error)


class LocalHandle:
    """Calls an object's methods in this process with the call shape of a Ray actor handle (`h.m.remote(...)`)."""

    def __init__(self, obj: Any):
        self.obj = obj

    def __getattr__(self, name: str) -> _LocalMethod:
        return _LocalMethod(getattr(self.obj, name))


def _get(ref: Any) -> Any:
    if isinstance(ref, _Done):
        if ref.error is not None:
            raise ref.error
        return ref.value
    if isinstance(ref, GroupRef):  # a call on every rank of a LearnerGroup
        return ref.get()
    import ray

    return ray.get(ref)


def _actor_died(error: BaseException) -> bool:
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


# ---------------------------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------------------------


class Trainer:
    """Owns the control flow of one run.

    Args:
        config: the validated run config.
        use_ray: actors on the Ray cluster this process is connected to (`ray.init` must have run), or objects in
            this process.
        resume: continue from the run directory's newest complete checkpoint (chosen, checked against the config
            and train.iterations here, before any model loads: `ResumeError`, `CheckpointError`).
        overwrite: replace the run the run directory holds (its outputs are removed when `fit` starts). Without
            `resume` or `overwrite`, `fit` refuses a run directory that already holds a run (`RunDirError`).
        log: where progress lines go.
        progress: show a tqdm progress bar (iteration, reward, loss, images/s).
        on_event: `(event, trainer, iteration)` callback at "rollouts_submitted" and "iteration_done" (tests use
            it to inject faults at a deterministic point).
    """

    def __init__(
        self,
        config: RunConfig,
        *,
        use_ray: bool = True,
        resume: bool = False,
        overwrite: bool = False,
        log: Callable[[str], None] = print,
        progress: bool = False,
        on_event: Callable[[str, Trainer, int], None] | None = None,
    ):
        if resume and overwrite:
            raise ValueError("resume and overwrite exclude each other: continue the run or replace it")
        self.config = config
        self.use_ray = use_ray
        self.resume = resume
        self.overwrite = overwrite
        self.log = log
        self.progress = progress
        self.on_event = on_event or (lambda *_: None)
        self.run_dir = Path(config.run_dir)
        self.checkpoint_root = self.run_dir / "checkpoints"
        self.source = resolve_model_source(config.model.pretrained, config.output_dir)
        self.train_prompts = load_prompts(config.prompts.train)
        self.eval_prompts = load_prompts(config.prompts.eval or config.prompts.train)
        self.faults = {"sampler_restarts": 0, "shards_redone": 0}
        self.reward_servers: list = []
        self.heldout_before: dict[str, float] = {}  # held-out reward means before training (the early stop's base)
        self.guard: EarlyStopGuard | None = None
        self.stop: EarlyStop | None = None
        self.resume_from: tuple[Path, CheckpointState] | None = self._resume_point() if resume else None
        if use_ray:
            self._start_actors()
        else:
            self._start_local()

    # -- actors ----------------------------------------------------------------------------------------------------

    def _start_local(self) -> None:
        config = self.config
        if config.resources.num_learners > 1:
            raise ValueError(
                f"resources.num_learners={config.resources.num_learners} needs Ray (data-parallel "
                "learner actors); set it to 1 to run in one process"
            )
        device = resolve_device(config.device)
        model = load_policy(config, self.source, device, for_training=True)
        self.reward = WeightedReward.from_specs(config.rewards, device=device)
        self.heldout_reward = build_heldout_reward(config.guards.heldout_rewards, device=device)
        self.learner_obj = Learner(config, self.source, model=model)
        # Strictly on-policy samplers share the learner's UNet; a pipelined schedule samples with older weights,
        # so each sampler then holds its own copy.
        share = config.train.max_staleness == 0
        self.sampler_objs = [
            Sampler(
                config,
                self.source,
                rank=i,
                model=model if share else load_policy(config, self.source, device),
                reward=self.reward,
                heldout_reward=self.heldout_reward,
            )
            for i in range(config.resources.num_samplers)
        ]
        self.learner = LocalHandle(self.learner_obj)
        self.samplers = [LocalHandle(s) for s in self.sampler_objs]

    def _start_actors(self) -> None:
        import ray

        config, res = self.config, self.config.resources
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
        self.reward_servers = [
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
        self.samplers = [
            sampler_cls.options(
                num_cpus=res.cpus_per_actor, num_gpus=res.sampler_gpus, max_restarts=restarts, max_task_retries=0
            ).remote(config, self.source, rank=i, reward_servers=self.reward_servers, num_threads=threads)
            for i in range(res.num_samplers)
        ]
        learner_cls = ray.remote(Learner).options(
            num_cpus=res.cpus_per_actor, num_gpus=res.learner_gpus, max_restarts=0
        )
        if res.num_learners == 1:
            self.learner = learner_cls.remote(config, self.source, num_threads=threads)
            learner_ready = [self.learner.ready.remote()]
        else:
            try:
                self.learner = LearnerGroup(
                    learner_cls,
                    config,
                    self.source,
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
            "reward server": [s.ready.remote() for s in self.reward_servers],
            "sampler": [s.ready.remote() for s in self.samplers],
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

    def shutdown(self) -> None:
        """Kills the actors this trainer started (Ray) — the cluster itself is left running."""
        if not self.use_ray:
            return
        import ray

        learners = self.learner.actors if isinstance(self.learner, LearnerGroup) else [self.learner]
        for actor in [*self.samplers, *self.reward_servers, *learners]:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:  # already dead
                pass

    # -- calls -------------------------------------------------------------------------------------------------------

    def _publish(self) -> PublishedWeights:
        return _get(self.learner.publish.remote() if self.use_ray else self.learner.weights.remote())

    def _learner_call(self, iteration: int, method: str, *args) -> Any:
        try:
            return _get(getattr(self.learner, method).remote(*args))
        except Exception as error:
            if not _actor_died(error):
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

    def shard_requests(self, iteration: int, weights: PublishedWeights) -> list[RolloutRequest]:
        """The rollout requests of `iteration`, one per sampler."""
        b = self.config.sampling.batch_size
        prompts = prompts_for_iteration(self.train_prompts, self.config.seed, iteration, b * len(self.samplers))
        return [
            RolloutRequest(
                iteration=iteration,
                shard=k,
                prompts=prompts[k * b : (k + 1) * b],
                seed=derive_seed(self.config.seed, ROLLOUT_STREAM, iteration, k),
                weights=weights,
            )
            for k in range(len(self.samplers))
        ]

    def _submit(self, iteration: int, weights: PublishedWeights) -> list[tuple[RolloutRequest, Any]]:
        return [(req, self.samplers[req.shard].rollout.remote(req)) for req in self.shard_requests(iteration, weights)]

    def _gather(self, iteration: int, entries: list[tuple[RolloutRequest, Any]]) -> RolloutBatch:
        """Waits for the shards of `iteration` in shard order; a shard whose sampler died is redone (same request,
        same seed) on the restarted actor."""
        shards = []
        for request, ref in entries:
            shards.append(
                self._sampler_result(
                    request.shard,
                    ref,
                    lambda r=request: self.samplers[r.shard].rollout.remote(r),
                    f"iteration {iteration}; the shard is redone with the same seed and weights version "
                    f"{request.weights.version}",
                )
            )
        return RolloutBatch.concat(shards)

    def _sampler_result(self, rank: int, ref: Any, resubmit: Callable[[], Any], what: str) -> Any:
        """The result of a sampler call; when the sampler died, waits for Ray to restart it and calls again
        (sampler calls are pure functions of their arguments, so a repeat returns the same result)."""
        retries = self.config.resources.max_actor_restarts
        for attempt in range(retries + 1):
            try:
                return _get(ref)
            except Exception as error:
                if not _actor_died(error):
                    raise
                if attempt == retries:
                    raise RuntimeError(
                        f"sampler {rank} kept dying ({retries} restarts, "
                        f"resources.max_actor_restarts) during {what}: {error}"
                    ) from None
                self.faults["shards_redone"] += 1
                self.log(f"[fault] sampler {rank} died during {what}")
                self._wait_until_restarted(self.samplers[rank], f"sampler {rank}")
                ref = resubmit()
        raise AssertionError("unreachable")

    def _wait_until_restarted(self, actor: Any, role: str) -> None:
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

    def evaluate(self, weights: PublishedWeights) -> EvalResult:
        """Held-out rewards with `weights`: eval prompts dealt round-robin to the samplers, fixed seeds."""
        n = len(self.samplers)
        seeds = self.config.prompts.eval_seeds
        calls = []
        for k in range(n):
            idx = list(range(k, len(self.eval_prompts), n))
            if idx:

                def call(k=k, idx=idx):
                    return self.samplers[k].evaluate.remote([self.eval_prompts[j] for j in idx], idx, seeds, weights)

                calls.append((k, call(), call))
        shards: list[EvalShard] = [self._sampler_result(k, ref, call, "evaluation") for k, ref, call in calls]
        return merge_shards(shards, seeds)

    def _start_guard(self, strikes: int = 0) -> None:
        """Sets up `guards.early_stop` from the held-out values before training (`self.heldout_before`)."""
        early_stop = self.config.guards.early_stop
        if early_stop is not None:
            self.guard = EarlyStopGuard(early_stop, self.heldout_before[early_stop.reward], strikes)

    # -- checkpoints -------------------------------------------------------------------------------------------------

    def _checkpoint(self, iteration: int, published: dict[int, PublishedWeights], meta: dict[str, Any]) -> Path:
        learner_state = self._learner_call(iteration, "state_dict")
        export = self._learner_call(iteration, "export_files")
        history = {v: w.resolve() for v, w in published.items() if v < learner_state["version"]}
        state = CheckpointState(
            iteration=iteration, learner=learner_state, weights_history=history, meta=meta, export=export
        )
        return save_checkpoint(self.checkpoint_root, state, keep_last=self.config.checkpoint.keep_last)

    def _copy_export(self, checkpoint: Path) -> Path:
        """Copies the checkpoint's `lora/` or `unet/` directory to the run directory (file by file, each through
        a temporary name and `os.replace`) and returns the run's copy."""
        source = next(checkpoint / name for name in ("lora", UNET_EXPORT_DIR) if (checkpoint / name).is_dir())
        target = self.run_dir / source.name
        target.mkdir(parents=True, exist_ok=True)
        for path in sorted(source.iterdir()):
            tmp = target / f".{path.name}.tmp"
            shutil.copyfile(path, tmp)
            os.replace(tmp, target / path.name)
        return target

    def _resume_point(self) -> tuple[Path, CheckpointState]:
        """The checkpoint a resume starts from (`load_resumable`: the newest complete one), checked against the
        config and train.iterations."""
        found = load_resumable(self.checkpoint_root, log=self.log)
        if found is None:
            raise ResumeError(f"--resume: no checkpoint under {self.checkpoint_root}")
        path, state = found
        self._check_resumable(state.meta)
        self._check_iterations(self.config.train.iterations, state.iteration, path)
        return path, state

    def _check_iterations(self, iterations: int, done: int, path: Path) -> None:
        if iterations < done:
            raise ResumeError(
                f"cannot resume {self.run_dir}: train.iterations={iterations} is below the {done} "
                f"iterations already done (checkpoint {path}); set train.iterations to {done} or more"
            )

    def _check_resumable(self, saved: dict[str, Any]) -> None:
        ours = flatten_config(self.config)
        theirs = saved.get("config", {})
        changed = sorted(
            k
            for k in set(ours) | set(theirs)
            if ours.get(k) != theirs.get(k) and not any(k == p or k.startswith(p) for p in RESUMABLE_CHANGES)
        )
        if changed:
            raise ResumeError(
                f"cannot resume {self.run_dir}: the config differs from the checkpoint's in "
                f"{', '.join(changed)} (only {', '.join(RESUMABLE_CHANGES)} may change)"
            )

    # -- the loop ----------------------------------------------------------------------------------------------------

    def fit(self, iterations: int | None = None) -> RunResult:
        """Runs (or resumes) the loop; writes metrics.jsonl, eval.json, grids, checkpoints and lora/ under the run
        directory and logs the same to MLflow.

        Holds the run directory's lock throughout (`run_dir.lock_run_dir`: `RunDirBusy` when another process writes
        it); refuses a fresh run into a directory that holds one (`RunDirError`) unless `resume` or `overwrite`."""
        lock = lock_run_dir(self.run_dir)  # one writer per run directory (re-entrant: launch holds it already)
        try:
            check_run_dir(self.run_dir, resume=self.resume, overwrite=self.overwrite)
            if self.overwrite:
                removed = clear_run_dir(self.run_dir)
                if removed:
                    self.log(f"[overwrite] removed the earlier run's {', '.join(removed)} from {self.run_dir}")
            return self._fit(iterations or self.config.train.iterations)
        finally:
            lock.release()

    def _fit(self, iterations: int) -> RunResult:
        config = self.config
        staleness = config.train.max_staleness
        start_iteration, mlflow_run_id, eval_before_summary = 0, None, None
        published: dict[int, PublishedWeights] = {}
        self.stop = None
        if self.resume:
            if self.resume_from is None:  # fit() again: the state was released after the first
                self.resume_from = self._resume_point()
            path, state = self.resume_from
            self.resume_from = None  # the learner holds it from here on
            self._check_iterations(iterations, state.iteration, path)
            eval_before_summary = state.meta.get("eval_before")
            self._restore_guard(state.meta)
            version = self._learner_call(state.iteration, "load_state_dict", state.learner)
            start_iteration = state.iteration
            mlflow_run_id = state.meta.get("mlflow_run_id")
            published = {v: PublishedWeights(version=v, state=w) for v, w in state.weights_history.items()}
            if self.use_ray:
                import ray

                published = {v: PublishedWeights(version=v, ref=[ray.put(w.state)]) for v, w in published.items()}
            published[version] = self._publish()
            self.log(f"[resume] from {path}: iteration {start_iteration}, weights version {version}")
            self._truncate_metrics(start_iteration)
        tracker = build_tracker(config, mlflow_run_id) if config.tracking.enabled else NullTracker()
        eval_before = None
        try:
            if not self.resume:
                published[0] = self._publish()
                eval_before = self.evaluate(published[0])
                eval_before_summary = eval_before.summary()
                self.heldout_before = dict(eval_before.heldout)
                self._start_guard()
                save_grid(
                    eval_before.images, self.run_dir / "grid_before.png", nrow=eval_grid_row(config.prompts.eval_seeds)
                )
                tracker.log_artifact(self.run_dir / "grid_before.png", "grids")
                tracker.log_metrics(eval_metrics(eval_before, self.guard), step=0)
                self.log(
                    f"[eval] before training: reward {eval_before.mean:.4f}"
                    + "".join(f", held-out {k} {v:.4f}" for k, v in eval_before.heldout.items())
                )
            meta = {
                "seed": config.seed,
                "config": flatten_config(config),
                "mlflow_run_id": tracker.run_id,
                "eval_before": eval_before_summary,
            }
            history = self._loop(start_iteration, iterations, staleness, published, tracker, meta)
            done = self.stop.iteration if self.stop is not None else iterations
            final = published[max(published)]  # = weights version `done`
            eval_after = self.stop.evaluation if self.stop is not None else self.evaluate(final)
            self.log(
                f"[eval] after {done} iterations: reward {eval_after.mean:.4f}"
                + (f" (before {eval_before_summary['mean']:.4f})" if eval_before_summary else "")
                + "".join(f", held-out {k} {v:.4f}" for k, v in eval_after.heldout.items())
            )
            save_grid(eval_after.images, self.run_dir / "grid_after.png", nrow=eval_grid_row(config.prompts.eval_seeds))
            if done % max(config.checkpoint.every, 1) != 0 or config.checkpoint.every == 0:
                self._checkpoint(
                    done, {v: w for v, w in published.items() if v >= done - staleness}, self._checkpoint_meta(meta)
                )
            # The newest checkpoint now holds the final weights (written in the loop or just above): its
            # diffusers-format export (lora/ or unet/) becomes the run's, without a second export by the learner.
            export_dir = self._copy_export(latest_checkpoint(self.checkpoint_root))
            lora_file = export_dir / LORA_FILE if export_dir.name == "lora" else None
            summary = self._summary(eval_before_summary, eval_after, done, iterations, tracker.run_id)
            (self.run_dir / "eval.json").write_text(json.dumps(summary, indent=2))
            if self.stop is None:  # an early stop's pass was logged at its iteration, in the loop
                tracker.log_metrics(eval_metrics(eval_after, self.guard), step=done)
                if self.resume:  # the run went on past an earlier early stop
                    tracker.clear_tag("early_stop")
                    tracker.clear_tag("early_stop_iteration")
            else:
                tracker.set_tag("early_stop", self.stop.reason)
                tracker.set_tag("early_stop_iteration", str(done))
            tracker.log_artifact(self.run_dir / "grid_after.png", "grids")
            for path in sorted(export_dir.iterdir()):
                tracker.log_artifact(path, export_dir.name)
            tracker.log_dict(summary, "eval.json")
            tracker.end("FINISHED")
        except BaseException:
            tracker.end("FAILED")
            raise
        return RunResult(
            run_dir=self.run_dir,
            eval_before=eval_before,
            eval_after=eval_after,
            history=history,
            lora_file=lora_file,
            unet_dir=None if lora_file else export_dir,
            mlflow_run_id=tracker.run_id,
            faults=dict(self.faults),
            early_stop=self.stop,
            paired=summary["paired"],
        )

    def _summary(
        self,
        eval_before: dict[str, Any] | None,
        eval_after: EvalResult,
        done: int,
        planned: int,
        mlflow_run_id: str | None,
    ) -> dict[str, Any]:
        """eval.json: the evaluation before (a summary, kept across resumes) and after, per reward and held-out
        reward; iterations done and planned; whether and why guards.early_stop ended the run."""
        heldout = bool(self.config.guards.heldout_rewards)
        return {
            "eval_before": eval_before["mean"] if eval_before else None,
            "eval_after": eval_after.mean,
            "per_reward_before": eval_before["per_reward"] if eval_before else None,
            "per_reward_after": eval_after.per_reward,
            "heldout_before": self.heldout_before if heldout else None,
            "heldout_after": eval_after.heldout if heldout else None,
            "iterations": done,
            "iterations_planned": planned,
            "stopped_early": self.stop is not None,
            "stop_reason": self.stop.reason if self.stop is not None else None,
            # per reward: mean before/after, paired SE, images fixed/broken (0/1 scores) with a sign test
            "paired": paired_heldout(eval_before, eval_after),
            "algorithm": self.config.algorithm.name,
            "faults": self.faults,
            "mlflow_run_id": mlflow_run_id,
        }

    def _restore_guard(self, meta: dict[str, Any]) -> None:
        """On resume: the held-out values before training and the early stop's count, from the checkpoint."""
        self.heldout_before = dict((meta.get("eval_before") or {}).get("heldout") or {})
        early_stop = self.config.guards.early_stop
        if early_stop is not None and early_stop.reward not in self.heldout_before:
            raise ResumeError(
                f"cannot resume {self.run_dir} with guards.early_stop.reward {early_stop.reward!r}: "
                "the checkpoint holds no value of it before training (it was not a held-out reward "
                "when the run started)"
            )
        self._start_guard(int(meta.get("early_stop_strikes", 0)))

    def _checkpoint_meta(self, meta: dict[str, Any]) -> dict[str, Any]:
        """`meta` plus what changes during the run: fault counters and the early stop's consecutive count."""
        return {
            **meta,
            "faults": dict(self.faults),
            "early_stop_strikes": self.guard.strikes if self.guard is not None else 0,
        }

    def _evaluation_due(self, step: int, iterations: int) -> tuple[bool, bool]:
        """(an evaluation pass runs after iteration `step`, it writes an image grid). The pass after the last
        iteration is the final evaluation, run by `fit`."""
        grid_every, guard_every = self.config.tracking.image_grid_every, self.config.guards.every
        grid = bool(grid_every) and step % grid_every == 0
        due = (grid or (bool(guard_every) and step % guard_every == 0)) and step < iterations
        return due, grid

    def _truncate_metrics(self, iteration: int) -> None:
        path = self.run_dir / "metrics.jsonl"
        if path.exists():
            keep = [
                line
                for line in path.read_text().splitlines()
                if line.strip() and json.loads(line)["iteration"] <= iteration
            ]
            path.write_text("".join(line + "\n" for line in keep))

    def _loop(
        self,
        start: int,
        iterations: int,
        staleness: int,
        published: dict[int, PublishedWeights],
        tracker,
        meta: dict[str, Any],
    ) -> list[dict[str, float]]:
        config = self.config
        history: list[dict[str, float]] = []
        in_flight: dict[int, list] = {}
        next_submit = start
        bar = None
        if self.progress:
            from tqdm import tqdm

            bar = tqdm(total=iterations, initial=start, desc=config.run_name, unit="it", dynamic_ncols=True)
        wall_start = time.perf_counter()
        busy = {"sampler": 0.0, "learner": 0.0}
        with open(self.run_dir / "metrics.jsonl", "a") as metrics_file:
            for it in range(start, iterations):
                t0 = time.perf_counter()
                while next_submit < iterations and next_submit <= it + staleness:
                    in_flight[next_submit] = self._submit(next_submit, published[max(0, next_submit - staleness)])
                    next_submit += 1
                self.on_event("rollouts_submitted", self, it)
                batch = self._gather(it, in_flight.pop(it))
                t_sampled = time.perf_counter()
                result: TrainResult = self._learner_call(it, "train", batch, it)
                published[result.version] = self._publish()
                for version in [v for v in published if v < it + 1 - staleness]:
                    del published[version]
                elapsed = time.perf_counter() - t0
                images = int(batch.rewards.numel())
                busy["sampler"] += batch.metrics.get("rollout_seconds", 0.0)
                busy["learner"] += result.metrics.get("train_seconds", 0.0)
                wall = time.perf_counter() - wall_start
                record = {
                    "iteration": float(it + 1),
                    "weights_version": float(result.version),
                    **(
                        {
                            "reward_mean": batch.rewards.mean().item(),  # absent for offline-only batches
                            "reward_std": batch.rewards.std().item() if batch.rewards.numel() > 1 else 0.0,
                        }
                        if batch.rewards.numel()
                        else {}
                    ),
                    **{f"reward/{name}_mean": v.mean().item() for name, v in batch.per_reward.items() if v.numel()},
                    **{
                        f"reward/{name}_std": (v.std().item() if v.numel() > 1 else 0.0)
                        for name, v in batch.per_reward.items()
                        if v.numel()
                    },
                    "images_per_second": images / max(elapsed, 1e-9),
                    "wait_for_rollouts_seconds": t_sampled - t0,
                    "seconds": elapsed,
                    "sampler_busy_fraction": busy["sampler"] / max(wall * len(self.samplers), 1e-9),
                    "learner_busy_fraction": busy["learner"] / max(wall, 1e-9),
                    "dropped": float(result.dropped),
                    **{f"faults/{k}": float(v) for k, v in self.faults.items()},
                    **{f"rollout/{k}": v for k, v in batch.metrics.items()},
                    **{f"train/{k}": v for k, v in result.metrics.items()},
                }
                record.update(result.diagnostics)  # kl/... (guards.log_kl), signal/... (train.signal_every)
                if self.use_ray and self.reward_servers and (it + 1) % config.tracking.log_every == 0:
                    record.update(self._reward_server_stats())
                evaluated, evaluated_metrics = self._evaluate_in_loop(
                    it + 1, iterations, published[result.version], tracker
                )
                history.append({**record, **evaluated_metrics})
                metrics_file.write(json.dumps({**record, **evaluated_metrics}) + "\n")
                metrics_file.flush()
                if (it + 1) % config.tracking.log_every == 0:
                    tracker.log_metrics(record, step=it + 1)  # eval/ and heldout/ went at the evaluation
                loss = result.metrics.get("loss", float("nan"))
                signal = record.get("signal/coherence")  # train.signal_every: ≈ 0 = the gradient is noise
                signal_text = "" if signal is None else f" coherence {signal:+.3f}"
                line = (
                    f"[iter {it + 1:4d}] reward {record.get('reward_mean', float('nan')):.4f} loss {loss:.4f}"
                    f"{signal_text} staleness {int(result.metrics.get('staleness', 0))} "
                    f"{record['images_per_second']:.2f} img/s"
                )
                if bar is not None:
                    bar.set_postfix(
                        reward=f"{record.get('reward_mean', float('nan')):.4f}",
                        loss=f"{loss:.4f}",
                        **({} if signal is None else {"coh": f"{signal:+.3f}"}),
                        img_s=f"{record['images_per_second']:.2f}",
                    )
                    bar.update(1)
                else:
                    self.log(line)
                if evaluated is not None and self.guard is not None:
                    reason = self.guard.check(evaluated.heldout)
                    if reason is not None:
                        self.stop = EarlyStop(iteration=it + 1, reason=reason, evaluation=evaluated)
                        self.log(f"[guards] early stop after iteration {it + 1}: {reason}")
                if config.checkpoint.every and (it + 1) % config.checkpoint.every == 0:
                    path = self._checkpoint(it + 1, published, self._checkpoint_meta(meta))
                    self.log(f"[checkpoint] {path}")
                self.on_event("iteration_done", self, it)
                if self.stop is not None:
                    break
        if bar is not None:
            bar.close()
        return history

    def _evaluate_in_loop(
        self, step: int, iterations: int, weights: PublishedWeights, tracker
    ) -> tuple[EvalResult | None, dict[str, float]]:
        """The evaluation pass after iteration `step`, if one is due: writes its image grid (every
        tracking.image_grid_every) and logs its metrics; returns (the evaluation or None, its metrics)."""
        due, grid_due = self._evaluation_due(step, iterations)
        if not due:
            return None, {}
        ev = self.evaluate(weights)
        if grid_due:
            grid = self.run_dir / "grids" / f"iter_{step:06d}.png"
            save_grid(ev.images, grid, nrow=eval_grid_row(self.config.prompts.eval_seeds))
            tracker.log_artifact(grid, "grids")
        metrics = eval_metrics(ev, self.guard)
        tracker.log_metrics(metrics, step=step)
        return ev, metrics

    def _reward_server_stats(self) -> dict[str, float]:
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

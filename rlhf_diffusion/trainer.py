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

Faults (`actors.Actors`): a sampler or reward server that dies is restarted by Ray (`resources.max_actor_restarts`);
the dead sampler's shard is redone (a reward call in flight is retried by Ray on the restarted server); each restart
is counted once (faults/sampler_restarts, faults/reward_server_restarts). One that Ray does not restart, or a
learner that dies, ends the run with `ActorCrashed` (`LearnerCrashed`), which names the actor and the checkpoint to
resume from (`resume.py`). Iterations count from 1 in every message, as in metrics.jsonl and the progress bar.

Evaluation passes (`evaluation.py`: fixed prompts and seeds) run before training, every
`tracking.image_grid_every` (with an image grid) and `guards.every` iterations, and at the end; each scores the
same images with the training rewards (eval/...) and the held-out rewards (heldout/..., `guards.heldout_rewards`).
`guards.early_stop` ends the run cleanly after a pass whose held-out reward fell too far below its value before
training (`guards.EarlyStopGuard`). What the run reports: `results.py`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rlhf_diffusion.actors import ActorCrashed, Actors, LearnerCrashed, required_resources
from rlhf_diffusion.batches import PublishedWeights, TrainResult
from rlhf_diffusion.checkpoint import LORA_FILE, CheckpointState, latest_checkpoint
from rlhf_diffusion.config import RunConfig, flatten_config
from rlhf_diffusion.evaluation import (
    EvalResult,
    eval_grid_row,
    eval_line,
    eval_metrics,
    evaluation_due,
    merge_shards,
    save_grid,
)
from rlhf_diffusion.guards import EarlyStop, EarlyStopGuard, early_stop_guard, relative_drop
from rlhf_diffusion.prompts import load_prompts
from rlhf_diffusion.results import Progress, RunResult, iteration_record, run_summary, write_results
from rlhf_diffusion.resume import (
    ResumeError,
    check_iterations,
    copy_export,
    heldout_before,
    resume_point,
    truncate_metrics,
    write_checkpoint,
)
from rlhf_diffusion.run_dir import check_run_dir, clear_run_dir, lock_run_dir
from rlhf_diffusion.seeding import rollout_requests
from rlhf_diffusion.tracking import NullTracker, build_tracker
from rlhf_diffusion.workers.policy import resolve_device, resolve_model_source

# Re-exported: the names tests, benchmarks and launch import from here (and LocalTrainer, lazily: `__getattr__`).
__all__ = [
    "ActorCrashed",
    "EarlyStop",
    "EarlyStopGuard",
    "EvalResult",
    "LearnerCrashed",
    "ResumeError",
    "RunResult",
    "Trainer",
    "eval_grid_row",
    "relative_drop",
    "required_resources",
    "resolve_device",
    "resolve_model_source",
    "save_grid",
]


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
        self.heldout_before: dict[str, float] = {}  # held-out reward means before training (the early stop's base)
        self.guard: EarlyStopGuard | None = None
        self.stop: EarlyStop | None = None
        self.resume_from: tuple[Path, CheckpointState] | None = (
            resume_point(config, self.run_dir, self.checkpoint_root, log) if resume else None
        )
        self.actors = Actors(config, self.source, use_ray=use_ray, checkpoint_root=self.checkpoint_root, log=log)

    # -- actors (`actors.Actors`; the objects behind the handles without Ray: `workers.local.LocalWorkers`) --------

    samplers = property(lambda self: self.actors.samplers)
    learner = property(lambda self: self.actors.learner)
    reward_servers = property(lambda self: self.actors.reward_servers)
    faults = property(lambda self: self.actors.faults)
    learner_obj = property(lambda self: self.actors.local.learner_obj)
    sampler_objs = property(lambda self: self.actors.local.sampler_objs)
    reward = property(lambda self: self.actors.local.reward)
    heldout_reward = property(lambda self: self.actors.local.heldout_reward)

    def shutdown(self) -> None:
        """Kills the actors this trainer started (Ray) — the cluster itself is left running."""
        self.actors.shutdown()

    # -- calls -------------------------------------------------------------------------------------------------------

    def evaluate(self, weights: PublishedWeights, during: str = "an evaluation pass") -> EvalResult:
        """Held-out rewards with `weights`: eval prompts dealt round-robin to the samplers, fixed seeds. `during`
        names the pass in fault messages ("the evaluation after iteration 3"). With a moving average of the weights
        (`train.ema_decay`) a trained version is judged by the learner's average instead, as flow_grpo evaluates
        (the learner holds that version: evaluations follow its training)."""
        if self.config.train.ema_decay > 0 and weights.version > 0:
            averaged = self.actors.publish(during, average=True)
            if averaged.version != weights.version:
                raise RuntimeError(
                    f"{during}: the learner holds version {averaged.version}, not {weights.version}, so its moving "
                    "average is not that version's"
                )
            weights = averaged
        seeds = self.config.prompts.eval_seeds
        return merge_shards(self.actors.evaluate(self.eval_prompts, seeds, weights, during), seeds)

    # -- checkpoints -------------------------------------------------------------------------------------------------

    def _checkpoint(self, iteration: int, published: dict[int, PublishedWeights], meta: dict[str, Any]) -> Path:
        return write_checkpoint(self.actors, self.checkpoint_root, iteration, published, meta, self.config)

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
                self.resume_from = resume_point(self.config, self.run_dir, self.checkpoint_root, self.log)
            path, state = self.resume_from
            self.resume_from = None  # the learner holds it from here on
            check_iterations(self.run_dir, iterations, state.iteration, path)
            eval_before_summary = state.meta.get("eval_before")
            self.heldout_before = heldout_before(config, self.run_dir, state.meta)
            self.guard = early_stop_guard(config, self.heldout_before, int(state.meta.get("early_stop_strikes", 0)))
            loading = f"loading the checkpoint {path}"
            version = self.actors.learner_call(loading, "load_state_dict", state.learner)
            start_iteration = state.iteration
            mlflow_run_id = state.meta.get("mlflow_run_id")
            self.actors.restore_faults(state.meta.get("faults"))
            published = self.actors.restore_weights(state.weights_history)
            published[version] = self.actors.publish(loading)
            self.log(
                f"[resume] from {path}: after iteration {start_iteration}, continuing with iteration "
                f"{start_iteration + 1} (weights version {version})"
            )
            truncate_metrics(self.run_dir, start_iteration)
        tracker = (
            build_tracker(config, mlflow_run_id, resume_after=start_iteration if self.resume else None)
            if config.tracking.enabled
            else NullTracker()
        )
        eval_before = None
        try:
            if not self.resume:
                published[0] = self.actors.publish("the start of the run")
                eval_before = self.evaluate(published[0], "the evaluation before training")
                eval_before_summary = eval_before.summary()
                self.heldout_before = dict(eval_before.heldout)
                self.guard = early_stop_guard(config, self.heldout_before)
                save_grid(
                    eval_before.images, self.run_dir / "grid_before.png", nrow=eval_grid_row(config.prompts.eval_seeds)
                )
                tracker.log_artifact(self.run_dir / "grid_before.png", "grids")
                tracker.log_metrics(eval_metrics(eval_before, self.guard), step=0)
                self.log(eval_line("before training", eval_before))
            meta = {
                "seed": config.seed,
                "config": flatten_config(config),
                "mlflow_run_id": tracker.run_id,
                "eval_before": eval_before_summary,
            }
            history = self._loop(start_iteration, iterations, staleness, published, tracker, meta)
            done = self.stop.iteration if self.stop is not None else iterations
            final = published[max(published)]  # = weights version `done`
            eval_after = (
                self.stop.evaluation
                if self.stop is not None
                else self.evaluate(final, f"the evaluation after the last iteration ({done})")
            )
            self.log(eval_line(f"after {done} iterations", eval_after, eval_before_summary))
            save_grid(eval_after.images, self.run_dir / "grid_after.png", nrow=eval_grid_row(config.prompts.eval_seeds))
            if done % max(config.checkpoint.every, 1) != 0 or config.checkpoint.every == 0:
                self._checkpoint(
                    done, {v: w for v, w in published.items() if v >= done - staleness}, self._checkpoint_meta(meta)
                )
            # The newest checkpoint now holds the final weights (written in the loop or just above): its
            # diffusers-format export (lora/ or unet/) becomes the run's, without a second export by the learner.
            export_dir = copy_export(latest_checkpoint(self.checkpoint_root), self.run_dir)
            lora_file = export_dir / LORA_FILE if export_dir.name == "lora" else None
            self.actors.check_reward_servers(f"the end of the run (after iteration {done})")
            summary = run_summary(
                config,
                eval_before_summary,
                eval_after,
                self.heldout_before,
                done,
                iterations,
                self.stop,
                self.faults,
                tracker.run_id,
            )
            write_results(tracker, self.run_dir, summary, eval_metrics(eval_after, self.guard), export_dir, self.resume)
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

    def _checkpoint_meta(self, meta: dict[str, Any]) -> dict[str, Any]:
        """`meta` plus what changes during the run: fault counters and the early stop's consecutive count."""
        return {
            **meta,
            "faults": dict(self.faults),
            "early_stop_strikes": self.guard.strikes if self.guard is not None else 0,
        }

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
        progress = Progress(self.progress, iterations, start, config.run_name, self.log)
        wall_start = time.perf_counter()
        busy = {"sampler": 0.0, "learner": 0.0}
        with open(self.run_dir / "metrics.jsonl", "a") as metrics_file:
            for it in range(start, iterations):
                t0, cpu0 = time.perf_counter(), time.process_time()
                while next_submit < iterations and next_submit <= it + staleness:
                    weights = published[max(0, next_submit - staleness)]
                    shards = rollout_requests(  # one per sampler
                        self.train_prompts,
                        config.seed,
                        next_submit,
                        config.sampling.batch_size,
                        len(self.samplers),
                        weights,
                    )
                    in_flight[next_submit] = self.actors.submit(shards)
                    next_submit += 1
                self.on_event("rollouts_submitted", self, it)
                batch = self.actors.gather(it, in_flight.pop(it))
                t_sampled = time.perf_counter()
                during = f"iteration {it + 1}"  # 1-based, as metrics.jsonl and the progress bar
                result: TrainResult = self.actors.learner_call(during, "train", batch, it)
                published[result.version] = self.actors.publish(during)
                self.actors.check_reward_servers(during)  # counts their restarts (Ray retried their calls)
                for version in [v for v in published if v < it + 1 - staleness]:
                    del published[version]
                elapsed = time.perf_counter() - t0
                busy["sampler"] += batch.metrics.get("rollout_seconds", 0.0)
                busy["learner"] += result.metrics.get("train_seconds", 0.0)
                wall = time.perf_counter() - wall_start
                record = iteration_record(
                    it + 1,
                    batch,
                    result,
                    seconds=elapsed,
                    driver_cpu_seconds=time.process_time() - cpu0,
                    wait_seconds=t_sampled - t0,
                    sampler_busy_fraction=busy["sampler"] / max(wall * len(self.samplers), 1e-9),
                    learner_busy_fraction=busy["learner"] / max(wall, 1e-9),
                    faults=self.faults,
                )
                if (it + 1) % config.tracking.log_every == 0:
                    record.update(self.actors.reward_server_stats(during))  # reward_server/... (Ray)
                evaluated, evaluated_metrics = self._evaluate_in_loop(
                    it + 1, iterations, published[result.version], tracker
                )
                history.append({**record, **evaluated_metrics})
                metrics_file.write(json.dumps({**record, **evaluated_metrics}) + "\n")
                metrics_file.flush()
                if (it + 1) % config.tracking.log_every == 0:
                    tracker.log_metrics(record, step=it + 1)  # eval/ and heldout/ went at the evaluation
                progress.update(it + 1, record, result)
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
        progress.close()
        return history

    def _evaluate_in_loop(
        self, step: int, iterations: int, weights: PublishedWeights, tracker
    ) -> tuple[EvalResult | None, dict[str, float]]:
        """The evaluation pass after iteration `step`, if one is due: writes its image grid (every
        tracking.image_grid_every) and logs its metrics; returns (the evaluation or None, its metrics)."""
        due, grid_due = evaluation_due(self.config, step, iterations)
        if not due:
            return None, {}
        ev = self.evaluate(weights, f"the evaluation after iteration {step}")
        if grid_due:
            grid = self.run_dir / "grids" / f"iter_{step:06d}.png"
            save_grid(ev.images, grid, nrow=eval_grid_row(self.config.prompts.eval_seeds))
            tracker.log_artifact(grid, "grids")
        metrics = eval_metrics(ev, self.guard)
        tracker.log_metrics(metrics, step=step)
        return ev, metrics


def __getattr__(name: str):
    # LocalTrainer subclasses Trainer, so its module imports this one: re-exported lazily.
    if name == "LocalTrainer":
        from rlhf_diffusion.local_trainer import LocalTrainer

        return LocalTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

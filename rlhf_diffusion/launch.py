"""Command-line entry: `python -m rlhf_diffusion.launch CONFIG.yaml [--set key=value ...] [--resume]`.

Joins the Ray cluster named by RAY_ADDRESS (set by `ray job submit`, or by you for `ray start`-ed clusters) or
starts a local Ray instance, starts the samplers, reward servers and learner the config's `resources` section asks
for, and runs the loop (`trainer.Trainer`): held-out evaluation, training with checkpoints, evaluation again, the
diffusers-format LoRA under `<output_dir>/<run_name>/lora`, everything logged to MLflow.

    ray job submit -- python -m rlhf_diffusion.launch configs/sdxl_dde.yaml
    python -m rlhf_diffusion.launch configs/tiny.yaml                 # local Ray, CPU, minutes
    python -m rlhf_diffusion.launch configs/tiny.yaml --resume        # continue from the last checkpoint
    python -m rlhf_diffusion.launch configs/tiny.yaml --overwrite     # replace the run in runs/tiny
    python -m rlhf_diffusion.launch configs/tiny.yaml --no-ray        # the same loop in one process

One run per run directory: the launcher locks `<output_dir>/<run_name>` (run.lock, `run_dir.lock_run_dir`) before
Ray starts or a model loads, so a second launch into it while this one runs exits with 2; and a fresh launch (no
--resume) into a directory that already holds a run exits with 2 unless --overwrite asks to replace that run.
--resume starts from the newest complete checkpoint, skipping (with one line naming the bad file) any damaged one.

Exit codes: 0 done; 2 a problem with the input (config field, missing file, resources the cluster lacks, nothing
(complete) to resume, train.iterations below the iterations done, a run directory in use or holding another run),
with one message naming it; 1 the run failed: an actor died and was not restarted (the learner, or a sampler or
reward server with resources.max_actor_restarts 0 or used up), in one message naming the actor and the newest
complete checkpoint to continue from with --resume.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

from rlhf_diffusion.config import ConfigError, add_override_option, load_config

ADDRESS_ENV = "RAY_ADDRESS"
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"  # "0": Ray takes loopback as the node address (ray_constants)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rlhf_diffusion.launch", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="run configuration (YAML)")
    add_override_option(parser)
    existing = parser.add_mutually_exclusive_group()
    existing.add_argument(
        "--resume",
        action="store_true",
        help="continue the run from its newest complete checkpoint under <output_dir>/<run_name>/checkpoints",
    )
    existing.add_argument(
        "--overwrite",
        action="store_true",
        help="replace the run <output_dir>/<run_name> holds (its metrics, checkpoints, evaluation "
        "and LoRA are removed first)",
    )
    parser.add_argument("--no-ray", action="store_true", help="run every role in this process (no Ray)")
    parser.add_argument("--no-progress", action="store_true", help="print one line per iteration, no progress bar")
    return parser.parse_args(argv)


def connect_ray(config) -> str:
    """Connects to the cluster in RAY_ADDRESS, or starts a local Ray with enough logical CPUs for the actors.
    Returns a description of what it did."""
    address = os.environ.get(ADDRESS_ENV)
    if not address:
        # A local instance is reached from this machine only, so every Ray server binds loopback: with this set
        # (read when ray is imported) Ray takes 127.0.0.1 as the node's address instead of the machine's network
        # address, and binds its GCS, raylet, workers, dashboard agent and runtime-env agent there.
        os.environ.setdefault(LOCAL_ONLY_ENV, "0")
    import ray

    from rlhf_diffusion.trainer import required_resources

    if address:
        ray.init(address=address, logging_level="WARNING")
        return f"joined the Ray cluster at {address}"
    need = math.ceil(required_resources(config)["CPU"])
    # address="local": a new instance even when a `ray start` cluster runs on this machine (join that one by
    # setting RAY_ADDRESS).
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, need), include_dashboard=False, logging_level="WARNING")
    from rlhf_diffusion.reaper import start_reaper

    start_reaper()  # whatever ends this process, the local instance's processes end with it (reaper.py)
    return "started a local Ray instance (bound to 127.0.0.1)"


def claim_run_dir(config, args: argparse.Namespace):
    """Locks the run directory (`RunDirBusy` if another process writes it) and checks that a fresh launch does not
    land on an earlier run (`RunDirError`); returns the lock."""
    from rlhf_diffusion.run_dir import check_run_dir, lock_run_dir

    lock = lock_run_dir(config.run_dir)
    try:
        check_run_dir(config.run_dir, resume=args.resume, overwrite=args.overwrite)
    except BaseException:
        lock.release()
        raise
    return lock


def describe_paired(paired: dict[str, float] | None) -> str:
    """', paired SE 0.012; 31 images fixed / 9 broken, sign test p = 0.0005' for a `stats.paired_comparison`."""
    if not paired:
        return ""
    up, down = ("fixed", "broken") if "fixed" in paired else ("rose", "fell")
    return (
        f" (Δ {paired['delta']:+.4f}, paired SE {paired['paired_se']:.4f}; {int(paired[up])} images {up} / "
        f"{int(paired[down])} {down} of {int(paired['images'])}, sign test p = {paired['sign_test_p']:.2g})"
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(str(error), file=sys.stderr)
        return 2
    from rlhf_diffusion.run_dir import LOCK_FILE, RunDirError

    created = [d for d in (Path(config.output_dir), Path(config.run_dir)) if not d.exists()]
    try:
        lock = claim_run_dir(config, args)
    except RunDirError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    code = None
    try:
        problem = check_inputs(config)
        if problem:
            print(f"error: {problem}", file=sys.stderr)
            code = 2
        else:
            code = run(config, args)  # 2: refused before training (e.g. --resume with nothing to resume)
        return code
    finally:
        if code == 2:  # the lock file of a run directory this launch created goes while it is still held ...
            for directory in created:
                (directory / LOCK_FILE).unlink(missing_ok=True)
        lock.release()
        if code == 2:  # ... then the directories it created, if empty: never another run's files
            for directory in reversed(created):
                try:
                    directory.rmdir()
                except OSError:
                    pass


def check_inputs(config) -> str | None:
    """What can be checked of the run's inputs before Ray starts or a model loads: the offline data source yields
    a pair (`data.path`), and every custom reward builds and returns one finite score per image on a probe batch.
    Returns the problem, naming the field and file or target, or None."""
    from rlhf_diffusion.models.sources import TINY_MODELS, TINY_PREFIX
    from rlhf_diffusion.workers.policy import flow_method_problem

    source, kind = config.model.pretrained, None
    local = Path(source).expanduser()
    if source in TINY_MODELS:  # a tiny pipeline: its kind is its name, known without building it
        kind = source.removeprefix(TINY_PREFIX)
    elif (local / "model_index.json").is_file():  # a local pipeline: its kind is known without loading it
        from rlhf_diffusion.models.loading import ModelLoadError, pipeline_kind

        try:
            kind = pipeline_kind(str(local))
        except ModelLoadError as error:
            return f"model.pretrained: {error}"
    problem = flow_method_problem(config, kind) if kind is not None else None
    if problem:
        return problem
    if config.data is not None:
        from rlhf_diffusion.data.preference import PreferenceDataError, check_preference_source

        try:
            check_preference_source(config.data)
        except (PreferenceDataError, FileNotFoundError, ValueError) as error:
            return f"data.path: {error}"
    return probe_custom_rewards(config)


def probe_custom_rewards(config) -> str | None:
    """Builds each custom reward (training and held-out) and scores 2 grey images with 2 training prompts: a reward
    that cannot be built, or that returns the wrong shape, a non-float or a non-finite score, fails here instead of
    after the pre-training evaluation. An exception from the reward's own code on the probe is not judged (the
    grey images may not suit it); the run meets it as before."""
    entries = [(f"rewards.{i}", spec) for i, spec in enumerate(config.rewards) if spec.name == "custom"]
    entries += [
        (f"guards.heldout_rewards.{i}", spec)
        for i, spec in enumerate(config.guards.heldout_rewards)
        if spec.name == "custom"
    ]
    if not entries:
        return None
    import torch

    from rlhf_diffusion.prompts import load_prompts
    from rlhf_diffusion.rewards.base import build_spec_reward
    from rlhf_diffusion.rewards.custom import CustomRewardError

    prompts = (load_prompts(config.prompts.train) * 2)[:2]
    size = config.model.resolution or 64
    images = torch.full((2, 3, size, size), 0.5)
    for where, spec in entries:
        try:
            reward = build_spec_reward(spec, where=where)  # the reward factory of the run, one entry
        except CustomRewardError as error:
            return str(error)
        try:
            reward.score(images, prompts)
        except CustomRewardError as error:  # the result contract: shape (B,), floating, finite
            return f"{where}.target: {error} (a probe of 2 grey {size}x{size} images, before the run started)"
        except Exception:  # noqa: BLE001, S112 - the reward's own failure on the probe's images is not a verdict
            continue
    return None


def run(config, args: argparse.Namespace) -> int:
    """Starts Ray (unless --no-ray), builds the trainer, fits and prints the summary; returns the exit code."""
    from rlhf_diffusion.checkpoint import CheckpointError
    from rlhf_diffusion.models.loading import ModelLoadError
    from rlhf_diffusion.run_dir import RunDirError
    from rlhf_diffusion.trainer import ActorCrashed, ResumeError, Trainer

    use_ray = not args.no_ray
    if use_ray:
        try:
            print(f"[launch] {connect_ray(config)}", flush=True)
        except (ConnectionError, RuntimeError, ValueError) as error:
            print(
                f"error: cannot reach the Ray cluster ({ADDRESS_ENV}={os.environ.get(ADDRESS_ENV)}): {error}",
                file=sys.stderr,
            )
            return 2
    trainer = None
    # (exit code, message) of a failed run, printed once Ray has shut down: the actors' output that Ray forwards
    # (progress bars, warnings) arrives late and would otherwise follow the message, which must end the output
    failure: tuple[int, str] | None = None
    try:
        try:
            trainer = Trainer(
                config, use_ray=use_ray, resume=args.resume, overwrite=args.overwrite, progress=not args.no_progress
            )
        except (ModelLoadError, FileNotFoundError, ValueError, RuntimeError) as error:
            failure = (2, str(error))
        else:
            try:
                result = trainer.fit()
            except (ResumeError, CheckpointError, RunDirError) as error:
                failure = (2, str(error))
            except ActorCrashed as error:  # a dead learner, or a sampler or reward server Ray did not restart
                failure = (1, str(error))
    except KeyboardInterrupt:  # Ctrl-C: one line saying where the run can continue from, not a traceback
        from rlhf_diffusion.actors import resume_hint

        failure = (130, f"interrupted (Ctrl-C); {resume_hint(Path(config.run_dir) / 'checkpoints')}")
    finally:
        if trainer is not None:
            trainer.shutdown()
        if use_ray:
            import ray

            ray.shutdown()
    if failure is not None:
        print(f"error: {failure[1]}", file=sys.stderr)
        return failure[0]
    print_summary(config, result)
    return 0


def print_summary(config, result) -> None:
    """What a finished run prints: where its outputs are, the held-out rewards before and after."""
    print(f"run directory: {result.run_dir}")
    if result.eval_before is not None:
        print(
            f"held-out reward: {result.eval_before.mean:.4f} -> {result.eval_after.mean:.4f}"
            + describe_paired(result.paired.get("reward"))
        )
        print(
            f"held-out images before / after: {result.run_dir / 'grid_before.png'}, {result.run_dir / 'grid_after.png'}"
        )
    else:
        print(f"held-out reward after training: {result.eval_after.mean:.4f}")
    for key, value in result.eval_after.heldout.items():
        before = result.eval_before.heldout.get(key) if result.eval_before is not None else None
        print(
            f"held-out {key} (not trained on): "
            + (f"{before:.4f} -> " if before is not None else "")
            + f"{value:.4f}"
            + describe_paired(result.paired.get(key))
        )
    if result.early_stop is not None:
        print(f"stopped early: {result.early_stop.reason}")
    print(f"LoRA (diffusers format): {result.lora_file}")
    if result.mlflow_run_id:
        from rlhf_diffusion.tracking import default_tracking_uri

        uri = config.tracking.tracking_uri or default_tracking_uri(config)
        print(f"MLflow run {result.mlflow_run_id}: mlflow ui --backend-store-uri {uri}")


if __name__ == "__main__":
    sys.exit(main())

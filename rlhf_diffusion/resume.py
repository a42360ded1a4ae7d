"""Checkpoints as the run sees them: which checkpoint a resume continues from and whether it may (the config,
train.iterations, the early stop's base), the run directory's files brought back to it (metrics.jsonl), and the
run's deliverable (lora/ or unet/) copied out of its newest checkpoint. The checkpoint format itself is
`checkpoint.py`; writing one (`write_checkpoint`) asks the learner for its state."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_diffusion.batches import PublishedWeights
from rlhf_diffusion.checkpoint import CheckpointState, load_resumable, save_checkpoint
from rlhf_diffusion.config import RunConfig, flatten_config
from rlhf_diffusion.models.loading import UNET_EXPORT_DIR

if TYPE_CHECKING:
    from rlhf_diffusion.actors import Actors

__all__ = [
    "RESUMABLE_CHANGES",
    "ResumeError",
    "check_iterations",
    "check_resumable",
    "copy_export",
    "heldout_before",
    "resume_point",
    "truncate_metrics",
    "write_checkpoint",
]

# Settings of resume that may differ from the checkpoint's config (everything else must match). The guards only
# watch the run (they never change what is trained), so they may change too, e.g. a looser early stop.
RESUMABLE_CHANGES = ("train.iterations", "tracking.", "checkpoint.", "resources.", "guards.")


class ResumeError(RuntimeError):
    """`--resume` was asked for but there is nothing (compatible) to resume."""


def resume_point(
    config: RunConfig, run_dir: Path, checkpoint_root: Path, log: Callable[[str], None]
) -> tuple[Path, CheckpointState]:
    """The checkpoint a resume starts from (`load_resumable`: the newest complete one), checked against the
    config and train.iterations."""
    found = load_resumable(checkpoint_root, log=log)
    if found is None:
        raise ResumeError(f"--resume: no checkpoint under {checkpoint_root}")
    path, state = found
    check_resumable(config, run_dir, state.meta)
    check_iterations(run_dir, config.train.iterations, state.iteration, path)
    return path, state


def check_iterations(run_dir: Path, iterations: int, done: int, path: Path) -> None:
    """`ResumeError` when `iterations` (planned) is below the `done` of checkpoint `path`."""
    if iterations < done:
        raise ResumeError(
            f"cannot resume {run_dir}: train.iterations={iterations} is below the {done} "
            f"iterations already done (checkpoint {path}); set train.iterations to {done} or more"
        )


def check_resumable(config: RunConfig, run_dir: Path, saved: dict[str, Any]) -> None:
    """`ResumeError` when the config differs from the checkpoint's (`saved` meta) outside `RESUMABLE_CHANGES`."""
    ours = flatten_config(config)
    theirs = saved.get("config", {})
    changed = sorted(
        k
        for k in set(ours) | set(theirs)
        if ours.get(k) != theirs.get(k) and not any(k == p or k.startswith(p) for p in RESUMABLE_CHANGES)
    )
    if changed:
        raise ResumeError(
            f"cannot resume {run_dir}: the config differs from the checkpoint's in "
            f"{', '.join(changed)} (only {', '.join(RESUMABLE_CHANGES)} may change)"
        )


def heldout_before(config: RunConfig, run_dir: Path, meta: dict[str, Any]) -> dict[str, float]:
    """On resume: the held-out reward means before training, from the checkpoint's meta; `ResumeError` when
    guards.early_stop watches a reward the run did not evaluate before training."""
    before = dict((meta.get("eval_before") or {}).get("heldout") or {})
    early_stop = config.guards.early_stop
    if early_stop is not None and early_stop.reward not in before:
        raise ResumeError(
            f"cannot resume {run_dir} with guards.early_stop.reward {early_stop.reward!r}: "
            "the checkpoint holds no value of it before training (it was not a held-out reward "
            "when the run started)"
        )
    return before


def write_checkpoint(
    actors: Actors,
    root: Path,
    iteration: int,
    published: dict[int, PublishedWeights],
    meta: dict[str, Any],
    config: RunConfig,
) -> Path:
    """Checkpoints the run after `iteration`: the learner's state and export, the published weights a resume needs
    (versions below the learner's), `meta`; keeps the newest `checkpoint.keep_last`."""
    during = f"the checkpoint after iteration {iteration}"
    learner_state = actors.learner_call(during, "state_dict")
    export = actors.learner_call(during, "export_files")
    history = {v: w.resolve() for v, w in published.items() if v < learner_state["version"]}
    state = CheckpointState(
        iteration=iteration, learner=learner_state, weights_history=history, meta=meta, export=export
    )
    return save_checkpoint(root, state, keep_last=config.checkpoint.keep_last)


def truncate_metrics(run_dir: Path, iteration: int) -> None:
    """Drops the lines of metrics.jsonl after `iteration` (written after the checkpoint a resume starts from), and
    any line that is not a whole record: the line of an iteration is written before its checkpoint, so a line torn
    by a crash mid-write (a launcher killed with -9, a full disk) belongs to an iteration after the newest
    checkpoint, which the resumed run redoes."""
    path = run_dir / "metrics.jsonl"
    if path.exists():
        keep = [line for line in path.read_text(errors="replace").splitlines() if _logged(line, iteration)]
        path.write_text("".join(line + "\n" for line in keep))


def _logged(line: str, iteration: int) -> bool:
    """Whether a metrics.jsonl line is a whole record of an iteration up to `iteration`."""
    try:
        record = json.loads(line)
        return float(record["iteration"]) <= iteration
    except (ValueError, TypeError, KeyError):
        return False


def copy_export(checkpoint: Path, run_dir: Path) -> Path:
    """Copies the checkpoint's `lora/` or `unet/` directory to the run directory (file by file, each through
    a temporary name and `os.replace`) and returns the run's copy."""
    source = next(checkpoint / name for name in ("lora", UNET_EXPORT_DIR) if (checkpoint / name).is_dir())
    target = run_dir / source.name
    target.mkdir(parents=True, exist_ok=True)
    for path in sorted(source.iterdir()):
        tmp = target / f".{path.name}.tmp"
        shutil.copyfile(path, tmp)
        os.replace(tmp, target / path.name)
    return target

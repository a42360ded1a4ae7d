"""Run-state checkpoints: written atomically, read back exactly.

A checkpoint after iteration k is a directory `<run_dir>/checkpoints/iter_<k:06d>/`:

    lora/pytorch_lora_weights.safetensors   the LoRA in the diffusers format (loads with pipe.load_lora_weights)
    learner_lora.safetensors                the LoRA in peft format, exactly as trained (resume reads this one)
  or, with model.finetune: full,
    unet/                                   the UNet in the diffusers format (UNet2DConditionModel.from_pretrained)
    learner_unet.safetensors                the UNet state dict, float32, exactly as trained (resume reads this)
    optimizer.pt                            AdamW state (tensors and numbers only: loads with weights_only=True)
    algorithm_state.safetensors             the method's state, e.g. DDE's EMA correction table (may be empty)
    learner_ema.safetensors                 the moving average of the trained weights (train.ema_decay > 0 only),
                                            keyed by position among the trained parameters
    weights_history.safetensors             the LoRA versions rollouts still in flight were sampled with
                                            (versions k - max_staleness .. k), keyed "v<version>/<param>"
    state.json                              iteration, learner version, optimizer steps and fp16 loss scale,
                                            seed, the resolved config, the MLflow run id, the pre-training
                                            evaluation, fault counters

RNG state: every random draw of a run is derived from (seed, iteration, shard) (`seeding.derive_seed`),
so the seed and the iteration in state.json are the whole RNG state; no generator state needs saving.

Atomicity: the directory is written under a temporary name, fsynced and renamed into place; `checkpoints/latest`
names the newest complete checkpoint and is itself replaced atomically. A crash mid-write leaves the previous
checkpoint as the latest. Only the `keep_last` newest checkpoints are kept.

Resume (`load_resumable`) reads the newest checkpoint in full and checks every file (state.json and the other JSON
files parse, every safetensors file parses and covers its file, optimizer.pt loads with weights_only=True); a
checkpoint damaged afterwards (a truncated file, a state.json cut mid-string) is skipped with one line naming the
file and why, and the newest complete older one is used. When none is complete the error names every bad file.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

__all__ = [
    "CheckpointError",
    "CheckpointState",
    "latest_checkpoint",
    "load_checkpoint",
    "load_resumable",
    "save_checkpoint",
]

LORA_FILE = "pytorch_lora_weights.safetensors"
# The learner-state key of the trained weights: a LoRA or (model.finetune: full) the whole UNet.
WEIGHTS_KEYS = ("lora", "unet")


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt or does not belong to this run's config."""


@dataclass
class CheckpointState:
    """What a checkpoint holds.

    Attributes:
        iteration: iterations completed.
        learner: `Learner.state_dict()` (version, lora or unet, optimizer, algorithm, dropped).
        weights_history: version → published weights (LoRA or UNet state dict), for the rollouts in flight at
            checkpoint time.
        meta: JSON-able driver state (seed, config, mlflow_run_id, eval_before, counters).
        export: the deliverable files, {relative path: bytes} (`Learner.export_files()`: `lora/…` or `unet/…`),
            written on save; empty when loaded.
    """

    iteration: int
    learner: dict[str, Any]
    weights_history: dict[int, dict[str, torch.Tensor]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    export: dict[str, bytes] = field(default_factory=dict)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _write_bytes(tmp, text.encode("utf-8"))
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def save_checkpoint(root: str | Path, state: CheckpointState, keep_last: int = 2) -> Path:
    """Writes `state` as `root/iter_<iteration>/` atomically, points `root/latest` at it, prunes old ones.

    Returns:
        The checkpoint directory.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    name = f"iter_{state.iteration:06d}"
    final = root / name
    staging = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=root))
    try:
        for relative, data in state.export.items():
            target = staging / relative
            if staging.resolve() not in target.resolve().parents:
                raise CheckpointError(f"export path {relative!r} leaves the checkpoint directory")
            target.parent.mkdir(parents=True, exist_ok=True)
            _write_bytes(target, data)
        key = _weights_key(state.learner)
        save_file({k: v.contiguous() for k, v in state.learner[key].items()}, staging / f"learner_{key}.safetensors")
        with open(staging / "optimizer.pt", "wb") as f:
            torch.save(state.learner["optimizer"], f)
            f.flush()
            os.fsync(f.fileno())
        save_file(
            {k: v.contiguous() for k, v in state.learner["algorithm"].items()}, staging / "algorithm_state.safetensors"
        )
        if state.learner.get("ema"):
            save_file({k: v.contiguous() for k, v in state.learner["ema"].items()}, staging / "learner_ema.safetensors")
        history = {
            f"v{version}/{key}": value.contiguous()
            for version, weights in state.weights_history.items()
            for key, value in weights.items()
        }
        save_file(history, staging / "weights_history.safetensors")
        meta = {
            **state.meta,
            "iteration": state.iteration,
            "learner_version": int(state.learner["version"]),
            "dropped": int(state.learner.get("dropped", 0)),
            "learner_optimizer_steps": int(state.learner.get("optimizer_steps", 0)),
            "learner_grad_scaler": dict(state.learner.get("grad_scaler") or {}),
            "history_versions": sorted(int(v) for v in state.weights_history),
        }
        _write_bytes(staging / "state.json", json.dumps(meta, indent=2, sort_keys=True).encode("utf-8"))
        for path in staging.rglob("*"):
            if path.is_file():
                os.chmod(path, 0o644)
        os.chmod(staging, 0o755)
        _fsync_dir(staging)
        if final.exists():  # a re-run of the same iteration after a resume: replace it
            shutil.rmtree(final)
        os.replace(staging, final)
        _fsync_dir(root)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _atomic_write_text(root / "latest", name + "\n")
    _prune(root, keep_last)
    return final


def _weights_key(learner: dict[str, Any]) -> str:
    keys = [key for key in WEIGHTS_KEYS if key in learner]
    if len(keys) != 1:
        raise CheckpointError(f"learner state must hold exactly one of {WEIGHTS_KEYS}, got {sorted(learner)}")
    return keys[0]


def _complete(path: Path) -> bool:
    return (path / "state.json").is_file() and any(
        (path / f"learner_{key}.safetensors").is_file() for key in WEIGHTS_KEYS
    )


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("iter_*") if p.is_dir() and _complete(p))
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".iter_*.tmp-*"):  # staging dirs of a crashed writer
        shutil.rmtree(stale, ignore_errors=True)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root` (what `latest` names, else the highest complete iter_*)."""
    root = Path(root)
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text(encoding="utf-8").strip()
        if _complete(candidate):
            return candidate
    done = sorted(p for p in root.glob("iter_*") if p.is_dir() and _complete(p))
    return done[-1] if done else None


def _why(error: BaseException) -> str:
    """The first sentence of an error, at most 160 characters (torch's zip errors run to a paragraph)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = text.split(". ")[0]
    return text if len(text) <= 160 else text[:157] + "..."


def _corrupt(file: Path, what: str, error: BaseException | str) -> CheckpointError:
    why = error if isinstance(error, str) else _why(error)
    return CheckpointError(f"corrupt checkpoint file {file}: {what} ({why})")


def _read_meta(path: Path) -> dict[str, Any]:
    file = path / "state.json"
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
        int(meta["iteration"]), int(meta["learner_version"])
    except KeyError as error:
        raise _corrupt(file, "not a complete state.json", f"no {error.args[0]!r}") from None
    except (ValueError, TypeError) as error:
        raise _corrupt(file, "not a complete state.json", error) from None
    return meta


def _read_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(file)
    except Exception as error:  # safetensors raises its own SafetensorError
        raise _corrupt(file, "truncated or not a safetensors file", error) from None


def _read_optimizer(path: Path) -> dict[str, Any]:
    file = path / "optimizer.pt"
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated zip (RuntimeError), an empty file (EOFError), an unpickling error
        raise _corrupt(file, "does not load with torch.load(weights_only=True)", error) from None


def _check_exports(path: Path, read: set[Path]) -> None:
    """The files not read in full: each safetensors header parses and its tensors cover the file (checked without
    reading the tensors), each JSON file parses."""
    for file in sorted(path.rglob("*.safetensors")):
        if file not in read:
            try:
                with safe_open(file, framework="pt"):
                    pass
            except Exception as error:
                raise _corrupt(file, "truncated or not a safetensors file", error) from None
    for file in sorted(path.rglob("*.json")):
        if file != path / "state.json":
            try:
                json.loads(file.read_text(encoding="utf-8"))
            except ValueError as error:
                raise _corrupt(file, "not valid JSON", error) from None


def load_checkpoint(path: str | Path) -> CheckpointState:
    """Reads a checkpoint directory written by `save_checkpoint`, checking every file.

    Raises:
        CheckpointError: the directory is missing, incomplete (names the missing file) or corrupt (names the file
            and why).
    """
    path = Path(path)
    weights_key = next((k for k in WEIGHTS_KEYS if (path / f"learner_{k}.safetensors").is_file()), "lora")
    for required in (
        "state.json",
        f"learner_{weights_key}.safetensors",
        "optimizer.pt",
        "algorithm_state.safetensors",
        "weights_history.safetensors",
    ):
        if not (path / required).is_file():
            raise CheckpointError(f"checkpoint {path} is incomplete: {required} is missing")
    meta = _read_meta(path)
    tensor_files = [
        path / f"learner_{weights_key}.safetensors",
        path / "algorithm_state.safetensors",
        path / "weights_history.safetensors",
    ]
    weights, algorithm, flat_history = (_read_tensors(file) for file in tensor_files)
    ema = {}
    if (path / "learner_ema.safetensors").is_file():
        tensor_files.append(path / "learner_ema.safetensors")
        ema = _read_tensors(tensor_files[-1])
    optimizer = _read_optimizer(path)
    _check_exports(path, set(tensor_files))
    history: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat_history.items():
        version, _, param = key.partition("/")
        history.setdefault(int(version[1:]), {})[param] = value
    learner = {
        "version": int(meta["learner_version"]),
        "dropped": int(meta.get("dropped", 0)),
        weights_key: weights,
        "optimizer": optimizer,
        "algorithm": algorithm,
        "optimizer_steps": int(meta.get("learner_optimizer_steps", 0)),
        "grad_scaler": dict(meta.get("learner_grad_scaler") or {}),
        "ema": ema,
    }
    return CheckpointState(iteration=int(meta["iteration"]), learner=learner, weights_history=history, meta=meta)


def _resume_candidates(root: Path) -> list[Path]:
    """The checkpoints a resume may use, newest first: the one `latest` names (when it exists), then every older
    iter_* directory; without a usable `latest`, every iter_* directory."""
    dirs = sorted((p for p in root.glob("iter_*") if p.is_dir()), reverse=True)
    pointer = root / "latest"
    if pointer.is_file():
        named = root / pointer.read_text(encoding="utf-8", errors="replace").strip()
        if named in dirs:
            return [named] + [p for p in dirs if p.name < named.name]
    return dirs


def load_resumable(root: str | Path, log: Callable[[str], None] = print) -> tuple[Path, CheckpointState] | None:
    """The newest checkpoint under `root` that loads completely (`load_checkpoint`), and its path; a damaged newer
    one is skipped with one `log` line naming the bad file and why.

    Returns:
        None when `root` holds no checkpoint directory at all.

    Raises:
        CheckpointError: there are checkpoints but none is complete; the message names each one's bad file.
    """
    root = Path(root)
    candidates = _resume_candidates(root)
    problems = []
    for k, path in enumerate(candidates):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as error:
            problems.append(str(error))
            if k + 1 < len(candidates):
                log(f"[resume] skipping {path.name}: {error}; trying {candidates[k + 1].name}")
    if not problems:
        return None
    raise CheckpointError(f"no complete checkpoint under {root} to resume from: {'; '.join(problems)}")

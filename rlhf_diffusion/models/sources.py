"""Where a model or reward path points: one resolver for `model.pretrained`, `--model` and every reward `path`.

A source is one of

- `testbed:<name>`: a model shipped in the package (`testbed/assets.py`): its absolute directory;
- `tiny:sd15` / `tiny:sdxl` / `tiny:flux`: a tiny random-weight pipeline (`models/tiny.py`), built once under
  `<cache_dir>/_tiny_models/<kind>`: that directory;
- an existing local file or directory: its user-expanded path;
- a Hugging Face Hub id `owner/name` (`HUB_ID_RE`, the one hub-id check): itself.

This module imports neither torch nor diffusers (the tiny builder is imported only to build), so config validation
and the CLIs use it without loading them.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

__all__ = [
    "HUB_ID_RE",
    "PATH_PREFIXES",
    "TESTBED_PREFIX",
    "TINY_MODELS",
    "TINY_PREFIX",
    "is_hub_id",
    "resolve_source",
]

TESTBED_PREFIX = "testbed:"  # a model shipped in the package (testbed/assets.py resolves the name)
TINY_PREFIX = "tiny:"
TINY_MODELS: tuple[str, ...] = ("tiny:sd15", "tiny:sdxl", "tiny:flux")
# A Hugging Face Hub repository id: "owner/name".
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Prefixes that mark a string as a local path, never a hub id.
PATH_PREFIXES = ("/", "./", "../", "~")


def is_hub_id(source: str) -> bool:
    """True for a string shaped like a Hugging Face Hub id ("owner/name", `HUB_ID_RE`) that is not an existing
    local path."""
    source = str(source)
    if Path(source).expanduser().exists():
        return False
    return HUB_ID_RE.match(source) is not None


def resolve_source(source: str, cache_dir: str | Path | None = None, *, what: str | None = None) -> str:
    """The directory, file or hub id to load for `source` (see the module docstring).

    Args:
        source: `testbed:<name>`, `tiny:sd15` / `tiny:sdxl` / `tiny:flux`, a local path, or a hub id.
        cache_dir: where `tiny:*` pipelines are built (`cache_dir/_tiny_models/<kind>`); required for them. The
            build goes to a temporary directory that is renamed into place, so concurrent callers never see half a
            pipeline.
        what: what `source` should hold, for the error message (e.g. "CLIP model directory"). With it, a source that
            is neither a local path nor a hub id raises; without it, such a source is returned as given (a model
            path: the loader's error names it) and a local path is returned as given too.

    Raises:
        ValueError: an unknown `testbed:` name, or `tiny:*` without a `cache_dir`.
        FileNotFoundError: a missing testbed model, or (with `what`) `source` is not an existing local path and
            cannot be a hub id.
    """
    source = str(source)
    if source.startswith(TESTBED_PREFIX):
        from rlhf_diffusion.testbed.assets import resolve_testbed  # the testbed package loads torch

        return resolve_testbed(source)
    if source.startswith(TINY_PREFIX):
        if cache_dir is None:
            raise ValueError(f"{source!r}: a tiny model needs a cache directory to be built in")
        return _build_tiny(source[len(TINY_PREFIX) :], Path(cache_dir))
    if what is None:
        return source
    local = Path(source).expanduser()
    if local.exists():
        return str(local)
    if is_hub_id(source):
        return source
    raise FileNotFoundError(f"{what} {source!r} does not exist (expected a local path or a hub id 'owner/name')")


def _build_tiny(kind: str, cache_dir: Path) -> str:
    """`cache_dir/_tiny_models/<kind>`, built once (see `resolve_source`)."""
    target = cache_dir / "_tiny_models" / kind
    if not (target / "model_index.json").exists():
        from rlhf_diffusion.models.tiny import build_tiny_pipeline

        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{kind}-", dir=target.parent))
        try:
            build_tiny_pipeline(staging, kind)
            try:
                os.replace(staging, target)
            except OSError:  # another process finished first
                if not (target / "model_index.json").exists():
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return str(target)

"""Offline preference pairs (prompt, preferred image, other image) for DDE and Diffusion-DPO, streamed from disk.

Two source formats:

    pickapic_parquet   Pick-a-Pic v2 Parquet (yuvalkirstain/pickapic_v2): one file, a directory of `*.parquet`
                       shards (read in sorted name order) or a glob (`**` allowed). Only the columns `caption`,
                       `jpg_0`, `jpg_1` (encoded image bytes) and `label_0` are read.
    jsonl              one JSON object per line: {"prompt": ..., "image_w": path, "image_l": path}, the first image
                       preferred; relative paths are relative to the JSONL file's directory. `"label": "tie"` or
                       `"tie": true` marks a tie. Blank lines are skipped.

Labels follow Diffusion-DPO (docs/algorithms.md §3(f): Pick-a-Pic v2 holds ties, label_0 = 0.5, which Diffusion-DPO
drops, and it puts each pair's winner first [C DiffusionDPO train.py]): label_0 = 1 keeps
(jpg_0, jpg_1), label_0 = 0 yields (jpg_1, jpg_0), label_0 = 0.5 is a tie and is dropped (counted in
`DataStats.ties_dropped`). As in train.py only `label_0` is consulted (label_1 = 1 - label_0 in the dataset); any
other value is a corrupt row ("bad_label"). Relabelling by an AI annotator (Diffusion-DPO's `--choice_model`) is not
done here: it needs a reward model and belongs to the caller.

Streaming: Parquet is read with `ParquetFile.iter_batches(batch_size, columns)`, so memory holds about the current
row group's selected columns and one batch, never a whole file; JSONL is read line by line. Images are
decoded only when their pair is handed out, so the shuffle buffer holds encoded bytes (Parquet) or paths (JSONL).

Shuffling is a streaming buffer shuffle (as tf.data's `shuffle(buffer_size)`): a buffer of `shuffle_buffer` records
is filled, then each new record replaces a uniformly drawn buffered one, which is emitted; the rest is emitted in
random order at the end of the pass. Every pass is a permutation of the shard's pairs; pass p draws from
`np.random.default_rng([seed, p])`, so the order is a function of (seed, pass) only and differs between passes.
With a buffer no smaller than the shard the pass is a uniform permutation; smaller buffers mix only locally.

Sharding: the rows of all files, concatenated in order, are numbered 0, 1, ...; shard k of n reads the rows i with
i % n == k, so n readers (e.g. one per Ray sampler) cover the source exactly once between them. Rows of other
shards are skipped before any conversion or decoding (Parquet bytes are still read from disk: Parquet cannot skip
individual rows).

Errors: a source that cannot be used at all (no such file, no shards in the directory, no glob match, an unreadable
Parquet footer, a missing required column or one of the wrong type) raises at open time, naming the path and the
column. A bad row (see `CORRUPT_REASONS`) is counted in `DataStats.corrupt`, logged once per reason as a warning
with its location (e.g. "train-00003.parquet:row 17", "pairs.jsonl:line 5"), and skipped; a warning per pass sums
them up. A pass that yields no pair at all raises `PreferenceDataError` instead of looping forever.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import itertools
import json
import logging
import math
import os
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

__all__ = [
    "CORRUPT_REASONS",
    "PICKAPIC_V2_SCHEMA",
    "DataStats",
    "PickapicRow",
    "PreferenceDataError",
    "check_preference_source",
    "PreferenceDataSpec",
    "PreferenceJsonlRow",
    "PreferencePair",
    "PreferenceSource",
    "open_preference_source",
    "pairs_to_tensors",
    "resolve_parquet_files",
    "write_pickapic_parquet",
    "write_preference_jsonl",
]

logger = logging.getLogger(__name__)

SourceFormat = Literal["pickapic_parquet", "jsonl"]
SOURCE_FORMATS: tuple[str, ...] = ("pickapic_parquet", "jsonl")

# Why a row is skipped (keys of `DataStats.corrupt`, suffixes of the "data/corrupt/<reason>" metrics).
CORRUPT_REASONS: tuple[str, ...] = (
    "bad_json",  # JSONL: the line is not valid JSON (or not UTF-8), or not a JSON object
    "missing_prompt",  # no caption / prompt, or only whitespace
    "missing_label",  # Parquet: label_0 is null or NaN
    "bad_label",  # Parquet: label_0 not in {0, 0.5, 1}; JSONL: "label" other than "tie", non-boolean "tie"
    "missing_image",  # Parquet: jpg_0 / jpg_1 is null; JSONL: "image_w" / "image_l" absent or not a string
    "missing_file",  # JSONL: the image file does not exist
    "unreadable_image",  # the bytes / file do not decode as an image
)

# The full column set of yuvalkirstain/pickapic_v2 in the dataset card's order (its `dataset_info.features`).
PICKAPIC_V2_SCHEMA = pa.schema(
    [
        ("are_different", pa.bool_()),
        ("best_image_uid", pa.string()),
        ("caption", pa.string()),
        ("created_at", pa.timestamp("ns")),
        ("has_label", pa.bool_()),
        ("image_0_uid", pa.string()),
        ("image_0_url", pa.string()),
        ("image_1_uid", pa.string()),
        ("image_1_url", pa.string()),
        ("jpg_0", pa.binary()),
        ("jpg_1", pa.binary()),
        ("label_0", pa.float64()),
        ("label_1", pa.float64()),
        ("model_0", pa.string()),
        ("model_1", pa.string()),
        ("ranking_id", pa.int64()),
        ("user_id", pa.int64()),
        ("num_example_per_prompt", pa.int64()),
        ("__index_level_0__", pa.int64()),
    ]
)

# The columns read, with the type families accepted (integer labels too: some Pick-a-Pic derivatives store 0/1
# as int64).
_REQUIRED_COLUMNS: dict[str, tuple[str, Callable[[pa.DataType], bool]]] = {
    "caption": ("string", lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)),
    "jpg_0": ("binary", lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t)),
    "jpg_1": ("binary", lambda t: pa.types.is_binary(t) or pa.types.is_large_binary(t)),
    "label_0": ("float or integer", lambda t: pa.types.is_floating(t) or pa.types.is_integer(t)),
}

_TIE = "tie"  # the `_Rejected.reason` of a tie: counted in `ties_dropped`, not as corrupt

T = TypeVar("T")


class PreferenceDataError(ValueError):
    """A preference source is unusable: a Parquet file is unreadable or lacks a required column, or a whole pass
    yielded no pair."""


@dataclass(frozen=True)
class PreferencePair:
    """One labelled pair, winner first.

    Attributes:
        prompt: the caption, as stored (not stripped).
        image_w: the preferred image (RGB).
        image_l: the other image (RGB).
        source: where the row came from: "<file>:row <i>" (Parquet, 0-based row within the file) or
            "<file>:line <n>" (JSONL, 1-based line number).
    """

    prompt: str
    image_w: Image.Image
    image_l: Image.Image
    source: str


@dataclass
class DataStats:
    """Counters of one `PreferenceSource` (its shard only), cumulative over passes.

    Attributes:
        rows_read: rows of this shard read (good, tie and corrupt).
        pairs_yielded: pairs handed out.
        ties_dropped: rows skipped as ties.
        passes: passes completed.
        corrupt: rows skipped as corrupt, by reason (`CORRUPT_REASONS`).
    """

    rows_read: int = 0
    pairs_yielded: int = 0
    ties_dropped: int = 0
    passes: int = 0
    corrupt: Counter[str] = field(default_factory=Counter)

    @property
    def corrupt_total(self) -> int:
        return self.corrupt.total()

    def as_metrics(self, prefix: str = "data/") -> dict[str, float]:
        """Flat float metrics for MLflow: `<prefix>rows_read`, `pairs_yielded`, `ties_dropped`, `passes`,
        `corrupt` (total) and `corrupt/<reason>` for every reason in `CORRUPT_REASONS` (zeros included, so every
        run logs the same keys)."""
        metrics = {
            f"{prefix}rows_read": float(self.rows_read),
            f"{prefix}pairs_yielded": float(self.pairs_yielded),
            f"{prefix}ties_dropped": float(self.ties_dropped),
            f"{prefix}passes": float(self.passes),
            f"{prefix}corrupt": float(self.corrupt_total),
        }
        metrics.update({f"{prefix}corrupt/{reason}": float(self.corrupt[reason]) for reason in CORRUPT_REASONS})
        return metrics


@dataclass(frozen=True)
class PreferenceDataSpec:
    """Where and how to read preference pairs (see `PreferenceSource` for the fields)."""

    format: SourceFormat
    path: str | os.PathLike[str]
    epochs: int | None = 1
    shuffle_buffer: int = 0
    seed: int = 0
    batch_size: int = 64


@dataclass(frozen=True)
class _Record:
    """A valid row before decoding: the images as encoded bytes (Parquet) or file paths (JSONL)."""

    prompt: str
    image_w: bytes | Path
    image_l: bytes | Path
    source: str


@dataclass(frozen=True)
class _Rejected:
    """A row that yields no pair: a tie, or a corrupt row with one of `CORRUPT_REASONS`."""

    reason: str
    source: str
    detail: str


def resolve_parquet_files(path: str | os.PathLike[str]) -> list[Path]:
    """The Parquet files of a source path: the file itself, a directory's `*.parquet` (not recursive), or a glob's
    matching files (`**` recurses); sorted by path.

    Raises:
        FileNotFoundError: nothing exists at `path`, the directory holds no `*.parquet`, or the glob matches no
            file (the message names the path).
    """
    text = os.fspath(path)
    if any(c in text for c in "*?["):
        files = sorted(Path(p) for p in glob.glob(text, recursive=True) if os.path.isfile(p))
        if not files:
            raise FileNotFoundError(f"no files match the Pick-a-Pic Parquet glob {text}")
        return files
    if os.path.isdir(text):
        files = sorted(Path(text).glob("*.parquet"))
        if not files:
            raise FileNotFoundError(f"no *.parquet files in the Pick-a-Pic directory {text}")
        return files
    if os.path.isfile(text):
        return [Path(text)]
    raise FileNotFoundError(f"Pick-a-Pic Parquet source not found: {text}")


def _check_pickapic_schema(path: Path) -> None:
    """Reads only the footer of `path` and checks the columns this module reads."""
    try:
        with pq.ParquetFile(path) as parquet:
            schema = parquet.schema_arrow
    except (OSError, pa.ArrowException) as e:
        raise PreferenceDataError(f"{path}: not a readable Parquet file ({e})") from e
    missing = [name for name in _REQUIRED_COLUMNS if name not in schema.names]
    if missing:
        raise PreferenceDataError(
            f"{path}: missing required Pick-a-Pic column(s) {', '.join(missing)} "
            f"(columns present: {', '.join(schema.names)})"
        )
    for name, (expected, accepts) in _REQUIRED_COLUMNS.items():
        actual = schema.field(name).type
        if not accepts(actual):
            raise PreferenceDataError(f"{path}: column {name} has type {actual}, expected {expected}")


def _parse_pickapic(caption: Any, jpg_0: Any, jpg_1: Any, label_0: Any, source: str) -> _Record | _Rejected:
    if not isinstance(caption, str) or not caption.strip():
        return _Rejected("missing_prompt", source, f"caption is {caption!r}")
    if label_0 is None or math.isnan(label_0):
        return _Rejected("missing_label", source, f"label_0 is {label_0!r}")
    if label_0 not in (0, 0.5, 1):
        return _Rejected("bad_label", source, f"label_0 is {label_0!r}, expected 0, 0.5 or 1")
    if label_0 == 0.5:
        return _Rejected(_TIE, source, "label_0 is 0.5")
    for name, data in (("jpg_0", jpg_0), ("jpg_1", jpg_1)):
        if data is None:
            return _Rejected("missing_image", source, f"{name} is null")
    if label_0 == 1:
        return _Record(caption, jpg_0, jpg_1, source)
    return _Record(caption, jpg_1, jpg_0, source)


def _parse_jsonl(line: bytes, base: Path, source: str) -> _Record | _Rejected:
    try:
        obj = json.loads(line)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
        return _Rejected("bad_json", source, str(e))
    if not isinstance(obj, dict):
        return _Rejected("bad_json", source, f"expected a JSON object, got {type(obj).__name__}")
    prompt = obj.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        return _Rejected("missing_prompt", source, f"prompt is {prompt!r}")
    label, tie = obj.get("label"), obj.get("tie", False)
    if label not in (None, "tie") or not isinstance(tie, bool):
        return _Rejected(
            "bad_label", source, f'label is {label!r}, tie is {tie!r}; expected label "tie" or a boolean tie'
        )
    if label == "tie" or tie:
        return _Rejected(_TIE, source, "marked as a tie")
    paths = []
    for key in ("image_w", "image_l"):
        value = obj.get(key)
        if not isinstance(value, str) or not value:
            return _Rejected("missing_image", source, f"{key} is {value!r}, expected a path")
        paths.append(Path(value) if os.path.isabs(value) else base / value)
    return _Record(prompt, paths[0], paths[1], source)


def _open_rgb(data: bytes | Path) -> Image.Image:
    """Decodes fully (convert loads the pixels) and closes the file."""
    with Image.open(io.BytesIO(data) if isinstance(data, bytes) else data) as image:
        return image.convert("RGB")


def _buffer_shuffle(items: Iterable[T], size: int, rng: np.random.Generator) -> Iterator[T]:
    """Streaming shuffle with a buffer of `size` items (see the module docstring); `size` <= 1 keeps the order."""
    if size <= 1:
        yield from items
        return
    buffer: list[T] = []
    for item in items:
        if len(buffer) < size:
            buffer.append(item)
            continue
        j = int(rng.integers(size))
        yield buffer[j]
        buffer[j] = item
    rng.shuffle(buffer)
    yield from buffer


class PreferenceSource:
    """An iterable of `PreferencePair`s from one source, for `epochs` passes (None: forever).

    Each `iter()` starts again at pass 0; `stats` keeps counting across them. The object holds no open file
    between passes and pickles (e.g. to a Ray actor) before iteration starts.

    Args:
        format: "pickapic_parquet" or "jsonl" (module docstring).
        path: Parquet file / directory / glob, or the JSONL file.
        epochs: number of passes, None = repeat forever.
        shuffle_buffer: streaming-shuffle buffer size in rows; 0 or 1 keeps the file order.
        seed: shuffle seed (pass p uses `np.random.default_rng([seed, p])`).
        batch_size: Parquet rows per `iter_batches` batch.
        shard_index: this reader's shard, in [0, num_shards).
        num_shards: readers sharing the source; shard k reads the rows i with i % num_shards == k.

    Raises:
        ValueError: a parameter is out of range or the format unknown.
        FileNotFoundError: the source path does not exist / matches no Parquet file.
        PreferenceDataError: a Parquet file is unreadable or lacks a required column (named in the message).
    """

    def __init__(
        self,
        format: str,
        path: str | os.PathLike[str],
        *,
        epochs: int | None = 1,
        shuffle_buffer: int = 0,
        seed: int = 0,
        batch_size: int = 64,
        shard_index: int = 0,
        num_shards: int = 1,
    ) -> None:
        if format not in SOURCE_FORMATS:
            raise ValueError(f"unknown preference data format {format!r}; valid: {', '.join(SOURCE_FORMATS)}")
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs must be >= 1 or None (forever), got {epochs}")
        if shuffle_buffer < 0:
            raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_shards < 1 or not 0 <= shard_index < num_shards:
            raise ValueError(
                f"need 0 <= shard_index < num_shards, got shard_index={shard_index}, num_shards={num_shards}"
            )
        self.format = format
        self.path = os.fspath(path)
        self.epochs = epochs
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.batch_size = batch_size
        self.shard_index = shard_index
        self.num_shards = num_shards
        if format == "pickapic_parquet":
            self.files = tuple(resolve_parquet_files(path))
            for file in self.files:
                _check_pickapic_schema(file)
        else:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"preference JSONL file not found: {self.path}")
            self.files = (Path(path),)
        self.stats = DataStats()
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        return (
            f"PreferenceSource({self.format} {self.path}, shard {self.shard_index}/{self.num_shards}, "
            f"epochs={self.epochs}, shuffle_buffer={self.shuffle_buffer}, seed={self.seed})"
        )

    def __iter__(self) -> Iterator[PreferencePair]:
        passes = itertools.count() if self.epochs is None else range(self.epochs)
        for pass_index in passes:
            yield from self._pass(pass_index)

    def _pass(self, pass_index: int) -> Iterator[PreferencePair]:
        before = dataclasses.replace(self.stats, corrupt=Counter(self.stats.corrupt))
        rng = np.random.default_rng([self.seed, pass_index])
        for record in _buffer_shuffle(self._records(), self.shuffle_buffer, rng):
            try:
                image_w, image_l = _open_rgb(record.image_w), _open_rgb(record.image_l)
            except FileNotFoundError as e:
                self._reject(_Rejected("missing_file", record.source, str(e)))
                continue
            except Exception as e:  # noqa: BLE001 - PIL raises many types on bad input; one bad row must not stop a run
                self._reject(_Rejected("unreadable_image", record.source, f"{type(e).__name__}: {e}"))
                continue
            self.stats.pairs_yielded += 1
            yield PreferencePair(record.prompt, image_w, image_l, record.source)
        self.stats.passes += 1
        rows = self.stats.rows_read - before.rows_read
        pairs = self.stats.pairs_yielded - before.pairs_yielded
        ties = self.stats.ties_dropped - before.ties_dropped
        corrupt = self.stats.corrupt - before.corrupt
        by_reason = f" ({', '.join(f'{reason} {n}' for reason, n in sorted(corrupt.items()))})" if corrupt else ""
        summary = (
            f"{self!r} pass {pass_index}: {rows} rows read, {pairs} pairs, {ties} ties dropped, "
            f"{corrupt.total()} corrupt{by_reason}"
        )
        if pairs == 0:
            raise PreferenceDataError(f"no preference pair in a full pass: {summary}")
        if corrupt:
            logger.warning("%s", summary)
        else:
            logger.info("%s", summary)

    def _records(self) -> Iterator[_Record]:
        """Valid records of this shard in file order; counts rows and skips (and counts) ties and corrupt rows."""
        rows = self._parquet_rows() if self.format == "pickapic_parquet" else self._jsonl_rows()
        for row in rows:
            self.stats.rows_read += 1
            if isinstance(row, _Record):
                yield row
            elif row.reason == _TIE:
                self.stats.ties_dropped += 1
            else:
                self._reject(row)

    def _reject(self, row: _Rejected) -> None:
        self.stats.corrupt[row.reason] += 1
        if row.reason not in self._warned:
            self._warned.add(row.reason)
            logger.warning(
                "skipping corrupt row (%s) at %s: %s; further rows of this kind are skipped without a "
                "warning and counted in the metric data/corrupt/%s",
                row.reason,
                row.source,
                row.detail,
                row.reason,
            )

    def _mine(self, index: int) -> bool:
        return index % self.num_shards == self.shard_index

    def _parquet_rows(self) -> Iterator[_Record | _Rejected]:
        columns = list(_REQUIRED_COLUMNS)
        index = 0  # global row number across files (the sharding key)
        for path in self.files:
            with pq.ParquetFile(path) as parquet:
                row = 0  # row number within the file
                for batch in _batches(parquet, path, self.batch_size, columns):
                    mine = [j for j in range(batch.num_rows) if self._mine(index + j)]
                    if mine:
                        taken = batch.take(pa.array(mine)) if len(mine) < batch.num_rows else batch
                        values = [taken.column(name).to_pylist() for name in columns]
                        for j, (caption, jpg_0, jpg_1, label_0) in zip(mine, zip(*values)):
                            yield _parse_pickapic(caption, jpg_0, jpg_1, label_0, f"{path}:row {row + j}")
                    index += batch.num_rows
                    row += batch.num_rows

    def _jsonl_rows(self) -> Iterator[_Record | _Rejected]:
        path = self.files[0]
        index = 0  # non-blank lines seen (the sharding key)
        with open(path, "rb") as f:  # bytes: a line that is not UTF-8 is one bad row, not a crash
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                if self._mine(index):
                    yield _parse_jsonl(line, path.parent, f"{path}:line {number}")
                index += 1


def _batches(parquet: pq.ParquetFile, path: Path, batch_size: int, columns: list[str]) -> Iterator[pa.RecordBatch]:
    """`parquet.iter_batches`, with a damaged page (bad compression, scrambled bytes) raised as one
    `PreferenceDataError` naming the file, instead of pyarrow's error that names none."""
    batches = parquet.iter_batches(batch_size=batch_size, columns=columns)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (OSError, pa.ArrowException) as e:
            raise PreferenceDataError(f"{path}: damaged Parquet data ({type(e).__name__}: {e})") from e
        yield batch


def check_preference_source(spec: Any) -> None:
    """Checks, before a run starts any work, that the source a spec describes yields at least one pair: opens it
    (paths, Parquet footers and columns) and reads rows until the first pair whose two images decode. A source
    that is empty, whose rows are all ties or corrupt, or whose pages are damaged fails here with one
    `PreferenceDataError` naming the file (not minutes later, in a sampler).

    Raises:
        as `PreferenceSource`, and PreferenceDataError when a whole pass yields no pair.
    """
    source = open_preference_source(spec)
    source.epochs, source.shuffle_buffer = 1, 0
    for _ in source:
        return


def open_preference_source(spec: Any, *, shard_index: int = 0, num_shards: int = 1) -> PreferenceSource:
    """Opens the source a spec describes, as shard `shard_index` of `num_shards`.

    Args:
        spec: a `PreferenceDataSpec`, or any object with its attribute names (e.g. a config section); `format`
            and `path` are required, absent others take `PreferenceDataSpec`'s defaults.
        shard_index, num_shards: which part of the rows this reader takes (per reader, so not part of the spec).

    Raises:
        as `PreferenceSource`; ValueError also when the spec lacks `format` or `path`.
    """
    missing = [name for name in ("format", "path") if getattr(spec, name, None) is None]
    if missing:
        raise ValueError(f"preference data spec needs {' and '.join(missing)}")
    options = {f.name: getattr(spec, f.name) for f in dataclasses.fields(PreferenceDataSpec) if hasattr(spec, f.name)}
    return PreferenceSource(**options, shard_index=shard_index, num_shards=num_shards)


def _resize_center_crop(image: Image.Image, resolution: int) -> Image.Image:
    """torchvision's Resize(resolution, BILINEAR) + CenterCrop(resolution) on a PIL image, in PIL: the shorter side
    becomes `resolution`, the longer `int(resolution * long / short)`, then the centre square is cut (offsets
    rounded as torchvision does)."""
    width, height = image.size
    if width <= height:
        size = (resolution, int(resolution * height / width))
    else:
        size = (int(resolution * width / height), resolution)
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    left = int(round((size[0] - resolution) / 2.0))
    top = int(round((size[1] - resolution) / 2.0))
    return image.crop((left, top, left + resolution, top + resolution))


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).to(torch.float32).div_(255)


def pairs_to_tensors(
    pairs: Sequence[PreferencePair],
    resolution: int,
    *,
    random_flip: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[list[str], torch.Tensor, torch.Tensor]:
    """Prompts and image batches of `pairs`, the images prepared as in Diffusion-DPO's train transform.

    Each image: shorter side resized to `resolution` (bilinear), centre square crop (Resize + CenterCrop in
    DiffusionDPO train.py, whose default RandomCrop is off), values in [0, 1]. Diffusion-DPO additionally normalises
    to [-1, 1]; that, and VAE encoding, is the caller's step. `random_flip` mirrors each image independently with
    probability 1/2 (train.py's RandomHorizontalFlip, its default unless --no_hflip), drawing from `generator`.

    Returns:
        (prompts, images_w, images_l), the tensors float32 of shape (N, 3, resolution, resolution).

    Raises:
        ValueError: no pairs, or resolution < 1.
    """
    if not pairs:
        raise ValueError("pairs_to_tensors needs at least one pair")
    if resolution < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    flips = (torch.rand(len(pairs), 2, generator=generator) < 0.5).tolist() if random_flip else None
    batches: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])
    for i, pair in enumerate(pairs):
        for k, image in enumerate((pair.image_w, pair.image_l)):
            tensor = _to_tensor(_resize_center_crop(image.convert("RGB"), resolution))
            batches[k].append(tensor.flip(-1) if flips is not None and flips[i][k] else tensor)
    return [pair.prompt for pair in pairs], torch.stack(batches[0]), torch.stack(batches[1])


# ---------------------------------------------------------------------------------------------------------------
# Writers: small files in the source formats, for tests, examples and hand-made data sets
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PickapicRow:
    """One row for `write_pickapic_parquet`.

    Attributes:
        caption: the prompt (None writes a null).
        image_0, image_1: PIL images (JPEG-encoded on write), raw bytes (written as given, e.g. to plant a corrupt
            image) or None (a null).
        label_0: 1.0 (image_0 preferred), 0.0 (image_1 preferred), 0.5 (tie) or None (a null).
        label_1: None = 1 - label_0 (null when label_0 is null), as in the dataset.
    """

    caption: str | None
    image_0: Image.Image | bytes | None
    image_1: Image.Image | bytes | None
    label_0: float | None
    label_1: float | None = None


def _jpeg(image: Image.Image | bytes | None) -> bytes | None:
    if image is None or isinstance(image, bytes):
        return image
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def write_pickapic_parquet(
    path: str | os.PathLike[str], rows: Iterable[PickapicRow], *, row_group_size: int | None = None
) -> Path:
    """Writes `rows` as a Parquet file with exactly the Pick-a-Pic v2 columns and types (`PICKAPIC_V2_SCHEMA`).

    The columns not given by `rows` get deterministic, plausible values: uids are UUID strings (derived from the
    file name and row), URLs point at the reserved `.invalid` domain, `created_at` is one minute apart per row from
    2023-05-01, `best_image_uid` is the preferred image's uid ("" for ties and missing labels), `has_label` says
    whether label_0 is set, `are_different` whether the two encoded images differ, `num_example_per_prompt` counts
    the rows with the same caption.

    Args:
        row_group_size: rows per Parquet row group (None: pyarrow's default, one group for small files).

    Returns:
        The path written.
    """
    path = Path(path)
    rows = list(rows)
    per_caption = Counter(row.caption for row in rows)
    columns: dict[str, list[Any]] = {name: [] for name in PICKAPIC_V2_SCHEMA.names}
    for i, row in enumerate(rows):
        uids = [str(uuid.uuid5(uuid.NAMESPACE_URL, f"{path.name}/{i}/{k}")) for k in (0, 1)]
        jpgs = [_jpeg(row.image_0), _jpeg(row.image_1)]
        label_0 = row.label_0
        has_label = label_0 is not None and not math.isnan(label_0)
        label_1 = row.label_1 if row.label_1 is not None else (1.0 - label_0 if label_0 is not None else None)
        best = uids[0] if has_label and label_0 == 1 else uids[1] if has_label and label_0 == 0 else ""
        values = {
            "are_different": jpgs[0] != jpgs[1],
            "best_image_uid": best,
            "caption": row.caption,
            "created_at": datetime(2023, 5, 1) + timedelta(minutes=i),
            "has_label": has_label,
            "image_0_uid": uids[0],
            "image_0_url": f"https://images.pickapic.invalid/{uids[0]}.png",
            "image_1_uid": uids[1],
            "image_1_url": f"https://images.pickapic.invalid/{uids[1]}.png",
            "jpg_0": jpgs[0],
            "jpg_1": jpgs[1],
            "label_0": label_0,
            "label_1": label_1,
            "model_0": "stable-diffusion-xl-base-1.0",
            "model_1": "dreamlike-photoreal-2.0",
            "ranking_id": 100_000 + i,
            "user_id": 1_000 + i % 7,
            "num_example_per_prompt": per_caption[row.caption],
            "__index_level_0__": i,
        }
        for name, value in values.items():
            columns[name].append(value)
    pq.write_table(pa.table(columns, schema=PICKAPIC_V2_SCHEMA), path, row_group_size=row_group_size)
    return path


@dataclass(frozen=True)
class PreferenceJsonlRow:
    """One row for `write_preference_jsonl`: `image_w` preferred unless `tie`."""

    prompt: str
    image_w: Image.Image
    image_l: Image.Image
    tie: bool = False


def write_preference_jsonl(path: str | os.PathLike[str], rows: Iterable[PreferenceJsonlRow]) -> Path:
    """Writes `rows` as preference JSONL; the images go to PNGs in `<stem>_images/` next to the file, referenced by
    paths relative to the file's directory. Ties are written with `"label": "tie"`.

    Returns:
        The path written.
    """
    path = Path(path)
    image_dir = path.parent / f"{path.stem}_images"
    image_dir.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for i, row in enumerate(rows):
            record: dict[str, Any] = {"prompt": row.prompt}
            for key, image in (("image_w", row.image_w), ("image_l", row.image_l)):
                file = image_dir / f"{i:06d}_{key[-1]}.png"
                image.convert("RGB").save(file, format="PNG")
                record[key] = file.relative_to(path.parent).as_posix()
            if row.tie:
                record["label"] = "tie"
            f.write(json.dumps(record) + "\n")
    return path

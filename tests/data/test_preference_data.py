"""Offline preference data (data/preference.py): Pick-a-Pic v2 Parquet and JSONL readers."""

import itertools
import json
import logging
import math
import pickle
from types import SimpleNamespace

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from rlhf_diffusion.data import (
    CORRUPT_REASONS,
    PickapicRow,
    PreferenceDataError,
    PreferenceDataSpec,
    PreferenceJsonlRow,
    PreferencePair,
    PreferenceSource,
    open_preference_source,
    pairs_to_tensors,
    write_pickapic_parquet,
    write_preference_jsonl,
)

# The columns and types of yuvalkirstain/pickapic_v2, as its dataset card lists them (dataset_info.features).
PICKAPIC_V2_CARD = [
    ("are_different", "bool"),
    ("best_image_uid", "string"),
    ("caption", "string"),
    ("created_at", "timestamp[ns]"),
    ("has_label", "bool"),
    ("image_0_uid", "string"),
    ("image_0_url", "string"),
    ("image_1_uid", "string"),
    ("image_1_url", "string"),
    ("jpg_0", "binary"),
    ("jpg_1", "binary"),
    ("label_0", "double"),
    ("label_1", "double"),
    ("model_0", "string"),
    ("model_1", "string"),
    ("ranking_id", "int64"),
    ("user_id", "int64"),
    ("num_example_per_prompt", "int64"),
    ("__index_level_0__", "int64"),
]

RED, BLUE = (220, 20, 20), (20, 20, 220)


def solid(color, size=(24, 16)) -> Image.Image:
    return Image.new("RGB", size, color)


def color_of(image: Image.Image) -> tuple[int, int, int]:
    return tuple(int(v) for v in np.asarray(image).reshape(-1, 3).mean(0).round())


def is_red(image: Image.Image) -> bool:
    r, g, b = color_of(image)
    return r > 180 and b < 60


def good_rows(n: int, prefix: str = "p") -> list[PickapicRow]:
    """n labelled rows whose winner is always red: alternately image_0 (label_0 = 1) and image_1 (label_0 = 0)."""
    return [
        PickapicRow(f"{prefix}{i}", solid(RED), solid(BLUE), 1.0)
        if i % 2 == 0
        else PickapicRow(f"{prefix}{i}", solid(BLUE), solid(RED), 0.0)
        for i in range(n)
    ]


def prompts(source) -> list[str]:
    return [pair.prompt for pair in source]


def test_writer_uses_the_exact_pickapic_v2_schema_and_round_trips(tmp_path):
    path = write_pickapic_parquet(
        tmp_path / "train-00000-of-00001.parquet",
        [
            PickapicRow("a red fox", solid(RED), solid(BLUE), 1.0),
            PickapicRow("a red fox", solid(BLUE), solid(RED), 0.0),
            PickapicRow("a blue cube", solid(RED), solid(BLUE), 0.5),
        ],
    )
    schema = pq.read_schema(path)
    assert [(f.name, str(f.type)) for f in schema] == PICKAPIC_V2_CARD
    table = pq.read_table(path)
    assert table.column("jpg_0")[0].as_py()[:2] == b"\xff\xd8"  # JPEG bytes
    assert table.column("label_1").to_pylist() == [0.0, 1.0, 0.5]
    assert table.column("num_example_per_prompt").to_pylist() == [2, 2, 1]
    assert table.column("best_image_uid").to_pylist() == [
        table.column("image_0_uid")[0].as_py(),
        table.column("image_1_uid")[1].as_py(),
        "",
    ]
    assert table.column("has_label").to_pylist() == [True, True, True]
    assert isinstance(table.column("created_at")[0].as_py().year, int)

    pairs = list(open_preference_source(PreferenceDataSpec("pickapic_parquet", path)))
    assert [p.prompt for p in pairs] == ["a red fox", "a red fox"]
    assert all(isinstance(p, PreferencePair) and p.image_w.mode == "RGB" and p.image_w.size == (24, 16) for p in pairs)
    assert [p.source for p in pairs] == [f"{path}:row 0", f"{path}:row 1"]


def test_label_orientation_winner_first(tmp_path):
    path = write_pickapic_parquet(
        tmp_path / "a.parquet",
        [
            PickapicRow("zero wins", solid(RED), solid(BLUE), 1.0),
            PickapicRow("one wins", solid(BLUE), solid(RED), 0.0),  # label_0 = 0: image_1 is the winner, flipped
        ],
    )
    pairs = list(PreferenceSource("pickapic_parquet", path))
    assert [p.prompt for p in pairs] == ["zero wins", "one wins"]
    for pair in pairs:
        assert is_red(pair.image_w) and not is_red(pair.image_l)


def test_ties_are_dropped_and_counted(tmp_path):
    rows = good_rows(5)
    rows[1] = PickapicRow("tie a", solid(RED), solid(BLUE), 0.5)
    rows[3] = PickapicRow("tie b", solid(RED), solid(BLUE), 0.5)
    source = PreferenceSource("pickapic_parquet", write_pickapic_parquet(tmp_path / "t.parquet", rows))
    assert prompts(source) == ["p0", "p2", "p4"]
    assert (source.stats.rows_read, source.stats.pairs_yielded, source.stats.ties_dropped) == (5, 3, 2)
    metrics = source.stats.as_metrics()
    assert metrics["data/ties_dropped"] == 2.0 and metrics["data/pairs_yielded"] == 3.0
    assert metrics["data/corrupt"] == 0.0
    assert {f"data/corrupt/{r}" for r in CORRUPT_REASONS} <= set(metrics)
    assert all(isinstance(v, float) for v in metrics.values())


def test_corrupt_parquet_rows_are_counted_warned_once_and_skipped(tmp_path, caplog):
    jpeg = write_pickapic_parquet(tmp_path / "probe.parquet", [PickapicRow("x", solid(RED), solid(BLUE), 1.0)])
    truncated = pq.read_table(jpeg).column("jpg_0")[0].as_py()[:200]
    rows = [
        PickapicRow("good 0", solid(RED), solid(BLUE), 1.0),
        PickapicRow("garbage bytes", b"not an image", solid(BLUE), 1.0),  # row 1: unreadable_image
        PickapicRow("truncated jpeg", solid(RED), truncated, 0.0),  # row 2: unreadable_image (2nd)
        PickapicRow("null label", solid(RED), solid(BLUE), None),  # row 3: missing_label
        PickapicRow("nan label", solid(RED), solid(BLUE), math.nan),  # row 4: missing_label
        PickapicRow("odd label", solid(RED), solid(BLUE), 0.3),  # row 5: bad_label
        PickapicRow("", solid(RED), solid(BLUE), 1.0),  # row 6: missing_prompt
        PickapicRow(None, solid(RED), solid(BLUE), 1.0),  # row 7: missing_prompt
        PickapicRow("null image", solid(RED), None, 1.0),  # row 8: missing_image
        PickapicRow("good 9", solid(BLUE), solid(RED), 0.0),
    ]
    path = write_pickapic_parquet(tmp_path / "bad.parquet", rows)
    source = PreferenceSource("pickapic_parquet", path)
    with caplog.at_level(logging.WARNING, logger="rlhf_diffusion.data.preference"):
        pairs = list(source)
    assert [p.prompt for p in pairs] == ["good 0", "good 9"]
    assert all(is_red(p.image_w) for p in pairs)
    assert dict(source.stats.corrupt) == {
        "unreadable_image": 2,
        "missing_label": 2,
        "bad_label": 1,
        "missing_prompt": 2,
        "missing_image": 1,
    }
    assert source.stats.rows_read == 10 and source.stats.corrupt_total == 8
    assert source.stats.as_metrics()["data/corrupt/missing_label"] == 2.0

    per_row = [r.getMessage() for r in caplog.records if "skipping corrupt row" in r.getMessage()]
    assert len(per_row) == 5  # once per reason
    first = {
        reason: f"{path}:row {row}"
        for reason, row in (
            ("unreadable_image", 1),
            ("missing_label", 3),
            ("bad_label", 5),
            ("missing_prompt", 6),
            ("missing_image", 8),
        )
    }
    for reason, location in first.items():
        [message] = [m for m in per_row if f"({reason})" in m]
        assert location in message and f"data/corrupt/{reason}" in message
    summary = [r.getMessage() for r in caplog.records if "pass 0" in r.getMessage()]
    assert len(summary) == 1 and "8 corrupt" in summary[0] and "2 pairs" in summary[0]


def test_directory_of_shards_and_glob(tmp_path):
    data = tmp_path / "pickapic"
    data.mkdir()
    write_pickapic_parquet(data / "train-00001-of-00002.parquet", good_rows(2, "b"))
    write_pickapic_parquet(data / "train-00000-of-00002.parquet", good_rows(3, "a"))
    (data / "README.md").write_text("not a shard")
    source = PreferenceSource("pickapic_parquet", data)
    assert [f.name for f in source.files] == ["train-00000-of-00002.parquet", "train-00001-of-00002.parquet"]
    assert prompts(source) == ["a0", "a1", "a2", "b0", "b1"]
    assert prompts(PreferenceSource("pickapic_parquet", data / "train-0000[1]-*.parquet")) == ["b0", "b1"]
    assert prompts(PreferenceSource("pickapic_parquet", f"{tmp_path}/**/*.parquet")) == ["a0", "a1", "a2", "b0", "b1"]


def test_parquet_is_streamed_batch_by_batch(tmp_path, monkeypatch):
    path = write_pickapic_parquet(tmp_path / "groups.parquet", good_rows(12), row_group_size=2)
    assert pq.ParquetFile(path).metadata.num_row_groups == 6

    batches: list[int] = []

    class CountingParquetFile(pq.ParquetFile):
        def iter_batches(self, *args, **kwargs):
            assert set(kwargs["columns"]) == {"caption", "jpg_0", "jpg_1", "label_0"}  # only what is needed
            for batch in super().iter_batches(*args, **kwargs):
                batches.append(batch.num_rows)
                yield batch

    monkeypatch.setattr(pq, "ParquetFile", CountingParquetFile)
    iterator = iter(PreferenceSource("pickapic_parquet", path, batch_size=2))
    assert next(iterator).prompt == "p0"
    assert batches == [2]  # the first pair came from the first batch; the other 5 row groups are unread
    assert [p.prompt for p in iterator] == [f"p{i}" for i in range(1, 12)]
    assert batches == [2] * 6


@pytest.mark.parametrize("num_shards", [1, 3, 4])
def test_shards_are_disjoint_and_cover_the_rows(tmp_path, num_shards):
    rows_a, rows_b = good_rows(6, "a"), good_rows(5, "b")
    rows_a[2] = PickapicRow("tie", solid(RED), solid(BLUE), 0.5)
    write_pickapic_parquet(tmp_path / "s-0.parquet", rows_a, row_group_size=4)
    write_pickapic_parquet(tmp_path / "s-1.parquet", rows_b)
    everything = [r.caption for r in rows_a + rows_b]
    shards = [
        PreferenceSource("pickapic_parquet", tmp_path, shard_index=k, num_shards=num_shards, batch_size=3)
        for k in range(num_shards)
    ]
    got = [prompts(s) for s in shards]
    for k, shard_prompts in enumerate(got):  # shard k holds the global rows k, k + n, ...
        assert shard_prompts == [c for c in everything[k::num_shards] if c != "tie"]
        assert shards[k].stats.rows_read == len(everything[k::num_shards])
    assert sorted(itertools.chain(*got)) == sorted(c for c in everything if c != "tie")
    assert sum(s.stats.ties_dropped for s in shards) == 1
    # A source is shipped to its reader (e.g. a Ray actor) by pickling, before iteration.
    shipped = pickle.loads(
        pickle.dumps(PreferenceSource("pickapic_parquet", tmp_path, shard_index=num_shards - 1, num_shards=num_shards))
    )
    assert prompts(shipped) == got[-1]


def test_shuffle_is_a_deterministic_permutation(tmp_path):
    path = write_pickapic_parquet(tmp_path / "s.parquet", good_rows(16))
    in_order = [f"p{i}" for i in range(16)]

    def order(seed, buffer=4, epochs=1):
        return prompts(PreferenceSource("pickapic_parquet", path, shuffle_buffer=buffer, seed=seed, epochs=epochs))

    first = order(seed=0)
    assert first == order(seed=0)
    assert sorted(first) == sorted(in_order) and first != in_order
    assert order(seed=1) != first
    full = order(seed=0, buffer=100)  # buffer >= rows: a permutation of the whole pass
    assert sorted(full) == sorted(in_order) and full != in_order
    two = order(seed=0, epochs=2)
    assert two[:16] == first and sorted(two[16:]) == sorted(in_order) and two[16:] != first  # new order per pass
    assert order(seed=0, buffer=1) == in_order


def test_epochs_and_forever(tmp_path):
    path = write_pickapic_parquet(tmp_path / "e.parquet", good_rows(3))
    source = PreferenceSource("pickapic_parquet", path, epochs=2)
    assert prompts(source) == ["p0", "p1", "p2"] * 2
    assert source.stats.passes == 2 and source.stats.pairs_yielded == 6
    forever = PreferenceSource("pickapic_parquet", path, epochs=None)
    assert [p.prompt for p in itertools.islice(forever, 10)] == (["p0", "p1", "p2"] * 4)[:10]
    assert forever.stats.passes == 3


def test_source_errors_name_the_path_and_column(tmp_path):
    table = pa.table({"caption": ["a"], "jpg_0": [b"x"], "jpg_1": [b"y"], "label_1": [0.0]})
    pq.write_table(table, tmp_path / "no_label.parquet")
    with pytest.raises(
        PreferenceDataError,
        match=r"no_label\.parquet: missing required Pick-a-Pic column\(s\) "
        r"label_0",
    ):
        PreferenceSource("pickapic_parquet", tmp_path / "no_label.parquet")
    pq.write_table(
        pa.table({"caption": ["a"], "jpg_0": [b"x"], "jpg_1": [b"y"], "label_0": ["1"]}), tmp_path / "str_label.parquet"
    )
    with pytest.raises(PreferenceDataError, match="column label_0 has type string, expected float or integer"):
        PreferenceSource("pickapic_parquet", tmp_path / "str_label.parquet")
    (tmp_path / "broken.parquet").write_bytes(b"this is not parquet")
    with pytest.raises(PreferenceDataError, match="broken.parquet: not a readable Parquet file"):
        PreferenceSource("pickapic_parquet", tmp_path / "broken.parquet")

    with pytest.raises(FileNotFoundError, match="not found: .*nowhere.parquet"):
        PreferenceSource("pickapic_parquet", tmp_path / "nowhere.parquet")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no \\*.parquet files in the Pick-a-Pic directory .*empty"):
        PreferenceSource("pickapic_parquet", tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no files match"):
        PreferenceSource("pickapic_parquet", tmp_path / "empty" / "*.parquet")
    with pytest.raises(FileNotFoundError, match="JSONL file not found: .*none.jsonl"):
        PreferenceSource("jsonl", tmp_path / "none.jsonl")


def test_parameter_and_spec_validation(tmp_path):
    path = write_pickapic_parquet(tmp_path / "v.parquet", good_rows(4))
    for kwargs, message in (
        ({"epochs": 0}, "epochs"),
        ({"shuffle_buffer": -1}, "shuffle_buffer"),
        ({"batch_size": 0}, "batch_size"),
        ({"shard_index": 2, "num_shards": 2}, "shard_index"),
    ):
        with pytest.raises(ValueError, match=message):
            PreferenceSource("pickapic_parquet", path, **kwargs)
    with pytest.raises(ValueError, match="unknown preference data format 'csv'"):
        PreferenceSource("csv", path)
    with pytest.raises(ValueError, match="needs path"):
        open_preference_source(SimpleNamespace(format="jsonl"))
    # A config-like object with some of the spec's fields; sharding is per reader.
    spec = SimpleNamespace(format="pickapic_parquet", path=str(path), epochs=2, shuffle_buffer=0, extra="ignored")
    source = open_preference_source(spec, shard_index=1, num_shards=2)
    assert (source.epochs, source.seed, source.batch_size) == (2, 0, 64)
    assert prompts(source) == ["p1", "p3", "p1", "p3"]


def test_a_pass_without_pairs_raises_instead_of_looping(tmp_path):
    rows = [
        PickapicRow("tie", solid(RED), solid(BLUE), 0.5),
        PickapicRow("bad", b"junk", solid(BLUE), 1.0),
        PickapicRow("", solid(RED), solid(BLUE), 1.0),
    ]
    source = PreferenceSource("pickapic_parquet", write_pickapic_parquet(tmp_path / "z.parquet", rows), epochs=None)
    with pytest.raises(
        PreferenceDataError,
        match="no preference pair in a full pass: .*pass 0: 3 rows read, 0 pairs, 1 ties dropped, 2 corrupt",
    ):
        next(iter(source))
    # A shard that owns no rows at all is the same error.
    one = write_pickapic_parquet(tmp_path / "one.parquet", good_rows(1))
    with pytest.raises(PreferenceDataError, match="shard 1/2.* 0 rows read"):
        list(PreferenceSource("pickapic_parquet", one, shard_index=1, num_shards=2))


def test_jsonl_relative_and_absolute_paths_and_ties(tmp_path, monkeypatch):
    path = write_preference_jsonl(
        tmp_path / "pairs.jsonl",
        [
            PreferenceJsonlRow("rel 0", solid(RED), solid(BLUE)),
            PreferenceJsonlRow("a tie", solid(RED), solid(BLUE), tie=True),
            PreferenceJsonlRow("rel 2", solid(RED), solid(BLUE, size=(8, 8))),
        ],
    )
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {
        "prompt": "rel 0",
        "image_w": "pairs_images/000000_w.png",
        "image_l": "pairs_images/000000_l.png",
    }
    assert json.loads(lines[1])["label"] == "tie"
    absolute = {
        "prompt": "abs",
        "image_w": str(tmp_path / "pairs_images/000000_w.png"),
        "image_l": str(tmp_path / "pairs_images/000000_l.png"),
    }
    tie_flag = {**absolute, "prompt": "tie flag", "tie": True}
    with open(path, "a") as f:
        f.write("\n" + json.dumps(absolute) + "\n" + json.dumps(tie_flag) + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative image paths resolve against the JSONL's directory, not the cwd
    source = PreferenceSource("jsonl", path)
    pairs = list(source)
    assert [p.prompt for p in pairs] == ["rel 0", "rel 2", "abs"]
    assert all(is_red(p.image_w) and not is_red(p.image_l) for p in pairs)
    assert pairs[1].image_l.size == (8, 8)
    assert [p.source for p in pairs] == [f"{path}:line 1", f"{path}:line 3", f"{path}:line 5"]
    assert (source.stats.rows_read, source.stats.ties_dropped) == (5, 2)


def test_jsonl_corrupt_lines(tmp_path, caplog):
    write_preference_jsonl(tmp_path / "ok.jsonl", [PreferenceJsonlRow("ok", solid(RED), solid(BLUE))])
    good = {"prompt": "good", "image_w": "ok_images/000000_w.png", "image_l": "ok_images/000000_l.png"}
    (tmp_path / "junk.png").write_bytes(b"not a png")
    lines = [
        json.dumps(good),  # line 1: ok
        '{"prompt": "cut off", "image_w": ',  # line 2: bad_json
        json.dumps(["a", "list"]),  # line 3: bad_json
        json.dumps({**good, "image_l": "ok_images/missing.png"}),  # line 4: missing_file
        json.dumps({**good, "prompt": "  "}),  # line 5: missing_prompt
        json.dumps({**good, "image_w": None}),  # line 6: missing_image
        json.dumps({**good, "label": "left"}),  # line 7: bad_label
        json.dumps({**good, "image_w": "junk.png"}),  # line 8: unreadable_image
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(
        ("\n".join(lines) + "\n").encode()
        + b'{"prompt": "\xff\xfe"}\n'  # line 9: not UTF-8
        + (json.dumps({**good, "prompt": "good 10"}) + "\n").encode()
    )
    source = PreferenceSource("jsonl", path)
    with caplog.at_level(logging.WARNING, logger="rlhf_diffusion.data.preference"):
        assert prompts(source) == ["good", "good 10"]
    assert dict(source.stats.corrupt) == {
        "bad_json": 3,
        "missing_file": 1,
        "missing_prompt": 1,
        "missing_image": 1,
        "bad_label": 1,
        "unreadable_image": 1,
    }
    messages = [r.getMessage() for r in caplog.records if "skipping corrupt row" in r.getMessage()]
    assert len(messages) == 6
    assert any("(bad_json)" in m and f"{path}:line 2" in m for m in messages)
    assert any("(missing_file)" in m and f"{path}:line 4" in m and "missing.png" in m for m in messages)


def test_pairs_to_tensors_matches_diffusion_dpo_transform():
    from torchvision import transforms

    gradient = np.stack(np.meshgrid(np.arange(60), np.arange(37), indexing="xy"), -1)
    array = np.concatenate([gradient * 4, gradient[..., :1] * 3], -1).astype(np.uint8)  # (37, 60, 3)
    wide, tall = Image.fromarray(array), Image.fromarray(array.transpose(1, 0, 2).copy())
    pairs = [PreferencePair("wide", wide, tall, "x:row 0"), PreferencePair("tall", tall, wide, "x:row 1")]
    prompts_out, images_w, images_l = pairs_to_tensors(pairs, 32)
    assert prompts_out == ["wide", "tall"]
    assert images_w.shape == images_l.shape == (2, 3, 32, 32) and images_w.dtype == torch.float32
    assert 0.0 <= images_w.min() and images_w.max() <= 1.0
    reference = transforms.Compose(
        [
            transforms.Resize(32, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(32),
            transforms.ToTensor(),
        ]
    )
    assert torch.equal(images_w[0], reference(wide)) and torch.equal(images_w[1], reference(tall))
    assert torch.equal(images_l[0], reference(tall))

    flipped = [
        pairs_to_tensors(pairs, 32, random_flip=True, generator=torch.Generator().manual_seed(0)) for _ in range(2)
    ]
    assert torch.equal(flipped[0][1], flipped[1][1]) and torch.equal(flipped[0][2], flipped[1][2])
    mirrored = []
    for got, plain in zip(torch.cat([flipped[0][1], flipped[0][2]]), torch.cat([images_w, images_l])):
        assert torch.equal(got, plain) or torch.equal(got, plain.flip(-1))
        mirrored.append(not torch.equal(got, plain))
    assert mirrored == [True, True, False, True]  # per image, independently (w0, w1, l0, l1) for seed 0
    with pytest.raises(ValueError, match="at least one pair"):
        pairs_to_tensors([], 32)

"""DDE / Diffusion-DPO trained from offline preference pairs: a Pick-a-Pic v2 Parquet file (the real schema) read by
the samplers, VAE-encoded and trained on, alone or mixed with online pairs; the per-iteration slice is deterministic
(so a redone shard or a resumed run reads the same pairs), and bad rows are counted, not fatal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import load_file

from rlhf_diffusion.config import ConfigError, parse_config
from rlhf_diffusion.data import PickapicRow, write_pickapic_parquet
from rlhf_diffusion.data.offline import OfflinePairStream
from rlhf_diffusion.trainer import Trainer

PROMPTS = ["a red square", "a blue circle", "a green tree", "a yellow sun", "a black cat", "a white dog"]


def image(seed: int, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def parquet(tmp_path_factory) -> Path:
    """18 rows: 15 labelled pairs (both orientations), 2 ties, 1 unreadable image — in 3 row groups."""
    rows = [PickapicRow(PROMPTS[i % len(PROMPTS)], image(2 * i), image(2 * i + 1), float(i % 2)) for i in range(15)]
    rows.insert(4, PickapicRow("a tie", image(100), image(101), 0.5))
    rows.insert(9, PickapicRow("another tie", image(102), image(103), 0.5))
    rows.insert(12, PickapicRow("broken", b"not a jpeg", image(104), 1.0))
    return write_pickapic_parquet(tmp_path_factory.mktemp("pickapic") / "train-00000.parquet", rows, row_group_size=6)


def config_dict(model_dir: Path, output_dir: Path, run_name: str, data: dict | None, algorithm: str = "dde") -> dict:
    return {
        "run_name": run_name,
        "seed": 1,
        "output_dir": str(output_dir),
        "device": "cpu",
        "model": {"pretrained": str(model_dir), "lora": {"rank": 4}},
        "sampling": {"num_steps": 3, "batch_size": 2},
        "algorithm": {"name": algorithm},
        "rewards": [{"name": "jpeg_compressibility"}],
        "resources": {"num_samplers": 2},
        "train": {"iterations": 3, "learning_rate": 1e-2, "train_batch_size": 4},
        "prompts": {"train": {"inline": PROMPTS}, "eval": {"inline": ["a cow"]}, "eval_seeds": 1},
        "tracking": {"enabled": False},
        "checkpoint": {"every": 0},
        **({"data": data} if data is not None else {}),
    }


def run(config: dict) -> list[dict]:
    trainer = Trainer(parse_config(config), use_ray=False, log=lambda *_: None)
    result = trainer.fit()
    return [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_dde_trains_from_a_pickapic_parquet_file(parquet, tiny_sd15_dir, tmp_path, one_torch_thread):
    data = {"format": "pickapic_parquet", "path": str(parquet), "pairs_per_iteration": 3, "shuffle_buffer": 4}
    lines = run(config_dict(tiny_sd15_dir, tmp_path, "offline", data))
    assert [r["iteration"] for r in lines] == [1, 2, 3]
    # 2 samplers × 3 pairs per iteration, all offline: no images were sampled for training, so no reward.
    assert all(r["rollout/offline_pairs_count"] == 6 and r["train/num_examples"] == 6 for r in lines)
    assert all("reward_mean" not in r and np.isfinite(r["train/loss"]) for r in lines)
    # 18 rows, 2 shards, 3 iterations × 3 pairs each: the ties and the corrupt row pass through the readers.
    assert sum(r["rollout/offline_ties_dropped_count"] for r in lines) >= 1
    assert sum(r["rollout/offline_corrupt_rows_count"] for r in lines) == 1
    lora = load_file(tmp_path / "offline" / "lora" / "pytorch_lora_weights.safetensors")
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # it trained


def test_online_and_offline_pairs_mix(parquet, tiny_sd15_dir, tmp_path, one_torch_thread):
    data = {"format": "pickapic_parquet", "path": str(parquet), "pairs_per_iteration": 2, "online": True}
    lines = run(config_dict(tiny_sd15_dir, tmp_path, "mixed", data, algorithm="diffusion_dpo"))
    for r in lines:
        assert r["rollout/offline_pairs_count"] == 4 and "reward_mean" in r  # online pairs were sampled and scored
        online = r["train/num_examples"] - 4
        assert 0 <= online <= 4  # ≤ 1 online pair per prompt (ties dropped), 2 prompts × 2 samplers


def test_each_iteration_reads_a_fixed_slice_whatever_the_order(parquet):
    data = parse_config(
        config_dict(
            Path("."),
            Path("."),
            "x",
            {"format": "pickapic_parquet", "path": str(parquet), "pairs_per_iteration": 2, "shuffle_buffer": 5},
        )
    ).data
    in_order = OfflinePairStream(data, seed=3, shard_index=1, num_shards=2)
    slices = [[p.source for p in in_order.take(i)[0]] for i in range(4)]
    assert len({s for part in slices for s in part}) == 8  # distinct pairs (the shard has 7 good ones: wraps)
    fresh = OfflinePairStream(data, seed=3, shard_index=1, num_shards=2)
    assert [p.source for p in fresh.take(2)[0]] == slices[2]  # a restarted sampler jumps straight to iteration 2
    assert [p.source for p in fresh.take(0)[0]] == slices[0]  # and back (a resumed or redone shard)
    other = OfflinePairStream(data, seed=3, shard_index=0, num_shards=2)
    assert not {p.source for p in other.take(0)[0]} & set(slices[0])  # shards are disjoint


def test_offline_data_is_refused_for_trajectory_methods(parquet, tiny_sd15_dir, tmp_path):
    data = {"format": "pickapic_parquet", "path": str(parquet)}
    with pytest.raises(ConfigError, match=r"data: offline preference pairs train only dde"):
        parse_config(config_dict(tiny_sd15_dir, tmp_path, "bad", data, algorithm="tailorpo"))


def test_a_missing_data_file_fails_at_start_naming_it(tiny_sd15_dir, tmp_path):
    data = {"format": "pickapic_parquet", "path": str(tmp_path / "nope.parquet")}
    with pytest.raises(Exception, match="nope.parquet"):
        Trainer(parse_config(config_dict(tiny_sd15_dir, tmp_path, "missing", data)), use_ray=False, log=lambda *_: None)


def _bad_source(kind: str, directory: Path) -> Path:
    if kind == "empty":
        return write_pickapic_parquet(directory / "empty.parquet", [], row_group_size=6)
    if kind == "undecodable":
        rows = [PickapicRow(PROMPTS[i % 6], b"not a jpeg", b"nor this", float(i % 2)) for i in range(12)]
        return write_pickapic_parquet(directory / "undecodable.parquet", rows, row_group_size=6)
    rows = [PickapicRow(PROMPTS[i % 6], image(2 * i), image(2 * i + 1), float(i % 2)) for i in range(12)]
    path = write_pickapic_parquet(directory / "scrambled.parquet", rows, row_group_size=6)
    data = bytearray(path.read_bytes())
    footer = int.from_bytes(data[-8:-4], "little") + 8  # the footer (schema) stays readable; the pages do not
    rng = np.random.default_rng(0)
    for start in range(4, len(data) - footer - 64, 997):
        data[start : start + 48] = rng.integers(0, 256, 48, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("kind", ["empty", "undecodable", "scrambled"])
def test_a_source_that_yields_no_pair_fails_before_any_work_naming_the_file(kind, tmp_path):
    """The probe's empty source and all-undecodable source failed only after 123 s (in a sampler, after the models
    loaded); a scrambled Parquet page raised pyarrow's error naming no file. `launch` now checks the source first."""
    import os
    import subprocess
    import sys
    import time

    path = _bad_source(kind, tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_diffusion.launch", "configs/tiny.yaml", "--set", f"output_dir={tmp_path}",
         "--set", f"data={{format: pickapic_parquet, path: {path}}}"],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    error = proc.stderr.strip().splitlines()[-1]  # after at most one warning per kind of corrupt row
    assert error.startswith("error: data.path: ") and str(path) in error, proc.stderr
    assert "Traceback" not in proc.stderr and "[launch]" not in proc.stdout  # Ray never started
    assert time.monotonic() - start < 60

"""Reward-hacking guards on a real local Ray cluster: held-out rewards served by the reward server, per-step KL from a
2-rank data-parallel learner, and an early stop with rollouts still in flight (max_staleness 1) — the same numbers
as the in-process loop with one learner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf_diffusion.config import parse_config
from rlhf_diffusion.testing import tiny_loop_run_config
from rlhf_diffusion.trainer import LocalTrainer, Trainer

pytestmark = pytest.mark.ray

HELDOUT = ["saturation", "brightness", "jpeg_incompressibility"]  # continuous first: see the early-stop pick


def guards_config(model_dir: Path, output_dir: Path, run_name: str, *, num_learners: int, early_stop: dict | None):
    return parse_config(
        tiny_loop_run_config(
            model_dir,
            output_dir,
            run_name,
            "tailorpo",
            seed=5,
            eval_seeds=2,
            resources={
                "num_samplers": 1,
                "num_reward_servers": 1,
                "num_learners": num_learners,
                "cpus_per_actor": 0.5,
                "max_actor_restarts": 0,
            },
            train={"iterations": 2, "train_batch_size": 3, "max_staleness": 1},
            tracking={"image_grid_every": 0},
            checkpoint={"every": 0},
            guards={"heldout_rewards": [{"name": name} for name in HELDOUT], "every": 1, "early_stop": early_stop},
        )
    )


def test_distributed_guards_match_the_local_loop_and_stop_early(ray_connected, tiny_sd15_dir, tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each actor (cpus_per_actor 0.5 → 1 thread): the same float reductions
    try:
        local = LocalTrainer(
            guards_config(tiny_sd15_dir, tmp_path, "local", num_learners=1, early_stop=None), log=lambda *_: None
        ).fit()
    finally:
        torch.set_num_threads(threads)
    local_lines = [json.loads(line) for line in (local.run_dir / "metrics.jsonl").read_text().splitlines()]
    before = local.eval_before.heldout
    fell = [name for name in HELDOUT if local_lines[0][f"heldout/{name}"] < before[name]]
    assert fell, f"no held-out reward fell after iteration 1: {before} -> {local_lines[0]}"

    # Watch a reward that fell after iteration 1: the distributed run must stop there, with iteration 2's rollouts
    # in flight (the guards do not change training, so its numbers are the local run's; a pixel statistic moves
    # continuously with the weights, JPEG size in whole bytes, hence the order of HELDOUT).
    config = guards_config(
        tiny_sd15_dir, tmp_path, "ray", num_learners=2, early_stop={"reward": fell[0], "drop_fraction": 0.0}
    )
    trainer = Trainer(config, log=lambda *_: None)
    try:
        result = trainer.fit()
    finally:
        trainer.shutdown()
    assert result.early_stop is not None and result.early_stop.iteration == 1
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [1.0]
    assert result.eval_before.heldout == pytest.approx(before, rel=1e-6)
    assert lines[0]["reward/jpeg_compressibility_mean"] == local_lines[0]["reward/jpeg_compressibility_mean"]
    for key in ["heldout/saturation", "heldout/brightness"]:
        assert lines[0][key] == pytest.approx(local_lines[0][key], rel=1e-4), key
    for key in ["heldout/jpeg_incompressibility", "eval/reward_mean"]:  # kB: a float-level weight difference can
        assert lines[0][key] == pytest.approx(local_lines[0][key], abs=5e-3), key  # move the JPEG size by bytes
    kl_keys = {key for key in local_lines[0] if key.startswith("kl/")}
    assert {f"kl/step_{k}" for k in range(3)} <= kl_keys and kl_keys == {k for k in lines[0] if k.startswith("kl/")}
    for key in kl_keys:  # two ranks' shares merged: the one-learner means
        assert lines[0][key] == pytest.approx(local_lines[0][key], rel=1e-3, abs=1e-7), key
    summary = json.loads((result.run_dir / "eval.json").read_text())
    assert summary["stopped_early"] is True and summary["iterations"] == 1
    assert (result.run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()

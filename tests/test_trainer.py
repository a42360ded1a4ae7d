"""The distributed loop on a real local Ray cluster: equals the in-process loop, survives killed samplers and
reward servers, ends with a resumable checkpoint when the learner dies, and resumes to the same final LoRA.

Every run here uses one config (TailorPO, JPEG reward, tiny SD1.5, 2 samplers, 1 reward server, pipelined with
max_staleness = 1, 6 iterations, a moving average of the weights, checkpoints every 2) and differs only in where it
runs and what is killed; the final LoRA of each must equal the uninterrupted reference run's.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_diffusion.checkpoint import latest_checkpoint, load_checkpoint
from rlhf_diffusion.config import parse_config
from rlhf_diffusion.testing import tiny_loop_run_config
from rlhf_diffusion.trainer import LearnerCrashed, LocalTrainer, Trainer

pytestmark = pytest.mark.ray

ITERATIONS = 6


def runtime_config_dict(model_dir: Path, output_dir: Path, run_name: str, **sections) -> dict:
    return tiny_loop_run_config(
        model_dir,
        output_dir,
        run_name,
        {"name": "tailorpo", "beta": 0.1, "num_candidates": 2},
        seed=3,
        train_prompts=["a cat", "a dog", "a fox", "a cow", "a bird"],
        eval_prompts=["a horse", "a fish"],
        settings={
            "model": {"lora": {"rank": 4}},
            "resources": {"num_samplers": 2, "num_reward_servers": 1, "cpus_per_actor": 1, "max_actor_restarts": 2},
            "train": {
                "iterations": ITERATIONS,
                "train_batch_size": 4,
                "max_staleness": 1,
                "ema_decay": 0.5,  # the evaluations and the export are the moving average (train.ema_decay)
                "ema_every": 1,
            },
            "tracking": {"enabled": True, "image_grid_every": 3},
            "checkpoint": {"every": 2, "keep_last": 2},
        },
        **sections,
    )


def lora_of(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "lora" / "pytorch_lora_weights.safetensors")


def assert_same_lora(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, f"LoRAs differ by up to {worst}"
    assert any(a[k].abs().max() > 0 for k in a if "lora_B" in k)  # training moved the weights


@pytest.fixture(scope="module")
def reference(ray_connected, tiny_sd15_dir, tmp_path_factory):
    """The uninterrupted distributed run."""
    out = tmp_path_factory.mktemp("runs")
    config = parse_config(runtime_config_dict(tiny_sd15_dir, out, "reference"))
    trainer = Trainer(config, log=lambda *_: None)
    try:
        result = trainer.fit()
    finally:
        trainer.shutdown()
    return result


def test_distributed_run_writes_everything_and_tracks_in_mlflow(reference):
    run_dir = reference.run_dir
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == list(range(1, ITERATIONS + 1))  # no iteration lost or doubled
    assert [r["train/staleness"] for r in lines] == [0.0] + [1.0] * (ITERATIONS - 1)  # pipelined schedule
    assert all(r["weights_version"] == r["iteration"] for r in lines)
    assert all(r["images_per_second"] > 0 and 0 < r["sampler_busy_fraction"] <= 1.0 for r in lines)
    assert all(r["reward_server/score_requests_per_batch"] >= 1 for r in lines)
    assert "reward/jpeg_compressibility_mean" in lines[0]
    assert (run_dir / "grid_before.png").is_file() and (run_dir / "grid_after.png").is_file()
    assert (run_dir / "grids" / "iter_000003.png").is_file()
    ckpt = latest_checkpoint(run_dir / "checkpoints")
    assert ckpt.name == f"iter_{ITERATIONS:06d}"
    assert len(list((run_dir / "checkpoints").glob("iter_*"))) == 2  # keep_last
    final_in_checkpoint = load_file(ckpt / "lora" / "pytorch_lora_weights.safetensors")
    assert all(torch.equal(final_in_checkpoint[k], v) for k, v in lora_of(run_dir).items())

    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    run = client.get_run(reference.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["algorithm.name"] == "tailorpo"
    assert run.data.params["resources.num_samplers"] == "2"
    history = client.get_metric_history(run.info.run_id, "reward_mean")
    assert sorted(m.step for m in history) == list(range(1, ITERATIONS + 1))
    assert {m.step for m in client.get_metric_history(run.info.run_id, "eval/reward_mean")} == {0, 3, ITERATIONS}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"grids", "lora", "eval.json"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "lora")} == {"lora/pytorch_lora_weights.safetensors"}


def test_in_process_loop_gives_the_same_lora_and_held_out_images(reference, tiny_sd15_dir, tmp_path):
    """Also the moving average (`train.ema_decay`): under Ray the learner actor publishes it for the evaluations, the
    sampler actors judge it and go back to their weights for the rollouts, and the export is the average, as in
    process (where tests/workers/test_ema.py checks it by hand)."""
    config = parse_config(runtime_config_dict(tiny_sd15_dir, tmp_path, "local", tracking={"enabled": False}))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each actor (cpus_per_actor = 1): the same float reductions, bit for bit
    try:
        result = LocalTrainer(config, log=lambda *_: None).fit()
    finally:
        torch.set_num_threads(threads)
    assert_same_lora(lora_of(result.run_dir), lora_of(reference.run_dir))
    torch.testing.assert_close(result.eval_after.images, reference.eval_after.images, atol=1e-5, rtol=0)


def _kill_at(role: str, iteration: int, killed: list):
    import ray

    def on_event(event, trainer, it):
        if event == "rollouts_submitted" and it == iteration and not killed:
            actor = trainer.samplers[1] if role == "sampler" else trainer.reward_servers[0]
            ray.kill(actor, no_restart=False)  # Ray restarts it (max_actor_restarts)
            killed.append(it)

    return on_event


@pytest.mark.parametrize("role", ["sampler", "reward_server"])
def test_killed_actor_is_restarted_and_no_iteration_is_lost_or_trained_twice(role, reference, tiny_sd15_dir, tmp_path):
    config = parse_config(runtime_config_dict(tiny_sd15_dir, tmp_path, f"kill_{role}", tracking={"enabled": False}))
    killed: list = []
    trainer = Trainer(config, log=lambda *_: None, on_event=_kill_at(role, 2, killed))
    try:
        result = trainer.fit()
    finally:
        trainer.shutdown()
    assert killed == [2]
    # One death is one restart, although the killed sampler held the calls of iterations 3 and 4 (max_staleness 1);
    # its failed shards are redone. A killed reward server is restarted by Ray (its calls are retried, the driver
    # sees no error) and counted in faults/reward_server_restarts.
    sampler_restarts, server_restarts = (1, 0) if role == "sampler" else (0, 1)
    assert result.faults["sampler_restarts"] == sampler_restarts, result.faults
    assert result.faults["reward_server_restarts"] == server_restarts, result.faults
    if role == "sampler":
        assert result.faults["shards_redone"] >= 1
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == list(range(1, ITERATIONS + 1))
    assert lines[-1]["faults/sampler_restarts"] == sampler_restarts
    assert lines[-1]["faults/reward_server_restarts"] == server_restarts
    assert json.loads((result.run_dir / "eval.json").read_text())["faults"] == result.faults
    assert_same_lora(lora_of(result.run_dir), lora_of(reference.run_dir))


def test_learner_crash_ends_with_a_resumable_checkpoint_and_resume_matches(reference, tiny_sd15_dir, tmp_path):
    import ray

    data = runtime_config_dict(tiny_sd15_dir, tmp_path, "learner_crash")

    def kill_learner(event, trainer, it):
        if event == "iteration_done" and it == 2:  # iterations 1-3 trained, checkpoint at 2; dies training 4
            ray.kill(trainer.learner, no_restart=True)

    trainer = Trainer(parse_config(data), log=lambda *_: None, on_event=kill_learner)
    with pytest.raises(LearnerCrashed) as info:
        try:
            trainer.fit()
        finally:
            trainer.shutdown()
    message = str(info.value)
    assert "during iteration 4 " in message and "iter_000002" in message and "--resume" in message  # 1-based
    assert load_checkpoint(latest_checkpoint(tmp_path / "learner_crash" / "checkpoints")).iteration == 2

    resumed = Trainer(parse_config(data), resume=True, log=lambda *_: None)
    try:
        result = resumed.fit()
    finally:
        resumed.shutdown()
    assert_same_lora(lora_of(result.run_dir), lora_of(reference.run_dir))
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == list(range(1, ITERATIONS + 1))
    summary = json.loads((result.run_dir / "eval.json").read_text())
    assert summary["eval_before"] == pytest.approx(reference.eval_before.mean)  # kept across the resume
    assert (
        result.mlflow_run_id == load_checkpoint(latest_checkpoint(result.run_dir / "checkpoints")).meta["mlflow_run_id"]
    )  # the same MLflow run continues

"""MLflow tracking (`rlhf_diffusion.tracking`) with the default sqlite store shared by every run of an output_dir."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

START_TRACKER = """
import sys, time
from rlhf_diffusion.config import load_config
from rlhf_diffusion.tracking import Tracker
config = load_config("configs/tiny.yaml", [f"output_dir={sys.argv[1]}", f"run_name=run{sys.argv[2]}"])
time.sleep(max(0.0, float(sys.argv[3]) - time.time()))  # all start the store at the same moment
tracker = Tracker(config)
tracker.log_metrics({"x": 1.0}, step=1)
tracker.end()
"""


def test_runs_started_at_once_into_one_output_dir_share_a_fresh_store(tmp_path):
    """Four runs open a not yet created `<output_dir>/mlflow.db` at the same moment: MLflow builds and migrates the
    schema on first use, which without the store lock failed in all but one ("duplicate column name: step")."""
    from mlflow.tracking import MlflowClient

    start = time.time() + 8.0  # after the four interpreters have imported mlflow
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", START_TRACKER, str(tmp_path), str(i), str(start)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(4)
    ]
    outputs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(o[-2000:] for o in outputs)
    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}")
    experiment = client.get_experiment_by_name("rlhf_diffusion")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"run{i}" for i in range(4)]
    assert all(r.data.metrics["x"] == 1.0 and r.info.status == "FINISHED" for r in runs)


class Crash(Exception):
    pass


def test_a_resumed_run_logs_each_step_once(tiny_sd15_dir, one_torch_thread, tmp_path):
    """A run dies after iteration 3 with its newest checkpoint after iteration 2, so MLflow already holds step 3;
    `--resume` redoes iteration 3 and continues the same MLflow run: every step is in the history once, the first
    one after the checkpoint (3) included, and metrics.jsonl agrees."""
    from mlflow.tracking import MlflowClient

    from rlhf_diffusion.config import parse_config
    from rlhf_diffusion.testing import tiny_loop_run_config
    from rlhf_diffusion.trainer import LocalTrainer

    config = parse_config(
        tiny_loop_run_config(
            tiny_sd15_dir,
            tmp_path,
            "resumed",
            "diffusion_dpo",
            seed=7,
            num_steps=2,
            train_prompts=["a cat", "a dog"],
            model={"lora": {"rank": 2}},
            resources={"num_samplers": 1},
            train={"iterations": 5, "train_batch_size": 2, "max_staleness": 1},
            tracking={"enabled": True, "image_grid_every": 0},
            checkpoint={"every": 2, "keep_last": 2},
        )
    )

    def crash_after_the_third(event, trainer, it):
        if event == "iteration_done" and it == 2:
            raise Crash

    with pytest.raises(Crash):
        LocalTrainer(config, log=lambda *_: None, on_event=crash_after_the_third).fit()
    result = LocalTrainer(config, resume=True, log=lambda *_: None).fit()

    client = MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}")
    for key in ("iteration", "reward_mean", "train/loss", "faults/shards_redone"):
        steps = sorted(m.step for m in client.get_metric_history(result.mlflow_run_id, key))
        assert steps == [1, 2, 3, 4, 5], (key, steps)
    assert sorted(m.step for m in client.get_metric_history(result.mlflow_run_id, "eval/reward_mean")) == [0, 5]
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [1, 2, 3, 4, 5]
    assert client.get_run(result.mlflow_run_id).info.status == "FINISHED"

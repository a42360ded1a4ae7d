"""MLflow tracking (`rlhf_diffusion.tracking`) with the default sqlite store shared by every run of an output_dir."""

import subprocess
import sys
import time
from pathlib import Path

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

"""MLflow tracking: the resolved config as params, per-iteration metrics, image grids, the final LoRA.

Default store: a sqlite file `<output_dir>/mlflow.db` with artifacts under `<output_dir>/mlartifacts`, shared by
every run written to the same `output_dir`, so runs of different methods sit side by side in one experiment:

    mlflow ui --backend-store-uri sqlite:///runs/mlflow.db
    mlflow.search_runs(experiment_names=["rlhf_diffusion"])     # with mlflow.set_tracking_uri(...) first

`tracking.tracking_uri` may name any MLflow server (http://host:5000) or store instead. A resumed run continues
the same MLflow run (its id is kept in the checkpoint), and every step stays logged once: the iterations a crashed
session logged after its last checkpoint are redone by the resumed one, but MLflow cannot delete a point, so the
points the run already holds after the checkpoint are not logged again (`Tracker(resume_after=k)`; by the fixed
schedule and seeds they are the same numbers, timings aside). `NullTracker` does nothing (tracking disabled).
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

from rlhf_diffusion.config import RunConfig, flatten_config

__all__ = ["NullTracker", "Tracker", "build_tracker", "default_tracking_uri"]

# MLflow accepts long param values, but the UI and search get unwieldy; longer values are cut with a marker.
MAX_PARAM_LENGTH = 500


def default_tracking_uri(config: RunConfig) -> str:
    return f"sqlite:///{(Path(config.output_dir).resolve() / 'mlflow.db').as_posix()}"


class NullTracker:
    """Tracking disabled: every call is a no-op."""

    run_id: str | None = None

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        pass

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        pass

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        pass

    def set_tag(self, key: str, value: str) -> None:
        pass

    def clear_tag(self, key: str) -> None:
        pass

    def end(self, status: str = "FINISHED") -> None:
        pass


class Tracker:
    """One MLflow run (created, or continued when `run_id` is given).

    Args:
        config: the run config (its flattened form becomes the run's params, its run_name the MLflow run name).
        run_id: continue this MLflow run (resume) instead of starting one.
        resume_after: with `run_id`, the iterations the checkpoint a resume starts from has done: the points the
            run already holds at later steps (logged by the crashed session) are not logged again.
    """

    def __init__(self, config: RunConfig, run_id: str | None = None, resume_after: int | None = None):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = config.tracking.tracking_uri or default_tracking_uri(config)
        with _sqlite_store_lock(self.uri):  # runs started at once into one output_dir share its store
            self.client = MlflowClient(tracking_uri=self.uri)
            experiment = self.client.get_experiment_by_name(config.tracking.experiment)
            if experiment is None:
                artifact_location = None
                if self.uri.startswith("sqlite:///"):
                    artifact_location = (Path(config.output_dir).resolve() / "mlartifacts").as_uri()
                experiment_id = self.client.create_experiment(
                    config.tracking.experiment, artifact_location=artifact_location
                )
            else:
                experiment_id = experiment.experiment_id
        if run_id is None:
            run = self.client.create_run(
                experiment_id,
                run_name=config.run_name,
                tags={"algorithm": config.algorithm.name, "mlflow.runName": config.run_name},
            )
            self.run_id = run.info.run_id
            params = [mlflow.entities.Param(key, _clip(value)) for key, value in flatten_config(config).items()]
            for start in range(0, len(params), 100):  # MLflow's batch limit is 100 params
                self.client.log_batch(self.run_id, params=params[start : start + 100])
        else:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        # (key, step) already logged after the resume point: not logged again (each step once).
        self.logged: set[tuple[str, int]] = set()
        if run_id is not None and resume_after is not None:
            for key in self.client.get_run(run_id).data.metrics:
                self.logged.update(
                    (key, m.step) for m in self.client.get_metric_history(run_id, key) if m.step > resume_after
                )

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Logs finite numeric metrics at `step` (non-finite values are skipped: MLflow rejects NaN in sqlite), except
        those the run already holds at `step` from before a resume."""
        import mlflow

        timestamp = mlflow.utils.time.get_current_time_millis()
        items = [
            mlflow.entities.Metric(_metric_key(k), float(v), timestamp, step)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and math.isfinite(v) and (_metric_key(k), step) not in self.logged
        ]
        for start in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[start : start + 1000])

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        self.client.log_dict(self.run_id, data, artifact_file)

    def set_tag(self, key: str, value: str) -> None:
        """Sets a run tag (e.g. `early_stop` = why the run stopped before train.iterations)."""
        self.client.set_tag(self.run_id, key, _clip(value))

    def clear_tag(self, key: str) -> None:
        """Removes a run tag if it is set (a resumed run that went on past an earlier early stop)."""
        if key in self.client.get_run(self.run_id).data.tags:
            self.client.delete_tag(self.run_id, key)

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)


@contextlib.contextmanager
def _sqlite_store_lock(uri: str):
    """An exclusive lock (flock on `<store>.lock`) while a sqlite store is first opened and the experiment found or
    made: MLflow creates and migrates the schema on first use, and two runs doing that at once into one
    `output_dir` fail with "duplicate column name" (or "experiment already exists"). Other stores: no lock."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    import fcntl

    lock = Path(uri[len("sqlite:///") :] + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _clip(value: str) -> str:
    return value if len(value) <= MAX_PARAM_LENGTH else value[: MAX_PARAM_LENGTH - 3] + "..."


def _metric_key(key: str) -> str:
    # MLflow keys allow alphanumerics, '_', '-', '.', ' ', '/'; replace anything else.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in key)


def build_tracker(
    config: RunConfig, run_id: str | None = None, resume_after: int | None = None
) -> Tracker | NullTracker:
    """The run's tracker (`Tracker`; `resume_after`: see there), or a `NullTracker` when tracking is disabled."""
    return Tracker(config, run_id, resume_after) if config.tracking.enabled else NullTracker()

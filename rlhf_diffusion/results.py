"""What a run reports: one metrics.jsonl record per iteration (`iteration_record`), the progress line or bar
(`Progress`), eval.json (`run_summary`, `write_results`) and what `Trainer.fit` returns (`RunResult`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rlhf_diffusion.batches import RolloutBatch, TrainResult
from rlhf_diffusion.config import RunConfig
from rlhf_diffusion.evaluation import EvalResult, paired_heldout
from rlhf_diffusion.guards import EarlyStop

__all__ = ["Progress", "RunResult", "iteration_record", "run_summary", "write_results"]


@dataclass
class RunResult:
    """What `Trainer.fit` returns."""

    run_dir: Path
    eval_before: EvalResult | None
    eval_after: EvalResult
    history: list[dict[str, float]] = field(default_factory=list)
    lora_file: Path | None = None
    unet_dir: Path | None = None  # model.finetune: full — the diffusers UNet directory instead of a LoRA file
    mlflow_run_id: str | None = None
    faults: dict[str, int] = field(default_factory=dict)
    early_stop: EarlyStop | None = None  # set when guards.early_stop ended the run before train.iterations
    paired: dict[str, dict[str, float]] = field(default_factory=dict)  # eval.json "paired" (`paired_heldout`)


def iteration_record(
    step: int,
    batch: RolloutBatch,
    result: TrainResult,
    *,
    seconds: float,
    driver_cpu_seconds: float,
    wait_seconds: float,
    sampler_busy_fraction: float,
    learner_busy_fraction: float,
    faults: dict[str, int],
) -> dict[str, float]:
    """The metrics of training iteration `step` (1-based): rewards of its batch, throughput, busy fractions, fault
    counters, the rollout's and the learner's metrics and the learner's diagnostics (kl/..., signal/...)."""
    images = int(batch.rewards.numel())
    record = {
        "iteration": float(step),
        "weights_version": float(result.version),
        **(
            {
                "reward_mean": batch.rewards.mean().item(),  # absent for offline-only batches
                "reward_std": batch.rewards.std().item() if batch.rewards.numel() > 1 else 0.0,
            }
            if batch.rewards.numel()
            else {}
        ),
        **{f"reward/{name}_mean": v.mean().item() for name, v in batch.per_reward.items() if v.numel()},
        **{
            f"reward/{name}_std": (v.std().item() if v.numel() > 1 else 0.0)
            for name, v in batch.per_reward.items()
            if v.numel()
        },
        "images_per_second": images / max(seconds, 1e-9),
        "wait_for_rollouts_seconds": wait_seconds,
        "seconds": seconds,
        # CPU time of the driver's process: with --no-ray every role runs in it, so this is the iteration's whole
        # compute, unaffected by other work on the machine; under Ray the actors' work is not in it
        "driver_cpu_seconds": driver_cpu_seconds,
        "sampler_busy_fraction": sampler_busy_fraction,
        "learner_busy_fraction": learner_busy_fraction,
        "dropped": float(result.dropped),
        **{f"faults/{k}": float(v) for k, v in faults.items()},
        **{f"rollout/{k}": v for k, v in batch.metrics.items()},
        **{f"train/{k}": v for k, v in result.metrics.items()},
    }
    record.update(result.diagnostics)  # kl/... (guards.log_kl), signal/... (train.signal_every)
    return record


class Progress:
    """One line per iteration through `log`, or (progress=True) a tqdm bar with the same numbers."""

    def __init__(self, progress: bool, total: int, initial: int, desc: str, log: Callable[[str], None]):
        self.log = log
        self.bar = None
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="it", dynamic_ncols=True)

    def update(self, step: int, record: dict[str, float], result: TrainResult) -> None:
        loss = result.metrics.get("loss", float("nan"))
        signal = record.get("signal/coherence")  # train.signal_every: ≈ 0 = the gradient is noise
        signal_text = "" if signal is None else f" coherence {signal:+.3f}"
        line = (
            f"[iter {step:4d}] reward {record.get('reward_mean', float('nan')):.4f} loss {loss:.4f}"
            f"{signal_text} staleness {int(result.metrics.get('staleness', 0))} "
            f"{record['images_per_second']:.2f} img/s"
        )
        if self.bar is not None:
            self.bar.set_postfix(
                reward=f"{record.get('reward_mean', float('nan')):.4f}",
                loss=f"{loss:.4f}",
                **({} if signal is None else {"coh": f"{signal:+.3f}"}),
                img_s=f"{record['images_per_second']:.2f}",
            )
            self.bar.update(1)
        else:
            self.log(line)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_summary(
    config: RunConfig,
    eval_before: dict[str, Any] | None,
    eval_after: EvalResult,
    heldout_before: dict[str, float],
    done: int,
    planned: int,
    stop: EarlyStop | None,
    faults: dict[str, int],
    mlflow_run_id: str | None,
) -> dict[str, Any]:
    """eval.json: the evaluation before (a summary, kept across resumes) and after, per reward and held-out
    reward; iterations done and planned; whether and why guards.early_stop ended the run."""
    heldout = bool(config.guards.heldout_rewards)
    return {
        "eval_before": eval_before["mean"] if eval_before else None,
        "eval_after": eval_after.mean,
        "per_reward_before": eval_before["per_reward"] if eval_before else None,
        "per_reward_after": eval_after.per_reward,
        "heldout_before": heldout_before if heldout else None,
        "heldout_after": eval_after.heldout if heldout else None,
        "iterations": done,
        "iterations_planned": planned,
        "stopped_early": stop is not None,
        "stop_reason": stop.reason if stop is not None else None,
        # per reward: mean before/after, paired SE, images fixed/broken (0/1 scores) with a sign test
        "paired": paired_heldout(eval_before, eval_after),
        "algorithm": config.algorithm.name,
        "faults": faults,
        "mlflow_run_id": mlflow_run_id,
    }


def write_results(
    tracker: Any,
    run_dir: Path,
    summary: dict[str, Any],
    final_metrics: dict[str, float],
    export_dir: Path,
    resumed: bool,
) -> None:
    """Writes eval.json (`summary`, from `run_summary`) and logs the end of the run to the tracker: the final
    evaluation's metrics (an early stop's pass was logged at its iteration, in the loop) or the early stop's tags,
    grid_after.png, the exported weights and eval.json."""
    (run_dir / "eval.json").write_text(json.dumps(summary, indent=2))
    done = summary["iterations"]
    if not summary["stopped_early"]:
        tracker.log_metrics(final_metrics, step=done)
        if resumed:  # the run went on past an earlier early stop
            tracker.clear_tag("early_stop")
            tracker.clear_tag("early_stop_iteration")
    else:
        tracker.set_tag("early_stop", summary["stop_reason"])
        tracker.set_tag("early_stop_iteration", str(done))
    tracker.log_artifact(run_dir / "grid_after.png", "grids")
    for path in sorted(export_dir.iterdir()):
        tracker.log_artifact(path, export_dir.name)
    tracker.log_dict(summary, "eval.json")

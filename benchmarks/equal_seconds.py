"""Equal-CPU-seconds comparison: for each run, the checkpoint whose training time is closest to a target.

    python benchmarks/equal_seconds.py --target-from runs/exp7/k5lr1_s0,runs/exp7/k5lr1_s4 runs/exp8/d3po_s0 ...
    python benchmarks/equal_seconds.py --target 295 runs/exp8/d3po_s0 --lora-args

A run's training time after iteration i is the sum over its iterations of metrics.jsonl's `driver_cpu_seconds`
(the CPU time of the run's process during the iteration: rollouts, rewards, the learner's steps, the
learning-signal round where there is one; not the before / after evaluation, not start-up). Run in one process
(`--no-ray`) at one torch thread (OMP_NUM_THREADS=1), that is the whole run's compute on one core, whatever else the
machine is doing; under Ray the actors' work is not in it, so compare `--no-ray` runs only. Runs from before the
field existed fall back to `seconds` (wall time), which other work on the machine inflates (`--wall` forces it).

The target is given in seconds (`--target`) or as the mean total training time of reference runs
(`--target-from`, e.g. the embedded default's seeds). For each run this prints the iteration whose cumulative
time is closest to the target and whether a checkpoint of it exists (`checkpoint.every: 1` keeps one per
iteration; `checkpoint.keep_last` must keep enough of them). `--lora-args` prints `--lora NAME=CHECKPOINT` for
`python -m rlhf_diffusion.evaluate` instead, NAME being the run directory's name and `_i<iteration>`.
With the default `train.lr_schedule: constant` the checkpoint after iteration i of a longer run is the run of i
iterations (the fixed schedule of prompts and seeds does not depend on `train.iterations`); a decaying schedule
depends on `train.iterations`, so its runs are compared only at their end.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path


def cumulative_seconds(run_dir: Path, wall: bool = False) -> list[float]:
    """Training seconds after each iteration 1..n of a run: metrics.jsonl's `driver_cpu_seconds` summed, or its
    `seconds` (wall time) where an iteration lacks them or `wall` is set."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: no such file (not a run directory?)")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    rows = [row for row in rows if "seconds" in row]
    key = "seconds" if wall or not all("driver_cpu_seconds" in row for row in rows) else "driver_cpu_seconds"
    total, out = 0.0, []
    for row in rows:
        total += float(row[key])
        out.append(total)
    if not out:
        raise SystemExit(f"{path}: no iteration has a 'seconds' entry")
    return out


def closest_iteration(cumulative: list[float], target: float) -> int:
    """The iteration (from 1) whose cumulative seconds are nearest the target (the earlier one on a tie)."""
    return min(range(len(cumulative)), key=lambda i: (abs(cumulative[i] - target), i)) + 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN_DIR")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--target", type=float, help="training seconds")
    source.add_argument("--target-from", help="comma-separated reference run dirs: their mean total training time")
    parser.add_argument("--lora-args", action="store_true", help="print evaluate's --lora arguments only")
    parser.add_argument("--wall", action="store_true", help="use wall time (`seconds`), not the process CPU time")
    args = parser.parse_args(argv)
    if args.target is not None:
        target = args.target
    else:
        totals = [cumulative_seconds(Path(d), args.wall)[-1] for d in args.target_from.split(",")]
        target = statistics.mean(totals)
        if not args.lora_args:
            print(f"target {target:.0f} s: the mean total training time of {', '.join(f'{t:.0f}' for t in totals)}")
    lora_args = []
    for run in args.runs:
        cumulative = cumulative_seconds(run, args.wall)
        i = closest_iteration(cumulative, target)
        checkpoint = run / "checkpoints" / f"iter_{i:06d}"
        if args.lora_args:
            if not checkpoint.is_dir():
                raise SystemExit(f"{checkpoint}: no checkpoint of iteration {i} (checkpoint.every / keep_last)")
            lora_args.append(f"--lora {run.name}_i{i}={checkpoint}")
            continue
        per_iteration = (cumulative[-1] - cumulative[0]) / max(1, len(cumulative) - 1)
        note = "" if checkpoint.is_dir() else "  (no checkpoint kept)"
        ran_short = "  (the run ends short of the target)" if cumulative[-1] < target - per_iteration / 2 else ""
        print(
            f"{run}: iteration {i} of {len(cumulative)} at {cumulative[i - 1]:.0f} s "
            f"(about {per_iteration:.0f} s an iteration after the first){note}{ran_short}"
        )
    if args.lora_args:
        print(" ".join(lora_args))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Training-reward curves from comparable samples: every kept checkpoint of every run, judged on the same images.

    python benchmarks/reward_curves.py --out runs/curves dde_single=runs/a,runs/b tailorpo=runs/c,runs/d
    python benchmarks/reward_curves.py --out runs/curves tailorpo=runs/c -- --model testbed:pipeline --seeds 2 ...

The reward a run logs per iteration (metrics.jsonl `reward_mean`) is the reward of the images that method trains
on, and those differ by method: the final-pair methods (DDE, DDE-Single, Diffusion-DPO) score plain samples of the
current policy (the mean over all samples per prompt); TailorPO scores the candidates of its branched trajectory
(and its main trajectory continues from the better one, a greedy search); TailorPO-G's winners carry a reward-gradient
step; D3PO's pairs are plain. A rising logged reward for TailorPO-G can be the guidance, not the policy.

This script scores every method the same way. Each kept checkpoint of each run (`checkpoints/iter_*`) and the base
model sample the same held-out prompts with the same fixed seeds, plainly (no guidance, no branching), through
`python -m rlhf_diffusion.evaluate` (its arguments after `--`; default: the testbed's 82 held-out captions × 1
seed, 10 steps, η 1, guidance 4, the training reward `testbed_reward` and the checker). Each checkpoint gives,
per reward, the change from the base model on those images, paired by image. Its x position is the run's training
CPU-seconds up to that iteration: the sum of metrics.jsonl's `driver_cpu_seconds` (`benchmarks/equal_seconds.py`;
compare runs made in one process, `--no-ray`, at one torch thread).

Per group (method), the points are averaged over its runs (seeds) at each checkpoint iteration, with the standard
error over runs. Written to --out: `curves.json` (every point, and per run the logged curve), `curves.md` (a table
per reward) and `curves.png` (one panel per reward, plus the logged training reward as each method saw it).
The per-run evaluations are kept under --out/<group>/<run>/ and reused by a rerun (delete them to redo).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))

from equal_seconds import cumulative_seconds  # noqa: E402

DEFAULT_EVALUATE_ARGS = [
    "--model",
    "testbed:pipeline",
    "--prompts",
    "testbed_heldout",
    "--seeds",
    "1",
    "--steps",
    "10",
    "--eta",
    "1",
    "--guidance",
    "4",
    "--reward",
    "testbed_reward",
    "--rewards-yaml",
    str(REPO / "configs" / "eval" / "testbed_checker.yaml"),
]


def kept_checkpoints(run_dir: Path, every: int = 1) -> dict[int, Path]:
    """{iteration: checkpoint directory} of a run's kept checkpoints (`checkpoints/iter_<n>`) whose iteration is a
    multiple of `every`."""
    found = {}
    for path in sorted((run_dir / "checkpoints").glob("iter_*")):
        if path.is_dir() and path.name[5:].isdigit() and int(path.name[5:]) % every == 0:
            found[int(path.name[5:])] = path
    if not found:
        raise SystemExit(f"{run_dir}/checkpoints: no checkpoint kept (checkpoint.every / keep_last)")
    return found


def logged_rewards(run_dir: Path) -> list[float]:
    """metrics.jsonl's `reward_mean` per training iteration 1..n (the reward of the images the method trains on)."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [float(row["reward_mean"]) for row in rows if "seconds" in row and "reward_mean" in row]


def evaluate_run(run_dir: Path, out: Path, evaluate_args: list[str], every: int = 1) -> dict[str, dict]:
    """paired.json of one `rlhf_diffusion.evaluate` call over a run's kept checkpoints (labels `i<iteration>`;
    iterations that are multiples of `every`); reuses `out/paired.json` when it already holds every one."""
    checkpoints = kept_checkpoints(run_dir, every)
    labels = {f"i{i}": path for i, path in checkpoints.items()}
    paired_path = out / "paired.json"
    if paired_path.is_file():
        paired = json.loads(paired_path.read_text())
        if set(labels) <= set(paired):
            return {label: paired[label] for label in labels}
    command = [sys.executable, "-m", "rlhf_diffusion.evaluate", *evaluate_args, "--grid-prompts", "0"]
    command += ["--out", str(out)]
    for label, path in labels.items():
        command += ["--lora", f"{label}={path}"]
    print(f"evaluating {len(labels)} checkpoints of {run_dir}", flush=True)
    done = subprocess.run(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise SystemExit(f"evaluate failed for {run_dir} (exit {done.returncode}):\n{done.stdout[-3000:]}")
    return json.loads(paired_path.read_text())


def run_points(run_dir: Path, paired: dict[str, dict]) -> list[dict]:
    """One point per kept checkpoint (and the base model at 0 s): iteration, training CPU-seconds, and per reward
    the paired change from the base model (delta, paired SE, before, after)."""
    seconds = cumulative_seconds(run_dir)
    points = []
    for label, columns in paired.items():
        iteration = int(label[1:])
        if iteration > len(seconds):
            raise SystemExit(f"{run_dir}: checkpoint {iteration} but metrics.jsonl has {len(seconds)} iterations")
        points.append(
            {
                "iteration": iteration,
                "cpu_seconds": seconds[iteration - 1],
                "rewards": {
                    key: {k: v[k] for k in ("before", "after", "delta", "paired_se") if k in v}
                    for key, v in columns.items()
                },
            }
        )
    return sorted(points, key=lambda p: p["iteration"])


def group_curve(runs: dict[str, list[dict]]) -> list[dict]:
    """Per checkpoint iteration kept by every run of the group: the mean CPU-seconds and, per reward, the mean
    delta over runs with its standard error over runs (None for a single run)."""
    common = set.intersection(*({p["iteration"] for p in points} for points in runs.values()))
    curve = [{"iteration": 0, "cpu_seconds": 0.0, "runs": len(runs), "rewards": {}}]
    for iteration in sorted(common):
        at = [next(p for p in points if p["iteration"] == iteration) for points in runs.values()]
        rewards = {}
        for key in at[0]["rewards"]:
            deltas = [p["rewards"][key]["delta"] for p in at]
            se = statistics.stdev(deltas) / len(deltas) ** 0.5 if len(deltas) > 1 else None
            rewards[key] = {"delta": statistics.mean(deltas), "se": se, "per_run": deltas}
        curve.append(
            {
                "iteration": iteration,
                "cpu_seconds": statistics.mean(p["cpu_seconds"] for p in at),
                "runs": len(at),
                "rewards": rewards,
            }
        )
    for key in curve[1]["rewards"] if len(curve) > 1 else ():
        curve[0]["rewards"][key] = {"delta": 0.0, "se": 0.0, "per_run": [0.0] * len(runs)}
    return curve


def plotted_keys(curves: dict[str, list[dict]]) -> list[str]:
    """The rewards of the curves, without evaluate's weighted `total` of them (a sum of unlike scores)."""
    return sorted({key for curve in curves.values() for point in curve for key in point["rewards"]} - {"total"})


def markdown(curves: dict[str, list[dict]], logged: dict[str, dict[str, list[float]]]) -> str:
    keys = plotted_keys(curves)
    lines = []
    for key in keys:
        lines += [
            f"### {key}: change from the base model on the same held-out images (mean over runs ± SE)",
            "",
            "| method | iteration | training CPU-s | Δ | per run |",
            "|---|---|---|---|---|",
        ]
        for group, curve in curves.items():
            for point in curve[1:]:
                r = point["rewards"].get(key)
                if r is None:
                    continue
                se = "" if r["se"] is None else f" ± {r['se']:.3f}"
                per_run = ", ".join(f"{d:+.3f}" for d in r["per_run"])
                at = f"| {group} | {point['iteration']} | {point['cpu_seconds']:.0f} |"
                lines.append(f"{at} {r['delta']:+.3f}{se} | {per_run} |")
        lines.append("")
    lines += [
        "### The training reward as each run logged it (metrics.jsonl reward_mean: its own training samples)",
        "",
        "| method | first iteration | last iteration | change |",
        "|---|---|---|---|",
    ]
    for group, runs in logged.items():
        firsts = [values[0] for values in runs.values() if values]
        lasts = [values[-1] for values in runs.values() if values]
        if firsts:
            first, last = statistics.mean(firsts), statistics.mean(lasts)
            lines.append(f"| {group} | {first:.4f} | {last:.4f} | {last - first:+.4f} |")
    return "\n".join(lines) + "\n"


def plot(curves: dict[str, list[dict]], logged: dict[str, dict[str, list[float]]], seconds: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = plotted_keys(curves)
    fig, axes = plt.subplots(1, len(keys) + 1, figsize=(5 * (len(keys) + 1), 4.2))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for g, (group, runs) in enumerate(logged.items()):
        n = min(len(values) for values in runs.values())
        xs = [statistics.mean(seconds[group][run][i] for run in runs) for i in range(n)]
        change = [statistics.mean(values[i] - values[0] for values in runs.values()) for i in range(n)]
        smooth = [statistics.mean(change[max(0, i - 2) : i + 1]) for i in range(n)]  # mean of the last 3 iterations
        axes[0].plot(xs, smooth, color=colours[g % len(colours)], label=group)
    axes[0].axhline(0, color="grey", lw=0.5)
    axes[0].set_title(
        "training reward as logged (each method's own\ntraining samples; mean over seeds, last 3)", fontsize=10
    )
    axes[0].set_ylabel("change from iteration 1")
    for k, key in enumerate(keys, start=1):
        ax = axes[k]
        for g, (group, curve) in enumerate(curves.items()):
            xs = [p["cpu_seconds"] for p in curve]
            ys = [p["rewards"].get(key, {}).get("delta", float("nan")) for p in curve]
            ses = [p["rewards"].get(key, {}).get("se") or 0.0 for p in curve]
            colour = colours[g % len(colours)]
            ax.plot(xs, ys, "o-", color=colour, ms=3, label=group)
            ax.fill_between(
                xs, [y - s for y, s in zip(ys, ses)], [y + s for y, s in zip(ys, ses)], color=colour, alpha=0.15
            )
        ax.axhline(0, color="grey", lw=0.5)
        ax.set_title(f"{key}, held-out plain samples\n(same prompts and seeds; Δ from the base model)", fontsize=10)
        ax.set_ylabel("Δ (mean over seeds ± SE)")
    for ax in axes:
        ax.set_xlabel("training CPU-seconds")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    evaluate_args = DEFAULT_EVALUATE_ARGS
    if "--" in argv:
        cut = argv.index("--")
        argv, evaluate_args = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="+", metavar="GROUP=RUN_DIR[,RUN_DIR...]")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--every",
        default="1",
        help="judge only checkpoints whose iteration is a multiple of N; GROUP=N,GROUP=N,... per group (default 1)",
    )
    args = parser.parse_args(argv)
    groups = {}
    for spec in args.groups:
        name, sep, dirs = spec.partition("=")
        if not sep or not name or not dirs:
            raise SystemExit(f"{spec!r}: expected GROUP=RUN_DIR[,RUN_DIR...]")
        groups[name] = [Path(d) for d in dirs.split(",")]
    every = {group: 1 for group in groups}
    for spec in args.every.split(","):
        group, sep, n = spec.rpartition("=")
        if not n.isdigit() or int(n) < 1 or (sep and group not in groups):
            raise SystemExit(f"--every {spec!r}: expected N or GROUP=N with N >= 1 and GROUP one of the groups")
        every.update({group: int(n)} if sep else dict.fromkeys(groups, int(n)))
    points, curves, logged, seconds = {}, {}, {}, {}
    for group, run_dirs in groups.items():
        points[group], logged[group], seconds[group] = {}, {}, {}
        for run_dir in run_dirs:
            paired = evaluate_run(run_dir, args.out / group / run_dir.name, evaluate_args, every[group])
            points[group][run_dir.name] = run_points(run_dir, paired)
            logged[group][run_dir.name] = logged_rewards(run_dir)
            seconds[group][run_dir.name] = cumulative_seconds(run_dir)
        curves[group] = group_curve(points[group])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "curves.json").write_text(
        json.dumps({"evaluate_args": evaluate_args, "curves": curves, "runs": points, "logged": logged}, indent=1)
    )
    (args.out / "curves.md").write_text(markdown(curves, logged))
    plot(curves, logged, seconds, args.out / "curves.png")
    print((args.out / "curves.md").read_text())
    print(f"wrote {args.out / 'curves.json'}, curves.md, curves.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

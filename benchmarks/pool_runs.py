"""Pool finished runs over seeds: the held-out paired comparisons of each run's eval.json, per group and pooled.

    python benchmarks/pool_runs.py dde_single=runs/a,runs/b,runs/c diffusion_dpo=runs/d,runs/e [--key checker_all]

A DIR may also be the --out directory of `python -m rlhf_diffusion.evaluate` with one or more LoRAs (for example
the runs re-evaluated on more held-out seeds than they trained with): its paired.json compares each LoRA with the
base model image by image, and each LoRA counts as one run of the group (`DIR@PREFIX`: the LoRAs whose label starts
with PREFIX, e.g. `dde=runs/eval8/b@dde_s`).

Each run directory's eval.json holds the before / after comparison on the fixed held-out images (`paired`: the
training reward and every held-out reward). Per group this prints each run's Δ and flips, then the flips summed
over the group's runs with an exact two-sided sign test, the mean Δ over runs ± its standard error, and the
training reward's mean Δ, as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rlhf_diffusion.stats import sign_test_p  # noqa: E402


def load(run_dir: str, key: str) -> list[dict]:
    """The runs in `run_dir`: one for a run directory (eval.json), one per LoRA for an evaluate --out directory
    (`DIR@PREFIX`: only the LoRAs whose label starts with PREFIX)."""
    run_dir, _, prefix = run_dir.partition("@")
    if not (Path(run_dir) / "eval.json").is_file() and (Path(run_dir) / "paired.json").is_file():
        evaluated = json.loads((Path(run_dir) / "paired.json").read_text())
        evaluated = {label: columns for label, columns in evaluated.items() if label.startswith(prefix)}
        if not evaluated:
            raise SystemExit(f"{run_dir}/paired.json: no LoRA label starts with {prefix!r}")
        missing = [label for label, columns in evaluated.items() if key not in columns]
        if missing:
            raise SystemExit(f"{run_dir}/paired.json: {missing[0]} has no reward {key!r}")
        return [{"run": label, "held_out": columns[key], "reward": None} for label, columns in evaluated.items()]
    data = json.loads((Path(run_dir) / "eval.json").read_text())
    paired = data["paired"]
    if key not in paired:
        raise SystemExit(f"{run_dir}/eval.json has no paired comparison {key!r} (has: {', '.join(paired)})")
    return [{"run": run_dir, "held_out": paired[key], "reward": paired.get("reward")}]


def row(label: str, runs: list[dict]) -> str:
    deltas = [r["held_out"]["delta"] for r in runs]
    up, down = ("fixed", "broken") if "fixed" in runs[0]["held_out"] else ("rose", "fell")
    fixed = sum(int(r["held_out"][up]) for r in runs)
    broken = sum(int(r["held_out"][down]) for r in runs)
    se = statistics.stdev(deltas) / len(deltas) ** 0.5 if len(deltas) > 1 else float("nan")
    per_run = ", ".join(f"{d:+.3f} ({int(r['held_out'][up])}/{int(r['held_out'][down])})"
                        for d, r in zip(deltas, runs))  # fmt: skip
    reward = [r["reward"]["delta"] for r in runs if r["reward"]]
    reward_text = f"{statistics.mean(reward):+.4f}" if reward else "–"
    return (
        f"| {label} | {len(runs)} | {per_run} | {statistics.mean(deltas):+.3f} ± {se:.3f} | {fixed} / {broken} | "
        f"{sign_test_p(fixed, broken):.2g} | {reward_text} |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("groups", nargs="+", metavar="LABEL=DIR[,DIR...]")
    parser.add_argument("--key", default="checker_all", help="the held-out comparison to pool (eval.json 'paired')")
    args = parser.parse_args(argv)
    print(f"| method | runs | Δ {args.key} per run (fixed/broken) | mean Δ ± SE over runs | fixed / broken pooled "
          "| sign test p | Δ training reward (mean) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for group in args.groups:
        label, sep, dirs = group.partition("=")
        if not sep or not dirs:
            parser.error(f"{group!r}: expected LABEL=DIR[,DIR...]")
        print(row(label, [run for d in dirs.split(",") for run in load(d, args.key)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

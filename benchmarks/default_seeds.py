"""The embedded default, run as a user runs it, for several training seeds, with the held-out results pooled.

    python benchmarks/default_seeds.py                      # seeds 0 1 2 of configs/tiny.yaml under Ray
    python benchmarks/default_seeds.py --seeds 0 1 --no-ray --set train.iterations=10

Each seed is one `python -m rlhf_diffusion.launch CONFIG --set seed=S --set run_name=<name>_seedS --overwrite` (a
fresh local Ray instance each time, exactly the README's first command; --overwrite: a rerun replaces that seed's
earlier run under --out), timed end to end. Its `eval.json` holds, per held-out reward, the paired before/after
comparison of the fixed evaluation images (`paired`: mean change, paired SE, images fixed / broken). The evaluation
images and seeds are the same in every run, so the pooled sign test adds the fixed and broken counts of all seeds
(each seed's images are a separate trained model's; the before images are shared).

Prints one line per seed and the pooled result per held-out reward, and writes --out/default_seeds.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rlhf_diffusion.stats import sign_test_p  # noqa: E402


def run_seed(config: str, seed: int, out: Path, overrides: list[str], use_ray: bool) -> dict:
    name = f"{Path(config).stem}_seed{seed}"
    command = [
        sys.executable,
        "-m",
        "rlhf_diffusion.launch",
        config,
        "--no-progress",
        "--set",
        f"seed={seed}",
        "--set",
        f"run_name={name}",
        "--set",
        f"output_dir={out}",
        "--overwrite",
    ]
    for override in overrides:
        command += ["--set", override]
    if not use_ray:
        command.append("--no-ray")
    start = time.perf_counter()
    log = out / f"{name}.log"
    with open(log, "w") as handle:
        code = subprocess.call(
            command,
            stdout=handle,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"},
        )
    seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"seed {seed}: launch exited with {code}; see {log}")
    summary = json.loads((out / name / "eval.json").read_text())
    return {"seed": seed, "seconds": seconds, "run_dir": str(out / name), "log": str(log), **summary}


def pooled(runs: list[dict]) -> dict[str, dict]:
    """Per paired score (the training reward and each held-out reward): mean ± std over seeds of the change, and the
    fixed/broken (or rose/fell) counts summed over seeds with their sign test."""
    out = {}
    for key in runs[0].get("paired", {}):
        rows = [r["paired"][key] for r in runs if key in r.get("paired", {})]
        up, down = ("fixed", "broken") if "fixed" in rows[0] else ("rose", "fell")
        deltas = [row["delta"] for row in rows]
        total_up, total_down = int(sum(row[up] for row in rows)), int(sum(row[down] for row in rows))
        out[key] = {
            "before": rows[0]["before"],
            "after_mean": statistics.mean(row["after"] for row in rows),
            "delta_mean": statistics.mean(deltas),
            "delta_std": statistics.stdev(deltas) if len(deltas) > 1 else 0.0,
            "delta_min": min(deltas),
            up: total_up,
            down: total_down,
            "sign_test_p": sign_test_p(total_up, total_down),
            "seeds": len(rows),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path("runs/default_seeds"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--no-ray", action="store_true", help="run each seed in one process (launch --no-ray)")
    args = parser.parse_args(argv)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in args.seeds:
        run = run_seed(args.config, seed, args.out, args.overrides, not args.no_ray)
        runs.append(run)
        parts = [
            f"{key} {p['before']:.3f} -> {p['after']:.3f}"
            + (
                f" ({int(p['fixed'])} fixed / {int(p['broken'])} broken, p = {p['sign_test_p']:.2g})"
                if "fixed" in p
                else f" (paired SE {p['paired_se']:.3f})"
            )
            for key, p in run.get("paired", {}).items()
        ]
        print(f"seed {seed}: {run['seconds']:.0f} s, {run['iterations']} iterations; " + "; ".join(parts), flush=True)
    result = {
        "config": args.config,
        "overrides": args.overrides,
        "ray": not args.no_ray,
        "runs": runs,
        "pooled": pooled(runs),
    }
    (args.out / "default_seeds.json").write_text(json.dumps(result, indent=1))
    print(f"pooled over seeds {args.seeds} (seconds per seed: " + ", ".join(f"{r['seconds']:.0f}" for r in runs) + "):")
    for key, p in result["pooled"].items():
        counts = (
            f"{p['fixed']} fixed / {p['broken']} broken" if "fixed" in p else f"{p['rose']} rose / {p['fell']} fell"
        )
        print(
            f"  {key}: {p['before']:.4f} -> {p['after_mean']:.4f} (Δ {p['delta_mean']:+.4f} ± {p['delta_std']:.4f} "
            f"over seeds, smallest {p['delta_min']:+.4f}); {counts}, sign test p = {p['sign_test_p']:.2g}"
        )
    print(f"wrote {args.out / 'default_seeds.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

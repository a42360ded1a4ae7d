"""What a reward can deliver by selection alone: best of N held-out samples, chosen by one reward, judged by another.

    python benchmarks/best_of_n.py --n 8 --first-seed 8 --seeds 16 --select testbed_reward --judge checker_all \
        [--lora NAME=PATH ...] [--out runs/best_of_n.json]

For every held-out (caption, seed) slot this samples N images with the production evaluation loop
(`rlhf_diffusion.evaluate.evaluate`): candidate 0 is the slot's own held-out image (seed s), candidate k > 0 the
same caption at seed s + k × 100000, so candidate 0 is image for image what `evaluate --first-seed` judges. For
n = 1, 2, 4, … N it keeps the candidate among the first n that `--select` scores highest (ties: the earliest) and
reports, per model row (the base model and each LoRA), the judge's mean on the kept images, its paired change
against candidate 0 (fixed / broken, exact two-sided sign test) and the selector's own mean. "oracle" keeps the
candidate the judge itself scores highest: the fraction of slots that any of the n samples gets right.

Best of n under a reward r is what a policy reaches that samples π_ref(x) · [x is r's best of n] — roughly the
distribution a KL-bounded preference optimisation toward r can move to. So the table bounds, by measurement, what
training on that reward can gain on the judge at that distance from the base model, and whether the gain a run
reaches (`evaluate` on the same slots) is short of it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from rlhf_diffusion.evaluate import _parse_loras, evaluate, resolve_prompts, rewards_from_arguments  # noqa: E402
from rlhf_diffusion.stats import paired_comparison  # noqa: E402

CANDIDATE_STRIDE = 100_000  # candidate k of slot (j, s) is seed s + k × stride: far from every evaluated range


def select_best(select: torch.Tensor, judge: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(judge, select) scores of the candidate among the first n that `select` ranks highest; both inputs are
    (N, slots). Ties go to the earliest candidate (torch.argmax returns the first maximum)."""
    pick = select[:n].argmax(dim=0, keepdim=True)
    return judge.gather(0, pick)[0], select.gather(0, pick)[0]


def paired(after: torch.Tensor, before: torch.Tensor) -> dict[str, float]:
    """The mean after, the mean change, the images up / down and the exact two-sided sign test
    (`stats.paired_comparison`, whose up / down are "fixed" / "broken" for 0-or-1 scores, else "rose" / "fell")."""
    c = paired_comparison(before.tolist(), after.tolist())
    up, down = ("fixed", "broken") if "fixed" in c else ("rose", "fell")
    return {"mean": c["after"], "delta": c["delta"], "up": int(c[up]), "down": int(c[down]), "p": c["sign_test_p"]}


def table(scores: dict[str, dict[str, torch.Tensor]], select: str, judge: str, n_max: int) -> dict[str, list[dict]]:
    """Per row: best of n by `select` and by the judge (oracle), n = 1, 2, 4, …, n_max; scores[row][reward] is
    (N, slots)."""
    sizes = sorted({1, *(2**i for i in range(1, n_max.bit_length()) if 2**i <= n_max), n_max})
    out = {}
    for row, by_reward in scores.items():
        base = by_reward[judge][0]
        rows = []
        for n in sizes:
            chosen, selector = select_best(by_reward[select], by_reward[judge], n)
            oracle, _ = select_best(by_reward[judge], by_reward[judge], n)
            rows.append(
                {
                    "n": n,
                    "by_select": paired(chosen, base),
                    "select_mean": float(selector.mean()),
                    "oracle": paired(oracle, base),
                }  # fmt: skip
            )
        out[row] = rows
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="testbed:pipeline")
    parser.add_argument("--prompts", default="testbed_heldout")
    parser.add_argument("--limit", type=int, default=None, help="only the first L captions")
    parser.add_argument("--n", type=int, default=8, help="candidates per slot")
    parser.add_argument("--first-seed", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=16, help="held-out seeds per caption (slots = captions × seeds)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--eta", type=float, default=1.0)
    parser.add_argument("--guidance", type=float, default=4.0)
    parser.add_argument("--rewards-yaml", default="configs/eval/testbed_checker.yaml")
    parser.add_argument("--reward", action="append", default=["testbed_reward"])
    parser.add_argument("--select", default="testbed_reward", help="the reward that picks the best candidate")
    parser.add_argument("--judge", default="checker_all", help="the reward that judges the kept image")
    parser.add_argument("--lora", action="append", default=[], help="NAME=PATH: another model row")
    parser.add_argument("--out", default=None, help="write the table as JSON here")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be at least 1")

    prompts = resolve_prompts(args.prompts, limit=args.limit)
    rewards = rewards_from_arguments(args.rewards_yaml, args.reward)
    names = [spec.key for spec in rewards]  # the score names `evaluate` reports
    for name in (args.select, args.judge):  # before any sampling, not after N passes
        if name not in names:
            parser.error(f"no reward {name!r} (have: {', '.join(names)})")
    loras = _parse_loras(args.lora)
    scores: dict[str, dict[str, list[torch.Tensor]]] = {}
    for k in range(args.n):
        result = evaluate(
            args.model,
            prompts,
            rewards,
            loras,
            seeds=args.seeds,
            first_seed=args.first_seed + k * CANDIDATE_STRIDE,
            steps=args.steps,
            eta=args.eta,
            guidance_scale=args.guidance,
            grid_prompts=0,
            cache_dir=Path(args.out).parent if args.out else Path("."),
            log=lambda line, k=k: print(f"[candidate {k}] {line}", file=sys.stderr),
        )
        for row in result.rows:
            for name, value in row.scores.items():
                scores.setdefault(row.label, {}).setdefault(name, []).append(value.reshape(-1))
    stacked = {row: {name: torch.stack(v) for name, v in by.items()} for row, by in scores.items()}
    results = table(stacked, args.select, args.judge, args.n)

    slots = len(prompts.prompts) * args.seeds
    print(f"Best of n held-out samples ({slots} slots: {len(prompts.prompts)} captions × seeds {args.first_seed}–"
          f"{args.first_seed + args.seeds - 1}), chosen by {args.select}, judged by {args.judge}; Δ against each "
          f"row's candidate 0 (its own held-out image).\n")  # fmt: skip
    print(
        f"| model | n | {args.judge} by {args.select}: mean, Δ, up / down, p | {args.select} mean | oracle: mean, Δ |"
    )
    print("|---|---|---|---|---|")
    for row, rows in results.items():
        for r in rows:
            s, o = r["by_select"], r["oracle"]
            print(
                f"| {row} | {r['n']} | {s['mean']:.4f}, {s['delta']:+.4f}, {s['up']} / {s['down']}, {s['p']:.2g} | "
                f"{r['select_mean']:.4f} | {o['mean']:.4f}, {o['delta']:+.4f} |"
            )
    if args.out:
        settings = {k: v for k, v in vars(args).items() if k != "out"}
        Path(args.out).write_text(json.dumps({"settings": settings, "slots": slots, "rows": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

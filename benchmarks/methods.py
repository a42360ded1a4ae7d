"""Method comparison on the testbed world: every method gets the same budget of reward-scored images, 3 seeds each.

    python benchmarks/methods.py                          # the table in the README (see --help for the knobs)
    python benchmarks/methods.py --seeds 0 --budget 800   # a quicker look

The base config is `configs/testbed_methods.yaml` (the shipped testbed pipeline, the testbed CLIP as the
training reward, training on the 332 `testbed_train` captions, evaluation on the 82 held-out `testbed_heldout`
captions with fixed seeds). Each run swaps in one method with its config defaults (`algorithm={name: <method>}`),
and the number of iterations is set so that every method spends the same number of reward-scored images:

    budget unit = one image handed to the reward (a final image, or one of TailorPO's per-step candidate x̂_0
                  previews, or TailorPO-G's guided winner whose gradient is taken)

This is the quantity a preference method pays for (a reward-model call, or a human label in D3PO's setting). It is
not the compute: TailorPO spends its budget on many cheap one-step previews, D3PO on fewer full trajectories, so
the table also reports UNet evaluations and seconds. The count per iteration is computed from the config
(`reward_images_per_iteration`) and checked against the samplers' measured `rollout/reward_images_count` after
every run; a mismatch stops the script.

Measured before and after, on the held-out captions (same prompts and seeds for every run):
- the reward the methods train on (by default the testbed CLIP score, scale 100; `--set rewards=[...]` swaps it);
- the world checker's accuracy per attribute (testbed/world.py; "all" = every stated attribute right): it is not
  trained on, so it shows whether a reward gain is real alignment or reward hacking;
- the held-out guard rewards of the config (`guards.heldout_rewards`, e.g. the CLIP when the checker is trained on);
- how much of one run's change is the finite eval set: the paired standard error of Δ reward over the images, and
  the images the checker flipped (fixed / broken) with an exact two-sided sign test.

`--set KEY=VALUE` overrides every run, `--method-set METHOD:KEY=VALUE` one method's runs (e.g. more inner epochs for
the methods that train at one t per pair). A finished run is reused only with the same config, budget and overrides.

Outputs under --out (default runs/methods): results.json (every run), table.md (means ± std over seeds),
reward_vs_images.png (training reward vs reward-scored images, mean over seeds), and the MLflow runs (experiment
"methods", tracking store --out/mlflow.db) to compare in `mlflow ui`.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rlhf_diffusion.config import RunConfig, load_config  # noqa: E402
from rlhf_diffusion.prompts import load_prompts  # noqa: E402
from rlhf_diffusion.stats import paired_standard_error, sign_test_p  # noqa: E402
from rlhf_diffusion.testbed.world import accuracy_of_checks, check  # noqa: E402
from rlhf_diffusion.trainer import LocalTrainer  # noqa: E402

METHODS = ("d3po", "tailorpo", "tailorpo_g", "dde", "dde_single", "diffusion_dpo", "ddpo", "grpo", "draft")
ATTRIBUTES = ("background", "count", "colour", "shape", "position", "binding", "all")


def reward_images_per_iteration(config: RunConfig) -> int:
    """Images handed to the reward per training iteration (all samplers), from the config alone.

    D3PO: two final images per prompt; DDE(-Single), Diffusion-DPO (online), DDPO: `samples_per_prompt`; GRPO (Flow-GRPO
    on a flow model): `group_size`; DRaFT: one (scored with its gradient). TailorPO: `num_candidates` candidates per
    prompt at each of the K steps (their x̂_0 previews, the last step's are the final images). TailorPO-G: the same
    plus, at every step, the guided winner whose reward gradient is taken.
    """
    prompts = config.sampling.batch_size * config.resources.num_samplers
    algo, k = config.algorithm, config.sampling.num_steps
    if algo.name in ("tailorpo", "tailorpo_g"):
        return prompts * k * (algo.num_candidates + (1 if algo.name == "tailorpo_g" else 0))
    return _images_per_prompt(config) * prompts


def _images_per_prompt(config: RunConfig) -> int:
    """Final images sampled per prompt by the methods that sample whole trajectories (D3PO: its pair; DRaFT: one)."""
    algo = config.algorithm
    if algo.name == "draft":
        return 1
    return algo.group_size if algo.name == "grpo" else getattr(algo, "samples_per_prompt", 2)


def unet_rows_per_iteration(config: RunConfig) -> int:
    """UNet evaluations (rows, each with classifier-free guidance counted once) per iteration for sampling."""
    prompts = config.sampling.batch_size * config.resources.num_samplers
    algo, k = config.algorithm, config.sampling.num_steps
    if algo.name in ("tailorpo", "tailorpo_g"):
        return prompts * (1 + (k - 1) * algo.num_candidates)
    return _images_per_prompt(config) * prompts * k


def run_one(base: str, method: str, seed: int, budget: int, out: Path, extra: list[str]) -> dict:
    probe = load_config(base, [f"algorithm={{name: {method}}}", *extra])
    per_iteration = reward_images_per_iteration(probe)
    iterations = max(1, math.ceil(budget / per_iteration))
    overrides = [
        f"algorithm={{name: {method}}}",
        f"seed={seed}",
        f"train.iterations={iterations}",
        f"run_name=methods_{method}_seed{seed}",
        f"output_dir={out}",
        "tracking.experiment=methods",
        "tracking.image_grid_every=0",
        "checkpoint.every=0",
        *extra,
    ]
    config = load_config(base, overrides)
    start = time.perf_counter()
    # overwrite: a (method, seed) run again (other settings, or after an interrupted run) replaces its old run dir
    result = LocalTrainer(config, overwrite=True, log=lambda *_: None).fit()
    seconds = time.perf_counter() - start
    measured = [row.get("rollout/reward_images_count") for row in result.history]
    if any(m != per_iteration for m in measured):
        raise SystemExit(f"{method}: reward images per iteration computed {per_iteration}, measured {measured}")
    prompts = load_prompts(config.prompts.eval or config.prompts.train)
    captions = [p for p in prompts for _ in range(config.prompts.eval_seeds)]  # prompt-major, as EvalResult
    before, after = result.eval_before, result.eval_after
    # one checker pass per eval image, before and after: the accuracies and the paired flips both come from it
    checks_before = [check(image, c) for image, c in zip(before.images, captions)]
    checks_after = [check(image, c) for image, c in zip(after.images, captions)]
    cumulative = np.cumsum(measured).tolist()
    return {
        "method": method,
        "seed": seed,
        "iterations": iterations,
        "reward_images": int(sum(measured)),
        "reward_images_per_iteration": per_iteration,
        "unet_rows": unet_rows_per_iteration(config) * iterations,
        "seconds": seconds,
        "reward_before": before.mean,
        "reward_after": after.mean,
        "checker_before": accuracy_of_checks(checks_before),
        "checker_after": accuracy_of_checks(checks_after),
        "checker_flips": checker_flips(checks_before, checks_after),
        "reward_paired_se": paired_standard_error(before.rewards, after.rewards),
        "heldout_before": before.heldout,
        "heldout_after": after.heldout,  # guards.heldout_rewards on the same images
        "curve": {"images": cumulative, "reward": [row.get("reward_mean") for row in result.history]},
        "run_dir": str(result.run_dir),
        "mlflow_run_id": result.mlflow_run_id,
        "reward": reward_label(config),
    }


def reward_label(config: RunConfig) -> str:
    """The training reward as the table names it: its label (or name), weighted sums joined by '+'."""
    return " + ".join(spec.key for spec in config.rewards)


def checker_flips(checks_before: list[dict[str, bool]], checks_after: list[dict[str, bool]]) -> dict[str, int]:
    """Held-out images whose checker verdict (`check(...)["all"]`: every attribute right) changed: wrong -> right
    ("fixed") and right -> wrong ("broken"). The eval images use the same prompts and seeds before and after, so the
    verdicts are paired."""
    was, now = [c["all"] for c in checks_before], [c["all"] for c in checks_after]
    return {"fixed": sum(not a and b for a, b in zip(was, now)), "broken": sum(a and not b for a, b in zip(was, now))}


def run_settings(config: str, budget: int, overrides: list[str]) -> dict:
    """What a finished run must match to be reused: the base config (by file name), the budget and the overrides."""
    return {"config": Path(config).name, "budget": budget, "overrides": list(overrides)}


def _mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _optimizer_steps(run: dict) -> float:
    """Optimizer steps the learner took over the run (minibatches of `train.train_batch_size` examples: a (pair,
    step) for D3PO/TailorPO(-G), a (pair, t) for DDE(-Single)/Diffusion-DPO), from its metrics.jsonl."""
    lines = (Path(run["run_dir"]) / "metrics.jsonl").read_text().splitlines()
    return sum(json.loads(line).get("train/optimizer_steps", 0.0) for line in lines if line.strip())


def write_table(runs: list[dict], path: Path) -> str:
    methods = [m for m in METHODS if any(r["method"] == m for r in runs)]
    first = runs[0]
    overrides = {r["method"]: r.get("settings", {}).get("overrides", []) for r in runs}
    # held-out guard rewards other than the checker (which has its own columns), e.g. the CLIP when the checker trains
    guard_keys = [
        k
        for k in first.get("heldout_after", {})
        if k != "checker" and all(k in r.get("heldout_after", {}) for r in runs)
    ]
    shared = [o for o in overrides[first["method"]] if all(o in v for v in overrides.values())]
    own = {m: [o for o in v if o not in shared] for m, v in overrides.items() if any(o not in shared for o in v)}
    lines = [
        f"Held-out: {len(first['checker_before'])} attributes checked on the eval images; budget "
        f"{first['reward_images']} reward-scored images per run (± one iteration); seeds "
        f"{sorted({r['seed'] for r in runs})}; overrides of {first.get('settings', {}).get('config', 'the config')}: "
        f"{', '.join(shared) or 'none'}" + "".join(f"; {m} also {', '.join(o)}" for m, o in own.items()) + ".",
        "",
        f"Before training (every run starts from the same model and evaluates the same prompts and seeds): "
        f"training reward ({first.get('reward', 'clip_score')}) {first['reward_before']:.3f}, checker "
        + ", ".join(f"{k} {v:.3f}" for k, v in first["checker_before"].items())
        + ".",
        "",
        "| method | iterations | sampling UNet rows | optimizer steps | reward after | Δ reward | "
        "checker all after | Δ all | fixed / broken (sign test p) | "
        + " | ".join(a for a in ATTRIBUTES[:-1])
        + " |"
        + "".join(f" Δ held-out {key} |" for key in guard_keys),
        "|" + "---|" * (9 + len(ATTRIBUTES) - 1 + len(guard_keys)),
    ]
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        row = [
            m,
            str(rs[0]["iterations"]),
            str(rs[0]["unet_rows"]),
            f"{statistics.mean(_optimizer_steps(r) for r in rs):.0f}",
            _mean_std([r["reward_after"] for r in rs]),
            _mean_std([r["reward_after"] - r["reward_before"] for r in rs])
            + (
                f" (paired SE {statistics.mean(r['reward_paired_se'] for r in rs):.3f})"
                if all("reward_paired_se" in r for r in rs)
                else ""
            ),
            _mean_std([r["checker_after"]["all"] for r in rs]),
            _mean_std([r["checker_after"]["all"] - r["checker_before"]["all"] for r in rs]),
        ]
        if all("checker_flips" in r for r in rs):  # summed over seeds
            fixed, broken = (sum(r["checker_flips"][k] for r in rs) for k in ("fixed", "broken"))
            row.append(f"{fixed} / {broken} ({sign_test_p(fixed, broken):.2g})")
        else:  # runs from before the flips were recorded
            row.append("–")
        row += [
            _mean_std([r["checker_after"][a] for r in rs]) if a in rs[0]["checker_after"] else "–"
            for a in ATTRIBUTES[:-1]
        ]
        row += [_mean_std([r["heldout_after"][k] - r["heldout_before"][k] for r in rs]) for k in guard_keys]
        lines.append("| " + " | ".join(row) + " |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def write_plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_r, ax_c) = plt.subplots(1, 2, figsize=(12, 4.5))
    for m in METHODS:
        rs = [r for r in runs if r["method"] == m]
        if not rs:
            continue
        x = np.array(rs[0]["curve"]["images"])
        y = np.array([r["curve"]["reward"] for r in rs], dtype=float)
        # a 5-iteration moving average per seed (rollout rewards are noisy), then mean ± std over seeds
        width = max(1, min(5, len(x) // 4))
        kernel = np.ones(width) / width
        smooth = np.array([np.convolve(row, kernel, mode="valid") for row in y])
        xs = x[width - 1 :]
        (line,) = ax_r.plot(xs, smooth.mean(0), label=m)
        if len(rs) > 1:
            ax_r.fill_between(
                xs, smooth.mean(0) - smooth.std(0), smooth.mean(0) + smooth.std(0), color=line.get_color(), alpha=0.15
            )
        before = np.mean([r["checker_before"]["all"] for r in rs])
        after = [r["checker_after"]["all"] for r in rs]
        ax_c.errorbar(
            [0, x[-1]],
            [before, np.mean(after)],
            yerr=[0, np.std(after)],
            marker="o",
            capsize=3,
            label=m,
            color=line.get_color(),
        )
    ax_r.set_xlabel("reward-scored images")
    ax_r.set_ylabel(f"training reward ({runs[0].get('reward', 'clip_score')}, final images)")
    ax_r.set_title("reward vs images sampled (mean ± std over seeds)")
    ax_c.set_xlabel("reward-scored images")
    ax_c.set_ylabel("held-out checker accuracy (all attributes)")
    ax_c.set_title("held-out checker accuracy, before → after")
    for ax in (ax_r, ax_c):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "testbed_methods.yaml"))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--budget", type=int, default=400, help="reward-scored images per run")
    parser.add_argument("--out", type=Path, default=Path("runs/methods"))
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        help="extra config override for every run (key=value), e.g. sampling.num_steps=8",
    )
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs at once, each in its own process at one torch thread (2 on a 2-core machine: "
        "about twice the runs per hour of one run at two threads; the figures of a run do not "
        "depend on its thread count beyond float rounding)",
    )
    parser.add_argument(
        "--method-set",
        dest="method_overrides",
        action="append",
        default=[],
        metavar="METHOD:KEY=VALUE",
        help="override for one method's runs, after --set, e.g. dde:train.num_inner_epochs=10",
    )
    args = parser.parse_args(argv)
    per_method: dict[str, list[str]] = {m: [] for m in METHODS}
    for item in args.method_overrides:
        method, sep, override = item.partition(":")
        if not sep or method not in METHODS or "=" not in override:
            parser.error(f"--method-set {item!r}: expected METHOD:KEY=VALUE with METHOD one of {', '.join(METHODS)}")
        per_method[method].append(override)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    runs: list[dict] = json.loads(results_path.read_text()) if results_path.exists() else []
    # a finished run is reused only if it ran with the same settings (config file, budget, overrides); another
    # setting's runs stay in results.json but are left out of this table. Use one --out per setting.
    settings = {m: run_settings(args.config, args.budget, args.overrides + per_method[m]) for m in METHODS}
    done = {(r["method"], r["seed"]) for r in runs if r.get("settings") == settings[r["method"]]}
    pending = [(method, seed) for seed in args.seeds for method in args.methods if (method, seed) not in done]

    def finished(method: str, seed: int, run: dict) -> None:
        run["settings"] = settings[method]
        runs.append(run)
        results_path.write_text(json.dumps(runs, indent=1))
        print(
            f"{method:14} seed {seed}: {run['iterations']} it, {run['reward_images']} images, "
            f"{run['seconds']:.0f} s; reward {run['reward_before']:.3f} -> {run['reward_after']:.3f}; checker "
            f"all {run['checker_before']['all']:.3f} -> {run['checker_after']['all']:.3f}",
            flush=True,
        )

    if args.jobs <= 1:
        for method, seed in pending:
            finished(
                method,
                seed,
                run_one(args.config, method, seed, args.budget, args.out, args.overrides + per_method[method]),
            )
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        with ProcessPoolExecutor(
            args.jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_one_thread
        ) as pool:
            futures = {
                pool.submit(
                    run_one, args.config, method, seed, args.budget, args.out, args.overrides + per_method[method]
                ): (method, seed)
                for method, seed in pending
            }
            for future in as_completed(futures):
                finished(*futures[future], future.result())
    runs = [
        r
        for r in runs
        if r["method"] in args.methods and r["seed"] in args.seeds and r.get("settings") == settings[r["method"]]
    ]
    print(write_table(runs, args.out / "table.md"))
    write_plot(runs, args.out / "reward_vs_images.png")
    print(f"wrote {args.out / 'table.md'}, {args.out / 'reward_vs_images.png'}, {results_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Throughput of the distributed loop: images/s per method, sampler scaling, and TailorPO's cost per trajectory.

    python benchmarks/throughput.py [--config configs/tiny.yaml] [--methods tailorpo d3po dde]
                                    [--max-samplers 2] [--iterations 6] [--set key=value ...]
    python benchmarks/throughput.py --defaults-only        # section 0 alone (about 6 minutes on 2 cores)

0. The embedded default as it ships (configs/tiny.yaml: its method, batch sizes, 2 samplers, signal diagnostics)
   against the previous default (configs/testbed_methods.yaml, as it ships), both under Ray in this one run:
   steady-state images/s of each and their ratio. Each runs `--default-iterations` iterations (default 21, so the
   steady state of tiny.yaml holds one of its `train.signal_every: 10` diagnostic rounds per ten iterations, as a
   whole run does); evaluation, checkpoints, grids and tracking are off.
1. Per method (1 sampler, `max_staleness: 1`): steady-state images/s of the whole loop, and the learner's training
   examples per second of its own busy time (`train/num_examples / train/train_seconds`).
2. Sampler scaling (first method): images/s with 1 .. N samplers (each samples `sampling.batch_size` prompts per
   iteration, so an iteration holds N times the images) and the efficiency images/s(N) / (N · images/s(1)).
   On a machine with fewer cores than actors the samplers share cores and efficiency falls accordingly.
3. TailorPO cost per trajectory relative to plain DDIM sampling of the same prompts: UNet rows evaluated (counted
   with a forward hook on the UNet; CFG counts 2 rows per image) and seconds, per denoising step and image. With 2
   candidates, reusing the winner's UNet call, the floor is about 2 UNet evaluations per step where plain DDIM
   needs 1 (plus decoding and scoring the candidates' x̂_0 at every step).

Steady state = iterations after the first; evaluation, checkpoints, grids and tracking are off. The tiny pipeline
measures the machinery, not a GPU's throughput; run with a real `model.pretrained` and `device: cuda` on a GPU
cluster for those figures.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from rlhf_diffusion.config import load_config

METHOD_SECTIONS = {
    "tailorpo": "{name: tailorpo}",
    "tailorpo_g": "{name: tailorpo_g}",
    "d3po": "{name: d3po}",
    "dde": "{name: dde}",
    "diffusion_dpo": "{name: diffusion_dpo}",
}


def steady(history: list[dict]) -> tuple[float, float]:
    rows = history[1:]
    seconds = sum(r["seconds"] for r in rows)
    images = sum(r["images_per_second"] * r["seconds"] for r in rows)
    examples = sum(r["train/num_examples"] for r in rows)
    train_seconds = sum(r["train/train_seconds"] for r in rows)
    return images / seconds, examples / train_seconds


def run_loop(args, out: str, method: str, samplers: int) -> tuple[float, float]:
    from rlhf_diffusion.trainer import Trainer

    overrides = [
        *args.set,
        f"output_dir={out}",
        f"run_name={method}_{samplers}",
        f"algorithm={METHOD_SECTIONS[method]}",
        f"train.iterations={args.iterations}",
        "tracking.enabled=false",
        "checkpoint.every=0",
        "tracking.image_grid_every=0",
        f"resources.num_samplers={samplers}",
        "train.max_staleness=1",
    ]
    if method == "tailorpo_g":
        overrides.append("rewards=[{name: saturation}]")
    config = load_config(args.config, overrides)
    trainer = Trainer(config, use_ray=True, log=lambda *_: None)
    try:
        return steady(trainer.fit().history)
    finally:
        trainer.shutdown()


def run_shipped(config_path: str, out: str, iterations: int) -> float:
    """Steady-state images/s of a config as it ships (its own method, batch sizes and samplers), under Ray."""
    from rlhf_diffusion.trainer import Trainer

    name = config_path.replace("/", "_").replace(".", "_")
    config = load_config(
        config_path,
        [
            f"output_dir={out}",
            f"run_name={name}",
            f"train.iterations={iterations}",
            "tracking.enabled=false",
            "checkpoint.every=0",
            "tracking.image_grid_every=0",
        ],
    )
    trainer = Trainer(config, use_ray=True, log=lambda *_: None)
    try:
        return steady(trainer.fit().history)[0]
    finally:
        trainer.shutdown()


def tailorpo_cost(args, out: str) -> dict[str, float]:
    """UNet rows and seconds per (step, image) of a TailorPO rollout and of plain DDIM, in one process."""
    from rlhf_diffusion.diffusion.sampling import initial_noise, sample_trajectory
    from rlhf_diffusion.trainer import LocalTrainer

    config = load_config(
        args.config,
        [
            *args.set,
            f"output_dir={out}",
            "run_name=cost",
            f"algorithm={METHOD_SECTIONS['tailorpo']}",
            "tracking.enabled=false",
            "train.max_staleness=0",
        ],
    )  # one shared UNet: the hook sees every call
    trainer = LocalTrainer(config, log=lambda *_: None)
    rows = [0]
    trainer.model.unet.register_forward_pre_hook(
        lambda module, a, kw: rows.__setitem__(0, rows[0] + (a[0] if a else kw["sample"]).shape[0]), with_kwargs=True
    )
    prompts = [f"prompt {i}" for i in range(config.sampling.batch_size)]
    k, p = config.sampling.num_steps, len(prompts)
    res = trainer.sampler.resolution
    result = {}
    for name in ("plain", "tailorpo"):
        times = []
        for repeat in range(3):
            rows[0] = 0
            generator = torch.Generator().manual_seed(repeat)
            start = time.perf_counter()
            with torch.no_grad():
                if name == "plain":
                    x_T = initial_noise(p, trainer.model, generator, res, res)
                    sample_trajectory(trainer.sample_predictor, trainer.encode(prompts), x_T, trainer.grid, generator)
                else:
                    trainer.rollout(prompts)
            times.append(time.perf_counter() - start)
        result[f"{name}_rows_per_step_image"] = rows[0] / (k * p)
        result[f"{name}_ms_per_step_image"] = 1000 * min(times) / (k * p)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--methods", nargs="+", default=["tailorpo", "d3po", "dde"], choices=sorted(METHOD_SECTIONS))
    parser.add_argument("--max-samplers", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=6)
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--default-iterations", type=int, default=21)
    parser.add_argument("--previous-default", default="configs/testbed_methods.yaml")
    parser.add_argument("--defaults-only", action="store_true", help="run section 0 only")
    args = parser.parse_args()
    import ray

    ray.init(address="local", num_cpus=max(8, args.max_samplers + 2), include_dashboard=False, logging_level="ERROR")
    try:
        with tempfile.TemporaryDirectory() as out:
            previous = run_shipped(args.previous_default, out, args.default_iterations)
            current = run_shipped("configs/tiny.yaml", out, args.default_iterations)
            print("| config (as shipped, under Ray) | images/s (loop) | ratio |")
            print("|---|---|---|")
            print(f"| {args.previous_default} (previous default) | {previous:.2f} | 1.00 |")
            print(f"| configs/tiny.yaml (embedded default) | {current:.2f} | {current / previous:.2f} |\n", flush=True)
            if args.defaults_only:
                return
            print("| method | images/s (loop) | learner examples/s |")
            print("|---|---|---|")
            single = {}
            for method in args.methods:
                images, examples = run_loop(args, out, method, 1)
                single[method] = images
                print(f"| {method} | {images:.3f} | {examples:.1f} |")
            first = args.methods[0]
            print(f"\n| samplers ({first}) | images/s | efficiency |")
            print("|---|---|---|")
            print(f"| 1 | {single[first]:.3f} | 1.00 |")
            for n in range(2, args.max_samplers + 1):
                images, _ = run_loop(args, out, first, n)
                print(f"| {n} | {images:.3f} | {images / (n * single[first]):.2f} |")
            cost = tailorpo_cost(args, out)
            print("\n| per (step, image) | UNet rows | ms |")
            print("|---|---|---|")
            for name in ("plain", "tailorpo"):
                print(
                    f"| {name} | {cost[f'{name}_rows_per_step_image']:.2f} | {cost[f'{name}_ms_per_step_image']:.2f} |"
                )
            print(
                f"TailorPO / plain DDIM: {cost['tailorpo_rows_per_step_image'] / cost['plain_rows_per_step_image']:.2f}"
                f"x UNet evaluations, {cost['tailorpo_ms_per_step_image'] / cost['plain_ms_per_step_image']:.2f}x time"
            )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()

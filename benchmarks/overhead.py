"""What does distribution cost? Two ratios measured in one run.

    python benchmarks/overhead.py [--config configs/tiny.yaml] [--iterations 8] [--num-samplers 1]
                                  [--max-staleness 1] [--skip-publish] [--set key=value ...]

1. Loop throughput: images/s of the full distributed loop (Ray: sampler, reward server and learner actors, weights
   published through the object store every iteration, `train.max_staleness` pipelining) against the pure-compute
   ceiling: the same model, steps, batch and method in one process with one shared UNet and no Ray
   (`Trainer(use_ray=False)`, strictly on-policy). Steady state: the first iteration (warm-up) is excluded;
   evaluation, checkpoints, grids and tracking are switched off in both. Printed as ratio = distributed / ceiling.
   On a machine with fewer cores than actors, the actors also compete for CPU; the ratio then says so.

2. LoRA publish latency for an SD1.5-sized rank-4 adapter (the real SD1.5 UNet shape, random weights, LoRA on
   to_q/to_k/to_v/to_out.0 = 3.2 MB, 256 tensors): learner `get_lora_state_dict` + `ray.put`, then a sampler actor's
   `ray.get` + `set_lora_state_dict` into its own full-size UNet, timed from the driver (median of repeats),
   with the two halves as measured inside the actors.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from rlhf_diffusion.batches import PublishedWeights
from rlhf_diffusion.config import load_config
from rlhf_diffusion.models.loading import attach_lora, get_lora_state_dict, set_lora_state_dict

SD15_UNET = dict(
    sample_size=64,
    cross_attention_dim=768,
    attention_head_dim=8,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
)


def steady_images_per_second(history: list[dict]) -> float:
    steady = history[1:]
    images = sum(r["images_per_second"] * r["seconds"] for r in steady)
    return images / sum(r["seconds"] for r in steady)


def loop_throughput(args) -> tuple[float, dict[int, float]]:
    """(distributed img/s, {torch threads: one-process img/s}); the ceiling is the best thread count."""
    import os

    import ray

    from rlhf_diffusion.trainer import Trainer

    base = [
        *args.set,
        f"train.iterations={args.iterations}",
        "tracking.enabled=false",
        "checkpoint.every=0",
        "tracking.image_grid_every=0",
        f"resources.num_samplers={args.num_samplers}",
    ]
    with tempfile.TemporaryDirectory() as out:
        local_cfg = load_config(args.config, [*base, f"output_dir={out}", "run_name=ceiling", "train.max_staleness=0"])
        ceilings = {}
        default_threads = torch.get_num_threads()
        for threads in sorted({1, os.cpu_count() or 1}):
            torch.set_num_threads(threads)
            ceilings[threads] = steady_images_per_second(  # one run dir, run once per thread count: overwrite
                Trainer(local_cfg, use_ray=False, overwrite=True, log=lambda *_: None).fit().history
            )
        torch.set_num_threads(default_threads)
        ray_cfg = load_config(
            args.config,
            [*base, f"output_dir={out}", "run_name=distributed", f"train.max_staleness={args.max_staleness}"],
        )
        ray.init(
            address="local", num_cpus=max(8, args.num_samplers + 2), include_dashboard=False, logging_level="ERROR"
        )
        trainer = Trainer(ray_cfg, use_ray=True, log=lambda *_: None)
        try:
            distributed = trainer.fit()
        finally:
            trainer.shutdown()
        return steady_images_per_second(distributed.history), ceilings


def publish_latency(repeats: int) -> dict[str, float]:
    import ray
    from diffusers import UNet2DConditionModel

    @ray.remote(num_cpus=1)
    class Holder:
        """A full-size SD1.5 UNet with a rank-4 LoRA, as a learner or sampler holds it."""

        def __init__(self, seed: int):
            torch.manual_seed(seed)
            self.unet = UNet2DConditionModel(**SD15_UNET)
            attach_lora(self.unet, rank=4, alpha=4.0, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
            self.version = 0

        def publish(self) -> tuple[PublishedWeights, float, int, int]:
            start = time.perf_counter()
            state = get_lora_state_dict(self.unet)
            self.version += 1
            weights = PublishedWeights(version=self.version, ref=[ray.put(state)])
            nbytes = sum(v.numel() * v.element_size() for v in state.values())
            return weights, (time.perf_counter() - start) * 1000, nbytes, len(state)

        def load(self, weights: PublishedWeights) -> float:
            start = time.perf_counter()
            set_lora_state_dict(self.unet, weights.resolve())
            return (time.perf_counter() - start) * 1000

    learner, sampler = Holder.remote(0), Holder.remote(1)
    ray.get([learner.publish.remote(), sampler.load.remote(ray.get(learner.publish.remote())[0])])  # warm-up
    total, publish, load = [], [], []
    for _ in range(repeats):
        start = time.perf_counter()
        weights, publish_ms, nbytes, tensors = ray.get(learner.publish.remote())
        load_ms = ray.get(sampler.load.remote(weights))
        total.append((time.perf_counter() - start) * 1000)
        publish.append(publish_ms)
        load.append(load_ms)
    ray.kill(learner)
    ray.kill(sampler)
    return {
        "total_ms": statistics.median(total),
        "publish_ms": statistics.median(publish),
        "load_ms": statistics.median(load),
        "megabytes": nbytes / 2**20,
        "tensors": tensors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--num-samplers", type=int, default=1)
    parser.add_argument("--max-staleness", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--skip-publish", action="store_true")
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    import ray

    try:
        distributed, ceilings = loop_throughput(args)
        threads, ceiling = max(ceilings.items(), key=lambda item: item[1])
        tried = ", ".join(f"{t} thread(s) {v:.3f}" for t, v in ceilings.items())
        print(
            f"loop: distributed {distributed:.3f} img/s (max_staleness={args.max_staleness}, "
            f"{args.num_samplers} sampler(s)) vs one-process ceiling {ceiling:.3f} img/s (best of: {tried}) "
            f"-> ratio {distributed / ceiling:.3f}"
        )
        if not args.skip_publish:
            lat = publish_latency(args.repeats)
            print(
                f"publish: SD1.5-sized rank-4 LoRA ({lat['tensors']} tensors, {lat['megabytes']:.2f} MB): "
                f"learner get+put {lat['publish_ms']:.1f} ms, sampler get+load {lat['load_ms']:.1f} ms, "
                f"end to end {lat['total_ms']:.1f} ms (median of {args.repeats})"
            )
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()

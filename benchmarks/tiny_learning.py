"""Does each method raise the reward on the tiny pipelines? Held-out reward before/after N iterations.

    python benchmarks/tiny_learning.py [--kinds sd15 sdxl] [--methods d3po tailorpo ...] [--rewards brightness]
                                       [--iterations 30] [--set key=value ...]

Prints one row per (pipeline, reward, method): held-out mean reward before and after training, the change,
and seconds. The models are tiny random-weight pipelines (noise images): this checks that the optimisation
moves the reward in the right direction, not image quality.
"""

from __future__ import annotations

import argparse
import time

from rlhf_diffusion.config import NON_DIFFERENTIABLE_REWARDS, load_config
from rlhf_diffusion.trainer import LocalTrainer

METHODS = ("d3po", "tailorpo", "tailorpo_g", "dde", "dde_single", "diffusion_dpo", "draft")


def learning_overrides(kind: str, method: str, reward: str, iterations: int, output_dir: str) -> list[str]:
    """The tiny learning-check setting shared by this script and tests/test_learning.py."""
    return [
        f"model.pretrained=tiny:{kind}",
        f"algorithm={{name: {method}}}",
        f"rewards=[{{name: {reward}}}]",
        f"train.iterations={iterations}",
        f"output_dir={output_dir}",
        f"run_name={kind}_{method}_{reward}",
        "prompts.eval.inline=[a red fox, a small bird, a green frog, a blue whale]",
        "prompts.eval_seeds=4",
        "tracking.enabled=false",
        "checkpoint.every=0",
    ]


def run_case(
    config_path: str, kind: str, method: str, reward: str, iterations: int, output_dir: str, threads: int = 0
) -> dict:
    """One (pipeline, method, reward) learning run in this process; a plain dict, so that a process pool can return
    it (tests/test_learning.py runs its cases two at a time at one thread each). `threads` > 0 sets torch's
    intra-op threads first."""
    import torch

    from rlhf_diffusion.models.loading import get_lora_state_dict

    if threads:
        torch.set_num_threads(threads)
    config = load_config(config_path, learning_overrides(kind, method, reward, iterations, output_dir))
    start = time.perf_counter()
    trainer = LocalTrainer(config, log=lambda *_: None)
    result = trainer.fit()
    return {
        "iterations": len(result.history),
        "every_iteration_stepped": all(r["train/optimizer_steps"] >= 1 for r in result.history),
        "lora_b_moved": any(
            v.abs().max().item() > 0 for k, v in get_lora_state_dict(trainer.model.unet).items() if "lora_B" in k
        ),
        "before": result.eval_before.mean,
        "after": result.eval_after.mean,
        "lora_exported": (result.run_dir / "lora" / "pytorch_lora_weights.safetensors").exists(),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/tiny_learning.yaml")
    parser.add_argument("--kinds", nargs="+", default=["sd15", "sdxl"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--rewards", nargs="+", default=["brightness", "jpeg_compressibility"])
    parser.add_argument("--iterations", type=int, default=30)
    parser.add_argument("--output-dir", default="/tmp/rlhf_diffusion_learning")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    print(f"{'pipeline':8} {'reward':22} {'method':14} {'before':>10} {'after':>10} {'change':>10} {'sec':>6}")
    for kind in args.kinds:
        for reward in args.rewards:
            for method in args.methods:
                if method == "tailorpo_g" and reward in NON_DIFFERENTIABLE_REWARDS:
                    continue
                overrides = learning_overrides(kind, method, reward, args.iterations, args.output_dir)
                config = load_config(args.config, overrides + args.overrides)
                start = time.perf_counter()
                # overwrite: running the script again replaces the earlier runs under --output-dir
                result = LocalTrainer(config, overwrite=True, log=lambda *_: None).fit()
                b, a = result.eval_before.mean, result.eval_after.mean
                print(
                    f"{kind:8} {reward:22} {method:14} {b:10.4f} {a:10.4f} {a - b:+10.4f} "
                    f"{time.perf_counter() - start:6.1f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()

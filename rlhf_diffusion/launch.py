"""Command-line entry: `python -m rlhf_diffusion.launch CONFIG.yaml [--set key=value ...]`.

Runs the configured method end to end in this process (`trainer.LocalTrainer`): evaluation on held-out seeds,
the training loop, evaluation again, and the exported diffusers-format LoRA under `<output_dir>/<run_name>/lora`.
A bad config or a missing file ends in one message naming the field or file, exit code 2.
"""

from __future__ import annotations

import argparse
import sys

from rlhf_diffusion.config import ConfigError, load_config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m rlhf_diffusion.launch", description=__doc__.splitlines()[0])
    parser.add_argument("config", help="run configuration (YAML)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set train.learning_rate=1e-4 (repeatable)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(str(error), file=sys.stderr)
        return 2
    from rlhf_diffusion.models.loading import ModelLoadError
    from rlhf_diffusion.trainer import LocalTrainer

    try:
        trainer = LocalTrainer(config)
    except (ModelLoadError, FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result = trainer.fit()
    print(f"run directory: {result.run_dir}")
    print(f"held-out reward: {result.eval_before.mean:.4f} -> {result.eval_after.mean:.4f}")
    print(f"LoRA (diffusers format): {result.lora_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Are the final-pair methods' pairs won by fitting the winner better, or by fitting both images worse?

    python benchmarks/displacement.py --lora i36=runs/tiny/checkpoints/iter_000036 --lora end=runs/tiny/lora

Samples `--samples` images for each of `--prompts` training captions with the base model (the config's rollout
settings), keeps the learned reward's best and worst of each caption, and for each LoRA measures, over `--draws`
fixed (t, ε) draws per pair on `algorithm.timestep_range`, the winner's and the loser's ε-MSE relative to the
reference, d = e_θ − e_ref (`diffusion_dpo.relative_mse_terms`), raw and weighted by DDE-Single's w_t = (1 − ᾱ_t)/ᾱ_t.
The preference the loss asks for is Δ = d^w − d^l < 0; if d^w and d^l both rise while Δ stays small, the LoRA has
moved away from the model's own samples, the good ones with the bad ("likelihood displacement", as reported for
DPO on language models). The same means are logged in training as `train/winner_rel_mse` and `train/loser_rel_mse`.

Prints one JSON line per LoRA (mean and standard error over the pairs) and writes --out.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from pair_signal import sample_groups  # noqa: E402

from rlhf_diffusion.algorithms.diffusion_dpo import relative_mse_terms  # noqa: E402
from rlhf_diffusion.config import load_config  # noqa: E402
from rlhf_diffusion.diffusion.forward_process import forward_process_for  # noqa: E402
from rlhf_diffusion.diffusion.sampling import initial_noise  # noqa: E402
from rlhf_diffusion.evaluate import resolve_lora_path  # noqa: E402
from rlhf_diffusion.models.loading import set_lora_state_dict  # noqa: E402
from rlhf_diffusion.models.lora import read_lora_file  # noqa: E402
from rlhf_diffusion.prompts import load_prompts  # noqa: E402
from rlhf_diffusion.trainer import LocalTrainer  # noqa: E402


def mean_se(values: torch.Tensor) -> list[float]:
    return [values.mean().item(), (values.std() / len(values) ** 0.5).item()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--lora", action="append", default=[], help="NAME=PATH (a LoRA file, export or run dir)")
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--draws", type=int, default=8)
    parser.add_argument("--seed", type=int, default=123)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs/displacement.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = load_config(args.config, ["tracking.enabled=false", "train.signal_every=0", *args.overrides])
    trainer = LocalTrainer(config, log=lambda *_: None)
    loras = [(name, resolve_lora_path(path)) for name, _, path in (a.partition("=") for a in args.lora)]
    gen = torch.Generator().manual_seed(args.seed)
    prompts = load_prompts(config.prompts.train)
    prompts = [prompts[i] for i in torch.randperm(len(prompts), generator=gen)[: args.prompts].tolist()]
    p, s, d = len(prompts), args.samples, args.draws
    cond = trainer.encode(prompts)
    size = (trainer.sample_predictor.height, trainer.sample_predictor.width)
    # the base model's samples (the LoRA is still zero)
    latents, rewards, _ = sample_groups(
        trainer, prompts, cond, s, lambda: initial_noise(p, trainer.model, gen, *size), gen
    )
    rows = torch.arange(p)
    x0_w = latents[rows, rewards.argmax(1)].repeat_interleave(d, 0)  # pair-major: row i·d + k is pair i's draw k
    x0_l = latents[rows, rewards.argmin(1)].repeat_interleave(d, 0)
    lo, hi = config.algorithm.timestep_range
    t = torch.randint(lo, hi + 1, (p * d,), generator=gen)
    noise = torch.randn(x0_w.shape, generator=gen)
    weight = forward_process_for(trainer.grid).x0_error_weight(t).float()
    c = cond.index(rows.repeat_interleave(d))
    results = {}
    for name, path in [("base", None), *loras]:
        if path is not None:
            set_lora_state_dict(trainer.model.unet, read_lora_file(path).state)
        with torch.no_grad():
            d_w, d_l, _ = relative_mse_terms(trainer.train_predictor, trainer.grid, c, x0_w, x0_l, t, noise)
        per_pair = {
            "winner": d_w.view(p, d).mean(1),
            "loser": d_l.view(p, d).mean(1),
            "winner_x0": (weight * d_w).view(p, d).mean(1),
            "loser_x0": (weight * d_l).view(p, d).mean(1),
        }
        row = {k: mean_se(v) for k, v in per_pair.items()}
        delta = per_pair["winner_x0"] - per_pair["loser_x0"]
        row["delta_x0"] = mean_se(delta)
        row["pairs_won"] = (delta < 0).float().mean().item()
        row["lora"] = str(path) if path else None
        results[name] = row
        print(name, json.dumps(row), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"settings": vars(args) | {"out": str(args.out)}, "loras": results}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

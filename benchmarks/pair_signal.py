"""How much of the final-pair methods' gradient is signal, and does the signal point where the checker wants?

    python benchmarks/pair_signal.py                      # Diffusion-DPO, testbed_reward labels, 96 prompts
    python benchmarks/pair_signal.py --prompts 128 --samples 4

Diffusion-DPO and DDE train on final-image pairs with one (t, ε) per pair. This script samples `--samples` images per
training caption with the current model, scores them with the training reward and with the held-out checker, and
forms pairs two ways: `random` (samples 0 and 1, as the online methods do) and `extreme` (the reward's best against
its worst of the `--samples`). For each setting (t range, draws of (t, ε) per pair) it takes each pair's gradient of
Δ_t (the Diffusion-DPO logit's argument; at the initial weights every method's pair gradient is a multiple of it)
with respect to the LoRA and reports:

- `snr2`: the per-pair signal-to-noise ratio ρ = |μ|² / s² of the reward-labelled pair gradients (μ their mean,
  s² their mean squared deviation; |μ|² debiased by s²/N). A minibatch of n pairs has coherence ≈ (n/2)ρ/((n/2)ρ+1)
  (`rlhf_diffusion.algorithms.signal`): n ≈ 2/ρ pairs give a coherence of 0.5.
- `gold_cos`: the cosine between the mean gradient under the reward's labels and under the checker's labels (the
  checker's fraction of attributes right; ties left out), each from a different half of the pairs so that their
  shared noise does not inflate it: how far the reward's signal points where the gold judge's does.
- the labels' agreement with the checker on the pairs the checker decides, and the ties.

With `--grouped` it measures instead how a prompt's `--samples` images (4 or more) are best made into pairs, per
prompt and at equal training compute. Every image's gradient of DDE-Single's single-shot term w_t e_θ(x_t) (w_t =
(1 − ᾱ_t)/ᾱ_t, e_θ the ε-MSE; the reference has no gradient) is taken at the same (t, ε) draws for all images of a
prompt, in two halves of the draws, and the prompt's gradient is composed from them:

- `extreme`: best − worst (the embedded default's pair);
- `halves`: (1st − 3rd) + (2nd − 4th) of the reward's ranking, every image in one pair (2 pairs: twice the training
  compute at the same draws);
- `ranks`: Σ_i c_i g_i with c the centred rank (3, 1, −1, −3 for 4): the sum over all 6 pairs of the ranking;
- `advantage`: Σ_i (r_i − mean r) g_i, each image weighted by its reward's deviation (4 images: twice the compute).

For each it reports the per-prompt SNR² (as above, the prompt the unit) and `gold_cos` against the checker's own
ranks-direction on the other half of the prompts. `--shared-noise` starts a prompt's samples from one x_T (D3PO's
pairs) instead of independent ones.

Prints a table and writes --out/pair_signal.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rlhf_diffusion.algorithms.diffusion_dpo import diffusion_dpo_mse_terms  # noqa: E402
from rlhf_diffusion.config import load_config  # noqa: E402
from rlhf_diffusion.diffusion.forward_process import forward_process_for  # noqa: E402
from rlhf_diffusion.diffusion.sampling import decode_latents, initial_noise, sample_trajectory  # noqa: E402
from rlhf_diffusion.models.conditioning import TextConditioning  # noqa: E402
from rlhf_diffusion.models.loading import trainable_parameters  # noqa: E402
from rlhf_diffusion.prompts import load_prompts  # noqa: E402
from rlhf_diffusion.testbed.reward import CheckerReward  # noqa: E402
from rlhf_diffusion.trainer import LocalTrainer  # noqa: E402


def sample_groups(trainer, prompts: list[str], cond: TextConditioning, samples: int, x_T, gen, checker=None):
    """`samples` images of each prompt under the trainer's sampling settings (the LoRA as it is), each started from
    `x_T()`; returns their latents (P, S, C, h, w), learned rewards (P, S) and, with a `checker`, its scores (P, S;
    else None). Also used by displacement.py."""
    latents, rewards, gold = [], [], []
    with torch.no_grad():
        for _ in range(samples):
            traj = sample_trajectory(trainer.sample_predictor, cond, x_T(), trainer.grid, gen)
            images = decode_latents(trainer.model, traj.final).cpu()
            latents.append(traj.final.cpu())
            rewards.append(trainer.reward.score(images, prompts).total)
            if checker is not None:
                gold.append(checker.score(images, prompts))
    return torch.stack(latents, 1), torch.stack(rewards, 1), torch.stack(gold, 1) if gold else None


def snr2(g: torch.Tensor) -> float:
    """ρ̂ = (|ḡ|² − s²/N) / s² of per-pair gradients g (N, D)."""
    n = g.shape[0]
    mean = g.mean(0)
    s2 = (g - mean).pow(2).sum(1).sum().item() / (n - 1)
    return (mean.pow(2).sum().item() - s2 / n) / s2


def cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.dot(a, b) / (a.norm() * b.norm() + 1e-30))


def flat_gradient(loss: torch.Tensor, params: list, retain_graph: bool = False) -> torch.Tensor:
    """∇ loss w.r.t. `params`, flattened into one vector (zeros for a parameter the loss does not reach)."""
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    return torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() for g, p in zip(grads, params)])


def pair_gradients(trainer, cond: TextConditioning, x0_a, x0_b, t_range, draws: int, gen) -> torch.Tensor:
    """(N, D): per pair, the mean over `draws` (t, ε) of ∇Δ_t with a as the winner."""
    params = [p for p in trainable_parameters(trainer.model.unet) if p.requires_grad]
    out = []
    for i in range(x0_a.shape[0]):
        t = torch.randint(t_range[0], t_range[1] + 1, (draws,), generator=gen)
        noise = torch.randn((draws, *x0_a.shape[1:]), generator=gen)
        c = cond.index(torch.full((draws,), i, dtype=torch.long))
        delta, _ = diffusion_dpo_mse_terms(
            trainer.train_predictor,
            trainer.grid,
            c,
            x0_a[i : i + 1].expand(draws, -1, -1, -1),
            x0_b[i : i + 1].expand(draws, -1, -1, -1),
            t,
            noise,
        )
        out.append(flat_gradient(delta.mean(), params))
    return torch.stack(out)


def image_gradients(trainer, cond, latents, t_range, draws: int, gen) -> torch.Tensor:
    """(P, S, 2, D): per prompt, image and half of the `draws` (t, ε) draws (shared by the prompt's images), the mean
    over the half's draws of ∇ w_t e_θ(x_t) (DDE-Single's single-shot term; the reference adds no gradient)."""
    params = [p for p in trainable_parameters(trainer.model.unet) if p.requires_grad]
    process = forward_process_for(trainer.grid)
    p, s = latents.shape[:2]
    out = torch.zeros(p, s, 2, sum(q.numel() for q in params))
    half = draws // 2
    for i in range(p):
        t = torch.randint(t_range[0], t_range[1] + 1, (draws,), generator=gen)
        noise = torch.randn((draws, *latents.shape[2:]), generator=gen)
        x0 = latents[i].repeat_interleave(draws, 0)  # (S·draws): image-major
        tt, nn = t.repeat(s), noise.repeat(s, 1, 1, 1)
        x_t = process.noised(x0, nn, tt)
        c = cond.index(torch.full((s * draws,), i, dtype=torch.long))
        pred = trainer.train_predictor(x_t, process.model_timesteps(tt), c)
        err = ((pred - process.target(x0, nn)) ** 2).mean(dim=(1, 2, 3)) * process.x0_error_weight(tt)
        err = err.view(s, 2, half)
        for j in range(s):
            for h in range(2):
                out[i, j, h] = flat_gradient(err[j, h].mean(), params, retain_graph=True)
    return out


def grouped_rows(g: torch.Tensor, rewards: torch.Tensor, gold: torch.Tensor) -> list[dict]:
    """Per-prompt gradients of each way to make pairs from the S images, from `image_gradients` g (P, S, 2, D); the
    loss descends each, so the winner's term enters with sign −1 (SNR² does not depend on the sign)."""
    p, s = rewards.shape
    order = rewards.argsort(1, descending=True)  # (P, S) the reward's ranking
    centred = (s - 1) - 2 * torch.arange(s, dtype=torch.float32)  # (3, 1, −1, −3) for S = 4
    ranks = torch.zeros(p, s).scatter_(1, order, centred.expand(p, s))  # c_i per image
    gold_ranks = gold - gold.mean(1, keepdim=True)  # the checker's own direction: its scores' deviations
    rows = torch.arange(p)
    first, both = g[:, :, 0], g.mean(2)

    def pair(h, a, b):
        return h[rows, order[:, a]] - h[rows, order[:, b]]

    def weighted(h, c):
        return (c[:, :, None] * h).sum(1)

    combos = {
        ("extreme", "all draws", 1.0): pair(both, 0, s - 1),
        ("extreme", "half the draws", 0.5): pair(first, 0, s - 1),
        ("halves", "half the draws", 1.0): pair(first, 0, s // 2) + pair(first, 1, s // 2 + 1),
        ("halves", "all draws", 2.0): pair(both, 0, s // 2) + pair(both, 1, s // 2 + 1),
        ("ranks", "half the draws", s / 4): weighted(first, ranks),
        ("advantage", "half the draws", s / 4): weighted(first, rewards - rewards.mean(1, keepdim=True)),
    }
    gold_dir = weighted(both, gold_ranks)
    half = torch.arange(p) % 2 == 0
    out = []
    for (name, draws, cost), h in combos.items():
        h = -h  # the descent direction of the pair loss raises the winner's fit
        cross = 0.5 * (cos(h[half].mean(0), -gold_dir[~half].mean(0)) + cos(h[~half].mean(0), -gold_dir[half].mean(0)))
        out.append({"pairing": name, "draws": draws, "compute": cost, "snr2": snr2(h), "gold_cos": cross})
    return out


def param_groups(trainer) -> dict[str, torch.Tensor]:
    """Columns of the flat LoRA gradient per kind of layer: self-attention (attn1), cross-attention (attn2, where
    the caption enters), and the rest."""
    names = {id(p): n for n, p in trainer.model.unet.named_parameters()}
    params = [p for p in trainable_parameters(trainer.model.unet) if p.requires_grad]
    kinds = []
    for p in params:
        name = names[id(p)]
        kind = "attn2" if ".attn2." in name else "attn1" if ".attn1." in name else "other"
        kinds += [kind] * p.numel()
    return {k: torch.tensor([i for i, v in enumerate(kinds) if v == k]) for k in sorted(set(kinds))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument(
        "--settings",
        nargs="+",
        default=["0-999:1", "0-999:4", "200-700:1", "200-700:4", "0-400:4", "400-999:4"],
        help="t_lo-t_hi:draws",
    )
    parser.add_argument("--grouped", action="store_true", help="compare ways to pair a prompt's samples (see above)")
    parser.add_argument("--shared-noise", action="store_true", help="a prompt's samples start from one x_T")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/pair_signal"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = load_config(
        args.config,
        [
            "tracking.enabled=false",
            "train.signal_every=0",
            "algorithm={name: diffusion_dpo}",
            "rewards=[{name: testbed_reward}]",
            *args.overrides,
        ],
    )
    trainer = LocalTrainer(config, log=lambda *_: None)
    model = trainer.model
    checker = CheckerReward()
    prompts = load_prompts(config.prompts.train)
    gen = torch.Generator().manual_seed(args.seed)
    pick = torch.randperm(len(prompts), generator=gen)[: args.prompts].tolist()
    prompts = [prompts[i] for i in pick]
    p, s = len(prompts), args.samples
    start = time.perf_counter()
    cond = trainer.encode(prompts)
    size = (trainer.sample_predictor.height, trainer.sample_predictor.width)
    shared = initial_noise(p, model, gen, *size)
    latents, rewards, gold = sample_groups(
        trainer,
        prompts,
        cond,
        s,
        lambda: shared if args.shared_noise else initial_noise(p, model, gen, *size),
        gen,
        checker,
    )
    sampled = time.perf_counter() - start
    print(f"sampling {sampled:.0f} s for {p * s} images; mean reward {rewards.mean():.3f}, checker {gold.mean():.3f}")
    if args.grouped:
        return grouped_main(args, trainer, cond, latents, rewards, gold)
    rows = torch.arange(p)
    pairings = {"random": (torch.zeros(p, dtype=torch.long), torch.ones(p, dtype=torch.long))}
    if s > 2:
        pairings["extreme"] = (rewards.argmax(1), rewards.argmin(1))
    results = []
    for pairing, (ia, ib) in pairings.items():
        reward_label = torch.sign(rewards[rows, ia] - rewards[rows, ib])
        gold_label = torch.sign(gold[rows, ia] - gold[rows, ib])
        decided = gold_label != 0
        agree = (reward_label[decided] == gold_label[decided]).float().mean().item()
        for setting in args.settings:
            span, draws = setting.split(":")
            lo, hi = (int(v) for v in span.split("-"))
            t0 = time.perf_counter()
            g = pair_gradients(trainer, cond, latents[rows, ia], latents[rows, ib], (lo, hi), int(draws), gen)
            by_reward = g * reward_label[:, None]
            half = torch.arange(p) % 2 == 0
            gold_rows = decided
            cross = 0.5 * (
                cos(by_reward[half].mean(0), (g * gold_label[:, None])[~half & gold_rows].mean(0))
                + cos(by_reward[~half].mean(0), (g * gold_label[:, None])[half & gold_rows].mean(0))
            )
            groups = {name: snr2(by_reward[:, cols]) for name, cols in param_groups(trainer).items()}
            row = {
                "pairing": pairing,
                "t_range": [lo, hi],
                "draws": int(draws),
                "pairs": p,
                "snr2": snr2(by_reward),
                "snr2_checker_labels": snr2((g * gold_label[:, None])[gold_rows]),
                "gold_cos": cross,
                "label_agreement": agree,
                "checker_decided": int(decided.sum()),
                "snr2_by_layers": groups,
                "seconds": time.perf_counter() - t0,
            }
            results.append(row)
            print(json.dumps(row), flush=True)
    lines = [
        "| pairs | t range | draws | per-pair SNR² (reward labels) | SNR² (checker labels) | cos(reward, checker) "
        "| label agreement (decided) | s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['pairing']} | {r['t_range'][0]}–{r['t_range'][1]} | {r['draws']} | {r['snr2']:.4f} | "
            f"{r['snr2_checker_labels']:.4f} | {r['gold_cos']:+.2f} | {r['label_agreement']:.2f} "
            f"({r['checker_decided']}) | {r['seconds']:.0f} |"
        )
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "pair_signal.json").write_text(
        json.dumps({"rows": results, "settings": vars(args) | {"out": str(args.out)}}, indent=1)
    )
    (args.out / "pair_signal.md").write_text(text + "\n")
    return 0


def grouped_main(args, trainer, cond, latents, rewards, gold) -> int:
    """`--grouped`: every setting's ways of pairing a prompt's samples (`grouped_rows`), as a table and JSON."""
    results = []
    for setting in args.settings:
        span, draws = setting.split(":")
        lo, hi = (int(v) for v in span.split("-"))
        t0 = time.perf_counter()
        g = image_gradients(trainer, cond, latents, (lo, hi), int(draws), torch.Generator().manual_seed(args.seed + 1))
        for row in grouped_rows(g, rewards, gold):
            row |= {"t_range": [lo, hi], "draws_total": int(draws), "prompts": len(rewards)}
            row["seconds"] = time.perf_counter() - t0
            results.append(row)
            print(json.dumps(row), flush=True)
    lines = [
        "| t range | pairing | (t, ε) draws | training compute (extreme, all draws = 1) | per-prompt SNR² | gold_cos |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['t_range'][0]}–{r['t_range'][1]} | {r['pairing']} | {r['draws']} of {r['draws_total']} | "
            f"{r['compute']:.1f} | {r['snr2']:.4f} | {r['gold_cos']:+.2f} |"
        )
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    settings = vars(args) | {"out": str(args.out)}
    (args.out / "pair_signal_grouped.json").write_text(json.dumps({"rows": results, "settings": settings}, indent=1))
    (args.out / "pair_signal_grouped.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""How well does a step-level ranking pick the better of two same-state candidates? (TailorPO's step reward.)

    python benchmarks/step_labels.py                                    # testbed, training reward of tiny.yaml
    python benchmarks/step_labels.py --set 'rewards=[{name: testbed_reward}]' --prompts 32

TailorPO ranks the two candidates x^(1), x^(2) = μ_θ(x_τ) + σ_τ z drawn from one state by the reward of the decoded
one-step prediction x̂_0(x^(j)) (its Eq. 12). What a candidate is really worth is its value: the expected reward of
the images the policy finishes from it, V(x^(j)) = E[r(c, x_0) | x^(j)]. This script estimates V from `--continuations`
stochastic completions of each candidate (the rollout's own η-DDIM sampler on the remaining grid) and reports, per
DDIM step, how often each cheap ranking orders a pair as V does (pairs whose two value estimates differ by more than
their combined standard error only):

- `x0_prediction`: r(Decode(x̂_0(x^(j)))), the paper's ranking (one UNet call per candidate);
- `completion_<n>`: r of a deterministic DDIM completion (η = 0) in n jumps over the remaining grid (ours; n UNet
  calls per candidate; n = remaining steps is the full deterministic completion);
- the held-out checker's view of V as well, when the training reward is not the checker (does the ranking help
  the gold judge?).

The states come from trajectories of the current model that continue from a random candidate (SPO's resampling),
so every step sees states the policy itself reaches. Prints a table and writes --out/step_labels.json.
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

from rlhf_diffusion.config import load_config  # noqa: E402
from rlhf_diffusion.diffusion import ddim  # noqa: E402
from rlhf_diffusion.diffusion.sampling import (  # noqa: E402
    ddim_completion,
    decode_latents,
    draw_candidates,
    initial_noise,
)
from rlhf_diffusion.prompts import load_prompts  # noqa: E402
from rlhf_diffusion.trainer import LocalTrainer  # noqa: E402


@torch.no_grad()
def finish_stochastic(predictor, grid, cond, x, start: int, gen) -> torch.Tensor:
    """Finishes latents x at the candidates' timestep τ_{start+1} with every remaining step of the rollout's own
    η-DDIM sampler: one draw of the candidate's value."""
    b = x.shape[0]
    for i in range(start + 1, grid.num_steps):
        eps = predictor(x, grid.timesteps[i].expand(b), cond)
        x, _ = ddim.ddim_jump(
            x, eps, grid.alpha_prod[i].expand(b), grid.alpha_prod_prev[i].expand(b), grid.eta, generator=gen
        )
    return x


def agreement(scores: torch.Tensor, values: torch.Tensor, value_se: torch.Tensor) -> tuple[float, int]:
    """Fraction of decisive pairs (|ΔV| > combined SE) that `scores` order as `values`; (P, 2) each."""
    dv = values[:, 0] - values[:, 1]
    decisive = dv.abs() > (value_se[:, 0] ** 2 + value_se[:, 1] ** 2).sqrt()
    if not decisive.any():
        return float("nan"), 0
    same = torch.sign(scores[:, 0] - scores[:, 1]) == torch.sign(dv)
    return same[decisive].float().mean().item(), int(decisive.sum())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs" / "tiny.yaml"))
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--continuations", type=int, default=6)
    parser.add_argument("--jumps", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/step_labels"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    config = load_config(args.config, ["tracking.enabled=false", "train.signal_every=0", *args.overrides])
    trainer = LocalTrainer(config, log=lambda *_: None)
    model, grid, predictor = trainer.model, trainer.grid, trainer.sample_predictor
    reward = trainer.reward
    checker = None
    if "checker" not in {spec.key for spec in config.rewards}:
        from rlhf_diffusion.testbed.reward import CheckerReward

        checker = CheckerReward()
    prompts = load_prompts(config.prompts.train)[: args.prompts]
    gen = torch.Generator().manual_seed(args.seed)
    p, k, m = len(prompts), grid.num_steps, args.continuations
    cond = trainer.encode(prompts)
    rows = torch.arange(p)
    start = time.perf_counter()
    x = initial_noise(p, model, gen, predictor.height, predictor.width)
    table = []
    for i in range(k):
        idx = torch.full((p,), i, dtype=torch.long)
        _, a, a_prev, std = grid.scalars(idx)
        eps = predictor(x, grid.timesteps[i].expand(p), cond)
        mean, _ = ddim.ddim_step_mean(x, eps, a, a_prev, std)
        cands = draw_candidates(mean, std, 2, gen).flatten(0, 1)  # (2P, ...), candidate-minor
        cond2 = cond.repeat_interleave(2)
        prompts2 = [q for q in prompts for _ in range(2)]
        last = i == k - 1
        row = {"step": i, "timestep": int(grid.timesteps[i])}
        # the value: mean reward of m stochastic completions of each candidate
        finals = (
            cands if last else torch.cat([finish_stochastic(predictor, grid, cond2, cands, i, gen) for _ in range(m)])
        )
        reps = 1 if last else m
        images = decode_latents(model, finals)
        prompts_m = prompts2 * reps
        v = reward.score(images, prompts_m).total.view(reps, p, 2)
        values, value_se = v.mean(0), (v.std(0) / reps**0.5 if reps > 1 else torch.zeros(p, 2))
        gold = None
        if checker is not None:
            g = checker.score(images, prompts_m).view(reps, p, 2)
            gold = (g.mean(0), g.std(0) / reps**0.5 if reps > 1 else torch.zeros(p, 2))
        # the rankings
        rankings = {}
        if last:
            rankings["x0_prediction"] = values
        else:
            eps_c = predictor(cands, grid.timesteps[i + 1].expand(2 * p), cond2)
            x0 = ddim.pred_x0_from_eps(cands, eps_c, a_prev.repeat_interleave(2))
            rankings["x0_prediction"] = reward.score(decode_latents(model, x0), prompts2).total.view(p, 2)
            for n in args.jumps:  # the library's completion, as `algorithm.step_ranking: completion` runs it
                done = ddim_completion(predictor, grid, cond2, cands, i, eps_c, n)
                rankings[f"completion_{n}"] = reward.score(decode_latents(model, done), prompts2).total.view(p, 2)
        for name, scores in rankings.items():
            row[name], row[f"{name}_pairs"] = agreement(scores, values, value_se)
            if gold is not None:
                row[f"{name}_vs_checker"], row[f"{name}_checker_pairs"] = agreement(scores, *gold)
        table.append(row)
        print(json.dumps(row), flush=True)
        # continue from a random candidate
        pick = torch.randint(0, 2, (p,), generator=gen)
        x = cands.view(p, 2, *cands.shape[1:])[rows, pick]
    seconds = time.perf_counter() - start
    args.out.mkdir(parents=True, exist_ok=True)
    names = [n for n in table[0] if n not in ("step", "timestep") and not n.endswith("_pairs")]
    names = sorted(
        {n for r in table for n in r if n not in ("step", "timestep") and not n.endswith("pairs")},
        key=lambda n: (n.endswith("_vs_checker"), n),
    )
    lines = ["| step | t | " + " | ".join(names) + " |", "|" + "---|" * (2 + len(names))]
    for r in table:
        cells = []
        for n in names:
            value = r.get(n)
            pairs = r.get(n.replace("_vs_checker", "_checker_pairs") if n.endswith("_vs_checker") else f"{n}_pairs")
            cells.append("–" if value is None or value != value else f"{value:.2f} ({pairs})")
        lines.append(f"| {r['step']} | {r['timestep']} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    print(
        f"{seconds:.0f} s; agreement with the candidates' value (mean reward of {m} completions), decisive "
        "pairs in brackets"
    )
    (args.out / "step_labels.json").write_text(
        json.dumps({"rows": table, "seconds": seconds, "settings": vars(args) | {"out": str(args.out)}}, indent=1)
    )
    (args.out / "step_labels.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

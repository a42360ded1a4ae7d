"""Held-out evaluation, in one place: the fixed-seed sampling loop, a sampler's scored shard, the trainer's assembled
`EvalResult`, the paired before/after comparison, the logged metrics and the image grids.

Every evaluation samples image s of eval prompt j from its own generator (`eval_generators(j, seeds)[s]`), in the
batches of `sample_held_out`, so an evaluation depends only on the weights: the trainer's passes (each sampler's
`Sampler.evaluate` → `evaluate_shard`, joined by `merge_shards`) and the `evaluate` CLI (`rlhf_diffusion.evaluate`)
sample the same images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from rlhf_diffusion.batches import EvalShard
from rlhf_diffusion.config import RunConfig
from rlhf_diffusion.diffusion.sampling import DDIMGrid, NoisePredictor, decode_latents, initial_noise, sample_trajectory
from rlhf_diffusion.models.conditioning import encode_prompts
from rlhf_diffusion.stats import paired_comparison

if TYPE_CHECKING:
    from rlhf_diffusion.guards import EarlyStopGuard
    from rlhf_diffusion.models.loading import DiffusionModel

__all__ = [
    "EVAL_BATCH_IMAGES",
    "EvalResult",
    "eval_generators",
    "eval_grid_row",
    "eval_line",
    "eval_metrics",
    "evaluate_shard",
    "evaluation_due",
    "merge_shards",
    "paired_heldout",
    "sample_held_out",
    "save_grid",
]

# Held-out images sampled per UNet batch (whole prompts: all the seeds of a prompt stay in one batch).
EVAL_BATCH_IMAGES = 32


def eval_generators(prompt_index: int, num_seeds: int, first_seed: int = 0) -> list[torch.Generator]:
    """One generator per (held-out prompt, seed): image s of prompt j draws its x_T and then its per-step noise from
    its own generator, so an evaluation depends only on the weights, never on the run's history or on which
    images share a batch. Seeds `first_seed` … `first_seed + num_seeds − 1`: a later range gives images that a
    choice of settings made on the earlier seeds has never seen."""
    seeds = range(first_seed, first_seed + num_seeds)
    return [torch.Generator().manual_seed(1_000_003 * (s + 1) + prompt_index) for s in seeds]


@torch.no_grad()
def sample_held_out(
    model: DiffusionModel,
    predictor: NoisePredictor,
    grid: DDIMGrid,
    prompts: Sequence[str],
    prompt_indices: Sequence[int],
    num_seeds: int,
    resolution: int,
    batch_images: int = EVAL_BATCH_IMAGES,
    first_seed: int = 0,
):
    """The fixed-seed held-out images of `prompts` (prompt j seeded by its global index, `eval_generators`, from
    seed `first_seed`), in batches of whole prompts of about `batch_images` images. The one sampling loop of every
    evaluation (the trainer's, through `Sampler.evaluate`, and the `evaluate` CLI).

    Yields:
        (the batch's prompts, each repeated `num_seeds` times; (B, 3, H, W) images in [0, 1] on CPU), prompt-major.
    """
    per_batch = max(1, batch_images // num_seeds)
    for start in range(0, len(prompts), per_batch):
        chunk = list(zip(prompt_indices[start : start + per_batch], prompts[start : start + per_batch]))
        gens = [g for j, _ in chunk for g in eval_generators(j, num_seeds, first_seed)]
        x_T = torch.cat([initial_noise(1, model, g, resolution, resolution) for g in gens])
        repeated = [prompt for _, prompt in chunk for _ in range(num_seeds)]
        cond = encode_prompts(model, repeated, height=resolution, width=resolution)
        trajectory = sample_trajectory(predictor, cond, x_T, grid, gens)
        yield repeated, decode_latents(model, trajectory.final).cpu()


@torch.no_grad()
def evaluate_shard(
    model: DiffusionModel,
    predictor: NoisePredictor,
    grid: DDIMGrid,
    reward: Any,
    prompts: Sequence[str],
    prompt_indices: Sequence[int],
    num_seeds: int,
    resolution: int,
) -> EvalShard:
    """`num_seeds` held-out images of each prompt (`sample_held_out`), scored by `reward` (a sampler's reward
    client: `score`, and `score_heldout` when it has `heldout_names`)."""
    images, totals, per, heldout = [], [], {}, {}
    for batch_prompts, imgs in sample_held_out(
        model, predictor, grid, list(prompts), list(prompt_indices), num_seeds, resolution
    ):
        result = reward.score(imgs, batch_prompts)
        images.append(imgs)
        totals.append(result.total)
        for name, value in result.per_reward.items():
            per.setdefault(name, []).append(value)
        if reward.heldout_names:
            for name, value in reward.score_heldout(imgs, batch_prompts).per_reward.items():
                heldout.setdefault(name, []).append(value)
    return EvalShard(
        prompt_indices=list(prompt_indices),
        images=torch.cat(images),
        totals=torch.cat(totals),
        per_reward={name: torch.cat(v) for name, v in per.items()},
        heldout={name: torch.cat(v) for name, v in heldout.items()},
    )


@dataclass
class EvalResult:
    """Rewards of the fixed held-out (prompt, seed) samples.

    Attributes:
        mean: mean of the weighted total reward.
        per_reward: name → mean raw score.
        images: (N, 3, H, W) the images, prompt-major.
        rewards: (N,) weighted totals.
        heldout: held-out reward key → mean raw score on the same images (`guards.heldout_rewards`).
        heldout_scores: held-out reward key → (N,) per-image raw scores, prompt-major (paired before/after).
    """

    mean: float
    per_reward: dict[str, float]
    images: Tensor
    rewards: Tensor
    heldout: dict[str, float] = field(default_factory=dict)
    heldout_scores: dict[str, Tensor] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """What a checkpoint keeps of the evaluation before training (means, and the per-image scores a resumed
        run pairs with its final evaluation)."""
        return {
            "mean": self.mean,
            "per_reward": self.per_reward,
            "heldout": self.heldout,
            "rewards": self.rewards.tolist(),
            "heldout_scores": {k: v.tolist() for k, v in self.heldout_scores.items()},
        }


def merge_shards(shards: Sequence[EvalShard], seeds: int) -> EvalResult:
    """The samplers' shards (prompts dealt round-robin) joined back into prompt order: one `EvalResult`."""
    order = sorted((j, s, pos) for s, shard in enumerate(shards) for pos, j in enumerate(shard.prompt_indices))
    images, totals, per, heldout = [], [], {}, {}
    for _, s, pos in order:
        rows = slice(pos * seeds, (pos + 1) * seeds)
        images.append(shards[s].images[rows])
        totals.append(shards[s].totals[rows])
        for name, value in shards[s].per_reward.items():
            per.setdefault(name, []).append(value[rows])
        for name, value in shards[s].heldout.items():
            heldout.setdefault(name, []).append(value[rows])
    rewards = torch.cat(totals)
    scores = {name: torch.cat(v) for name, v in heldout.items()}
    return EvalResult(
        mean=rewards.mean().item(),
        per_reward={name: torch.cat(v).mean().item() for name, v in per.items()},
        images=torch.cat(images),
        rewards=rewards,
        heldout={name: v.mean().item() for name, v in scores.items()},
        heldout_scores=scores,
    )


def eval_metrics(ev: EvalResult, guard: EarlyStopGuard | None = None) -> dict[str, float]:
    """What an evaluation pass logs: eval/reward_mean and eval/<key> (training rewards), heldout/<key>
    (held-out rewards, same images) and, with an early stop, heldout/<key>_drop of the watched reward."""
    metrics = {
        "eval/reward_mean": ev.mean,
        **{f"eval/{k}": v for k, v in ev.per_reward.items()},
        **{f"heldout/{k}": v for k, v in ev.heldout.items()},
    }
    if guard is not None:
        metrics[f"heldout/{guard.config.reward}_drop"] = guard.drop(ev.heldout)
    return metrics


def evaluation_due(config: RunConfig, step: int, iterations: int) -> tuple[bool, bool]:
    """(an evaluation pass runs after iteration `step`, it writes an image grid): every tracking.image_grid_every
    (with a grid) and guards.every iterations. The pass after the last iteration is the final evaluation."""
    grid_every, guard_every = config.tracking.image_grid_every, config.guards.every
    grid = bool(grid_every) and step % grid_every == 0
    due = (grid or (bool(guard_every) and step % guard_every == 0)) and step < iterations
    return due, grid


def eval_line(when: str, ev: EvalResult, before: dict[str, Any] | None = None) -> str:
    """The log line of an evaluation pass (`before`: the summary of the evaluation before training)."""
    return (
        f"[eval] {when}: reward {ev.mean:.4f}"
        + (f" (before {before['mean']:.4f})" if before else "")
        + "".join(f", held-out {k} {v:.4f}" for k, v in ev.heldout.items())
    )


def paired_heldout(before: dict[str, Any] | None, after: EvalResult) -> dict[str, dict[str, float]]:
    """Per reward, the paired before/after comparison of the held-out images (`stats.paired_comparison`): the
    training reward ("reward") and every held-out reward, where the evaluation before training recorded per-image
    scores of the same images."""
    if not before:
        return {}
    out = {}
    if len(before.get("rewards") or []) == len(after.rewards):
        out["reward"] = paired_comparison(before["rewards"], after.rewards.tolist())
    for key, scores in (before.get("heldout_scores") or {}).items():
        if key in after.heldout_scores and len(scores) == len(after.heldout_scores[key]):
            out[key] = paired_comparison(scores, after.heldout_scores[key].tolist())
    return out


def eval_grid_row(seeds: int) -> int:
    """Images per row of an evaluation grid: whole prompts (all `seeds` images of each) side by side, at least 8
    images a row when seeds < 8 (82 prompts x 1 seed is 11 rows of 8, not one column of 82)."""
    return seeds * max(1, 8 // seeds)


def save_grid(images: Tensor, path: Path, nrow: int) -> None:
    """Writes (N, 3, H, W) images in [0, 1] as one PNG grid, `nrow` images per row (one row per prompt)."""
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, path, nrow=nrow, padding=2, pad_value=1.0)

"""Single-process training: the whole loop (sample → reward → label → train → evaluate) in one process.

This is the loop the Ray runtime distributes: the same `Algorithm.rollout` / `Algorithm.loss` and the same
`Policy` state run here on one device, for tests and for checking that a method learns. `fit()` reads as the
dataflow; every piece of maths lives in `diffusion/` and `algorithms/`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from rlhf_diffusion.algorithms import RolloutBatch, RolloutContext, build_algorithm
from rlhf_diffusion.config import RunConfig
from rlhf_diffusion.diffusion.sampling import DDIMGrid, NoisePredictor, decode_latents, initial_noise, sample_trajectory
from rlhf_diffusion.models.conditioning import TextConditioning, encode_prompts
from rlhf_diffusion.models.loading import (
    DiffusionModel,
    attach_lora,
    export_lora,
    load_diffusion_model,
    lora_parameters,
)
from rlhf_diffusion.models.tiny import build_tiny_pipeline
from rlhf_diffusion.prompts import load_prompts
from rlhf_diffusion.rewards.base import WeightedReward

__all__ = ["EvalResult", "LocalTrainer", "RunResult", "resolve_device", "resolve_model_source", "save_grid"]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
TINY_PREFIX = "tiny:"


def resolve_device(name: str) -> torch.device:
    """"auto" → CUDA when available, else CPU; "cuda" without a GPU is an error naming `device`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config device: 'cuda' was requested but no CUDA device is visible")
    return torch.device(name)


def resolve_model_source(pretrained: str, cache_dir: str | Path) -> str:
    """The directory or hub id to load: "tiny:sd15" / "tiny:sdxl" build (once) a tiny random-weight pipeline
    under `cache_dir/_tiny_models/<kind>` and return that directory, so it loads through the production loader."""
    if not pretrained.startswith(TINY_PREFIX):
        return pretrained
    kind = pretrained[len(TINY_PREFIX):]
    target = Path(cache_dir) / "_tiny_models" / kind
    if not (target / "model_index.json").exists():
        build_tiny_pipeline(target, kind)
    return str(target)


def save_grid(images: Tensor, path: Path, nrow: int) -> None:
    """Writes (N, 3, H, W) images in [0, 1] as one PNG grid, `nrow` images per row (one row per prompt)."""
    from torchvision.utils import save_image

    save_image(images, path, nrow=nrow, padding=2, pad_value=1.0)


@dataclass
class EvalResult:
    """Rewards of a fixed set of (prompt, seed) samples.

    Attributes:
        mean: mean of the weighted total reward.
        per_reward: name → mean raw score.
        images: (N, 3, H, W) the images, in prompt-major order.
        rewards: (N,) weighted totals.
    """

    mean: float
    per_reward: dict[str, float]
    images: Tensor
    rewards: Tensor


@dataclass
class RunResult:
    """What `LocalTrainer.fit` returns."""

    run_dir: Path
    eval_before: EvalResult
    eval_after: EvalResult
    history: list[dict[str, float]] = field(default_factory=list)
    lora_file: Path | None = None


class LocalTrainer:
    """Owns one model (policy = LoRA UNet, reference = the same UNet with the adapter disabled), the rewards, the
    algorithm and the optimizer, all in this process.

    Args:
        config: the validated run configuration.
    """

    def __init__(self, config: RunConfig):
        self.config = config
        self.device = resolve_device(config.device)
        torch.manual_seed(config.seed)
        source = resolve_model_source(config.model.pretrained, config.output_dir)
        self.model: DiffusionModel = load_diffusion_model(
            source, kind=config.model.kind, dtype=_DTYPES[config.model.dtype], device=self.device,
            revision=config.model.revision,
        )
        lora = config.model.lora
        attach_lora(self.model.unet, rank=lora.rank, alpha=lora.alpha, target_modules=list(lora.target_modules),
                    init=lora.init)
        self.resolution = config.model.resolution or self.model.resolution
        self.reward = WeightedReward.from_specs(config.rewards, device=self.device)
        self.reward_weights = {spec.name: spec.weight for spec in config.rewards}
        self.grid = DDIMGrid.from_scheduler(self.model.scheduler, config.sampling.num_steps, config.sampling.eta)
        self.algorithm = build_algorithm(config.algorithm, self.grid)
        self.sample_predictor = NoisePredictor(self.model, config.sampling.guidance_scale, self.resolution,
                                               self.resolution)
        self.train_predictor = (self.sample_predictor if self.algorithm.cfg_in_training
                                else NoisePredictor(self.model, 1.0, self.resolution, self.resolution))
        train = config.train
        self.optimizer = torch.optim.AdamW(
            lora_parameters(self.model.unet), lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
            weight_decay=train.weight_decay, eps=train.adam_eps,
        )
        self.train_prompts = load_prompts(config.prompts.train)
        self.eval_prompts = load_prompts(config.prompts.eval or config.prompts.train)
        self.rollout_generator = torch.Generator().manual_seed(config.seed)
        self.train_generator = torch.Generator().manual_seed(config.seed + 1)
        self.prompt_generator = torch.Generator().manual_seed(config.seed + 2)
        self._prompt_queue: list[str] = []
        self.iteration = 0

    # ---------------------------------------------------------------------------------------------------------
    # rooms: encode, rollout, train, evaluate
    # ---------------------------------------------------------------------------------------------------------

    def encode(self, prompts: Sequence[str]) -> TextConditioning:
        return encode_prompts(self.model, list(prompts), height=self.resolution, width=self.resolution)

    def next_prompts(self) -> list[str]:
        """The next `sampling.batch_size` training prompts: epochs over a seeded shuffle of the prompt list."""
        out = []
        while len(out) < self.config.sampling.batch_size:
            if not self._prompt_queue:
                order = torch.randperm(len(self.train_prompts), generator=self.prompt_generator).tolist()
                self._prompt_queue = [self.train_prompts[i] for i in order]
            out.append(self._prompt_queue.pop())
        return out

    def rollout_context(self) -> RolloutContext:
        return RolloutContext(
            model=self.model,
            predictor=self.sample_predictor,
            grid=self.grid,
            reward_fn=self.reward.score,
            reward_grad_fn=self.reward.score_and_grad if self.reward.differentiable else None,
            generator=self.rollout_generator,
            reward_weights=self.reward_weights,
        )

    def rollout(self, prompts: list[str]) -> RolloutBatch:
        self.model.unet.eval()
        batch = self.algorithm.rollout(self.rollout_context(), prompts, self.encode(prompts))
        batch.pairs.validate()
        return batch

    def train_on(self, batch: RolloutBatch) -> dict[str, float]:
        """Optimizer steps over the rollout's examples: `num_inner_epochs` passes of `train_batch_size`."""
        train = self.config.train
        examples = batch.pairs
        cond_all = self.encode(batch.prompts)
        sums: dict[str, float] = {}
        steps = 0
        for _ in range(train.num_inner_epochs):
            order = torch.randperm(len(examples), generator=self.train_generator)
            for chunk in order.split(train.train_batch_size):
                minibatch = examples.select(chunk)
                cond = cond_all.index(minibatch.prompt_index)
                out = self.algorithm.loss(self.train_predictor, cond, minibatch, self.train_generator)
                self.optimizer.zero_grad(set_to_none=True)
                out.loss.backward()
                grad_norm = torch.nn.utils.clip_grad_norm_(lora_parameters(self.model.unet), train.grad_clip)
                self.optimizer.step()
                self.algorithm.apply_state_update(out.state_update)
                for key, value in {"loss": out.loss.item(), "grad_norm": grad_norm.item(), **out.metrics}.items():
                    sums[key] = sums.get(key, 0.0) + value
                steps += 1
        metrics = {key: value / steps for key, value in sums.items()} if steps else {}
        metrics["optimizer_steps"] = float(steps)
        metrics["num_examples"] = float(len(examples))
        return metrics

    @torch.no_grad()
    def evaluate(self, prompts: Sequence[str] | None = None, num_seeds: int | None = None) -> EvalResult:
        """Rewards of the current policy on held-out (prompt, seed) samples; same seeds every call.

        x_T of each (prompt, seed) comes from its own generator and the per-step noise from one seeded per
        prompt, so the result depends only on the weights, never on earlier random draws of the run.
        """
        prompts = list(prompts if prompts is not None else self.eval_prompts)
        num_seeds = num_seeds or self.config.prompts.eval_seeds
        images, totals, per = [], [], {}
        for j, prompt in enumerate(prompts):
            gens = [torch.Generator().manual_seed(1_000_003 * (s + 1) + j) for s in range(num_seeds)]
            x_T = torch.cat([initial_noise(1, self.model, g, self.resolution, self.resolution) for g in gens])
            cond = self.encode([prompt] * num_seeds)
            traj = sample_trajectory(self.sample_predictor, cond, x_T, self.grid, gens[0])
            imgs = decode_latents(self.model, traj.final).cpu()
            result = self.reward.score(imgs, [prompt] * num_seeds)
            images.append(imgs)
            totals.append(result.total)
            for name, value in result.per_reward.items():
                per.setdefault(name, []).append(value)
        rewards = torch.cat(totals)
        return EvalResult(
            mean=rewards.mean().item(),
            per_reward={name: torch.cat(v).mean().item() for name, v in per.items()},
            images=torch.cat(images),
            rewards=rewards,
        )

    # ---------------------------------------------------------------------------------------------------------
    # the loop
    # ---------------------------------------------------------------------------------------------------------

    def fit(self, iterations: int | None = None, log=print) -> RunResult:
        """Runs the loop and writes the run directory: metrics.jsonl, eval.json, the exported LoRA, and the held-out
        image grids grid_before.png / grid_after.png (one row per eval prompt, one column per seed)."""
        iterations = iterations or self.config.train.iterations
        run_dir = Path(self.config.run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        before = self.evaluate()
        log(f"[eval] before training: reward {before.mean:.4f}")
        history: list[dict[str, float]] = []
        with open(run_dir / "metrics.jsonl", "w") as metrics_file:
            for _ in range(iterations):
                start = time.perf_counter()
                batch = self.rollout(self.next_prompts())
                sampled = time.perf_counter()
                metrics = self.train_on(batch)
                self.iteration += 1
                elapsed = time.perf_counter() - start
                record = {
                    "iteration": float(self.iteration),
                    "reward_mean": batch.rewards.mean().item(),
                    "reward_std": batch.rewards.std().item() if batch.rewards.numel() > 1 else 0.0,
                    "images_per_second": batch.rewards.numel() / max(sampled - start, 1e-9),
                    "seconds": elapsed,
                    **{f"rollout/{k}": v for k, v in batch.metrics.items()},
                    **{f"train/{k}": v for k, v in metrics.items()},
                }
                history.append(record)
                metrics_file.write(json.dumps(record) + "\n")
                metrics_file.flush()
                log(f"[iter {self.iteration:4d}] reward {record['reward_mean']:.4f} "
                    f"loss {metrics.get('loss', float('nan')):.4f} examples {int(metrics['num_examples'])} "
                    f"{record['images_per_second']:.1f} img/s")
        after = self.evaluate()
        log(f"[eval] after {iterations} iterations: reward {after.mean:.4f} (before {before.mean:.4f})")
        save_grid(before.images, run_dir / "grid_before.png", nrow=self.config.prompts.eval_seeds)
        save_grid(after.images, run_dir / "grid_after.png", nrow=self.config.prompts.eval_seeds)
        lora_file = export_lora(self.model, run_dir / "lora")
        summary = {"eval_before": before.mean, "eval_after": after.mean, "per_reward_before": before.per_reward,
                   "per_reward_after": after.per_reward, "iterations": iterations,
                   "algorithm": self.config.algorithm.name}
        (run_dir / "eval.json").write_text(json.dumps(summary, indent=2))
        return RunResult(run_dir=run_dir, eval_before=before, eval_after=after, history=history, lora_file=lora_file)

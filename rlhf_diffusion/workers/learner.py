"""Learner: the trainable LoRA UNet (reference = the same UNet with the adapter off), the optimizer, the algorithm's
loss and state; trains on rollout batches and publishes versioned weights.

Versions: the learner starts at version 0 (the initial LoRA) and every training round adds one. A batch sampled
with version v and trained at learner version V has staleness V − v; a batch staler than `train.max_staleness` is
dropped (counted, never trained on). The optimizer's minibatch order and DDE's timestep draws come from a
generator seeded by (run seed, iteration), so a round redone after a resume draws the same numbers.

Speed options (`train.mixed_precision`, `train.gradient_checkpointing`) apply here only: the loss forward runs
under `torch.autocast` (bf16 / fp16) while the LoRA parameters, their gradients and the optimizer stay float32;
fp16 adds a dynamic `GradScaler`; checkpointing recomputes UNet block activations in the backward pass.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from rlhf_diffusion.algorithms import RolloutBatch, build_algorithm
from rlhf_diffusion.config import RunConfig
from rlhf_diffusion.diffusion.sampling import DDIMGrid, NoisePredictor
from rlhf_diffusion.models.conditioning import TextConditioning, encode_prompts
from rlhf_diffusion.models.loading import (
    DiffusionModel,
    export_lora,
    get_lora_state_dict,
    lora_parameters,
    set_lora_state_dict,
)
from rlhf_diffusion.workers.messages import TRAIN_STREAM, PublishedWeights, TrainResult, derive_seed
from rlhf_diffusion.workers.policy import load_policy, resolve_device

__all__ = ["AUTOCAST_DTYPES", "Learner"]

# `train.mixed_precision` -> autocast dtype (None = no autocast).
AUTOCAST_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


class Learner:
    """The single learner.

    Args:
        config: the run config.
        source: the pipeline directory or hub id (resolved).
        model: share an already loaded policy (the single-process trainer) instead of loading one.
        num_threads: torch intra-op threads (under Ray: the CPUs the actor reserved).
    """

    def __init__(self, config: RunConfig, source: str, *, model: DiffusionModel | None = None,
                 num_threads: int | None = None):
        if num_threads:
            torch.set_num_threads(num_threads)
        self.config = config
        self.device = resolve_device(config.device) if model is None else model.device
        if config.train.mixed_precision == "fp16" and self.device.type != "cuda":
            raise ValueError(
                f"train.mixed_precision 'fp16' needs CUDA, but the learner runs on {self.device.type!r}; use 'bf16' "
                "or 'no'"
            )
        self.model = model if model is not None else load_policy(config, source, self.device)
        if config.train.gradient_checkpointing:
            self.model.unet.enable_gradient_checkpointing()
        self.autocast_dtype = AUTOCAST_DTYPES[config.train.mixed_precision]
        # Dynamic loss scaling for fp16 (whose gradients underflow); with enabled=False every call passes through.
        self.grad_scaler = torch.amp.GradScaler(self.device.type, enabled=config.train.mixed_precision == "fp16")
        self.resolution = config.model.resolution or self.model.resolution
        self.grid = DDIMGrid.from_scheduler(self.model.scheduler, config.sampling.num_steps, config.sampling.eta)
        self.algorithm = build_algorithm(config.algorithm, self.grid)
        self.predictor = NoisePredictor(
            self.model, config.sampling.guidance_scale if self.algorithm.cfg_in_training else 1.0,
            self.resolution, self.resolution,
        )
        train = config.train
        self.optimizer = torch.optim.AdamW(
            lora_parameters(self.model.unet), lr=train.learning_rate, betas=(train.adam_beta1, train.adam_beta2),
            weight_decay=train.weight_decay, eps=train.adam_eps,
        )
        self.version = 0
        self.dropped = 0

    def ready(self) -> int:
        return self.version

    def encode(self, prompts: Sequence[str]) -> TextConditioning:
        return encode_prompts(self.model, list(prompts), height=self.resolution, width=self.resolution)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context the loss forward runs in: `torch.autocast` at `train.mixed_precision`, or nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def train(self, batch: RolloutBatch, iteration: int) -> TrainResult:
        """`num_inner_epochs` passes of `train_batch_size`-example optimizer steps over `batch`."""
        start = time.perf_counter()
        staleness = self.version - batch.weights_version
        if staleness > self.config.train.max_staleness:
            self.dropped += 1
            return TrainResult(version=self.version, dropped=True,
                               metrics={"staleness": float(staleness), "dropped_batches": float(self.dropped)})
        train = self.config.train
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, TRAIN_STREAM, iteration))
        examples = batch.pairs
        self.model.unet.train()
        cond_all = self.encode(batch.prompts)
        sums: dict[str, float] = {}
        steps = 0
        for _ in range(train.num_inner_epochs):
            order = torch.randperm(len(examples), generator=generator)
            for chunk in order.split(train.train_batch_size):
                minibatch = examples.select(chunk)
                cond = cond_all.index(minibatch.prompt_index)
                with self.autocast():
                    out = self.algorithm.loss(self.predictor, cond, minibatch, generator)
                self.optimizer.zero_grad(set_to_none=True)
                self.grad_scaler.scale(out.loss).backward()
                self.grad_scaler.unscale_(self.optimizer)  # clip the true gradients
                grad_norm = torch.nn.utils.clip_grad_norm_(lora_parameters(self.model.unet), train.grad_clip)
                self.grad_scaler.step(self.optimizer)  # skipped when fp16 gradients overflowed
                self.grad_scaler.update()
                self.algorithm.apply_state_update(out.state_update)
                for key, value in {"loss": out.loss.item(), "grad_norm": grad_norm.item(), **out.metrics}.items():
                    sums[key] = sums.get(key, 0.0) + value
                steps += 1
        self.model.unet.eval()
        metrics = {key: value / steps for key, value in sums.items()} if steps else {}
        self.version += 1
        metrics.update(optimizer_steps=float(steps), num_examples=float(len(examples)), staleness=float(staleness),
                       dropped_batches=float(self.dropped), train_seconds=time.perf_counter() - start)
        return TrainResult(version=self.version, metrics=metrics)

    def weights(self) -> PublishedWeights:
        """The current LoRA (peft format, CPU float32) with its version, in this process."""
        return PublishedWeights(version=self.version, state=get_lora_state_dict(self.model.unet))

    def publish(self) -> PublishedWeights:
        """The current LoRA put into the Ray object store once; samplers fetch it by reference."""
        import ray

        return PublishedWeights(version=self.version, ref=[ray.put(get_lora_state_dict(self.model.unet))])

    def lora_file_bytes(self) -> bytes:
        """The current LoRA as the bytes of a diffusers `pytorch_lora_weights.safetensors` (for the driver to
        write into the run directory, wherever this actor runs)."""
        with tempfile.TemporaryDirectory() as tmp:
            return Path(export_lora(self.model, tmp)).read_bytes()

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed learner needs: version, LoRA, optimizer and algorithm state (all CPU)."""
        return {
            "version": self.version,
            "dropped": self.dropped,
            "lora": get_lora_state_dict(self.model.unet),
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "algorithm": _to_cpu(self.algorithm.state_dict()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> int:
        set_lora_state_dict(self.model.unet, state["lora"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.algorithm.load_state_dict(state["algorithm"])
        self.version = int(state["version"])
        self.dropped = int(state.get("dropped", 0))
        return self.version

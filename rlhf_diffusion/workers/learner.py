"""Learner: the trainable LoRA UNet (reference = the same UNet with the adapter off), the optimizer, the algorithm's
loss and state; trains on rollout batches and publishes versioned weights.

Versions: the learner starts at version 0 (the initial LoRA) and every training round adds one. A batch sampled
with version v and trained at learner version V has staleness V − v; a batch staler than `train.max_staleness` is
dropped (counted, never trained on). The optimizer's minibatch order and DDE's timestep draws come from a
generator seeded by (run seed, iteration), so a round redone after a resume draws the same numbers.

Speed options (`train.mixed_precision`, `train.gradient_checkpointing`) apply here only: the loss forward runs
under `torch.autocast` (bf16 / fp16) while the LoRA parameters, their gradients and the optimizer stay float32;
fp16 adds a dynamic `GradScaler`; checkpointing recomputes UNet block activations in the backward pass.

Data parallelism (`resources.num_learners` = R > 1): R learner actors form one torch.distributed process group
(NCCL on GPUs, gloo on CPU) and wrap the UNet in DistributedDataParallel. Every rank receives the whole rollout
batch and walks the same minibatch order; rank r computes the loss of its contiguous share of each minibatch
(`Algorithm.loss_on_rows`: random draws are made for the whole minibatch first) scaled by R·|share|/|minibatch|,
so DDP's gradient average is exactly the single-process minibatch gradient. Gradients are therefore identical on
every rank, so are the clipped update and the weights; the algorithm's state updates and the metrics are gathered
from all ranks. A rank whose share is empty (a minibatch smaller than R) runs one row at weight 0, because every
rank must take part in each all-reduce. `LearnerGroup` is the driver-side handle of the R actors.

Why not Ray Train's `TorchTrainer`: `fit()` owns the training loop and its own checkpoints and restarts, whereas
here the driver hands the learner one rollout batch per iteration (deterministic schedule, staleness, our atomic
checkpoints). The group therefore does itself what TorchTrainer's torch backend does (rendezvous on rank 0's
address, `init_process_group`, DDP), as verl and OpenRLHF do for their RL learners.
"""

from __future__ import annotations

import contextlib
import datetime
import math
import socket
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist

from rlhf_diffusion.algorithms import build_algorithm
from rlhf_diffusion.algorithms.signal import measure_signal
from rlhf_diffusion.batches import PublishedWeights, RolloutBatch, TrainResult
from rlhf_diffusion.config import RunConfig, TrainConfig
from rlhf_diffusion.models.conditioning import TextConditioning, encode_prompts
from rlhf_diffusion.models.loading import (
    DiffusionModel,
    export_trainable,
    get_trainable_state,
    set_trainable_state,
    trainable_parameters,
)
from rlhf_diffusion.seeding import SIGNAL_STREAM, TRAIN_STREAM, derive_seed
from rlhf_diffusion.workers.policy import DTYPES, load_policy, policy_grid, policy_predictor, resolve_device

__all__ = ["AUTOCAST_DTYPES", "GroupRef", "GroupedMeans", "Learner", "LearnerGroup", "ema_decay_at", "learning_rate_at"]

# `train.mixed_precision` -> autocast dtype (None = no autocast).
AUTOCAST_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def learning_rate_at(train: TrainConfig, iteration: int) -> float:
    """The learning rate of iteration `iteration` (1-based) under `train.lr_schedule`: a pure function of the
    iteration, so a resumed run trains at the rates an uninterrupted one would. Warm-up: iteration i <= W trains at
    lr * i / W. Then 'constant' keeps lr; 'linear' and 'cosine' go from lr at iteration W + 1 to
    lr * lr_final_ratio at iteration `train.iterations` (and stay there past it)."""
    lr, warmup, last = train.learning_rate, train.lr_warmup_iterations, train.iterations
    if warmup and iteration <= warmup:
        return lr * max(iteration, 1) / warmup
    if train.lr_schedule == "constant":
        return lr
    span = last - warmup - 1
    progress = min(max((iteration - warmup - 1) / span, 0.0), 1.0) if span > 0 else 1.0
    decay = 1.0 - progress if train.lr_schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * (train.lr_final_ratio + (1.0 - train.lr_final_ratio) * decay)


def ema_decay_at(decay: float, step: int) -> float:
    """The moving average's decay at the learner's `step`-th optimizer step: min((1 + n)/(10 + n), decay), a
    warm-up that lets the first updates move the average further, as flow_grpo's `EMAModuleWrapper` [C]."""
    return min((1 + step) / (10 + step), decay)


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(v) for v in value)
    return value


class GroupedMeans:
    """Running sums and counts of per-example diagnostics by (name, group) over a training round
    (`LossOutput.grouped`): sums and counts add, so minibatches and data-parallel ranks merge exactly and each mean
    is over every example of the round, however the examples fell into minibatches and shares."""

    def __init__(self):
        self.totals: dict[tuple[str, int], list[float]] = {}  # (name, group) → [sum, count]

    @staticmethod
    def sums_of(grouped: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict[tuple[str, int], tuple[float, int]]:
        """{(name, group): (sum, count)} of one `LossOutput.grouped` (plain floats: cheap to all-gather)."""
        out: dict[tuple[str, int], tuple[float, int]] = {}
        for name, (groups, values) in grouped.items():
            groups, values = groups.detach().cpu().long(), values.detach().cpu().double()
            for group in groups.unique().tolist():
                rows = groups == group
                out[(name, int(group))] = (float(values[rows].sum()), int(rows.sum()))
        return out

    def add(self, sums: dict[tuple[str, int], tuple[float, int]]) -> None:
        for key, (total, count) in sums.items():
            entry = self.totals.setdefault(key, [0.0, 0])
            entry[0] += total
            entry[1] += count

    def means(self) -> dict[str, float]:
        """`<name>_<group>` → mean over the group's examples, and `<name>_mean` → mean over all of the name's."""
        out: dict[str, float] = {}
        overall: dict[str, list[float]] = {}
        for (name, group), (total, count) in sorted(self.totals.items()):
            if count:
                out[f"{name}_{group}"] = total / count
            entry = overall.setdefault(name, [0.0, 0])
            entry[0] += total
            entry[1] += count
        out.update({f"{name}_mean": total / count for name, (total, count) in overall.items() if count})
        return out


class Learner:
    """The learner, or one rank of a data-parallel learner.

    Args:
        config: the run config.
        source: the pipeline directory or hub id (resolved).
        model: share an already loaded policy (the single-process trainer) instead of loading one.
        num_threads: torch intra-op threads (under Ray: the CPUs the actor reserved).
        rank, world_size: this rank and the number of ranks; with world_size > 1, `init_process_group` must run
            on every rank before training.
    """

    def __init__(
        self,
        config: RunConfig,
        source: str,
        *,
        model: DiffusionModel | None = None,
        num_threads: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ):
        if num_threads:
            torch.set_num_threads(num_threads)
        if not 0 <= rank < world_size:
            raise ValueError(f"learner rank {rank} is outside 0..{world_size - 1}")
        self.rank, self.world_size = rank, world_size
        self.ddp: torch.nn.parallel.DistributedDataParallel | None = None
        self.config = config
        self.device = resolve_device(config.device) if model is None else model.device
        if config.train.mixed_precision == "fp16" and self.device.type != "cuda":
            raise ValueError(
                f"train.mixed_precision 'fp16' needs CUDA, but the learner runs on {self.device.type!r}; use 'bf16' "
                "or 'no'"
            )
        self.model = model if model is not None else load_policy(config, source, self.device, for_training=True)
        if config.train.gradient_checkpointing:
            self.model.unet.enable_gradient_checkpointing()
        self.autocast_dtype = AUTOCAST_DTYPES[config.train.mixed_precision]
        # Dynamic loss scaling for fp16 (whose gradients underflow); with enabled=False every call passes through.
        self.grad_scaler = torch.amp.GradScaler(self.device.type, enabled=config.train.mixed_precision == "fp16")
        self.resolution = config.model.resolution or self.model.resolution
        self.grid = policy_grid(config, self.model)
        self.algorithm = build_algorithm(config.algorithm, self.grid)
        self.predictor = policy_predictor(
            self.model,
            config.sampling.guidance_scale if self.algorithm.cfg_in_training else 1.0,
            self.resolution,
            config.sampling.negative_prompt,
        )
        train = config.train
        self.optimizer = torch.optim.AdamW(
            trainable_parameters(self.model.unet),
            lr=train.learning_rate,
            betas=(train.adam_beta1, train.adam_beta2),
            weight_decay=train.weight_decay,
            eps=train.adam_eps,
        )
        self.version = 0
        self.dropped = 0
        self.optimizer_steps = 0  # over the whole run (the moving average's clock)
        # The moving average of the trained weights (`train.ema_decay`), aligned with `trainable_parameters`.
        self.ema: list[torch.Tensor] | None = None
        if train.ema_decay > 0:
            self.ema = [p.detach().clone().float() for p in trainable_parameters(self.model.unet)]
        # Samplers receive the weights in the dtype they compute in (a full-UNet publish in bf16 is half the size).
        self.publish_dtype = DTYPES[config.model.dtype]

    def ready(self) -> int:
        return self.version

    # -- data parallelism ------------------------------------------------------------------------------------------

    def rendezvous_address(self) -> tuple[str, int]:
        """Rank 0: this node's IP and a free TCP port for the process group's rendezvous."""
        try:
            import ray

            host = ray.util.get_node_ip_address()
        except Exception:  # not in a Ray worker
            host = "127.0.0.1"
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((host, 0))
            return host, sock.getsockname()[1]

    def init_process_group(self, host: str, port: int, timeout_s: float = 600.0) -> int:
        """Joins the R-rank process group (every rank calls this at once) and wraps the UNet in DDP; rank 0's
        weights are broadcast to all ranks. Returns the rank."""
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            init_method=f"tcp://{host}:{port}",
            rank=self.rank,
            world_size=self.world_size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        device_ids = [self.device.index or 0] if self.device.type == "cuda" else None
        self.ddp = torch.nn.parallel.DistributedDataParallel(self.model.unet, device_ids=device_ids)
        self.predictor.forward_module = self.ddp
        return self.rank

    def _shard(self, size: int) -> tuple[torch.Tensor, float]:
        """This rank's rows of a `size`-example minibatch and the weight that makes DDP's gradient average equal
        the minibatch-mean gradient (an empty share runs row 0 at weight 0)."""
        rows = torch.tensor_split(torch.arange(size), self.world_size)[self.rank]
        if len(rows) == 0:
            return torch.zeros(1, dtype=torch.long), 0.0
        return rows, len(rows) * self.world_size / size

    def _gather(self, value: Any) -> list[Any]:
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, value)
        return out

    def encode(self, prompts: Sequence[str]) -> TextConditioning:
        return encode_prompts(self.model, list(prompts), height=self.resolution, width=self.resolution)

    def autocast(self) -> contextlib.AbstractContextManager:
        """The context the loss forward runs in: `torch.autocast` at `train.mixed_precision`, or nothing."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def train(self, batch: RolloutBatch, iteration: int) -> TrainResult:
        """`num_inner_epochs` passes of `train_batch_size`-example optimizer steps over `batch`, the run's iteration
        `iteration` (0-based: the first is 0)."""
        start = time.perf_counter()
        staleness = self.version - batch.weights_version
        if staleness > self.config.train.max_staleness:
            self.dropped += 1
            return TrainResult(
                version=self.version,
                dropped=True,
                metrics={"staleness": float(staleness), "dropped_batches": float(self.dropped)},
            )
        train = self.config.train
        learning_rate = learning_rate_at(train, iteration + 1)  # the schedule counts iterations from 1
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate
        generator = torch.Generator().manual_seed(derive_seed(self.config.seed, TRAIN_STREAM, iteration))
        examples = self.algorithm.prepare_examples(batch)  # batch.pairs; DDPO fills in its advantages
        self.model.unet.train()
        cond_all = self.encode(batch.prompts)
        signal = self.measure_signal(examples, cond_all, iteration)
        sums: dict[str, float] = {}
        grouped = GroupedMeans()  # per-step / per-t diagnostics: KL (guards.log_kl), clamp and saturation fractions
        log_kl = self.config.guards.log_kl
        steps = 0
        for _ in range(train.num_inner_epochs):
            order = torch.randperm(len(examples), generator=generator)
            for chunk in order.split(train.train_batch_size):
                if len(chunk) == 0:  # an empty batch (every pair a tie) splits into one empty chunk: no step
                    continue
                minibatch = examples.select(chunk)
                cond = cond_all.index(minibatch.prompt_index)
                with self.autocast():
                    if self.world_size == 1:
                        out, weight = self.algorithm.loss(self.predictor, cond, minibatch, generator), 1.0
                    else:
                        rows, weight = self._shard(len(minibatch))
                        out = self.algorithm.loss_on_rows(self.predictor, cond, minibatch, generator, rows)
                self.optimizer.zero_grad(set_to_none=True)
                self.grad_scaler.scale(out.loss * weight).backward()  # DDP all-reduces (averages) here
                self.grad_scaler.unscale_(self.optimizer)  # clip the true gradients
                grad_norm = torch.nn.utils.clip_grad_norm_(trainable_parameters(self.model.unet), train.grad_clip)
                self.grad_scaler.step(self.optimizer)  # skipped when fp16 gradients overflowed
                self.grad_scaler.update()
                self.optimizer_steps += 1
                self._update_ema()
                values = {"loss": out.loss.item(), **out.metrics}
                update = out.state_update
                kept = {k: v for k, v in out.grouped.items() if log_kl or not k.startswith("kl/")}
                group_sums = GroupedMeans.sums_of(kept) if weight > 0 else {}
                if self.world_size > 1:  # every rank applies the whole minibatch's update; metrics are size-weighted
                    shares = self._gather((weight, values, update if weight > 0 else None, group_sums))
                    update = self.algorithm.merge_state_updates([u for _, _, u, _ in shares])
                    total = sum(w for w, _, _, _ in shares)
                    values = {key: sum(w * v[key] for w, v, _, _ in shares if w > 0) / total for key in values}
                    for _, _, _, share_sums in shares:  # sums and counts add: exactly the one-learner means
                        grouped.add(share_sums)
                else:
                    grouped.add(group_sums)
                self.algorithm.apply_state_update(update)
                for key, value in {**values, "grad_norm": grad_norm.item()}.items():
                    sums[key] = sums.get(key, 0.0) + value
                steps += 1
        self.model.unet.eval()
        metrics = {key: value / steps for key, value in sums.items()} if steps else {}
        self.version += 1
        metrics.update(
            optimizer_steps=float(steps),
            num_examples=float(len(examples)),
            staleness=float(staleness),
            dropped_batches=float(self.dropped),
            learning_rate=learning_rate,
            train_seconds=time.perf_counter() - start,
        )
        return TrainResult(version=self.version, metrics=metrics, diagnostics={**grouped.means(), **signal})

    def _update_ema(self) -> None:
        """After the n-th optimizer step, when (n + 1) is a multiple of `train.ema_every` (flow_grpo's clock [C]):
        average ← average + (1 − d)(weights − average), d = `ema_decay_at(train.ema_decay, n)`."""
        train, n = self.config.train, self.optimizer_steps
        if self.ema is None or (n + 1) % train.ema_every:
            return
        weight = 1.0 - ema_decay_at(train.ema_decay, n)
        with torch.no_grad():
            for average, param in zip(self.ema, trainable_parameters(self.model.unet), strict=True):
                average.lerp_(param.detach().float(), weight)

    @contextlib.contextmanager
    def averaged(self, average: bool = True):
        """Within the block the UNet holds the moving average of its weights (`train.ema_decay`; without one, or
        with `average` False, its own weights); they come back on exit."""
        if not average or self.ema is None:
            yield
            return
        params = trainable_parameters(self.model.unet)
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for param, value in zip(params, self.ema, strict=True):
                param.copy_(value)
        try:
            yield
        finally:
            with torch.no_grad():
                for param, value in zip(params, saved, strict=True):
                    param.copy_(value)

    def measure_signal(self, examples: Any, cond_all: TextConditioning, iteration: int) -> dict[str, float]:
        """The learning-signal diagnostics of this round's examples (`Algorithm.prepare_examples`) at the current
        weights (`train.signal_every`, `algorithms.signal`), before any step of the round. Rank 0 measures alone, on
        the bare UNet (no DDP collectives); its own generator leaves the training draws as they are."""
        every = self.config.train.signal_every
        if not every or iteration % every or self.rank != 0 or len(examples) < 2:
            return {}
        wrapped, self.predictor.forward_module = self.predictor.forward_module, None
        try:
            with self.autocast():
                return measure_signal(
                    self.algorithm,
                    self.predictor,
                    cond_all,
                    examples,
                    trainable_parameters(self.model.unet),
                    derive_seed(self.config.seed, SIGNAL_STREAM, iteration),
                    self.config.train.signal_examples,
                )
        finally:
            self.predictor.forward_module = wrapped

    def weights(self, average: bool = False) -> PublishedWeights:
        """The current trained weights (LoRA: peft format, CPU float32; full: the UNet in `model.dtype`) with
        their version, in this process; `average`: their moving average instead (`train.ema_decay`; without one,
        the weights)."""
        average = average and self.ema is not None
        with self.averaged(average):
            state = get_trainable_state(self.model.unet, self.publish_dtype)
        return PublishedWeights(version=self.version, state=state, average=average)

    def publish(self, average: bool = False) -> PublishedWeights:
        """The current weights (or their moving average) put into the Ray object store once; samplers fetch them by
        reference."""
        import ray

        weights = self.weights(average)
        return PublishedWeights(version=weights.version, ref=[ray.put(weights.state)], average=weights.average)

    def export_files(self) -> dict[str, bytes]:
        """The run's deliverable as {relative path: bytes} (`lora/pytorch_lora_weights.safetensors` or the `unet/`
        directory, see `export_trainable`), for the driver to write wherever this actor runs."""
        with tempfile.TemporaryDirectory() as tmp, self.averaged():
            return export_trainable(self.model, tmp)

    def state_dict(self) -> dict[str, Any]:
        """Everything a resumed learner needs: version, trained weights (float32), optimizer and algorithm state
        (all CPU). The weights sit under "lora" or, for full fine-tuning, "unet"."""
        return {
            "version": self.version,
            "dropped": self.dropped,
            self.weights_key: get_trainable_state(self.model.unet),
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "algorithm": _to_cpu(self.algorithm.state_dict()),
            # fp16's dynamic loss scale and its growth tracker ({} when fp16 is off): a resumed run starts from the
            # scale it had reached, not from 65536 (which would skip steps to overflow until it shrank again)
            "grad_scaler": self.grad_scaler.state_dict(),
            "optimizer_steps": self.optimizer_steps,
            # the moving average (`train.ema_decay`), keyed by position in `trainable_parameters`; {} when off
            "ema": {f"{i:06d}": v.detach().cpu() for i, v in enumerate(self.ema or [])},
        }

    @property
    def weights_key(self) -> str:
        return "unet" if self.config.model.finetune == "full" else "lora"

    def load_state_dict(self, state: dict[str, Any]) -> int:
        if self.weights_key not in state:
            raise ValueError(
                f"the checkpoint holds no {self.weights_key!r} weights (model.finetune is "
                f"{self.config.model.finetune!r})"
            )
        set_trainable_state(self.model.unet, state[self.weights_key])
        self.optimizer.load_state_dict(state["optimizer"])
        self.algorithm.load_state_dict(state["algorithm"])
        if self.grad_scaler.is_enabled() and state.get("grad_scaler"):  # older checkpoints and fp32/bf16 runs: none
            self.grad_scaler.load_state_dict(state["grad_scaler"])
        self.version = int(state["version"])
        self.dropped = int(state.get("dropped", 0))
        self.optimizer_steps = int(state.get("optimizer_steps", 0))
        if self.ema is not None:
            saved = state.get("ema") or {}
            if saved:  # a checkpoint without one (older, or ema_decay was 0) starts the average from the weights
                if len(saved) != len(self.ema):
                    raise ValueError(
                        f"the checkpoint's moving average holds {len(saved)} tensors, the model trains {len(self.ema)}"
                    )
                values = [saved[key] for key in sorted(saved)]
            else:
                values = list(trainable_parameters(self.model.unet))
            self.ema = [v.detach().clone().float().to(self.device) for v in values]
        return self.version


class GroupRef:
    """The pending results of one call on every rank; `get` returns rank 0's (all ranks agree), raising as soon as
    any rank fails, so a dead rank does not leave the driver waiting for the collectives of the others."""

    def __init__(self, refs: list):
        self.refs = refs

    def get(self) -> Any:
        import ray

        pending = list(self.refs)
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            ray.get(done)
        return ray.get(self.refs[0])


class _GroupMethod:
    def __init__(self, group: LearnerGroup, name: str):
        self.group, self.name = group, name

    def remote(self, *args) -> Any:
        if self.name in LearnerGroup.ALL_RANKS:
            return GroupRef([getattr(actor, self.name).remote(*args) for actor in self.group.actors])
        return getattr(self.group.actors[0], self.name).remote(*args)  # identical on every rank: ask rank 0


class LearnerGroup:
    """The driver's handle on R data-parallel learner actors, with the call shape of one learner actor
    (`group.train.remote(batch, it)`): calls that change state run on every rank (`ALL_RANKS`), reads go to rank
    0. The actors are started, connected into one process group and DDP-wrapped here.

    Args:
        actor_cls: `ray.remote(Learner)` with its options (CPUs, GPUs, restarts) applied.
        config, source, num_threads: as for `Learner`.
        world_size: R.
        timeout_s: process-group timeout (a collective waiting longer for a dead rank fails).
    """

    ALL_RANKS = frozenset({"train", "load_state_dict", "ready"})

    def __init__(
        self,
        actor_cls: Any,
        config: RunConfig,
        source: str,
        *,
        world_size: int,
        num_threads: int | None = None,
        timeout_s: float = 600.0,
    ):
        import ray

        self.actors = [
            actor_cls.remote(config, source, num_threads=num_threads, rank=rank, world_size=world_size)
            for rank in range(world_size)
        ]
        ray.get([actor.ready.remote() for actor in self.actors], timeout=timeout_s)
        host, port = ray.get(self.actors[0].rendezvous_address.remote())
        ray.get([actor.init_process_group.remote(host, port, timeout_s) for actor in self.actors], timeout=timeout_s)

    def __getattr__(self, name: str) -> _GroupMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return _GroupMethod(self, name)

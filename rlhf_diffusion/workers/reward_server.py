"""RewardServer: hosts the configured reward models and serves every sampler, batching their requests.

Requests that arrive while the models are busy (or within `batch_window_ms` of the first one) are concatenated
into one forward pass and split again, so N samplers cost one batched reward call instead of N small ones; scores
of different images never interact (the `RewardModel` contract), so batching does not change a score. Gradient
requests (`score_and_grad`, for TailorPO-G) are batched the same way in their own queue. A reward that has no
gradient (JPEG size) makes `score_and_grad` raise `NotDifferentiableError`; it never returns zeros.

Held-out rewards (`guards.heldout_rewards`, the reward-hacking guards) live on the same servers but apart from the
training rewards: only `score_heldout` (the samplers' evaluation passes) reaches them, in a queue of its own, so
they can never enter a training reward, a preference label or a reward gradient.

`RewardHost` is the synchronous core (usable in one process); `RewardServer` is the asyncio Ray actor around it.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from rlhf_diffusion.rewards.base import RewardResult, WeightedReward
from rlhf_diffusion.workers.policy import resolve_device

__all__ = ["MicroBatcher", "RewardHost", "RewardServer", "build_heldout_reward", "split_result"]


def split_result(result: RewardResult, sizes: Sequence[int]) -> list[RewardResult]:
    """Splits a batched `RewardResult` back into one per request (row counts `sizes`)."""
    totals = result.total.split(list(sizes))
    per = {name: scores.split(list(sizes)) for name, scores in result.per_reward.items()}
    return [RewardResult(total=totals[i], per_reward={name: per[name][i] for name in per}) for i in range(len(sizes))]


def build_heldout_reward(specs: Sequence[Any], device: str | torch.device = "cpu") -> WeightedReward | None:
    """The held-out rewards (`guards.heldout_rewards`) as one `WeightedReward` whose `per_reward` scores are what
    counts (its total is never used), keyed by each entry's key; None when there are none. A custom reward that
    fails to load names `guards.heldout_rewards.<i>.target`."""
    if not specs:
        return None
    return WeightedReward.from_specs(specs, device=device, where="guards.heldout_rewards", weighted=False)


class RewardHost:
    """The reward models of a run in this process.

    Args:
        specs: the config's reward entries (name, weight, path, kwargs).
        device: "auto" / "cpu" / "cuda".
        heldout_specs: the config's `guards.heldout_rewards` (evaluation only, see `score_heldout_many`).
    """

    def __init__(self, specs: Sequence[Any], device: str = "auto", heldout_specs: Sequence[Any] = ()):
        self.device = resolve_device(device)
        self.reward = WeightedReward.from_specs(specs, device=self.device)
        self.heldout = build_heldout_reward(heldout_specs, device=self.device)

    def heldout_names(self) -> list[str]:
        """Keys of the held-out rewards, in config order (empty when there are none)."""
        return self.heldout.names if self.heldout is not None else []

    def describe(self) -> dict[str, Any]:
        """What a client needs to know before scoring: `names` (reward keys, in order), `weights` (key → weight),
        `differentiable`, and `not_differentiable` (the terms without a gradient, described for messages)."""
        return {
            "names": self.reward.names,
            "weights": self.reward.weights,
            "differentiable": self.reward.differentiable,
            "not_differentiable": self.reward.not_differentiable,
        }

    def score_many(self, requests: list[tuple[Tensor, list[str]]]) -> list[RewardResult]:
        """Scores several requests in one batch per image size; returns one result per request, in order."""
        return self._batched(
            requests,
            lambda images, prompts: self.reward.score(images, prompts),
            lambda out, sizes: split_result(out, sizes),
        )

    def score_heldout_many(self, requests: list[tuple[Tensor, list[str]]]) -> list[RewardResult]:
        """Like `score_many` with the held-out rewards (their raw scores in `per_reward`); raises when none are
        configured."""
        if self.heldout is None:
            raise ValueError("no held-out rewards are configured (guards.heldout_rewards is empty)")
        heldout = self.heldout
        return self._batched(
            requests,
            lambda images, prompts: heldout.score(images, prompts),
            lambda out, sizes: split_result(out, sizes),
        )

    def score_and_grad_many(self, requests: list[tuple[Tensor, list[str]]]) -> list[tuple[RewardResult, Tensor]]:
        """Like `score_many` with d total / d image; raises `NotDifferentiableError` for rewards without one."""

        def split(out, sizes):
            result, grad = out
            return list(zip(split_result(result, sizes), grad.split(list(sizes))))

        return self._batched(requests, lambda images, prompts: self.reward.score_and_grad(images, prompts), split)

    @staticmethod
    def _batched(requests, run: Callable, split: Callable) -> list:
        results: list = [None] * len(requests)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (images, _) in enumerate(requests):
            groups.setdefault(tuple(images.shape[1:]), []).append(i)
        for indices in groups.values():
            images = torch.cat([requests[i][0] for i in indices])
            prompts = [p for i in indices for p in requests[i][1]]
            outs = split(run(images, prompts), [requests[i][0].shape[0] for i in indices])
            for i, out in zip(indices, outs):
                results[i] = out
        return results


@dataclass
class _Pending:
    images: Tensor
    prompts: list[str]
    future: asyncio.Future


@dataclass
class BatchStats:
    """Counters of one queue: requests, batches (model calls) and images served, busy seconds."""

    requests: int = 0
    batches: int = 0
    images: int = 0
    busy_seconds: float = 0.0
    errors: int = 0
    started: float = field(default_factory=time.perf_counter)

    def as_dict(self) -> dict[str, float]:
        return {
            "requests": self.requests,
            "batches": self.batches,
            "images": self.images,
            "busy_seconds": self.busy_seconds,
            "errors": self.errors,
            "requests_per_batch": self.requests / self.batches if self.batches else 0.0,
        }


class MicroBatcher:
    """Collects concurrent requests and runs them as one batch on a single worker thread.

    The first request of an idle queue waits `window_s` for company; requests arriving while a batch runs form
    the next batch. A batch holds at most `max_images` images (a single larger request still runs alone).

    Args:
        run: list of (images, prompts) → list of results, one per request (blocking; runs on `executor`).
        executor: the thread that runs the models (one thread, so models are never used concurrently).
    """

    def __init__(
        self,
        run: Callable[[list[tuple[Tensor, list[str]]]], list],
        executor: ThreadPoolExecutor,
        window_s: float = 0.002,
        max_images: int = 256,
    ):
        self.run = run
        self.executor = executor
        self.window_s = window_s
        self.max_images = max_images
        self.pending: list[_Pending] = []
        self.stats = BatchStats()
        self._drainer: asyncio.Task | None = None

    async def submit(self, images: Tensor, prompts: list[str]) -> Any:
        future = asyncio.get_running_loop().create_future()
        self.pending.append(_Pending(images, list(prompts), future))
        if self._drainer is None or self._drainer.done():
            self._drainer = asyncio.create_task(self._drain())
        return await future

    def _take(self) -> list[_Pending]:
        batch, count = [], 0
        while self.pending and (not batch or count + self.pending[0].images.shape[0] <= self.max_images):
            item = self.pending.pop(0)
            batch.append(item)
            count += item.images.shape[0]
        return batch

    async def _drain(self) -> None:
        if self.window_s > 0:
            await asyncio.sleep(self.window_s)
        loop = asyncio.get_running_loop()
        while self.pending:
            batch = self._take()
            start = time.perf_counter()
            try:
                outs = await loop.run_in_executor(self.executor, self.run, [(p.images, p.prompts) for p in batch])
            except Exception as error:  # every waiting caller gets the error, the queue goes on
                self.stats.errors += 1
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(error)
                continue
            finally:
                self.stats.busy_seconds += time.perf_counter() - start
            self.stats.requests += len(batch)
            self.stats.batches += 1
            self.stats.images += sum(item.images.shape[0] for item in batch)
            for item, out in zip(batch, outs):
                if not item.future.done():
                    item.future.set_result(out)


class RewardServer:
    """Ray actor (asyncio) serving `score` and `score_and_grad` to every sampler with micro-batching.

    Args:
        specs: the config's reward entries.
        device: "auto" / "cpu" / "cuda" (a reward server sees a GPU only when it reserved one).
        batch_window_ms: how long the first request of an idle queue waits for others.
        max_batch_images: the most images in one batched model call.
        num_threads: torch intra-op threads for the models.
        heldout_specs: the config's `guards.heldout_rewards` (served by `score_heldout` only).
    """

    def __init__(
        self,
        specs: Sequence[Any],
        device: str = "auto",
        batch_window_ms: float = 2.0,
        max_batch_images: int = 256,
        num_threads: int = 1,
        heldout_specs: Sequence[Any] = (),
    ):
        self._incarnation = uuid.uuid4().hex
        torch.set_num_threads(max(1, num_threads))
        self.host = RewardHost(specs, device, heldout_specs)
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reward")
        window = batch_window_ms / 1000.0
        self._score = MicroBatcher(self.host.score_many, self._executor, window, max_batch_images)
        self._grad = MicroBatcher(self.host.score_and_grad_many, self._executor, window, max_batch_images)
        self._heldout = MicroBatcher(self.host.score_heldout_many, self._executor, window, max_batch_images)

    async def ready(self) -> bool:
        return True

    async def incarnation(self) -> str:
        """A token of this instance, new each time Ray restarts the actor: the driver counts a restart when it
        changes (`actors.Actors`), so one death is counted once."""
        return self._incarnation

    async def describe(self) -> dict[str, Any]:
        """`RewardHost.describe`: reward keys, weights and differentiability (custom rewards' is only known here)."""
        return self.host.describe()

    async def score(self, images: Tensor, prompts: list[str]) -> RewardResult:
        """(N, 3, H, W) images in [0, 1] + N prompts → `RewardResult` (float32 CPU)."""
        return await self._score.submit(images, prompts)

    async def score_and_grad(self, images: Tensor, prompts: list[str]) -> tuple[RewardResult, Tensor]:
        """Scores and d total / d images (N, 3, H, W), float32 CPU."""
        return await self._grad.submit(images, prompts)

    async def heldout_names(self) -> list[str]:
        """`RewardHost.heldout_names`: the held-out reward keys (empty when there are none)."""
        return self.host.heldout_names()

    async def score_heldout(self, images: Tensor, prompts: list[str]) -> RewardResult:
        """The held-out rewards' raw scores (`per_reward`) of (N, 3, H, W) evaluation images, float32 CPU."""
        return await self._heldout.submit(images, prompts)

    async def stats(self) -> dict[str, float]:
        """Counters since start: per queue requests, batches, images, busy seconds, requests per batch."""
        out = {f"score/{k}": v for k, v in self._score.stats.as_dict().items()}
        out.update({f"grad/{k}": v for k, v in self._grad.stats.as_dict().items()})
        out.update({f"heldout/{k}": v for k, v in self._heldout.stats.as_dict().items()})
        out["uptime_seconds"] = time.perf_counter() - self._score.stats.started
        return out

"""Reward server: batches concurrent requests without changing a score; under Ray it returns what the local
models return (tiny real-format reward models), gradients included; a non-differentiable reward says so."""

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from rlhf_diffusion.config import RewardConfig
from rlhf_diffusion.rewards.base import NotDifferentiableError, WeightedReward
from rlhf_diffusion.testing import build_tiny_aesthetic, build_tiny_clip_score
from rlhf_diffusion.workers.reward_server import MicroBatcher, RewardHost, RewardServer


def images(n, size=32, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_micro_batcher_joins_concurrent_requests_and_splits_results():
    calls = []

    def run(requests):
        calls.append(len(requests))
        time.sleep(0.05)  # a model call: requests arriving meanwhile join the next batch
        return [imgs.sum(dim=(1, 2, 3)) for imgs, _ in requests]

    async def main():
        batcher = MicroBatcher(run, ThreadPoolExecutor(1), window_s=0.01)
        inputs = [images(2, seed=i) for i in range(6)]
        outs = await asyncio.gather(*(batcher.submit(x, ["p", "q"]) for x in inputs))
        return inputs, outs, batcher.stats

    inputs, outs, stats = asyncio.run(main())
    for x, out in zip(inputs, outs):
        assert torch.equal(out, x.sum(dim=(1, 2, 3)))
    assert sum(calls) == 6 and len(calls) < 6  # fewer model calls than requests
    assert stats.requests == 6 and stats.batches == len(calls) and stats.images == 12


def test_micro_batcher_passes_errors_to_every_waiting_caller_and_keeps_serving():
    def run(requests):
        if any(p == ["bad"] for _, p in requests):
            raise ValueError("boom")
        return [torch.zeros(1) for _ in requests]

    async def main():
        batcher = MicroBatcher(run, ThreadPoolExecutor(1), window_s=0.01)
        first = await asyncio.gather(
            batcher.submit(images(1), ["bad"]), batcher.submit(images(1), ["ok"]), return_exceptions=True
        )
        second = await batcher.submit(images(1), ["ok"])
        return first, second

    first, second = asyncio.run(main())
    assert all(isinstance(r, ValueError) for r in first)
    assert torch.equal(second, torch.zeros(1))


def test_host_batches_by_image_size_and_equals_per_request_scores():
    host = RewardHost([RewardConfig(name="saturation"), RewardConfig(name="brightness", weight=-0.5)], "cpu")
    requests = [(images(2, 32, 0), ["a", "b"]), (images(1, 48, 1), ["c"]), (images(3, 32, 2), ["d", "e", "f"])]
    batched = host.score_many(requests)
    for (x, prompts), result in zip(requests, batched):
        single = host.reward.score(x, prompts)
        assert torch.allclose(result.total, single.total, atol=1e-7)
        assert result.per_reward.keys() == single.per_reward.keys()


@pytest.fixture(scope="module")
def model_rewards(tmp_path_factory):
    root = tmp_path_factory.mktemp("rewards")
    return [
        RewardConfig(name="aesthetic", path=str(build_tiny_aesthetic(root / "aesthetic"))),
        RewardConfig(name="clip_score", path=str(build_tiny_clip_score(root / "clip")), weight=0.5),
    ]


@pytest.mark.ray
def test_ray_reward_server_returns_the_local_scores_and_gradients(ray_connected, model_rewards):
    import ray

    local = WeightedReward.from_specs(model_rewards)
    server = ray.remote(RewardServer).options(num_cpus=1).remote(model_rewards, "cpu", 5.0, 256, 1)
    try:
        x, prompts = images(3, 64, 7), ["a red cube", "a cat", "a dog"]
        result = ray.get(server.score.remote(x, prompts))
        expected = local.score(x, prompts)
        assert torch.allclose(result.total, expected.total, atol=1e-5)
        for name in ("aesthetic", "clip_score"):
            assert torch.allclose(result.per_reward[name], expected.per_reward[name], atol=1e-5)
        remote_grad = ray.get(server.score_and_grad.remote(x, prompts))
        local_grad = local.score_and_grad(x, prompts)
        assert torch.allclose(remote_grad[1], local_grad[1], atol=1e-6)
        assert remote_grad[1].abs().sum() > 0 and torch.isfinite(remote_grad[1]).all()
        # concurrent callers (as several samplers) are served in fewer batched model calls
        refs = [server.score.remote(images(2, 64, s), ["a cat", "a dog"]) for s in range(8)]
        outs = ray.get(refs)
        for s, out in enumerate(outs):
            assert torch.allclose(out.total, local.score(images(2, 64, s), ["a cat", "a dog"]).total, atol=1e-5)
        stats = ray.get(server.stats.remote())
        assert stats["score/requests"] == 9 and stats["score/batches"] < 9
    finally:
        ray.kill(server)


@pytest.mark.ray
def test_ray_reward_server_refuses_gradients_of_jpeg(ray_connected):
    import ray

    server = ray.remote(RewardServer).options(num_cpus=1).remote([RewardConfig(name="jpeg_compressibility")], "cpu")
    try:
        scores = ray.get(server.score.remote(images(2), ["a", "b"]))
        assert scores.total.shape == (2,)
        with pytest.raises(Exception) as info:
            ray.get(server.score_and_grad.remote(images(2), ["a", "b"]))
        assert isinstance(info.value, NotDifferentiableError) or "not differentiable" in str(info.value)
    finally:
        ray.kill(server)

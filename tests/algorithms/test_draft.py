"""DRaFT (`algorithms/draft.py`): the replayed chain's gradient equals the gradient of the chain recomputed whole with
its noise held fixed (the last K steps differentiable, the earlier ones constant), the rollout's structure, one step
raising a differentiable reward, the config's checks, and iterations of the whole loop in one process."""

import math

import pytest
import torch

from rlhf_diffusion import testing
from rlhf_diffusion.algorithms.draft import replay_chain
from rlhf_diffusion.batches import ChainBatch
from rlhf_diffusion.config import ConfigError, parse_config
from rlhf_diffusion.diffusion import ddim
from rlhf_diffusion.diffusion.sampling import decode_latents, initial_noise
from rlhf_diffusion.models.loading import lora_parameters
from rlhf_diffusion.testing import tiny_run_config, tiny_trainer

PROMPTS = ["a cat", "a dog", "a fox"]
SETTINGS = {"train": {"train_batch_size": 64, "signal_every": 0}, "prompts": {"eval_seeds": 1}}


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


def _perturb_lora(trainer, seed=0):
    """Nonzero LoRA B (it starts at zero) so that every LoRA parameter has a gradient."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(trainer.model.unet):
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def _whole_chain(trainer, cond, x_T, noises, k):
    """The chain recomputed from x_T with fixed per-step noise; only the last k steps on the autograd tape."""
    grid, predictor = trainer.grid, trainer.train_predictor
    x, steps, states = x_T, grid.num_steps, [x_T]
    for i in range(steps):
        t, a, a_prev, std = grid.scalars(torch.full((x.shape[0],), i, dtype=torch.long))
        with torch.set_grad_enabled(i >= steps - k):
            eps = predictor(x, t, cond)
            mean, _ = ddim.ddim_step_mean(x, eps, a, a_prev, std)
            x = mean + std.view(-1, 1, 1, 1) * noises[i]
        states.append(x.detach())
    return x, torch.stack(states, dim=1)


@pytest.mark.parametrize("k", [1, 2, 4])
def test_replayed_gradient_equals_the_whole_chains(k, tiny_sd15_dir, tmp_path):
    trainer = tiny_trainer(tiny_sd15_dir, tmp_path, {"name": "draft", "grad_steps": k}, settings=SETTINGS)
    _perturb_lora(trainer)
    gen = torch.Generator().manual_seed(1)
    x_T = initial_noise(3, trainer.model, gen)
    noises = [torch.randn(x_T.shape, generator=gen) for _ in range(trainer.grid.num_steps)]
    cond = trainer.encode(PROMPTS)
    params = lora_parameters(trainer.model.unet)

    x0, latents = _whole_chain(trainer, cond, x_T, noises, k)
    image = decode_latents(trainer.model, x0, clamp=False)
    g = torch.randn(image.shape, generator=gen)
    expected = torch.autograd.grad((g * image).sum(), params)

    replayed = replay_chain(trainer.train_predictor, trainer.grid, cond, latents, k)
    torch.testing.assert_close(replayed.detach(), latents[:, -1], rtol=0, atol=0)  # the value is the sampled x_0
    got = torch.autograd.grad((g * decode_latents(trainer.model, replayed, clamp=False)).sum(), params)
    for e, r in zip(expected, got, strict=True):
        torch.testing.assert_close(r, e, rtol=1e-4, atol=1e-7)
    assert sum(e.norm() for e in expected) > 0


def test_rollout_ships_the_chain_and_the_reward_gradient(tiny_sd15_dir, tmp_path):
    trainer = tiny_trainer(tiny_sd15_dir, tmp_path, {"name": "draft"}, settings=SETTINGS)
    batch = trainer.rollout(PROMPTS)
    chains = batch.pairs
    assert isinstance(chains, ChainBatch) and len(chains) == 3
    assert chains.latents.shape[1] == trainer.grid.num_steps + 1
    assert batch.rewards.shape == (3, 1) and batch.final_images.shape == chains.image_grad.shape
    # brightness = mean over (c, h, w): its gradient is 1 / (3 H W) at every pixel
    pixels = chains.image_grad[0].numel()
    torch.testing.assert_close(chains.image_grad, torch.full_like(chains.image_grad, 1 / pixels))
    # the chain's last state decodes to the scored image
    torch.testing.assert_close(decode_latents(trainer.model, chains.latents[:, -1]), batch.final_images)


def test_one_step_raises_the_reward_of_the_chains(tiny_sd15_dir, tmp_path):
    """A small descent step on the loss, with g the brightness gradient, brightens the chains' images (each chain
    recomputed from its x_T with its noise held fixed)."""
    trainer = tiny_trainer(tiny_sd15_dir, tmp_path, {"name": "draft", "grad_steps": 4}, settings=SETTINGS)
    _perturb_lora(trainer)
    gen = torch.Generator().manual_seed(2)
    x_T = initial_noise(3, trainer.model, gen)
    noises = [torch.randn(x_T.shape, generator=gen) for _ in range(trainer.grid.num_steps)]
    cond = trainer.encode(PROMPTS)
    with torch.no_grad():
        x0, latents = _whole_chain(trainer, cond, x_T, noises, 0)
        before = decode_latents(trainer.model, x0)
    g = torch.full_like(before, 1 / before[0].numel())  # ∂ mean brightness / ∂ image
    chains = ChainBatch(prompt_index=torch.arange(3), latents=latents, image_grad=g)
    out = trainer.algorithm.loss(trainer.train_predictor, cond, chains, trainer.train_generator)
    assert testing.descend_lora(trainer, out.loss, 1e-3) > 0
    with torch.no_grad():
        after = decode_latents(trainer.model, _whole_chain(trainer, cond, x_T, noises, 0)[0])
    assert after.mean() > before.mean()


def test_config_refuses_a_reward_without_a_gradient_and_a_bad_k(tiny_sd15_dir, tmp_path):
    data = tiny_run_config(tiny_sd15_dir, tmp_path, {"name": "draft", "grad_steps": 2}, settings=SETTINGS)
    assert parse_config(data).algorithm.grad_steps == 2
    assert parse_config(tiny_run_config(tiny_sd15_dir, tmp_path, "draft")).algorithm.grad_steps == 1  # DRaFT-1
    with pytest.raises(ConfigError, match="rewards.0.name.*not differentiable.*DRaFT"):
        parse_config(tiny_run_config(tiny_sd15_dir, tmp_path, "draft", reward="jpeg_compressibility"))
    with pytest.raises(ConfigError, match="algorithm.grad_steps"):
        parse_config(tiny_run_config(tiny_sd15_dir, tmp_path, {"name": "draft", "grad_steps": 0}))


def test_two_iterations_end_to_end_with_signal_and_a_checkpoint(tiny_sd15_dir, tmp_path):
    trainer = tiny_trainer(
        tiny_sd15_dir,
        tmp_path,
        {"name": "draft", "grad_steps": 2},
        train={"iterations": 2, "train_batch_size": 2, "signal_every": 1, "signal_examples": 3},
        checkpoint={"every": 1},
        settings=SETTINGS,
    )
    result = trainer.fit()
    train_records = [r for r in testing.run_metrics(result.run_dir) if "train/loss" in r]
    assert len(train_records) == 2
    first = train_records[0]
    assert first["train/optimizer_steps"] == 2.0  # 3 chains, 2 per step
    assert math.isfinite(first["train/loss"]) and first["train/replayed_steps"] == 2.0
    assert "signal/coherence" in first and "signal/share_chain" in first
    assert (result.run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()

"""TailorPO-G guidance with every model reward (tiny random weights) on the tiny SD1.5 pipeline.

For aesthetic, imagereward, pickscore, hpsv2 and clip_score: the reward gradient reaches the latent (finite, not
zero), guidance moves the winner by exactly γ·σ_τ·sqrt(D) (`guidance_norm` sigma_relative, `guidance_gradient`
tweedie_const_eps), and a whole TailorPO-G rollout yields a valid batch. A non-differentiable reward
(jpeg_compressibility) is rejected by config validation, naming `rewards.0.name`.
"""

from __future__ import annotations

import pytest
import torch

from rlhf_diffusion.algorithms.tailorpo import guide_winner
from rlhf_diffusion.batches import StepPairBatch
from rlhf_diffusion.config import ConfigError, parse_config
from rlhf_diffusion.diffusion import ddim
from rlhf_diffusion.diffusion.sampling import decode_latents
from rlhf_diffusion.models.loading import lora_parameters
from rlhf_diffusion.testing import (
    build_tiny_aesthetic,
    build_tiny_clip_score,
    build_tiny_hpsv2,
    build_tiny_imagereward,
    build_tiny_pickscore,
)
from rlhf_diffusion.trainer import LocalTrainer

BUILDERS = {
    "aesthetic": build_tiny_aesthetic,
    "imagereward": build_tiny_imagereward,
    "pickscore": build_tiny_pickscore,
    "hpsv2": build_tiny_hpsv2,
    "clip_score": build_tiny_clip_score,
}
PROMPTS = ["a red fox in the snow"]
GAMMA = 0.3
LATENT_DIM = 4 * 16 * 16  # D of the tiny SD1.5 latents


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread(one_torch_thread):
    """Every test of this module on one torch thread (the shared `one_torch_thread` fixture)."""


@pytest.fixture(scope="session")
def tiny_reward_dirs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny_rewards")
    return {name: build(root / name) for name, build in BUILDERS.items()}


def _config(model_dir, output_dir, reward: dict) -> dict:
    return {
        "run_name": "g",
        "output_dir": str(output_dir),
        "device": "cpu",
        "model": {"pretrained": str(model_dir)},
        "sampling": {"num_steps": 2, "guidance_scale": 2.0, "batch_size": len(PROMPTS)},
        "algorithm": {
            "name": "tailorpo_g",
            "guidance_gamma": GAMMA,
            "guidance_gradient": "tweedie_const_eps",
            "guidance_norm": "sigma_relative",
        },
        "rewards": [reward],
        "prompts": {"train": {"inline": PROMPTS}, "eval_seeds": 1},
        "tracking": {"enabled": False},
    }


@pytest.mark.parametrize("name", list(BUILDERS))
def test_tailorpo_g_guidance_with_model_reward(name, tiny_sd15_dir, tiny_reward_dirs, tmp_path):
    trainer = LocalTrainer(
        parse_config(_config(tiny_sd15_dir, tmp_path, {"name": name, "path": str(tiny_reward_dirs[name])}))
    )
    assert trainer.reward.differentiable and trainer.reward.names == [name]
    ctx = trainer.rollout_context()
    assert ctx.reward_grad_fn is not None
    cond = trainer.encode(PROMPTS)
    x = torch.randn(len(PROMPTS), 4, 16, 16, generator=torch.Generator().manual_seed(0))
    i = 0  # candidates at τ_1, the only step before the last on the 2-step grid
    t_w = trainer.grid.timesteps[i + 1].expand(len(PROMPTS))
    alpha_w = trainer.grid.alpha_prod_prev[i].expand(len(PROMPTS))
    std = trainer.grid.std_dev[i].expand(len(PROMPTS))
    with torch.no_grad():
        eps_w = trainer.sample_predictor(x, t_w, cond)

    # the gradient the guidance follows, d r / d x through Decode(x̂_0(x)) with ε̂ held constant
    latent = x.clone().requires_grad_(True)
    images = decode_latents(trainer.model, ddim.pred_x0_from_eps(latent, eps_w, alpha_w))
    result, image_grad = ctx.reward_grad_fn(images.detach(), PROMPTS)
    (grad,) = torch.autograd.grad(images, latent, grad_outputs=image_grad)
    for g in (image_grad, grad):
        assert torch.isfinite(g).all() and g.flatten(1).norm(dim=1).min() > 0
    assert torch.isfinite(result.total).all() and result.per_reward.keys() == {name}

    guided, before = guide_winner(
        ctx,
        x,
        eps_w,
        t_w,
        alpha_w,
        std,
        cond,
        PROMPTS,
        gradient="tweedie_const_eps",
        norm="sigma_relative",
        gamma=GAMMA,
        raw_scale=1.0,
    )
    torch.testing.assert_close(before, result.total)
    move = guided - x
    torch.testing.assert_close(move.flatten(1).norm(dim=1), GAMMA * std * LATENT_DIM**0.5, rtol=1e-4, atol=1e-5)
    cosine = torch.nn.functional.cosine_similarity(move.flatten(1), grad.flatten(1))
    torch.testing.assert_close(cosine, torch.ones_like(cosine), rtol=0, atol=1e-4)  # along +∇r

    batch = trainer.rollout(PROMPTS)  # validates the pairs
    assert isinstance(batch.pairs, StepPairBatch)
    assert batch.rewards.shape == (len(PROMPTS), 2) and torch.isfinite(batch.rewards).all()
    assert batch.per_reward.keys() == {name}
    assert batch.final_images.shape == (len(PROMPTS), 3, 64, 64)
    assert torch.isfinite(batch.pairs.action_w).all() and torch.isfinite(batch.pairs.action_l).all()
    assert not any(p.grad is not None for p in lora_parameters(trainer.model.unet))  # no θ-gradient leaks


def test_tailorpo_g_rejects_a_non_differentiable_reward(tiny_sd15_dir, tmp_path):
    with pytest.raises(ConfigError) as error:
        parse_config(_config(tiny_sd15_dir, tmp_path, {"name": "jpeg_compressibility"}))
    message = str(error.value)
    assert "(1 problem)" in message
    assert "rewards.0.name: is not differentiable; TailorPO-G needs a reward gradient" in message
    assert "(got 'jpeg_compressibility')" in message

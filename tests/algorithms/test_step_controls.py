"""The step methods' controls (ours): which transitions train (`skip_final_steps`), how each step's log-ratio is
weighted (`step_weight`), and TailorPO-G's straight-through guidance decode (`guidance_decode`)."""

import pytest
import torch

from rlhf_diffusion.algorithms.common import dpo_step_loss, step_weights
from rlhf_diffusion.algorithms.tailorpo import guide_winner
from rlhf_diffusion.config import ConfigError, parse_config
from rlhf_diffusion.diffusion import ddim
from rlhf_diffusion.diffusion.sampling import DDIMGrid, decode_latents
from rlhf_diffusion.testing import tiny_trainer

PROMPTS = ["a cat", "a dog", "a fox"]
TRAINER = {"train_prompts": PROMPTS, "train": {"signal_every": 0}}  # tiny_trainer's settings here


def sd_grid(num_steps: int = 10) -> DDIMGrid:
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return DDIMGrid.from_scheduler(scheduler, num_steps, 1.0)


def test_eps_scale_weights_put_every_step_in_units_of_eps():
    """dΔ/dε̂_θ at θ = ref is κ z / (σ D) for an action x = μ + σ z: its size grows as |κ|/σ (8× at the
    second-to-last of SD's 10 steps), and the eps_scale weight σ/|κ| makes it |z|/D at every step."""
    grid = sd_grid(10)
    weights = step_weights(grid, "eps_scale")
    torch.testing.assert_close(step_weights(grid, "uniform"), torch.ones(10))
    g = torch.Generator().manual_seed(0)
    x_t = torch.randn(1, 4, 8, 8, generator=g)
    eps_ref = torch.randn(1, 4, 8, 8, generator=g)
    z = torch.randn(1, 4, 8, 8, generator=g)
    sizes = []
    for k in range(10):
        _, a, a_prev, std = grid.scalars(torch.tensor([k]))
        mean_ref, _ = ddim.ddim_step_mean(x_t, eps_ref, a, a_prev, std)
        action = mean_ref + std.view(-1, 1, 1, 1) * z
        eps_theta = eps_ref.clone().requires_grad_(True)
        mean_theta, _ = ddim.ddim_step_mean(x_t, eps_theta, a, a_prev, std)
        delta = ddim.log_ratio_same_std(action, mean_theta, mean_ref, std)
        (grad,) = torch.autograd.grad(delta.sum(), eps_theta)
        sizes.append(float(grad.norm()))
        torch.testing.assert_close(weights[k] * grad.norm(), z.norm() / z.numel(), rtol=1e-4, atol=0)
    # SD's schedule (and the testbed's) at K = 10: the 101 → 1 transition has |κ|/σ = 8.3, every other about 1
    assert sizes[8] / sizes[4] > 5
    others = torch.cat([weights[:8], weights[9:]])
    assert others.sub(1).abs().max() < 0.35 and weights[8] < 0.2


def test_weighted_step_loss_scales_the_log_ratio_before_the_clamp():
    dw, dl = torch.tensor([0.5, 0.02]), torch.tensor([-0.5, -0.02])
    weight = torch.tensor([0.1, 1.0])
    loss, metrics = dpo_step_loss(dw, dl, beta=1.0, clip_epsilon=0.1, weight=weight)
    # row 0: 0.05 / −0.05 inside the clamp (unweighted 0.5 would be clamped); row 1: unchanged
    expected = -torch.nn.functional.logsigmoid(torch.tensor([0.1, 0.04])).mean()
    torch.testing.assert_close(loss, expected)
    assert metrics["clamp_fraction"] == 0.0
    _, unweighted = dpo_step_loss(dw, dl, beta=1.0, clip_epsilon=0.1)
    assert unweighted["clamp_fraction"] == 0.5


@pytest.mark.parametrize("name", ["tailorpo", "d3po"])
def test_skip_final_steps_trains_no_pair_of_the_last_steps(tiny_sd15_dir, tmp_path, one_torch_thread, name):
    trainer = tiny_trainer(tiny_sd15_dir, tmp_path, {"name": name, "skip_final_steps": 2}, **TRAINER)
    pairs = trainer.rollout(PROMPTS).pairs
    assert len(pairs) > 0 and set(pairs.step_index.tolist()) <= {0, 1}
    if name == "d3po":  # every kept pair trains each remaining step once
        assert len(pairs) % 2 == 0


def test_skip_final_steps_must_leave_a_step():
    with pytest.raises(ConfigError, match="algorithm.skip_final_steps"):
        parse_config(
            {
                "model": {"pretrained": "testbed:pipeline"},
                "sampling": {"num_steps": 4},
                "algorithm": {"name": "tailorpo", "skip_final_steps": 4},
                "rewards": [{"name": "brightness"}],
            }
        )


def test_straight_through_guidance_keeps_the_gradient_of_out_of_range_pixels(tiny_sd15_dir, tmp_path, one_torch_thread):
    """At the last step (x̂_0 = x) with brightness (∂r/∂pixel = const > 0): through the clamp, every pixel
    outside [0, 1] contributes nothing; straight-through, the move is the gradient of the unclamped decode."""
    trainer = tiny_trainer(tiny_sd15_dir, tmp_path, {"name": "tailorpo_g"}, **TRAINER)
    ctx = trainer.rollout_context()
    cond = trainer.encode(PROMPTS[:2])
    x = 6 * torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))  # large: many pixels clipped
    with torch.no_grad():
        raw = decode_latents(trainer.model, x, clamp=False)
    assert ((raw < 0) | (raw > 1)).float().mean() > 0.01
    ones = torch.ones(2)
    scale = 1e5  # the raw gradient is ~1e-6 per latent: scaled up, x + g − x keeps its digits in float32
    kwargs = dict(norm="raw", gamma=0.3, raw_scale=scale, gradient="tweedie_const_eps")
    moved = {
        mode: guide_winner(
            ctx, x, None, torch.zeros(2, dtype=torch.long), ones, ones, cond, PROMPTS[:2], decode=mode, **kwargs
        )[0]
        - x
        for mode in ("clamped", "straight_through")
    }
    xr = x.clone().requires_grad_(True)
    images = decode_latents(trainer.model, xr, clamp=False)
    _, image_grad = ctx.reward_grad_fn(images.detach().clamp(0, 1), PROMPTS[:2])
    (expected,) = torch.autograd.grad(images, xr, grad_outputs=image_grad)
    torch.testing.assert_close(moved["straight_through"] / scale, expected, rtol=1e-3, atol=1e-3 * expected.abs().max())
    assert (moved["clamped"] - moved["straight_through"]).norm() > 1e-3 * expected.norm()


def test_ddim_completion_is_deterministic_ddim_over_the_remaining_steps(tiny_sd15_dir, tmp_path, one_torch_thread):
    """With as many jumps as steps remain it is η = 0 DDIM over every remaining grid step (checked against
    diffusers' DDIMScheduler.step at eta 0); fewer jumps skip grid points and spend fewer UNet calls."""
    from diffusers import DDIMScheduler

    from rlhf_diffusion.diffusion.sampling import ddim_completion

    trainer = tiny_trainer(tiny_sd15_dir, tmp_path, {"name": "tailorpo"}, num_steps=5, **TRAINER)
    grid, predictor = trainer.grid, trainer.sample_predictor
    cond = trainer.encode(PROMPTS[:2])
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    step = 1  # x sits at τ_2
    got = ddim_completion(predictor, grid, cond, x, step, None, jumps=10)
    scheduler = DDIMScheduler.from_config(trainer.model.scheduler.config)
    scheduler.set_timesteps(5)
    expected = x
    with torch.no_grad():
        for i in range(step + 1, 5):
            t = grid.timesteps[i]
            eps = predictor(expected, t.expand(2), cond)
            expected = scheduler.step(eps, int(t), expected, eta=0.0).prev_sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    calls = []
    counting = lambda *a, **k: calls.append(1) or predictor(*a, **k)  # noqa: E731
    ddim_completion(counting, grid, cond, x, step, None, jumps=2)
    assert len(calls) == 2


def test_tailorpo_completion_ranking_rolls_out(tiny_sd15_dir, tmp_path, one_torch_thread):
    trainer = tiny_trainer(
        tiny_sd15_dir, tmp_path, {"name": "tailorpo", "step_ranking": "completion", "completion_jumps": 2}, **TRAINER
    )
    batch = trainer.rollout(PROMPTS)
    assert len(batch.pairs) > 0 and batch.rewards.shape == (3, 2)
    torch.testing.assert_close(batch.pairs.state_w, batch.pairs.state_l)

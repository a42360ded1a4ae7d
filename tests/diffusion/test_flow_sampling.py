"""The flow (SD3 / SD3.5) denoising loop (diffusion/flow_sampling.py): at noise level 0 it is the stock
`StableDiffusion3Pipeline` step for step; with SDE noise its recorded log-probs re-score exactly, per-row generators
make rows independent of their batch, and the reference predictor is the LoRA-free (or frozen-copy) policy."""

import dataclasses
import json
import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

from rlhf_diffusion.diffusion import flow
from rlhf_diffusion.diffusion.flow_sampling import (
    VelocityPredictor,
    flow_grid_for,
    predict_velocity_cfg,
    sample_flow_trajectory,
)
from rlhf_diffusion.diffusion.sampling import decode_latents, initial_noise
from rlhf_diffusion.models import attach_lora, build_tiny_pipeline, encode_prompts, load_diffusion_model
from rlhf_diffusion.models.conditioning import encode_negative, predict_velocity
from rlhf_diffusion.testing import model_with_random_lora

SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
PROMPTS = ["a photo of a cat", "a red car"]
K = 4

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd3_flow"), "sd3")


@pytest.fixture(scope="module")
def sd35_t5_dir(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd35_t5_flow"), "sd3", t5=True, sd35=True)


@pytest.fixture(scope="module")
def sd3_model(sd3_dir):
    """The base model (no LoRA); tests must not change it."""
    return load_diffusion_model(str(sd3_dir))


@pytest.fixture(scope="module")
def sd3_pipe(sd3_dir):
    return _stock_pipeline(sd3_dir)


@pytest.fixture(scope="module")
def lora_model(sd3_dir):
    return model_with_random_lora(sd3_dir, SD3_TARGETS, seed=0)


def _stock_pipeline(path) -> StableDiffusion3Pipeline:
    index = json.loads((path / "model_index.json").read_text())
    no_t5 = {} if index["text_encoder_3"][0] else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(path, **no_t5)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _stock_run(pipe, x_T, guidance, output_type, **call_kwargs):
    """The stock pipeline's output and its latents after every step."""
    steps = []

    def record(_pipe, _i, _t, kwargs):
        steps.append(kwargs["latents"].clone())
        return {}

    out = pipe(
        PROMPTS[: x_T.shape[0]],
        num_inference_steps=K,
        guidance_scale=guidance,
        latents=x_T.clone(),
        output_type=output_type,
        callback_on_step_end=record,
        **call_kwargs,
    ).images
    return out, torch.stack(steps, dim=1)


def _x_T(model, batch=2, seed=0):
    return initial_noise(batch, model, torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------------- noise level 0: the ODE


@pytest.mark.parametrize(
    "which, guidance", [("sd3", 1.0), ("sd3", 4.5), ("sd35_t5", 4.5)], ids=["sd3-w1", "sd3-w4.5", "sd35_t5-w4.5"]
)
def test_ode_is_the_stock_pipeline(request, which, guidance):
    if which == "sd3":
        model, pipe = request.getfixturevalue("sd3_model"), request.getfixturevalue("sd3_pipe")
    else:
        path = request.getfixturevalue(f"{which}_dir")
        model, pipe = load_diffusion_model(str(path)), _stock_pipeline(path)
    x_T = _x_T(model)
    grid = flow_grid_for(model, K, 0.0)
    assert grid.shift == 3.0 and grid.mu is None
    traj = sample_flow_trajectory(
        VelocityPredictor(model, guidance), encode_prompts(model, PROMPTS), x_T, grid, torch.Generator()
    )
    stock, stock_steps = _stock_run(pipe, x_T, guidance, "latent")

    assert traj.latents.shape == (2, K + 1, 16, 16, 16) and traj.log_probs.shape == (2, K)
    assert torch.equal(traj.latents[:, 0], x_T)
    assert torch.isnan(traj.log_probs).all()  # a deterministic step has no density
    torch.testing.assert_close(traj.latents[:, 1:], stock_steps, atol=1e-5, rtol=0)
    torch.testing.assert_close(traj.final, stock, atol=1e-5, rtol=0)
    assert (traj.final - x_T).abs().mean() > 0.1  # the loop moved
    # the timesteps the transformer saw are the pipeline scheduler's
    torch.testing.assert_close(grid.timesteps, pipe.scheduler.timesteps.float(), atol=0, rtol=0)

    if guidance != 1.0:  # guidance matters: w = 1 gives another x_0
        plain = sample_flow_trajectory(
            VelocityPredictor(model, 1.0), encode_prompts(model, PROMPTS), x_T, grid, torch.Generator()
        )
        assert (plain.final - traj.final).abs().max() > 1e-3


def test_a_negative_prompt_guides_as_the_stock_pipelines(sd3_model, sd3_pipe):
    """`sampling.negative_prompt`: the CFG branch encodes it as StableDiffusion3Pipeline's `negative_prompt`."""
    x_T, grid = _x_T(sd3_model), flow_grid_for(sd3_model, K, 0.0)
    cond = encode_prompts(sd3_model, PROMPTS)
    negative = "blurry, two heads"
    traj = sample_flow_trajectory(VelocityPredictor(sd3_model, 4.5, negative_prompt=negative), cond, x_T, grid, None)
    stock, _ = _stock_run(sd3_pipe, x_T, 4.5, "latent", negative_prompt=negative)
    torch.testing.assert_close(traj.final, stock, atol=1e-5, rtol=0)
    empty = sample_flow_trajectory(VelocityPredictor(sd3_model, 4.5), cond, x_T, grid, None)
    assert (empty.final - traj.final).abs().max() > 1e-3


def test_decoded_image_is_the_stock_pipeline_image(sd3_model, sd3_pipe):
    model, pipe = sd3_model, sd3_pipe
    x_T = _x_T(model, seed=3)
    traj = sample_flow_trajectory(
        VelocityPredictor(model, 4.5), encode_prompts(model, PROMPTS), x_T, flow_grid_for(model, K, 0.0), None
    )
    stock, _ = _stock_run(pipe, x_T, 4.5, "pt")
    with torch.no_grad():
        images = decode_latents(model, traj.final)
    assert images.shape == stock.shape == (2, 3, 64, 64)
    torch.testing.assert_close(images, stock, atol=1e-5, rtol=0)
    assert images.std() > 0.01


def test_dynamic_shift_follows_the_stock_pipeline(sd3_model, sd3_pipe, monkeypatch):
    pipe = sd3_pipe
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=True)
    monkeypatch.setattr(pipe, "scheduler", scheduler)
    model = dataclasses.replace(sd3_model, scheduler=FlowMatchEulerDiscreteScheduler.from_config(scheduler.config))
    grid = flow_grid_for(model, K, 0.0)
    # 64 px / 4 = 16 latents per side, patch 2: L = 64 tokens; μ = 0.5 + (1.15 − 0.5)(64 − 256)/(4096 − 256)
    assert grid.shift is None and grid.mu == pytest.approx(0.5 - 0.65 * 192 / 3840, abs=1e-12)
    x_T = _x_T(model, batch=1, seed=4)
    traj = sample_flow_trajectory(
        VelocityPredictor(model, 1.0), encode_prompts(model, PROMPTS[:1]), x_T, grid, torch.Generator()
    )
    stock, _ = _stock_run(pipe, x_T, 1.0, "latent")
    torch.testing.assert_close(grid.timesteps, pipe.scheduler.timesteps.float(), atol=0, rtol=0)
    torch.testing.assert_close(traj.final, stock, atol=1e-5, rtol=0)


def test_the_predictor_rejects_a_ddim_model(tiny_sd15_dir):
    with pytest.raises(ValueError, match="SD3"):
        VelocityPredictor(load_diffusion_model(str(tiny_sd15_dir)), 2.0)


def test_cfg_is_the_closed_form(sd3_model):
    model = sd3_model
    cond = encode_prompts(model, PROMPTS)
    uncond = encode_negative(model, 2)
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(5))
    t = torch.tensor([900.0, 300.0])
    with torch.no_grad():
        v_c = predict_velocity(model.unet, x, t, cond)
        v_u = predict_velocity(model.unet, x, t, uncond)
        guided = predict_velocity_cfg(model.unet, x, t, cond, uncond, 4.5)
        assert torch.equal(predict_velocity_cfg(model.unet, x, t, cond, uncond, 1.0), v_c)
        assert torch.equal(VelocityPredictor(model, 1.0)(x, t, cond), v_c)
    torch.testing.assert_close(guided, v_u + 4.5 * (v_c - v_u), atol=1e-5, rtol=0)
    assert (guided - v_c).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------- noise level > 0: the SDE


def test_sde_log_probs_rescore_exactly(lora_model):
    model = lora_model
    predictor = VelocityPredictor(model, 4.5)
    cond = encode_prompts(model, PROMPTS)
    grid = flow_grid_for(model, K, 0.7)
    x_T = _x_T(model, seed=6)
    traj = sample_flow_trajectory(predictor, cond, x_T, grid, torch.Generator().manual_seed(7))
    assert torch.isfinite(traj.log_probs).all() and torch.equal(traj.latents[:, 0], x_T)

    replay = torch.Generator().manual_seed(7)  # the same noise z, drawn in the same order
    with torch.no_grad():
        for i in range(K):
            x, x_next = traj.latents[:, i], traj.latents[:, i + 1]
            sigma, sigma_next = grid.sigmas[i], grid.sigmas[i + 1]
            v = predictor(x, grid.timesteps[i].expand(2), cond)
            _, logp, mean, std = flow.sde_step_with_logprob(x, v, sigma, sigma_next, 0.7, prev_sample=x_next)
            torch.testing.assert_close(logp, traj.log_probs[:, i], atol=0, rtol=0)  # importance ratio exactly 1
            # closed form: x' = μ + s z and log π = mean(−z²/2) − log s − log √(2π)
            z = torch.randn(x.shape, generator=replay)
            torch.testing.assert_close(std, grid.std_dev[i].expand(2), atol=1e-7, rtol=0)
            torch.testing.assert_close(x_next, mean + std.view(-1, 1, 1, 1) * z, atol=1e-5, rtol=0)
            expected = (-(z**2) / 2).mean(dim=(1, 2, 3)) - std.log() - 0.5 * math.log(2 * math.pi)
            torch.testing.assert_close(traj.log_probs[:, i], expected, atol=1e-4, rtol=0)
            # the first step's std is exactly a; the reference policy gives another log-prob
            if i == 0:
                torch.testing.assert_close(std, torch.full((2,), 0.7), atol=1e-6, rtol=0)
            v_ref = predictor(x, grid.timesteps[i].expand(2), cond, reference=True)
            _, logp_ref, _, _ = flow.sde_step_with_logprob(x, v_ref, sigma, sigma_next, 0.7, prev_sample=x_next)
            assert (logp_ref - logp).abs().max() > 1e-4

    ode = sample_flow_trajectory(predictor, cond, x_T, flow_grid_for(model, K, 0.0), None)
    assert (ode.final - traj.final).abs().max() > 0.1


def test_per_row_generators_do_not_depend_on_the_batch(lora_model):
    model = lora_model
    predictor = VelocityPredictor(model, 4.5)
    prompts = [*PROMPTS, "a blue house"]
    cond = encode_prompts(model, prompts)
    grid = flow_grid_for(model, K, 0.7)
    x_T = _x_T(model, batch=3, seed=8)
    seeds = [11, 12, 13]
    full = sample_flow_trajectory(predictor, cond, x_T, grid, [torch.Generator().manual_seed(s) for s in seeds])
    alone = sample_flow_trajectory(predictor, cond.index([1]), x_T[1:2], grid, [torch.Generator().manual_seed(12)])
    torch.testing.assert_close(alone.latents[0], full.latents[1], atol=1e-5, rtol=0)
    torch.testing.assert_close(alone.log_probs[0], full.log_probs[1], atol=1e-5, rtol=0)
    # the rows' noises differ, and one shared generator draws differently from per-row ones
    shared = sample_flow_trajectory(predictor, cond, x_T, grid, torch.Generator().manual_seed(12))
    assert (shared.latents[1, 1] - full.latents[1, 1]).abs().max() > 0.1
    with pytest.raises(ValueError, match="generators"):
        sample_flow_trajectory(predictor, cond, x_T, grid, [torch.Generator()])
    with pytest.raises(ValueError, match="generator"):
        sample_flow_trajectory(predictor, cond, x_T, grid, None)


def test_reference_is_the_base_model(sd3_dir, sd3_model, lora_model):
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(9))
    t = torch.tensor([1000.0, 400.0])

    base = sd3_model
    cond = encode_prompts(base, PROMPTS)
    with torch.no_grad():
        v_base = VelocityPredictor(base, 4.5)(x, t, cond)

    fresh = load_diffusion_model(str(sd3_dir))
    attach_lora(fresh.unet, rank=4, alpha=8.0, target_modules=SD3_TARGETS)  # B = 0: the base model
    zero = VelocityPredictor(fresh, 4.5)
    policy = zero(x, t, cond)
    reference = zero(x, t, cond, reference=True)
    assert policy.requires_grad and not reference.requires_grad and policy.dtype == torch.float32
    assert torch.equal(policy.detach(), reference) and torch.equal(reference, v_base)

    random = VelocityPredictor(lora_model, 4.5)
    with torch.no_grad():
        policy = random(x, t, cond)
    reference = random(x, t, cond, reference=True)
    assert (policy - reference).abs().max() > 1e-3
    torch.testing.assert_close(reference, v_base, atol=1e-6, rtol=0)
    assert all(p.requires_grad for n, p in lora_model.unet.named_parameters() if ".lora_" in n)  # restored

    # forward_module is what the policy calls; reference_unet (full fine-tuning) is what the reference calls
    other = model_with_random_lora(sd3_dir, SD3_TARGETS, seed=1)
    with torch.no_grad():
        v_other = VelocityPredictor(other, 4.5)(x, t, cond)
        random.forward_module = other.unet
        torch.testing.assert_close(random(x, t, cond), v_other, atol=0, rtol=0)
        random.forward_module = None
        full = VelocityPredictor(dataclasses.replace(lora_model, reference_unet=other.unet), 4.5)
        torch.testing.assert_close(full(x, t, cond, reference=True), v_other, atol=0, rtol=0)
        torch.testing.assert_close(full(x, t, cond), policy, atol=0, rtol=0)

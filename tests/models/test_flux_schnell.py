"""FLUX.1-schnell-shaped pipelines (no guidance embedding, timestep-distilled; the static shift 1 of its scheduler
config): the tiny one loads through the stock `FluxPipeline` and our loader, its conditioning carries no guidance, our
grid is the pipeline's un-shifted one, our ODE sampler reproduces the stock pipeline's latents, and Flow-GRPO trains a
LoRA on it."""

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from rlhf_diffusion.diffusion.flow_sampling import VelocityPredictor, flow_grid_for, sample_flow_trajectory
from rlhf_diffusion.diffusion.sampling import initial_noise
from rlhf_diffusion.models import build_tiny_pipeline, encode_prompts, load_diffusion_model, predict_velocity
from rlhf_diffusion.testing import check_lora_changed, run_metrics, tiny_loop_trainer

PROMPTS = ["a photo of a cat", "A Cute Corgi, wearing a hat!! 4k"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def schnell_dir(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_flux_schnell"), "flux", schnell=True)


def test_schnell_is_a_stock_flux_pipeline_without_guidance_embedding_and_its_grid_is_unshifted(schnell_dir):
    stock = FluxPipeline.from_pretrained(schnell_dir)
    assert not stock.transformer.config.guidance_embeds
    assert stock.scheduler.config.shift == 1.0 and not stock.scheduler.config.use_dynamic_shifting
    model = load_diffusion_model(str(schnell_dir))
    assert model.kind == "flux"
    cond = encode_prompts(model, PROMPTS)
    assert cond.guidance is None  # nothing to embed: model.flux_guidance is ignored
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(predict_velocity(model.unet, x, torch.tensor([1000.0, 500.0]), cond)).all()
    grid = flow_grid_for(model, 4, 0.0)
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(stock.scheduler.config)
    scheduler.set_timesteps(
        sigmas=np.linspace(1.0, 1 / 4, 4), mu=1.0
    )  # the pipeline passes μ; the scheduler ignores it
    torch.testing.assert_close(grid.sigmas, scheduler.sigmas.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(grid.sigmas[:-1], torch.linspace(1.0, 0.25, 4), atol=1e-6, rtol=0)  # shift 1


def test_our_ode_sampler_reproduces_the_stock_schnell_pipeline(schnell_dir):
    stock = FluxPipeline.from_pretrained(schnell_dir)
    stock.set_progress_bar_config(disable=True)
    model = load_diffusion_model(str(schnell_dir))
    cond = encode_prompts(model, PROMPTS)
    x_T = initial_noise(2, model, torch.Generator().manual_seed(5))
    ours = sample_flow_trajectory(VelocityPredictor(model, 1.0), cond, x_T, flow_grid_for(model, 3, 0.0), None).final
    packed = stock(
        PROMPTS,
        num_inference_steps=3,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(5),
        output_type="latent",
    ).images
    torch.testing.assert_close(ours, stock._unpack_latents(packed, 64, 64, stock.vae_scale_factor), atol=1e-5, rtol=0)


def test_flow_grpo_trains_a_schnell_lora(schnell_dir, tmp_path):
    algorithm = {"name": "grpo", "group_size": 2, "global_std": True}
    trainer = tiny_loop_trainer(schnell_dir, tmp_path, "schnell_grpo", algorithm, seed=0, train={"iterations": 2})
    result = trainer.fit()
    records = [r for r in run_metrics(result.run_dir) if "train/loss" in r]
    assert [r["iteration"] for r in records] == [1.0, 2.0]
    assert all(math.isfinite(r["train/loss"]) and r["train/optimizer_steps"] >= 1 for r in records)
    check_lora_changed(result.run_dir)


def test_schnell_is_refused_for_other_kinds(tmp_path):
    with pytest.raises(ValueError, match="schnell applies to kind 'flux' only"):
        build_tiny_pipeline(tmp_path, "sd3", schnell=True)


def test_no_t5_tokens_is_refused_for_flux_whose_t5_is_text_encoder_2(schnell_dir):
    from rlhf_diffusion.models.loading import ModelLoadError

    with pytest.raises(ModelLoadError, match="max_sequence_length 0 needs a pipeline without T5"):
        load_diffusion_model(str(schnell_dir), max_sequence_length=0)
    assert load_diffusion_model(str(schnell_dir), max_sequence_length=7).max_sequence_length == 7

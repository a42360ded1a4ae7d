"""FLUX.1 through the project's model code: the tiny pipeline is a real `FluxPipeline` directory (built offline, T5
tokenizer included) that the stock pipeline loads and samples; `load_diffusion_model` loads it (a local directory and
`tiny:flux`); `encode_prompts` equals the stock `encode_prompt`; the packing, image ids and sigma grid equal
diffusers'; our ODE sampler reproduces the stock pipeline's latents; and a LoRA exported with `export_lora` loads into
the stock pipeline and predicts there what it predicts in ours."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from diffusers.pipelines.flux.pipeline_flux import calculate_shift
from safetensors import safe_open
from transformers import CLIPTextModel, T5EncoderModel

from rlhf_diffusion.diffusion import flow
from rlhf_diffusion.diffusion.flow_sampling import VelocityPredictor, flow_grid_for, sample_flow_trajectory
from rlhf_diffusion.diffusion.sampling import decode_latents, initial_noise
from rlhf_diffusion.models import (
    LORA_WEIGHT_NAME,
    encode_negative,
    encode_prompts,
    export_lora,
    get_lora_state_dict,
    load_diffusion_model,
    lora_disabled,
    predict_velocity,
)
from rlhf_diffusion.models.conditioning import (
    FLUX_T5_MAX_LENGTH,
    latent_image_ids,
    pack_latents,
    unpack_latents,
)
from rlhf_diffusion.models.loading import ModelLoadError, pipeline_kind, set_attention
from rlhf_diffusion.models.sources import resolve_source
from rlhf_diffusion.models.tiny import FLUX_JOINT_DIM, FLUX_SCHEDULER_CONFIG
from rlhf_diffusion.testing import model_with_random_lora

# The attention projections of FLUX's double-stream blocks (image and text streams) and single-stream blocks.
FLUX_TARGETS = [
    "attn.to_q",
    "attn.to_k",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_q_proj",
    "attn.add_k_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
]
PROMPTS = ["a photo of a cat", "A Cute Corgi, wearing a hat!! 4k"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def stock(flux_dir):
    pipe = FluxPipeline.from_pretrained(flux_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def model(flux_dir):
    return load_diffusion_model(str(flux_dir))


def _stock_latents(pipe, prompts, steps, seed, **kwargs):
    out = pipe(
        prompts,
        num_inference_steps=steps,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(seed),
        output_type="latent",
        **kwargs,
    ).images  # packed (B, 64, 64)
    return pipe._unpack_latents(out, 64, 64, pipe.vae_scale_factor)


# ------------------------------------------------------------------------------------------------ the tiny pipeline


def test_tiny_flux_is_a_stock_pipeline_that_samples_an_image_and_loads_through_our_loader(flux_dir, stock, model):
    assert isinstance(stock.transformer, FluxTransformer2DModel) and stock.transformer.config.guidance_embeds
    assert sum(stock.transformer.config.axes_dims_rope) == stock.transformer.config.attention_head_dim
    assert isinstance(stock.text_encoder, CLIPTextModel) and isinstance(stock.text_encoder_2, T5EncoderModel)
    assert stock.scheduler.config.use_dynamic_shifting and stock.vae.config.latent_channels == 16
    image = stock("a cat", num_inference_steps=2, height=64, width=64, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()

    assert pipeline_kind(str(flux_dir)) == "flux"
    assert model.kind == "flux" and isinstance(model.unet, FluxTransformer2DModel)
    assert [type(e) for e in model.text_encoders] == [CLIPTextModel, T5EncoderModel]
    assert isinstance(model.scheduler, FlowMatchEulerDiscreteScheduler)
    assert model.resolution == 64 and model.latent_channels == 16 and model.vae_scale_factor == 4
    assert not any(p.requires_grad for p in model.unet.parameters())
    with pytest.raises(ModelLoadError, match="'flux'.*kind='sd3'"):
        load_diffusion_model(str(flux_dir), kind="sd3")
    set_attention(model.unet, "sdpa")  # keeps FLUX's own processors
    with pytest.raises(ValueError, match="'sdpa' only"):
        set_attention(model.unet, "default")


def test_tiny_flux_source_builds_a_flux_pipeline(tmp_path):
    path = resolve_source("tiny:flux", tmp_path)
    assert pipeline_kind(path) == "flux" and path.endswith("_tiny_models/flux")


# ---------------------------------------------------------------------------------------- pure maths vs diffusers


@pytest.mark.parametrize(("steps", "mu"), [(1, 0.5), (4, 1.15), (10, 0.4675), (28, 0.8)])
def test_flux_sigmas_equal_the_scheduler_with_fluxs_sigmas_and_mu(steps, mu):
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER_CONFIG)
    scheduler.set_timesteps(sigmas=list(np.linspace(1.0, 1 / steps, steps)), mu=mu)
    ours = flow.flux_sigmas(steps, mu)
    torch.testing.assert_close(ours, scheduler.sigmas.float(), atol=1e-6, rtol=0)
    grid = flow.FlowGrid.from_scheduler(scheduler, steps, 0.9, mu=mu, sigmas=flow.flux_base_sigmas(steps))
    torch.testing.assert_close(grid.sigmas, ours, atol=1e-6, rtol=0)
    assert grid.shift is None and grid.mu == mu
    torch.testing.assert_close(flow.train_sigmas(1000, grid.shift), torch.arange(1, 1001) / 1000, atol=1e-7, rtol=0)


def test_flux_mu_is_diffusers_calculate_shift_and_the_worked_example():
    for seq_len in (16, 64, 256, 1024, 4096):
        assert flow.flux_mu(seq_len) == pytest.approx(calculate_shift(seq_len), abs=1e-12)
    assert flow.flux_mu(4096) == pytest.approx(1.15) and flow.flux_mu(1024) == pytest.approx(0.63)
    torch.testing.assert_close(
        flow.flux_sigmas(4, 1.15), torch.tensor([1.0, 0.9045, 0.7595, 0.5128, 0.0]), atol=1e-4, rtol=0
    )


def test_packing_and_image_ids_equal_the_pipelines():
    x = torch.randn(2, 16, 6, 10, generator=torch.Generator().manual_seed(0))
    packed = pack_latents(x)
    torch.testing.assert_close(packed, FluxPipeline._pack_latents(x, 2, 16, 6, 10), atol=0, rtol=0)
    assert torch.equal(unpack_latents(packed, 6, 10), x)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 6 * 8, 10 * 8, 8), x)
    assert torch.equal(latent_image_ids(6, 10), FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 16, 5, 4))


def test_flow_grid_for_is_the_pipelines_grid(model, stock):
    grid = flow_grid_for(model, 5, 0.0)
    mu = calculate_shift(64)  # 64 px, vae factor 4 -> 16 x 16 latents -> 64 packed tokens
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(stock.scheduler.config)
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / 5, 5), mu=mu)
    torch.testing.assert_close(grid.sigmas, scheduler.sigmas.float(), atol=1e-6, rtol=0)
    torch.testing.assert_close(grid.timesteps, scheduler.timesteps.float(), atol=1e-4, rtol=0)
    assert grid.mu == pytest.approx(mu)
    bigger = flow_grid_for(model, 5, 0.0, 128, 128)  # 256 tokens: μ = base_shift
    assert bigger.mu == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------ conditioning


def test_encode_prompts_matches_the_stock_pipeline(model, stock):
    cond = encode_prompts(model, PROMPTS)
    with torch.no_grad():
        embeds, pooled, text_ids = stock.encode_prompt(PROMPTS, device=torch.device("cpu"))
    assert cond.prompt_embeds.shape == (2, FLUX_T5_MAX_LENGTH, FLUX_JOINT_DIM) and cond.add_time_ids is None
    torch.testing.assert_close(cond.prompt_embeds, embeds, atol=0, rtol=0)
    torch.testing.assert_close(cond.pooled_prompt_embeds, pooled, atol=0, rtol=0)
    assert torch.equal(cond.guidance, torch.full((2, 1), 3.5))  # FluxPipeline's default guidance_scale
    assert torch.equal(text_ids, torch.zeros(FLUX_T5_MAX_LENGTH, 3))
    uncond = encode_negative(model, 2)
    with torch.no_grad():
        negative, negative_pooled, _ = stock.encode_prompt([""] * 2, device=torch.device("cpu"))
    torch.testing.assert_close(uncond.prompt_embeds, negative, atol=0, rtol=0)
    torch.testing.assert_close(uncond.pooled_prompt_embeds, negative_pooled, atol=0, rtol=0)
    both = type(cond).cat([uncond, cond.index([1])])  # the guidance column travels with the rows
    assert both.guidance.shape == (3, 1)


def test_predict_velocity_equals_the_stock_transformer_call(model, stock):
    cond = encode_prompts(model, PROMPTS)
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1000.0, 250.0])
    with torch.no_grad():
        ours = predict_velocity(model.unet, x, t, cond)
        packed = stock.transformer(
            hidden_states=FluxPipeline._pack_latents(x, 2, 16, 16, 16),
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled_prompt_embeds,
            timestep=t / 1000,
            guidance=torch.full((2,), 3.5),
            img_ids=FluxPipeline._prepare_latent_image_ids(2, 8, 8, "cpu", torch.float32),
            txt_ids=torch.zeros(FLUX_T5_MAX_LENGTH, 3),
            return_dict=False,
        )[0]
        other_guidance = predict_velocity(model.unet, x, t, _with_guidance(cond, 1.0))
    torch.testing.assert_close(ours, FluxPipeline._unpack_latents(packed, 64, 64, 4), atol=0, rtol=0)
    assert (ours - other_guidance).abs().max() > 0  # the guidance value conditions the transformer
    with pytest.raises(ValueError, match="guidance"):
        predict_velocity(model.unet, x, t, type(cond)(cond.prompt_embeds, cond.pooled_prompt_embeds))


def _with_guidance(cond, value):
    return type(cond)(cond.prompt_embeds, cond.pooled_prompt_embeds, guidance=torch.full_like(cond.guidance, value))


def test_our_ode_sampler_reproduces_the_stock_pipeline(model, stock):
    """Same generator -> the same initial noise (B, 16, h, w) (the pipeline draws it unpacked, then packs it); our
    Euler loop on `flow_grid_for`'s grid with the guidance embedding and no CFG gives the pipeline's final latents,
    and our decode its image."""
    cond = encode_prompts(model, PROMPTS)
    grid = flow_grid_for(model, 3, 0.0)
    x_T = initial_noise(2, model, torch.Generator().manual_seed(5))
    trajectory = sample_flow_trajectory(VelocityPredictor(model, 1.0), cond, x_T, grid, None)
    expected = _stock_latents(stock, PROMPTS, 3, seed=5)
    torch.testing.assert_close(trajectory.final, expected, atol=1e-5, rtol=0)
    image = stock(
        PROMPTS,
        num_inference_steps=3,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(5),
        output_type="np",
    ).images
    with torch.no_grad():
        ours = decode_latents(model, trajectory.final)  # (B, 3, 64, 64) in [0, 1]
    torch.testing.assert_close(ours, torch.from_numpy(image).permute(0, 3, 1, 2), atol=1e-5, rtol=0)


def test_true_cfg_with_a_negative_prompt_reproduces_the_stock_pipeline(model, stock):
    """`sampling.guidance_scale` w > 1 with `sampling.negative_prompt`: FluxPipeline's true CFG (`true_cfg_scale` w,
    `negative_prompt`), the guidance embedding in both branches; a different negative prompt gives other latents."""
    cond = encode_prompts(model, PROMPTS)
    grid = flow_grid_for(model, 3, 0.0)
    x_T = initial_noise(2, model, torch.Generator().manual_seed(8))
    predictor = VelocityPredictor(model, 3.0, negative_prompt="blurry, low quality")
    trajectory = sample_flow_trajectory(predictor, cond, x_T, grid, None)
    expected = _stock_latents(stock, PROMPTS, 3, seed=8, true_cfg_scale=3.0, negative_prompt="blurry, low quality")
    torch.testing.assert_close(trajectory.final, expected, atol=1e-5, rtol=0)
    other = sample_flow_trajectory(VelocityPredictor(model, 3.0, negative_prompt="a cat"), cond, x_T, grid, None)
    assert (other.final - trajectory.final).abs().max() > 1e-4


# ----------------------------------------------------------------------------------------------------------- LoRA


def test_exported_lora_loads_into_the_stock_flux_pipeline_and_predicts_what_ours_does(flux_dir, tmp_path):
    model = model_with_random_lora(flux_dir, FLUX_TARGETS)
    adapted = {key.rsplit(".lora_", 1)[0] for key in get_lora_state_dict(model.unet)}
    # the double block's image and text streams, and the single block's q / k / v (it has no to_out / add_*)
    assert {"transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_add_out"} <= adapted
    assert "single_transformer_blocks.0.attn.to_q" in adapted
    assert "single_transformer_blocks.0.attn.to_out.0" not in adapted
    weights = export_lora(model, tmp_path / "lora")
    assert weights.name == LORA_WEIGHT_NAME
    with safe_open(weights, "pt") as f:
        saved = {key: f.get_tensor(key) for key in f.keys()}
    assert saved and all(key.startswith("transformer.") for key in saved)

    pipe = FluxPipeline.from_pretrained(flux_dir)
    pipe.set_progress_bar_config(disable=True)
    before = _stock_latents(pipe, PROMPTS[:1], 2, seed=0)
    pipe.load_lora_weights(weights.parent)
    loaded = {
        name.replace(".default_0.", "."): p.detach()
        for name, p in pipe.transformer.named_parameters()
        if ".lora_" in name
    }
    assert sorted(loaded) == sorted(key.removeprefix("transformer.") for key in saved)

    cond = encode_prompts(model, PROMPTS)
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([900.0, 50.0])
    with torch.no_grad():
        ours = predict_velocity(model.unet, x, t, cond)
        theirs = predict_velocity(pipe.transformer, x, t, cond)
        with lora_disabled(model.unet):
            base = predict_velocity(model.unet, x, t, cond)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert (ours - base).abs().max() > 1e-3
    after = _stock_latents(pipe, PROMPTS[:1], 2, seed=0)
    assert (after - before).abs().max() > 1e-3  # and the stock pipeline's samples change

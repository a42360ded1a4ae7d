"""Prompt encoding and CFG match the stock diffusers pipelines; TextConditioning batch operations."""

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from rlhf_diffusion.models import (
    TextConditioning,
    encode_negative,
    encode_prompts,
    load_diffusion_model,
    predict_noise,
    predict_noise_cfg,
)

PROMPTS = ["a photo of a cat", "an oil painting of a lighthouse at dusk", ""]


@pytest.fixture(scope="module")
def sd15(tiny_sd15_dir):
    return load_diffusion_model(str(tiny_sd15_dir))


@pytest.fixture(scope="module")
def sdxl(tiny_sdxl_dir):
    return load_diffusion_model(str(tiny_sdxl_dir))


@pytest.fixture(scope="module")
def sd15_pipe(tiny_sd15_dir):
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def sdxl_pipe(tiny_sdxl_dir):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _first_unet_call(pipe, prompts, guidance_scale, **call_kwargs):
    """Runs the stock pipeline for one step; returns the UNet's (sample, t, kwargs, output) of its first call."""
    captured = {}

    def pre_hook(module, args, kwargs):
        if "sample" not in captured:
            captured.update(sample=args[0].clone(), t=args[1], kwargs=dict(kwargs))

    def post_hook(module, args, kwargs, output):
        captured.setdefault("output", output[0].clone())

    handles = [
        pipe.unet.register_forward_pre_hook(pre_hook, with_kwargs=True),
        pipe.unet.register_forward_hook(post_hook, with_kwargs=True),
    ]
    try:
        pipe(
            prompts,
            num_inference_steps=1,
            guidance_scale=guidance_scale,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
            **call_kwargs,
        )
    finally:
        for handle in handles:
            handle.remove()
    return captured


# --------------------------------------------------------------------------------------------- prompt encoding


def test_sd15_encoding_matches_stock_pipeline(sd15, sd15_pipe):
    cond = encode_prompts(sd15, PROMPTS)
    uncond = encode_negative(sd15, len(PROMPTS))
    prompt_embeds, negative_embeds = sd15_pipe.encode_prompt(PROMPTS, "cpu", 1, True)
    assert cond.prompt_embeds.shape == (3, 77, 32)
    assert cond.pooled_prompt_embeds is None and cond.add_time_ids is None
    torch.testing.assert_close(cond.prompt_embeds, prompt_embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(uncond.prompt_embeds, negative_embeds, atol=1e-6, rtol=0)
    assert (cond.prompt_embeds[0] - cond.prompt_embeds[1]).abs().max() > 1e-3


def test_sdxl_encoding_matches_stock_pipeline(sdxl, sdxl_pipe):
    cond = encode_prompts(sdxl, PROMPTS)
    uncond = encode_negative(sdxl, len(PROMPTS))
    prompt_embeds, negative_embeds, pooled, negative_pooled = sdxl_pipe.encode_prompt(PROMPTS, device="cpu")
    assert cond.prompt_embeds.shape == (3, 77, 64) and cond.pooled_prompt_embeds.shape == (3, 32)
    torch.testing.assert_close(cond.prompt_embeds, prompt_embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(cond.pooled_prompt_embeds, pooled, atol=1e-6, rtol=0)
    torch.testing.assert_close(uncond.prompt_embeds, negative_embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(uncond.pooled_prompt_embeds, negative_pooled, atol=1e-6, rtol=0)
    assert not uncond.prompt_embeds.any()  # force_zeros_for_empty_prompt
    assert (cond.pooled_prompt_embeds[0] - cond.pooled_prompt_embeds[1]).abs().max() > 1e-3


def test_a_negative_prompt_is_encoded_as_the_stock_pipelines_encode_it(sd15, sd15_pipe, sdxl, sdxl_pipe):
    """A negative prompt (even "") is encoded like a prompt, also on SDXL base, which zeroes only when none is given."""
    negative = "blurry, low quality"
    _, expected = sd15_pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=[negative] * 3)
    torch.testing.assert_close(
        encode_negative(sd15, 3, negative_prompt=negative).prompt_embeds, expected, atol=1e-6, rtol=0
    )
    for text in (negative, ""):
        _, embeds, _, pooled = sdxl_pipe.encode_prompt(PROMPTS, device="cpu", negative_prompt=[text] * 3)
        ours = encode_negative(sdxl, 3, negative_prompt=text)
        torch.testing.assert_close(ours.prompt_embeds, embeds, atol=1e-6, rtol=0)
        torch.testing.assert_close(ours.pooled_prompt_embeds, pooled, atol=1e-6, rtol=0)
        assert ours.prompt_embeds.any()


@pytest.mark.parametrize("size", [None, (48, 80)])
def test_sdxl_add_time_ids_match_stock_pipeline(sdxl, sdxl_pipe, size):
    height, width = size or (64, 64)
    sizes = {"height": height, "width": width} if size else {}  # None: the model's native 64 x 64
    cond = encode_prompts(sdxl, ["a cat", "a dog"], **sizes)
    expected = sdxl_pipe._get_add_time_ids(
        (height, width),
        (0, 0),
        (height, width),
        dtype=cond.prompt_embeds.dtype,
        text_encoder_projection_dim=sdxl_pipe.text_encoder_2.config.projection_dim,
    )
    assert torch.equal(cond.add_time_ids, expected.repeat(2, 1))
    assert cond.add_time_ids[0].tolist() == [height, width, 0, 0, height, width]
    uncond = encode_negative(sdxl, 2, height=height, width=width)
    assert torch.equal(uncond.add_time_ids, cond.add_time_ids)


def test_encode_prompts_rejects_a_bare_string(sd15):
    with pytest.raises(ValueError, match="list of strings"):
        encode_prompts(sd15, "a cat")
    with pytest.raises(ValueError, match="empty"):
        encode_prompts(sd15, [])


# ------------------------------------------------------------------------------------------- noise prediction


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_cfg_equals_two_separate_calls_combined_by_hand(kind, request):
    model = request.getfixturevalue(kind)
    cond = encode_prompts(model, ["a cat", "a dog"])
    uncond = encode_negative(model, 2)
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([700, 20])
    w = 7.5
    with torch.no_grad():
        eps_cond = predict_noise(model.unet, x, t, cond)
        eps_uncond = predict_noise(model.unet, x, t, uncond)
        guided = predict_noise_cfg(model.unet, x, t, cond, uncond, w)
        plain = predict_noise_cfg(model.unet, x, t, cond, uncond, 1.0)
        no_uncond = predict_noise_cfg(model.unet, x, t, cond, None, w)
    # one batched UNet call against two separate ones: they differ by float rounding (1.1e-5 at one thread)
    torch.testing.assert_close(guided, eps_uncond + w * (eps_cond - eps_uncond), atol=1e-4, rtol=1e-4)
    assert torch.equal(plain, eps_cond) and torch.equal(no_uncond, eps_cond)
    assert (guided - eps_cond).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_cfg_matches_the_stock_pipeline_unet_call(kind, request):
    """The stock pipeline's first UNet call sees exactly [uncond; cond], and its guided ε equals ours."""
    model = request.getfixturevalue(kind)
    pipe = request.getfixturevalue(f"{kind}_pipe")
    prompts, w = ["a cat", "a red dog"], 6.0
    call = _first_unet_call(pipe, prompts, w)
    both = TextConditioning.cat([encode_negative(model, 2), encode_prompts(model, prompts)])
    torch.testing.assert_close(call["kwargs"]["encoder_hidden_states"], both.prompt_embeds, atol=1e-6, rtol=0)
    if kind == "sdxl":
        added = call["kwargs"]["added_cond_kwargs"]
        torch.testing.assert_close(added["text_embeds"], both.pooled_prompt_embeds, atol=1e-6, rtol=0)
        assert torch.equal(added["time_ids"], both.add_time_ids)

    x_t = call["sample"][:2]
    eps_uncond, eps_cond = call["output"].chunk(2)
    cond, uncond = encode_prompts(model, prompts), encode_negative(model, 2)
    with torch.no_grad():
        ours = predict_noise_cfg(model.unet, x_t, call["t"], cond, uncond, w)
    torch.testing.assert_close(ours, eps_uncond + w * (eps_cond - eps_uncond), atol=1e-5, rtol=1e-5)


def test_scalar_and_batched_timesteps_agree(sdxl):
    cond = encode_prompts(sdxl, ["a cat", "a dog"])
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        scalar = predict_noise(sdxl.unet, x, torch.tensor(300), cond)
        batched = predict_noise(sdxl.unet, x, torch.tensor([300, 300]), cond)
        cfg_scalar = predict_noise_cfg(sdxl.unet, x, 300, cond, encode_negative(sdxl, 2), 3.0)
        cfg_batched = predict_noise_cfg(sdxl.unet, x, torch.tensor([300, 300]), cond, encode_negative(sdxl, 2), 3.0)
    torch.testing.assert_close(scalar, batched, atol=1e-6, rtol=0)
    torch.testing.assert_close(cfg_scalar, cfg_batched, atol=1e-6, rtol=0)


def test_predict_noise_checks_its_inputs(sd15, sdxl):
    x = torch.randn(2, 4, 16, 16)
    with pytest.raises(ValueError, match="rows"):
        predict_noise(sd15.unet, x, torch.tensor(10), encode_prompts(sd15, ["only one"]))
    sd15_style = TextConditioning(prompt_embeds=torch.zeros(2, 77, 64))
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        predict_noise(sdxl.unet, x, torch.tensor(10), sd15_style)
    with pytest.raises(ValueError, match="uncond"):
        predict_noise_cfg(sd15.unet, x, 10, encode_prompts(sd15, ["a", "b"]), encode_negative(sd15, 1), 5.0)


# ------------------------------------------------------------------------------------------ TextConditioning


def _sdxl_conditioning(batch):
    return TextConditioning(
        prompt_embeds=torch.arange(batch, dtype=torch.float32).view(batch, 1, 1).expand(batch, 3, 4).clone(),
        pooled_prompt_embeds=torch.arange(batch, dtype=torch.float32).view(batch, 1).expand(batch, 2).clone(),
        add_time_ids=torch.tensor([[64, 64, 0, 0, 64, 64]] * batch, dtype=torch.float32),
    )


def test_text_conditioning_batch_operations():
    cond = _sdxl_conditioning(3)
    assert len(cond) == 3 and cond.is_sdxl
    assert cond.index([2, 0]).prompt_embeds[:, 0, 0].tolist() == [2.0, 0.0]
    assert cond.index(torch.tensor([False, True, True])).pooled_prompt_embeds[:, 0].tolist() == [1.0, 2.0]
    assert len(cond.index(slice(1, None))) == 2
    repeated = cond.repeat_interleave(2)
    assert repeated.prompt_embeds[:, 0, 0].tolist() == [0, 0, 1, 1, 2, 2]
    assert repeated.add_time_ids.shape == (6, 6)
    joined = TextConditioning.cat([cond, cond.index([1])])
    assert joined.pooled_prompt_embeds[:, 0].tolist() == [0, 1, 2, 1]
    half = cond.to(dtype=torch.float16)
    assert {half.prompt_embeds.dtype, half.pooled_prompt_embeds.dtype, half.add_time_ids.dtype} == {torch.float16}
    sd15_style = TextConditioning(prompt_embeds=torch.zeros(2, 3, 4))
    assert sd15_style.index([1]).pooled_prompt_embeds is None and not sd15_style.is_sdxl


def test_text_conditioning_rejects_inconsistent_fields():
    with pytest.raises(ValueError, match="mix"):
        TextConditioning.cat([_sdxl_conditioning(1), TextConditioning(prompt_embeds=torch.zeros(1, 3, 4))])
    with pytest.raises(ValueError, match="at least one"):
        TextConditioning.cat([])
    with pytest.raises(ValueError, match="together"):
        TextConditioning(prompt_embeds=torch.zeros(1, 3, 4), add_time_ids=torch.zeros(1, 6))
    sd3_style = TextConditioning(prompt_embeds=torch.zeros(1, 3, 4), pooled_prompt_embeds=torch.zeros(1, 2))
    with pytest.raises(ValueError, match="mix"):
        TextConditioning.cat([_sdxl_conditioning(1), sd3_style])
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        TextConditioning(
            prompt_embeds=torch.zeros(2, 3, 4), pooled_prompt_embeds=torch.zeros(1, 2), add_time_ids=torch.zeros(2, 6)
        )
    with pytest.raises(ValueError, match=r"\(B, L, D\)"):
        TextConditioning(prompt_embeds=torch.zeros(2, 4))

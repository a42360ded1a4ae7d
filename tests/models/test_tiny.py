"""The tiny pipelines are real, loadable, deterministic SD1.5 / SDXL pipelines whose outputs depend on their inputs."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline
from open_clip.tokenizer import SimpleTokenizer
from safetensors.torch import load_file

from rlhf_diffusion.models import (
    build_clip_tokenizer,
    build_tiny_pipeline,
    encode_prompts,
    load_diffusion_model,
    predict_noise,
)

PROMPTS = [
    "a photo of a cat",
    "A Cute Corgi, wearing a hat!! 4k, trending on artstation",
    "café crème brûlée; it's 12:30 — isn't it?",
    "an astronaut riding a horse " * 20,  # longer than 77 tokens: truncated to BOS + 75 + EOS
]


@pytest.fixture(params=["sd15", "sdxl"])
def kind_and_dir(request, tiny_sd15_dir, tiny_sdxl_dir):
    return request.param, {"sd15": tiny_sd15_dir, "sdxl": tiny_sdxl_dir}[request.param]


def test_directory_layout_and_size(tiny_sd15_dir, tiny_sdxl_dir):
    for path, extra in ((tiny_sd15_dir, []), (tiny_sdxl_dir, ["text_encoder_2", "tokenizer_2"])):
        for sub in ["unet", "vae", "text_encoder", "tokenizer", "scheduler", *extra]:
            assert (path / sub).is_dir(), f"{path} lacks {sub}"
        size_mb = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20
        assert size_mb < 30, f"{path} is {size_mb:.1f} MB"


def test_build_is_deterministic_given_seed(tmp_path, tiny_sd15_dir):
    again = build_tiny_pipeline(tmp_path / "again", "sd15", seed=0)
    other = build_tiny_pipeline(tmp_path / "other", "sd15", seed=1)
    files = ["unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"]
    for sub in files:
        reference = load_file(tiny_sd15_dir / f"{sub}.safetensors")
        same = load_file(again / f"{sub}.safetensors")
        different = load_file(other / f"{sub}.safetensors")
        assert all(torch.equal(reference[k], same[k]) for k in reference), sub
        assert not all(torch.equal(reference[k], different[k]) for k in reference), sub


def test_build_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="kind"):
        build_tiny_pipeline(tmp_path, "kandinsky")  # "flux" is a kind now (test_flux.py)
    with pytest.raises(ValueError, match="resolution"):
        build_tiny_pipeline(tmp_path, "sd15", resolution=60)


def test_loads_through_load_diffusion_model(kind_and_dir):
    kind, path = kind_and_dir
    model = load_diffusion_model(str(path))
    assert model.kind == kind
    assert (model.resolution, model.vae_scale_factor, model.latent_channels) == (64, 4, 4)
    assert len(model.text_encoders) == len(model.tokenizers) == (2 if kind == "sdxl" else 1)
    assert model.vae.config.scaling_factor == {"sd15": 0.18215, "sdxl": 0.13025}[kind]
    sched = model.scheduler
    assert isinstance(sched, DDIMScheduler)
    assert (sched.config.beta_schedule, sched.config.timestep_spacing, sched.config.prediction_type) == (
        "scaled_linear",
        "leading",
        "epsilon",
    )
    assert not sched.config.clip_sample and not sched.config.set_alpha_to_one and sched.config.steps_offset == 1
    if kind == "sdxl":
        assert model.unet.config.addition_embed_type == "text_time"
        assert model.unet.config.cross_attention_dim == sum(te.config.hidden_size for te in model.text_encoders)


def test_vae_maps_64px_images_to_4x16x16_latents(tiny_sd15_dir):
    model = load_diffusion_model(str(tiny_sd15_dir))
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        latents = model.vae.encode(images).latent_dist.mean
        decoded = model.vae.decode(latents).sample
    assert latents.shape == (2, 4, 16, 16)
    assert decoded.shape == (2, 3, 64, 64)


def test_unet_output_depends_on_noise_and_prompt(kind_and_dir):
    kind, path = kind_and_dir
    model = load_diffusion_model(str(path))
    cond = encode_prompts(model, ["a cat", "a dog"])
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)).repeat(2, 1, 1, 1)
    with torch.no_grad():
        eps = predict_noise(model.unet, x, torch.tensor(500), cond)
        eps_other_noise = predict_noise(model.unet, torch.randn_like(x), torch.tensor(500), cond)
    assert (eps[0] - eps[1]).abs().max() > 1e-3, "prompt has no effect"
    assert (eps - eps_other_noise).abs().max() > 1e-2, "noise has no effect"
    assert eps.std() > 0.05


@pytest.mark.parametrize(
    "pipeline_cls,fixture", [(StableDiffusionPipeline, "tiny_sd15_dir"), (StableDiffusionXLPipeline, "tiny_sdxl_dir")]
)
def test_loads_into_stock_pipeline_and_generates(pipeline_cls, fixture, request):
    pipe = pipeline_cls.from_pretrained(request.getfixturevalue(fixture))
    pipe.set_progress_bar_config(disable=True)

    def generate(prompt):
        return pipe(prompt, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images

    cat, dog = generate("a cat"), generate("a dog")
    assert cat.shape == (1, 64, 64, 3) and np.isfinite(cat).all()
    assert np.abs(cat - dog).max() > 1e-4, "different prompts gave the same image"


def _ids_up_to_eot(tokenizer, prompts):
    """Token ids of each prompt up to and including the first EOT, from a HF tokenizer or open_clip's."""
    if isinstance(tokenizer, SimpleTokenizer):
        ids = tokenizer(prompts)  # (N, 77), 0-padded
    else:
        ids = tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    assert ids.shape == (len(prompts), 77)
    return [row[: int((row == 49407).nonzero()[0]) + 1].tolist() for row in ids]


def test_tokenizer_matches_open_clip(tiny_sd15_dir, tiny_sdxl_dir):
    reference = _ids_up_to_eot(SimpleTokenizer(), PROMPTS)
    assert reference[0] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert len(reference[-1]) == 77  # BOS + 75 + EOS after truncation
    sd15_tokenizer = load_diffusion_model(str(tiny_sd15_dir)).tokenizers[0]
    tokenizer, tokenizer_2 = load_diffusion_model(str(tiny_sdxl_dir)).tokenizers
    for tok in (build_clip_tokenizer(), sd15_tokenizer, tokenizer):
        assert _ids_up_to_eot(tok, PROMPTS) == reference
        assert tok.pad_token_id == 49407 and tok.model_max_length == 77

    # SDXL's tokenizer_2 pads with "!" (id 0). Like the real one (diffusers issue #4153) it then treats "!" as a
    # special token, so it matches open_clip on prompts without "!" and turns each "!" into 0.
    assert tokenizer_2.pad_token_id == 0 and tokenizer_2.model_max_length == 77
    no_bang = [p for p in PROMPTS if "!" not in p]
    assert _ids_up_to_eot(tokenizer_2, no_bang) == _ids_up_to_eot(SimpleTokenizer(), no_bang)
    assert _ids_up_to_eot(tokenizer_2, ["hello!"]) == [[49406, 3306, 0, 49407]]

"""The flow testbed's training script (testbed/train_flow.py): a miniature run whose pipeline directory loads through
the stock `StableDiffusion3Pipeline` and the production loader (T5-less, max_sequence_length 0 from its
call_defaults.json), SD3's latent convention measured on the data, and a resumed run that continues its checkpoint."""

import json

import numpy as np
import torch
from safetensors import safe_open

from rlhf_diffusion.testbed import train_flow
from rlhf_diffusion.testbed.train import _to_pixels, render_dataset


def _settings(**overrides):
    values = dict(
        threads=1,  # the session's one thread (tests/conftest.py)
        n_images=64,
        layers=1,
        heads=2,
        head_dim=8,
        text_hidden=16,
        text_layers=2,
        steps=3,
        batch=4,
        warmup=1,
        eval_images_per_caption=1,
        eval_steps=1,
        eval_shifts="1,3",
        log_every=1,
    )
    values.update(overrides)
    return train_flow.FlowTrainSettings(**values)


def test_miniature_flow_run_loads_through_stock_and_production_code(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from rlhf_diffusion.models.conditioning import encode_prompts
    from rlhf_diffusion.models.loading import CALL_DEFAULTS_FILE, load_diffusion_model

    out = tmp_path / "flow"
    lines = []
    card = train_flow.train_flow_testbed(out, _settings(), log=lines.append)
    assert len(card["flow"]["loss_curve"]) == 3 and set(card["eval"]) == {"shift_1", "shift_3"}
    assert card["chosen_shift"] in (1.0, 3.0)
    assert json.loads((tmp_path / "flow_card.json").read_text())["chosen_shift"] == card["chosen_shift"]
    assert json.loads((out / CALL_DEFAULTS_FILE).read_text()) == {"max_sequence_length": 0}

    pipe = StableDiffusion3Pipeline.from_pretrained(out, text_encoder_3=None, tokenizer_3=None)
    assert pipe.scheduler.config.shift == card["chosen_shift"]
    with safe_open(out / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}  # stored in float16 (loads in any dtype)
    images = pipe(
        "a red circle on the left on a white background",
        num_inference_steps=2,
        max_sequence_length=0,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert images.shape == (1, 64, 64, 3)

    model = load_diffusion_model(str(out))
    assert model.kind == "sd3" and model.max_sequence_length == 0 and model.resolution == 64
    cond = encode_prompts(model, ["a red circle on the left on a white background"])
    assert cond.prompt_embeds.shape == (1, 16, 32)  # 16 CLIP tokens, no T5 tokens, CLIP-L || CLIP-G = 2 x 16 wide


def test_sd3_latent_convention_is_measured_on_the_data(tmp_path):
    """shift_factor / scaling_factor make the latents zero-mean and unit-variance, as in SD3's VAE config."""
    images, _ = render_dataset(512, 64, seed=0)
    vae = train_flow.sd3_latent_vae(train_flow._vae_dir(_settings()), images)
    fresh, _ = render_dataset(256, 64, seed=1)
    with torch.no_grad():
        z = vae.encode(_to_pixels(fresh)).latent_dist.sample()
    latents = (z - vae.config.shift_factor) * vae.config.scaling_factor
    assert abs(float(latents.mean())) < 0.1 and 0.85 < float(latents.std()) < 1.15


def test_a_resumed_run_continues_from_its_checkpoint(tmp_path):
    out = tmp_path / "flow"
    first = train_flow.train_flow_testbed(out, _settings(steps=2, eval_shifts="3"), log=lambda _: None)
    lines = []
    second = train_flow.train_flow_testbed(out, _settings(steps=4, eval_shifts="3"), log=lines.append)
    assert any("resumed at step 2" in line for line in lines)
    assert second["flow"]["loss_curve"][:2] == first["flow"]["loss_curve"] and len(second["flow"]["loss_curve"]) == 4
    assert np.isfinite(second["flow"]["loss_curve"]).all()

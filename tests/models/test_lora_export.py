"""The acceptance test of the project: an exported LoRA loads into a STOCK diffusers pipeline and acts identically."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors import safe_open

from rlhf_diffusion.models import (
    LORA_WEIGHT_NAME,
    encode_prompts,
    export_lora,
    load_diffusion_model,
    predict_noise,
)
from rlhf_diffusion.testing import model_with_random_lora

# Beyond the attention projections (which diffusers' legacy key conversion knows) to a conv and a feed-forward
# layer; alpha != rank so the alpha / r scaling has to survive the round trip.
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "ff.net.2", "conv1"]
PIPELINES = {"sd15": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}


def _model_with_random_lora(path, seed=0):
    return model_with_random_lora(path, TARGETS, seed)


def _generate(pipe):
    return pipe("a cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_exported_lora_loads_into_stock_pipeline(kind, tmp_path, request):
    tiny_dir = request.getfixturevalue(f"tiny_{kind}_dir")
    model = _model_with_random_lora(tiny_dir)
    export_dir = tmp_path / "lora"
    weights = export_lora(model, export_dir)
    assert weights == export_dir / LORA_WEIGHT_NAME and weights.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]  # the temp dir is gone
    with safe_open(weights, "pt") as f:
        keys = list(f.keys())
    assert keys and all(k.startswith("unet.") for k in keys)

    pipe = PIPELINES[kind].from_pretrained(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    before = _generate(pipe)
    pipe.load_lora_weights(export_dir)

    # (a) the stock UNet with the loaded LoRA predicts exactly what ours does
    cond = encode_prompts(model, ["a cat", "a lighthouse"])
    x = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([900, 50])
    added = None
    if kind == "sdxl":
        added = {"text_embeds": cond.pooled_prompt_embeds, "time_ids": cond.add_time_ids}
    with torch.no_grad():
        ours = predict_noise(model.unet, x, t, cond)
        stock = pipe.unet(x, t, encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=added).sample
        pipe.disable_lora()
        stock_base = pipe.unet(x, t, encoder_hidden_states=cond.prompt_embeds, added_cond_kwargs=added).sample
        pipe.enable_lora()
    torch.testing.assert_close(stock, ours, atol=1e-5, rtol=0)
    assert (stock - stock_base).abs().max() > 1e-2  # the LoRA is not a no-op

    # (b) and a short generation changes
    after = _generate(pipe)
    assert np.abs(after - before).max() > 1e-3


def test_export_overwrites_atomically_and_keeps_other_files(tmp_path, tiny_sd15_dir):
    export_dir = tmp_path / "lora"
    export_dir.mkdir()
    (export_dir / "README.md").write_text("keep me")
    first = export_lora(_model_with_random_lora(tiny_sd15_dir, seed=0), export_dir)
    first_bytes = first.read_bytes()
    second = export_lora(_model_with_random_lora(tiny_sd15_dir, seed=1), export_dir)
    assert first == second and second.read_bytes() != first_bytes
    assert sorted(p.name for p in export_dir.iterdir()) == ["README.md", LORA_WEIGHT_NAME]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]


def test_export_needs_an_adapter(tmp_path, tiny_sd15_dir):
    with pytest.raises(ValueError, match="attach_lora"):
        export_lora(load_diffusion_model(str(tiny_sd15_dir)), tmp_path / "lora")
    assert not (tmp_path / "lora").exists()

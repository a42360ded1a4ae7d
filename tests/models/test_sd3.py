"""SD3 / SD3.5 through the project's model code: the tiny pipeline is a real `StableDiffusion3Pipeline` directory,
`load_diffusion_model` loads it, `encode_prompts` equals the stock `encode_prompt`, and a LoRA attached with
`attach_lora` and exported with `export_lora` loads into the stock pipeline and acts identically there."""

import json

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
)
from safetensors import safe_open
from transformers import CLIPTextModelWithProjection, T5EncoderModel

from rlhf_diffusion.models import (
    LORA_WEIGHT_NAME,
    attach_lora,
    build_tiny_pipeline,
    encode_negative,
    encode_prompts,
    export_lora,
    get_lora_state_dict,
    load_diffusion_model,
    lora_disabled,
    predict_velocity,
    set_lora_state_dict,
)
from rlhf_diffusion.models.conditioning import SD3_T5_MAX_LENGTH
from rlhf_diffusion.models.loading import ModelLoadError, set_attention
from rlhf_diffusion.models.tiny import SD3_JOINT_DIM, build_t5_tokenizer
from rlhf_diffusion.testing import launch_tiny, model_with_random_lora

# The attention projections diffusers' SD3 LoRA training targets (image stream and the joint blocks' text stream).
SD3_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
PROMPTS = ["a photo of a cat", "A Cute Corgi, wearing a hat!! 4k"]


@pytest.fixture(scope="module")
def sd35_t5_dir(tmp_path_factory):
    """SD3.5-shaped transformer (qk-norm, dual attention) with a tiny T5 encoder."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd35_t5"), "sd3", t5=True, sd35=True)


# sd3_dir, SD3 without T5: tests/models/conftest.py
@pytest.fixture(params=["sd3", "sd35_t5"])
def any_sd3_dir(request):
    return request.getfixturevalue(f"{request.param}_dir")


def _stock_pipeline(path) -> StableDiffusion3Pipeline:
    index = json.loads((path / "model_index.json").read_text())
    # Without T5 the stock pipeline is loaded as diffusers documents dropping it: text_encoder_3=None, tokenizer_3=None.
    no_t5 = {} if index["text_encoder_3"][0] else {"text_encoder_3": None, "tokenizer_3": None}
    pipe = StableDiffusion3Pipeline.from_pretrained(path, **no_t5)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, **kwargs):
    return pipe(
        "a cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0), **kwargs
    ).images


# ------------------------------------------------------------------------------------------------ the tiny pipeline


def test_tiny_sd3_directory_is_a_stock_pipeline(any_sd3_dir):
    index = json.loads((any_sd3_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusion3Pipeline"
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    size_mb = sum(f.stat().st_size for f in any_sd3_dir.rglob("*") if f.is_file()) / 2**20
    assert size_mb < 30, f"{any_sd3_dir} is {size_mb:.1f} MB"

    pipe = _stock_pipeline(any_sd3_dir)
    vae = pipe.vae.config
    assert vae.latent_channels == 16 and vae.shift_factor > 0 and vae.scaling_factor > 1
    assert not vae.use_quant_conv and not vae.use_post_quant_conv
    assert pipe.scheduler.config.shift == 3.0
    image = _generate(pipe)
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    assert _generate(pipe, height=32, width=48).shape == (1, 32, 48, 3)


def test_tiny_sd3_variants(sd3_dir, sd35_t5_dir):
    plain = SD3Transformer2DModel.from_pretrained(sd3_dir, subfolder="transformer").config
    sd35 = SD3Transformer2DModel.from_pretrained(sd35_t5_dir, subfolder="transformer").config
    assert plain.qk_norm is None and tuple(plain.dual_attention_layers) == ()
    assert sd35.qk_norm == "rms_norm" and tuple(sd35.dual_attention_layers) == (0,)
    assert not (sd3_dir / "text_encoder_3").exists()
    t5 = T5EncoderModel.from_pretrained(sd35_t5_dir, subfolder="text_encoder_3")
    assert t5.config.d_model == SD3_JOINT_DIM == sd35.joint_attention_dim


def test_t5_tokenizer_is_t5_shaped():
    tokenizer = build_t5_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer(["a photo of a cat"], padding="max_length", max_length=16).input_ids[0]
    # ▁a ▁p h o t o ▁o f ▁a ▁c a t, then EOS, then padding
    assert ids[:4] == tokenizer.convert_tokens_to_ids(["\u2581a", "\u2581p", "h", "o"])
    assert ids[12:] == [1, 0, 0, 0]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a cat"


def test_build_rejects_sd3_options_for_other_kinds(tmp_path):
    with pytest.raises(ValueError, match="sd3"):
        build_tiny_pipeline(tmp_path, "sd15", t5=True)


# ------------------------------------------------------------------------------------------------------ loading


def test_loads_through_load_diffusion_model(sd3_dir, sd35_t5_dir):
    model = load_diffusion_model(str(sd3_dir))
    assert model.kind == "sd3" and isinstance(model.unet, SD3Transformer2DModel)
    assert isinstance(model.vae, AutoencoderKL) and isinstance(model.scheduler, FlowMatchEulerDiscreteScheduler)
    assert model.scheduler.config.shift == 3.0
    assert [type(e) for e in model.text_encoders] == [CLIPTextModelWithProjection] * 2
    assert len(model.tokenizers) == 2 and model.tokenizers[1].pad_token == "!"
    assert (model.resolution, model.latent_channels, model.vae_scale_factor) == (64, 16, 4)
    for module in (model.unet, model.vae, *model.text_encoders):
        assert not module.training and not any(p.requires_grad for p in module.parameters())

    with_t5 = load_diffusion_model(str(sd35_t5_dir), kind="sd3", dtype=torch.bfloat16)
    assert len(with_t5.text_encoders) == 3 and isinstance(with_t5.text_encoders[2], T5EncoderModel)
    assert len(with_t5.tokenizers) == 3
    assert with_t5.dtype == torch.bfloat16 and with_t5.text_encoders[2].dtype == torch.bfloat16
    assert with_t5.vae.dtype == torch.float32


def test_kind_mismatch_is_reported(sd3_dir, tiny_sd15_dir):
    with pytest.raises(ModelLoadError, match="'sd3'"):
        load_diffusion_model(str(sd3_dir), kind="sdxl")
    with pytest.raises(ModelLoadError, match="'sd15'"):
        load_diffusion_model(str(tiny_sd15_dir), kind="sd3")


def test_set_attention_keeps_the_joint_processors(sd3_dir):
    model = load_diffusion_model(str(sd3_dir))
    before = {name: type(p) for name, p in model.unet.attn_processors.items()}
    set_attention(model.unet, "sdpa")
    assert {name: type(p) for name, p in model.unet.attn_processors.items()} == before
    with pytest.raises(ValueError, match="sdpa"):
        set_attention(model.unet, "default")


# ------------------------------------------------------------------------------------------------- conditioning


def test_encode_prompts_matches_the_stock_pipeline(any_sd3_dir):
    model = load_diffusion_model(str(any_sd3_dir))
    pipe = _stock_pipeline(any_sd3_dir)
    cond = encode_prompts(model, PROMPTS)
    with torch.no_grad():  # as in the pipeline's __call__ (with grad enabled SDPA may take another CPU kernel)
        embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
            PROMPTS, PROMPTS, PROMPTS, device=torch.device("cpu"), do_classifier_free_guidance=True
        )
    assert cond.prompt_embeds.shape == (2, 77 + SD3_T5_MAX_LENGTH, SD3_JOINT_DIM)
    assert cond.pooled_prompt_embeds.shape == (2, 64) and cond.add_time_ids is None
    torch.testing.assert_close(cond.prompt_embeds, embeds, atol=1e-6, rtol=0)
    torch.testing.assert_close(cond.pooled_prompt_embeds, pooled, atol=1e-6, rtol=0)
    # the CLIP features fill the first 64 of 96 channels; the rest is zero padding
    assert cond.prompt_embeds[:, :77, 64:].abs().max() == 0
    has_t5 = len(model.text_encoders) == 3
    assert bool(cond.prompt_embeds[:, 77:].abs().max() > 0) == has_t5

    uncond = encode_negative(model, 2)
    torch.testing.assert_close(uncond.prompt_embeds, negative, atol=1e-6, rtol=0)
    torch.testing.assert_close(uncond.pooled_prompt_embeds, negative_pooled, atol=1e-6, rtol=0)


@pytest.mark.parametrize("length", [0, 7])
def test_max_sequence_length_sets_the_t5_tokens_as_the_stock_pipeline_does(any_sd3_dir, tmp_path, length):
    """`max_sequence_length` (config `model.max_sequence_length`, a directory's call_defaults.json) gives the T5 part
    of the text stream the length the stock pipeline's argument of that name gives it, T5 or zeros."""
    import shutil

    from rlhf_diffusion.models.loading import CALL_DEFAULTS_FILE

    pipe = _stock_pipeline(any_sd3_dir)
    if length == 0 and pipe.text_encoder_3 is not None:  # T5 cannot tokenize into 0 tokens; refused at loading
        with pytest.raises(ModelLoadError, match="max_sequence_length 0 needs a pipeline without T5"):
            load_diffusion_model(str(any_sd3_dir), max_sequence_length=0)
        return
    with torch.no_grad():
        embeds, *_ = pipe.encode_prompt(
            PROMPTS,
            PROMPTS,
            PROMPTS,
            device=torch.device("cpu"),
            do_classifier_free_guidance=False,
            max_sequence_length=length,
        )
    by_argument = encode_prompts(load_diffusion_model(str(any_sd3_dir), max_sequence_length=length), PROMPTS)
    assert by_argument.prompt_embeds.shape == (2, 77 + length, SD3_JOINT_DIM)
    torch.testing.assert_close(by_argument.prompt_embeds, embeds, atol=1e-6, rtol=0)

    marked = tmp_path / "marked"
    shutil.copytree(any_sd3_dir, marked)
    (marked / CALL_DEFAULTS_FILE).write_text(json.dumps({"max_sequence_length": length}))
    from_file = load_diffusion_model(str(marked))
    assert from_file.max_sequence_length == length
    torch.testing.assert_close(encode_prompts(from_file, PROMPTS).prompt_embeds, embeds, atol=1e-6, rtol=0)
    assert load_diffusion_model(str(marked), max_sequence_length=3).max_sequence_length == 3  # the argument wins
    assert load_diffusion_model(str(any_sd3_dir)).max_sequence_length is None  # no file: the pipeline's default

    (marked / CALL_DEFAULTS_FILE).write_text("[1, 2")
    with pytest.raises(ModelLoadError, match=CALL_DEFAULTS_FILE):
        load_diffusion_model(str(marked))


def test_predict_velocity_equals_the_stock_transformer_call(sd3_dir):
    model = load_diffusion_model(str(sd3_dir))
    cond = encode_prompts(model, PROMPTS)
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([1000.0, 250.0])
    with torch.no_grad():
        ours = predict_velocity(model.unet, x, t, cond)
        stock = model.unet(
            hidden_states=x,
            encoder_hidden_states=cond.prompt_embeds,
            pooled_projections=cond.pooled_prompt_embeds,
            timestep=t,
        ).sample
        scalar = predict_velocity(model.unet, x, 500.0, cond)
        batched = predict_velocity(model.unet, x, torch.tensor([500.0, 500.0]), cond)
    assert ours.shape == x.shape
    torch.testing.assert_close(ours, stock, atol=0, rtol=0)
    torch.testing.assert_close(scalar, batched, atol=0, rtol=0)
    with pytest.raises(ValueError, match="rows"):
        predict_velocity(model.unet, x, t, encode_prompts(model, ["one"]))


# ----------------------------------------------------------------------------------------------------------- LoRA


def _model_with_random_lora(path, seed=0):
    return model_with_random_lora(path, SD3_TARGETS, seed)


def test_lora_attaches_to_the_joint_attention_and_round_trips(sd35_t5_dir):
    model = load_diffusion_model(str(sd35_t5_dir))
    attach_lora(model.unet, rank=4, alpha=8.0, target_modules=SD3_TARGETS)
    state = get_lora_state_dict(model.unet)
    adapted = {key.rsplit(".lora_", 1)[0] for key in state}
    # both blocks' image-stream projections, the dual-attention attn2 of block 0 and the text stream's add_*
    # projections (the last block is context_pre_only: it has add_q/k/v_proj but no to_add_out)
    assert "transformer_blocks.0.attn.add_q_proj" in adapted and "transformer_blocks.0.attn.to_add_out" in adapted
    assert "transformer_blocks.0.attn2.to_q" in adapted and "transformer_blocks.1.attn.to_out.0" in adapted
    assert "transformer_blocks.1.attn.to_add_out" not in adapted
    trainable = [name for name, p in model.unet.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in name for name in trainable)
    assert all(torch.count_nonzero(v) == 0 for k, v in state.items() if ".lora_B." in k)  # starts as the base model

    new = {k: torch.randn_like(v) for k, v in state.items()}
    set_lora_state_dict(model.unet, new)
    assert all(torch.equal(new[k], v) for k, v in get_lora_state_dict(model.unet).items())

    cond = encode_prompts(model, PROMPTS[:1])
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        adapted_v = predict_velocity(model.unet, x, 700.0, cond)
        with lora_disabled(model.unet):
            base_v = predict_velocity(model.unet, x, 700.0, cond)
    assert not torch.allclose(adapted_v, base_v)
    assert all(p.requires_grad for name, p in model.unet.named_parameters() if ".lora_" in name)


def test_exported_lora_loads_into_the_stock_pipeline(any_sd3_dir, tmp_path):
    model = _model_with_random_lora(any_sd3_dir)
    export_dir = tmp_path / "lora"
    weights = export_lora(model, export_dir)
    assert weights == export_dir / LORA_WEIGHT_NAME and weights.is_file()
    with safe_open(weights, "pt") as f:
        keys = list(f.keys())
        saved = {key: f.get_tensor(key) for key in keys}
    assert keys and all(k.startswith("transformer.") for k in keys)

    pipe = _stock_pipeline(any_sd3_dir)
    before = _generate(pipe)
    pipe.load_lora_weights(export_dir)

    # (a) the loaded LoRA weights are the exported ones, and ΔW = B·A is ours (α / r folded into B)
    loaded = {
        name.replace(".default_0.", "."): p.detach()
        for name, p in pipe.transformer.named_parameters()
        if ".lora_" in name
    }
    assert sorted(loaded) == sorted(key.removeprefix("transformer.") for key in saved)
    for key, value in saved.items():
        torch.testing.assert_close(loaded[key.removeprefix("transformer.")], value, atol=0, rtol=0)
    ours = get_lora_state_dict(model.unet)
    module = "transformer_blocks.0.attn.to_q"
    delta_ours = (12.0 / 4) * ours[f"{module}.lora_B.weight"] @ ours[f"{module}.lora_A.weight"]
    delta_stock = loaded[f"{module}.lora_B.weight"] @ loaded[f"{module}.lora_A.weight"]
    torch.testing.assert_close(delta_stock, delta_ours, atol=1e-6, rtol=1e-5)

    # (b) the stock transformer with the loaded LoRA predicts what ours does
    cond = encode_prompts(model, PROMPTS)
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(3))
    t = torch.tensor([900.0, 50.0])
    with torch.no_grad():
        torch.testing.assert_close(
            predict_velocity(pipe.transformer, x, t, cond), predict_velocity(model.unet, x, t, cond), atol=1e-5, rtol=0
        )

    # (c) and the generated image changes
    after = _generate(pipe)
    assert np.abs(after - before).max() > 1e-3


def test_a_method_not_on_flow_models_is_refused_before_any_work_naming_the_fields(
    sd3_dir, tmp_path, capsys, monkeypatch
):
    """Every registered method trains an SD3 model now (tests/models/test_sd3_training.py, test_sd3_policy_gradient.py,
    test_sd3_d3po.py, test_sd3_tailorpo.py); a method without `flow_models` (here TailorPO-G with the flag cleared)
    is refused by launch before anything is written (exit 2), and by `load_policy` wherever a model is loaded, with
    one message naming algorithm.name and model.pretrained and listing the methods that do train."""
    from rlhf_diffusion.algorithms.tailorpo import TailorPOG

    monkeypatch.setattr(TailorPOG, "flow_models", False)
    method = "tailorpo_g"
    from rlhf_diffusion.config import load_config
    from rlhf_diffusion.workers.policy import load_policy

    overrides = [f"model.pretrained={sd3_dir}", f"algorithm={{name: {method}}}"]
    code, err = launch_tiny(overrides, tmp_path, capsys)
    assert code == 2 and err.startswith(f"error: algorithm.name: '{method}' does not train"), err
    assert (
        "SD3 (flow-matching) pipeline in model.pretrained" in err
        and "d3po, dde, dde_single, ddpo, diffusion_dpo, grpo, tailorpo" in err
    )
    assert not any(tmp_path.iterdir())  # nothing written
    config = load_config("configs/tiny.yaml", overrides)
    with pytest.raises(ModelLoadError, match=f"algorithm.name: '{method}' .*model.pretrained"):
        load_policy(config, str(sd3_dir), torch.device("cpu"))  # a hub id reaches the workers: the same message

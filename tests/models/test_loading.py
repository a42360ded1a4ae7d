"""load_diffusion_model errors and dtypes; LoRA attach / state dict / disable on the tiny UNets."""

import json
import shutil

import pytest
import torch
from diffusers import PNDMScheduler

from rlhf_diffusion.models import (
    ModelLoadError,
    attach_lora,
    encode_prompts,
    get_lora_state_dict,
    load_diffusion_model,
    lora_disabled,
    lora_parameters,
    predict_noise,
    set_lora_state_dict,
)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


# ----------------------------------------------------------------------------------------------------- loading


def test_nonexistent_path_raises_model_load_error(tmp_path):
    missing = tmp_path / "no_such_pipeline"
    with pytest.raises(ModelLoadError, match="does not exist") as info:
        load_diffusion_model(str(missing))
    assert str(missing) in str(info.value)


def test_directory_without_model_index_raises(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ModelLoadError, match="model_index.json") as info:
        load_diffusion_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_missing_unet_subfolder_raises(tmp_path, tiny_sd15_dir):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_sd15_dir, broken)
    shutil.rmtree(broken / "unet")
    with pytest.raises(ModelLoadError, match="'unet'") as info:
        load_diffusion_model(str(broken))
    assert str(broken) in str(info.value)


def test_corrupt_component_is_wrapped(tmp_path, tiny_sd15_dir):
    broken = tmp_path / "corrupt"
    shutil.copytree(tiny_sd15_dir, broken)
    (broken / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match="'vae'") as info:
        load_diffusion_model(str(broken))
    assert str(broken) in str(info.value) and info.value.__cause__ is not None


def test_kind_mismatch_and_bad_kind(tiny_sd15_dir, tiny_sdxl_dir):
    with pytest.raises(ModelLoadError, match="sdxl"):
        load_diffusion_model(str(tiny_sdxl_dir), kind="sd15")
    with pytest.raises(ValueError, match="kind"):
        load_diffusion_model(str(tiny_sd15_dir), kind="kandinsky")
    assert load_diffusion_model(tiny_sdxl_dir, kind="sdxl").kind == "sdxl"  # Path accepted too


def test_components_are_frozen_and_vae_stays_float32(tiny_sdxl_dir):
    model = load_diffusion_model(str(tiny_sdxl_dir), dtype=torch.bfloat16)
    modules = [model.unet, model.vae, *model.text_encoders]
    assert all(not p.requires_grad for m in modules for p in m.parameters())
    assert all(not m.training for m in modules)
    assert model.dtype == torch.bfloat16 and all(te.dtype == torch.bfloat16 for te in model.text_encoders)
    assert model.vae.dtype == torch.float32
    assert model.device == torch.device("cpu") and model.source == str(tiny_sdxl_dir)


def test_scheduler_is_ddim_whatever_the_pipeline_ships(tmp_path, tiny_sd15_dir):
    # SD1.5 ships a PNDM scheduler config; the loader builds DDIM on the same noise schedule.
    pndm_dir = tmp_path / "pndm"
    shutil.copytree(tiny_sd15_dir, pndm_dir)
    shutil.rmtree(pndm_dir / "scheduler")
    PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    ).save_pretrained(pndm_dir / "scheduler")
    index = json.loads((pndm_dir / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "PNDMScheduler"]
    (pndm_dir / "model_index.json").write_text(json.dumps(index))
    reference = load_diffusion_model(str(tiny_sd15_dir)).scheduler
    scheduler = load_diffusion_model(str(pndm_dir)).scheduler
    assert type(scheduler).__name__ == "DDIMScheduler"
    assert torch.equal(scheduler.alphas_cumprod, reference.alphas_cumprod)
    assert scheduler.config.steps_offset == 1
    assert scheduler.config.clip_sample is False  # PNDM's config does not say; DDIM's pixel-space default is wrong


# -------------------------------------------------------------------------------------------------------- LoRA


@pytest.fixture
def sd15(tiny_sd15_dir):
    return load_diffusion_model(str(tiny_sd15_dir))


@pytest.fixture
def unet_inputs(sd15):
    g = torch.Generator().manual_seed(0)
    return torch.randn(2, 4, 16, 16, generator=g), torch.tensor([999, 10]), encode_prompts(sd15, ["a cat", "a dog"])


def _randomize_lora(unet, seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) * scale for k, v in get_lora_state_dict(unet).items()}
    set_lora_state_dict(unet, state)
    return state


def test_attach_makes_only_lora_trainable(sd15):
    attach_lora(sd15.unet, rank=4, alpha=4, target_modules=TARGETS)
    trainable = [n for n, p in sd15.unet.named_parameters() if p.requires_grad]
    params = lora_parameters(sd15.unet)
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert len(params) == len(trainable) and all(p.requires_grad for p in params)
    # one lora_A and one lora_B for every to_q / to_k / to_v / to_out.0 of every attention layer
    n_layers = sum(1 for n, _ in sd15.unet.named_modules() if n.endswith(tuple("." + t for t in TARGETS)))
    assert len(params) == 2 * n_layers
    ranks = {p.shape[0] for n, p in sd15.unet.named_parameters() if ".lora_A." in n}
    assert ranks == {4}


def test_attach_starts_at_the_base_model(sd15, unet_inputs):
    x, t, cond = unet_inputs
    with torch.no_grad():
        base = predict_noise(sd15.unet, x, t, cond)
        attach_lora(sd15.unet, rank=4, alpha=8, target_modules=TARGETS, init="gaussian")
        adapted = predict_noise(sd15.unet, x, t, cond)
    assert torch.equal(base, adapted)  # lora_B starts at zero
    assert any(p.abs().sum() > 0 for n, p in sd15.unet.named_parameters() if ".lora_A." in n)


def test_attach_rejects_unmatched_targets_and_bad_values(sd15):
    with pytest.raises(ValueError, match="no_such_layer"):
        attach_lora(sd15.unet, rank=4, alpha=4, target_modules=["no_such_layer"])
    with pytest.raises(ValueError, match="rank"):
        attach_lora(sd15.unet, rank=0, alpha=4, target_modules=TARGETS)
    with pytest.raises(ValueError, match="init"):
        attach_lora(sd15.unet, rank=4, alpha=4, target_modules=TARGETS, init="zeros")


def test_lora_state_dict_round_trip(sd15, unet_inputs):
    x, t, cond = unet_inputs
    attach_lora(sd15.unet, rank=4, alpha=8, target_modules=TARGETS)
    params_before = [id(p) for p in lora_parameters(sd15.unet)]
    state = _randomize_lora(sd15.unet)
    got = get_lora_state_dict(sd15.unet)
    assert set(got) == set(state) and all(torch.equal(got[k], state[k]) for k in state)
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 and not v.requires_grad for v in got.values())
    assert all("default" not in k for k in got)  # peft keys, no adapter name
    from peft import get_peft_model_state_dict

    reference = get_peft_model_state_dict(sd15.unet)  # peft's own export: the same keys and values
    assert set(reference) == set(got) and all(torch.equal(reference[k], got[k]) for k in got)
    got[next(iter(got))].add_(1.0)  # a clone: editing it leaves the model alone
    assert torch.equal(get_lora_state_dict(sd15.unet)[next(iter(got))], state[next(iter(got))])
    assert [id(p) for p in lora_parameters(sd15.unet)] == params_before  # copied in place

    with torch.no_grad():
        eps = predict_noise(sd15.unet, x, t, cond)
        set_lora_state_dict(sd15.unet, {k: torch.zeros_like(v) for k, v in state.items()})
        eps_zero = predict_noise(sd15.unet, x, t, cond)
        set_lora_state_dict(sd15.unet, state)
        eps_again = predict_noise(sd15.unet, x, t, cond)
    assert torch.equal(eps, eps_again)
    assert (eps - eps_zero).abs().max() > 1e-3


def test_set_lora_state_dict_rejects_bad_keys_and_shapes(sd15):
    attach_lora(sd15.unet, rank=4, alpha=4, target_modules=TARGETS)
    state = get_lora_state_dict(sd15.unet)
    first = next(iter(state))
    with pytest.raises(ValueError, match="missing"):
        set_lora_state_dict(sd15.unet, {k: v for k, v in state.items() if k != first})
    with pytest.raises(ValueError, match="unexpected"):
        set_lora_state_dict(sd15.unet, {**state, "mid_block.foo.lora_A.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="shape"):
        set_lora_state_dict(sd15.unet, {**state, first: torch.zeros(3, 3)})


def test_lora_functions_need_an_adapter(sd15):
    with pytest.raises(ValueError, match="attach_lora"):
        get_lora_state_dict(sd15.unet)
    with lora_disabled(sd15.unet) as unet:  # no adapter: the base model already, nothing to disable
        assert unet is sd15.unet


def test_lora_disabled_gives_base_output_and_restores(sd15, unet_inputs):
    x, t, cond = unet_inputs
    with torch.no_grad():
        base = predict_noise(sd15.unet, x, t, cond)
    attach_lora(sd15.unet, rank=4, alpha=8, target_modules=TARGETS)
    _randomize_lora(sd15.unet)
    with torch.no_grad():
        adapted = predict_noise(sd15.unet, x, t, cond)
        with lora_disabled(sd15.unet):
            reference = predict_noise(sd15.unet, x, t, cond)
        after = predict_noise(sd15.unet, x, t, cond)
    assert (adapted - base).abs().max() > 1e-3
    assert torch.equal(reference, base)
    assert torch.equal(after, adapted)
    assert all(p.requires_grad for p in lora_parameters(sd15.unet))

    with pytest.raises(RuntimeError, match="boom"):
        with lora_disabled(sd15.unet):
            raise RuntimeError("boom")
    with torch.no_grad():
        assert torch.equal(predict_noise(sd15.unet, x, t, cond), adapted)
    assert all(p.requires_grad for p in lora_parameters(sd15.unet))


def test_lora_disabled_keeps_frozen_lora_frozen(sd15):
    attach_lora(sd15.unet, rank=4, alpha=4, target_modules=TARGETS)
    for p in lora_parameters(sd15.unet):  # e.g. a sampler worker that only runs inference
        p.requires_grad_(False)
    with lora_disabled(sd15.unet):
        pass
    assert not any(p.requires_grad for p in sd15.unet.parameters())


def test_gradient_reaches_lora_only(sd15, unet_inputs):
    x, t, cond = unet_inputs
    attach_lora(sd15.unet, rank=4, alpha=8, target_modules=TARGETS)
    _randomize_lora(sd15.unet)
    predict_noise(sd15.unet, x, t, cond).square().mean().backward()
    grads = [p.grad for p in lora_parameters(sd15.unet)]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for n, p in sd15.unet.named_parameters() if ".lora_" not in n)

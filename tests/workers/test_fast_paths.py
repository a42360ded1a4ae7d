"""GPU speed options on CPU: each one is either numerically equivalent to the plain path or a clear error.

`train.mixed_precision` (learner autocast + GradScaler), `model.attention` (SDPA vs plain attention processors),
`train.gradient_checkpointing` (learner UNet), `model.channels_last` (UNet + VAE memory format) and
`sampling.preview_decoder` (TAESD previews for TailorPO's per-step rewards). The CUDA-only parts (fp16 autocast with
a live GradScaler, flash kernels) cannot run here.
"""

import pytest
import torch
from diffusers import AutoencoderTiny
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

from rlhf_diffusion.config import parse_config
from rlhf_diffusion.diffusion.sampling import NoisePredictor, decode_latents, decode_preview
from rlhf_diffusion.models.conditioning import encode_prompts
from rlhf_diffusion.models.loading import (
    ModelLoadError,
    get_lora_state_dict,
    lora_parameters,
    set_attention,
    set_lora_state_dict,
)
from rlhf_diffusion.trainer import LocalTrainer
from rlhf_diffusion.workers.learner import Learner
from rlhf_diffusion.workers.policy import load_policy

PROMPTS = ["a cat", "a dog", "a fox"]


def make_config(
    model_dir,
    tmp_path,
    *,
    model: dict | None = None,
    train: dict | None = None,
    device="cpu",
    sampling: dict | None = None,
    algorithm: str = "d3po",
):
    return parse_config(
        {
            "run_name": "t",
            "output_dir": str(tmp_path),
            "device": device,
            "model": {"pretrained": str(model_dir), **(model or {})},
            "sampling": {"num_steps": 4, "guidance_scale": 2.0, "batch_size": 3, **(sampling or {})},
            "algorithm": {"name": algorithm},
            "rewards": [{"name": "brightness"}],
            "train": {"learning_rate": 1e-3, "train_batch_size": 64, **(train or {})},
            "prompts": {"train": {"inline": PROMPTS}, "eval_seeds": 1},
            "tracking": {"enabled": False},
        }
    )


def _perturbed_lora(unet, seed=0, scale=0.05) -> dict[str, torch.Tensor]:
    """A LoRA state with B != 0 (the initial B = 0 makes the adapter a no-op)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + scale * torch.randn(v.shape, generator=g) for k, v in get_lora_state_dict(unet).items()}


def _unet_inputs(model, batch=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x_t = torch.randn(batch, model.latent_channels, 16, 16, generator=g)
    t = torch.tensor([700, 300])[:batch]
    cond = encode_prompts(model, PROMPTS[:batch])
    return x_t, t, cond


def _eps_and_lora_grads(model, x_t, t, cond):
    """CFG noise prediction (w = 2) and d sum(ε̂²) / d LoRA, UNet in train mode (where checkpointing acts)."""
    predictor = NoisePredictor(model, 2.0)
    model.unet.train()
    eps = predictor(x_t, t, cond)
    grads = torch.autograd.grad(eps.square().sum(), lora_parameters(model.unet))
    model.unet.eval()
    return eps.detach(), grads


def _max_rel_diff(a, b) -> float:
    """Largest |a − b| over every tensor pair, relative to that tensor's largest |a|."""
    return max(((x - y).abs().max() / x.abs().max()).item() for x, y in zip(a, b))


# ----------------------------------------------------------------------------------------------------------------
# train.mixed_precision
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rollout(tiny_sd15_dir, tmp_path_factory):
    """One D3PO rollout batch from the base policy (weights version 0)."""
    trainer = LocalTrainer(make_config(tiny_sd15_dir, tmp_path_factory.mktemp("rollout")), log=lambda *a: None)
    return trainer.rollout(PROMPTS)


def _trained_learner(model_dir, tmp_path, batch, mixed_precision):
    learner = Learner(make_config(model_dir, tmp_path, train={"mixed_precision": mixed_precision}), str(model_dir))
    set_lora_state_dict(learner.model.unet, _perturbed_lora(learner.model.unet))  # θ != ref: a non-trivial loss
    before = get_lora_state_dict(learner.model.unet)
    metrics = learner.train(batch, 0).metrics
    return learner, before, metrics


def test_bf16_autocast_step_is_finite_float32_and_close_to_fp32_step(tiny_sd15_dir, tmp_path, rollout):
    fp32, before, fp32_metrics = _trained_learner(tiny_sd15_dir, tmp_path / "fp32", rollout, "no")
    bf16, before_bf16, bf16_metrics = _trained_learner(tiny_sd15_dir, tmp_path / "bf16", rollout, "bf16")
    assert fp32_metrics["optimizer_steps"] == bf16_metrics["optimizer_steps"] == 1
    assert torch.isfinite(torch.tensor(bf16_metrics["loss"]))
    assert bf16_metrics["loss"] == pytest.approx(fp32_metrics["loss"], rel=2e-2)
    assert not bf16.grad_scaler.is_enabled() and bf16.autocast_dtype is torch.bfloat16
    params = lora_parameters(bf16.model.unet)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in params)  # master weights fp32
    # The bf16 gradient points where the fp32 one does.
    g32 = torch.cat([p.grad.flatten() for p in lora_parameters(fp32.model.unet)])
    g16 = torch.cat([p.grad.flatten() for p in params])
    assert torch.nn.functional.cosine_similarity(g32, g16, dim=0) > 0.99  # measured 0.997
    # One step changes the weights, by nearly the fp32 step (AdamW's first step is ±lr per element).
    after32, after16 = get_lora_state_dict(fp32.model.unet), get_lora_state_dict(bf16.model.unet)
    d32 = torch.cat([(after32[k] - before[k]).flatten() for k in before])
    d16 = torch.cat([(after16[k] - before_bf16[k]).flatten() for k in before])
    assert d16.abs().max() > 0
    assert torch.nn.functional.cosine_similarity(d32, d16, dim=0) > 0.9  # measured 0.963


def test_autocast_runs_the_unet_in_bf16_only_when_enabled(tiny_sd15_dir, tmp_path):
    seen = []
    for mixed_precision in ("no", "bf16"):
        learner = Learner(
            make_config(tiny_sd15_dir, tmp_path, train={"mixed_precision": mixed_precision}), str(tiny_sd15_dir)
        )
        hook = learner.model.unet.conv_out.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
        x_t, t, cond = _unet_inputs(learner.model)
        with learner.autocast():
            eps = learner.predictor(x_t, t, cond)
        hook.remove()
        assert eps.dtype == torch.float32  # the DDIM maths downstream always gets float32
    assert seen == [torch.float32, torch.bfloat16]


def test_fp16_on_cpu_is_one_clear_error_at_learner_start(tiny_sd15_dir, tmp_path):
    config = make_config(tiny_sd15_dir, tmp_path, train={"mixed_precision": "fp16"}, device="auto")  # valid config
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: fp16 is allowed")
    with pytest.raises(ValueError, match=r"train.mixed_precision 'fp16' needs CUDA.*'cpu'"):
        Learner(config, str(tiny_sd15_dir))


# ----------------------------------------------------------------------------------------------------------------
# model.attention
# ----------------------------------------------------------------------------------------------------------------


def test_attention_processors_give_the_same_output_and_lora_gradients(tiny_sd15_dir, tmp_path):
    model = load_policy(make_config(tiny_sd15_dir, tmp_path), str(tiny_sd15_dir), torch.device("cpu"))
    assert {type(p) for p in model.unet.attn_processors.values()} == {AttnProcessor2_0}  # the default, "sdpa"
    set_lora_state_dict(model.unet, _perturbed_lora(model.unet))
    inputs = _unet_inputs(model)
    eps_sdpa, grads_sdpa = _eps_and_lora_grads(model, *inputs)
    set_attention(model.unet, "default")
    assert {type(p) for p in model.unet.attn_processors.values()} == {AttnProcessor}
    eps_plain, grads_plain = _eps_and_lora_grads(model, *inputs)
    assert (eps_sdpa - eps_plain).abs().max() < 1e-5
    assert _max_rel_diff(grads_sdpa, grads_plain) < 1e-5
    assert all(g.abs().max() > 0 for g in grads_plain)  # every LoRA matrix trains under the plain processor


def test_load_policy_applies_the_configured_attention(tiny_sd15_dir, tmp_path):
    config = make_config(tiny_sd15_dir, tmp_path, model={"attention": "default"})
    model = load_policy(config, str(tiny_sd15_dir), torch.device("cpu"))
    assert {type(p) for p in model.unet.attn_processors.values()} == {AttnProcessor}
    assert lora_parameters(model.unet)
    with pytest.raises(ValueError, match="model.attention"):
        set_attention(model.unet, "flash")


# ----------------------------------------------------------------------------------------------------------------
# train.gradient_checkpointing
# ----------------------------------------------------------------------------------------------------------------


def test_gradient_checkpointing_recomputes_and_gives_the_same_lora_gradients(tiny_sd15_dir, tmp_path, monkeypatch):
    learner = Learner(make_config(tiny_sd15_dir, tmp_path, train={"gradient_checkpointing": True}), str(tiny_sd15_dir))
    model = learner.model
    assert model.unet.is_gradient_checkpointing
    set_lora_state_dict(model.unet, _perturbed_lora(model.unet))
    inputs = _unet_inputs(model)
    # Count the block's forward runs (forward hooks do not fire on checkpoint recomputation, so wrap `forward`).
    calls = []
    resnet = model.unet.mid_block.resnets[-1]  # after an adapted attention: its input needs grad
    forward = resnet.forward
    monkeypatch.setattr(resnet, "forward", lambda *args: (calls.append(1), forward(*args))[1])
    eps_ckpt, grads_ckpt = _eps_and_lora_grads(model, *inputs)
    ckpt_calls = len(calls)
    model.unet.disable_gradient_checkpointing()
    calls.clear()
    eps_plain, grads_plain = _eps_and_lora_grads(model, *inputs)
    assert ckpt_calls == 2 * len(calls) > 0  # the block's forward ran again in the backward pass
    assert (eps_ckpt - eps_plain).abs().max() < 1e-6
    assert _max_rel_diff(grads_ckpt, grads_plain) < 1e-6
    assert all(g.abs().max() > 0 for g in grads_ckpt)


def test_gradient_checkpointing_is_off_by_default(tiny_sd15_dir, tmp_path):
    learner = Learner(make_config(tiny_sd15_dir, tmp_path), str(tiny_sd15_dir))
    assert not learner.model.unet.is_gradient_checkpointing
    assert learner.autocast_dtype is None and not learner.grad_scaler.is_enabled()


# ----------------------------------------------------------------------------------------------------------------
# model.channels_last
# ----------------------------------------------------------------------------------------------------------------


def test_channels_last_gives_the_same_unet_and_vae_output(tiny_sd15_dir, tmp_path):
    device = torch.device("cpu")
    plain = load_policy(make_config(tiny_sd15_dir, tmp_path), str(tiny_sd15_dir), device)
    fast = load_policy(make_config(tiny_sd15_dir, tmp_path, model={"channels_last": True}), str(tiny_sd15_dir), device)
    assert fast.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert not plain.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.vae.dtype == torch.float32
    lora = _perturbed_lora(plain.unet)
    set_lora_state_dict(plain.unet, lora)
    set_lora_state_dict(fast.unet, lora)
    inputs = _unet_inputs(plain)
    eps_plain, grads_plain = _eps_and_lora_grads(plain, *inputs)
    eps_fast, grads_fast = _eps_and_lora_grads(fast, *inputs)
    assert (eps_plain - eps_fast).abs().max() < 1e-5
    assert _max_rel_diff(grads_plain, grads_fast) < 1e-5
    with torch.no_grad():
        images_plain, images_fast = decode_latents(plain, inputs[0]), decode_latents(fast, inputs[0])
    assert (images_plain - images_fast).abs().max() < 1e-5


# ----------------------------------------------------------------------------------------------------------------
# sampling.preview_decoder
# ----------------------------------------------------------------------------------------------------------------


def _save_tiny_taesd(path, blocks=3):
    """A random-weight AutoencoderTiny in the TAESD format: 4 latent channels, upsampling x2^(blocks-1)."""
    torch.manual_seed(0)
    AutoencoderTiny(
        encoder_block_out_channels=(8,) * blocks,
        decoder_block_out_channels=(8,) * blocks,
        latent_channels=4,
        num_encoder_blocks=(1,) * blocks,
        num_decoder_blocks=(1,) * blocks,
    ).save_pretrained(path)
    return path


def test_preview_decoder_decodes_intermediate_previews_and_the_full_vae_the_final_images(
    tiny_sd15_dir, tmp_path, monkeypatch
):
    preview_dir = _save_tiny_taesd(tmp_path / "taesd")  # x4, the tiny pipeline's VAE scale factor
    config = make_config(tiny_sd15_dir, tmp_path, sampling={"preview_decoder": str(preview_dir)}, algorithm="tailorpo")
    trainer = LocalTrainer(config, log=lambda *a: None)
    model = trainer.model
    assert isinstance(model.preview_vae, AutoencoderTiny) and model.preview_vae.dtype == torch.float32
    assert not any(p.requires_grad for p in model.preview_vae.parameters())
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        preview, full = decode_preview(model, latents), decode_latents(model, latents)
    assert preview.shape == full.shape == (2, 3, 64, 64) and preview.dtype == torch.float32
    assert 0 <= preview.min() and preview.max() <= 1
    assert (preview - full).abs().max() > 1e-3  # a different decoder

    decoded = []
    for name, vae in (("preview", model.preview_vae), ("full", model.vae)):
        decode = vae.decode
        monkeypatch.setattr(
            vae,
            "decode",
            lambda z, *a, name=name, decode=decode, **k: (decoded.append((name, z.shape[0])), decode(z, *a, **k))[1],
        )
    batch = trainer.rollout(PROMPTS)
    num_candidates = config.algorithm.num_candidates
    # K - 1 = 3 intermediate steps on the preview decoder, the last step's x_0 on the full VAE
    assert decoded == [("preview", 3 * num_candidates)] * 3 + [("full", 3 * num_candidates)]
    assert batch.final_images.shape == (3, 3, 64, 64)


def test_without_preview_decoder_previews_are_the_full_decode(tiny_sd15_dir, tmp_path):
    model = load_policy(make_config(tiny_sd15_dir, tmp_path), str(tiny_sd15_dir), torch.device("cpu"))
    assert model.preview_vae is None
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(decode_preview(model, latents), decode_latents(model, latents), rtol=0, atol=0)


def test_preview_decoder_with_another_scale_factor_is_a_clear_error(tiny_sd15_dir, tmp_path):
    preview_dir = _save_tiny_taesd(tmp_path / "taesd8", blocks=4)  # x8, the real SD scale factor
    config = make_config(tiny_sd15_dir, tmp_path, sampling={"preview_decoder": str(preview_dir)})
    with pytest.raises(ModelLoadError, match=r"sampling.preview_decoder .* upsampling x8.* x4"):
        load_policy(config, str(tiny_sd15_dir), torch.device("cpu"))

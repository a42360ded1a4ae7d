"""GPU check: what only a GPU can measure, in one prepared run (issue 18).

    bash benchmarks/gpu_check.sh --install-only            # bare machine: venv + project (torch's CUDA wheel)
    bash benchmarks/gpu_check.sh --out "$OUT"               # the run (default --budget-seconds 420)
    bash benchmarks/gpu_check.sh --out "$OUT" --models sd35    # SD3.5-medium alone (about 4-5 min)
    python benchmarks/gpu_check.py --out DIR [--dry-run] [--models sd15,sdxl,sd35] [--methods d3po,dde,...]
                                   [--steps N] [--flow-steps K] [--batch N] [--budget-seconds S]

For each model (SD1.5 at 512 px, SDXL at 1024 px, SD3.5-medium at 1024 px; the default --models is sd15,sdxl, whose
estimate already fills the default budget, so SD3.5 runs when named) the script builds a pipeline with random
weights at the real sizes (throughput and memory do not depend on the weights, so nothing is downloaded), saves it
in the diffusers format (float16 files) and loads it through the production loader (`workers.policy.load_policy` →
`models.loading.load_diffusion_model`, LoRA attached; SD3.5 through `load_diffusion_model` itself, with
Flow-GRPO's LoRA in place of the config's default). SD1.5 / SDXL then:

1. correctness of the CUDA paths against float32 on the same inputs (TF32 off in every float32 reference): the CFG
   noise prediction under bf16 / fp16 autocast, SDPA against the plain ("default") attention processor, channels_last,
   and bf16 weights (`model.dtype: bfloat16`, the samplers' fast path); one DDIM step; per method, the loss value and
   the cosine of the LoRA gradient (the learner's own `loss`, autocast and GradScaler); each with its tolerance
   (`TOLERANCES`) and pass / fail, or skip with the reason (a skip is never a pass);
2. sampled images/s per GPU: text encoding, K DDIM steps with CFG and the VAE decode of a batch, warm-up excluded,
   through a `workers.sampler.Sampler` (its predictor and grid), at float32 and bfloat16 weights;
3. per method: the method's own rollout (`Sampler`, brightness reward) once, then learner examples/s of
   `workers.learner.Learner.train` on it, at `train.mixed_precision` no and bf16 (warm-up excluded);
4. peak GPU memory of each measurement (`torch.cuda.max_memory_allocated`; null on CPU, with the reason).

SD3.5-medium (`sd35_configs`: the MMDiT-X transformer, CLIP-L and CLIP-G, T5 left out) with Flow-GRPO's sampler
(`FLOW_GRPO_SD35`: 10 SDE steps at noise level 0.7, CFG 4.5) through `diffusion.flow_sampling` (`check_flow_model`):
the importance ratio exp(ℓ_recomputed − ℓ_sampled) of just-sampled SDE actions re-scored by a fresh predictor call
(float32, bf16 and fp16 autocast), the log-prob drift of autocast actions against float32, the velocity's error
under autocast, sampled images/s at 1024 px with peak memory, and per method with a flow loss (Diffusion-DPO, DDE,
DDE-Single) its rollout, loss checks and learner throughput; without one: "not yet: no flow training loss".

It writes `gpu_check.json` and `gpu_check.md` to --out, also when --budget-seconds runs out: every measurement that
would start past the budget is recorded as skipped ("budget"), and the files hold what was measured.

--dry-run: the tiny 64 px pipelines (`models.tiny`; SD3.5: `build_tiny_pipeline(..., "sd3", sd35=True)`) on CPU,
2 DDIM / SDE steps, a few examples, every method: seconds, run by tests/test_gpu_check.py so the script cannot rot
between GPU runs. fp16 and CUDA-only checks are skipped there with their reason.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

METHODS = ("d3po", "tailorpo", "tailorpo_g", "dde", "dde_single", "diffusion_dpo")
MODELS = ("sd15", "sdxl", "sd35")
# Models the script cannot measure yet, with the reason (recorded as a skip); none at present.
UNAVAILABLE: dict[str, str] = {}
PROMPTS = ["a photo of a cat on a red sofa", "an oil painting of a lighthouse at sunset", "a blue car", "a dog"]

# (metric, precision) -> (tolerance, op): a check passes when `value op tolerance`. Relative errors are
# ||x − x_fp32||₂ / ||x_fp32||₂ on the same inputs; the loss error is |ℓ − ℓ_fp32| / max(|ℓ_fp32|, 0.01).
TOLERANCES: dict[tuple[str, str], tuple[float, str]] = {
    # about 12x the unit roundoff of bf16 (2^-8) and 20x that of fp16 (2^-11) for a whole CFG UNet call (w = 5
    # amplifies the error of ε(c) − ε(∅)); a DDIM step x_prev is dominated by its x_t term, so its bound is tighter
    ("eps_rel_err", "bf16_autocast"): (5e-2, "<="),
    ("eps_rel_err", "fp16_autocast"): (1e-2, "<="),
    ("eps_rel_err", "bf16_weights"): (5e-2, "<="),
    ("eps_rel_err", "sdpa_vs_default_bf16"): (5e-2, "<="),
    # same maths, different kernels / memory layout, both float32 with TF32 off
    ("eps_rel_err", "sdpa_vs_default_fp32"): (1e-4, "<="),
    ("eps_rel_err", "channels_last_fp32"): (1e-4, "<="),
    ("ddim_step_rel_err", "bf16_autocast"): (2e-2, "<="),
    ("ddim_step_rel_err", "fp16_autocast"): (5e-3, "<="),
    # the loss and the LoRA gradient of the learner's own loss (policy and reference both under autocast)
    ("loss_rel_err", "bf16_autocast"): (5e-2, "<="),
    ("loss_rel_err", "fp16_autocast"): (1e-2, "<="),
    ("grad_cosine", "bf16_autocast"): (0.98, ">="),
    ("grad_cosine", "fp16_autocast"): (0.995, ">="),
    # SD3.5 (flow): the CFG velocity of the transformer, as the noise prediction above
    ("v_rel_err", "bf16_autocast"): (5e-2, "<="),
    ("v_rel_err", "fp16_autocast"): (1e-2, "<="),
    # max |exp(ℓ_recomputed − ℓ_sampled) − 1| of just-sampled SDE actions, the same precision recomputing: a tenth of
    # Flow-GRPO's PPO clip range ε = 1e-4 (FLOW_GRPO_SD35), so that numerics alone never clip an on-policy sample.
    # Same inputs and batch in a fresh call: exactly 0 with deterministic kernels.
    ("ratio_dev", "fp32"): (1e-5, "<="),
    ("ratio_dev", "bf16_autocast"): (1e-5, "<="),
    ("ratio_dev", "fp16_autocast"): (1e-5, "<="),
    # max |ℓ_P − ℓ_fp32| (per-element-mean log-prob) of the same actions, sampled under autocast P and re-scored in
    # float32: the operational bound ε = 1e-4 (an fp32 learner would see the on-policy ratio inside 1 ± ε), not an
    # error model; the random weights' velocities are not the trained model's, so a fail says "look", not "broken".
    ("logp_drift", "bf16_autocast"): (1e-4, "<="),
    ("logp_drift", "fp16_autocast"): (1e-4, "<="),
}

# SD3.5-medium sampling as Flow-GRPO samples it (flow_grpo@9745241 config/base.py + config/grpo.py, the SD3.5-M
# ocr / geneval / pickscore configs; docs/algorithms.md §10): K = 10 SDE steps (`sample.num_steps`),
# noise level a = 0.7 (`sample.noise_level`), CFG 4.5 (`sample.guidance_scale`); its LoRA (r 32, alpha 64, gaussian
# init, the joint attention's projections); it trains steps j < ⌊0.99 K⌋ (`train.timestep_fraction`) with the PPO
# clip range 1e-4 (`train.clip_range`). Flow-GRPO samples at 512 px; this check samples at SD3.5's native 1024 px.
FLOW_GRPO_SD35 = {
    "num_steps": 10,
    "noise_level": 0.7,
    "guidance_scale": 4.5,
    "lora_rank": 32,
    "lora_alpha": 64,
    "lora_target_modules": (
        "attn.to_q",
        "attn.to_k",
        "attn.to_v",
        "attn.to_out.0",
        "attn.add_q_proj",
        "attn.add_k_proj",
        "attn.add_v_proj",
        "attn.to_add_out",
    ),
    "timestep_fraction": 0.99,
    "clip_range": 1e-4,
}
FLOW_LEARNER_NOT_YET = "not yet: no flow training loss"

# Rough H200 seconds per part, for the printed estimate only (never measured on a GPU yet): build + save + load of
# each model, its checks, and per method (rollout, loss checks, learner steps).
# SD3.5's fixed part: building 2.9B random parameters on the GPU, saving them as float16 (5.8 GB) and loading them
# back (about 60 s), 20 float32 CFG calls of the ratio / drift checks (1e14 FLOP each at 2 prompts x 4429 tokens,
# about 2 s at float32 without TF32) and the sampling throughput (4 batches of 4 images x 10 steps under fp16 and
# bf16 autocast, one float32 batch: about 80 s). Per method: only those with a flow loss run (Diffusion-DPO, DDE,
# DDE-Single, about 35 s each: rollout, loss checks, 4 float32 + 4 bf16 learner examples), spread over all six.
ESTIMATE_S = {
    "sd15": {"fixed": 45, "per_method": 10},
    "sdxl": {"fixed": 110, "per_method": 25},
    "sd35": {"fixed": 180, "per_method": 18},
}

# GPU defaults per model: prompts per sampling batch (the shipped configs' sampling.batch_size) and the learner's
# minibatch (train.train_batch_size; float32 activations with gradients of a 1024 px SDXL row are tens of GB, and
# D3PO / TailorPO evaluate CFG in training, 2 rows per example).
GPU_DEFAULTS = {
    "sd15": {"batch": 8, "train_batch": 2},
    "sdxl": {"batch": 4, "train_batch": 1},
    "sd35": {"batch": 4, "train_batch": 1},
}


def per_model(args: argparse.Namespace, kind: str, name: str) -> int:
    """`--batch` / `--train-batch` if given, else the dry run's 2, else the model's GPU default."""
    given = getattr(args, name)
    if given:
        return given
    return 2 if args.dry_run else GPU_DEFAULTS.get(kind, GPU_DEFAULTS["sdxl"])[name]


# ----------------------------------------------------------------------------------------------------------------
# Pure helpers (unit-tested)
# ----------------------------------------------------------------------------------------------------------------


def judge(value: float | None, metric: str, precision: str) -> dict[str, Any]:
    """A check's record from its measured value: the tolerance of (metric, precision), and "pass" / "fail"
    (a NaN or missing value fails)."""
    tolerance, op = TOLERANCES[(metric, precision)]
    if value is None or not math.isfinite(value):
        ok = False
    else:
        ok = value <= tolerance if op == "<=" else value >= tolerance
    return {"value": value, "tolerance": tolerance, "op": op, "status": "pass" if ok else "fail"}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x − ref||₂ / ||ref||₂ in float64 (inf when ref is 0 and x is not)."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    den = ref.norm().item()
    num = (x - ref).norm().item()
    return num / den if den > 0 else (0.0 if num == 0 else math.inf)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float | None:
    """Cosine of two flat vectors in float64; None when either is zero (no direction to compare)."""
    a, b = a.detach().double().cpu().flatten(), b.detach().double().cpu().flatten()
    na, nb = a.norm().item(), b.norm().item()
    if na == 0 or nb == 0:
        return None
    return float(a @ b / (na * nb))


class Budget:
    """Wall-clock budget of the run: a measurement starts only if its estimated cost fits in what is left."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.perf_counter):
        self.seconds = seconds
        self.clock = clock
        self.start = clock()

    def left(self) -> float:
        return self.seconds - (self.clock() - self.start)

    def allows(self, estimate_s: float) -> bool:
        return self.left() >= estimate_s

    def reason(self, estimate_s: float) -> str:
        return f"budget: {max(self.left(), 0):.0f} s of {self.seconds:.0f} s left, this needs about {estimate_s:.0f} s"


def estimate_run_seconds(models: list[str], methods: list[str], dry_run: bool) -> float:
    """Rough H200 wall time of a GPU run (the dry run: a few seconds per method)."""
    if dry_run:
        return 5.0 + 2.0 * len(methods) * len(models)
    return float(
        sum(ESTIMATE_S[m]["fixed"] + ESTIMATE_S[m]["per_method"] * len(methods) for m in models if m in ESTIMATE_S)
    )


# ----------------------------------------------------------------------------------------------------------------
# Real-size random pipelines
# ----------------------------------------------------------------------------------------------------------------

# The real text towers, as `clip_text_config` sizes: CLIP ViT-L/14 (SD1.5's, SDXL's and SD3's first, 123M + the 768
# projection) and OpenCLIP bigG/14 (SDXL's and SD3's second, 695M).
CLIP_VIT_L = dict(hidden_size=768, intermediate_size=3072, num_layers=12, num_heads=12, projection_dim=768)
OPENCLIP_BIGG = dict(
    hidden_size=1280, intermediate_size=5120, num_layers=32, num_heads=20, projection_dim=1280, hidden_act="gelu"
)


def real_vae(resolution: int, latent_channels: int, scaling_factor: float, **extra: Any) -> dict[str, Any]:
    """The `AutoencoderKL` config of the real SD VAE (4 levels of 128-512 channels, 2 layers each; 84M), the same
    in SD1.5, SDXL and SD3.5 but for the latent channels, the scaling factor and `extra` (SD3's shift factor and
    missing quant convs)."""
    return dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=latent_channels,
        norm_num_groups=32,
        sample_size=resolution,
        scaling_factor=scaling_factor,
        **extra,
    )


def real_configs(kind: str) -> dict[str, Any]:
    """The real component configs: SD1.5 (UNet 860M, CLIP ViT-L/14 text 123M, VAE 84M), SDXL base (UNet 2.6B,
    CLIP ViT-L text 123M + OpenCLIP bigG text 695M with projection, VAE 84M) and SD3.5-medium (`sd35_configs`)."""
    from rlhf_diffusion.models.tiny import VAE_SCALING_FACTOR, clip_text_config

    if kind == "sd35":
        return sd35_configs()
    if kind not in ("sd15", "sdxl"):
        raise ValueError(f"no real-size config for {kind!r}")
    resolution = {"sd15": 512, "sdxl": 1024}[kind]
    vae = real_vae(resolution, 4, VAE_SCALING_FACTOR[kind])
    unet = dict(sample_size=resolution // 8, in_channels=4, out_channels=4, layers_per_block=2)
    configs = {"resolution": resolution, "vae": vae, "unet": unet, "text_encoder": clip_text_config(**CLIP_VIT_L)}
    if kind == "sd15":
        unet.update(
            block_out_channels=(320, 640, 1280, 1280),
            down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            cross_attention_dim=768,
            attention_head_dim=8,
        )
        return configs
    unet.update(
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        cross_attention_dim=2048,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    configs["text_encoder_2"] = clip_text_config(**OPENCLIP_BIGG)
    return configs


def sd35_configs() -> dict[str, Any]:
    """SD3.5-medium's components at their real sizes, T5 left out.

    The transformer (MMDiT-X, 2243M parameters in diffusers plus the fixed 384² x 1536 sin-cos position table that
    diffusers keeps as a buffer and the checkpoint stores: 2.47B, Stability's "2.5B"). Assumed, not read from the
    hub (not reachable here): 24 layers of 24 heads x 64 (width 1536 = caption_projection_dim), RMS qk-norm, dual
    attention (a second image-only self-attention) in layers 0-12, patch 2 over 16 latent channels, sample_size
    128 (1024 px), pos_embed_max_size 384, joint_attention_dim 4096 (T5-XXL's width), pooled_projection_dim 2048
    (CLIP-L 768 + CLIP-G 1280). Checked against diffusers 0.42: `SD3Transformer2DModel`'s own comment
    (dual_attention_layers (0, ..., 12) "for sd3.5"), `loaders.single_file_utils` (an SD3 checkpoint whose
    adaLN width is 9216 = 6 x 1536 is "sd35_medium" iff its pos_embed has 147456 = 384² rows) and the layer count of
    the original medium config (24, dual attention on 0-12).

    The VAE is SD3's (SD1.5's layout with 16 latent channels, scaling 1.5305, shift 0.0609, no quant convs; 84M).
    The text encoders are CLIP ViT-L/14 (123M + the 768 projection) and OpenCLIP bigG/14 (695M), both with their
    projection (`CLIPTextModelWithProjection`, as SD3 loads both). T5-XXL (4.8B) is left out
    (`text_encoder_3=None, tokenizer_3=None`, which diffusers documents for SD3: its tokens are then zeros of
    width 4096, the same tensor shapes): it runs once per prompt, not per step, and at real size it would take
    most of the time budget to build and save."""
    from rlhf_diffusion.models.tiny import (
        SD3_LATENT_CHANNELS,
        SD3_VAE_SHIFT_FACTOR,
        VAE_SCALING_FACTOR,
        clip_text_config,
    )

    resolution = 1024
    transformer = dict(
        sample_size=resolution // 8,
        patch_size=2,
        in_channels=SD3_LATENT_CHANNELS,
        out_channels=SD3_LATENT_CHANNELS,
        num_layers=24,
        attention_head_dim=64,
        num_attention_heads=24,
        joint_attention_dim=4096,
        caption_projection_dim=1536,
        pooled_projection_dim=2048,
        pos_embed_max_size=384,
        dual_attention_layers=tuple(range(13)),
        qk_norm="rms_norm",
    )
    vae = real_vae(
        resolution,
        SD3_LATENT_CHANNELS,
        VAE_SCALING_FACTOR["sd3"],
        shift_factor=SD3_VAE_SHIFT_FACTOR,
        use_quant_conv=False,
        use_post_quant_conv=False,
    )
    clip_l = clip_text_config(**CLIP_VIT_L)
    clip_g = clip_text_config(**OPENCLIP_BIGG)
    return {
        "resolution": resolution,
        "transformer": transformer,
        "vae": vae,
        "text_encoder": clip_l,
        "text_encoder_2": clip_g,
    }


def build_real_sd35(out_dir: Path, device: torch.device) -> tuple[Path, dict[str, int]]:
    """A real-size random-weight SD3.5-medium pipeline without T5 (`sd35_configs`): every weight drawn on `device`
    in float32 and cast to float16 there (the device-to-host copy and the files are then half the size), saved as
    a `StableDiffusion3Pipeline` directory with SD3's flow scheduler (static shift 3); returns the directory and
    the parameter count of each component."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextModelWithProjection

    from rlhf_diffusion.models.tiny import SD3_SCHEDULER_CONFIG, build_clip_tokenizer

    cfg = sd35_configs()
    torch.manual_seed(0)
    parts: dict[str, Any] = {}
    with torch.device(device):
        parts["transformer"] = SD3Transformer2DModel(**cfg["transformer"])
        parts["vae"] = AutoencoderKL(**cfg["vae"])
        parts["text_encoder"] = CLIPTextModelWithProjection(cfg["text_encoder"])
        parts["text_encoder_2"] = CLIPTextModelWithProjection(cfg["text_encoder_2"])
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}
    for name, module in parts.items():
        parts[name] = module.to(dtype=torch.float16).to("cpu")
    free_memory(device)
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
        tokenizer=build_clip_tokenizer(),
        tokenizer_2=build_clip_tokenizer(pad_token="!"),
        text_encoder_3=None,
        tokenizer_3=None,
        **parts,
    )
    pipe.save_pretrained(out_dir, safe_serialization=True)
    del pipe, parts
    gc.collect()
    return out_dir, counts


def build_real_pipeline(out_dir: Path, kind: str, device: torch.device) -> tuple[Path, dict[str, int]]:
    """A real-size random-weight SD1.5 / SDXL pipeline (weights drawn on `device`, saved as float16 safetensors)
    in the diffusers format; returns the directory and the parameter count of each component."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from rlhf_diffusion.models.tiny import stable_diffusion_pipeline

    if kind == "sd35":
        return build_real_sd35(out_dir, device)
    cfg = real_configs(kind)
    torch.manual_seed(0)
    parts: dict[str, Any] = {}
    with torch.device(device):
        parts["unet"] = UNet2DConditionModel(**cfg["unet"])
        parts["vae"] = AutoencoderKL(**cfg["vae"])
        parts["text_encoder"] = CLIPTextModel(cfg["text_encoder"])
        if kind == "sdxl":
            parts["text_encoder_2"] = CLIPTextModelWithProjection(cfg["text_encoder_2"])
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}
    for name, module in parts.items():
        parts[name] = module.to(device="cpu", dtype=torch.float16)
    pipe = stable_diffusion_pipeline(kind, **parts)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    del pipe, parts
    gc.collect()
    return out_dir, counts


# ----------------------------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def peak_memory(device: torch.device, record: dict[str, Any]) -> Iterator[None]:
    """Sets record["peak_memory_mib"] to the peak allocated GPU memory inside the block (None on CPU, with
    record["peak_memory_note"] saying why)."""
    if device.type != "cuda":
        record["peak_memory_mib"] = None
        record["peak_memory_note"] = "CPU: torch keeps no peak-allocation counter for CPU tensors"
        yield
        return
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    record["resident_mib"] = round(torch.cuda.memory_allocated(device) / 2**20, 1)
    yield
    sync(device)
    record["peak_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)


@contextlib.contextmanager
def exact_fp32() -> Iterator[None]:
    """TF32 off (matmul and cuDNN) inside the block, so a float32 reference is float32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def oom_reason(err: BaseException) -> str:
    return f"CUDA out of memory (try a smaller --batch / --train-batch): {str(err).splitlines()[0][:160]}"


def learner_record(kind: str, method: str | None, precision: str) -> dict[str, Any]:
    """The fields of a learner examples/s record that is skipped before it is measured (`Run.skip`)."""
    return {"model": kind, "what": "learner", "method": method, "precision": precision, "unit": "examples/s"}


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = {"fp32": None, "bf16_autocast": torch.bfloat16, "fp16_autocast": torch.float16}[precision]
    return contextlib.nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


class Run:
    """Collects the records of one run and writes them."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.args = args
        self.device = device
        self.budget = Budget(args.budget_seconds)
        self.checks: list[dict[str, Any]] = []
        self.throughput: list[dict[str, Any]] = []
        self.models: dict[str, dict[str, Any]] = {}
        self.log = print

    # -- records --------------------------------------------------------------------------------------------------

    def check(self, model: str, name: str, metric: str, precision: str, value: float | None, **extra) -> None:
        record = {
            "model": model,
            "check": name,
            "metric": metric,
            "precision": precision,
            **judge(value, metric, precision),
        }
        record.update(extra)
        self.checks.append(record)
        self.log(f"  check {model} {name} [{precision}] {metric} = {value} -> {record['status']}")

    def skip_check(self, model: str, name: str, metric: str, precision: str, reason: str) -> None:
        tolerance, op = TOLERANCES[(metric, precision)]
        self.checks.append(
            {
                "model": model,
                "check": name,
                "metric": metric,
                "precision": precision,
                "value": None,
                "tolerance": tolerance,
                "op": op,
                "status": "skip",
                "reason": reason,
            }
        )

    def measure(self, record: dict[str, Any]) -> None:
        record.setdefault("status", "ok")
        self.throughput.append(record)
        what = f"{record['model']} {record['what']} {record.get('method') or ''} [{record['precision']}]"
        if record["status"] == "ok":
            self.log(f"  {what}: {record['value']:.3f} {record['unit']} (peak {record.get('peak_memory_mib')} MiB)")
        else:
            self.log(f"  {what}: skipped ({record['reason']})")

    def skip(self, record: dict[str, Any], reason: str) -> None:
        """Records `record` as not measured: status 'skip' with `reason` and no value."""
        self.measure({**record, "status": "skip", "reason": reason, "value": None})

    # -- output ---------------------------------------------------------------------------------------------------

    def result(self) -> dict[str, Any]:
        args = self.args
        meta = {
            "dry_run": args.dry_run,
            "device": str(self.device),
            "device_name": torch.cuda.get_device_name(self.device)
            if self.device.type == "cuda"
            else platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "python": platform.python_version(),
            "git_commit": _git_commit(),
            "steps": args.steps,
            "flow_steps": args.flow_steps,
            "flow_recipe": {k: list(v) if isinstance(v, tuple) else v for k, v in FLOW_GRPO_SD35.items()},
            "batch": args.batch or ("2 (dry run)" if args.dry_run else GPU_DEFAULTS),
            "train_batch": args.train_batch or ("2 (dry run)" if args.dry_run else GPU_DEFAULTS),
            "guidance_scale": args.guidance_scale,
            "learner_examples": args.learner_examples,
            "reps": args.reps,
            "budget_seconds": args.budget_seconds,
            "elapsed_seconds": round(self.budget.seconds - self.budget.left(), 1),
            "estimated_seconds": args.estimate,
            "tolerances": {f"{m}/{p}": {"tolerance": t, "op": op} for (m, p), (t, op) in TOLERANCES.items()},
        }
        try:
            import diffusers

            meta["diffusers"] = diffusers.__version__
        except ImportError:  # pragma: no cover
            pass
        return {"meta": meta, "models": self.models, "checks": self.checks, "throughput": self.throughput}

    def write(self, out: Path) -> tuple[Path, Path]:
        out.mkdir(parents=True, exist_ok=True)
        result = self.result()
        json_path, md_path = out / "gpu_check.json", out / "gpu_check.md"
        json_path.write_text(json.dumps(result, indent=2) + "\n")
        md_path.write_text(markdown(result))
        return json_path, md_path


def _git_commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-2 else f"{value:.{digits}f}"
    return str(value)


def markdown(result: dict[str, Any]) -> str:
    """The run as markdown: what ran where, the throughput table and the checks table (skips with reasons)."""
    meta = result["meta"]
    lines = [
        f"# GPU check{' (dry run: tiny models on CPU)' if meta['dry_run'] else ''}",
        "",
        f"{meta['device_name']} ({meta['device']}), torch {meta['torch']} (CUDA {meta['cuda']}), "
        f"diffusers {meta.get('diffusers')}, commit {str(meta['git_commit'])[:10]}; {meta['steps']} DDIM steps, "
        f"CFG {meta['guidance_scale']}, {meta['elapsed_seconds']} s of a {meta['budget_seconds']} s budget.",
        "",
    ]
    if "sd35" in result["models"]:
        recipe = meta["flow_recipe"]
        lines += [
            f"sd35 (SD3.5-medium, T5 left out): Flow-GRPO's SDE sampler, {meta['flow_steps']} steps, noise level "
            f"{recipe['noise_level']}, CFG {recipe['guidance_scale']} (its SD3.5 config), float32 weights with "
            f"LoRA r {recipe['lora_rank']}; ratio / drift tolerances from its PPO clip range {recipe['clip_range']}.",
            "",
        ]
    lines += [
        "| model | px | parameters (M) | build s | load s |",
        "|---|---|---|---|---|",
    ]
    for name, info in result["models"].items():
        if info.get("status") == "skip":
            lines.append(f"| {name} | — | — | — | skipped: {info['reason']} |")
            continue
        params = " + ".join(f"{k} {v / 1e6:.{0 if v >= 1e8 else 2}f}" for k, v in info.get("parameters", {}).items())
        lines.append(
            f"| {name} | {info.get('resolution')} | {params} | {_fmt(info.get('build_seconds'))} | "
            f"{_fmt(info.get('load_seconds'))} |"
        )
    lines += [
        "",
        "| model | measurement | method | precision | batch | value | unit | peak MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["throughput"]:
        value = _fmt(r.get("value")) if r["status"] == "ok" else f"skipped: {r['reason']}"
        peak = _fmt(r.get("peak_memory_mib")) if r.get("peak_memory_mib") is not None else "n/a"
        lines.append(
            f"| {r['model']} | {r['what']} | {r.get('method') or '—'} | {r['precision']} | {r.get('batch', '—')} | "
            f"{value} | {r['unit']} | {peak} |"
        )
    lines += [
        "",
        "| model | check | precision | metric | value | tolerance | result |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in result["checks"]:
        status = c["status"] if c["status"] != "skip" else f"skip: {c['reason']}"
        lines.append(
            f"| {c['model']} | {c['check']} | {c['precision']} | {c['metric']} | {_fmt(c['value'], 4)} | "
            f"{c['op']} {c['tolerance']} | {status} |"
        )
    passed = sum(c["status"] == "pass" for c in result["checks"])
    failed = sum(c["status"] == "fail" for c in result["checks"])
    skipped = sum(c["status"] == "skip" for c in result["checks"])
    lines += ["", f"Checks: {passed} pass, {failed} fail, {skipped} skipped (a skip is not a pass)."]
    if any(r.get("peak_memory_mib") is None for r in result["throughput"] if r["status"] == "ok"):
        lines.append("Peak memory n/a: CPU run (torch keeps no peak-allocation counter for CPU tensors).")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------------------
# One model
# ----------------------------------------------------------------------------------------------------------------


def make_config(args: argparse.Namespace, source: str, kind: str, method: str, *, dtype: str = "float32", mp="no"):
    """The run config of one measurement; SD3.5 (the SD3 pipeline found by `model.kind: auto`) gets Flow-GRPO's
    steps, CFG and LoRA (`FLOW_GRPO_SD35`; the flow noise level is the config's default, Flow-GRPO's 0.7)."""
    from rlhf_diffusion.config import parse_config

    model = {"pretrained": source, "kind": kind, "dtype": dtype, "attention": "sdpa"}
    sampling = {"num_steps": args.steps, "eta": 1.0, "guidance_scale": args.guidance_scale, "batch_size": 2}
    if kind == "sd35":
        recipe = FLOW_GRPO_SD35
        model.update(kind="auto")
        model["lora"] = {
            "rank": recipe["lora_rank"],
            "alpha": recipe["lora_alpha"],
            "target_modules": list(recipe["lora_target_modules"]),
        }
        sampling.update(num_steps=args.flow_steps, guidance_scale=recipe["guidance_scale"])
    return parse_config(
        {
            "run_name": "gpu_check",
            "output_dir": args.work_dir,
            "device": args.device_kind,
            "model": model,
            "sampling": sampling,
            "algorithm": {"name": method},
            "rewards": [{"name": "brightness"}],
            "train": {
                "learning_rate": 1e-6,
                "train_batch_size": per_model(args, kind, "train_batch"),
                "mixed_precision": mp,
            },
            "prompts": {"train": {"inline": PROMPTS}, "eval_seeds": 1},
            "tracking": {"enabled": False},
        }
    )


def perturb_lora(unet, scale: float, seed: int = 0) -> dict[str, torch.Tensor]:
    """Gives the LoRA B ≠ 0 (the initial B = 0 makes policy = reference and every log-ratio 0); returns the state."""
    from rlhf_diffusion.models.loading import get_lora_state_dict, set_lora_state_dict

    g = torch.Generator().manual_seed(seed)
    state = {
        k: (v + scale * torch.randn(v.shape, generator=g)) if ".lora_B." in k else v
        for k, v in get_lora_state_dict(unet).items()
    }
    set_lora_state_dict(unet, state)
    return state


def check_model(run: Run, kind: str, source: str) -> None:
    """Checks and throughput of one model (see the module docstring), recording into `run`."""
    from rlhf_diffusion.diffusion import ddim
    from rlhf_diffusion.diffusion.sampling import decode_latents, initial_noise, sample_trajectory
    from rlhf_diffusion.models.conditioning import encode_prompts
    from rlhf_diffusion.models.loading import set_attention, set_lora_state_dict, to_channels_last
    from rlhf_diffusion.workers.policy import load_policy
    from rlhf_diffusion.workers.sampler import Sampler

    args, device, info = run.args, run.device, run.models[kind]
    cuda = device.type == "cuda"
    start = time.perf_counter()
    config = make_config(args, source, kind, args.methods[0])
    model = load_policy(config, source, device)
    sync(device)
    info["load_seconds"] = round(time.perf_counter() - start, 2)
    info["resolution"] = model.resolution
    if "parameters" not in info:  # the tiny models: counted here (the real ones while building)
        modules = {"unet": model.unet, "vae": model.vae}
        modules.update({f"text_encoder{'_2' if i else ''}": e for i, e in enumerate(model.text_encoders)})
        info["parameters"] = {name: sum(p.numel() for p in m.parameters()) for name, m in modules.items()}
    lora_state = perturb_lora(model.unet, args.lora_scale)

    # ---- 1. noise prediction and one DDIM step against float32 ------------------------------------------------
    sampler = Sampler(config, source, model=model)
    res = sampler.resolution
    prompts = (PROMPTS * 4)[: per_model(args, kind, "batch")]
    g = torch.Generator().manual_seed(0)
    x_t = initial_noise(2, model, g).to(device)
    t = torch.tensor([700, 300])
    step = torch.tensor([args.steps // 4, (3 * args.steps) // 4])
    noise = torch.randn(x_t.shape, generator=g).to(device)
    cond = encode_prompts(model, PROMPTS[:2], height=res, width=res)
    predictor, grid = sampler.predictor, sampler.grid

    def eps_and_step(precision: str) -> tuple[torch.Tensor, torch.Tensor, float]:
        with torch.no_grad(), autocast(device, precision):
            sync(device)
            t0 = time.perf_counter()
            eps = predictor(x_t, t, cond)
            sync(device)
            seconds = time.perf_counter() - t0
            _, a, a_prev, _ = grid.scalars(step)
            x_prev, _, _, _ = ddim.ddim_step_with_logprob(
                x_t, eps, a.to(device), a_prev.to(device), grid.eta, noise=noise
            )
        return eps.float(), x_prev.float(), seconds

    with exact_fp32():
        eps_and_step("fp32")  # warm-up
        eps_ref, prev_ref, probe_s = eps_and_step("fp32")
    info["cfg_call_seconds_batch2_fp32"] = round(probe_s, 4)
    for precision in ("bf16_autocast", "fp16_autocast"):
        if precision == "fp16_autocast" and not cuda:
            reason = "fp16 autocast needs CUDA (the learner refuses train.mixed_precision fp16 off CUDA)"
            run.skip_check(kind, "noise prediction", "eps_rel_err", precision, reason)
            run.skip_check(kind, "DDIM step", "ddim_step_rel_err", precision, reason)
            continue
        eps, prev, _ = eps_and_step(precision)
        run.check(kind, "noise prediction (CFG)", "eps_rel_err", precision, rel_err(eps, eps_ref))
        run.check(kind, "DDIM step x_prev", "ddim_step_rel_err", precision, rel_err(prev, prev_ref))
    with exact_fp32():
        set_attention(model.unet, "default")
        eps_default, _, _ = eps_and_step("fp32")
        set_attention(model.unet, "sdpa")
    run.check(kind, "SDPA vs default attention", "eps_rel_err", "sdpa_vs_default_fp32", rel_err(eps_ref, eps_default))
    eps_sdpa_bf16, _, _ = eps_and_step("bf16_autocast")
    set_attention(model.unet, "default")
    eps_default_bf16, _, _ = eps_and_step("bf16_autocast")
    set_attention(model.unet, "sdpa")
    run.check(
        kind,
        "SDPA vs default attention under bf16 autocast" + (" (flash / efficient kernels)" if cuda else ""),
        "eps_rel_err",
        "sdpa_vs_default_bf16",
        rel_err(eps_sdpa_bf16, eps_default_bf16),
    )
    with exact_fp32():
        to_channels_last(model)
        eps_cl, _, _ = eps_and_step("fp32")
        for module in (model.unet, model.vae):
            module.to(memory_format=torch.contiguous_format)
    run.check(kind, "channels_last UNet + VAE", "eps_rel_err", "channels_last_fp32", rel_err(eps_cl, eps_ref))

    # ---- 2. sampling throughput, float32 weights ----------------------------------------------------------------
    def sampling(sampler, precision: str) -> None:
        m = sampler.model
        record = {"model": kind, "what": "sampling", "method": None, "precision": precision, "batch": len(prompts)}
        record.update(unit="images/s", steps=args.steps, guidance_scale=args.guidance_scale)
        estimate = (args.reps + 1) * args.steps * probe_s * max(1, len(prompts) / 2) * 1.5 + 5
        if not run.budget.allows(estimate):
            run.skip(record, run.budget.reason(estimate))
            return

        def one_batch(seed: int) -> None:
            gen = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                c = sampler.encode(prompts)
                x_T = initial_noise(len(prompts), m, gen, res, res)
                traj = sample_trajectory(sampler.predictor, c, x_T, sampler.grid, gen)
                decode_latents(m, traj.final.to(m.device))
            sync(device)

        try:
            one_batch(0)  # warm-up
            with peak_memory(device, record):
                t0 = time.perf_counter()
                for rep in range(args.reps):
                    one_batch(rep + 1)
                seconds = time.perf_counter() - t0
            record.update(value=args.reps * len(prompts) / seconds, seconds=round(seconds, 3), reps=args.reps)
            run.measure(record)
        except torch.cuda.OutOfMemoryError as err:
            free_memory(device)
            run.skip(record, oom_reason(err))

    sampling(sampler, "fp32")

    # ---- 3. per method: rollout, loss / gradient checks, learner throughput -------------------------------------
    m_sampler = None
    for method in args.methods:
        try:
            set_lora_state_dict(model.unet, lora_state)
            m_config = make_config(args, source, kind, method)
            estimate = probe_s * args.steps * 6 + probe_s * args.learner_examples * 8 * len(args.learner_precisions) + 5
            if not run.budget.allows(estimate):
                reason = run.budget.reason(estimate)
                for precision in args.learner_precisions:
                    run.skip(learner_record(kind, method, precision), reason)
                continue
            m_sampler = Sampler(m_config, source, model=model)
            gen = torch.Generator().manual_seed(1)
            rollout_prompts = PROMPTS[:2]
            record = {"model": kind, "what": "rollout (one call)", "method": method, "precision": "fp32"}
            record.update(batch=len(rollout_prompts), unit="prompts/s")
            with peak_memory(device, record):
                t0 = time.perf_counter()
                batch = m_sampler.algorithm.rollout(
                    m_sampler.rollout_context(gen), rollout_prompts, m_sampler.encode(rollout_prompts)
                )
                sync(device)
                rollout_s = time.perf_counter() - t0
            record.update(
                value=len(rollout_prompts) / rollout_s, seconds=round(rollout_s, 3), examples=len(batch.pairs)
            )
            record["note"] = "one call, after the sampling warm-up; brightness reward"
            run.measure(record)
            learner_measurements(run, kind, source, model, method, batch, lora_state)
        except torch.cuda.OutOfMemoryError as err:
            free_memory(device)
            run.skip(learner_record(kind, method, "—"), oom_reason(err))
    set_lora_state_dict(model.unet, lora_state)
    del sampler, model, m_sampler
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()

    # ---- 4. bf16 weights (the samplers' model.dtype): its prediction and sampling throughput --------------------
    for dtype in args.sampler_dtypes:
        if dtype == "float32":
            continue
        precision = {"bfloat16": "bf16_weights", "float16": "fp16_weights"}[dtype]
        if dtype == "float16" and not cuda:
            run.skip(
                {"model": kind, "what": "sampling", "method": None, "precision": precision, "unit": "images/s"},
                "float16 weights: CUDA only here",
            )
            continue
        estimate = info["load_seconds"] + (args.reps + 1) * args.steps * probe_s * max(1, len(prompts) / 2) + 5
        if not run.budget.allows(estimate):
            if precision == "bf16_weights":
                run.skip_check(kind, "noise prediction", "eps_rel_err", precision, run.budget.reason(estimate))
            run.skip(
                {"model": kind, "what": "sampling", "method": None, "precision": precision, "unit": "images/s"},
                run.budget.reason(estimate),
            )
            continue
        h_config = make_config(args, source, kind, args.methods[0], dtype=dtype)
        h_model = load_policy(h_config, source, device)
        set_lora_state_dict(h_model.unet, lora_state)
        h_sampler = Sampler(h_config, source, model=h_model)
        with torch.no_grad():
            eps_h = h_sampler.predictor(x_t, t, encode_prompts(h_model, PROMPTS[:2], height=res, width=res))
        if precision == "bf16_weights":
            run.check(
                kind, "noise prediction (CFG), weights in bf16", "eps_rel_err", precision, rel_err(eps_h, eps_ref)
            )
        sampling(h_sampler, precision)
        del h_sampler, h_model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()


def check_flow_model(run: Run, kind: str, source: str) -> None:
    """SD3.5 (see the module docstring): loads the pipeline with the production loader in float32 (Flow-GRPO keeps
    the transformer's weights float32 under autocast) and attaches Flow-GRPO's LoRA (B perturbed, so the policy is
    not the base model), then with Flow-GRPO's sampler settings (`FLOW_GRPO_SD35`; `--flow-steps`):

    1. per precision P (fp32 with TF32 off, bf16 / fp16 autocast): a just-sampled SDE trajectory of 2 prompts
       (`flow_sampling.sample_flow_trajectory`, its own log-probs ℓ_sampled) and each trained step's action
       re-scored with a fresh predictor call under P (`flow.sde_step_with_logprob` with the stored action): max
       |exp(ℓ_recomputed − ℓ_sampled) − 1| over rows and steps (fp32: at 3 steps, to save float32 calls). Under
       autocast also, at 3 steps, the same actions re-scored in float32: the log-prob drift max |ℓ_P − ℓ_fp32|, and
       the velocity's relative error against float32;
    2. sampled images/s at the native 1024 px (`encode_prompts`, the SDE trajectory, the VAE decode; warm-up
       excluded) under fp16 autocast (Flow-GRPO's precision), bf16 autocast and float32 (one batch, last: the one
       the budget cuts), with peak memory;
    3. per method with a flow loss (`Algorithm.flow_models`, `flow_training_methods`): its rollout through the
       production `Sampler`, its loss / LoRA-gradient checks and learner examples/s, as for the DDIM models
       (`flow_method_throughput`); the other methods, or every method in a checkout without flow losses, are
       recorded as "not yet" (no number)."""
    from rlhf_diffusion.diffusion import flow
    from rlhf_diffusion.diffusion.flow_sampling import VelocityPredictor, flow_grid_for, sample_flow_trajectory
    from rlhf_diffusion.diffusion.sampling import decode_latents, initial_noise
    from rlhf_diffusion.models.conditioning import encode_prompts
    from rlhf_diffusion.models.loading import attach_lora, load_diffusion_model, set_attention, set_lora_state_dict

    args, device, info = run.args, run.device, run.models[kind]
    cuda = device.type == "cuda"
    recipe = FLOW_GRPO_SD35
    start = time.perf_counter()
    model = load_diffusion_model(source, kind="sd3", dtype=torch.float32, device=device)
    set_attention(model.unet, "sdpa")
    torch.manual_seed(0)
    attach_lora(
        model.unet,
        rank=recipe["lora_rank"],
        alpha=recipe["lora_alpha"],
        target_modules=list(recipe["lora_target_modules"]),
        init="gaussian",
    )
    sync(device)
    info["load_seconds"] = round(time.perf_counter() - start, 2)
    info["resolution"] = model.resolution
    info["text_encoders"] = len(model.text_encoders)  # 2: CLIP-L and CLIP-G, T5 left out
    if "parameters" not in info:  # the tiny model: counted here (the real one while building)
        modules = {"transformer": model.unet, "vae": model.vae}
        modules.update({f"text_encoder{'_2' if i else ''}": e for i, e in enumerate(model.text_encoders)})
        info["parameters"] = {
            name: sum(p.numel() for n, p in m.named_parameters() if ".lora_" not in n) for name, m in modules.items()
        }
    lora_state = perturb_lora(model.unet, args.lora_scale)
    predictor = VelocityPredictor(model, recipe["guidance_scale"])
    grid = flow_grid_for(model, args.flow_steps, recipe["noise_level"])
    info["flow"] = {
        "steps": grid.num_steps,
        "noise_level": grid.noise_level,
        "guidance_scale": recipe["guidance_scale"],
        "shift": grid.shift,
        "step_std": [round(v, 4) for v in grid.std_dev.tolist()],
        "lora": {k: recipe[k] for k in ("lora_rank", "lora_alpha")},
        "source": "Flow-GRPO SD3.5-M config (flow_grpo@9745241 config/grpo.py)",
    }
    res = model.resolution
    trained = max(1, int(grid.num_steps * recipe["timestep_fraction"]))  # Flow-GRPO trains steps 0 … ⌊0.99 K⌋ − 1
    probe_steps = sorted({0, trained // 2, trained - 1})

    def context(precision: str) -> contextlib.AbstractContextManager:
        stack = contextlib.ExitStack()
        stack.enter_context(torch.no_grad())
        stack.enter_context(exact_fp32() if precision == "fp32" else autocast(device, precision))
        return stack

    # ---- 1. importance ratio, log-prob drift and velocity against float32 -----------------------------------------
    with torch.no_grad():
        cond = encode_prompts(model, PROMPTS[:2])
    x_T = initial_noise(2, model, torch.Generator().manual_seed(0))

    def velocity(x: torch.Tensor, i: int, precision: str) -> torch.Tensor:
        with context(precision):
            return predictor(x.to(device), grid.timesteps[i].expand(x.shape[0]), cond)

    def log_prob(x: torch.Tensor, v: torch.Tensor, i: int, action: torch.Tensor) -> torch.Tensor:
        _, logp, _, _ = flow.sde_step_with_logprob(
            x.to(device),
            v,
            grid.sigmas[i].to(device),
            grid.sigmas[i + 1].to(device),
            grid.noise_level,
            prev_sample=action.to(device),
        )
        return logp.double().cpu()

    velocity(x_T, 0, "fp32")  # warm-up
    sync(device)
    t0 = time.perf_counter()
    velocity(x_T, 0, "fp32")
    sync(device)
    probe_s = time.perf_counter() - t0
    info["cfg_call_seconds_batch2_fp32"] = round(probe_s, 4)
    call_s = {"fp32": probe_s}  # per-call seconds at 2 prompts, per precision (the autocast ones measured below)
    for precision in ("fp32", "bf16_autocast", "fp16_autocast"):
        names = [("ratio_dev", "importance ratio of a just-sampled SDE action (fresh predictor call)")]
        if precision != "fp32":
            names += [("logp_drift", "SDE log-prob of the same actions vs float32"), ("v_rel_err", "velocity (CFG)")]
        if precision == "fp16_autocast" and not cuda:
            reason = "fp16 autocast needs CUDA (the learner refuses train.mixed_precision fp16 off CUDA)"
        else:
            steps = probe_steps if precision == "fp32" else list(range(trained))
            guess = probe_s * (1.0 if precision == "fp32" else 0.3)
            estimate = (grid.num_steps + len(steps)) * guess + (
                0 if precision == "fp32" else len(probe_steps) * probe_s
            )
            reason = None if run.budget.allows(estimate + 5) else run.budget.reason(estimate + 5)
        if reason:
            for metric, name in names:
                run.skip_check(kind, name, metric, precision, reason)
            continue
        with context(precision):
            sync(device)
            t0 = time.perf_counter()
            traj = sample_flow_trajectory(predictor, cond, x_T, grid, torch.Generator().manual_seed(1))
            sync(device)
        call_s[precision] = (time.perf_counter() - t0) / grid.num_steps
        v_fresh, log_ratios = {}, []
        for i in steps:
            v_fresh[i] = velocity(traj.latents[:, i], i, precision)
            log_ratios.append(
                log_prob(traj.latents[:, i], v_fresh[i], i, traj.latents[:, i + 1]) - traj.log_probs[:, i]
            )
        log_ratio = torch.stack(log_ratios, dim=1)  # (B, steps), float64
        extra = {"steps": steps, "max_abs_log_ratio": float(log_ratio.abs().max())}
        value = float((log_ratio.exp() - 1).abs().max())
        run.check(kind, names[0][1], "ratio_dev", precision, value, **extra)
        if precision == "fp32":
            continue
        drifts, errors = [], []
        for i in probe_steps:
            v32 = velocity(traj.latents[:, i], i, "fp32")
            drifts.append((log_prob(traj.latents[:, i], v32, i, traj.latents[:, i + 1]) - traj.log_probs[:, i]).abs())
            errors.append(rel_err(v_fresh[i], v32))
        drift = float(torch.stack(drifts).max())
        extra = {"steps": probe_steps, "ratio_dev_vs_fp32": math.expm1(drift)}
        run.check(kind, names[1][1], "logp_drift", precision, drift, **extra)
        worst = float(torch.tensor(errors, dtype=torch.float64).max())  # a NaN stays NaN (and fails)
        run.check(kind, names[2][1], "v_rel_err", precision, worst, steps=probe_steps)
    info["cfg_call_seconds_batch2"] = {k: round(v, 4) for k, v in call_s.items()}

    # ---- 2. sampling throughput at the native resolution ------------------------------------------------------------
    prompts = (PROMPTS * 4)[: per_model(args, kind, "batch")]
    for precision in ("fp16_autocast", "bf16_autocast", "fp32"):
        record = {"model": kind, "what": "sampling", "method": None, "precision": precision, "batch": len(prompts)}
        record.update(
            unit="images/s",
            steps=grid.num_steps,
            noise_level=grid.noise_level,
            guidance_scale=recipe["guidance_scale"],
            resolution=res,
        )
        if precision == "fp16_autocast" and not cuda:
            run.skip(record, "fp16 autocast needs CUDA")
            continue
        # float32 on the GPU: one batch, no warm-up (its kernels ran in the checks above): it is 5-10x slower
        warm = not args.dry_run and precision != "fp32"
        reps = 1 if precision == "fp32" and not args.dry_run else args.reps
        per_call = call_s.get(precision, probe_s)
        estimate = (reps + warm) * grid.num_steps * per_call * max(1, len(prompts) / 2) * 1.5 + 5
        if not run.budget.allows(estimate):
            run.skip(record, run.budget.reason(estimate))
            continue

        def one_batch(seed: int, precision: str = precision) -> None:
            gen = torch.Generator().manual_seed(seed)
            with context(precision):  # the whole pipeline under autocast, as Flow-GRPO samples
                c = encode_prompts(model, prompts)
                traj = sample_flow_trajectory(
                    predictor, c, initial_noise(len(prompts), model, gen, res, res), grid, gen
                )
                decode_latents(model, traj.final.to(device))
            sync(device)

        try:
            if warm:
                one_batch(0)
            with peak_memory(device, record):
                t0 = time.perf_counter()
                for rep in range(reps):
                    one_batch(rep + 1)
                seconds = time.perf_counter() - t0
            record.update(value=reps * len(prompts) / seconds, seconds=round(seconds, 3), reps=reps, warmup=warm)
            run.measure(record)
        except torch.cuda.OutOfMemoryError as err:
            free_memory(device)
            run.skip(record, oom_reason(err))

    # ---- 3. per method that trains flow models: rollout, loss / gradient checks, learner throughput ------------------
    trainable = flow_training_methods(args.methods)
    if not trainable:
        run.skip(learner_record(kind, None, "—"), FLOW_LEARNER_NOT_YET)
    for method in args.methods if trainable else ():
        if method not in trainable:
            run.skip(learner_record(kind, method, "—"), "not yet: this method has no flow loss (flow_models False)")
            continue
        try:
            flow_method_throughput(run, kind, source, model, method, lora_state, probe_s)
        except torch.cuda.OutOfMemoryError as err:
            free_memory(device)
            run.skip(learner_record(kind, method, "—"), oom_reason(err))
        set_lora_state_dict(model.unet, lora_state)
    # the model goes with this frame; main() then collects it and empties the CUDA cache before the next model


def flow_training_methods(methods: list[str]) -> list[str]:
    """Those of `methods` that train flow-matching (SD3) models in this checkout (`Algorithm.flow_models`; none
    before the flow losses existed)."""
    from rlhf_diffusion.algorithms import ALGORITHM_REGISTRY

    return [m for m in methods if getattr(ALGORITHM_REGISTRY[m], "flow_models", False)]


def flow_method_throughput(run: Run, kind: str, source: str, model, method: str, lora_state: dict, probe_s: float):
    """One flow-capable method on SD3.5, as `check_model` measures the DDIM models' methods: its rollout through
    the production `Sampler` (once, under bf16 autocast: it only feeds the learner, and float32 at 1024 px costs
    10 x its time), the loss / LoRA-gradient checks against float32, and learner examples/s of `Learner.train`."""
    from rlhf_diffusion.models.loading import set_lora_state_dict
    from rlhf_diffusion.workers.sampler import Sampler

    args, device = run.args, run.device
    set_lora_state_dict(model.unet, lora_state)
    rollout_prompts = PROMPTS[:2]
    # rollout (2 prompts, a pair each, under autocast) + per precision 2 warm-up and up to 2 timed examples, each a
    # policy forward and backward and a reference forward of two images: about 2 float32 CFG calls of 2 prompts
    estimate = args.flow_steps * probe_s * 0.6 + 4 * 2 * probe_s * len(args.learner_precisions) + 3 * probe_s + 5
    if not run.budget.allows(estimate):
        for precision in args.learner_precisions:
            run.skip(learner_record(kind, method, precision), run.budget.reason(estimate))
        return
    sampler = Sampler(make_config(args, source, kind, method), source, model=model)
    gen = torch.Generator().manual_seed(1)
    precision = "bf16_autocast"
    record = {"model": kind, "what": "rollout (one call)", "method": method, "precision": precision}
    record.update(batch=len(rollout_prompts), unit="prompts/s")
    with peak_memory(device, record), torch.no_grad(), autocast(device, precision):
        t0 = time.perf_counter()
        batch = sampler.algorithm.rollout(
            sampler.rollout_context(gen), rollout_prompts, sampler.encode(rollout_prompts)
        )
        sync(device)
        rollout_s = time.perf_counter() - t0
    record.update(value=len(rollout_prompts) / rollout_s, seconds=round(rollout_s, 3), examples=len(batch.pairs))
    record["note"] = "one call under bf16 autocast (after the sampling measurements); brightness reward"
    run.measure(record)
    learner_measurements(run, kind, source, model, method, batch, lora_state)


def learner_measurements(run: Run, kind: str, source: str, model, method: str, batch, lora_state: dict) -> None:
    """After a method's rollout (`check_model`, `flow_method_throughput`): on its first `--learner-examples`
    examples, the loss / LoRA-gradient checks (`loss_checks`), then learner examples/s of `Learner.train` per
    `--learner-precisions`, warm-up excluded; a rollout with no examples (every pair tied) is recorded as a skip."""
    from rlhf_diffusion.models.loading import set_lora_state_dict
    from rlhf_diffusion.workers.learner import Learner

    args, device = run.args, run.device
    n = min(len(batch.pairs), args.learner_examples)
    if n == 0:
        run.skip(learner_record(kind, method, "no"), "the rollout gave no examples (every pair tied)")
        return
    batch = dataclasses.replace(batch, pairs=batch.pairs.select(torch.arange(n)), weights_version=0)
    loss_checks(run, kind, source, model, method, batch, lora_state)
    for mp in args.learner_precisions:
        record = {"model": kind, "what": "learner", "method": method, "precision": mp, "batch": n}
        record.update(unit="examples/s")
        if mp == "fp16" and device.type != "cuda":
            run.skip(record, "fp16 needs CUDA")
            continue
        set_lora_state_dict(model.unet, lora_state)
        learner = Learner(make_config(args, source, kind, method, mp=mp), source, model=model)
        if not args.dry_run:  # warm-up (CUDA kernels, allocator, autotuning); nothing to warm on CPU
            learner.train(dataclasses.replace(batch, pairs=batch.pairs.select(torch.arange(min(2, n)))), 0)
            learner.version = 0
        record["warmup"] = not args.dry_run
        with peak_memory(device, record):
            t0 = time.perf_counter()
            result = learner.train(batch, 1)
            sync(device)
            seconds = time.perf_counter() - t0
        record.update(
            value=n / seconds, seconds=round(seconds, 3), optimizer_steps=result.metrics.get("optimizer_steps")
        )
        run.measure(record)


def loss_checks(run: Run, kind: str, source: str, model, method: str, batch, lora_state: dict) -> None:
    """The method's loss and LoRA gradient on (up to) 2 rollout examples, float32 (TF32 off) against the learner's
    autocast (with its GradScaler for fp16). A LoRA whose every ratio is clamped gives a zero float32 gradient: the
    LoRA B is then scaled down (÷10, twice) before the comparison is given up and recorded as skipped."""
    from rlhf_diffusion.models.loading import lora_parameters, set_lora_state_dict
    from rlhf_diffusion.workers.learner import Learner

    args, cuda = run.args, run.device.type == "cuda"
    rows = batch.pairs.select(torch.arange(min(per_model(args, kind, "train_batch"), len(batch.pairs))))
    params = lora_parameters(model.unet)

    def loss_and_grad(state: dict, mp: str) -> tuple[float, torch.Tensor, dict[str, float]]:
        set_lora_state_dict(model.unet, state)
        learner = Learner(make_config(args, source, kind, method, mp=mp), source, model=model)
        cond = learner.encode(batch.prompts).index(rows.prompt_index)
        model.unet.train()
        try:
            with exact_fp32() if mp == "no" else contextlib.nullcontext(), learner.autocast():
                out = learner.algorithm.loss(learner.predictor, cond, rows, torch.Generator().manual_seed(7))
                grads = torch.autograd.grad(learner.grad_scaler.scale(out.loss), params, allow_unused=True)
        finally:
            model.unet.eval()
        inv = 1.0 / learner.grad_scaler.get_scale() if learner.grad_scaler.is_enabled() else 1.0
        flat = torch.cat([(g if g is not None else torch.zeros_like(p)).flatten() * inv for g, p in zip(grads, params)])
        return out.loss.detach().float().item(), flat.detach().cpu(), out.metrics

    ref = None
    for shrink in (1.0, 0.1, 0.01):
        state = {k: v * shrink if ".lora_B." in k else v for k, v in lora_state.items()}
        ref = loss_and_grad(state, "no")
        if ref[1].norm().item() > 0:
            break
    value_ref, grad_ref, metrics_ref = ref
    run.models[kind].setdefault("fp32_loss", {})[method] = value_ref
    zero = grad_ref.norm().item() == 0
    for precision, mp in (("bf16_autocast", "bf16"), ("fp16_autocast", "fp16")):
        if mp == "fp16" and not cuda:
            reason = "fp16 autocast needs CUDA (the learner refuses train.mixed_precision fp16 off CUDA)"
        elif zero:
            reason = (
                f"the float32 LoRA gradient is zero on these examples even with LoRA B x0.01 "
                f"(clamp_fraction {metrics_ref.get('clamp_fraction')}): nothing to compare"
            )
        else:
            reason = None
        if reason:
            run.skip_check(kind, f"{method} loss", "loss_rel_err", precision, reason)
            run.skip_check(kind, f"{method} LoRA gradient", "grad_cosine", precision, reason)
            continue
        value, grad, _ = loss_and_grad(state, mp)
        err = abs(value - value_ref) / max(abs(value_ref), 0.01)
        extra = {"loss": value, "loss_fp32": value_ref, "lora_b_shrink": shrink}
        run.check(kind, f"{method} loss", "loss_rel_err", precision, err, **extra)
        run.check(kind, f"{method} LoRA gradient", "grad_cosine", precision, cosine(grad, grad_ref), **extra)
    set_lora_state_dict(model.unet, lora_state)


def prepare_model(run: Run, kind: str) -> str | None:
    """Builds the model's pipeline directory (tiny or real size); returns it, or None after recording a skip."""
    info = run.models.setdefault(kind, {})
    if kind in UNAVAILABLE:
        info.update(status="skip", reason=UNAVAILABLE[kind])
        return None
    fixed = 5.0 if run.args.dry_run else ESTIMATE_S[kind]["fixed"]
    if not run.budget.allows(fixed):
        info.update(status="skip", reason=run.budget.reason(fixed))
        return None
    start = time.perf_counter()
    out_dir = Path(run.args.work_dir) / f"{kind}_pipeline"
    if run.args.dry_run:
        from rlhf_diffusion.models.tiny import build_tiny_pipeline

        if kind == "sd35":  # the tiny SD3.5 (qk-norm, a dual-attention first block), no T5 as at real size
            build_tiny_pipeline(out_dir, "sd3", sd35=True)
        else:
            build_tiny_pipeline(out_dir, kind)
        info["size"] = "tiny (models.tiny, 64 px)"
    else:
        _, counts = build_real_pipeline(out_dir, kind, run.device)
        info["parameters"] = counts
        info["size"] = "real (random weights)"
    info["build_seconds"] = round(time.perf_counter() - start, 2)
    info["status"] = "ok"
    return str(out_dir)


# ----------------------------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.environ.get("OUT") or "runs/gpu_check", help="where the JSON / md go")
    parser.add_argument("--dry-run", action="store_true", help="tiny models on CPU, seconds (the test suite's run)")
    parser.add_argument("--models", default="sd15,sdxl", help=f"comma-separated, of {','.join(MODELS)}")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated algorithm names")
    parser.add_argument("--steps", type=int, default=None, help="DDIM steps (default 20; dry run 2)")
    parser.add_argument(
        "--flow-steps", type=int, default=None, help="SD3.5 SDE steps (default Flow-GRPO's 10; dry run 2)"
    )
    parser.add_argument(
        "--batch", type=int, default=None, help="prompts per sampling batch (SD1.5 8, SDXL 4, SD3.5 4; dry 2)"
    )
    parser.add_argument("--train-batch", type=int, default=None, help="learner minibatch (SD1.5 2, SDXL 1; dry 2)")
    parser.add_argument("--reps", type=int, default=None, help="timed sampling batches (default 3; dry run 1)")
    parser.add_argument("--learner-examples", type=int, default=None, help="examples per learner call (8; dry 2)")
    parser.add_argument(
        "--learner-precisions", default=None, help="train.mixed_precision values timed (no,bf16; dry run: no)"
    )
    parser.add_argument("--sampler-dtypes", default="float32,bfloat16", help="model.dtype values timed in sampling")
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--lora-scale", type=float, default=None, help="std of the random LoRA B (policy ≠ ref)")
    parser.add_argument("--budget-seconds", type=float, default=420.0, help="skip what would start past this")
    parser.add_argument("--device", default=None, help="cuda / cpu (default: cuda if visible; dry run: cpu)")
    args = parser.parse_args(argv)
    dry = args.dry_run
    args.steps = args.steps or (2 if dry else 20)
    args.flow_steps = args.flow_steps or (2 if dry else FLOW_GRPO_SD35["num_steps"])
    args.reps = args.reps or (1 if dry else 3)
    args.learner_examples = args.learner_examples or (2 if dry else 8)
    args.lora_scale = args.lora_scale if args.lora_scale is not None else 0.01
    args.models = [m for m in args.models.split(",") if m]
    args.methods = [m for m in args.methods.split(",") if m]
    args.learner_precisions = [p for p in (args.learner_precisions or ("no" if dry else "no,bf16")).split(",") if p]
    args.sampler_dtypes = [p for p in args.sampler_dtypes.split(",") if p]
    for name, values, allowed in (
        ("--models", args.models, MODELS),
        ("--methods", args.methods, METHODS),
        ("--learner-precisions", args.learner_precisions, ("no", "bf16", "fp16")),
        ("--sampler-dtypes", args.sampler_dtypes, ("float32", "bfloat16", "float16")),
    ):
        unknown = [v for v in values if v not in allowed]
        if unknown:
            parser.error(f"{name}: unknown {unknown}; choose from {','.join(allowed)}")
    if not args.methods:
        parser.error("--methods: give at least one")
    args.device = args.device or ("cpu" if dry else ("cuda" if torch.cuda.is_available() else "cpu"))
    args.device_kind = "cuda" if args.device.startswith("cuda") else "cpu"
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if not args.dry_run and device.type != "cuda":
        print("gpu_check: no CUDA device; real-size models on CPU would take hours. Use --dry-run.", file=sys.stderr)
        return 2
    args.estimate = estimate_run_seconds(args.models, args.methods, args.dry_run)
    print(
        f"gpu_check: {'dry run (tiny, CPU)' if args.dry_run else torch.cuda.get_device_name(device)}; models "
        f"{args.models}, methods {args.methods}; estimated {args.estimate:.0f} s "
        f"({'rough H200 guess' if not args.dry_run else 'CPU'}), budget {args.budget_seconds:.0f} s",
        flush=True,
    )
    run = Run(args, device)
    out = Path(args.out)
    tmp = tempfile.mkdtemp(prefix="gpu_check_")
    args.work_dir = tmp
    try:
        for kind in args.models:
            print(f"[{kind}] building ({run.budget.left():.0f} s left)", flush=True)
            try:
                source = prepare_model(run, kind)
                if source is not None:
                    (check_flow_model if kind == "sd35" else check_model)(run, kind, source)
            except Exception as err:  # noqa: BLE001 - one model failing still writes the others' results
                run.models.setdefault(kind, {}).update(status="error", error=f"{type(err).__name__}: {err}")
                print(f"[{kind}] error: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
                if args.dry_run:
                    raise
            finally:
                shutil.rmtree(Path(tmp) / f"{kind}_pipeline", ignore_errors=True)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            run.write(out)  # after every model: a run cut short still leaves its files
    finally:
        json_path, md_path = run.write(out)
        shutil.rmtree(tmp, ignore_errors=True)
    print(md_path.read_text())
    print(f"wrote {json_path} and {md_path}")
    return 1 if any(info.get("status") == "error" for info in run.models.values()) else 0


if __name__ == "__main__":
    sys.exit(main())

"""Tiny random-weight Stable Diffusion 1.5 / SDXL pipelines, saved as standard diffusers pipeline directories.

Tests (and the embedded `configs/tiny.yaml` run) build one of these, save it with the stock
`StableDiffusionPipeline.save_pretrained` / `StableDiffusionXLPipeline.save_pretrained`, and then load it through
`models.loading.load_diffusion_model`, the same code that loads the real SD1.5 / SDXL checkpoints. Every component
is the real class (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer, DDIMScheduler); only the
sizes are tiny and the weights random. Nothing is downloaded: the tokenizer is built from the CLIP BPE merges that
ship inside `open_clip_torch`.

Shapes of the tiny models (resolution 64):

    image (B, 3, 64, 64)  <-> VAE (3 blocks, scale factor 4) <->  latents (B, 4, 16, 16)
    prompt -> CLIP tokens (B, 77) -> text encoder(s) -> (B, 77, 32) [SD1.5] or (B, 77, 64) + pooled (B, 32) [SDXL]
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

__all__ = ["build_tiny_pipeline", "build_clip_tokenizer", "clip_text_config", "stable_diffusion_pipeline"]

# CLIP text tower: the vocabulary is fixed by the BPE (49,408 tokens), so the token embedding
# (49408 x TEXT_HIDDEN_SIZE) dominates the file size; everything else is kept minimal.
CLIP_VOCAB_SIZE = 49408
CLIP_MAX_LENGTH = 77
TEXT_HIDDEN_SIZE = 32
TEXT_PROJECTION_DIM = 32  # SDXL text_encoder_2 pooled embedding width
ADDITION_TIME_EMBED_DIM = 8  # SDXL micro-conditioning: 6 size/crop numbers, each Fourier-embedded to 8
NUM_ADD_TIME_IDS = 6  # (original_size, crops_coords_top_left, target_size)

# The 256 byte symbols, the 256 end-of-word byte symbols and the merges make up 49,408 - 2 tokens; open_clip
# reads exactly this many merge lines from its (longer) BPE file.
_NUM_BPE_MERGES = CLIP_VOCAB_SIZE - 2 * 256 - 2

# Stable Diffusion's noise schedule (SD1.x and SDXL share it), with DDIM's SD-style settings.
SD_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)

# Latent scaling factor of the real VAEs (latents = vae.encode(x) * scaling_factor).
VAE_SCALING_FACTOR = {"sd15": 0.18215, "sdxl": 0.13025}


def build_clip_tokenizer(*, pad_token: str = "<|endoftext|>") -> CLIPTokenizer:
    """Builds the OpenAI CLIP BPE tokenizer offline from the vocabulary bundled with `open_clip_torch`.

    Gives the same ids as open_clip's `SimpleTokenizer` (and hence as the tokenizers of SD1.5 / SDXL) for ordinary
    prompts; see docs/rewards.md §3a for the recipe and its one known difference (HTML entities).

    Args:
        pad_token: padding token. `"<|endoftext|>"` mirrors SD1.5's tokenizer and SDXL's `tokenizer`; `"!"` mirrors
            SDXL's `tokenizer_2` (the OpenCLIP bigG tokenizer).

    Returns:
        A `CLIPTokenizer` with `model_max_length=77`.
    """
    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = lines[1 : _NUM_BPE_MERGES + 1]  # line 0 is the "#version" header
    byte_symbols = list(bytes_to_unicode().values())
    tokens = (
        byte_symbols
        + [symbol + "</w>" for symbol in byte_symbols]
        + ["".join(merge.split()) for merge in merges]
        + ["<|startoftext|>", "<|endoftext|>"]
    )
    vocab = {token: i for i, token in enumerate(tokens)}
    return CLIPTokenizer(
        vocab=vocab,
        merges=[tuple(merge.split()) for merge in merges],
        pad_token=pad_token,
        model_max_length=CLIP_MAX_LENGTH,
    )


def clip_text_config(
    *,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    projection_dim: int,
    hidden_act: str = "quick_gelu",
) -> CLIPTextConfig:
    """A CLIP text tower of the given size with the real vocabulary (49,408 BPE tokens), 77 positions and the same
    special-token ids as the real SD text encoders (pooling takes the first EOT token). The tiny pipelines' towers
    and the real-size ones of `benchmarks/gpu_check.py` are built from it."""
    return CLIPTextConfig(
        vocab_size=CLIP_VOCAB_SIZE,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=CLIP_MAX_LENGTH,
        hidden_act=hidden_act,
        projection_dim=projection_dim,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )


def _text_config() -> CLIPTextConfig:
    return clip_text_config(
        hidden_size=TEXT_HIDDEN_SIZE,
        intermediate_size=64,
        num_layers=2,
        num_heads=2,
        projection_dim=TEXT_PROJECTION_DIM,
    )


def _vae(kind: Literal["sd15", "sdxl"], resolution: int) -> AutoencoderKL:
    # 3 blocks -> 2 downsamplings -> vae_scale_factor 4.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=resolution,
        scaling_factor=VAE_SCALING_FACTOR[kind],
    )


def _unet(kind: Literal["sd15", "sdxl"], resolution: int) -> UNet2DConditionModel:
    common = dict(
        sample_size=resolution // 4,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
        norm_num_groups=8,
    )
    if kind == "sd15":
        return UNet2DConditionModel(**common, cross_attention_dim=TEXT_HIDDEN_SIZE)
    # SDXL: the two encoders' penultimate hidden states are concatenated (cross-attention width 32 + 32), and the
    # "text_time" added embedding takes the pooled text embedding plus the 6 Fourier-embedded micro-conditions.
    return UNet2DConditionModel(
        **common,
        cross_attention_dim=2 * TEXT_HIDDEN_SIZE,
        transformer_layers_per_block=1,
        addition_embed_type="text_time",
        addition_time_embed_dim=ADDITION_TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=NUM_ADD_TIME_IDS * ADDITION_TIME_EMBED_DIM + TEXT_PROJECTION_DIM,
    )


def build_tiny_pipeline(
    out_dir: str | Path,
    kind: Literal["sd15", "sdxl"],
    *,
    resolution: int = 64,
    seed: int = 0,
) -> Path:
    """Builds a tiny random-weight SD1.5 or SDXL pipeline and saves it as a diffusers pipeline directory.

    The directory loads with `StableDiffusionPipeline.from_pretrained(out_dir)` (SD1.5, no safety checker) or
    `StableDiffusionXLPipeline.from_pretrained(out_dir)` (SDXL), and with `models.loading.load_diffusion_model`.
    Weights are deterministic given `seed` (the RNG is reseeded before each module is constructed).

    Args:
        out_dir: directory to write (created if missing; existing component files are overwritten).
        kind: `"sd15"` or `"sdxl"`.
        resolution: image side in pixels; must be a multiple of 8 (latents are `resolution // 4` wide and the
            UNet downsamples them once more).
        seed: RNG seed for the random weights.

    Returns:
        `out_dir` as a `Path`.

    Raises:
        ValueError: `kind` is not one of "sd15", "sdxl", or `resolution` is not a positive multiple of 8.
    """
    if kind not in ("sd15", "sdxl"):
        raise ValueError(f"kind must be 'sd15' or 'sdxl', got {kind!r}")
    if resolution <= 0 or resolution % 8 != 0:
        raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
    out_dir = Path(out_dir)

    torch.manual_seed(seed)
    vae = _vae(kind, resolution)
    torch.manual_seed(seed)
    unet = _unet(kind, resolution)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config())
    text_encoder_2 = None
    if kind == "sdxl":
        torch.manual_seed(seed + 1)  # a different random tower from text_encoder
        text_encoder_2 = CLIPTextModelWithProjection(_text_config())
    pipe = stable_diffusion_pipeline(kind, vae=vae, unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2)
    pipe.save_pretrained(out_dir)
    return out_dir


def stable_diffusion_pipeline(
    kind: Literal["sd15", "sdxl"],
    *,
    vae: AutoencoderKL,
    unet: UNet2DConditionModel,
    text_encoder: CLIPTextModel,
    text_encoder_2: CLIPTextModelWithProjection | None = None,
) -> StableDiffusionPipeline | StableDiffusionXLPipeline:
    """The stock SD1.5 (no safety checker) or SDXL (`text_encoder_2` required) pipeline of the given components, with
    SD's DDIM scheduler (`SD_SCHEDULER_CONFIG`) and the offline CLIP tokenizers (SDXL's second one padding with "!"),
    as the tiny pipelines and the real-size ones of `benchmarks/gpu_check.py` are saved."""
    scheduler = DDIMScheduler(**SD_SCHEDULER_CONFIG)
    tokenizer = build_clip_tokenizer()
    if kind == "sd15":
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=text_encoder,
            tokenizer=tokenizer,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    if text_encoder_2 is None:
        raise ValueError("an SDXL pipeline needs text_encoder_2")
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=build_clip_tokenizer(pad_token="!"),
        unet=unet,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
        add_watermarker=False,
    )

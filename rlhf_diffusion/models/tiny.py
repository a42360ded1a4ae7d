"""Tiny random-weight SD1.5 / SDXL / SD3 / FLUX.1 pipelines, saved as standard diffusers pipeline directories.

Tests (and the embedded `configs/tiny.yaml` run) build one of these, save it with the stock
`StableDiffusionPipeline.save_pretrained` / `StableDiffusionXLPipeline.save_pretrained`, and then load it through
`models.loading.load_diffusion_model`, the same code that loads the real SD1.5 / SDXL checkpoints. Every component
is the real class (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer, DDIMScheduler); only the
sizes are tiny and the weights random. Nothing is downloaded: the tokenizer is built from the CLIP BPE merges that
ship inside `open_clip_torch`.

Shapes of the tiny models (resolution 64):

    image (B, 3, 64, 64)  <-> VAE (3 blocks, scale factor 4) <->  latents (B, 4, 16, 16)
    prompt -> CLIP tokens (B, 77) -> text encoder(s) -> (B, 77, 32) [SD1.5] or (B, 77, 64) + pooled (B, 32) [SDXL]

SD3 (`kind="sd3"`, `StableDiffusion3Pipeline`; `sd35=True` for the SD3.5 transformer's qk-norm and dual attention):

    image (B, 3, 64, 64)  <-> VAE (16 latent channels, shift + scale) <->  latents (B, 16, 16, 16)
    latents -> 2x2 patches -> 64 tokens of width 32 (SD3Transformer2DModel, 2 joint blocks)
    prompt -> two CLIP towers with projection -> (B, 77, 32 + 32) zero-padded to (B, 77, 96), then T5 (B, 256, 96)
              (zeros when T5 is absent) appended on the sequence axis -> (B, 333, 96); pooled (B, 32 + 32)

FLUX.1 (`kind="flux"`, `FluxPipeline`, FLUX.1-dev-shaped: guidance embedding, dynamic shift):

    image (B, 3, 64, 64)  <-> VAE (16 latent channels, FLUX's shift + scale) <->  latents (B, 16, 16, 16)
    latents -> packed 2x2 patches -> 64 tokens of 64 inputs (FluxTransformer2DModel, 1 double + 1 single block)
    prompt -> CLIP-L pooled output (B, 32); T5 tokens (B, 512, 64) (the T5 tokenizer built offline, as for SD3)
    `schnell=True`: FLUX.1-schnell-shaped instead: no guidance embedding, the static shift 1 (its scheduler config)
"""

from __future__ import annotations

import gzip
from pathlib import Path
from typing import Literal

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
)

__all__ = [
    "build_clip_tokenizer",
    "build_t5_tokenizer",
    "build_tiny_pipeline",
    "clip_text_config",
    "stable_diffusion_pipeline",
]

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
VAE_SCALING_FACTOR = {"sd15": 0.18215, "sdxl": 0.13025, "sd3": 1.5305, "flux": 0.3611}
# SD3 / SD3.5: latents = (vae.encode(x) - shift_factor) * scaling_factor, 16 channels (stabilityai/stable-diffusion-3*).
# FLUX.1's VAE has the same layout with its own factors (black-forest-labs/FLUX.1-dev vae/config.json).
SD3_VAE_SHIFT_FACTOR = 0.0609
VAE_SHIFT_FACTOR = {"sd3": SD3_VAE_SHIFT_FACTOR, "flux": 0.1159}
SD3_LATENT_CHANNELS = 16
# SD3's scheduler: rectified flow with the static shift 3 of SD3-medium / SD3.5.
SD3_SCHEDULER_CONFIG = dict(num_train_timesteps=1000, shift=3.0)
# Width of the joint (text) tokens the SD3 transformer reads: T5's hidden size (4096 for the real T5-XXL). Wider than
# the two CLIP towers together (32 + 32), so the zero padding of the CLIP features is exercised.
SD3_JOINT_DIM = 96
SD3_T5_VOCAB_SIZE = 128  # the tiny T5 tokenizer's vocabulary (the real one: 32,100 sentencepiece pieces)

# FLUX.1's scheduler (black-forest-labs/FLUX.1-dev scheduler/scheduler_config.json): rectified flow with the
# resolution-dependent ("dynamic") shift e^μ, μ on the line through (256 tokens, 0.5) and (4096 tokens, 1.15).
FLUX_SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)
# FLUX.1-schnell's scheduler (black-forest-labs/FLUX.1-schnell scheduler/scheduler_config.json): a static shift of 1,
# no dynamic shifting (FluxPipeline still computes μ; the scheduler ignores it).
FLUX_SCHNELL_SCHEDULER_CONFIG = {**FLUX_SCHEDULER_CONFIG, "shift": 1.0, "use_dynamic_shifting": False}
# Width of the tiny FLUX transformer's text tokens (T5's d_model; 4096 for the real T5-XXL).
FLUX_JOINT_DIM = 64

KINDS = ("sd15", "sdxl", "sd3", "flux")


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


def _vae(kind: Literal["sd15", "sdxl", "sd3", "flux"], resolution: int) -> AutoencoderKL:
    # 3 blocks -> 2 downsamplings -> vae_scale_factor 4. SD3's (and FLUX's) VAE: 16 latent channels, a shift as well
    # as a scale, no quant / post-quant 1x1 convs.
    flow = kind in VAE_SHIFT_FACTOR
    sd3 = dict(shift_factor=VAE_SHIFT_FACTOR.get(kind), use_quant_conv=False, use_post_quant_conv=False)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32),
        layers_per_block=1,
        latent_channels=SD3_LATENT_CHANNELS if flow else 4,
        norm_num_groups=8,
        sample_size=resolution,
        scaling_factor=VAE_SCALING_FACTOR[kind],
        **(sd3 if flow else {}),
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


def _sd3_transformer(resolution: int, *, sd35: bool) -> SD3Transformer2DModel:
    # 2 joint (MMDiT) blocks of width 4 heads x 8 = 32 over 2x2 latent patches. The pooled projection takes both CLIP
    # towers' pooled embeddings concatenated (32 + 32). SD3.5 adds RMS qk-norm and, in SD3.5-medium (MMDiT-X), a
    # second self-attention on the image tokens in its first blocks (`dual_attention_layers`).
    latent_side = resolution // 4
    return SD3Transformer2DModel(
        sample_size=latent_side,
        patch_size=2,
        in_channels=SD3_LATENT_CHANNELS,
        out_channels=SD3_LATENT_CHANNELS,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=SD3_JOINT_DIM,
        caption_projection_dim=32,
        pooled_projection_dim=2 * TEXT_PROJECTION_DIM,
        pos_embed_max_size=latent_side,  # in patches; the real models leave room for larger images too
        dual_attention_layers=(0,) if sd35 else (),
        qk_norm="rms_norm" if sd35 else None,
    )


def build_t5_tokenizer() -> T5Tokenizer:
    """A T5-style tokenizer built offline: a sentencepiece Unigram model (through `tokenizers`) over a tiny
    vocabulary of single characters and word-initial characters, with T5's special tokens `<pad>` = 0, `</s>` = 1,
    `<unk>` = 2, the metaspace pre-tokenizer and an `</s>` appended to every sequence.

    It tokenizes like the real T5 tokenizer in structure (ids of pieces, EOS, padding), not in ids: the real
    32,100-piece vocabulary ships only as a sentencepiece model, which this machine does not have.
    """
    chars = list("abcdefghijklmnopqrstuvwxyz") + list("ABCDEFGHIJKLMNOPQRSTUVWXYZ") + list("0123456789")
    punctuation = list(".,;:!?'\"-()&/")
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + c, -3.0) for c in chars[:26]]  # word-initial lower-case letters: preferred pieces
    vocab += [(c, -5.0) for c in chars + punctuation]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def _t5_encoder(vocab_size: int, d_model: int = SD3_JOINT_DIM) -> T5EncoderModel:
    # T5 v1.1 layout as in SD3's and FLUX's T5-XXL encoder (gated GELU feed-forward), hidden size = the joint dimension.
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=d_model,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
        )
    )


def _build_sd3(out_dir: Path, resolution: int, seed: int, *, t5: bool, sd35: bool) -> None:
    torch.manual_seed(seed)
    vae = _vae("sd3", resolution)
    torch.manual_seed(seed)
    transformer = _sd3_transformer(resolution, sd35=sd35)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(_text_config())
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_text_config())
    text_encoder_3 = tokenizer_3 = None
    if t5:
        tokenizer_3 = build_t5_tokenizer()
        torch.manual_seed(seed + 2)
        text_encoder_3 = _t5_encoder(len(tokenizer_3))
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=build_clip_tokenizer(pad_token="!"),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    pipe.save_pretrained(out_dir)


def _flux_transformer(*, schnell: bool = False) -> FluxTransformer2DModel:
    # 1 double-stream (MMDiT) block and 1 single-stream block of width 2 heads x 16 = 32 over the packed 2x2 latent
    # patches (16 channels x 4 = 64 inputs per token); rotary axes (4, 6, 6) sum to the head dim, as (16, 56, 56)
    # to FLUX.1's 128. The pooled projection takes CLIP-L's pooled output (32), the text tokens T5's (64); FLUX.1-dev's
    # guidance-distillation embedding is on (off for FLUX.1-schnell, which is timestep-distilled instead).
    return FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * SD3_LATENT_CHANNELS,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=FLUX_JOINT_DIM,
        pooled_projection_dim=TEXT_HIDDEN_SIZE,
        guidance_embeds=not schnell,
        axes_dims_rope=(4, 6, 6),
    )


def _build_flux(out_dir: Path, resolution: int, seed: int, *, schnell: bool) -> None:
    torch.manual_seed(seed)
    vae = _vae("flux", resolution)
    torch.manual_seed(seed)
    transformer = _flux_transformer(schnell=schnell)
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_text_config())
    tokenizer_2 = build_t5_tokenizer()
    torch.manual_seed(seed + 1)
    text_encoder_2 = _t5_encoder(len(tokenizer_2), d_model=FLUX_JOINT_DIM)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            **(FLUX_SCHNELL_SCHEDULER_CONFIG if schnell else FLUX_SCHEDULER_CONFIG)
        ),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=build_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipe.save_pretrained(out_dir)


def build_tiny_pipeline(
    out_dir: str | Path,
    kind: Literal["sd15", "sdxl", "sd3", "flux"],
    *,
    resolution: int = 64,
    seed: int = 0,
    t5: bool = False,
    sd35: bool = False,
    schnell: bool = False,
) -> Path:
    """Builds a tiny random-weight SD1.5, SDXL, SD3 or FLUX pipeline and saves it as a diffusers pipeline directory.

    The directory loads with `StableDiffusionPipeline.from_pretrained(out_dir)` (SD1.5, no safety checker),
    `StableDiffusionXLPipeline.from_pretrained(out_dir)` (SDXL), `StableDiffusion3Pipeline.from_pretrained(out_dir)`
    (SD3) or `FluxPipeline.from_pretrained(out_dir)` (FLUX), and with `models.loading.load_diffusion_model`. Weights
    are deterministic given `seed` (the RNG is reseeded before each module is constructed).

    Args:
        out_dir: directory to write (created if missing; existing component files are overwritten).
        kind: `"sd15"`, `"sdxl"`, `"sd3"` or `"flux"`.
        resolution: image side in pixels; must be a multiple of 8 (latents are `resolution // 4` wide and the
            UNet downsamples them once more / the SD3 and FLUX transformers cut them into 2x2 patches). For FLUX it
            is also the VAE's `sample_size`, which `DiffusionModel.resolution` reports as the native size.
        seed: RNG seed for the random weights.
        t5: SD3 only: include the third text encoder (a tiny `T5EncoderModel` with the offline `build_t5_tokenizer`);
            without it `text_encoder_3` / `tokenizer_3` are None and the pipeline feeds zeros in T5's place.
        sd35: SD3 only: the SD3.5 transformer (RMS qk-norm; a dual-attention first block as in SD3.5-medium).
        schnell: FLUX only: FLUX.1-schnell-shaped (no guidance embedding, static shift 1) instead of FLUX.1-dev.

    Returns:
        `out_dir` as a `Path`.

    Raises:
        ValueError: `kind` is not one of "sd15", "sdxl", "sd3", "flux", `resolution` is not a positive multiple of 8, or
            `t5` / `sd35` is set for a kind other than "sd3" (`schnell` other than "flux").
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if resolution <= 0 or resolution % 8 != 0:
        raise ValueError(f"resolution must be a positive multiple of 8, got {resolution}")
    if kind != "sd3" and (t5 or sd35):
        raise ValueError(f"t5 and sd35 apply to kind 'sd3' only, got kind {kind!r}")
    if kind != "flux" and schnell:
        raise ValueError(f"schnell applies to kind 'flux' only, got kind {kind!r}")
    out_dir = Path(out_dir)
    if kind == "flux":
        _build_flux(out_dir, resolution, seed, schnell=schnell)
        return out_dir
    if kind == "sd3":
        _build_sd3(out_dir, resolution, seed, t5=t5, sd35=sd35)
        return out_dir

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

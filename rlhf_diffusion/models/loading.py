"""Stable Diffusion 1.5 / SDXL / SD3 components from a diffusers pipeline directory or hub id; the LoRA policy on the
denoising network (the UNet; SD3's transformer).

One loader serves production checkpoints (`runwayml/stable-diffusion-v1-5`, `stabilityai/stable-diffusion-xl-base-1.0`
or a local copy) and the tiny random-weight pipelines the tests build with `models.tiny`. All loaded modules are
frozen; the only trainable parameters are the LoRA matrices that `attach_lora` injects into the UNet through peft
(diffusers' `PeftAdapterMixin`).

The policy and the reference policy share one UNet: the reference is the same UNet with the adapter disabled
(`lora_disabled`), so no second copy of the weights exists. Full fine-tuning (`model.finetune: full`, DDE's
setting) trains every UNet weight instead; the learner then keeps a frozen copy as `DiffusionModel.reference_unet`
(`add_reference_copy`), and `trainable_parameters` / `get_trainable_state` / `set_trainable_state` /
`export_trainable` treat both cases alike.

`export_lora` (in `models.lora`, with the reader of that file; re-exported here) writes the adapter in the diffusers
LoRA format, the file a stock pipeline reads with `pipe.load_lora_weights(dir)`.

SD3 / SD3.5 (`kind="sd3"`, a `StableDiffusion3Pipeline` directory): the denoising network is the
`SD3Transformer2DModel` (a rectified-flow velocity predictor), kept in `DiffusionModel.unet` so that the LoRA and
fine-tuning functions here serve it unchanged; the scheduler is the pipeline's `FlowMatchEulerDiscreteScheduler`.
Loading, prompt encoding, LoRA and its export work for SD3; the flow sampler (`diffusion/flow_sampling.py`) samples
it, and the final-pair methods and DDPO / GRPO train it (docs/algorithms.md §10(b), §10(c)).

FLUX.1 (`kind="flux"`, a `FluxPipeline` directory): the `FluxTransformer2DModel` in `DiffusionModel.unet`, CLIP-L
(pooled only) and T5 as the text encoders, the scheduler with FLUX's dynamic shift. Latents stay (B, 16, h, w) in
this package; `conditioning.predict_velocity` packs them into FLUX's 2x2-patch tokens for each call
(docs/algorithms.md §10(g)).
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    DDIMScheduler,
    DiffusionPipeline,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
from peft import LoraConfig
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import (
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5EncoderModel,
    T5Tokenizer,
)

from rlhf_diffusion.config import FLUX_DEFAULT_GUIDANCE
from rlhf_diffusion.models.lora import LORA_WEIGHT_NAME, _require_lora, export_lora
from rlhf_diffusion.models.sources import is_hub_id

__all__ = [
    "FLOW_KINDS",
    "LORA_WEIGHT_NAME",
    "DiffusionModel",
    "ModelLoadError",
    "add_reference_copy",
    "attach_lora",
    "export_lora",
    "export_trainable",
    "get_lora_state_dict",
    "get_trainable_state",
    "load_diffusion_model",
    "load_preview_decoder",
    "lora_disabled",
    "lora_parameters",
    "set_attention",
    "set_lora_state_dict",
    "set_trainable_state",
    "to_channels_last",
    "trainable_parameters",
]

# Pipeline subfolders each kind needs, with the class that loads each.
_COMPONENTS = {
    "sd15": {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "tokenizer": CLIPTokenizer,
        "scheduler": DDIMScheduler,
    },
    "sdxl": {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
        "tokenizer": CLIPTokenizer,
        "tokenizer_2": CLIPTokenizer,
        "scheduler": DDIMScheduler,
    },
    "sd3": {
        "transformer": SD3Transformer2DModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModelWithProjection,
        "text_encoder_2": CLIPTextModelWithProjection,
        "tokenizer": CLIPTokenizer,
        "tokenizer_2": CLIPTokenizer,
        "scheduler": FlowMatchEulerDiscreteScheduler,
    },
    "flux": {
        "transformer": FluxTransformer2DModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": T5EncoderModel,
        "tokenizer": CLIPTokenizer,
        "tokenizer_2": T5Tokenizer,  # = T5TokenizerFast in transformers 5, FluxPipeline's class
        "scheduler": FlowMatchEulerDiscreteScheduler,
    },
}
# Components a kind loads when model_index.json names them (SD3 runs without its T5 encoder: the pipeline, and
# `conditioning.encode_prompts`, then put zeros in place of the T5 tokens).
_OPTIONAL_COMPONENTS = {
    "sd15": {},
    "sdxl": {},
    "sd3": {"text_encoder_3": T5EncoderModel, "tokenizer_3": T5Tokenizer},
    "flux": {},
}
# The denoising network's subfolder per kind (kept in `DiffusionModel.unet` for all kinds).
_DENOISER = {"sd15": "unet", "sdxl": "unet", "sd3": "transformer", "flux": "transformer"}
_KINDS = ("sd15", "sdxl", "sd3", "flux")
# The flow-matching (velocity-predicting transformer) kinds: sampled by `diffusion/flow_sampling.py`.
FLOW_KINDS = ("sd3", "flux")

# DDIM settings a non-DDIM scheduler config may not state, where DDIMScheduler's own defaults (pixel-space x0
# clipping, ᾱ_prev = 1 at the last step) are wrong for latent diffusion; the SD / SDXL configs state these values.
_LATENT_DDIM_DEFAULTS = {"clip_sample": False, "set_alpha_to_one": False}


class ModelLoadError(Exception):
    """A pipeline directory or hub id could not be loaded; the message names the source and the missing piece."""


@dataclass
class DiffusionModel:
    """The components of a Stable Diffusion pipeline that training and sampling use.

    Attributes:
        kind: `"sd15"` (one CLIP text encoder), `"sdxl"` (two encoders, pooled embeds, micro-conditioning),
            `"sd3"` (SD3 / SD3.5: a flow-matching transformer, two CLIP encoders and optionally T5) or `"flux"`
            (FLUX.1: a flow-matching transformer on packed 2x2 latent patches, CLIP-L pooled + T5).
        unet: the trainable denoising network; carries the LoRA adapter once `attach_lora` ran. For SD1.5 / SDXL
            the noise-prediction UNet ε_θ(x_t, t, c) (`UNet2DConditionModel`); for SD3 the velocity-prediction
            `SD3Transformer2DModel` v_θ(x_σ, σ, c) (the pipeline's `transformer`; the name is kept so that the
            LoRA / fine-tuning functions serve both).
        vae: the latent autoencoder, always float32 (the SDXL VAE overflows in fp16). SD3's has 16 latent channels
            and a `shift_factor`: latents = (vae.encode(x) − shift_factor) · scaling_factor.
        text_encoders: `[text_encoder]` for SD1.5, `[text_encoder, text_encoder_2]` for SDXL, and for SD3 the two
            CLIP encoders with projection plus `text_encoder_3` (T5) when the pipeline has one.
        tokenizers: one tokenizer per text encoder, same order.
        scheduler: SD1.5 / SDXL: a `DDIMScheduler` built from the pipeline's scheduler config (noise schedule ᾱ_t);
            SD3: the pipeline's own `FlowMatchEulerDiscreteScheduler` (σ grid and shift; `diffusion.flow`).
        source: the directory or hub id the components were loaded from.
        force_zeros_for_empty_prompt: SDXL only: the unconditional (CFG) embedding is all zeros instead of the
            encoding of "" (the pipeline's `model_index.json` setting; True for SDXL base).
        preview_vae: an optional tiny decoder (TAESD `AutoencoderTiny`, float32) for cheap approximate decodes of
            intermediate x̂_0 (`sampling.preview_decoder`); None = previews use `vae`.
        reference_unet: full fine-tuning only: a frozen copy of the base UNet, the reference policy (with a LoRA
            the reference is `unet` with the adapter disabled and this stays None).
        flux_guidance: FLUX with `guidance_embeds` (FLUX.1-dev) only: the value its guidance-distillation embedding
            gets in every transformer call, sampling and training alike (FluxPipeline's `guidance_scale`, 3.5 by
            default); `conditioning.encode_prompts` puts it in the conditioning. Not classifier-free guidance.
        max_sequence_length: SD3 / FLUX: how many T5 tokens the text stream carries (the stock pipelines'
            `max_sequence_length` argument; zeros in SD3 without T5); None = their defaults, 256 (SD3) and 512
            (FLUX). A pipeline directory trained with another value says so in its `CALL_DEFAULTS_FILE`.
    """

    kind: Literal["sd15", "sdxl", "sd3", "flux"]
    unet: UNet2DConditionModel | SD3Transformer2DModel | FluxTransformer2DModel
    vae: AutoencoderKL
    text_encoders: list[nn.Module]
    tokenizers: list
    scheduler: DDIMScheduler | FlowMatchEulerDiscreteScheduler
    source: str
    force_zeros_for_empty_prompt: bool = True
    preview_vae: AutoencoderTiny | None = None
    reference_unet: UNet2DConditionModel | SD3Transformer2DModel | FluxTransformer2DModel | None = None
    flux_guidance: float = FLUX_DEFAULT_GUIDANCE
    max_sequence_length: int | None = None

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each side (8 for SD, 4 for the tiny models)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def resolution(self) -> int:
        """Native image side in pixels (512 for SD1.5, 1024 for SDXL, SD3 and FLUX). FLUX's transformer has no
        sample size: its VAE's `sample_size` (1024 for FLUX.1) stands for it."""
        if self.kind == "flux":
            return int(self.vae.config.sample_size)
        return self.unet.config.sample_size * self.vae_scale_factor

    @property
    def latent_channels(self) -> int:
        """C of the latents (B, C, h, w); FLUX's transformer reads 2x2 patches of them, 4 C inputs per token."""
        if self.kind == "flux":
            return self.unet.config.in_channels // 4
        return self.unet.config.in_channels

    @property
    def device(self) -> torch.device:
        """Device of the UNet (all components live on it)."""
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype of the UNet and text encoders (the VAE stays float32)."""
        return self.unet.dtype


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


def _read_pipeline_index(source: str, revision: str | None) -> dict:
    """Reads `model_index.json` of a local pipeline directory or a hub id."""
    path = Path(source).expanduser()
    if path.is_dir():
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise ModelLoadError(
                f"{source!r} is not a diffusers pipeline directory: model_index.json is missing (expected {index_file})"
            )
        try:
            return json.loads(index_file.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ModelLoadError(f"cannot read {index_file}: {err}") from err
    if path.exists():
        raise ModelLoadError(f"{source!r} is a file, not a diffusers pipeline directory")
    if not is_hub_id(source):
        raise ModelLoadError(f"pipeline directory {source!r} does not exist")
    try:  # "owner/name": a Hugging Face Hub id
        return dict(DiffusionPipeline.load_config(source, revision=revision))
    except Exception as err:  # noqa: BLE001 - hub errors come in many types; one clear message for all
        raise ModelLoadError(
            f"{source!r} is not a local directory, and loading model_index.json for it from the Hugging Face Hub "
            f"failed: {type(err).__name__}: {err}"
        ) from err


def _detect_kind(index: dict) -> Literal["sd15", "sdxl", "sd3", "flux"]:
    """SD3 iff the pipeline class is a StableDiffusion3 one or its transformer is an `SD3Transformer2DModel`; FLUX
    iff the pipeline class is a Flux one or its transformer a `FluxTransformer2DModel`; else SDXL iff the pipeline
    class says XL or the pipeline has a second text encoder; else SD1.5."""
    class_name = str(index.get("_class_name", ""))
    transformer_class = (index.get("transformer") or [None, None])[-1]
    if class_name.startswith("StableDiffusion3") or transformer_class == SD3Transformer2DModel.__name__:
        return "sd3"
    if class_name.startswith("Flux") or transformer_class == FluxTransformer2DModel.__name__:
        return "flux"
    has_text_encoder_2 = (index.get("text_encoder_2") or [None])[0] is not None
    return "sdxl" if ("XL" in class_name or has_text_encoder_2) else "sd15"


def pipeline_kind(source: str, revision: str | None = None) -> Literal["sd15", "sdxl", "sd3", "flux"]:
    """The kind of the pipeline at `source` (a directory or hub id), read from its model_index.json alone."""
    return _detect_kind(_read_pipeline_index(source, revision))


def _load_component(cls, source: str, subfolder: str, revision: str | None, index: dict, dtype: torch.dtype):
    """`cls.from_pretrained(source, subfolder=..., dtype)`, with one clear `ModelLoadError` when it fails."""
    if (index.get(subfolder) or [None])[0] is None:
        raise ModelLoadError(f"pipeline {source!r} has no {subfolder!r} component (model_index.json)")
    local = Path(source).expanduser()
    if local.is_dir() and not (local / subfolder).is_dir():
        raise ModelLoadError(f"pipeline directory {source!r} is missing the {subfolder!r} subfolder")
    try:
        if cls is DDIMScheduler:
            # Whatever scheduler the pipeline ships (PNDM for SD1.5, Euler for SDXL), sampling uses DDIM on the
            # same noise schedule; `from_config` keeps the shared keys (betas, offset, spacing, prediction type).
            config = dict(DDIMScheduler.load_config(source, subfolder=subfolder, revision=revision))
            for key, value in _LATENT_DDIM_DEFAULTS.items():
                config.setdefault(key, value)
            return DDIMScheduler.from_config(config)
        if cls in (CLIPTokenizer, T5Tokenizer, FlowMatchEulerDiscreteScheduler):
            return cls.from_pretrained(source, subfolder=subfolder, revision=revision)
        if issubclass(cls, (CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel)):  # transformers: `dtype`
            return cls.from_pretrained(source, subfolder=subfolder, revision=revision, dtype=dtype)
        return cls.from_pretrained(source, subfolder=subfolder, revision=revision, torch_dtype=dtype)
    except Exception as err:  # noqa: BLE001 - from_pretrained raises OSError, ValueError, EnvironmentError, ...
        raise ModelLoadError(
            f"cannot load {subfolder!r} ({cls.__name__}) from {source!r}: {type(err).__name__}: {err}"
        ) from err


def _freeze(module: nn.Module, device: torch.device) -> nn.Module:
    module.requires_grad_(False)
    module.eval()
    return module.to(device=device)


def load_diffusion_model(
    source: str,
    *,
    kind: Literal["auto", "sd15", "sdxl", "sd3", "flux"] = "auto",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    revision: str | None = None,
    max_sequence_length: int | None = None,
) -> DiffusionModel:
    """Loads the frozen components of an SD1.5, SDXL, SD3 / SD3.5 or FLUX.1 pipeline.

    Each component is loaded with `X.from_pretrained(source, subfolder=...)`, exactly as the stock pipeline would,
    from a local diffusers pipeline directory (e.g. one built by `models.tiny.build_tiny_pipeline`) or a Hugging Face
    Hub id. For SD1.5 / SDXL the scheduler is always a `DDIMScheduler` on the pipeline's noise schedule; for SD3 it
    is the pipeline's `FlowMatchEulerDiscreteScheduler`, its transformer goes to `DiffusionModel.unet`, and its T5
    encoder (`text_encoder_3`, `tokenizer_3`) is loaded when model_index.json names one.
    FLUX loads like SD3 (its transformer in `unet`), with `text_encoders = [CLIP-L, T5]`.

    Args:
        source: pipeline directory or hub id (`"stabilityai/stable-diffusion-xl-base-1.0"`).
        kind: `"auto"` reads `model_index.json` (SD3 iff the pipeline class is `StableDiffusion3*` or its
            transformer an `SD3Transformer2DModel`; FLUX iff it is `Flux*` or its transformer a
            `FluxTransformer2DModel`; else SDXL iff the pipeline class name contains "XL" or it has a
            `text_encoder_2`); `"sd15"` / `"sdxl"` / `"sd3"` / `"flux"` must agree with it.
        dtype: dtype of the denoising network and text encoders. The VAE is always float32.
        device: where all components are placed.
        revision: hub revision (branch, tag or commit); ignored for local directories.
        max_sequence_length: SD3 / FLUX T5 tokens (`DiffusionModel.max_sequence_length`); None = the value in the
            directory's `CALL_DEFAULTS_FILE` if it has one (the flow testbed's: 0), else the pipeline's default.

    Returns:
        The components, all with `requires_grad=False` and in eval mode.

    Raises:
        ValueError: `kind` is not one of "auto", "sd15", "sdxl", "sd3".
        ModelLoadError: the directory does not exist, has no model_index.json or lacks a component subfolder, the
            hub id cannot be resolved, a component fails to load, or `kind` disagrees with the pipeline.
    """
    if kind not in ("auto", *_KINDS):
        raise ValueError(f"kind must be 'auto', 'sd15', 'sdxl', 'sd3' or 'flux', got {kind!r}")
    source = str(source)
    device = torch.device(device)
    index = _read_pipeline_index(source, revision)
    detected = _detect_kind(index)
    if kind != "auto" and kind != detected:
        raise ModelLoadError(
            f"pipeline {source!r} is {detected!r} ({index.get('_class_name')}), but kind={kind!r} was requested"
        )

    components = dict(_COMPONENTS[detected])
    components.update(
        {name: cls for name, cls in _OPTIONAL_COMPONENTS[detected].items() if (index.get(name) or [None])[0]}
    )
    parts = {
        # The VAE stays float32: the SDXL VAE overflows in fp16, and decoding is a small share of the compute.
        name: _load_component(cls, source, name, revision, index, torch.float32 if name == "vae" else dtype)
        for name, cls in components.items()
    }
    origin = "max_sequence_length"
    if max_sequence_length is None:
        max_sequence_length = call_defaults(source).get("max_sequence_length")
        origin = f"{Path(source) / CALL_DEFAULTS_FILE}: max_sequence_length"
    if max_sequence_length is not None and (
        isinstance(max_sequence_length, bool) or not isinstance(max_sequence_length, int) or max_sequence_length < 0
    ):
        raise ModelLoadError(f"{origin} must be an integer >= 0, got {max_sequence_length!r}")
    has_t5 = detected == "flux" or "text_encoder_3" in parts  # FLUX's T5 is its text_encoder_2
    if max_sequence_length == 0 and has_t5:
        raise ModelLoadError("max_sequence_length 0 needs a pipeline without T5 (T5 cannot tokenize into 0 tokens)")
    encoder_names = [name for name in ("text_encoder", "text_encoder_2", "text_encoder_3") if name in parts]
    tokenizer_names = [name for name in ("tokenizer", "tokenizer_2", "tokenizer_3") if name in parts]
    return DiffusionModel(
        kind=detected,
        unet=_freeze(parts[_DENOISER[detected]], device),
        vae=_freeze(parts["vae"], device),
        text_encoders=[_freeze(parts[name], device) for name in encoder_names],
        tokenizers=[parts[name] for name in tokenizer_names],
        scheduler=parts["scheduler"],
        source=source,
        force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True)),
        max_sequence_length=max_sequence_length,
    )


# A JSON file beside model_index.json that diffusers ignores: the call arguments a pipeline directory was trained
# with where they differ from the stock pipeline's defaults (the flow testbed: {"max_sequence_length": 0}).
CALL_DEFAULTS_FILE = "call_defaults.json"


def call_defaults(source: str) -> dict:
    """The `CALL_DEFAULTS_FILE` of a local pipeline directory; {} for a hub id or a directory without one."""
    path = Path(source) / CALL_DEFAULTS_FILE
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ModelLoadError(f"{path}: unreadable ({error})") from None
    if not isinstance(values, dict):
        raise ModelLoadError(f"{path}: expected a JSON object, got {type(values).__name__}")
    return values


def load_preview_decoder(path: str | Path, model: DiffusionModel) -> AutoencoderTiny:
    """Loads a TAESD-format `AutoencoderTiny` directory (float32, frozen, on the model's device) for previews.

    Raises:
        ModelLoadError: it cannot be loaded, or its latent channels or upsampling factor differ from the
            pipeline's VAE (its images would not match the full decoder's), naming `sampling.preview_decoder`.
    """
    try:
        decoder = AutoencoderTiny.from_pretrained(str(path), torch_dtype=torch.float32)
    except Exception as err:  # noqa: BLE001 - from_pretrained raises OSError, ValueError, ...
        raise ModelLoadError(
            f"sampling.preview_decoder: cannot load an AutoencoderTiny from {str(path)!r}: {type(err).__name__}: {err}"
        ) from err
    config = decoder.config
    scale = config.upsampling_scaling_factor ** (len(config.decoder_block_out_channels) - 1)
    if config.latent_channels != model.vae.config.latent_channels or scale != model.vae_scale_factor:
        raise ModelLoadError(
            f"sampling.preview_decoder {str(path)!r} decodes {config.latent_channels}-channel latents with "
            f"upsampling x{scale}, but the pipeline's VAE has {model.vae.config.latent_channels} channels and "
            f"x{model.vae_scale_factor}"
        )
    return _freeze(decoder, model.device)


# --------------------------------------------------------------------------------------------------------------------
# Speed options (same outputs up to float rounding)
# --------------------------------------------------------------------------------------------------------------------

# `model.attention` name -> diffusers attention processor class.
_ATTENTION_PROCESSORS = {"sdpa": AttnProcessor2_0, "default": AttnProcessor}


def set_attention(
    unet: UNet2DConditionModel | SD3Transformer2DModel | FluxTransformer2DModel, attention: Literal["sdpa", "default"]
) -> None:
    """Gives every attention layer of the UNet the processor `attention` names (in place).

    `"sdpa"` = `AttnProcessor2_0` (torch `scaled_dot_product_attention`, fused kernels on CUDA); `"default"` =
    `AttnProcessor` (explicit softmax(QKᵀ/√d)·V). Processors only compute attention from the module's q/k/v/out
    projections, so a LoRA on those Linear layers works the same under either.

    SD3's and FLUX's transformers keep their joint-attention processors (diffusers' `JointAttnProcessor2_0` /
    `FluxAttnProcessor`, SDPA already): `"sdpa"` leaves them as they are, and `"default"` is refused (the UNet
    processors cannot compute joint attention).

    Raises:
        ValueError: `attention` is not a known name, or `"default"` for a network that is not a UNet.
    """
    if attention not in _ATTENTION_PROCESSORS:
        raise ValueError(f"model.attention must be one of {sorted(_ATTENTION_PROCESSORS)}, got {attention!r}")
    if isinstance(unet, (SD3Transformer2DModel, FluxTransformer2DModel)):
        if attention != "sdpa":
            raise ValueError(
                f"model.attention {attention!r} is for UNets; SD3's and FLUX's transformers support 'sdpa' only"
            )
        return
    unet.set_attn_processor(_ATTENTION_PROCESSORS[attention]())


def to_channels_last(model: DiffusionModel) -> None:
    """Stores the 4-D weights of the UNet, the VAE and the preview decoder (if any) in the channels_last memory
    format (in place; same values)."""
    for module in (model.unet, model.vae, model.preview_vae):
        if module is not None:
            module.to(memory_format=torch.channels_last)


# --------------------------------------------------------------------------------------------------------------------
# LoRA on the UNet (peft through diffusers' PeftAdapterMixin)
# --------------------------------------------------------------------------------------------------------------------


def _lora_layers(unet: nn.Module) -> list[LoraLayer]:
    return [module for module in unet.modules() if isinstance(module, LoraLayer)]


def attach_lora(
    unet: UNet2DConditionModel,
    *,
    rank: int,
    alpha: float,
    target_modules: list[str],
    init: Literal["gaussian", "default"] = "gaussian",
    adapter_name: str = "default",
) -> None:
    """Injects a LoRA adapter W + (α/r)·B·A into the UNet's target layers and makes only it trainable.

    B starts at zero under both inits, so the adapted UNet initially equals the base UNet; A is drawn from
    N(0, (1/r)²) (`"gaussian"`) or Kaiming-uniform (`"default"`, peft's default).

    Args:
        unet: the UNet to adapt (in place).
        rank: r, the LoRA rank.
        alpha: α; the update is scaled by α / r.
        target_modules: module-name suffixes to adapt, e.g. `["to_q", "to_k", "to_v", "to_out.0"]`.
        init: initialisation of A.
        adapter_name: peft adapter name.

    Raises:
        ValueError: rank or alpha not positive, init unknown, or no UNet module matches `target_modules`.
    """
    if rank <= 0:
        raise ValueError(f"LoRA rank must be positive, got {rank}")
    if alpha <= 0:
        raise ValueError(f"LoRA alpha must be positive, got {alpha}")
    if init not in ("gaussian", "default"):
        raise ValueError(f"LoRA init must be 'gaussian' or 'default', got {init!r}")
    if not target_modules:
        raise ValueError("LoRA target_modules is empty")
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        init_lora_weights="gaussian" if init == "gaussian" else True,
        target_modules=list(target_modules),
    )
    unet.requires_grad_(False)
    try:
        unet.add_adapter(config, adapter_name=adapter_name)
    except ValueError as err:
        if "not found in the base model" in str(err) or "Target modules" in str(err):
            raise ValueError(f"LoRA target_modules {list(target_modules)} match no module of the UNet: {err}") from err
        raise
    # add_adapter marks the active adapter trainable; make sure nothing else is.
    for name, param in unet.named_parameters():
        param.requires_grad_(".lora_" in name and f".{adapter_name}." in name)
    if not lora_parameters(unet):
        raise ValueError(f"LoRA target_modules {list(target_modules)} match no module of the UNet")


def lora_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """The LoRA parameters (lora_A / lora_B of every adapted layer), in module order: what the optimizer trains."""
    return [param for name, param in unet.named_parameters() if ".lora_" in name]


def _lora_parameter_map(unet: nn.Module, adapter_name: str) -> dict[str, nn.Parameter]:
    """peft state-dict key → the adapter's parameter, e.g. `….to_q.lora_A.weight` → the parameter named
    `….to_q.lora_A.<adapter>.weight`. The same keys `get_peft_model_state_dict` produces (tested), read straight
    from `named_parameters` so that a publish never walks the whole (frozen, multi-GB) state dict."""
    marker = f".{adapter_name}."
    out = {}
    for name, param in unet.named_parameters():
        if (".lora_A." in name or ".lora_B." in name) and marker in name:
            out[name.replace(marker, ".", 1)] = param
    return out


def get_lora_state_dict(unet: nn.Module, *, adapter_name: str = "default") -> dict[str, torch.Tensor]:
    """The adapter weights in peft's key format, as detached CPU float32 clones.

    Keys look like `down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight` (no adapter name),
    the format `set_lora_state_dict` reads back.
    """
    _require_lora(unet, adapter_name)
    return {
        key: param.detach().to(device="cpu", dtype=torch.float32).clone()
        for key, param in _lora_parameter_map(unet, adapter_name).items()
    }


def set_lora_state_dict(unet: nn.Module, state: dict[str, torch.Tensor], *, adapter_name: str = "default") -> None:
    """Copies adapter weights (peft key format, as from `get_lora_state_dict`) into the UNet's LoRA in place.

    The parameter objects are kept (values are copied, cast to the parameter's dtype and device), so an optimizer
    holding them stays valid.

    Raises:
        ValueError: the UNet has no such adapter, or `state` has missing / unexpected keys or wrong shapes.
    """
    _require_lora(unet, adapter_name)
    expected = _lora_parameter_map(unet, adapter_name)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"LoRA state dict does not match adapter {adapter_name!r}: {len(missing)} missing keys "
            f"{missing[:3]}{'...' if len(missing) > 3 else ''}, {len(unexpected)} unexpected keys "
            f"{unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    wrong_shapes = [
        f"{key}: got {tuple(state[key].shape)}, expected {tuple(param.shape)}"
        for key, param in expected.items()
        if tuple(state[key].shape) != tuple(param.shape)
    ]
    if wrong_shapes:
        raise ValueError(f"LoRA state dict has wrong shapes: {wrong_shapes[:3]}")
    with torch.no_grad():
        for key, param in expected.items():
            param.copy_(state[key])


@contextmanager
def lora_disabled(unet: nn.Module) -> Iterator[nn.Module]:
    """Within the block the UNet computes the reference policy: the base weights, every adapter disabled.

    On exit (also on an exception) the adapters are re-enabled if they were enabled before, and every LoRA
    parameter gets back its `requires_grad` flag (peft clears it when disabling). A UNet without adapters is the
    base model already; the block then changes nothing.

    Yields:
        The same UNet.
    """
    layers = _lora_layers(unet)
    if not layers:
        yield unet
        return
    was_disabled = layers[0].disable_adapters
    requires_grad = {name: param.requires_grad for name, param in unet.named_parameters() if ".lora_" in name}
    unet.disable_adapters()
    try:
        yield unet
    finally:
        if not was_disabled:
            unet.enable_adapters()
        for name, param in unet.named_parameters():
            if name in requires_grad:
                param.requires_grad_(requires_grad[name])


# --------------------------------------------------------------------------------------------------------------------
# LoRA or full fine-tuning, alike
# --------------------------------------------------------------------------------------------------------------------

# Directory (inside a run or a checkpoint) that holds a fully fine-tuned UNet in the diffusers format.
UNET_EXPORT_DIR = "unet"


def add_reference_copy(model: DiffusionModel, dtype: torch.dtype | None = None) -> None:
    """Prepares `model` for full fine-tuning: the UNet becomes trainable float32 master weights (the loss
    forward may still run under autocast) and a frozen copy of the base weights, in `dtype` (default the UNet's
    loaded dtype), becomes `model.reference_unet`."""
    if _lora_layers(model.unet):
        raise ValueError("full fine-tuning needs a UNet without a LoRA adapter")
    reference = copy.deepcopy(model.unet).to(dtype=dtype or model.unet.dtype)
    reference.requires_grad_(False).eval()
    model.reference_unet = reference
    model.unet.to(torch.float32).requires_grad_(True)


def trainable_parameters(unet: nn.Module) -> list[nn.Parameter]:
    """What the optimizer trains: the LoRA parameters when an adapter is attached, else every UNet parameter."""
    if _lora_layers(unet):
        return lora_parameters(unet)
    return list(unet.parameters())


def get_trainable_state(unet: nn.Module, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """The trained weights as detached CPU clones: the LoRA (peft keys, always float32) or, for full fine-tuning,
    the whole UNet state dict in `dtype` (samplers take it in their `model.dtype`, which halves a bf16 publish)."""
    if _lora_layers(unet):
        return get_lora_state_dict(unet)
    return {
        key: value.detach().to(device="cpu", dtype=dtype if value.is_floating_point() else value.dtype).clone()
        for key, value in unet.state_dict().items()
    }


def set_trainable_state(unet: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copies weights from `get_trainable_state` into `unet` in place (LoRA, or the whole UNet, strictly)."""
    if _lora_layers(unet):
        set_lora_state_dict(unet, state)
        return
    result = unet.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"UNet state dict does not match the UNet: {len(result.missing_keys)} missing keys "
            f"{result.missing_keys[:3]}, {len(result.unexpected_keys)} unexpected keys {result.unexpected_keys[:3]} "
            "(a LoRA state for a fully fine-tuned run, or the other way round?)"
        )


def export_trainable(model: DiffusionModel, out_dir: str | Path) -> dict[str, bytes]:
    """The run's deliverable as {relative path: file bytes}: `lora/pytorch_lora_weights.safetensors` (see
    `export_lora`) or, for full fine-tuning, the diffusers UNet directory `unet/config.json` +
    `unet/diffusion_pytorch_model.safetensors` (float32), which a stock pipeline takes as
    `UNet2DConditionModel.from_pretrained(dir, subfolder="unet")`. `out_dir` is a scratch directory."""
    out_dir = Path(out_dir)
    if _lora_layers(model.unet):
        path = export_lora(model, out_dir / "lora")
        return {f"lora/{path.name}": path.read_bytes()}
    model.unet.save_pretrained(out_dir / UNET_EXPORT_DIR, safe_serialization=True)
    return {
        f"{UNET_EXPORT_DIR}/{p.name}": p.read_bytes()
        for p in sorted((out_dir / UNET_EXPORT_DIR).iterdir())
        if p.is_file()
    }

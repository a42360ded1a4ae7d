"""Model loading, LoRA handling, text conditioning, model sources and tiny test pipelines for SD1.5 / SDXL / SD3.

The names below are imported from their submodules on first use, so that `models.sources` (torch-free; config
validation uses it) can be imported without loading torch and diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlhf_diffusion.models.conditioning import (
        TextConditioning,
        encode_negative,
        encode_prompts,
        predict_noise,
        predict_noise_cfg,
        predict_velocity,
    )
    from rlhf_diffusion.models.loading import (
        DiffusionModel,
        ModelLoadError,
        attach_lora,
        get_lora_state_dict,
        load_diffusion_model,
        lora_disabled,
        lora_parameters,
        set_lora_state_dict,
    )
    from rlhf_diffusion.models.lora import LORA_WEIGHT_NAME, LoraFile, LoraFormatError, export_lora, read_lora_file
    from rlhf_diffusion.models.sources import resolve_source
    from rlhf_diffusion.models.tiny import build_clip_tokenizer, build_tiny_pipeline

# name -> the submodule that defines it
_EXPORTS = {
    "TextConditioning": "conditioning",
    "encode_negative": "conditioning",
    "encode_prompts": "conditioning",
    "predict_noise": "conditioning",
    "predict_noise_cfg": "conditioning",
    "predict_velocity": "conditioning",
    "DiffusionModel": "loading",
    "ModelLoadError": "loading",
    "attach_lora": "loading",
    "get_lora_state_dict": "loading",
    "load_diffusion_model": "loading",
    "lora_disabled": "loading",
    "lora_parameters": "loading",
    "set_lora_state_dict": "loading",
    "LORA_WEIGHT_NAME": "lora",
    "LoraFile": "lora",
    "LoraFormatError": "lora",
    "export_lora": "lora",
    "read_lora_file": "lora",
    "resolve_source": "sources",
    "build_clip_tokenizer": "tiny",
    "build_tiny_pipeline": "tiny",
}

__all__ = [
    "LORA_WEIGHT_NAME",
    "DiffusionModel",
    "LoraFile",
    "LoraFormatError",
    "ModelLoadError",
    "TextConditioning",
    "attach_lora",
    "build_clip_tokenizer",
    "build_tiny_pipeline",
    "encode_negative",
    "encode_prompts",
    "export_lora",
    "get_lora_state_dict",
    "load_diffusion_model",
    "lora_disabled",
    "lora_parameters",
    "predict_noise",
    "predict_noise_cfg",
    "predict_velocity",
    "read_lora_file",
    "resolve_source",
    "set_lora_state_dict",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value

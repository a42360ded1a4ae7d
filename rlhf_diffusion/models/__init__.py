"""Model loading, LoRA handling, text conditioning and tiny test pipelines for SD1.5 / SDXL."""

from rlhf_diffusion.models.conditioning import (
    TextConditioning,
    encode_negative,
    encode_prompts,
    predict_noise,
    predict_noise_cfg,
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
from rlhf_diffusion.models.tiny import build_clip_tokenizer, build_tiny_pipeline

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
    "read_lora_file",
    "set_lora_state_dict",
]

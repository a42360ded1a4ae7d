"""Loading the policy every actor holds: the pipeline from `model.pretrained` plus the configured LoRA adapter (or,
for `model.finetune: full`, the bare UNet, with a frozen reference copy in the learner).

Samplers and the learner call `load_policy` with the same config, so their UNets are identical (same base weights,
same LoRA init drawn from a seed derived from `config.seed`) before the learner's first published weights arrive.
"""

from __future__ import annotations

import torch

from rlhf_diffusion.config import RunConfig
from rlhf_diffusion.models.loading import (
    DiffusionModel,
    ModelLoadError,
    add_reference_copy,
    attach_lora,
    load_diffusion_model,
    load_preview_decoder,
    set_attention,
    to_channels_last,
)
from rlhf_diffusion.models.sources import TINY_PREFIX, resolve_source
from rlhf_diffusion.seeding import derive_seed

# SD3 pipelines load (models/loading.py) and their LoRA exports, but no sampler or method runs on a flow model yet.
NOT_TRAINABLE_YET = (
    "{source!r} is an SD3 (flow-matching) pipeline: it loads and a LoRA for it exports, but training runs on SD1.5 "
    "and SDXL pipelines only for now (no flow sampler yet)"
)

__all__ = ["DTYPES", "TINY_PREFIX", "load_policy", "resolve_device", "resolve_model_source"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LORA_INIT_STREAM = 4
# The name trainer.py and evaluate.py import; one resolver for every model and reward path (models/sources.py).
resolve_model_source = resolve_source


def resolve_device(name: str) -> torch.device:
    """ "auto" → CUDA when this process sees a GPU (a Ray actor sees one only if it reserved one), else CPU;
    "cuda" without a visible GPU is an error naming `device`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config device: 'cuda' was requested but no CUDA device is visible")
    return torch.device(name)


def load_policy(config: RunConfig, source: str, device: torch.device, *, for_training: bool = False) -> DiffusionModel:
    """The pipeline at `source` (a directory or hub id, see `models.sources.resolve_source`) with the configured LoRA on
    its UNet; the LoRA's A matrices are drawn from a seed derived from `config.seed` (B = 0, so the policy starts
    equal to the base model). The UNet gets the `model.attention` processor, with `model.channels_last` the
    UNet and VAE (LoRA included) are stored channels_last, and `sampling.preview_decoder` is loaded as
    `model.preview_vae`.

    With `model.finetune: full` no LoRA is attached; `for_training` (the learner) then makes the UNet trainable
    float32 weights and keeps a frozen reference copy in `model.dtype` (samplers need neither)."""
    model = load_diffusion_model(
        source, kind=config.model.kind, dtype=DTYPES[config.model.dtype], device=device, revision=config.model.revision
    )
    if model.kind == "sd3":
        raise ModelLoadError(f"model.pretrained: {NOT_TRAINABLE_YET.format(source=source)}")
    set_attention(model.unet, config.model.attention)
    if config.model.finetune == "full":
        if for_training:
            add_reference_copy(model, DTYPES[config.model.dtype])
    else:
        lora = config.model.lora
        rng_state = torch.random.get_rng_state()
        torch.manual_seed(derive_seed(config.seed, LORA_INIT_STREAM))
        try:
            attach_lora(
                model.unet, rank=lora.rank, alpha=lora.alpha, target_modules=list(lora.target_modules), init=lora.init
            )
        finally:
            torch.random.set_rng_state(rng_state)
    if config.sampling.preview_decoder is not None:
        model.preview_vae = load_preview_decoder(config.sampling.preview_decoder, model)
    if config.model.channels_last:
        to_channels_last(model)
    return model

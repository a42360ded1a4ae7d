"""The diffusers LoRA file format, written and read back: one `pytorch_lora_weights.safetensors` per adapter.

`export_lora` writes a UNet's adapter the way `StableDiffusionPipeline.save_lora_weights` /
`StableDiffusionXLPipeline.save_lora_weights` do (the file a stock pipeline reads with
`pipe.load_lora_weights(dir)`), and an SD3 (FLUX) transformer's adapter as
`StableDiffusion3Pipeline.save_lora_weights` (`FluxPipeline.save_lora_weights`) does (`transformer.`-prefixed
keys); `read_lora_file` reads either file back (weights in peft key format and the `peft.LoraConfig` arguments),
which is how `python -m rlhf_diffusion.evaluate` loads a trained LoRA.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from peft import get_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from safetensors import SafetensorError, safe_open
from torch import nn

if TYPE_CHECKING:
    from rlhf_diffusion.models.loading import DiffusionModel

__all__ = [
    "LORA_METADATA_KEY",
    "LORA_WEIGHT_NAME",
    "LoraFile",
    "LoraFormatError",
    "export_lora",
    "read_lora_file",
]

# File name diffusers' `save_lora_weights` writes and `load_lora_weights` looks for.
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
# The diffusers LoRA metadata key (`save_lora_weights(..., unet_lora_adapter_metadata=...)`).
LORA_METADATA_KEY = "lora_adapter_metadata"
# peft LoraConfig fields that shape the forward pass; the rest of the saved config (init, task, paths) is dropped.
_LORA_CONFIG_FIELDS = (
    "r",
    "lora_alpha",
    "target_modules",
    "exclude_modules",
    "rank_pattern",
    "alpha_pattern",
    "use_rslora",
    "fan_in_fan_out",
    "layers_to_transform",
    "layers_pattern",
)
_LORA_KEY_RE = re.compile(r"^(?P<component>unet|transformer)\.(?P<module>.+)\.(?P<part>lora_A|lora_B)\.weight$")


class LoraFormatError(ValueError):
    """A LoRA file that cannot be read or is not a UNet LoRA in the diffusers format; the message starts with the
    file's path."""


# --------------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------------


def _require_lora(unet: nn.Module, adapter_name: str) -> None:
    if adapter_name not in (getattr(unet, "peft_config", None) or {}):
        attached = list((getattr(unet, "peft_config", None) or {}).keys())
        raise ValueError(f"the UNet has no LoRA adapter {adapter_name!r} (attached: {attached}); call attach_lora")


def _exportable_lora_state_dict(unet: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """peft-format adapter weights with each layer's α / r scaling folded into lora_B (so the export's α = r)."""
    scaling = {
        name: module.scaling[adapter_name]
        for name, module in unet.named_modules()
        if isinstance(module, LoraLayer) and adapter_name in module.scaling
    }
    state = {}
    for key, value in get_peft_model_state_dict(unet, adapter_name=adapter_name).items():
        value = value.detach().to("cpu")
        if ".lora_B." in key:  # ΔW = (α/r)·B·A  ->  B' = (α/r)·B, α' = r
            value = value * scaling[key.split(".lora_B.")[0]]
        state[key] = value.contiguous()
    return state


def export_lora(model: DiffusionModel, out_dir: str | Path, *, adapter_name: str = "default") -> Path:
    """Writes the UNet's LoRA as a diffusers LoRA file, loadable with a stock `pipe.load_lora_weights(out_dir)`.

    The file is what `StableDiffusionPipeline.save_lora_weights` (SD1.5) / `StableDiffusionXLPipeline.
    save_lora_weights` (SDXL) write: `unet.`-prefixed peft-style keys (`….to_q.lora_A.weight`, `….lora_B.weight`)
    plus the adapter's `LoraConfig` as safetensors metadata. For SD3 (`model.unet` is the transformer) it is what
    `StableDiffusion3Pipeline.save_lora_weights` writes: the same with `transformer.`-prefixed keys (`read_lora_file`
    reads both back); for FLUX what `FluxPipeline.save_lora_weights` writes, the same `transformer.` keys. Two
    choices make it load the same everywhere:

    - keys stay in peft naming for every target module: diffusers' loader converts the legacy `lora.down` /
      `lora.up` names only when the *first* key has them, so a mix (which `convert_state_dict_to_diffusers`
      produces when targets go beyond to_q/to_k/to_v/to_out.0) would silently drop layers;
    - each layer's scale α / r is folded into lora_B and the metadata records α = r, so loaders that ignore the
      metadata (they assume α = r) rebuild the same ΔW = (α/r)·B·A.

    The file is written in a temporary directory beside `out_dir` and moved into place with `os.replace`, so
    readers never see a partial file.

    Args:
        model: the model whose UNet carries the adapter.
        out_dir: directory to write (created if missing; other files in it are left alone).
        adapter_name: which adapter to export.

    Returns:
        Path of the written `out_dir/pytorch_lora_weights.safetensors`.

    Raises:
        ValueError: the UNet has no such adapter, or `out_dir` is an existing file.
    """
    unet = model.unet
    _require_lora(unet, adapter_name)
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"LoRA export path {out_dir} exists and is not a directory")
    unet_lora_layers = _exportable_lora_state_dict(unet, adapter_name)
    metadata = unet.peft_config[adapter_name].to_dict()
    metadata["lora_alpha"] = metadata["r"]  # the scale is folded into lora_B
    metadata["alpha_pattern"] = dict(metadata.get("rank_pattern") or {})
    if model.kind in ("sd3", "flux"):
        save_lora_weights = (FluxPipeline if model.kind == "flux" else StableDiffusion3Pipeline).save_lora_weights
        layers = {"transformer_lora_layers": unet_lora_layers, "transformer_lora_adapter_metadata": metadata}
    else:
        pipeline_cls = StableDiffusionXLPipeline if model.kind == "sdxl" else StableDiffusionPipeline
        save_lora_weights = pipeline_cls.save_lora_weights
        layers = {"unet_lora_layers": unet_lora_layers, "unet_lora_adapter_metadata": metadata}

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        save_lora_weights(
            tmp_dir,
            **layers,
            weight_name=LORA_WEIGHT_NAME,
            safe_serialization=True,
        )
        out_dir.mkdir(exist_ok=True)
        target = out_dir / LORA_WEIGHT_NAME
        os.replace(tmp_dir / LORA_WEIGHT_NAME, target)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return target


# --------------------------------------------------------------------------------------------------------------------
# Reading back
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoraFile:
    """A UNet (or SD3 transformer) LoRA read from a diffusers-format safetensors file (what `export_lora` writes).

    Attributes:
        path: the file.
        state: peft-format weights without the `unet.` / `transformer.` prefix (`<module>.lora_A.weight`,
            `<module>.lora_B.weight`), the format `models.loading.set_lora_state_dict` reads.
        config: the `peft.LoraConfig` keyword arguments that shape the forward pass: from the file's
            `lora_adapter_metadata` when present, else inferred as diffusers does (r from the lora_A shapes,
            α = r, target modules = the adapted modules' full names).
        from_metadata: whether `config` came from the file's metadata.
        component: the network the file adapts: "unet" (SD1.5 / SDXL) or "transformer" (SD3 / SD3.5).
    """

    path: Path
    state: dict[str, Any]
    config: dict[str, Any]
    from_metadata: bool
    component: str = "unet"


def read_lora_file(path: str | Path) -> LoraFile:
    """Reads a UNet or SD3-transformer LoRA file written by `export_lora` (or diffusers' `save_lora_weights` for a
    UNet or an SD3 transformer: `unet.` / `transformer.` keys, one of the two per file).

    Args:
        path: the `.safetensors` file (see `resolve_lora_path` for directories).

    Raises:
        LoraFormatError: not a safetensors file, keys that are not `unet.<module>.lora_A/B.weight` (or all
            `transformer.<module>.lora_A/B.weight`), a module with
            only one of A / B, unreadable metadata, or LoRA features evaluation does not support (DoRA, biases).
            The message starts with the file's path.
    """
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise LoraFormatError(f"{path}: not a readable safetensors file ({type(error).__name__}: {error})") from None
    if not tensors:
        raise LoraFormatError(f"{path}: holds no tensors")
    bad = sorted(key for key in tensors if not _LORA_KEY_RE.match(key))
    if bad:
        raise LoraFormatError(
            f"{path}: not a UNet LoRA in diffusers/peft format: {len(bad)} of {len(tensors)} keys are not "
            f"'unet.<module>.lora_A.weight' / 'unet.<module>.lora_B.weight' (e.g. {', '.join(bad[:3])}); "
            "expected a file written by export_lora or diffusers' save_lora_weights"
        )
    components = sorted({_LORA_KEY_RE.match(key)["component"] for key in tensors})
    if len(components) > 1:
        raise LoraFormatError(f"{path}: mixes unet. and transformer. keys; a LoRA file adapts one network")
    component = components[0]
    parts: dict[str, set[str]] = {}
    for key in tensors:
        match = _LORA_KEY_RE.match(key)
        parts.setdefault(match["module"], set()).add(match["part"])
    half = sorted(module for module, found in parts.items() if found != {"lora_A", "lora_B"})
    if half:
        raise LoraFormatError(f"{path}: {len(half)} modules have only one of lora_A / lora_B (e.g. {half[0]})")
    state = {key.removeprefix(f"{component}."): value for key, value in tensors.items()}
    if LORA_METADATA_KEY in metadata:
        config = _config_from_metadata(path, metadata[LORA_METADATA_KEY], component)
        from_metadata = True
    else:
        config = _infer_config(state)
        from_metadata = False
    return LoraFile(path=path, state=state, config=config, from_metadata=from_metadata, component=component)


def _config_from_metadata(path: Path, text: str, component: str = "unet") -> dict[str, Any]:
    try:
        saved = json.loads(text)
    except json.JSONDecodeError as error:
        raise LoraFormatError(f"{path}: its {LORA_METADATA_KEY} metadata is not JSON: {error}") from None
    if not isinstance(saved, dict):
        raise LoraFormatError(f"{path}: its {LORA_METADATA_KEY} metadata is not a JSON object")
    saved = {key.removeprefix(f"{component}."): value for key, value in saved.items()}
    if "r" not in saved or "lora_alpha" not in saved or not saved.get("target_modules"):
        raise LoraFormatError(f"{path}: its {LORA_METADATA_KEY} metadata lacks r / lora_alpha / target_modules")
    unsupported = [name for name in ("use_dora", "lora_bias") if saved.get(name)]
    if saved.get("bias", "none") != "none":
        unsupported.append(f"bias={saved['bias']!r}")
    if unsupported:
        raise LoraFormatError(f"{path}: LoRA features that evaluation does not load: {', '.join(unsupported)}")
    config = {name: saved[name] for name in _LORA_CONFIG_FIELDS if saved.get(name) is not None}
    if isinstance(config["target_modules"], str):  # peft allows a regex string
        return config
    config["target_modules"] = sorted(config["target_modules"])
    return config


def _infer_config(state: dict[str, Any]) -> dict[str, Any]:
    """diffusers' rule for a file without metadata: r from the lora_A shapes, α = r, targets = the modules."""
    ranks = {
        key.removesuffix(".lora_A.weight"): int(value.shape[0])
        for key, value in state.items()
        if key.endswith(".lora_A.weight")
    }
    rank = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {module: r for module, r in ranks.items() if r != rank}
    return {
        "r": rank,
        "lora_alpha": rank,
        "target_modules": sorted(ranks),
        "rank_pattern": pattern,
        "alpha_pattern": dict(pattern),
    }

"""Human Preference Score v2 / v2.1 (Wu et al. 2023, github.com/tgxs002/HPSv2; docs/rewards.md §2.4), run on mainline
`open_clip` (no dependency on the `hpsv2` package, whose pins clash with ours).

Real weights: hub repo `xswu/HPSv2` (Apache-2.0), files `HPS_v2_compressed.pt` (version "v2.0") and
`HPS_v2.1_compressed.pt` (version "v2.1"), each ≈ 1.97 GB: a torch file `{'state_dict': ...}` with the keys of
open_clip's `ViT-H-14` (986M parameters; the keys of HPSv2's vendored open_clip and of open_clip 3.3 are identical).
They load with `torch.load(weights_only=True)` through `open_clip.load_checkpoint(strict=True)`.

Score (differentiable):

    x  = ResizeMaxSize(224): resize the LONGEST side to 224 (bicubic, antialiased), zero-pad to 224 × 224
         (before normalisation), OpenAI mean/std — HPSv2's evaluation transform; a square image is plainly resized
    hps = cos(E_img(x), E_txt(prompt)) = ê·t̂           raw cosine, NO logit scale

with the prompt tokenised by open_clip's bundled CLIP BPE tokenizer (77 tokens, truncated).

Value range: cosine in [−1, 1]; SD images of their prompts score ≈ 0.25–0.28 (HPSv2 benchmark ×100: v2.0 SD1.4
26.95, SD2.0 27.17; v2.1 SD1.4 25.35, SD2.0 26.38). v2.0 and v2.1 scores are not comparable with each other.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import open_clip
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlhf_diffusion.models.sources import is_hub_id
from rlhf_diffusion.rewards.base import RewardModel, register_reward
from rlhf_diffusion.rewards.clip_score import resolve_dtype
from rlhf_diffusion.rewards.preprocess import CLIP_MEAN, CLIP_STD, normalize, resize_longest_and_pad

__all__ = ["HPS_FILENAMES", "HPS_HUB_REPO", "HPSv2", "load_open_clip_model"]

HPS_HUB_REPO = "xswu/HPSv2"
HPS_FILENAMES = {"v2.0": "HPS_v2_compressed.pt", "v2.1": "HPS_v2.1_compressed.pt"}
# open_clip architecture of a bare HPS checkpoint file (model name of open_clip's built-in configs).
HPS_ARCHITECTURE = "ViT-H-14"
# Weight files of an open_clip model directory (`local-dir:` format), in order of preference; an HPS checkpoint
# placed in the directory under its published name is accepted too.
OPEN_CLIP_WEIGHT_FILENAMES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
)
OPEN_CLIP_CONFIG = "open_clip_config.json"


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def load_open_clip_model(architecture: str, checkpoint: str | Path) -> nn.Module:
    """Builds an open_clip model and loads every weight from `checkpoint` (strict), frozen and in eval mode.

    Args:
        architecture: open_clip model name ("ViT-H-14") or "local-dir:<dir>" (architecture from the directory's
            `open_clip_config.json`; its weights are NOT loaded implicitly).
        checkpoint: state dict file: safetensors, or a torch file (`weights_only=True`) holding the state dict
            itself or `{'state_dict': ...}` (HPS checkpoints), with or without a `module.` prefix.

    Raises:
        ValueError: the architecture is unknown, or the checkpoint is unreadable or its keys/shapes do not match
            (the message names the file).
    """
    # open_clip logs "Model initialized randomly" for a weight-less build; the weights are loaded right below.
    root_logger, quiet = logging.getLogger(), _DropRandomInitWarning()
    root_logger.addFilter(quiet)
    try:
        model = open_clip.create_model(architecture, load_weights=False, pretrained_text=False)
    except Exception as err:  # noqa: BLE001 - open_clip raises RuntimeError, ValueError, KeyError, ...
        raise ValueError(f"cannot build open_clip model {architecture!r}: {type(err).__name__}: {err}") from err
    finally:
        root_logger.removeFilter(quiet)
    try:  # shape mismatches raise here; key mismatches are reported below, summarised
        incompatible = open_clip.load_checkpoint(model, str(checkpoint), strict=False, weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling / shape-mismatch errors come in many types
        raise ValueError(
            f"cannot load open_clip {architecture!r} weights from {str(checkpoint)!r}: {type(err).__name__}: {err}"
        ) from err
    missing, unexpected = list(incompatible.missing_keys), list(incompatible.unexpected_keys)
    if missing or unexpected:
        raise ValueError(
            f"weights in {str(checkpoint)!r} do not match open_clip {architecture!r}: "
            f"{len(missing)} missing key(s) (e.g. {', '.join(missing[:3]) or '-'}), "
            f"{len(unexpected)} unexpected key(s) (e.g. {', '.join(unexpected[:3]) or '-'})"
        )
    return model.eval().requires_grad_(False)


def _resolve(path: str, version: str) -> tuple[str, Path]:
    """`path` → (open_clip architecture, local checkpoint file)."""
    local = Path(path).expanduser()
    if local.is_file():
        return HPS_ARCHITECTURE, local
    if local.is_dir():
        if not (local / OPEN_CLIP_CONFIG).is_file():
            raise FileNotFoundError(
                f"HPS model directory {str(local)!r} has no {OPEN_CLIP_CONFIG} (expected an "
                "open_clip model directory, or pass the HPS checkpoint file itself)"
            )
        candidates = (*OPEN_CLIP_WEIGHT_FILENAMES, HPS_FILENAMES[version])
        for name in candidates:
            if (local / name).is_file():
                return f"local-dir:{local}", local / name
        raise FileNotFoundError(
            f"no weights in HPS model directory {str(local)!r}: expected one of {', '.join(candidates)}"
        )
    if not is_hub_id(path):
        raise FileNotFoundError(
            f"HPS checkpoint {path!r} does not exist (expected an HPS .pt file, an open_clip "
            "model directory, or a hub id 'owner/name')"
        )
    from huggingface_hub import hf_hub_download

    try:
        return HPS_ARCHITECTURE, Path(hf_hub_download(path, HPS_FILENAMES[version]))
    except Exception as err:  # noqa: BLE001 - hub errors come in many types; one clear message for all
        raise FileNotFoundError(
            f"could not get {HPS_FILENAMES[version]} from hub repo {path!r}: {type(err).__name__}: {err}"
        ) from err


@register_reward("hpsv2")
class HPSv2(RewardModel):
    """HPSv2 / v2.1: cosine of open_clip ViT-H-14 image and text embeddings, ≈ 0.25–0.28 for SD images.

    Args:
        path: an HPS checkpoint file (`HPS_v2.1_compressed.pt`, architecture ViT-H-14), an open_clip model
            directory (`open_clip_config.json` + weights, as `testing.build_tiny_hpsv2` writes), or a hub repo id
            holding the version's file; None = `xswu/HPSv2`.
        version: "v2.0" or "v2.1"; picks the file downloaded from a hub repo (or looked for in a directory).
            A local checkpoint file is used as given.
        dtype: dtype the model runs in: "float32", "bfloat16" or "float16".

    Raises:
        FileNotFoundError: the path does not exist and is not a hub id, or a directory lacks config/weights.
        ValueError: unknown `version` or `dtype`; a checkpoint that does not load (the message names the file).
    """

    differentiable = True

    def __init__(self, path: str | None = None, *, version: Literal["v2.0", "v2.1"] = "v2.1", dtype: str = "float32"):
        if version not in HPS_FILENAMES:
            raise ValueError(
                f"reward 'hpsv2': version must be one of {', '.join(map(repr, HPS_FILENAMES))}, got {version!r}"
            )
        torch_dtype = resolve_dtype(dtype)
        self.source = path if path is not None else HPS_HUB_REPO
        self.version = version
        self.architecture, self.checkpoint = _resolve(self.source, version)
        self.model = load_open_clip_model(self.architecture, self.checkpoint).to(torch_dtype)
        self.tokenizer = open_clip.get_tokenizer(self.architecture)
        size = self.model.visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def to(self, device: str | torch.device) -> HPSv2:
        self.model.to(device)
        return self

    def preprocess(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [0, 1] → (N, 3, 224, 224) normalised pixels: longest side → 224, zero-pad, mean/std."""
        return normalize(resize_longest_and_pad(images.float(), self.image_size, fill=0.0), CLIP_MEAN, CLIP_STD)

    def text_embeddings(self, prompts: Sequence[str]) -> Tensor:
        """(N,) prompts → (N, embed_dim) L2-normalised text embeddings, float32, no graph."""
        unique = list(dict.fromkeys(prompts))  # several images per prompt: encode each prompt once
        tokens = self.tokenizer(unique).to(self.device)  # (U, 77)
        with torch.no_grad():
            features = F.normalize(self.model.encode_text(tokens).float(), dim=-1)  # (U, D)
        index = torch.tensor([unique.index(p) for p in prompts], device=features.device)
        return features[index]  # (N, D)

    def _score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        dtype = self.model.logit_scale.dtype
        pixels = self.preprocess(images.to(self.device)).to(dtype)  # (N, 3, 224, 224)
        image_features = F.normalize(self.model.encode_image(pixels).float(), dim=-1)  # (N, D)
        return (image_features * self.text_embeddings(prompts)).sum(dim=-1)  # (N,) raw cosine

    def __repr__(self) -> str:
        return f"HPSv2(path={self.source!r}, version={self.version!r})"

"""CLIP score: prompt–image agreement under a CLIP model (docs/rewards.md §2.6), plus the Hugging Face CLIP loading
shared with the aesthetic reward.

Real weights: any Hugging Face `CLIPModel` directory or hub id; the default is `openai/clip-vit-large-patch14`
(ViT-L/14 @ 224, 427.6M parameters, the backbone of torchmetrics' `CLIPScore`). `openai/clip-vit-base-patch32`
is Hessel et al.'s backbone; `openai/clip-vit-large-patch14-336` works too (the input size is read from the
model config). Weights load with `CLIPModel.from_pretrained` (safetensors, or a `.bin` through
`torch.load(weights_only=True)`); no remote code.

Score (differentiable):

    ê = E_img(x) / ‖E_img(x)‖,   t̂ = E_txt(prompt) / ‖E_txt(prompt)‖
    clip_score = scale · cos(ê, t̂) = scale · ê·t̂                 (default, scale = 100)
    clip_score = max(scale · ê·t̂, 0)                             (nonnegative=True: torchmetrics with scale 100,
                                                                   Hessel et al. CLIP-S with scale 2.5)

where x is the image resized (shortest side, bicubic, antialiased) to the model's input size, centre-cropped and
normalised with the OpenAI CLIP mean/std (docs/rewards.md §1), and the prompt is CLIP-BPE tokenised (at most 77
tokens, longer prompts are truncated). The max(·, 0) of the published metrics zeroes the gradient of poorly
matching images, so RL and guidance use the raw scaled cosine by default.

Value range: scale · [−1, 1]. With ViT-L/14 and scale 100, SD1.5 images of their own prompts score ≈ 25–32
(unverified estimate, docs/rewards.md §2.6); a mismatched prompt scores ≈ 10–20.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import CLIPModel, CLIPTokenizer

from rlhf_diffusion.models.sources import resolve_source
from rlhf_diffusion.rewards.base import RewardModel, register_reward
from rlhf_diffusion.rewards.preprocess import normalize, resize_shortest_and_center_crop

__all__ = [
    "DEFAULT_CLIP_MODEL",
    "ClipImageEncoder",
    "ClipScore",
    "clip_text_embeddings",
    "load_clip_model",
    "resolve_dtype",
]

# torchmetrics' CLIPScore default backbone (OpenAI CLIP ViT-L/14 @ 224).
DEFAULT_CLIP_MODEL = "openai/clip-vit-large-patch14"

# `dtype` constructor argument (a config string) → torch dtype the reward's weights run in.
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(dtype: str) -> torch.dtype:
    """Maps a config dtype name ("float32", "bfloat16", "float16") to a torch dtype.

    Raises:
        ValueError: unknown name (the message lists the allowed ones).
    """
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(map(repr, _DTYPES))}, got {dtype!r}")
    return _DTYPES[dtype]


def load_clip_model(source: str, *, dtype: torch.dtype = torch.float32) -> CLIPModel:
    """Loads a frozen Hugging Face `CLIPModel` (eval mode, no parameter requires grad) from a directory or hub id.

    Every weight of the architecture must be in the checkpoint: a missing key (a renamed or foreign state dict)
    is an error, never a silently random-initialised layer.

    Raises:
        FileNotFoundError: `source` is neither an existing local path nor a hub id.
        ValueError: the directory / hub repo does not hold a loadable `CLIPModel` (the message names it).
    """
    source = resolve_source(source, what="CLIP model directory")
    try:
        model, info = CLIPModel.from_pretrained(source, dtype=dtype, output_loading_info=True)
    except Exception as err:  # noqa: BLE001 - from_pretrained raises OSError, ValueError, HF hub errors, ...
        raise ValueError(f"cannot load a CLIPModel from {source!r}: {type(err).__name__}: {err}") from err
    missing = sorted(info.get("missing_keys") or [])
    mismatched = list(info.get("mismatched_keys") or [])
    if missing or mismatched:
        shown = ", ".join(map(str, (missing + mismatched)[:5]))
        raise ValueError(
            f"checkpoint in {source!r} does not match CLIPModel: {len(missing)} missing and "
            f"{len(mismatched)} mismatched weight(s), e.g. {shown}"
        )
    return model.eval().requires_grad_(False)


class ClipImageEncoder(nn.Module):
    """Image tower of a Hugging Face CLIP model with CLIP's preprocessing, differentiable end to end.

    images (N, 3, H, W) in [0, 1] → resize shortest side + centre crop to `image_size` → OpenAI mean/std →
    vision transformer → pooled output → visual projection → (N, projection_dim) unnormalised embeddings.
    Equal to `CLIPModel.get_image_features` on the preprocessed pixels.
    """

    def __init__(self, clip: CLIPModel):
        super().__init__()
        self.vision_model = clip.vision_model
        self.visual_projection = clip.visual_projection
        self.image_size = int(clip.config.vision_config.image_size)
        self.projection_dim = int(clip.config.projection_dim)
        self.eval()  # the towers come frozen and in eval mode; keep the wrapper consistent

    def preprocess(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [0, 1] → (N, 3, S, S) normalised pixel values (S = `image_size`), float32 graph kept."""
        return normalize(resize_shortest_and_center_crop(images.float(), self.image_size))

    def forward(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [0, 1] on the encoder's device → (N, projection_dim) in the encoder's dtype."""
        dtype = self.visual_projection.weight.dtype
        pooled = self.vision_model(pixel_values=self.preprocess(images).to(dtype)).pooler_output  # (N, hidden)
        return self.visual_projection(pooled)  # (N, projection_dim)


def clip_text_embeddings(model: CLIPModel, tokenizer: CLIPTokenizer, prompts: Sequence[str], max_length: int) -> Tensor:
    """(N,) prompts → (N, projection_dim) L2-normalised text embeddings of a transformers `CLIPModel`, float32,
    no graph; each distinct prompt is encoded once (several images per prompt are the rule)."""
    unique = list(dict.fromkeys(prompts))
    tokens = tokenizer(unique, padding=True, truncation=True, max_length=max_length, return_tensors="pt").to(
        model.logit_scale.device
    )
    with torch.no_grad():
        out = model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask)
    # transformers >= 5 returns an output object whose `pooler_output` is the projected embedding (§1).
    features = F.normalize(getattr(out, "pooler_output", out).float(), dim=-1)  # (U, P)
    index = torch.tensor([unique.index(p) for p in prompts], device=features.device)
    return features[index]  # (N, P)


class ClipCosineReward(RewardModel):
    """A reward made of the cosine between a Hugging Face CLIP model's image and text embeddings (CLIP score,
    PickScore). Subclasses load `model` (a `CLIPModel`), `image_encoder` (`ClipImageEncoder(model)`),
    `tokenizer` and `max_length`, and scale `cosine` in `_score`."""

    model: CLIPModel
    image_encoder: ClipImageEncoder
    tokenizer: CLIPTokenizer
    max_length: int

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    def to(self, device: str | torch.device) -> ClipCosineReward:
        self.model.to(device)
        return self

    def preprocess(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [0, 1] → the model's normalised (N, 3, S, S) pixel values (differentiable)."""
        return self.image_encoder.preprocess(images)

    def text_embeddings(self, prompts: Sequence[str]) -> Tensor:
        """(N,) prompts → (N, projection_dim) L2-normalised text embeddings, float32, no graph."""
        return clip_text_embeddings(self.model, self.tokenizer, prompts, self.max_length)

    def cosine(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """(N,) cos(image embedding, text embedding), differentiable with respect to the pixels."""
        image_embeds = F.normalize(self.image_encoder(images.to(self.device)).float(), dim=-1)  # (N, P)
        return (image_embeds * self.text_embeddings(prompts)).sum(dim=-1)


@register_reward("clip_score")
class ClipScore(ClipCosineReward):
    """scale · cos(CLIP image embedding, CLIP text embedding); differentiable with respect to the pixels.

    Args:
        path: Hugging Face `CLIPModel` directory (with its tokenizer files) or hub id; None =
            `openai/clip-vit-large-patch14`.
        scale: multiplier of the cosine (100 as torchmetrics, 2.5 as Hessel et al., 1 for the raw cosine).
        nonnegative: apply max(·, 0) like the published metrics (zero gradient where the cosine is negative).
        dtype: dtype the model runs in: "float32", "bfloat16" or "float16".

    Raises:
        FileNotFoundError: `path` does not exist and is not a hub id.
        ValueError: `path` holds no loadable CLIP model or tokenizer; `scale` is not a finite positive number;
            unknown `dtype`.
    """

    differentiable = True

    def __init__(
        self, path: str | None = None, *, scale: float = 100.0, nonnegative: bool = False, dtype: str = "float32"
    ):
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not 0 < scale < float("inf"):
            raise ValueError(f"reward 'clip_score': scale must be a finite positive number, got {scale!r}")
        self.source = path if path is not None else DEFAULT_CLIP_MODEL
        self.scale = float(scale)
        self.nonnegative = bool(nonnegative)
        self.model = load_clip_model(self.source, dtype=resolve_dtype(dtype))
        self.image_encoder = ClipImageEncoder(self.model)
        self.tokenizer = _load_tokenizer(self.source)
        self.max_length = min(
            int(self.tokenizer.model_max_length), int(self.model.config.text_config.max_position_embeddings)
        )

    def _score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        scores = self.scale * self.cosine(images, prompts)
        return scores.clamp(min=0) if self.nonnegative else scores

    def __repr__(self) -> str:
        return f"ClipScore(path={self.source!r}, scale={self.scale}, nonnegative={self.nonnegative})"


def _load_tokenizer(source: str) -> CLIPTokenizer:
    source = resolve_source(source, what="CLIP tokenizer directory")
    try:
        return CLIPTokenizer.from_pretrained(source)
    except Exception as err:  # noqa: BLE001 - tokenizer loading raises OSError, ValueError, TypeError, ...
        raise ValueError(f"cannot load a CLIPTokenizer from {source!r}: {type(err).__name__}: {err}") from err

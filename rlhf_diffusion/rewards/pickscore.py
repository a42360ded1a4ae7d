"""PickScore v1 (Kirstain et al. 2023, yuvalkirstain/PickScore): a CLIP-H preference reward fine-tuned on Pick-a-Pic
(docs/rewards.md §2.3).

Real weights: Hugging Face `CLIPModel` `yuvalkirstain/PickScore_v1` (LAION CLIP ViT-H/14 @ 224 fine-tuned,
986.1M parameters; licence of the weights unclear, code MIT). Its processor, as in the upstream README, is the one of
the base model, `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (OpenAI CLIP BPE tokenizer, 77 tokens; image processor:
shortest side 224 bicubic, centre crop 224, OpenAI mean/std). Weights load with `CLIPModel.from_pretrained`
(safetensors, or a `.bin` through `torch.load(weights_only=True)`); no remote code.

Score (differentiable with respect to the pixels):

    ê = E_img(x) / ‖E_img(x)‖,   t̂ = E_txt(prompt) / ‖E_txt(prompt)‖      (projected CLIP embeddings)
    pickscore = exp(logit_scale) · ê·t̂

where x is the image resized (shortest side, bicubic, antialiased) to 224, centre-cropped and normalised with the
OpenAI CLIP mean/std (docs/rewards.md §1, equal to the processor on float input), and the prompt is CLIP-BPE tokenised
(padding, truncation to 77). The softmax of these scores over candidate images of one prompt is the model's
preference probability (the training loss is CLIP's contrastive CE with the same `logit_scale`).

Value range: exp(logit_scale) · [−1, 1]; exp(logit_scale) ≈ 100 for the real model (unverified), SD1.5 images
score ≈ 20–22 (unverified; one repo normalises with mean 21.38, std 1.18).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torch import Tensor
from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

from rlhf_diffusion.models.sources import resolve_source
from rlhf_diffusion.rewards.base import register_reward
from rlhf_diffusion.rewards.clip_score import (
    ClipCosineReward,
    ClipImageEncoder,
    load_clip_model,
    resolve_dtype,
)
from rlhf_diffusion.rewards.preprocess import CLIP_MEAN, CLIP_STD

__all__ = [
    "DEFAULT_MODEL",
    "DEFAULT_PROCESSOR",
    "MAX_PROMPT_TOKENS",
    "PickScore",
    "load_pickscore_processor",
]

DEFAULT_MODEL = "yuvalkirstain/PickScore_v1"
DEFAULT_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
MAX_PROMPT_TOKENS = 77
# Files whose presence in a local model directory means it carries its own tokenizer (else DEFAULT_PROCESSOR).
_TOKENIZER_FILES = ("tokenizer.json", "vocab.json")


def load_pickscore_processor(source: str, *, image_size: int) -> CLIPProcessor:
    """Loads a `CLIPProcessor` (tokenizer + image processor) and checks that its image settings are the ones the
    reward's differentiable preprocessing implements: shortest side `image_size`, centre crop `image_size`,
    bicubic, OpenAI CLIP mean/std.

    Args:
        source: a local directory or a hub id.
        image_size: the CLIP vision tower's input size.

    Raises:
        FileNotFoundError: `source` is neither an existing local path nor a hub id.
        ValueError: no processor can be loaded from `source`, or its image settings differ (the message names them).
    """
    source = resolve_source(source, what="PickScore processor directory")
    try:
        processor = CLIPProcessor.from_pretrained(source)
    except Exception as err:  # noqa: BLE001 - processor loading raises OSError, ValueError, hub errors, ...
        raise ValueError(f"cannot load a CLIPProcessor from {source!r}: {type(err).__name__}: {err}") from err
    image_processor: CLIPImageProcessor = processor.image_processor
    size, crop, resample = image_processor.size, image_processor.crop_size, image_processor.resample
    # `resample` is a PIL code (3 = bicubic) or an enum whose value is 3 or "bicubic", depending on the backend.
    resample_name = "bicubic" if getattr(resample, "value", resample) in (3, "bicubic") else repr(resample)
    settings = {  # name: (processor's value, value the differentiable preprocessing implements)
        "size.shortest_edge": (_field(size, "shortest_edge"), image_size),
        "crop_size": ((_field(crop, "height"), _field(crop, "width")), (image_size, image_size)),
        "do_center_crop": (bool(image_processor.do_center_crop), True),
        "resample": (resample_name, "bicubic"),
        "image_mean": (_rounded(image_processor.image_mean), _rounded(CLIP_MEAN)),
        "image_std": (_rounded(image_processor.image_std), _rounded(CLIP_STD)),
    }
    wrong = [f"{name}={got!r} (expected {want!r})" for name, (got, want) in settings.items() if got != want]
    if wrong:
        raise ValueError(f"processor {source!r} does not match PickScore's preprocessing: {', '.join(wrong)}")
    return processor


def _field(obj: object, name: str) -> object:
    """A field of a size dict (a plain dict or transformers' `SizeDict`)."""
    return obj.get(name) if isinstance(obj, dict) else getattr(obj, name, None)


def _rounded(values: Sequence[float]) -> tuple[float, ...]:
    return tuple(round(float(v), 6) for v in values)


@register_reward("pickscore")
class PickScore(ClipCosineReward):
    """PickScore v1: exp(logit_scale) · cos(CLIP-H image embedding, text embedding), ≈ 20–22 for SD1.5.

    Args:
        path: Hugging Face `CLIPModel` directory or hub id; None = `yuvalkirstain/PickScore_v1`.
        processor_path: `CLIPProcessor` directory or hub id (tokenizer + image processor config). None = the `path`
            directory when it holds a tokenizer (`tokenizer.json` or `vocab.json`, as `testing.build_tiny_pickscore`
            writes), else `laion/CLIP-ViT-H-14-laion2B-s32B-b79K` (the upstream README's processor).
        dtype: dtype the CLIP model runs in ("float32", "bfloat16", "float16"); the cosine and scale are float32.

    Raises:
        FileNotFoundError: a path does not exist and is not a hub id.
        ValueError: the model or processor cannot be loaded, the checkpoint's keys do not match `CLIPModel`, the
            processor's image settings differ from CLIP's; unknown `dtype`.
    """

    differentiable = True

    def __init__(self, path: str | None = None, *, processor_path: str | None = None, dtype: str = "float32"):
        self.source = path if path is not None else DEFAULT_MODEL
        if processor_path is None:
            local = Path(self.source).expanduser()
            has_tokenizer = local.is_dir() and any((local / name).is_file() for name in _TOKENIZER_FILES)
            processor_path = str(local) if has_tokenizer else DEFAULT_PROCESSOR
        self.processor_source = processor_path
        self.model: CLIPModel = load_clip_model(self.source, dtype=resolve_dtype(dtype))
        self.image_encoder = ClipImageEncoder(self.model)
        processor = load_pickscore_processor(processor_path, image_size=self.image_encoder.image_size)
        self.tokenizer: CLIPTokenizer = processor.tokenizer
        self.max_length = min(MAX_PROMPT_TOKENS, int(self.model.config.text_config.max_position_embeddings))

    def _score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.model.logit_scale.float().exp() * self.cosine(images, prompts)

    def __repr__(self) -> str:
        return f"PickScore(path={self.source!r}, processor_path={self.processor_source!r})"

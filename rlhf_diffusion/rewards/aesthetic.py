"""LAION aesthetic predictor v2 ("improved-aesthetic-predictor"), the reward of DDPO's aesthetic runs
(docs/rewards.md §2.1).

Real weights, two parts:
- the MLP head `sac+logos+ava1-l14-linearMSE.pth` (3,714,759 bytes, sha256 21dd590f…f1e0; Apache-2.0) from
  github.com/christophschuhmann/improved-aesthetic-predictor (byte-identical copy in kvablack/ddpo-pytorch
  `ddpo_pytorch/assets/`). The default `path=None` downloads the copy that TRL's DDPO example uses,
  hub repo `trl-lib/ddpo-aesthetic-predictor`, file `aesthetic-model.pth` (same layer names; that it is
  byte-identical to the GitHub file is unverified);
- OpenAI CLIP ViT-L/14 @ 224, image tower only: hub id `openai/clip-vit-large-patch14` (`CLIPModel` format).

Score (differentiable):

    e = CLIP image embedding (768-d, projected) of the preprocessed image
    aesthetic = MLP(e / ‖e‖)

with CLIP's preprocessing (shortest side → 224 bicubic antialiased, centre crop 224, OpenAI mean/std; §1). The
MLP is Linear(768,1024) → Dropout(0.2) → Linear(1024,128) → Dropout(0.2) → Linear(128,64) → Dropout(0.1) →
Linear(64,16) → Linear(16,1) with NO activations (the original's ReLUs are commented out), so in eval mode it is an
affine map w·ê + b (‖w‖ ≈ 18.0, b ≈ 5.237 for the real file): the score lies in b ± ‖w‖.

Value range: nominally 1–10 (AVA-style ratings). SD1.x images of simple prompts score ≈ 5–6; RL fine-tuning
pushes them to 7–10 (DDPO, AlignProp; unverified numbers).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlhf_diffusion.models.sources import is_hub_id
from rlhf_diffusion.rewards.base import RewardModel, register_reward
from rlhf_diffusion.rewards.clip_score import (
    DEFAULT_CLIP_MODEL,
    ClipImageEncoder,
    load_clip_model,
    resolve_dtype,
)

__all__ = ["MLP_FILENAMES", "Aesthetic", "AestheticMLP", "load_aesthetic_mlp"]

# File names of the MLP head, in the order they are looked for in a directory or hub repo: the original release
# (GitHub, DDPO assets) and the hub copy used by TRL.
MLP_FILENAMES = ("sac+logos+ava1-l14-linearMSE.pth", "aesthetic-model.pth")
DEFAULT_MLP_REPO = "trl-lib/ddpo-aesthetic-predictor"
EMBED_DIM = 768  # CLIP ViT-L/14 projection width = MLP input


class AestheticMLP(nn.Module):
    """The improved-aesthetic-predictor head; parameter names `layers.{0,2,4,6,7}.{weight,bias}` as in the file."""

    def __init__(self, input_dim: int = EMBED_DIM):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeds: Tensor) -> Tensor:
        """(N, input_dim) → (N, 1)."""
        return self.layers(embeds)


def load_aesthetic_mlp(file: str | Path) -> AestheticMLP:
    """Loads the MLP head from a `torch.save`d state dict (`weights_only=True`), frozen and in eval mode.

    Raises:
        FileNotFoundError: `file` does not exist.
        ValueError: the file is not a loadable state dict with exactly the head's keys and shapes.
    """
    file = Path(file)
    if not file.is_file():
        raise FileNotFoundError(f"aesthetic MLP file {str(file)!r} does not exist")
    try:
        state_dict = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling raises UnpicklingError, RuntimeError, EOFError, ...
        raise ValueError(f"cannot read aesthetic MLP file {str(file)!r}: {type(err).__name__}: {err}") from err
    if isinstance(state_dict, dict) and isinstance(state_dict.get("state_dict"), dict):  # a Lightning checkpoint
        state_dict = state_dict["state_dict"]
    if not isinstance(state_dict, dict) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise ValueError(f"aesthetic MLP file {str(file)!r} does not hold a state dict of tensors")
    mlp = AestheticMLP()
    try:
        mlp.load_state_dict(state_dict, strict=True)
    except RuntimeError as err:
        expected = sorted(mlp.state_dict())
        raise ValueError(
            f"aesthetic MLP file {str(file)!r} does not match the improved-aesthetic-predictor head "
            f"(expected keys {', '.join(expected)}): {err}"
        ) from err
    return mlp.eval().requires_grad_(False)


def _resolve_mlp_file(path: str) -> Path:
    """`path` (a file, a directory holding one of `MLP_FILENAMES`, or a hub repo id) → local MLP file."""
    local = Path(path).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        for name in MLP_FILENAMES:
            if (local / name).is_file():
                return local / name
        raise FileNotFoundError(
            f"aesthetic MLP file not found in directory {str(local)!r}: expected one of {', '.join(MLP_FILENAMES)}"
        )
    if not is_hub_id(path):
        raise FileNotFoundError(
            f"aesthetic predictor path {path!r} does not exist (expected the MLP .pth file, a "
            "directory holding it, or a hub id 'owner/name')"
        )
    from huggingface_hub import hf_hub_download

    errors = []
    for name in MLP_FILENAMES:
        try:
            return Path(hf_hub_download(path, name))
        except Exception as err:  # noqa: BLE001 - hub errors come in many types; one clear message for all
            errors.append(f"{name}: {type(err).__name__}: {err}")
    raise FileNotFoundError(f"could not get the aesthetic MLP from hub repo {path!r}: " + "; ".join(errors))


@register_reward("aesthetic")
class Aesthetic(RewardModel):
    """LAION aesthetic predictor v2: MLP(L2-normalised CLIP ViT-L/14 image embedding), ≈ 1–10.

    Args:
        path: the MLP head: a `.pth` state dict file, a directory holding `sac+logos+ava1-l14-linearMSE.pth` or
            `aesthetic-model.pth`, or a hub repo id; None = `trl-lib/ddpo-aesthetic-predictor`.
        clip_path: Hugging Face `CLIPModel` directory or hub id of the CLIP backbone. None = the `path` directory
            when it also holds a CLIP model (`config.json`, as `testing.build_tiny_aesthetic` writes), else
            `openai/clip-vit-large-patch14`.
        dtype: dtype the CLIP tower runs in ("float32", "bfloat16", "float16"); the MLP always runs in float32.

    Raises:
        FileNotFoundError: a path does not exist (and is not a hub id) or a directory lacks the MLP file.
        ValueError: a file is not loadable or its keys/shapes are wrong; the CLIP projection width is not the
            MLP's 768; unknown `dtype`.
    """

    differentiable = True

    def __init__(self, path: str | None = None, *, clip_path: str | None = None, dtype: str = "float32"):
        self.source = path if path is not None else DEFAULT_MLP_REPO
        if clip_path is None:
            local = Path(self.source).expanduser()
            clip_path = str(local) if (local / "config.json").is_file() else DEFAULT_CLIP_MODEL
        self.clip_source = clip_path
        torch_dtype = resolve_dtype(dtype)
        self.mlp = load_aesthetic_mlp(_resolve_mlp_file(self.source))
        # Keep only the image tower; the text tower of the loaded CLIPModel is dropped with it.
        self.image_encoder = ClipImageEncoder(load_clip_model(clip_path, dtype=torch_dtype))
        if self.image_encoder.projection_dim != EMBED_DIM:
            raise ValueError(
                f"CLIP model {clip_path!r} has projection width {self.image_encoder.projection_dim}, "
                f"but the aesthetic MLP takes {EMBED_DIM}-d embeddings (CLIP ViT-L/14)"
            )

    @property
    def device(self) -> torch.device:
        return self.mlp.layers[0].weight.device

    def to(self, device: str | torch.device) -> Aesthetic:
        self.image_encoder.to(device)
        self.mlp.to(device)
        return self

    def preprocess(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [0, 1] → CLIP's normalised (N, 3, 224, 224) pixel values (differentiable)."""
        return self.image_encoder.preprocess(images)

    def _score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        embeds = self.image_encoder(images.to(self.device)).float()  # (N, 768)
        return self.mlp(F.normalize(embeds, dim=-1)).squeeze(-1)  # (N,)

    def __repr__(self) -> str:
        return f"Aesthetic(path={self.source!r}, clip_path={self.clip_source!r})"

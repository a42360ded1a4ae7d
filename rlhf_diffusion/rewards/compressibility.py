"""JPEG (in)compressibility rewards, exactly as DDPO (Black et al. 2023; docs/rewards.md §2.5).

Each image is quantised to uint8 the way DDPO does it, `(x * 255).round().clamp(0, 255)`, saved with PIL as
JPEG at `quality` (95 in DDPO), and its size in kB (bytes / 1000) is the reward's magnitude:

    jpeg_compressibility   = −size_kB   (smaller files score higher: blurred, flat images)
    jpeg_incompressibility = +size_kB   (larger files score higher: high-frequency detail)

The encoder is a step function of the pixels, so these rewards are NOT differentiable: `score_and_grad` and
`forward_differentiable` raise `NotDifferentiableError`, and guidance methods (TailorPO-G) cannot use them.
Exact values depend on the Pillow/libjpeg build; pin Pillow where bit-exact reproducibility matters.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import torch
from PIL import Image
from torch import Tensor

from rlhf_diffusion.rewards.base import RewardModel, register_reward

__all__ = ["JpegCompressibility", "JpegIncompressibility", "jpeg_size_kb"]


def jpeg_size_kb(images: Tensor, quality: int = 95) -> Tensor:
    """Size of each image as a PIL JPEG, in kB (1 kB = 1000 bytes), as in DDPO's `jpeg_incompressibility`.

    Args:
        images: (N, 3, H, W) float, values in [0, 1].
        quality: PIL JPEG quality, 1..100 (DDPO: 95); PIL's default chroma subsampling for that quality.

    Returns:
        (N,) float32 sizes in kB, on CPU.
    """
    pixels = (images.detach() * 255).round().clamp(0, 255).to(torch.uint8)  # (N, 3, H, W)
    pixels = pixels.permute(0, 2, 3, 1).cpu().numpy()  # (N, H, W, 3), NHWC as PIL expects
    sizes = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return torch.tensor(sizes, dtype=torch.float32)


class _JpegSize(RewardModel):
    """±JPEG size in kB; `sign` = −1 rewards compressible images, +1 incompressible ones."""

    differentiable = False
    sign: float

    def __init__(self, quality: int = 95):
        if isinstance(quality, bool) or not isinstance(quality, int) or not 1 <= quality <= 100:
            raise ValueError(f"reward '{self.name}': quality must be an integer in 1..100 (DDPO: 95), got {quality!r}")
        self.quality = quality

    def _score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return self.sign * jpeg_size_kb(images, self.quality)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(quality={self.quality})"


@register_reward("jpeg_compressibility")
class JpegCompressibility(_JpegSize):
    """−(JPEG size in kB): higher for more compressible images (DDPO `jpeg_compressibility`). Not differentiable."""

    sign = -1.0


@register_reward("jpeg_incompressibility")
class JpegIncompressibility(_JpegSize):
    """+(JPEG size in kB): higher for less compressible images (DDPO `jpeg_incompressibility`). Not differentiable."""

    sign = 1.0

"""Differentiable image preprocessing shared by the CLIP-family rewards (docs/rewards.md §1).

Every function takes images (N, 3, H, W) float in [0, 1] and keeps the autograd graph to them, so a reward's
gradient with respect to the pixels flows through resize, crop and normalisation. Values match the official image
processors on float input (tested against transformers' `CLIPImageProcessor` with `do_rescale=False`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["CLIP_MEAN", "CLIP_STD", "normalize", "resize_longest_and_pad", "resize_shortest_and_center_crop"]

# OpenAI CLIP normalisation, used by aesthetic v2, ImageReward (BLIP), PickScore, HPSv2 and CLIP score.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def normalize(
    images: Tensor, mean: tuple[float, float, float] = CLIP_MEAN, std: tuple[float, float, float] = CLIP_STD
) -> Tensor:
    """(x - mean) / std per channel; images (N, 3, H, W)."""
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, 3, 1, 1)
    return (images - m) / s


def resize_shortest_and_center_crop(images: Tensor, size: int) -> Tensor:
    """Resize so the shortest side is `size` (bicubic, antialiased, as torchvision/transformers), then centre-crop
    `size` × `size`. This is CLIP's validation transform; images (N, 3, H, W) → (N, 3, size, size)."""
    h, w = images.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = (size, max(size, int(w * scale))) if h <= w else (max(size, int(h * scale)), size)
    if (new_h, new_w) != (h, w):
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return images[..., top : top + size, left : left + size]


def resize_longest_and_pad(images: Tensor, size: int, fill: float = 0.0) -> Tensor:
    """Resize so the longest side is `size` (bicubic, antialiased), then pad with `fill` to `size` × `size`,
    centred. HPSv2's `ResizeMaxSize` validation transform (padding happens before normalisation)."""
    h, w = images.shape[-2:]
    scale = size / max(h, w)
    new_h, new_w = (size, max(1, round(w * scale))) if h >= w else (max(1, round(h * scale)), size)
    if (new_h, new_w) != (h, w):
        images = F.interpolate(images, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    pad_h, pad_w = size - new_h, size - new_w
    if pad_h or pad_w:
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)
    return images

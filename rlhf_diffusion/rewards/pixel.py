"""Pixel-statistic rewards: DIAGNOSTIC rewards for tests and sanity checks, NOT human-preference models.

They are exact, cheap (no weights) and differentiable, so they answer "does the machinery work?": a tiny
random-weight model trained on `brightness` must end up producing brighter images, and a reward gradient
can be checked against its closed form. They say nothing about image quality, and a model trained on them
learns to paint flat white (brightness) or neon (saturation) images.

    brightness = mean over (c, h, w) of x            ∂/∂x = 1 / (3·H·W) everywhere
    saturation = mean over (h, w) of max_c x − min_c x
                 ∂/∂x = +1/(H·W) at the largest channel of a pixel, −1/(H·W) at the smallest, 0 at the middle
                 one (ties share the gradient evenly; differentiable wherever the channels of a pixel differ)
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from rlhf_diffusion.rewards.base import RewardModel, register_reward

__all__ = ["Brightness", "Saturation"]


@register_reward("brightness")
class Brightness(RewardModel):
    """Mean pixel intensity over (3, H, W), in [0, 1]. Diagnostic reward, not a preference model."""

    differentiable = True

    def _score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        return images.mean(dim=(1, 2, 3))  # (N,)

    def __repr__(self) -> str:
        return "Brightness()"


@register_reward("saturation")
class Saturation(RewardModel):
    """Mean over pixels of max(r, g, b) − min(r, g, b) (HSV chroma), in [0, 1]. Diagnostic reward only."""

    differentiable = True

    def _score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        chroma = images.amax(dim=1) - images.amin(dim=1)  # (N, H, W)
        return chroma.mean(dim=(1, 2))  # (N,)

    def __repr__(self) -> str:
        return "Saturation()"

"""The world's programmatic checker as a (non-differentiable) reward, for held-out evaluation and guards.

    rewards / guards.heldout_rewards:
      - {name: custom, target: "rlhf_diffusion.testbed.reward:CheckerReward", label: checker}
      - {name: custom, target: "rlhf_diffusion.testbed.reward:CheckerReward", label: checker_all, kwargs: {mode: all}}

It goes through the custom-reward path (rewards/custom.py), as a user's own reward would. Every prompt must be a
caption of the world grammar (`testbed.world.parse_caption`); anything else is an error naming the prompt.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from rlhf_diffusion.rewards.base import RewardModel
from rlhf_diffusion.testbed.world import check, parse_caption

__all__ = ["CheckerReward"]

MODES = ("fraction", "all")


class CheckerReward(RewardModel):
    """Per image: the fraction of the attributes its caption states that the image matches (`mode: fraction`,
    in [0, 1]), or 1 if it matches every one and 0 otherwise (`mode: all`). No gradient.

    Raises:
        ValueError: unknown `mode`; at scoring time, a prompt that is not a caption of the world.
    """

    differentiable = False

    def __init__(self, mode: str = "fraction"):
        if mode not in MODES:
            raise ValueError(f"CheckerReward: mode must be one of {MODES}, got {mode!r}")
        self.mode = mode

    def _score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        scores = []
        pixels = images.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()
        for image, prompt in zip(pixels.numpy(), prompts):
            try:
                scene = parse_caption(prompt)
            except ValueError as err:
                raise ValueError(
                    f"CheckerReward: prompt {prompt!r} is not a caption of the testbed world: {err}"
                ) from None
            result = check(image, scene)
            if self.mode == "all":
                scores.append(float(result["all"]))
            else:
                parts = [v for k, v in result.items() if k != "all"]
                scores.append(sum(parts) / len(parts))
        return torch.tensor(scores, dtype=torch.float32)

    def __repr__(self) -> str:
        return f"CheckerReward(mode={self.mode!r})"

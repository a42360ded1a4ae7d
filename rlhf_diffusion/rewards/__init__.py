"""Reward models: images (N, 3, H, W) in [0, 1] + prompts → (N,) scores (see `rewards/base.py`).

Importing this package registers every reward module's rewards in `REWARD_REGISTRY`.
"""

from rlhf_diffusion.rewards import (  # noqa: F401  (fills REWARD_REGISTRY)
    aesthetic,
    clip_score,
    compressibility,
    hpsv2,
    imagereward,
    pickscore,
    pixel,
)
from rlhf_diffusion.rewards.base import (
    REWARD_REGISTRY,
    NotDifferentiableError,
    RewardModel,
    RewardResult,
    WeightedReward,
    build_reward,
    register_reward,
    validate_reward_inputs,
)
from rlhf_diffusion.rewards.custom import CustomReward, CustomRewardError, load_custom_reward
from rlhf_diffusion.testbed import reward_model as _testbed_reward_model  # noqa: F401,E402  (testbed_reward)

__all__ = [
    "REWARD_REGISTRY",
    "CustomReward",
    "CustomRewardError",
    "NotDifferentiableError",
    "RewardModel",
    "RewardResult",
    "WeightedReward",
    "build_reward",
    "load_custom_reward",
    "register_reward",
    "validate_reward_inputs",
]

"""Preference-optimisation methods, one file each; importing this package fills the registry."""

from rlhf_diffusion.algorithms import d3po, dde, ddpo, diffusion_dpo, grpo, tailorpo  # noqa: F401  (registration)
from rlhf_diffusion.algorithms.base import (
    ALGORITHM_REGISTRY,
    Algorithm,
    LossOutput,
    RolloutContext,
    build_algorithm,
)

__all__ = [
    "ALGORITHM_REGISTRY",
    "Algorithm",
    "LossOutput",
    "RolloutContext",
    "build_algorithm",
]

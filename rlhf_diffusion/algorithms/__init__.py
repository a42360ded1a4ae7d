"""Preference-optimisation methods, one file each; importing this package fills the registry.

The package re-exports the interface, `base.__all__` (the names are listed there once)."""

from rlhf_diffusion.algorithms import base, d3po, dde, ddpo, diffusion_dpo, draft, grpo, tailorpo  # noqa: F401  (registration)
from rlhf_diffusion.algorithms.base import *  # noqa: F403

__all__ = list(base.__all__)

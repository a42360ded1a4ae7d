"""Testbeds: small synthetic worlds whose images can be checked programmatically (see `testbed/world.py`).

The package re-exports the world's public names (`world.__all__`, listed there once)."""

from rlhf_diffusion.testbed import world
from rlhf_diffusion.testbed.world import *  # noqa: F403

__all__ = list(world.__all__)

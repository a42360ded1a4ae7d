"""Offline training data: preference pairs streamed from Pick-a-Pic v2 Parquet or JSONL (`data/preference.py`).

The package re-exports `preference.__all__` (the names are listed there once)."""

from rlhf_diffusion.data import preference
from rlhf_diffusion.data.preference import *  # noqa: F403

__all__ = list(preference.__all__)

"""Shared fixtures: tiny random-weight SD1.5 / SDXL pipeline directories, built once per test session.

Every test that needs a model loads it from one of these directories through the production loader
(`rlhf_diffusion.models.load_diffusion_model`), so tests exercise the same code path as real checkpoints.
"""

from pathlib import Path

import pytest

from rlhf_diffusion.models.tiny import build_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_sd15_dir(tmp_path_factory) -> Path:
    """A tiny SD1.5 pipeline directory (64x64 images, 4x16x16 latents, text width 32)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd15"), "sd15")


@pytest.fixture(scope="session")
def tiny_sdxl_dir(tmp_path_factory) -> Path:
    """A tiny SDXL pipeline directory (64x64 images, 4x16x16 latents, text width 32 + 32, pooled 32)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sdxl"), "sdxl")

"""Fixtures of the SD3 tests in this folder."""

import pytest

from rlhf_diffusion.models import build_tiny_pipeline


@pytest.fixture(scope="module")
def sd3_dir(tmp_path_factory):
    """A tiny SD3 pipeline directory without T5 (`text_encoder_3` / `tokenizer_3` None), built once per test module."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd3"), "sd3")


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory):
    """A tiny FLUX.1-dev-shaped pipeline directory (`FluxPipeline`: CLIP-L, T5, a guidance-embedding transformer),
    built once per test module."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_flux"), "flux")

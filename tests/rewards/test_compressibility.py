"""JPEG (in)compressibility rewards (rewards/compressibility.py), checked against an independent PIL computation."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from rlhf_diffusion.rewards import NotDifferentiableError, build_reward


def _pil_jpeg_kb(hwc_uint8: np.ndarray, quality: int) -> float:
    buffer = io.BytesIO()
    Image.fromarray(hwc_uint8, mode="RGB").save(buffer, format="JPEG", quality=quality)
    return len(buffer.getvalue()) / 1000


def _gradient_image(h=32, w=48) -> np.ndarray:
    """A hand-made uint8 RGB image: horizontal / vertical ramps and a checkerboard in the three channels."""
    y, x = np.mgrid[0:h, 0:w]
    r = (x * 255 // (w - 1)).astype(np.uint8)
    g = (y * 255 // (h - 1)).astype(np.uint8)
    b = (((x // 4 + y // 4) % 2) * 200 + 20).astype(np.uint8)
    return np.stack([r, g, b], axis=-1)  # (H, W, 3)


@pytest.mark.parametrize("quality", [95, 60])
def test_matches_independent_pil_computation(quality):
    hwc = np.stack([_gradient_image(), _gradient_image()[::-1].copy()])  # (2, H, W, 3)
    images = torch.from_numpy(hwc).permute(0, 3, 1, 2).float() / 255  # exact inverse of the uint8 quantisation
    expected = torch.tensor([_pil_jpeg_kb(im, quality) for im in hwc])
    comp = build_reward("jpeg_compressibility", quality=quality).score(images, ["a", "b"])
    incomp = build_reward("jpeg_incompressibility", quality=quality).score(images, ["a", "b"])
    torch.testing.assert_close(incomp, expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(comp, -expected, rtol=0, atol=1e-6)


def test_quantisation_rounds_like_ddpo():
    # 0.5/255 above a level rounds up, just below rounds down: same bytes as the rounded uint8 image.
    hwc = _gradient_image()
    base = torch.from_numpy(hwc).permute(2, 0, 1).float() / 255
    nudged = (base + 0.4 / 255).clamp(0, 1).unsqueeze(0)
    reward = build_reward("jpeg_incompressibility")
    assert reward.score(nudged, ["x"]).item() == pytest.approx(_pil_jpeg_kb(hwc, 95), abs=1e-6)


def test_flat_image_is_more_compressible_than_noise():
    flat = torch.full((1, 3, 64, 64), 0.5)
    noise = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    reward = build_reward("jpeg_compressibility")
    s_flat, s_noise = reward.score(torch.cat([flat, noise]), ["a", "b"])
    assert s_flat > s_noise
    assert s_noise < -5.0  # 64x64 noise at q=95 is several kB


def test_incompressibility_is_minus_compressibility():
    images = torch.rand(3, 3, 24, 24, generator=torch.Generator().manual_seed(1))
    prompts = ["a", "b", "c"]
    comp = build_reward("jpeg_compressibility").score(images, prompts)
    incomp = build_reward("jpeg_incompressibility").score(images, prompts)
    torch.testing.assert_close(incomp, -comp)
    assert (incomp > 0).all()


def test_quality_changes_the_value():
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    high = build_reward("jpeg_incompressibility", quality=95).score(images, ["a"])
    low = build_reward("jpeg_incompressibility", quality=30).score(images, ["a"])
    assert high > low


def test_not_differentiable_raises_never_zeros():
    images = torch.rand(2, 3, 16, 16)
    for name in ("jpeg_compressibility", "jpeg_incompressibility"):
        reward = build_reward(name)
        assert reward.differentiable is False
        with pytest.raises(NotDifferentiableError, match=name):
            reward.score_and_grad(images, ["a", "b"])
        with pytest.raises(NotDifferentiableError, match=name):
            reward.forward_differentiable(images.requires_grad_(True), ["a", "b"])
        images = images.detach()


def test_score_works_on_images_with_grad():
    images = torch.rand(1, 3, 16, 16).requires_grad_(True)
    assert build_reward("jpeg_compressibility").score(images, ["a"]).shape == (1,)


def test_to_is_a_no_op():
    reward = build_reward("jpeg_compressibility")
    assert reward.to("cpu") is reward

"""Differentiable CLIP preprocessing equals transformers' CLIPImageProcessor on float input and keeps gradients."""

import pytest
import torch
from transformers import CLIPImageProcessor

from rlhf_diffusion.rewards.preprocess import normalize, resize_longest_and_pad, resize_shortest_and_center_crop


@pytest.mark.parametrize("shape", [(2, 3, 64, 64), (1, 3, 96, 64), (1, 3, 300, 451), (1, 3, 224, 224)])
def test_matches_clip_image_processor(shape):
    processor = CLIPImageProcessor(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        resample=3,
        do_rescale=False,
        do_convert_rgb=False,
    )
    images = torch.rand(*shape, generator=torch.Generator().manual_seed(0))
    reference = processor(images=list(images), return_tensors="pt").pixel_values
    ours = normalize(resize_shortest_and_center_crop(images, 224))
    assert ours.shape == reference.shape
    assert torch.allclose(ours, reference, atol=1e-5)


def test_gradient_flows_to_pixels():
    images = torch.rand(2, 3, 64, 48, requires_grad=True)
    normalize(resize_shortest_and_center_crop(images, 32)).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0


def test_longest_side_resize_pads_with_fill_before_normalisation():
    images = torch.ones(1, 3, 40, 80)
    out = resize_longest_and_pad(images, 20)
    assert out.shape == (1, 3, 20, 20)
    assert torch.allclose(out[..., 5:15, :], torch.ones(1, 3, 10, 20), atol=1e-5)  # content rows
    assert out[..., :5, :].abs().max() == 0 and out[..., 15:, :].abs().max() == 0  # zero padding
    square = torch.rand(1, 3, 64, 64)
    assert torch.allclose(resize_longest_and_pad(square, 32), resize_shortest_and_center_crop(square, 32))

"""Diagnostic pixel rewards (rewards/pixel.py): closed forms and gradients."""

import pytest
import torch

from rlhf_diffusion.rewards import build_reward


def _finite_difference_grad(reward, images, prompts, eps=1e-6):
    """Central differences of score_i w.r.t. every pixel of image i, in float64."""
    x = images.double()
    grad = torch.zeros_like(x)
    flat_x, flat_g = x.view(len(x), -1), grad.view(len(x), -1)
    for j in range(flat_x.shape[1]):
        plus, minus = flat_x.clone(), flat_x.clone()
        plus[:, j] += eps
        minus[:, j] -= eps
        f_plus = reward.forward_differentiable(plus.view_as(x), prompts)
        f_minus = reward.forward_differentiable(minus.view_as(x), prompts)
        flat_g[:, j] = (f_plus - f_minus) / (2 * eps)
    return grad


def test_brightness_closed_form():
    h, w = 4, 5
    images = torch.zeros(3, 3, h, w)
    images[1] = 1.0
    images[2, 0] = 0.3  # red channel 0.3, green 0.6, blue 0.9
    images[2, 1] = 0.6
    images[2, 2] = 0.9
    images[0, :, :2, :] = 1.0  # top 2 of 4 rows white
    scores = build_reward("brightness").score(images, ["a"] * 3)
    torch.testing.assert_close(scores, torch.tensor([0.5, 1.0, 0.6]))


def test_brightness_gradient_is_uniform():
    n, h, w = 2, 6, 7
    images = torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(0))
    scores, grad = build_reward("brightness").score_and_grad(images, ["a", "b"])
    torch.testing.assert_close(scores, images.mean(dim=(1, 2, 3)))
    assert grad.shape == (n, 3, h, w) and grad.dtype == torch.float32
    torch.testing.assert_close(grad, torch.full_like(grad, 1 / (3 * h * w)), rtol=0, atol=1e-9)


def test_brightness_gradient_matches_finite_differences():
    images = torch.rand(2, 3, 3, 4, generator=torch.Generator().manual_seed(1)) * 0.8 + 0.1
    reward = build_reward("brightness")
    _, grad = reward.score_and_grad(images, ["a", "b"])
    torch.testing.assert_close(grad.double(), _finite_difference_grad(reward, images, ["a", "b"]), rtol=1e-5, atol=1e-7)


def test_saturation_closed_form():
    h, w = 2, 2
    images = torch.zeros(3, 3, h, w)
    images[0] = 0.7  # grey: no chroma
    images[1, 0], images[1, 1], images[1, 2] = 1.0, 0.2, 0.5  # one colour everywhere: 1.0 - 0.2
    images[2, 0, 0, 0] = 1.0  # one pure red pixel of four, rest black
    scores = build_reward("saturation").score(images, ["a"] * 3)
    torch.testing.assert_close(scores, torch.tensor([0.0, 0.8, 0.25]))


def test_saturation_gradient_closed_form_and_finite_differences():
    h, w = 3, 4
    images = torch.rand(2, 3, h, w, generator=torch.Generator().manual_seed(2)) * 0.8 + 0.1  # ties have prob. 0
    reward = build_reward("saturation")
    _, grad = reward.score_and_grad(images, ["a", "b"])
    expected = torch.zeros_like(images)
    expected.scatter_(1, images.argmax(dim=1, keepdim=True), 1 / (h * w))
    expected.scatter_(1, images.argmin(dim=1, keepdim=True), -1 / (h * w))
    torch.testing.assert_close(grad, expected, rtol=0, atol=1e-9)
    torch.testing.assert_close(grad.double(), _finite_difference_grad(reward, images, ["a", "b"]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", ["brightness", "saturation"])
def test_forward_differentiable_keeps_dtype_and_graph(name):
    images = torch.rand(2, 3, 4, 4, dtype=torch.float64).requires_grad_(True)
    scores = build_reward(name).forward_differentiable(images, ["a", "b"])
    assert scores.shape == (2,) and scores.dtype == torch.float64 and scores.requires_grad

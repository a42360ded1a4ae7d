"""Registry, input validation, and WeightedReward (rewards/base.py)."""

from types import SimpleNamespace

import pytest
import torch

from rlhf_diffusion.rewards import (
    REWARD_REGISTRY,
    NotDifferentiableError,
    RewardModel,
    WeightedReward,
    build_reward,
    register_reward,
)
from rlhf_diffusion.rewards.compressibility import jpeg_size_kb


def _images(n=2, h=8, w=8, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def temp_reward():
    """Registers throw-away reward classes and removes them afterwards (the registry is global)."""
    added = []

    def register(name, cls):
        register_reward(name)(cls)
        added.append(name)
        return cls

    yield register
    for name in added:
        REWARD_REGISTRY.pop(name, None)


# --- registry ---------------------------------------------------------------------------------------------------


def test_builtin_rewards_are_registered():
    for name in ("jpeg_compressibility", "jpeg_incompressibility", "brightness", "saturation"):
        assert REWARD_REGISTRY[name].name == name


def test_unknown_reward_error_lists_registered_names():
    with pytest.raises(ValueError) as e:
        build_reward("aesthetc")
    msg = str(e.value)
    assert "unknown reward 'aesthetc'" in msg
    for name in ("brightness", "jpeg_compressibility", "jpeg_incompressibility", "saturation"):
        assert name in msg


def test_duplicate_registration_raises():
    class Other(RewardModel):
        differentiable = True

        def _score(self, images, prompts):
            return images.mean(dim=(1, 2, 3))

    with pytest.raises(ValueError, match="'brightness' is already registered"):
        register_reward("brightness")(Other)
    assert REWARD_REGISTRY["brightness"] is not Other


def test_register_requires_differentiable_flag(temp_reward):
    class NoFlag(RewardModel):
        def _score(self, images, prompts):
            return images.mean(dim=(1, 2, 3))

    with pytest.raises(TypeError, match="differentiable"):
        temp_reward("test_no_flag", NoFlag)
    assert "test_no_flag" not in REWARD_REGISTRY


def test_build_reward_kwargs_are_checked():
    assert build_reward("jpeg_compressibility", quality=50).quality == 50
    with pytest.raises(ValueError, match=r"reward 'jpeg_compressibility' got unknown argument\(s\) 'qualty'"):
        build_reward("jpeg_compressibility", qualty=50)
    with pytest.raises(ValueError, match="reward 'brightness' loads no weights and takes no path"):
        build_reward("brightness", path="/some/dir")
    with pytest.raises(ValueError, match="quality must be an integer"):
        build_reward("jpeg_incompressibility", quality=0)


def test_build_reward_passes_path_and_requires_it(temp_reward, tmp_path):
    class Loaded(RewardModel):
        differentiable = True

        def __init__(self, path: str, scale: float = 1.0):
            self.path, self.scale = path, scale

        def _score(self, images, prompts):
            return self.scale * images.mean(dim=(1, 2, 3))

    temp_reward("test_loaded", Loaded)
    reward = build_reward("test_loaded", path=str(tmp_path), scale=2.0)
    assert (reward.path, reward.scale) == (str(tmp_path), 2.0)
    with pytest.raises(ValueError, match=r"reward 'test_loaded' needs argument\(s\) 'path'"):
        build_reward("test_loaded")


def test_wrong_output_shape_is_reported(temp_reward):
    class Bad(RewardModel):
        differentiable = False

        def _score(self, images, prompts):
            return images.mean(dim=(2, 3))  # (N, 3): forgot the channel dim

    reward = temp_reward("test_bad_shape", Bad)()
    with pytest.raises(RuntimeError, match=r"reward 'test_bad_shape' returned scores of shape \(2, 3\)"):
        reward.score(_images(), ["a", "b"])


# --- input validation -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["brightness", "jpeg_compressibility"])
@pytest.mark.parametrize(
    "images, prompts, match",
    [
        (torch.rand(3, 8, 8), ["a", "b", "c"], "4 dims"),
        (torch.rand(2, 1, 8, 8), ["a", "b"], "3 channels"),
        (torch.rand(2, 4, 8, 8), ["a", "b"], "3 channels"),
        (torch.randint(0, 255, (2, 3, 8, 8), dtype=torch.uint8), ["a", "b"], "floating"),
        (torch.rand(2, 3, 8, 8) * 2 - 1, ["a", "b"], r"values in \[0, 1\]"),
        (torch.rand(2, 3, 8, 8) + 1.01, ["a", "b"], r"values in \[0, 1\]"),
        (torch.full((2, 3, 8, 8), float("nan")), ["a", "b"], "NaN"),
        (torch.rand(2, 3, 8, 8), ["a"], "2 images but 1 prompts"),
        (torch.rand(2, 3, 8, 8), "ab", "sequence of strings"),
        (torch.rand(0, 3, 8, 8), [], "non-empty"),
    ],
)
def test_input_validation(name, images, prompts, match):
    reward = build_reward(name)
    with pytest.raises(ValueError, match=match):
        reward.score(images, prompts)


def test_validation_also_guards_gradients():
    with pytest.raises(ValueError, match="3 channels"):
        build_reward("brightness").score_and_grad(torch.rand(2, 1, 8, 8), ["a", "b"])


def test_small_overshoot_is_tolerated():
    images = _images().clamp(0, 1)
    images[0, 0, 0, 0] = 1.0 + 5e-5
    images[1, 0, 0, 0] = -5e-5
    assert build_reward("brightness").score(images, ["a", "b"]).shape == (2,)


def test_score_returns_cpu_float32_without_graph():
    images = _images().double().requires_grad_(True)
    scores = build_reward("brightness").score(images, ["a", "b"])
    assert scores.dtype == torch.float32 and scores.device.type == "cpu" and not scores.requires_grad


def test_score_and_grad_leaves_caller_graph_alone():
    images = _images().requires_grad_(True)
    build_reward("brightness").score_and_grad(images, ["a", "b"])
    assert images.grad is None


# --- WeightedReward ---------------------------------------------------------------------------------------------


def test_weighted_total_is_weighted_sum():
    images, prompts = _images(3), ["a", "b", "c"]
    brightness, saturation, jpeg = (build_reward(n) for n in ("brightness", "saturation", "jpeg_incompressibility"))
    weighted = WeightedReward([(brightness, 2.0), (saturation, -0.5), (jpeg, 0.25)])
    result = weighted.score(images, prompts)
    assert list(result.per_reward) == ["brightness", "saturation", "jpeg_incompressibility"] == weighted.names
    expected = (
        2.0 * brightness.score(images, prompts) - 0.5 * saturation.score(images, prompts) + 0.25 * jpeg_size_kb(images)
    )
    torch.testing.assert_close(result.total, expected)
    torch.testing.assert_close(result.per_reward["jpeg_incompressibility"], jpeg_size_kb(images))
    assert result.total.shape == (3,) and result.total.dtype == torch.float32


def test_weighted_gradient_is_weighted_sum_of_gradients():
    images, prompts = _images(2, 6, 5), ["a", "b"]
    brightness, saturation = build_reward("brightness"), build_reward("saturation")
    weighted = WeightedReward([(brightness, 3.0), (saturation, -2.0)])
    assert weighted.differentiable
    result, grad = weighted.score_and_grad(images, prompts)
    _, g_b = brightness.score_and_grad(images, prompts)
    _, g_s = saturation.score_and_grad(images, prompts)
    torch.testing.assert_close(grad, 3.0 * g_b - 2.0 * g_s)
    torch.testing.assert_close(result.total, weighted.score(images, prompts).total)
    # and the graph version agrees with it
    x = images.clone().requires_grad_(True)
    (g_graph,) = torch.autograd.grad(weighted.forward_differentiable(x, prompts).sum(), x)
    torch.testing.assert_close(g_graph, grad)


def test_weighted_with_jpeg_is_not_differentiable():
    weighted = WeightedReward([(build_reward("brightness"), 1.0), (build_reward("jpeg_compressibility"), 0.1)])
    assert not weighted.differentiable
    with pytest.raises(NotDifferentiableError, match="'jpeg_compressibility'") as e:
        weighted.score_and_grad(_images(), ["a", "b"])
    assert "brightness" not in str(e.value)
    with pytest.raises(NotDifferentiableError, match="jpeg_compressibility"):
        weighted.forward_differentiable(_images(), ["a", "b"])
    assert weighted.score(_images(), ["a", "b"]).total.shape == (2,)  # scoring still works


def test_weighted_rejects_duplicates_and_bad_weights():
    b = build_reward("brightness")
    with pytest.raises(ValueError, match="'brightness' appears twice"):
        WeightedReward([(b, 1.0), (build_reward("brightness"), 2.0)])
    with pytest.raises(ValueError, match="finite number"):
        WeightedReward([(b, float("nan"))])
    with pytest.raises(ValueError, match="at least one"):
        WeightedReward([])


def test_from_specs_duck_types_config_entries():
    specs = [
        SimpleNamespace(name="brightness", weight=1.5, path=None, kwargs={}),
        SimpleNamespace(name="jpeg_compressibility", weight=-1.0, path=None, kwargs={"quality": 80}),
    ]
    weighted = WeightedReward.from_specs(specs)
    assert weighted.names == ["brightness", "jpeg_compressibility"]
    assert weighted.weights == {"brightness": 1.5, "jpeg_compressibility": -1.0}
    assert weighted.terms[1][0].quality == 80
    with pytest.raises(ValueError, match="unknown reward 'nope'"):
        WeightedReward.from_specs([SimpleNamespace(name="nope", weight=1.0, path=None, kwargs=None)])

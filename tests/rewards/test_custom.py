"""Custom rewards loaded by import path (rewards/custom.py, `rewards: [{name: custom, target: ...}]`).

The user modules are written into a temporary directory and put on sys.path, as a user's package would be.
"""

import json
import sys
import textwrap

import pytest
import torch

from rlhf_diffusion.algorithms.common import preference_labels
from rlhf_diffusion.config import ConfigError, parse_config
from rlhf_diffusion.rewards import (
    CustomReward,
    CustomRewardError,
    NotDifferentiableError,
    RewardModel,
    WeightedReward,
    build_reward,
    load_custom_reward,
)
from rlhf_diffusion.testing import tiny_loop_run_config
from rlhf_diffusion.workers.reward_server import RewardHost

MY_REWARDS = '''
import torch
from rlhf_diffusion.rewards import RewardModel


class Redness(RewardModel):
    """scale * mean red channel; d/dx = scale / (H W) on the red channel, 0 elsewhere."""

    differentiable = True

    def __init__(self, scale=1.0, counter_file=None):
        self.scale = scale
        self.counter_file = counter_file

    def _score(self, images, prompts):
        if self.counter_file is not None and images.requires_grad:  # a gradient call (TailorPO-G guidance)
            with open(self.counter_file, "a") as f:
                f.write(" ".join(map(str, images.shape)) + "\\n")
        return self.scale * images[:, 0].mean(dim=(1, 2))


class Blueness(RewardModel):
    differentiable = False

    def _score(self, images, prompts):
        return images[:, 2].mean(dim=(1, 2))


class DuckBrightness:
    """No RewardModel: just score / forward_differentiable."""

    def __init__(self, offset=0.0):
        self.offset = offset
        self.moved_to = None

    def to(self, device):
        self.moved_to = str(device)
        return self

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3)) + self.offset

    def forward_differentiable(self, images, prompts):
        return images.mean(dim=(1, 2, 3)) + self.offset


class PromptLength:
    """Duck-typed and not differentiable (no forward_differentiable)."""

    def score(self, images, prompts):
        return torch.tensor([float(len(p)) for p in prompts])


class WeightsFrom:
    def __init__(self, path, bias=0.0):
        self.path = path
        self.bias = bias

    def score(self, images, prompts):
        return torch.full((images.shape[0],), float(len(self.path)) + self.bias)


def make_redness(scale=2.0):
    return Redness(scale=scale)


class NeedsArg:
    def __init__(self, required):
        self.required = required

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


class RaisesInInit:
    def __init__(self):
        raise RuntimeError("weights not found")


class NoScore:
    pass


class Abstract(RewardModel):
    differentiable = True


class WrongShape:
    def score(self, images, prompts):
        return images.mean(dim=(2, 3))  # (B, 3)


class NaNScore:
    def score(self, images, prompts):
        return torch.full((images.shape[0],), float("nan"))


class Detached:
    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3))

    def forward_differentiable(self, images, prompts):
        return images.mean(dim=(1, 2, 3)).detach()


class Crashes:
    def score(self, images, prompts):
        raise KeyError("lookup failed")


class ClaimsGradient:
    differentiable = True

    def score(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


NOT_CALLABLE = 3
BUILTIN_ALIAS = exec  # a builtin re-exported by a user module
'''

MODULES = {
    "my_rewards": MY_REWARDS,
    "broken_rewards": "raise ZeroDivisionError('boom at import')\n",
    "needs_dep_rewards": "import definitely_missing_dependency_xyz\n",
}


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("user_code")
    for name, text in MODULES.items():
        (directory / f"{name}.py").write_text(textwrap.dedent(text))
    return directory


@pytest.fixture(autouse=True)
def on_path(user_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(user_dir))
    yield
    for name in MODULES:
        sys.modules.pop(name, None)


def _images(n=2, h=4, w=4, seed=0):
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


PROMPTS = ["a cat", "a dog"]


# --- loading each form: score and gradient values ---------------------------------------------------------------


def test_reward_model_subclass_scores_and_gradient():
    reward = load_custom_reward("my_rewards:Redness", scale=3.0)
    assert isinstance(reward, RewardModel) and isinstance(reward, CustomReward)
    assert reward.name == "Redness" and reward.differentiable and reward.inner.scale == 3.0
    images = _images()
    scores, grad = reward.score_and_grad(images, PROMPTS)
    torch.testing.assert_close(scores, 3.0 * images[:, 0].mean(dim=(1, 2)))
    expected = torch.zeros_like(images)
    expected[:, 0] = 3.0 / (4 * 4)
    torch.testing.assert_close(grad, expected)
    torch.testing.assert_close(reward.score(images, PROMPTS), scores)


def test_duck_typed_class_is_wrapped_and_differentiable():
    reward = load_custom_reward("my_rewards:DuckBrightness", offset=0.5)
    assert reward.differentiable and reward.name == "DuckBrightness"
    assert reward.inner.moved_to == "cpu"  # its own to() was called with the device
    images = _images()
    scores, grad = reward.score_and_grad(images, PROMPTS)
    torch.testing.assert_close(scores, images.mean(dim=(1, 2, 3)) + 0.5)
    torch.testing.assert_close(grad, torch.full_like(images, 1 / (3 * 4 * 4)))


def test_factory_function_and_default_kwargs():
    reward = load_custom_reward("my_rewards:make_redness")
    assert reward.name == "make_redness" and reward.inner.scale == 2.0
    images = _images()
    torch.testing.assert_close(reward.score(images, PROMPTS), 2.0 * images[:, 0].mean(dim=(1, 2)))


def test_non_differentiable_rewards_refuse_gradients():
    for target in ("my_rewards:Blueness", "my_rewards:PromptLength"):
        reward = load_custom_reward(target)
        assert not reward.differentiable
        with pytest.raises(NotDifferentiableError, match=target):
            reward.score_and_grad(_images(), PROMPTS)
    torch.testing.assert_close(
        load_custom_reward("my_rewards:PromptLength").score(_images(), PROMPTS), torch.tensor([5.0, 5.0])
    )


def test_path_and_kwargs_are_passed_through_build_reward():
    reward = build_reward("custom", target="my_rewards:WeightsFrom", path="/w/x.pt", bias=1.0)
    assert reward.inner.path == "/w/x.pt" and reward.inner.bias == 1.0
    torch.testing.assert_close(reward.score(_images(), PROMPTS), torch.tensor([8.0, 8.0]))  # len(path) + bias
    with pytest.raises(ValueError, match="only for name 'custom'"):
        build_reward("brightness", target="my_rewards:Redness")


# --- errors name the target -------------------------------------------------------------------------------------

LOAD_ERRORS = [
    ("my_rewards", {}, "expected 'package.module:Attribute'"),
    ("no_such_user_module:Reward", {}, "cannot import module 'no_such_user_module'"),
    ("my_rewards:Nope", {}, "has no attribute 'Nope'; it defines: "),
    ("broken_rewards:Reward", {}, "importing module 'broken_rewards' raised ZeroDivisionError: boom at import"),
    ("needs_dep_rewards:Reward", {}, "definitely_missing_dependency_xyz"),
    ("my_rewards:NOT_CALLABLE", {}, "not a class or a factory"),
    ("my_rewards:Redness", {"colour": "red"}, "cannot be called with colour='red'"),
    ("my_rewards:NeedsArg", {}, "missing a required argument: 'required'"),
    ("my_rewards:RaisesInInit", {}, "raised RuntimeError: weights not found"),
    ("my_rewards:NoScore", {}, "not a reward: it needs a method score(images, prompts)"),
    ("my_rewards:Abstract", {}, "does not implement _score"),
    ("my_rewards:ClaimsGradient", {}, "declares differentiable = True but has no method forward_differentiable"),
]


@pytest.mark.parametrize("target, kwargs, fragment", LOAD_ERRORS, ids=[t for t, _, _ in LOAD_ERRORS])
def test_load_errors_are_one_clear_message_naming_the_target(target, kwargs, fragment):
    with pytest.raises(CustomRewardError) as info:
        load_custom_reward(target, **kwargs)
    message = str(info.value)
    assert repr(target) in message and fragment in message, message


@pytest.mark.parametrize(
    "target, kwargs, fragment",
    [
        ("os:system", {"command": "touch {marker}"}, "standard library"),
        ("subprocess:run", {"args": ["touch", "{marker}"]}, "standard library"),
        ("os.path:join", {"a": "{marker}"}, "standard library"),
        ("builtins:exec", {"source": "open({marker!r}, 'w')"}, "standard library"),
        ("my_rewards:BUILTIN_ALIAS", {"source": "open({marker!r}, 'w')"}, "not a class or a Python function"),
    ],
)
def test_targets_that_are_not_reward_code_are_refused_before_anything_is_called(target, kwargs, fragment, tmp_path):
    """A config is code, but a target in the standard library, or an attribute that is a builtin rather than a class
    or a Python function, is refused before it is called: the probe's `os:system` ran a shell command first."""
    marker = str(tmp_path / "ran")

    def fill(value):
        if isinstance(value, list):
            return [fill(v) for v in value]
        return value.replace("{marker!r}", repr(marker)).replace("{marker}", marker)

    with pytest.raises(CustomRewardError) as info:
        load_custom_reward(target, **{k: fill(v) for k, v in kwargs.items()})
    assert repr(target) in str(info.value) and fragment in str(info.value), str(info.value)
    assert not (tmp_path / "ran").exists()


def test_missing_module_says_how_to_ship_it():
    with pytest.raises(CustomRewardError) as info:
        load_custom_reward("no_such_user_module:Reward")
    message = str(info.value)
    assert "every Ray node" in message and "--working-dir" in message and "py_modules" in message
    assert "PYTHONPATH" in message


@pytest.mark.parametrize(
    "target, fragment",
    [
        ("my_rewards:WrongShape", "returned scores of shape (2, 3), expected (2,)"),
        ("my_rewards:NaNScore", "returned non-finite scores"),
    ],
)
def test_bad_scores_are_caught_at_scoring_time(target, fragment):
    reward = WeightedReward.from_specs([_spec(target)])
    with pytest.raises(CustomRewardError) as info:
        reward.score(_images(), PROMPTS)
    assert str(info.value).startswith(f"rewards.0.target: custom reward {target!r}") and fragment in str(info.value)


def test_detached_gradient_and_user_exceptions_name_the_target():
    with pytest.raises(CustomRewardError, match="without an autograd graph"):
        load_custom_reward("my_rewards:Detached").score_and_grad(_images(), PROMPTS)
    with pytest.raises(KeyError) as info:  # the user's own exception, with a note naming the reward
        load_custom_reward("my_rewards:Crashes").score(_images(), PROMPTS)
    assert any("'my_rewards:Crashes'" in note for note in info.value.__notes__)


def test_errors_from_specs_name_the_config_entry():
    with pytest.raises(CustomRewardError) as info:
        WeightedReward.from_specs([_spec(None, name="brightness"), _spec("my_rewards:Nope")])
    assert str(info.value).startswith("rewards.1.target: custom reward 'my_rewards:Nope': ")
    with pytest.raises(CustomRewardError, match="rewards.0.target: required for name 'custom'"):
        WeightedReward.from_specs([_spec(None)])


# --- config validation ------------------------------------------------------------------------------------------


def _config(rewards, algorithm="d3po"):
    return {"model": {"pretrained": "tiny:sd15"}, "algorithm": {"name": algorithm}, "rewards": rewards}


@pytest.mark.parametrize(
    "rewards, path, fragment",
    [
        ([{"name": "custom"}], "rewards.0.target", "required for name 'custom'"),
        ([{"name": "custom", "target": "my_rewards"}], "rewards.0.target", "expected 'package.module:Attribute'"),
        ([{"name": "aesthetic", "target": "my_rewards:Redness"}], "rewards.0.target", "only for name 'custom'"),
        (
            [{"name": "custom", "target": "a:Redness"}, {"name": "custom", "target": "b.c:Redness"}],
            "rewards.1.label",
            "duplicate reward key 'Redness' (already the key of rewards.0)",
        ),
        (
            [{"name": "brightness"}, {"name": "custom", "target": "m:R", "label": "brightness"}],
            "rewards.1.label",
            "duplicate reward key 'brightness'",
        ),
    ],
)
def test_config_refuses_bad_custom_entries(rewards, path, fragment):
    with pytest.raises(ConfigError) as info:
        parse_config(_config(rewards))
    assert f"  {path}: {fragment}" in str(info.value), str(info.value)


def test_config_keys_labels_and_defaults():
    config = parse_config(
        _config(
            [
                {"name": "custom", "target": "my_rewards:Redness", "kwargs": {"scale": 2}, "weight": 0.5},
                {"name": "custom", "target": "other.mod:Redness", "label": "redness_2"},
                {"name": "brightness"},
                {"name": "brightness", "label": "brightness_2"},
            ]
        )
    )
    assert [r.key for r in config.rewards] == ["Redness", "redness_2", "brightness", "brightness_2"]
    assert config.rewards[0].target == "my_rewards:Redness" and config.rewards[0].kwargs == {"scale": 2}


# --- combining with built-ins -----------------------------------------------------------------------------------


def _spec(target, name="custom", weight=1.0, label=None, path=None, kwargs=None):
    from types import SimpleNamespace

    return SimpleNamespace(name=name, target=target, weight=weight, label=label, path=path, kwargs=kwargs or {})


def test_weighted_sum_of_builtin_and_custom_reward_from_the_config():
    config = parse_config(
        _config(
            [
                {"name": "brightness", "weight": 2.0},
                {
                    "name": "custom",
                    "target": "my_rewards:Redness",
                    "kwargs": {"scale": 3.0},
                    "weight": -0.5,
                    "label": "red",
                },
            ]
        )
    )
    reward = WeightedReward.from_specs(config.rewards)
    assert reward.names == ["brightness", "red"] and reward.weights == {"brightness": 2.0, "red": -0.5}
    images = _images()
    result, grad = reward.score_and_grad(images, PROMPTS)
    brightness, red = images.mean(dim=(1, 2, 3)), 3.0 * images[:, 0].mean(dim=(1, 2))
    torch.testing.assert_close(result.per_reward["red"], red)
    torch.testing.assert_close(result.total, 2.0 * brightness - 0.5 * red)
    expected = torch.full_like(images, 2.0 / (3 * 16))
    expected[:, 0] -= 0.5 * 3.0 / 16
    torch.testing.assert_close(grad, expected)


def test_reward_host_serves_custom_rewards_and_describes_them():
    host = RewardHost([_spec("my_rewards:Redness", label="red"), _spec("my_rewards:Blueness", weight=-1.0)], "cpu")
    assert host.describe() == {
        "names": ["red", "Blueness"],
        "weights": {"red": 1.0, "Blueness": -1.0},
        "differentiable": False,
        "not_differentiable": ["'Blueness' (custom reward 'my_rewards:Blueness' (rewards.1.target))"],
    }
    a, b = _images(seed=1), _images(n=1, seed=2)
    out = host.score_many([(a, PROMPTS), (b, ["x"])])
    torch.testing.assert_close(out[1].per_reward["Blueness"], b[:, 2].mean(dim=(1, 2)))
    with pytest.raises(NotDifferentiableError, match=r"'Blueness' \(custom reward 'my_rewards:Blueness'"):
        host.score_and_grad_many([(a, PROMPTS)])


def test_pareto_labels_over_a_builtin_and_a_custom_reward():
    reward = WeightedReward.from_specs(
        [_spec(None, name="brightness"), _spec("my_rewards:Redness", weight=-1.0, label="red")]
    )
    # pair 0: sample 0 brighter and less red (red is minimised) → 0 wins; pair 1: brighter but redder → tie
    images = (
        torch.stack(
            [
                torch.tensor([0.2, 0.9, 0.9]),
                torch.tensor([0.5, 0.1, 0.1]),  # pair 0, sample 0 / pair 1, sample 0
                torch.tensor([0.4, 0.2, 0.2]),
                torch.tensor([0.2, 0.1, 0.1]),  # pair 0, sample 1 / pair 1, sample 1
            ]
        )
        .view(4, 3, 1, 1)
        .expand(4, 3, 2, 2)
    )
    result = reward.score(images, ["p"] * 4)
    per_reward = {k: v.view(2, 2).T for k, v in result.per_reward.items()}  # (P, 2), as sample_ranked_pairs
    assert list(per_reward) == ["brightness", "red"]
    labels = preference_labels(per_reward, reward.weights, "pareto")
    assert labels.tolist() == [0, -1]


# --- end to end: a custom reward from a user module trains TailorPO-G -------------------------------------------


def _run_config(model_dir, output_dir, run_name, rewards):
    return tiny_loop_run_config(
        model_dir,
        output_dir,
        run_name,
        {"name": "tailorpo_g", "num_candidates": 2},
        seed=0,
        eval_prompts=["a horse"],
        rewards=rewards,
        model={"lora": {"rank": 4}},
        resources={"num_samplers": 1},
        train={"iterations": 2, "train_batch_size": 4, "max_staleness": 0},
        checkpoint={"every": 0, "keep_last": 1},
    )


def test_custom_reward_from_a_user_module_trains_tailorpo_g(tiny_sd15_dir, tmp_path, one_torch_thread):
    from rlhf_diffusion.trainer import Trainer

    counter = tmp_path / "gradient_calls.txt"
    rewards = [
        {
            "name": "custom",
            "target": "my_rewards:Redness",
            "label": "redness",
            "weight": 2.0,
            "kwargs": {"scale": 1.0, "counter_file": str(counter)},
        }
    ]
    config = parse_config(_run_config(tiny_sd15_dir, tmp_path, "custom_g", rewards))
    result = Trainer(config, use_ray=False, log=lambda *_: None).fit()
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [1.0, 2.0]
    assert all("reward/redness_mean" in r for r in lines)
    assert all(0.0 <= r["reward/redness_mean"] <= 1.0 for r in lines)
    # TailorPO-G's guidance asked the custom reward for its gradient at every step of every rollout:
    # 2 iterations x 3 steps, each on the 2 winners (64x64 images of the tiny pipeline)
    assert counter.read_text().splitlines() == ["2 3 64 64"] * 6


@pytest.mark.parametrize("algorithm", [{"name": "tailorpo_g", "num_candidates": 2}, {"name": "draft"}])
def test_reward_gradient_methods_with_a_non_differentiable_custom_reward_fail_at_build_time(
    algorithm, tiny_sd15_dir, tmp_path, one_torch_thread
):
    from rlhf_diffusion.trainer import Trainer

    rewards = [{"name": "custom", "target": "my_rewards:Blueness", "label": "blue"}]
    data = _run_config(tiny_sd15_dir, tmp_path, "custom_nd", rewards)
    data["algorithm"] = algorithm
    config = parse_config(data)  # the config cannot know
    with pytest.raises(ValueError) as info:
        Trainer(config, use_ray=False, log=lambda *_: None)
    message = str(info.value)
    assert f"algorithm {algorithm['name']} needs a reward gradient" in message
    assert "'blue'" in message and "my_rewards:Blueness" in message


def test_custom_reward_ranks_d3po_pairs(tiny_sd15_dir, tmp_path, one_torch_thread):
    from rlhf_diffusion.trainer import Trainer

    data = _run_config(
        tiny_sd15_dir,
        tmp_path,
        "custom_d3po",
        [{"name": "brightness"}, {"name": "custom", "target": "my_rewards:Redness", "label": "red"}],
    )
    data["algorithm"] = {"name": "d3po"}
    data["train"]["iterations"] = 1
    result = Trainer(parse_config(data), use_ray=False, log=lambda *_: None).fit()
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert "reward/red_mean" in lines[0] and "reward/brightness_mean" in lines[0]


@pytest.mark.parametrize(
    "section, target, fragment",
    [
        ("rewards", "my_rewards:NaNScore", "returned non-finite scores"),
        ("rewards", "my_rewards:WrongShape", "expected (2,)"),
        ("heldout", "my_rewards:NaNScore", "returned non-finite scores"),
        ("rewards", "my_rewards:NeedsArg", "missing a required argument"),
    ],
)
def test_a_broken_custom_reward_fails_before_the_run_starts(section, target, fragment, user_dir, tmp_path):
    """The probe's NaN / wrong-shape custom reward was found only after the pre-training evaluation (leaving a
    FAILED MLflow run); `launch` now scores a probe batch with it before Ray starts or a model loads."""
    import os
    import subprocess
    from pathlib import Path

    entry = f"[{{name: custom, target: '{target}'}}]"
    override = f"rewards={entry}" if section == "rewards" else f"guards.heldout_rewards={entry}"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(user_dir), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-m", "rlhf_diffusion.launch", "configs/tiny.yaml", "--set", f"output_dir={tmp_path}",
         "--set", override],
        cwd=Path(__file__).resolve().parents[2], capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stdout + proc.stderr
    where = "rewards.0.target" if section == "rewards" else "guards.heldout_rewards.0.target"
    assert where in proc.stderr and repr(target) in proc.stderr and fragment in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "[launch]" not in proc.stdout
    assert not (tmp_path / "mlflow.db").exists()

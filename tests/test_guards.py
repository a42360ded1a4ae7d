"""Reward-hacking guards (`guards:`): the config's checks, held-out rewards hosted apart from the training rewards,
the early-stop rule, the per-step KL metrics of the learner, and short real in-process runs (tiny SD1.5, real sqlite
MLflow store) that log heldout/<key> beside the training reward and stop early, or do not.

The runs use a test reward, `Drift`, whose score is minus the mean absolute pixel change of an evaluation image
from the first image it scored for the same (prompt, seed row): 0 before training, < 0 as soon as training moves the
weights. So "it fell" is a property of training itself, not of which way a tiny random model happens to drift.
"""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from rlhf_diffusion.config import ConfigError, EarlyStopConfig, flatten_config, parse_config
from rlhf_diffusion.rewards.custom import CustomRewardError
from rlhf_diffusion.trainer import EarlyStopGuard, LocalTrainer, ResumeError, relative_drop
from rlhf_diffusion.workers.learner import GroupedMeans
from rlhf_diffusion.workers.reward_server import RewardHost, build_heldout_reward

DRIFT_MODULE = '''
import torch


class Drift:
    """-mean |image - the first image scored for the same (prompt, row)|: 0 until the images change."""

    def __init__(self):
        self.first = {}

    def score(self, images, prompts):
        out = []
        for row, (image, prompt) in enumerate(zip(images, prompts)):
            first = self.first.setdefault((prompt, row, tuple(image.shape)), image.clone())
            out.append(-(image - first).abs().mean())
        return torch.stack(out)
'''


def minimal(**guards) -> dict:
    return {
        "model": {"pretrained": "tiny:sd15"},
        "algorithm": {"name": "tailorpo"},
        "rewards": [{"name": "jpeg_compressibility"}],
        "guards": guards,
    }


# ---------------------------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------------------------


def test_default_guards_are_off_but_kl_logging():
    config = parse_config(minimal())
    assert config.guards.heldout_rewards == [] and config.guards.early_stop is None
    assert config.guards.every == 0 and config.guards.log_kl is True
    flat = flatten_config(config)
    assert flat["guards.heldout_rewards"] == "[]" and flat["guards.early_stop"] == "null"


def test_a_full_guards_section_parses_and_flattens():
    config = parse_config(
        minimal(
            heldout_rewards=[
                {"name": "jpeg_incompressibility"},
                {"name": "custom", "target": "pkg.mod:Drift"},
                {"name": "saturation", "label": "sat"},
            ],
            every=5,
            early_stop={"reward": "Drift", "drop_fraction": 0.2, "patience": 2, "min_scale": 1.0},
        )
    )
    assert [r.key for r in config.guards.heldout_rewards] == ["jpeg_incompressibility", "Drift", "sat"]
    assert config.guards.early_stop == EarlyStopConfig(reward="Drift", drop_fraction=0.2, patience=2, min_scale=1.0)
    flat = flatten_config(config)
    assert flat["guards.heldout_rewards.1.target"] == "pkg.mod:Drift" and flat["guards.early_stop.patience"] == "2"


BAD_GUARDS = [
    (
        "trained_reward_held_out",
        {"heldout_rewards": [{"name": "jpeg_compressibility"}]},
        "guards.heldout_rewards.0: is the same reward model as rewards.0",
    ),
    (
        "trained_reward_relabelled",
        {"heldout_rewards": [{"name": "jpeg_compressibility", "label": "other"}]},
        "guards.heldout_rewards.0: is the same reward model as rewards.0",
    ),
    (
        "key_collides_with_training",
        {"heldout_rewards": [{"name": "saturation", "label": "jpeg_compressibility"}]},
        "guards.heldout_rewards.0.label: key 'jpeg_compressibility' is also the key of rewards.0",
    ),
    (
        "custom_key_collides",
        {"heldout_rewards": [{"name": "custom", "target": "pkg:jpeg_compressibility"}]},
        "guards.heldout_rewards.0.target: key 'jpeg_compressibility' is also the key of rewards.0",
    ),
    (
        "duplicate_heldout",
        {"heldout_rewards": [{"name": "saturation"}, {"name": "saturation"}]},
        "guards.heldout_rewards.1.name: duplicate reward (already guards.heldout_rewards.0.name)",
    ),
    (
        "duplicate_heldout_label",
        {"heldout_rewards": [{"name": "saturation", "label": "x"}, {"name": "brightness", "label": "x"}]},
        "guards.heldout_rewards.1.label: duplicate reward key 'x' (already the key of guards.heldout_rewards.0)",
    ),
    (
        "weight",
        {"heldout_rewards": [{"name": "saturation", "weight": -1.0}]},
        "guards.heldout_rewards.0.weight: has no effect on a held-out reward",
    ),
    (
        "early_stop_unknown_reward",
        {"heldout_rewards": [{"name": "saturation"}], "early_stop": {"reward": "brightness", "drop_fraction": 0.1}},
        "guards.early_stop.reward: is not the key of a held-out reward (valid: 'saturation')",
    ),
    (
        "early_stop_without_heldout",
        {"early_stop": {"reward": "saturation", "drop_fraction": 0.1}},
        "guards.early_stop.reward: is not the key of a held-out reward (valid: none: guards.heldout_rewards is empty)",
    ),
    (
        "early_stop_training_reward",
        {
            "heldout_rewards": [{"name": "saturation"}],
            "early_stop": {"reward": "jpeg_compressibility", "drop_fraction": 0.1},
        },
        "guards.early_stop.reward: is not the key of a held-out reward",
    ),
    (
        "negative_drop",
        {"heldout_rewards": [{"name": "saturation"}], "early_stop": {"reward": "saturation", "drop_fraction": -0.1}},
        "guards.early_stop.drop_fraction: Input should be greater than or equal to 0",
    ),
    (
        "drop_required",
        {"heldout_rewards": [{"name": "saturation"}], "early_stop": {"reward": "saturation"}},
        "guards.early_stop.drop_fraction: required field is missing",
    ),
    (
        "zero_patience",
        {
            "heldout_rewards": [{"name": "saturation"}],
            "early_stop": {"reward": "saturation", "drop_fraction": 0.1, "patience": 0},
        },
        "guards.early_stop.patience: Input should be greater than or equal to 1",
    ),
    ("negative_every", {"every": -1}, "guards.every: Input should be greater than or equal to 0"),
    ("unknown_key", {"log_kls": False}, "guards.log_kls: unknown key (did you mean 'log_kl'?)"),
]


@pytest.mark.parametrize("guards, message", [case[1:] for case in BAD_GUARDS], ids=[case[0] for case in BAD_GUARDS])
def test_bad_guards_name_the_field(guards, message):
    with pytest.raises(ConfigError) as info:
        parse_config(minimal(**guards))
    assert message in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Held-out rewards live beside the training rewards on the reward host, never inside them
# ---------------------------------------------------------------------------------------------------------------


def test_reward_host_keeps_heldout_rewards_out_of_the_training_reward():
    config = parse_config(
        {
            **minimal(heldout_rewards=[{"name": "saturation"}, {"name": "jpeg_incompressibility", "label": "b"}]),
            "rewards": [{"name": "jpeg_compressibility"}, {"name": "brightness", "weight": 0.5}],
        }
    )
    host = RewardHost(config.rewards, "cpu", config.guards.heldout_rewards)
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    prompts = ["a", "b", "c"]
    (trained,) = host.score_many([(images, prompts)])
    (heldout,) = host.score_heldout_many([(images, prompts)])
    assert set(trained.per_reward) == {"jpeg_compressibility", "brightness"}
    assert host.heldout_names() == ["saturation", "b"] == list(heldout.per_reward)
    torch.testing.assert_close(heldout.per_reward["b"], -trained.per_reward["jpeg_compressibility"])
    torch.testing.assert_close(
        trained.total, trained.per_reward["jpeg_compressibility"] + 0.5 * trained.per_reward["brightness"]
    )  # nothing held out in the total
    assert RewardHost(config.rewards, "cpu").heldout_names() == []
    with pytest.raises(ValueError, match="guards.heldout_rewards is empty"):
        RewardHost(config.rewards, "cpu").score_heldout_many([(images, prompts)])


def test_a_broken_custom_heldout_reward_names_its_guards_field():
    config = parse_config(
        minimal(heldout_rewards=[{"name": "saturation"}, {"name": "custom", "target": "no_such_module_xyz:Reward"}])
    )
    with pytest.raises(CustomRewardError, match=r"^guards\.heldout_rewards\.1\.target: "):
        build_heldout_reward(config.guards.heldout_rewards)


# ---------------------------------------------------------------------------------------------------------------
# The early-stop rule and the learner's grouped means
# ---------------------------------------------------------------------------------------------------------------


def test_relative_drop_is_positive_when_a_reward_falls_whatever_its_sign():
    assert relative_drop(2.0, 1.5, 1e-8) == pytest.approx(0.25)
    assert relative_drop(-2.0, -3.0, 1e-8) == pytest.approx(0.5)  # a negative reward falling further
    assert relative_drop(-2.0, -1.0, 1e-8) == pytest.approx(-0.5)  # ... or rising
    assert relative_drop(0.01, -0.19, 1e-8) == pytest.approx(20.0)  # near 0 the relative drop explodes
    assert relative_drop(0.01, -0.19, 1.0) == pytest.approx(0.2)  # min_scale makes it an absolute drop


def test_early_stop_needs_patience_consecutive_drops():
    guard = EarlyStopGuard(EarlyStopConfig(reward="r", drop_fraction=0.1, patience=2), before=-1.0)
    assert guard.check({"r": -1.2}) is None and guard.strikes == 1  # drop 0.2 > 0.1: one strike
    assert guard.check({"r": -1.05}) is None and guard.strikes == 0  # within the limit: the count resets
    assert guard.check({"r": -1.11}) is None and guard.strikes == 1
    reason = guard.check({"r": -1.5})
    assert reason is not None and guard.strikes == 2
    assert "'r'" in reason and "0.5 > guards.early_stop.drop_fraction 0.1" in reason and "2 consecutive" in reason
    exactly = EarlyStopGuard(EarlyStopConfig(reward="r", drop_fraction=0.1), before=1.0)
    assert exactly.check({"r": 0.9}) is None  # a drop equal to the limit does not stop the run
    assert exactly.check({"r": 0.89}) is not None


def test_grouped_means_merge_minibatches_and_ranks_exactly():
    values = torch.tensor([1.0, 2.0, 3.0, 10.0, 20.0, 5.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    whole = GroupedMeans()
    whole.add(GroupedMeans.sums_of({"kl/step": (groups, values)}))
    split = GroupedMeans()  # two minibatches, the second split over two ranks, one rank's share empty
    for rows in ([0, 3], [1, 2, 4], [5], []):
        rows = torch.tensor(rows, dtype=torch.long)
        split.add(GroupedMeans.sums_of({"kl/step": (groups[rows], values[rows])}))
    expected = {"kl/step_0": 2.0, "kl/step_1": 15.0, "kl/step_2": 5.0, "kl/step_mean": 41.0 / 6}
    assert whole.means() == pytest.approx(expected) and split.means() == pytest.approx(expected)
    assert list(whole.means())[:3] == ["kl/step_0", "kl/step_1", "kl/step_2"]


# ---------------------------------------------------------------------------------------------------------------
# Real runs in this process: tiny SD1.5, TailorPO on JPEG compressibility, a real sqlite MLflow store
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture
def drift_module(tmp_path, monkeypatch):
    user_dir = tmp_path / "user_rewards"
    user_dir.mkdir()
    (user_dir / "guard_rewards.py").write_text(textwrap.dedent(DRIFT_MODULE))
    monkeypatch.syspath_prepend(str(user_dir))
    return "guard_rewards:Drift"


def run_config(
    model_dir: Path,
    output_dir: Path,
    run_name: str,
    iterations: int,
    early_stop: dict | None,
    more_heldout: tuple[dict, ...] = (),
):
    return parse_config(
        {
            "run_name": run_name,
            "seed": 2,
            "output_dir": str(output_dir),
            "device": "cpu",
            "model": {"pretrained": str(model_dir)},
            "sampling": {"num_steps": 3, "guidance_scale": 2.0, "batch_size": 2},
            "algorithm": {"name": "tailorpo"},
            "rewards": [{"name": "jpeg_compressibility"}],
            "train": {"iterations": iterations, "learning_rate": 1e-2, "train_batch_size": 2},
            "prompts": {
                "train": {"inline": ["a cat", "a dog", "a fox"]},
                "eval": {"inline": ["a cow"]},
                "eval_seeds": 2,
            },
            "tracking": {"enabled": True, "image_grid_every": 2},
            "checkpoint": {"every": 0},
            "guards": {
                "heldout_rewards": [
                    {"name": "jpeg_incompressibility"},
                    {"name": "custom", "target": "guard_rewards:Drift", "label": "drift"},
                    *more_heldout,
                ],
                "every": 1,
                "early_stop": early_stop,
            },
        }
    )


def mlflow_history(run_dir: Path, run_id: str, key: str) -> dict[int, float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir.parent / 'mlflow.db'}")
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def test_heldout_rewards_and_per_step_kl_are_logged_beside_the_training_reward(
    tiny_sd15_dir, tmp_path, drift_module, one_torch_thread
):
    # drift ∈ [-1, 0] and min_scale 1: its relative drop is at most 1, so drop_fraction 1 never stops the run
    config = run_config(
        tiny_sd15_dir, tmp_path, "watched", 3, {"reward": "drift", "drop_fraction": 1.0, "min_scale": 1.0}
    )
    result = LocalTrainer(config, log=lambda *_: None).fit()
    run_dir = result.run_dir
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [1.0, 2.0, 3.0] and result.early_stop is None

    # every = 1: a pass after iterations 1 and 2 (the one after 3 is the final evaluation, in eval.json)
    for record in lines[:2]:
        assert record["heldout/jpeg_incompressibility"] == pytest.approx(-record["eval/jpeg_compressibility"])
        assert record["heldout/drift"] < 0  # training moved the weights: the images drifted
        assert record["heldout/drift_drop"] == pytest.approx(-record["heldout/drift"])
    assert "heldout/drift" not in lines[2]
    # the held-out rewards never enter training: the training reward is JPEG compressibility alone
    for record in lines:
        assert record["reward_mean"] == pytest.approx(record["reward/jpeg_compressibility_mean"])
        assert not any(k.startswith("reward/") and ("drift" in k or "incompress" in k) for k in record)

    # per-step KL for each of the 3 DDIM steps: > 0 once the first optimizer step moved θ off the reference, and
    # growing as training (lr 1e-2) drifts away from it
    steps = [f"kl/step_{k}" for k in range(3)]
    assert all(set(steps + [f"kl/log_ratio_step_{k}" for k in range(3)] + ["kl/step_mean"]) <= set(r) for r in lines)
    assert all(r[key] > 0.0 for r in lines for key in steps)
    assert all(min(r[key] for key in steps) <= r["kl/step_mean"] <= max(r[key] for key in steps) for r in lines)
    assert lines[0]["kl/step_mean"] < lines[1]["kl/step_mean"] < lines[2]["kl/step_mean"]

    summary = json.loads((run_dir / "eval.json").read_text())
    assert summary["stopped_early"] is False and summary["stop_reason"] is None and summary["iterations"] == 3
    assert summary["heldout_before"]["drift"] == 0.0
    assert summary["heldout_before"]["jpeg_incompressibility"] == pytest.approx(-summary["eval_before"])
    assert summary["heldout_after"]["drift"] < 0

    # MLflow: heldout/<key> at the same steps as eval/reward_mean, beside the per-iteration training reward
    eval_steps = mlflow_history(run_dir, result.mlflow_run_id, "eval/reward_mean")
    heldout = mlflow_history(run_dir, result.mlflow_run_id, "heldout/drift")
    assert set(eval_steps) == set(heldout) == {0, 1, 2, 3}
    assert heldout[0] == 0.0 and heldout[3] == pytest.approx(summary["heldout_after"]["drift"])
    assert set(mlflow_history(run_dir, result.mlflow_run_id, "heldout/jpeg_incompressibility")) == {0, 1, 2, 3}
    assert set(mlflow_history(run_dir, result.mlflow_run_id, "reward/jpeg_compressibility_mean")) == {1, 2, 3}
    assert mlflow_history(run_dir, result.mlflow_run_id, "kl/step_1")[3] == pytest.approx(lines[2]["kl/step_1"])
    assert (run_dir / "grids" / "iter_000002.png").is_file() and not (run_dir / "grids" / "iter_000001.png").exists()


def test_early_stop_ends_the_run_cleanly_when_a_heldout_reward_falls(
    tiny_sd15_dir, tmp_path, drift_module, one_torch_thread
):
    config = run_config(
        tiny_sd15_dir,
        tmp_path,
        "stopped",
        5,
        {"reward": "drift", "drop_fraction": 0.0, "patience": 2, "min_scale": 1.0},
    )
    result = LocalTrainer(config, log=lambda *_: None).fit()
    run_dir = result.run_dir
    # drift < 0 after iterations 1 and 2: two consecutive drops, the run stops after iteration 2 of 5
    assert result.early_stop is not None and result.early_stop.iteration == 2
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [1.0, 2.0]
    summary = json.loads((run_dir / "eval.json").read_text())
    assert summary["stopped_early"] is True and summary["iterations"] == 2 and summary["iterations_planned"] == 5
    assert "'drift'" in summary["stop_reason"] and "2 consecutive evaluations" in summary["stop_reason"]
    assert summary["heldout_after"]["drift"] == pytest.approx(lines[1]["heldout/drift"])  # that pass is the final one
    assert summary["eval_after"] == pytest.approx(lines[1]["eval/reward_mean"])
    # a clean end: final checkpoint of iteration 2 with its strikes, the LoRA exported, the MLflow run FINISHED
    from rlhf_diffusion.checkpoint import latest_checkpoint, load_checkpoint

    checkpoint = load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))
    assert checkpoint.iteration == 2 and checkpoint.meta["early_stop_strikes"] == 2
    assert (run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert (run_dir / "grid_after.png").is_file()
    from mlflow.tracking import MlflowClient

    run = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["early_stop"] == summary["stop_reason"] and run.data.tags["early_stop_iteration"] == "2"
    from mlflow.tracking import MlflowClient as Client

    history = Client(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_metric_history(
        result.mlflow_run_id, "eval/reward_mean"
    )
    assert sorted(m.step for m in history) == [0, 1, 2]  # the stopping pass is the final one: logged once

    # --resume continues an early-stopped run, and the guards may change on resume (here: a looser early stop) ...
    looser = run_config(
        tiny_sd15_dir, tmp_path, "stopped", 3, {"reward": "drift", "drop_fraction": 1.0, "min_scale": 1.0}
    )
    resumed = LocalTrainer(looser, resume=True, log=lambda *_: None).fit()
    assert resumed.early_stop is None
    assert [json.loads(line)["iteration"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [
        1.0,
        2.0,
        3.0,
    ]
    again = json.loads((run_dir / "eval.json").read_text())
    assert again["stopped_early"] is False and again["iterations"] == 3
    assert again["heldout_before"] == summary["heldout_before"]  # the base of the early stop survives the resume
    tags = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(resumed.mlflow_run_id).data.tags
    assert resumed.mlflow_run_id == result.mlflow_run_id and "early_stop" not in tags  # the same run went on
    # ... but an early stop on a reward that had no value before training is refused
    unknown = run_config(
        tiny_sd15_dir,
        tmp_path,
        "stopped",
        4,
        {"reward": "brightness", "drop_fraction": 0.1},
        more_heldout=({"name": "brightness"},),
    )
    with pytest.raises(ResumeError, match="guards.early_stop.reward 'brightness': the checkpoint holds no value"):
        LocalTrainer(unknown, resume=True, log=lambda *_: None).fit()

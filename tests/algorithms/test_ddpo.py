"""DDPO (`algorithms/ddpo.py`): the pure pieces against hand values (clipped surrogate, advantages, the per-prompt
tracker), the importance ratio exactly 1 on the first inner step on the tiny SD1.5 and SDXL pipelines, the direction
of one step, the tracker through a checkpoint, the config, and two iterations of the whole loop in one process."""

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from rlhf_diffusion import testing
from rlhf_diffusion.algorithms.ddpo import (
    PerPromptStatTracker,
    batch_advantages,
    clipped_surrogate,
    select_trajectory_steps,
)
from rlhf_diffusion.batches import TrajectoryStepBatch
from rlhf_diffusion.config import DDPOConfig, parse_config
from rlhf_diffusion.testing import tiny_run_config, tiny_trainer

PROMPTS = ["a cat", "a dog", "a fox"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


SETTINGS = {"train": {"train_batch_size": 256, "signal_every": 0}, "prompts": {"eval_seeds": 1}}  # one minibatch


# ----------------------------------------------------------------------------------------------------------------
# Pure pieces
# ----------------------------------------------------------------------------------------------------------------


def test_clipped_surrogate_hand_values_and_gradients():
    eps = 0.2
    ratio = torch.tensor([1.0, 1.5, 1.5, 0.5, 0.5, 1.1])
    adv = torch.tensor([2.0, 2.0, -1.0, 2.0, -1.0, 3.0])
    log_ratio = ratio.log().requires_grad_(True)
    terms = clipped_surrogate(log_ratio, adv, eps)
    # max(−Aρ, −A clip(ρ, 0.8, 1.2)), by hand:
    expected = torch.tensor([-2.0, -2.4, 1.5, -1.0, 0.8, -3.3])
    torch.testing.assert_close(terms.detach(), expected)
    (grad,) = torch.autograd.grad(terms.sum(), log_ratio)
    # d/d log ρ of the chosen term: −Aρ where the unclipped term is the max, 0 where the clipped (constant) one is
    torch.testing.assert_close(grad, torch.tensor([-2.0, 0.0, 1.5, -1.0, 0.0, -3.3]))


def test_batch_advantages_hand_values():
    adv = batch_advantages(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    s = math.sqrt(1.25)  # population std
    torch.testing.assert_close(adv, torch.tensor([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s]))


def test_per_prompt_tracker_hand_values_fifo_and_state_round_trip(tmp_path):
    tracker = PerPromptStatTracker(buffer_size=3, min_count=2)
    e = PerPromptStatTracker.EPS
    # a's buffer [1, 3] is long enough (mean 2, std 1); b's [2] is not → the call's mean 2 and std sqrt(2/3) → 0
    adv, fallback = tracker.update(["a", "b", "a"], torch.tensor([1.0, 2.0, 3.0]))
    torch.testing.assert_close(adv, torch.tensor([-1 / (1 + e), 0.0, 1 / (1 + e)]))
    assert fallback == pytest.approx(1 / 3)
    # a: [1, 3, 5] → mean 3, std sqrt(8/3); b: [2, 4] → mean 3, std 1
    adv, fallback = tracker.update(["a", "b"], torch.tensor([5.0, 4.0]))
    torch.testing.assert_close(adv, torch.tensor([2 / (math.sqrt(8 / 3) + e), 1 / (1 + e)]))
    assert fallback == 0.0
    save_file(tracker.state_dict(), tmp_path / "state.safetensors")  # as the checkpoint stores it
    restored = PerPromptStatTracker(buffer_size=3, min_count=2)
    restored.load_state_dict(load_file(tmp_path / "state.safetensors"))
    # FIFO: a's oldest value (1) leaves, [3, 5, 7] → mean 5, std sqrt(8/3); the same in the restored tracker
    for t in (tracker, restored):
        adv, _ = t.update(["a"], torch.tensor([7.0]))
        torch.testing.assert_close(adv, torch.tensor([2 / (math.sqrt(8 / 3) + e)]))
    assert list(restored.buffers) == ["a", "b"] and list(restored.buffers["a"]) == [3.0, 5.0, 7.0]
    with pytest.raises(ValueError, match="unexpected keys"):
        restored.load_state_dict({"correction_table": torch.zeros(3)})


def test_ddpo_pytorch_defaults_use_the_batch_statistics_first():
    """With buffer 16 / min 16 every prompt's first visits fall back to the whole batch's z-score."""
    tracker = PerPromptStatTracker(16, 16)
    rewards = torch.tensor([0.5, 1.0, 2.0, 4.0])
    adv, fallback = tracker.update(["a", "b", "a", "c"], rewards)
    torch.testing.assert_close(adv, batch_advantages(rewards, eps=PerPromptStatTracker.EPS))
    assert fallback == 1.0


def test_select_trajectory_steps_counts_and_distinct():
    g = torch.Generator().manual_seed(0)
    steps = select_trajectory_steps(5, 7, 0.5, g)
    assert steps.shape == (5, 3)  # floor(0.5 · 7)
    for row in steps:
        assert row.unique().numel() == 3 and (row.diff() > 0).all() and row.max() < 7
    assert select_trajectory_steps(2, 4, 0.1, g).shape == (2, 1)  # at least one
    torch.testing.assert_close(select_trajectory_steps(2, 4, 1.0, g), torch.arange(4).repeat(2, 1))


# ----------------------------------------------------------------------------------------------------------------
# On the tiny pipelines
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_ratio_is_one_on_the_first_inner_step(kind, tiny_sd15_dir, tiny_sdxl_dir, tmp_path):
    """Before any update the learner's recomputed log-prob (CFG, another batch composition) equals the one the
    sampler recorded, so ρ = 1: checked directly and through a learner round's first (only) optimizer step."""
    model_dir = tiny_sd15_dir if kind == "sd15" else tiny_sdxl_dir
    trainer = tiny_trainer(model_dir, tmp_path, {"name": "ddpo", "samples_per_prompt": 2}, settings=SETTINGS)
    batch = trainer.rollout(PROMPTS)
    ex = batch.pairs
    assert isinstance(ex, TrajectoryStepBatch) and len(ex) == 3 * 2 * 4  # P · G · K
    assert batch.rewards.shape == (3, 2) and batch.final_images.shape[0] == 3
    testing.check_ratio_one_on_the_first_step(trainer, batch)


def test_rollout_structure_and_learner_side_advantages(tiny_sd15_dir, tmp_path):
    trainer = tiny_trainer(
        tiny_sd15_dir, tmp_path, {"name": "ddpo", "samples_per_prompt": 2, "timestep_fraction": 0.5}, settings=SETTINGS
    )
    batch = trainer.rollout(PROMPTS)
    ex = batch.pairs
    assert len(ex) == 3 * 2 * 2 and (ex.advantage == 0).all()  # filled by the learner, not the sampler
    for p in range(3):
        for s in range(2):
            rows = (ex.prompt_index == p) & (ex.sample_index == s)
            assert rows.sum() == 2 and ex.step_index[rows].unique().numel() == 2
    prepared = trainer.algorithm.prepare_examples(batch)
    # the tracker's first visit: the batch z-score of the six rewards, each trajectory's on all its steps
    expected = batch_advantages(batch.rewards.reshape(-1), eps=PerPromptStatTracker.EPS).view(3, 2)
    torch.testing.assert_close(prepared.advantage, expected[ex.prompt_index, ex.sample_index])
    state = trainer.algorithm.state_dict()
    assert len(state) == 6 and state["stat_tracker/rewards_0"].shape == (2,)


def test_one_step_raises_the_log_prob_of_positive_advantage_samples(tiny_sd15_dir, tmp_path):
    """One normalised descent step on the PPO loss raises ℓ_θ of the actions with A > 0 and lowers it for A < 0."""
    trainer = tiny_trainer(tiny_sd15_dir, tmp_path, {"name": "ddpo", "samples_per_prompt": 2}, settings=SETTINGS)
    batch = trainer.rollout(PROMPTS)
    ex = batch.pairs
    ex.advantage = torch.where(ex.sample_index == 0, 1.0, -1.0)
    change = testing.log_prob_change_after_one_step(trainer, batch)
    positive = ex.advantage > 0
    assert change[positive].mean() > 0
    assert change[~positive].mean() < 0


def test_two_iterations_end_to_end_with_signal_and_tracker_checkpoint(tiny_sd15_dir, tmp_path):
    trainer = tiny_trainer(
        tiny_sd15_dir,
        tmp_path,
        {"name": "ddpo", "samples_per_prompt": 2, "stat_buffer_size": 4, "stat_min_count": 4},
        train={"iterations": 2, "train_batch_size": 8, "signal_every": 1, "signal_examples": 8},
        checkpoint={"every": 1},
        settings=SETTINGS,
    )
    result = trainer.fit()
    train_records = [r for r in testing.run_metrics(result.run_dir) if "train/loss" in r]
    assert len(train_records) == 2
    first = train_records[0]
    assert first["train/optimizer_steps"] == 3.0  # 24 examples, 8 per step
    assert first["train/clipfrac"] >= 0 and math.isfinite(first["train/loss"])
    assert "signal/coherence" in first and "signal/share_step_0" in first  # the split-half diagnostics
    assert "signal/clip_step_mean" in first
    # the tracker's buffers went into the checkpoint: after 2 iterations each prompt holds 4 rewards (2 × 2)
    ckpt = sorted((result.run_dir / "checkpoints").glob("iter_*"))[-1]
    state = load_file(ckpt / "algorithm_state.safetensors")
    buffers = [v for k, v in state.items() if k.startswith("stat_tracker/rewards_")]
    assert len(buffers) == 3 and all(len(b) == 4 for b in buffers)


def test_config_accepts_ddpo_with_the_ddpo_pytorch_defaults_and_names_bad_fields(tiny_sd15_dir, tmp_path):
    data = tiny_run_config(tiny_sd15_dir, tmp_path, {"name": "d3po"}, settings=SETTINGS)
    cfg = parse_config(data, overrides=["algorithm={name: ddpo}"]).algorithm
    assert isinstance(cfg, DDPOConfig)
    assert (cfg.clip_range, cfg.adv_clip_max, cfg.timestep_fraction) == (1e-4, 5.0, 1.0)
    assert (cfg.samples_per_prompt, cfg.per_prompt_stat_tracking, cfg.stat_buffer_size, cfg.stat_min_count) == (
        1,
        True,
        16,
        16,
    )
    # kl_beta is GRPO's field; skip_final_steps 4 = K; stat_buffer_size 8 is shorter than stat_min_count (16)
    bad = ["clip_range: 0", "adv_clip_max: -1", "timestep_fraction: 1.5", "samples_per_prompt: 0", "kl_beta: 0.1"]
    testing.check_algorithm_config_errors(
        data, "ddpo", [*bad, "skip_final_steps: 4"], named={"stat_buffer_size: 8": "stat_min_count"}
    )

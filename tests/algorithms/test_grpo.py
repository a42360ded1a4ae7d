"""GRPO (`algorithms/grpo.py`): group advantages and the equal-σ Gaussian KL against hand values, the rollout's groups
(zero-std groups dropped, the last step not trained), the importance ratio exactly 1 on the first inner step on the
tiny SD1.5 and SDXL pipelines, the KL term (0 at the reference, > 0 after a perturbation, lowered by its own
gradient), the config, and two iterations of the whole loop in one process."""

import dataclasses
import math

import pytest
import torch

from rlhf_diffusion import testing
from rlhf_diffusion.algorithms.grpo import group_advantages
from rlhf_diffusion.batches import TrajectoryStepBatch
from rlhf_diffusion.config import GRPOConfig, parse_config
from rlhf_diffusion.diffusion import ddim
from rlhf_diffusion.rewards.base import RewardResult
from rlhf_diffusion.testing import descend_lora, perturb_lora, tiny_run_config, tiny_trainer

PROMPTS = ["a cat", "a dog", "a fox"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread(one_torch_thread):
    yield


SETTINGS = {"train": {"train_batch_size": 256, "signal_every": 0}, "prompts": {"eval_seeds": 1}}  # one minibatch


# ----------------------------------------------------------------------------------------------------------------
# Pure pieces
# ----------------------------------------------------------------------------------------------------------------


def test_group_advantages_hand_values():
    rewards = torch.tensor([[1.0, 3.0, 6.0], [2.0, 2.0, 2.0], [0.1, 0.1, 0.1]])
    adv = group_advantages(rewards)
    # (1, 3, 6): mean 10/3, unbiased std sqrt(19/3) = 2.5166
    torch.testing.assert_close(adv[0], torch.tensor([-0.92717, -0.13245, 1.05963]), atol=1e-5, rtol=0)
    assert (adv[1:] == 0).all()  # equal rewards: exactly 0 (0.1 · 3 / 3 != 0.1 in floating point)
    torch.testing.assert_close(group_advantages(torch.tensor([[0.0, 1.0]])), torch.tensor([[-(0.5**0.5), 0.5**0.5]]))
    with pytest.raises(ValueError, match="G >= 2"):
        group_advantages(torch.tensor([[1.0], [2.0]]))


def test_global_std_advantages_hand_values():
    """Flow-GRPO's global_std: each group's mean, one population std over all rewards + 1e-4 [C]."""
    rewards = torch.tensor([[1.0, 3.0], [2.0, 2.0], [0.0, 4.0]])
    # all six: mean 2, population variance (1 + 1 + 0 + 0 + 4 + 4) / 6 = 5/3
    std = (5 / 3) ** 0.5 + 1e-4
    expected = torch.tensor([[-1 / std, 1 / std], [0.0, 0.0], [-2 / std, 2 / std]])
    torch.testing.assert_close(group_advantages(rewards, global_std=True), expected, atol=1e-6, rtol=0)
    assert (group_advantages(torch.full((2, 3), 0.1), global_std=True) == 0).all()  # no spread: exactly 0


def test_equal_sigma_gaussian_kl_hand_value():
    """KL(N(μ_θ, σ²I) ‖ N(μ_ref, σ²I)) per element = mean (μ_θ − μ_ref)² / (2σ²): 0.3² / (2 · 0.5²) = 0.18."""
    mean_ref = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(0))
    std = torch.tensor([0.5, 0.25])
    kl = ddim.kl_same_std(mean_ref + 0.3, mean_ref, std)
    torch.testing.assert_close(kl, torch.tensor([0.18, 0.72]))
    assert (ddim.kl_same_std(mean_ref, mean_ref, std) == 0).all()


# ----------------------------------------------------------------------------------------------------------------
# On the tiny pipelines
# ----------------------------------------------------------------------------------------------------------------


def test_rollout_groups_advantages_and_zero_std_groups(tiny_sd15_dir, tmp_path):
    trainer = tiny_trainer(tiny_sd15_dir, tmp_path, {"name": "grpo", "group_size": 3}, settings=SETTINGS)
    real = trainer.rollout_context().reward_fn

    def reward_fn(images, prompts):  # the dog's group all scores 0.5: nothing to learn from it
        result = real(images, prompts)
        dog = torch.tensor([p == "a dog" for p in prompts])
        total = torch.where(dog, 0.5, result.total)
        return RewardResult(total=total, per_reward={k: torch.where(dog, 0.5, v) for k, v in result.per_reward.items()})

    trainer.model.unet.eval()
    ctx = dataclasses.replace(trainer.rollout_context(), reward_fn=reward_fn)
    batch = trainer.algorithm.rollout(ctx, PROMPTS, trainer.encode(PROMPTS))
    ex = batch.pairs
    batch.pairs.validate()
    assert isinstance(ex, TrajectoryStepBatch)
    assert batch.rewards.shape == (3, 3) and (batch.rewards[1] == 0.5).all()
    assert set(ex.prompt_index.tolist()) == {0, 2}  # the zero-std group is dropped
    assert len(ex) == 2 * 3 * 3  # 2 groups × G 3 × (K 4 less the last step)
    assert ex.step_index.max() == 2  # skip_final_steps 1 (DanceGRPO)
    expected = group_advantages(batch.rewards)
    torch.testing.assert_close(ex.advantage, expected[ex.prompt_index, ex.sample_index])
    assert batch.metrics["zero_std_fraction"] == pytest.approx(1 / 3)

    trainer = tiny_trainer(
        tiny_sd15_dir, tmp_path / "g", {"name": "grpo", "group_size": 3, "global_std": True}, settings=SETTINGS
    )
    ctx = dataclasses.replace(trainer.rollout_context(), reward_fn=reward_fn)
    batch = trainer.algorithm.rollout(ctx, PROMPTS, trainer.encode(PROMPTS))
    expected = group_advantages(batch.rewards, global_std=True)
    torch.testing.assert_close(batch.pairs.advantage, expected[batch.pairs.prompt_index, batch.pairs.sample_index])
    assert set(batch.pairs.prompt_index.tolist()) == {0, 2}  # the zero-spread group is still dropped


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_ratio_is_one_on_the_first_inner_step(kind, tiny_sd15_dir, tiny_sdxl_dir, tmp_path):
    model_dir = tiny_sd15_dir if kind == "sd15" else tiny_sdxl_dir
    trainer = tiny_trainer(model_dir, tmp_path, {"name": "grpo", "group_size": 2, "kl_beta": 0.1}, settings=SETTINGS)
    batch = trainer.rollout(PROMPTS)
    ex = batch.pairs
    assert len(ex) == 3 * 2 * 3
    metrics = testing.check_ratio_one_on_the_first_step(trainer, batch)
    assert metrics["kl"] == 0.0  # LoRA B = 0 at the start: θ is the reference exactly


def test_kl_term_zero_at_the_reference_positive_after_a_perturbation_and_lowered_by_its_gradient(
    tiny_sd15_dir, tmp_path
):
    trainer = tiny_trainer(
        tiny_sd15_dir, tmp_path, {"name": "grpo", "group_size": 2, "kl_beta": 1.0}, settings=SETTINGS
    )
    ex, _, kl_loss = testing.kl_term_alone(trainer, trainer.rollout(PROMPTS), kl_beta=1.0)  # the KL term alone
    at_reference = kl_loss()
    assert at_reference.metrics["kl"] == 0.0 and at_reference.loss.item() == 0.0
    perturb_lora(trainer)
    out = kl_loss()
    assert out.metrics["kl"] > 0
    assert out.loss.item() == pytest.approx(out.metrics["kl"], rel=1e-5)  # A = 0: the surrogate is 0
    steps, values = out.grouped["kl/step"]
    assert (values > 0).all() and set(steps.tolist()) == set(ex.step_index.tolist())
    descend_lora(trainer, out.loss, lr=1e-3)
    assert kl_loss().metrics["kl"] < out.metrics["kl"]


def test_one_step_raises_the_log_prob_of_positive_advantage_samples(tiny_sd15_dir, tmp_path):
    trainer = tiny_trainer(tiny_sd15_dir, tmp_path, {"name": "grpo", "group_size": 2}, settings=SETTINGS)
    batch = trainer.rollout(PROMPTS)
    ex = batch.pairs
    assert (ex.advantage != 0).all()
    change = testing.log_prob_change_after_one_step(trainer, batch)
    assert change[ex.advantage > 0].mean() > 0
    assert change[ex.advantage < 0].mean() < 0


def test_two_iterations_end_to_end(tiny_sd15_dir, tmp_path):
    trainer = tiny_trainer(
        tiny_sd15_dir,
        tmp_path,
        {"name": "grpo", "group_size": 2, "kl_beta": 0.01},
        train={"iterations": 2, "train_batch_size": 6, "num_inner_epochs": 2, "signal_every": 1, "signal_examples": 8},
        settings=SETTINGS,
    )
    result = trainer.fit()
    train_records = [r for r in testing.run_metrics(result.run_dir) if "train/loss" in r]
    assert len(train_records) == 2
    first = train_records[0]
    assert first["train/optimizer_steps"] == 6.0  # 18 examples, 6 per step, 2 inner epochs
    assert math.isfinite(first["train/loss"]) and first["train/kl"] >= 0
    assert "kl/step_0" in first and "signal/coherence" in first and "rollout/zero_std_fraction" in first
    assert train_records[1]["train/kl"] > 0  # the second round starts away from the reference
    assert (result.run_dir / "lora" / "pytorch_lora_weights.safetensors").is_file()


def test_config_accepts_grpo_and_names_bad_fields(tiny_sd15_dir, tmp_path):
    data = tiny_run_config(tiny_sd15_dir, tmp_path, {"name": "d3po"}, settings=SETTINGS)
    cfg = parse_config(data, overrides=["algorithm={name: grpo}"]).algorithm
    assert isinstance(cfg, GRPOConfig)
    assert (cfg.group_size, cfg.clip_range, cfg.adv_clip_max, cfg.kl_beta) == (16, 1e-4, 5.0, 0.0)
    assert (cfg.timestep_fraction, cfg.skip_final_steps) == (1.0, 1)
    # stat_min_count is DDPO's field; skip_final_steps 4 = K
    bad = ["group_size: 1", "kl_beta: -0.1", "clip_range: 1", "timestep_fraction: 0", "stat_min_count: 4"]
    testing.check_algorithm_config_errors(data, "grpo", [*bad, "skip_final_steps: 4"])


def test_split_half_gradients_add_up_to_the_subset_gradient(tiny_sd15_dir, tmp_path):
    """The learning-signal diagnostics work unchanged: the (step, half) chunks' gradients of the PPO loss with its KL
    term add up to the whole subset's gradient (`algorithms.signal`), grouped by DDIM step."""
    from rlhf_diffusion.algorithms.signal import split_half_gradients
    from rlhf_diffusion.models.loading import trainable_parameters

    trainer = tiny_trainer(
        tiny_sd15_dir, tmp_path, {"name": "grpo", "group_size": 2, "kl_beta": 0.5}, settings=SETTINGS
    )
    perturb_lora(trainer)  # a nonzero KL gradient
    batch = trainer.rollout(PROMPTS)
    examples = trainer.algorithm.prepare_examples(batch)
    learner = trainer.learner_obj
    cond_all = learner.encode(batch.prompts)
    params = [p for p in trainable_parameters(trainer.model.unet) if p.requires_grad]
    grads, n, units = split_half_gradients(trainer.algorithm, learner.predictor, cond_all, examples, params, 11, 64)
    assert n == len(examples) and units == len(PROMPTS) and set(grads) == {"step_0", "step_1", "step_2"}
    summed = sum(a + b for a, b in grads.values())
    whole = trainer.algorithm.loss(learner.predictor, cond_all.index(examples.prompt_index), examples, None)
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(whole.loss, params)])
    assert summed.norm() > 0
    assert float((summed - expected).norm() / expected.norm()) < 1e-4

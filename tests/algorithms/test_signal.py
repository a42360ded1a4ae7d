"""Learning-signal diagnostics (`algorithms.signal`, `train.signal_every`): the pure maths on hand-built gradients,
the split-half gradients of every method on the tiny SD1.5 pipeline (they add up to the subset's loss gradient,
grouped by step or t bucket), the clamp fraction per step, and a learner round with the diagnostics on that trains
exactly as one with them off."""

import math

import pytest
import torch

from rlhf_diffusion.algorithms.common import step_clamp_diagnostics
from rlhf_diffusion.algorithms.diffusion_dpo import timestep_saturation_diagnostics
from rlhf_diffusion.algorithms.signal import cosine, signal_metrics, split_half_gradients, split_halves
from rlhf_diffusion.models.loading import get_lora_state_dict, trainable_parameters
from rlhf_diffusion.testing import tiny_trainer

PROMPTS = ["a cat", "a dog", "a red bird"]


def signal_trainer(model_dir, tmp_path, algorithm: str, signal_every: int = 1):
    """`tiny_trainer` with the learning-signal diagnostics every `signal_every` iterations, on 64 examples."""
    train = {"train_batch_size": 4, "signal_every": signal_every, "signal_examples": 64}
    return tiny_trainer(
        model_dir, tmp_path, algorithm, train_prompts=PROMPTS, num_steps=3, run_name=algorithm, seed=3, train=train
    )


# -- pure maths -------------------------------------------------------------------------------------------------


def test_signal_metrics_on_hand_built_gradients():
    e = torch.eye(4)
    grads = {
        "step_0": (e[0] * 1.0, e[0] * 1.0),  # both halves agree: coherence 1
        "step_1": (e[1] * 2.0, e[2] * 2.0),  # orthogonal halves: coherence 0
    }
    out = signal_metrics(grads, num_examples=4)
    assert out["signal/coherence_step_0"] == pytest.approx(1.0)
    assert out["signal/coherence_step_1"] == pytest.approx(0.0)
    # totals: A = (1, 2, 0, 0), B = (1, 0, 2, 0): cos = 1 / 5
    assert out["signal/coherence"] == pytest.approx(0.2)
    # shares: |(2, 0, 0, 0)|² = 4 and |(0, 2, 2, 0)|² = 8 of 12
    assert out["signal/share_step_0"] == pytest.approx(4 / 12)
    assert out["signal/share_step_1"] == pytest.approx(8 / 12)
    # snr² = c / ((n/2)(1 − c)) = 0.2 / (2 · 0.8)
    assert out["signal/snr2"] == pytest.approx(0.125)


def test_signal_metrics_opposed_halves_and_one_sided_group():
    e = torch.eye(3)
    out = signal_metrics({"t_000": (e[0], -e[0]), "t_100": (e[1], torch.zeros(3))}, num_examples=3)
    assert out["signal/coherence_t_000"] == pytest.approx(-1.0)
    assert "signal/coherence_t_100" not in out  # one half has no example of this group
    assert out["signal/share_t_000"] == pytest.approx(0.0)  # the halves cancel
    assert out["signal/share_t_100"] == pytest.approx(1.0)
    assert cosine(torch.zeros(3), e[0]) == 0.0


def test_snr_estimate_recovers_a_known_signal_to_noise_ratio():
    """g_i = μ + ξ_i with |μ|² / E|ξ|² = ρ: the split-half SNR² estimate recovers ρ (averaged over draws)."""
    g = torch.Generator().manual_seed(0)
    dim, n, rho = 20000, 64, 0.05
    mu = torch.randn(dim, generator=g)
    mu = mu / mu.norm() * math.sqrt(rho * dim)  # E|ξ|² = dim for unit-variance noise
    estimates = []
    for _ in range(20):
        per_example = mu + torch.randn(n, dim, generator=g)
        out = signal_metrics({"all": (per_example[: n // 2].sum(0), per_example[n // 2 :].sum(0))}, n)
        estimates.append(out["signal/snr2"])
    assert sum(estimates) / len(estimates) == pytest.approx(rho, rel=0.2)
    noise = torch.randn(n, dim, generator=g)  # no shared direction: coherence ≈ 0
    out = signal_metrics({"all": (noise[: n // 2].sum(0), noise[n // 2 :].sum(0))}, n)
    assert abs(out["signal/coherence"]) < 0.05


def test_split_halves_balanced_within_each_group():
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 5, 5])
    half = split_halves(groups, torch.Generator().manual_seed(3))
    for group, a_count in [(0, 2), (1, 2), (2, 1), (5, 1)]:
        rows = groups == group
        assert int((half[rows] == 0).sum()) == a_count
        assert int((half[rows] == 1).sum()) == int(rows.sum()) - a_count


def test_split_halves_by_unit_keeps_every_unit_whole():
    groups = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2])
    units = torch.tensor([7, 7, 7, 3, 3, 3, 9, 9, 9, 4, 4, 4])  # e.g. a prompt's 3 trained steps
    half = split_halves(groups, torch.Generator().manual_seed(1), units=units)
    for unit in units.unique():
        assert len(half[units == unit].unique()) == 1
    assert int(half.sum()) == 6  # 4 units: 2 in each half


def test_a_zero_sum_group_split_across_halves_reads_as_anti_coherent_and_whole_groups_do_not():
    """GRPO's advantages sum to 0 within a prompt's group; every trajectory's score shares the prompt's direction
    c_p. Split by example, the halves get +Σ_A A_i c_p and −Σ_A A_i c_p: a negative coherence from nothing but the
    split. Split by prompt, each half's c_p terms cancel and only the independent parts remain."""
    g = torch.Generator().manual_seed(0)
    prompts, group, dim = 64, 4, 5000
    common = 3.0 * torch.randn(prompts, dim, generator=g)
    own = torch.randn(prompts, group, dim, generator=g)
    adv = torch.randn(prompts, group, generator=g)
    adv = adv - adv.mean(1, keepdim=True)
    per_example = (adv[..., None] * (common[:, None] + own)).reshape(-1, dim)
    units = torch.arange(prompts).repeat_interleave(group)
    groups = torch.zeros(len(units), dtype=torch.long)
    for split, expect in ((None, "negative"), (units, "null")):
        half = split_halves(groups, torch.Generator().manual_seed(2), units=split)
        out = signal_metrics({"all": (per_example[half == 0].sum(0), per_example[half == 1].sum(0))}, prompts)
        if expect == "negative":
            assert out["signal/coherence"] < -0.3
        else:
            assert abs(out["signal/coherence"]) < 0.1


def test_clamp_and_saturation_fractions_per_group():
    eps = 0.1
    lo, hi = math.log(1 - eps), math.log(1 + eps)
    steps = torch.tensor([0, 0, 3])
    out = step_clamp_diagnostics(steps, torch.tensor([hi + 0.01, 0.0, 0.0]), torch.tensor([0.0, lo, lo - 1]), eps)
    groups, values = out["signal/clamp_step"]
    assert groups.tolist() == [0, 0, 3, 0, 0, 3]
    assert values.tolist() == [1.0, 0.0, 0.0, 0.0, 1.0, 1.0]  # at the bound counts as clamped
    out = timestep_saturation_diagnostics(torch.tensor([5, 150, 199]), torch.tensor([6.0, 4.0, 5.5]))
    groups, values = out["signal/saturated_t"]
    assert groups.tolist() == [0, 100, 100] and values.tolist() == [1.0, 0.0, 1.0]


# -- on the tiny SD1.5 pipeline ------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ["tailorpo", "d3po", "dde", "diffusion_dpo", "draft"])
def test_split_half_gradients_add_up_to_the_subset_gradient(tiny_sd15_dir, tmp_path, one_torch_thread, algorithm):
    trainer = signal_trainer(tiny_sd15_dir, tmp_path, algorithm)
    batch = trainer.rollout(PROMPTS)
    examples = batch.pairs
    assert len(examples) >= 2
    learner = trainer.learner_obj
    cond_all = learner.encode(batch.prompts)
    params = [p for p in trainable_parameters(trainer.model.unet) if p.requires_grad]
    grads, n, units = split_half_gradients(trainer.algorithm, learner.predictor, cond_all, examples, params, 11, 64)
    assert n == len(examples) and units == len(examples.prompt_index.unique())
    summed = sum(a + b for a, b in grads.values())
    # the whole subset's mean-loss gradient, with the same draws (same generator seed, all rows)
    whole = trainer.algorithm.loss_on_rows(
        learner.predictor,
        cond_all.index(examples.prompt_index),
        examples,
        torch.Generator().manual_seed(11),
        torch.arange(n),
    )
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(whole.loss, params)])
    assert summed.norm() > 0
    # equal up to float rounding (UNet batches of other sizes; DDE's logit scale of up to 1e5 amplifies it)
    assert float((summed - expected).norm() / expected.norm()) < 1e-4
    prefix = {"tailorpo": "step_", "d3po": "step_", "draft": "chain"}.get(algorithm, "t_")
    assert grads and all(name.startswith(prefix) for name in grads)
    if prefix == "step_":
        assert set(grads) == {f"step_{k}" for k in examples.step_index.unique().tolist()}


def test_round_with_diagnostics_trains_exactly_as_without(tiny_sd15_dir, tmp_path, one_torch_thread):
    """The diagnostics take no optimizer step, touch no `.grad` and use their own generator: the weights after a
    round with them equal the weights after the same round without them, bit for bit."""
    states, results = [], []
    for every in (1, 0):
        trainer = signal_trainer(tiny_sd15_dir, tmp_path / str(every), "tailorpo", signal_every=every)
        batch = trainer.rollout(PROMPTS)
        results.append(trainer.learner_obj.train(batch, 0))
        states.append(get_lora_state_dict(trainer.model.unet))
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0)
    on, off = results[0].diagnostics, results[1].diagnostics
    assert -1 <= on["signal/coherence"] <= 1 and on["signal/examples"] >= 2
    shares = [v for k, v in on.items() if k.startswith("signal/share_step_")]
    assert shares and sum(shares) == pytest.approx(1.0)
    assert any(k.startswith("signal/clamp_step_") for k in on)
    assert "signal/coherence" not in off and any(k.startswith("signal/clamp_step_") for k in off)


def test_a_final_pair_round_with_diagnostics_trains_exactly_as_without(tiny_sd15_dir, tmp_path, one_torch_thread):
    """The same for DDE-Single (the embedded default's method), whose diagnostics redraw (t, ε) with their own
    generator: the weights after the round do not depend on `train.signal_every`."""
    states = []
    for every in (1, 0):
        trainer = signal_trainer(tiny_sd15_dir, tmp_path / str(every), "dde_single", signal_every=every)
        trainer.learner_obj.train(trainer.rollout(PROMPTS), 0)
        states.append(get_lora_state_dict(trainer.model.unet))
    for key in states[0]:
        torch.testing.assert_close(states[0][key], states[1][key], rtol=0, atol=0)

"""The per-step KL metrics (`guards.log_kl`) of every method on the tiny SD1.5 pipeline: what the learner returns for a
training round equals the KL written out by hand from the policy's and the reference's own predictions at the
round's training examples, grouped by DDIM step index (D3PO, TailorPO) or timestep bucket (DDE, Diffusion-DPO)."""

from collections import defaultdict

import pytest
import torch

from rlhf_diffusion.algorithms.diffusion_dpo import KL_TIMESTEP_BUCKET
from rlhf_diffusion.diffusion import ddim
from rlhf_diffusion.models.loading import get_lora_state_dict, set_lora_state_dict
from rlhf_diffusion.seeding import TRAIN_STREAM, derive_seed
from rlhf_diffusion.testing import tiny_trainer
from rlhf_diffusion.trainer import LocalTrainer

PROMPTS = ["a cat", "a dog"]


def perturbed_trainer(model_dir, tmp_path, algorithm: str, log_kl: bool = True):
    """`tiny_trainer` (minibatches of 64: one per round) with θ moved off the reference."""
    trainer = tiny_trainer(
        model_dir,
        tmp_path,
        algorithm,
        train_prompts=PROMPTS,
        num_steps=3,
        batch_size=2,
        run_name=algorithm,
        seed=7,
        guards={"log_kl": log_kl},
    )
    g = torch.Generator().manual_seed(0)  # move θ off the reference (at the start every KL is 0)
    state = get_lora_state_dict(trainer.model.unet)
    set_lora_state_dict(trainer.model.unet, {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()})
    return trainer


def grouped_means(groups: torch.Tensor, values: torch.Tensor, name: str) -> dict[str, float]:
    sums: dict[int, list[float]] = defaultdict(list)
    for group, value in zip(groups.tolist(), values.tolist()):
        sums[group].append(value)
    out = {f"{name}_{g}": sum(v) / len(v) for g, v in sums.items()}
    out[f"{name}_mean"] = values.mean().item()
    return out


@torch.no_grad()
def by_hand_step_kl(trainer: LocalTrainer, cond, step_index, states, actions) -> dict[str, float]:
    """KL(N(μ_θ, σ²) ‖ N(μ_ref, σ²)) per element = mean (μ_θ − μ_ref)² / (2σ²) at each state, and the mean
    log-ratio mean[(x − μ_ref)² − (x − μ_θ)²] / (2σ²) of each action, grouped by step index."""
    predictor, grid = trainer.train_predictor, trainer.grid
    t, a, a_prev, std = grid.scalars(step_index)
    mean_theta, _ = ddim.ddim_step_mean(states, predictor(states, t, cond), a, a_prev, std)
    mean_ref, _ = ddim.ddim_step_mean(states, predictor(states, t, cond, reference=True), a, a_prev, std)
    var = std.view(-1, 1, 1, 1) ** 2
    kl = ((mean_theta - mean_ref) ** 2 / (2 * var)).mean(dim=(1, 2, 3))
    log_ratio = [(((x - mean_ref) ** 2 - (x - mean_theta) ** 2) / (2 * var)).mean(dim=(1, 2, 3)) for x in actions]
    return {
        **grouped_means(step_index, kl, "kl/step"),
        **grouped_means(step_index.repeat(len(actions)), torch.cat(log_ratio), "kl/log_ratio_step"),
    }


@torch.no_grad()
def by_hand_timestep_kl(trainer: LocalTrainer, cond, pairs, iteration: int) -> dict[str, float]:
    """mean (ε_θ − ε_ref)² and λ_t × it at x_t = sqrt(ᾱ_t) x_0 + sqrt(1 − ᾱ_t) ε for the learner's own (t, ε) draws,
    grouped by 100-timestep bucket."""
    generator = torch.Generator().manual_seed(derive_seed(7, TRAIN_STREAM, iteration))
    order = torch.randperm(len(pairs), generator=generator)  # the learner's minibatch order, then its draws
    pairs, cond = pairs.select(order), cond.index(order)
    timesteps, noise = trainer.algorithm.draw(pairs, generator)
    predictor, grid = trainer.train_predictor, trainer.grid
    a = ddim.gather_alpha(grid.alphas_cumprod, timesteps).view(-1, 1, 1, 1)
    diffs = []
    for x0 in (pairs.x0_w, pairs.x0_l):
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        diffs.append(
            ((predictor(x_t, timesteps, cond) - predictor(x_t, timesteps, cond, reference=True)) ** 2).mean(
                dim=(1, 2, 3)
            )
        )
    t = timesteps.repeat(2)
    diff = torch.cat(diffs)
    buckets = t // KL_TIMESTEP_BUCKET * KL_TIMESTEP_BUCKET
    lam = ddim.ddpm_kl_weights(grid.betas)[t]
    return {**grouped_means(buckets, diff, "kl/eps_sq_diff_t"), **grouped_means(buckets, lam * diff, "kl/ddpm_step_t")}


@pytest.mark.parametrize("algorithm", ["d3po", "tailorpo", "dde", "diffusion_dpo"])
def test_learner_logs_the_kl_to_the_reference_per_step(algorithm, tiny_sd15_dir, tmp_path, one_torch_thread):
    trainer = perturbed_trainer(tiny_sd15_dir, tmp_path, algorithm)
    batch = trainer.rollout(PROMPTS)
    pairs = batch.pairs
    assert len(pairs) > 0
    cond = trainer.learner_obj.encode(batch.prompts).index(pairs.prompt_index)
    if algorithm == "d3po":  # winner and loser: different states
        expected = by_hand_step_kl(
            trainer,
            trainer.encode(PROMPTS).index(pairs.prompt_index.repeat(2)),
            pairs.step_index.repeat(2),
            torch.cat([pairs.state_w, pairs.state_l]),
            [torch.cat([pairs.action_w, pairs.action_l])],
        )
    elif algorithm == "tailorpo":  # one shared state, two actions
        expected = by_hand_step_kl(trainer, cond, pairs.step_index, pairs.state_w, [pairs.action_w, pairs.action_l])
    else:
        expected = by_hand_timestep_kl(trainer, cond, pairs, iteration=0)

    result = trainer.learner_obj.train(batch, 0)
    got = {k: v for k, v in result.diagnostics.items() if k.startswith("kl/")}  # signal/...: test_signal.py
    assert set(got) == set(expected)
    assert got == pytest.approx(expected, rel=1e-4, abs=1e-9)
    # θ ≠ ref: every KL is positive (a Monte-Carlo log-ratio need not be; λ_0 = 0 makes t = 0 contribute 0)
    assert all(value > 0 for key, value in got.items() if "log_ratio" not in key and "ddpm_step_t_0" not in key)
    if algorithm in ("d3po", "tailorpo"):
        assert {f"kl/step_{k}" for k in range(3)} <= set(got)
    else:
        assert all(int(key.rsplit("_", 1)[1]) % KL_TIMESTEP_BUCKET == 0 for key in got if not key.endswith("_mean"))


def test_log_kl_false_logs_no_kl(tiny_sd15_dir, tmp_path, one_torch_thread):
    trainer = perturbed_trainer(tiny_sd15_dir, tmp_path, "tailorpo", log_kl=False)
    result = trainer.learner_obj.train(trainer.rollout(PROMPTS), 0)
    assert not any(k.startswith("kl/") for k in result.diagnostics) and result.metrics["optimizer_steps"] == 1
    assert "signal/coherence" in result.diagnostics  # the learning-signal diagnostics do not depend on log_kl

"""D3PO on a tiny SD3 (flow-matching) pipeline: the pair of SDE trajectories shares x_T and draws fresh noise at every
step, the per-step log-ratio Δ is the closed form of two SDE steps with the same s (a hand computation from the
transformer's velocities), zero LoRA gives Δ = 0 and log 2, a step raises the winner's log-ratio over the loser's,
the production trainer trains 2 iterations in process and the LoRA changes, and noise level 0 is refused naming
`sampling.flow_noise_level` (docs/algorithms.md §10(d))."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_diffusion.algorithms.common import step_log_ratios
from rlhf_diffusion.batches import StepPairBatch
from rlhf_diffusion.diffusion.flow import FlowGrid
from rlhf_diffusion.models.loading import ModelLoadError
from rlhf_diffusion.testing import (
    check_lora_changed,
    descend_lora,
    launch_tiny,
    pair_log_ratios,
    perturb_lora,
    run_metrics,
    tiny_loop_trainer,
    tiny_trainer,
)

PROMPTS = ["a cat", "a dog", "a fox"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_rollout_pairs_share_x_T_and_the_loss_is_the_closed_form(sd3_dir, tmp_path):
    """Δ = mean[(x − μ_ref)² − (x − μ_θ)²]/(2 s²) with μ_m = (1 − g²Δσ/(2σ)) x_σ + κ v̂_m (CFG on both, ref = the
    LoRA disabled); L = −log σ(β (clamp(Δ_w) − clamp(Δ_l))). At the LoRA's init Δ = 0 and L = log 2."""
    trainer = tiny_trainer(sd3_dir, tmp_path, {"name": "d3po"})
    assert isinstance(trainer.grid, FlowGrid) and trainer.grid.noise_level == 0.7
    batch = trainer.rollout(PROMPTS)
    ex = batch.pairs
    k = trainer.grid.num_steps
    assert isinstance(ex, StepPairBatch) and len(ex) % k == 0 and len(ex) >= 2 * k
    first = ex.step_index == 0
    torch.testing.assert_close(ex.state_w[first], ex.state_l[first])  # shared x_T (§1a.3)
    later = ex.step_index > 0
    assert (ex.state_w[later] - ex.state_l[later]).abs().amax() > 0  # fresh noise at every step
    cond = trainer.encode(batch.prompts).index(ex.prompt_index)
    out = trainer.algorithm.loss(trainer.train_predictor, cond, ex, trainer.train_generator)
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6) and out.metrics["mean_abs_log_ratio"] == 0.0

    perturb_lora(trainer)
    predictor, grid, config = trainer.train_predictor, trainer.grid, trainer.config.algorithm
    with torch.no_grad():
        out = trainer.algorithm.loss(predictor, cond, ex, trainer.train_generator)
        i = ex.step_index
        t = grid.timesteps[i]
        sigma, sigma_next = grid.sigmas[i].double(), grid.sigmas[i + 1].double()
        delta_sigma = sigma - sigma_next
        g2 = 0.7**2 * sigma / torch.where(sigma >= 1, delta_sigma, 1 - sigma)
        s2 = (g2 * delta_sigma).view(-1, 1, 1, 1)
        kappa = (-delta_sigma * (1 + g2 * (1 - sigma) / (2 * sigma))).view(-1, 1, 1, 1)
        shrink = (1 - g2 * delta_sigma / (2 * sigma)).view(-1, 1, 1, 1)

        def delta(state, action):
            v_theta = predictor(state, t, cond).double()
            v_ref = predictor(state, t, cond, reference=True).double()
            mu_theta = shrink * state.double() + kappa * v_theta
            mu_ref = shrink * state.double() + kappa * v_ref
            x = action.double()
            return (((x - mu_ref) ** 2 - (x - mu_theta) ** 2) / (2 * s2)).mean(dim=(1, 2, 3))

        d_w, d_l = delta(ex.state_w, ex.action_w), delta(ex.state_l, ex.action_l)
        lo, hi = math.log(1 - config.clip_epsilon), math.log(1 + config.clip_epsilon)
        expected = -F.logsigmoid(config.beta * (d_w.clamp(lo, hi) - d_l.clamp(lo, hi))).mean()
        (sw,) = step_log_ratios(predictor, grid, cond, i, ex.state_w, ex.action_w)
    assert d_w.abs().min() > 0
    torch.testing.assert_close(sw.double(), d_w, rtol=1e-3, atol=1e-6)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert out.metrics["mean_abs_log_ratio"] == pytest.approx(torch.cat([d_w, d_l]).abs().mean().item(), rel=1e-3)


def test_one_step_raises_winner_over_loser_log_likelihood(sd3_dir, tmp_path):
    trainer = tiny_trainer(sd3_dir, tmp_path, {"name": "d3po"})
    perturb_lora(trainer)
    batch = trainer.rollout(PROMPTS)
    ex = batch.pairs
    cond = trainer.encode(batch.prompts).index(ex.prompt_index)

    def margin():
        dw, dl = pair_log_ratios(trainer, cond, ex)
        return (dw - dl).mean().item()

    before = margin()
    out = trainer.algorithm.loss(trainer.train_predictor, cond, ex, trainer.train_generator)
    assert descend_lora(trainer, out.loss, lr=1e-3) > 0
    assert margin() > before


def test_the_trainer_trains_an_sd3_lora_with_d3po(sd3_dir, tmp_path):
    trainer = tiny_loop_trainer(sd3_dir, tmp_path, "sd3_d3po", {"name": "d3po"}, seed=0, train={"iterations": 2})
    result = trainer.fit()
    records = [r for r in run_metrics(result.run_dir) if "train/loss" in r]
    assert [r["iteration"] for r in records] == [1.0, 2.0]
    assert all(math.isfinite(r["train/loss"]) and r["train/optimizer_steps"] >= 1 for r in records)
    assert "kl/step_0" in records[0]
    check_lora_changed(result.run_dir)  # B starts at 0: the LoRA changed


def test_noise_level_zero_is_refused_naming_the_field(sd3_dir, tmp_path, capsys):
    from rlhf_diffusion.config import load_config
    from rlhf_diffusion.workers.policy import load_policy

    overrides = [f"model.pretrained={sd3_dir}", "algorithm={name: d3po}", "sampling.flow_noise_level=0"]
    code, err = launch_tiny(overrides, tmp_path, capsys)
    assert code == 2 and err.startswith("error: sampling.flow_noise_level: must be > 0 for algorithm.name 'd3po'")
    assert not any(tmp_path.iterdir())
    with pytest.raises(ModelLoadError, match=r"sampling.flow_noise_level: must be > 0"):
        load_policy(load_config("configs/tiny.yaml", overrides), str(sd3_dir), torch.device("cpu"))

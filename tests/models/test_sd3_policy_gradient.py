"""The policy-gradient methods on a tiny SD3 (flow-matching) pipeline: GRPO = Flow-GRPO and DDPO sample with
Flow-GRPO's SDE, re-score the sampled steps with the same kernel (ratio 1 and KL 0 before any update), a step moves
the log-probs the way the advantages say, the KL term is the closed form, the production trainer trains 2 iterations
in process and the LoRA changes, and noise level 0 (the ODE, no density) is refused naming
`sampling.flow_noise_level` (docs/algorithms.md §10(c))."""

import dataclasses
import math

import pytest
import torch

from rlhf_diffusion import testing
from rlhf_diffusion.algorithms.ddpo import step_log_probs
from rlhf_diffusion.batches import TrajectoryStepBatch
from rlhf_diffusion.diffusion.flow import FlowGrid
from rlhf_diffusion.diffusion.flow_sampling import VelocityPredictor
from rlhf_diffusion.models.loading import ModelLoadError
from rlhf_diffusion.testing import (
    check_lora_changed,
    descend_lora,
    launch_tiny,
    perturb_lora,
    run_metrics,
    tiny_loop_trainer,
    tiny_trainer,
)

PROMPTS = ["a cat", "a dog", "a fox"]
SETTINGS = {"train": {"train_batch_size": 256, "signal_every": 0}, "prompts": {"eval_seeds": 1}}  # one minibatch
METHODS = {
    "grpo": {"name": "grpo", "group_size": 2, "kl_beta": 0.1},
    "ddpo": {"name": "ddpo", "samples_per_prompt": 2, "stat_min_count": 2},
}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("name", ["grpo", "ddpo"])
def test_sde_rollout_and_ratio_one_kl_zero_before_any_update(sd3_dir, tmp_path, name):
    """The rollout samples Flow-GRPO's SDE (a = 0.7) with CFG; every trained step carries the sampler's log-prob,
    which the learner recomputes (another batch composition) to float tolerance, so the first round has ρ = 1,
    nothing clipped and (GRPO, LoRA B = 0) a KL of exactly 0."""
    trainer = tiny_trainer(sd3_dir, tmp_path, METHODS[name], settings=SETTINGS)
    assert isinstance(trainer.grid, FlowGrid) and trainer.grid.noise_level == 0.7
    assert isinstance(trainer.train_predictor, VelocityPredictor) and trainer.train_predictor.guidance_scale > 1
    batch = trainer.rollout(PROMPTS)
    ex = batch.pairs
    assert isinstance(ex, TrajectoryStepBatch) and ex.state.shape[1:] == (16, 16, 16)
    assert torch.isfinite(ex.log_prob).all()
    k = trainer.grid.num_steps
    if name == "grpo":  # the last step is never trained (skip_final_steps 1, as Flow-GRPO)
        assert len(ex) == 3 * 2 * (k - 1) and int(ex.step_index.max()) == k - 2
    metrics = testing.check_ratio_one_on_the_first_step(trainer, batch)  # |ℓ_θ − ℓ_old| < 1e-5, one step
    assert metrics["log_ratio_abs_max"] < 1e-6 and metrics["clipfrac"] == 0.0
    if name == "grpo":
        assert metrics["kl"] == 0.0


def test_recomputed_log_prob_equals_the_sampler_record_for_every_step(sd3_dir, tmp_path):
    """Re-scoring each step of each trajectory (one example per row, a batch of another size than the sampler's)
    gives the log-prob `sample_flow_trajectory` recorded, to float tolerance, at every step including σ = 1."""
    trainer = tiny_trainer(
        sd3_dir, tmp_path, {"name": "ddpo", "samples_per_prompt": 2, "skip_final_steps": 0}, settings=SETTINGS
    )
    ex = trainer.rollout(PROMPTS).pairs
    assert set(ex.step_index.tolist()) == set(range(trainer.grid.num_steps))
    cond = trainer.encode(PROMPTS).index(ex.prompt_index)
    with torch.no_grad():
        for rows in (torch.arange(len(ex)), torch.tensor([0]), torch.tensor([len(ex) - 1, 1])):
            sub = ex.select(rows)
            log_prob, _, _ = step_log_probs(
                trainer.train_predictor, trainer.grid, cond.index(rows), sub.step_index, sub.state, sub.action
            )
            torch.testing.assert_close(log_prob, sub.log_prob, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["grpo", "ddpo"])
def test_one_step_raises_the_log_prob_of_positive_advantage_samples(sd3_dir, tmp_path, name):
    trainer = tiny_trainer(sd3_dir, tmp_path, METHODS[name] | {"kl_beta": 0.0} if name == "grpo" else METHODS[name])
    batch = trainer.rollout(PROMPTS)
    examples = trainer.learner_obj.algorithm.prepare_examples(batch) if name == "ddpo" else batch.pairs
    batch = dataclasses.replace(batch, pairs=examples)
    assert (examples.advantage != 0).all()
    change = testing.log_prob_change_after_one_step(trainer, batch)
    assert change[examples.advantage > 0].mean() > 0
    assert change[examples.advantage < 0].mean() < 0


def test_grpo_kl_is_the_flow_closed_form_and_its_gradient_lowers_it(sd3_dir, tmp_path):
    """With A = 0 the loss is β · KL, KL = (κ_i²/(2 s_i²)) mean (v̂_θ − v̂_ref)² at each trained state (CFG on both,
    the reference = the LoRA disabled): 0 at the start, positive after a perturbation, lowered by its gradient."""
    trainer = tiny_trainer(sd3_dir, tmp_path, {"name": "grpo", "group_size": 2, "kl_beta": 1.0}, settings=SETTINGS)
    ex, cond, kl_loss = testing.kl_term_alone(trainer, trainer.rollout(PROMPTS), kl_beta=1.0)  # A = 0
    at_reference = kl_loss()
    assert at_reference.metrics["kl"] == 0.0 and at_reference.loss.item() == 0.0
    perturb_lora(trainer)
    out = kl_loss()
    predictor, grid = trainer.train_predictor, trainer.grid
    with torch.no_grad():
        t = grid.timesteps[ex.step_index]
        v_theta = predictor(ex.state, t, cond)
        v_ref = predictor(ex.state, t, cond, reference=True)
        kappa, s = grid.kappa[ex.step_index], grid.std_dev[ex.step_index]
        hand = (kappa**2 / (2 * s**2) * ((v_theta - v_ref) ** 2).mean(dim=(1, 2, 3))).mean()
    assert out.metrics["kl"] > 0
    assert out.metrics["kl"] == pytest.approx(hand.item(), rel=1e-4)
    assert out.loss.item() == pytest.approx(out.metrics["kl"], rel=1e-5)  # A = 0: the surrogate is 0
    descend_lora(trainer, out.loss, lr=1e-3)
    assert kl_loss().metrics["kl"] < out.metrics["kl"]


@pytest.mark.parametrize("name", ["grpo", "ddpo"])
def test_the_trainer_trains_an_sd3_lora_with_a_policy_gradient_method(sd3_dir, tmp_path, name):
    trainer = tiny_loop_trainer(
        sd3_dir, tmp_path, f"sd3_{name}", METHODS[name], seed=0, train={"iterations": 2, "num_inner_epochs": 2}
    )
    result = trainer.fit()
    records = [r for r in run_metrics(result.run_dir) if "train/loss" in r]
    assert [r["iteration"] for r in records] == [1.0, 2.0]
    assert all(math.isfinite(r["train/loss"]) and r["train/optimizer_steps"] >= 2 for r in records)
    if name == "grpo":
        assert "kl/step_0" in records[0] and records[1]["train/kl"] > 0  # round 2 starts away from the reference
    assert result.eval_before is not None and result.eval_after is not None
    check_lora_changed(result.run_dir)  # B starts at 0: the LoRA changed


@pytest.mark.parametrize("name", ["grpo", "ddpo"])
def test_noise_level_zero_is_refused_naming_the_field(sd3_dir, tmp_path, capsys, name):
    """At noise level 0 the flow sampler is the ODE, whose steps have no density: launch refuses DDPO / GRPO on an
    SD3 pipeline before anything is written (exit 2), `load_policy` with the same one message."""
    from rlhf_diffusion.config import load_config
    from rlhf_diffusion.workers.policy import load_policy

    overrides = [f"model.pretrained={sd3_dir}", f"algorithm={{name: {name}}}", "sampling.flow_noise_level=0"]
    code, err = launch_tiny(overrides, tmp_path, capsys)
    assert code == 2 and err.startswith(f"error: sampling.flow_noise_level: must be > 0 for algorithm.name '{name}'")
    assert "model.pretrained" in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # nothing written
    with pytest.raises(ModelLoadError, match=r"sampling.flow_noise_level: must be > 0"):
        load_policy(load_config("configs/tiny.yaml", overrides), str(sd3_dir), torch.device("cpu"))


def test_flow_grpo_with_the_cps_step_samples_and_rescores_it(sd3_dir, tmp_path):
    """`sampling.flow_sde: cps`: the rollout samples Flow-CPS's step (std σ' sin(aπ/2)), the learner re-scores it
    with the same kernel (ratio 1 on the first step), and the last step (no noise) is not trained."""
    settings = {**SETTINGS, "sampling": {"flow_sde": "cps"}}
    trainer = tiny_trainer(sd3_dir, tmp_path, METHODS["grpo"], settings=settings)
    grid = trainer.grid
    assert grid.kind == "cps" and grid.std_dev[-1] == 0
    torch.testing.assert_close(grid.std_dev, grid.sigmas[1:] * math.sin(0.7 * math.pi / 2))
    batch = trainer.rollout(PROMPTS)
    ex = batch.pairs
    assert torch.isfinite(ex.log_prob).all() and int(ex.step_index.max()) == grid.num_steps - 2
    metrics = testing.check_ratio_one_on_the_first_step(trainer, batch)
    assert metrics["log_ratio_abs_max"] < 1e-6 and metrics["clipfrac"] == 0.0 and metrics["kl"] == 0.0


def test_cps_with_the_last_step_trained_is_refused_naming_the_field(sd3_dir, tmp_path, capsys):
    overrides = [
        f"model.pretrained={sd3_dir}",
        "algorithm={name: d3po}",
        "sampling.flow_sde=cps",
        "algorithm.skip_final_steps=0",
    ]
    code, err = launch_tiny(overrides, tmp_path, capsys)
    assert code == 2 and err.startswith("error: algorithm.skip_final_steps: must be >= 1 for algorithm.name 'd3po'")
    assert "sampling.flow_sde 'cps'" in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())

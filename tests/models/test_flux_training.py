"""The preference methods train a tiny FLUX.1-dev-shaped pipeline in process, on the same code as SD3: Flow-GRPO
(GRPO on the flow sampler's SDE steps, re-scored to ratio 1 before any update), Diffusion-DPO and DDE (the
velocity-MSE pair loss), D3PO, TailorPO(-G), DDPO and DDE-Single; each trains 1-2 iterations with a finite loss and a
LoRA that moved, and the trained LoRA loads into the stock `FluxPipeline` with the same transformer output."""

import math

import pytest
import torch
from diffusers import FluxPipeline

from rlhf_diffusion import testing
from rlhf_diffusion.config import RewardConfig
from rlhf_diffusion.diffusion.flow import FlowGrid
from rlhf_diffusion.diffusion.flow_sampling import VelocityPredictor
from rlhf_diffusion.diffusion.sampling import initial_noise
from rlhf_diffusion.evaluate import PromptSet, evaluate
from rlhf_diffusion.evaluation import eval_generators
from rlhf_diffusion.models import export_lora, predict_velocity
from rlhf_diffusion.models.conditioning import encode_prompts, pack_latents
from rlhf_diffusion.models.loading import lora_disabled
from rlhf_diffusion.testing import check_lora_changed, run_metrics, tiny_loop_trainer, tiny_trainer

PROMPTS = ["a cat", "a dog", "a fox"]
GRPO = {"name": "grpo", "group_size": 2, "kl_beta": 0.1}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _fit(flux_dir, tmp_path, name, algorithm, iterations, **sections):
    trainer = tiny_loop_trainer(
        flux_dir, tmp_path, f"flux_{name}", algorithm, seed=0, train={"iterations": iterations}, **sections
    )
    result = trainer.fit()
    records = [r for r in run_metrics(result.run_dir) if "train/loss" in r]
    assert [r["iteration"] for r in records] == [float(i + 1) for i in range(iterations)]
    assert all(math.isfinite(r["train/loss"]) and r["train/optimizer_steps"] >= 1 for r in records)
    assert result.eval_before is not None and result.eval_after is not None  # the ODE evaluation samples FLUX too
    return trainer, result, records


def test_flow_grpo_rollout_rescored_to_ratio_one_and_kl_zero(flux_dir, tmp_path):
    """Flow-GRPO's SDE (a = 0.7) with FLUX's dynamic-shift grid; every trained step's log-prob, recomputed by the
    learner in another batch composition, equals the sampler's: ρ = 1, nothing clipped, KL 0 (LoRA B = 0)."""
    trainer = tiny_trainer(flux_dir, tmp_path, GRPO, train={"train_batch_size": 256, "signal_every": 0})
    assert isinstance(trainer.grid, FlowGrid) and trainer.grid.noise_level == 0.7 and trainer.grid.mu is not None
    assert isinstance(trainer.train_predictor, VelocityPredictor)
    batch = trainer.rollout(PROMPTS)
    assert batch.pairs.state.shape[1:] == (16, 16, 16) and torch.isfinite(batch.pairs.log_prob).all()
    metrics = testing.check_ratio_one_on_the_first_step(trainer, batch)
    assert metrics["log_ratio_abs_max"] < 1e-6 and metrics["clipfrac"] == 0.0 and metrics["kl"] == 0.0


def test_model_flux_guidance_is_the_guidance_embedding_of_every_call(flux_dir, tmp_path):
    """`model.flux_guidance` (FluxPipeline's `guidance_scale`) reaches the conditioning of sampling and training."""
    default = tiny_trainer(flux_dir, tmp_path / "a", GRPO)
    assert default.model.flux_guidance == 3.5
    trainer = tiny_trainer(flux_dir, tmp_path / "b", GRPO, model={"flux_guidance": 2.0})
    assert trainer.model.flux_guidance == 2.0
    cond = encode_prompts(trainer.model, PROMPTS)
    assert torch.equal(cond.guidance, torch.full((3, 1), 2.0))


def test_flow_grpo_trains_a_flux_lora(flux_dir, tmp_path):
    _, result, records = _fit(flux_dir, tmp_path, "grpo", GRPO, 2)
    assert "kl/step_0" in records[0] and records[1]["train/kl"] > 0  # round 2 starts away from the reference
    check_lora_changed(result.run_dir)  # B starts at 0: the LoRA changed


@pytest.mark.parametrize("name", ["diffusion_dpo", "dde"])
def test_the_final_pair_methods_train_a_flux_lora_that_the_stock_pipeline_loads(flux_dir, tmp_path, name):
    algorithm = {"name": name, "beta": 100.0} if name == "diffusion_dpo" else {"name": name}
    trainer, result, records = _fit(flux_dir, tmp_path, name, algorithm, 2)
    assert trainer.train_predictor.guidance_scale == 1.0  # no CFG in the loss; FLUX's guidance embedding stays
    assert any(k.startswith("kl/v_sq_diff_t_") for k in records[0])  # the velocity form of the KL diagnostics
    weights = check_lora_changed(result.run_dir)

    pipe = FluxPipeline.from_pretrained(flux_dir)
    pipe.load_lora_weights(weights.parent)
    cond = trainer.encode(["a cow"])
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([600.0])
    with torch.no_grad():
        ours = predict_velocity(trainer.model.unet, x, t, cond)
        stock = predict_velocity(pipe.transformer, x, t, cond)
        with lora_disabled(trainer.model.unet):
            base = predict_velocity(trainer.model.unet, x, t, cond)
    torch.testing.assert_close(stock, ours, atol=1e-5, rtol=0)
    assert (ours - base).abs().max() > 0


@pytest.mark.parametrize("name", ["d3po", "tailorpo", "tailorpo_g", "ddpo", "dde_single"])
def test_the_other_methods_train_a_flux_lora_for_one_iteration(flux_dir, tmp_path, name):
    algorithm = {"name": name, "samples_per_prompt": 2, "stat_min_count": 2} if name == "ddpo" else {"name": name}
    _, result, _ = _fit(flux_dir, tmp_path, name, algorithm, 1, rewards=[{"name": "brightness"}])
    check_lora_changed(result.run_dir)


def test_noise_level_zero_is_refused_for_a_step_method_on_tiny_flux_before_any_work(tmp_path, capsys):
    """The ODE's steps have no density: launch refuses GRPO on `tiny:flux` at noise level 0 (exit 2, one line naming
    the field and the FLUX pipeline) before building or writing anything."""
    overrides = ["model.pretrained=tiny:flux", "algorithm={name: grpo}", "sampling.flow_noise_level=0"]
    code, err = testing.launch_tiny(overrides, tmp_path, capsys)
    assert code == 2 and err.startswith("error: sampling.flow_noise_level: must be > 0 for algorithm.name 'grpo'")
    assert "FLUX (flow-matching) pipeline in model.pretrained ('tiny:flux')" in err
    assert len(err.strip().splitlines()) == 1 and not any(tmp_path.iterdir())


def test_flux_evaluation_is_the_stock_pipelines_ode_and_the_evaluate_cli_samples_it(flux_dir, tmp_path):
    """A run's held-out images (the ODE, noise level 0, whatever the rollouts sample) equal the stock
    `FluxPipeline`'s with the same initial latents (packed, as the pipeline takes them) and the exported LoRA, and
    `python -m rlhf_diffusion.evaluate`'s sampler gives them again from the LoRA file."""
    prompts, seeds, steps = ["a cow", "a hen"], 2, 3
    trainer = tiny_trainer(
        flux_dir, tmp_path, GRPO, num_steps=2, sampling={"eval_num_steps": steps, "guidance_scale": 1.0}
    )
    sampler = trainer.sampler
    testing.perturb_lora(sampler, seed=7, scale=0.05)
    assert sampler.grid.noise_level == 0.7 and sampler.eval_grid.noise_level == 0.0
    images = sampler.evaluate(prompts, [0, 1], num_seeds=seeds).images
    lora_file = export_lora(sampler.model, tmp_path / "lora")

    pipe = FluxPipeline.from_pretrained(flux_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora_file.parent)
    for j, prompt in enumerate(prompts):
        x_T = torch.cat([initial_noise(1, sampler.model, g) for g in eval_generators(j, seeds)])
        stock = pipe(
            [prompt] * seeds,
            num_inference_steps=steps,
            height=64,
            width=64,
            latents=pack_latents(x_T),
            output_type="pt",
        ).images
        torch.testing.assert_close(images[j * seeds : (j + 1) * seeds], stock, atol=1e-4, rtol=0)

    result = evaluate(
        str(flux_dir),
        PromptSet(source="inline", prompts=prompts),
        [RewardConfig(name="brightness")],
        [("trained", lora_file)],
        seeds=seeds,
        steps=steps,
        guidance_scale=1.0,
        device="cpu",
        log=lambda *_: None,
    )
    assert result.settings["sampler"] == "flow_ode" and result.settings["kind"] == "flux"
    torch.testing.assert_close(result.rows[1].images, images, atol=1e-4, rtol=0)
    assert (result.rows[0].images - images).abs().max() > 1e-3  # the LoRA changes them

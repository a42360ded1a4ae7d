"""The final-pair methods (Diffusion-DPO, DDE-Single, DDE) on a tiny SD3 (flow-matching) pipeline: the rollout samples
through the flow loop, the loss is the velocity-MSE form (a hand computation), a zero LoRA gives log 2, one step
lowers Δ, and the production trainer trains 2 iterations in process and exports a LoRA the stock
`StableDiffusion3Pipeline` loads."""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import StableDiffusion3Pipeline

from rlhf_diffusion.algorithms.diffusion_dpo import diffusion_dpo_mse_terms
from rlhf_diffusion.batches import FinalPairBatch
from rlhf_diffusion.diffusion.flow import FlowGrid
from rlhf_diffusion.diffusion.flow_sampling import VelocityPredictor
from rlhf_diffusion.models import predict_velocity
from rlhf_diffusion.models.loading import lora_disabled, lora_parameters
from rlhf_diffusion.testing import check_lora_changed, perturb_lora, run_metrics, tiny_loop_trainer, tiny_trainer

PROMPTS = ["a cat", "a dog", "a fox"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_final_pair_rollout_samples_the_flow_loop_from_independent_noise(sd3_dir, tmp_path):
    trainer = tiny_trainer(sd3_dir, tmp_path, {"name": "diffusion_dpo", "samples_per_prompt": 3})
    assert isinstance(trainer.grid, FlowGrid) and trainer.grid.noise_level == 0.7  # sampling.flow_noise_level
    assert isinstance(trainer.sample_predictor, VelocityPredictor)
    assert trainer.train_predictor.guidance_scale == 1.0  # conditional velocity in the loss, as flow_grpo
    batch = trainer.rollout(PROMPTS)
    pairs = batch.pairs
    assert isinstance(pairs, FinalPairBatch) and len(pairs) == 3  # brightness ties are practically impossible
    assert pairs.x0_w.shape == (3, 16, 16, 16) and batch.rewards.shape == (3, 3)
    assert (pairs.x0_w - pairs.x0_l).flatten(1).norm(dim=1).min() > 0
    assert batch.final_images.shape == (3, 3, 64, 64)
    ode = tiny_trainer(sd3_dir, tmp_path, "dde_single", sampling={"flow_noise_level": 0.0})
    assert ode.grid.noise_level == 0.0 and len(ode.rollout(PROMPTS[:2]).pairs) == 2  # the ODE serves as well


@pytest.mark.parametrize("name", ["diffusion_dpo", "dde_single"])
def test_flow_loss_equals_the_hand_computation(sd3_dir, tmp_path, name):
    """x_σ = (1 − σ) x_0 + σ ε (ε shared by the pair), e = mean (v − (ε − x_0))², Δ = (e^w_θ − e^w_ref) −
    (e^l_θ − e^l_ref); Diffusion-DPO −log σ(−β/2 Δ), DDE-Single −log σ(−β_s σ² Δ)."""
    trainer = tiny_trainer(sd3_dir, tmp_path, {"name": name})
    perturb_lora(trainer)
    g = torch.Generator().manual_seed(3)
    examples = FinalPairBatch(
        prompt_index=torch.tensor([0, 1]),
        x0_w=torch.randn(2, 16, 16, 16, generator=g),
        x0_l=torch.randn(2, 16, 16, 16, generator=g),
    )
    cond = trainer.encode(PROMPTS[:2])
    t = torch.tensor([120, 800])
    noise = torch.randn(2, 16, 16, 16, generator=g)
    with torch.no_grad():
        out = trainer.algorithm.pair_loss(trainer.train_predictor, cond, examples, t, noise)

        u = (t + 1).double() / 1000
        sigma = (3 * u / (1 + 2 * u)).float()  # the scheduler's shift-3 training table
        s = sigma.view(-1, 1, 1, 1)
        transformer = trainer.model.unet

        # winners and losers in one batch of 4, as the loss evaluates them (the same float reductions)
        x0 = torch.cat([examples.x0_w, examples.x0_l])
        s2, eps2 = s.repeat(2, 1, 1, 1), noise.repeat(2, 1, 1, 1)
        x = (1 - s2) * x0 + s2 * eps2
        target = eps2 - x0
        cond2 = cond.index(torch.tensor([0, 1, 0, 1]))
        v_theta = predict_velocity(transformer, x, sigma.repeat(2) * 1000, cond2)
        with lora_disabled(transformer):
            v_ref = predict_velocity(transformer, x, sigma.repeat(2) * 1000, cond2)
        e_theta = ((v_theta - target) ** 2).mean(dim=(1, 2, 3))
        e_ref = ((v_ref - target) ** 2).mean(dim=(1, 2, 3))
        delta = (e_theta[:2] - e_ref[:2]) - (e_theta[2:] - e_ref[2:])
        config = trainer.config.algorithm
        logits = -0.5 * config.beta * delta if name == "diffusion_dpo" else -config.beta_s * sigma**2 * delta
        expected = -F.logsigmoid(logits).mean()
    assert delta.abs().min() > 0
    torch.testing.assert_close(out.loss, expected, rtol=1e-4, atol=1e-7)
    assert out.metrics["mean_delta"] == pytest.approx(delta.mean().item(), rel=1e-4, abs=1e-9)
    assert set(out.grouped) >= {"kl/v_sq_diff_t", "kl/ddpm_step_t", "signal/saturated_t"}


@pytest.mark.parametrize("name", ["diffusion_dpo", "dde_single", "dde"])
def test_zero_lora_gives_log_2_and_one_step_lowers_delta(sd3_dir, tmp_path, name):
    """With the LoRA at its init (B = 0, θ = ref) Δ = 0 and the loss is log 2; a few descent steps make Δ < 0 at a
    fixed (t, ε): θ fits the winner better than the loser, relative to ref (the winner's implicit reward rises over
    the loser's)."""
    trainer = tiny_trainer(sd3_dir, tmp_path, {"name": name})
    batch = trainer.rollout(PROMPTS)
    ex = batch.pairs
    assert len(ex) >= 2
    cond = trainer.encode(batch.prompts).index(ex.prompt_index)
    out = trainer.algorithm.loss(trainer.train_predictor, cond, ex, torch.Generator().manual_seed(1))
    assert out.loss.item() == pytest.approx(math.log(2), abs=1e-6) and out.metrics["mean_delta"] == 0.0
    t = torch.tensor([700] * len(ex))
    noise = torch.randn(ex.x0_w.shape, generator=torch.Generator().manual_seed(0))

    def delta():
        with torch.no_grad():
            terms = diffusion_dpo_mse_terms(trainer.train_predictor, trainer.grid, cond, ex.x0_w, ex.x0_l, t, noise)
            return terms[0].mean().item()

    assert delta() == 0.0
    params = lora_parameters(trainer.model.unet)
    for _ in range(3):
        out = trainer.algorithm.loss(trainer.train_predictor, cond, ex, torch.Generator().manual_seed(1))
        grads = torch.autograd.grad(out.loss, params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= 1e-3 * g.sign()
    assert delta() < 0


@pytest.mark.parametrize("name", ["diffusion_dpo", "dde_single"])
def test_the_trainer_trains_an_sd3_lora_that_the_stock_pipeline_loads(sd3_dir, tmp_path, name):
    algorithm = {"name": name, "beta": 100.0} if name == "diffusion_dpo" else {"name": name}
    trainer = tiny_loop_trainer(sd3_dir, tmp_path, f"sd3_{name}", algorithm, seed=0, train={"iterations": 2})
    result = trainer.fit()
    records = run_metrics(result.run_dir)
    assert [r["iteration"] for r in records] == [1.0, 2.0]
    assert all(r["train/optimizer_steps"] == 1.0 and math.isfinite(r["train/loss"]) for r in records)
    assert any(k.startswith("kl/v_sq_diff_t_") for k in records[0])  # the velocity form of the KL diagnostics
    assert result.eval_before is not None and result.eval_after is not None  # evaluation samples the flow loop too
    weights = check_lora_changed(result.run_dir)  # B starts at 0: the LoRA changed

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.load_lora_weights(weights.parent)
    cond = trainer.encode(["a cow"])
    x = torch.randn(1, 16, 16, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ours = predict_velocity(trainer.model.unet, x, torch.tensor([600.0]), cond)
        stock = predict_velocity(pipe.transformer, x, torch.tensor([600.0]), cond)
        with lora_disabled(trainer.model.unet):
            base = predict_velocity(trainer.model.unet, x, torch.tensor([600.0]), cond)
    torch.testing.assert_close(stock, ours, atol=1e-5, rtol=0)
    assert (ours - base).abs().max() > 0

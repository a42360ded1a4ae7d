"""The final-pair methods' controls (ours): `samples_per_prompt` (the pair is the reward's best against its worst of
S samples) and `draws_per_pair` (the pair's loss is the mean over k independent (t, ε) draws)."""

import pytest
import torch

from rlhf_diffusion.algorithms.diffusion_dpo import sample_timesteps
from rlhf_diffusion.config import ConfigError, parse_config
from rlhf_diffusion.models.loading import trainable_parameters
from rlhf_diffusion.testing import tiny_trainer

PROMPTS = ["a cat", "a dog", "a fox", "a red cube"]
# tiny_trainer's settings here
TRAINER = {"train_prompts": PROMPTS, "num_steps": 3, "batch_size": 4, "seed": 5, "train": {"signal_every": 0}}


def test_fields_default_to_the_papers_and_reject_nonsense():
    base = {"run_name": "t", "model": {"pretrained": "tiny:sd15"}, "rewards": [{"name": "brightness"}]}
    for name in ("diffusion_dpo", "dde", "dde_single"):
        algorithm = parse_config({**base, "algorithm": {"name": name}}).algorithm
        assert algorithm.samples_per_prompt == 2 and algorithm.draws_per_pair == 1
    with pytest.raises(ConfigError, match="samples_per_prompt"):
        parse_config({**base, "algorithm": {"name": "diffusion_dpo", "samples_per_prompt": 1}})
    with pytest.raises(ConfigError, match="draws_per_pair"):
        parse_config({**base, "algorithm": {"name": "dde", "draws_per_pair": 0}})


def test_best_against_worst_of_four_samples(tiny_sd15_dir, tmp_path, one_torch_thread):
    trainer = tiny_trainer(tiny_sd15_dir, tmp_path, {"name": "diffusion_dpo", "samples_per_prompt": 4}, **TRAINER)
    batch = trainer.rollout(PROMPTS)
    assert batch.rewards.shape == (4, 4)
    best, worst = batch.rewards.max(1).values, batch.rewards.min(1).values
    assert batch.metrics["reward_gap"] == pytest.approx((best - worst).mean().item())
    pairs = batch.pairs
    assert len(pairs) == 4  # brightness never ties on random images
    # the reward of each pair's winner and loser, recomputed from the latents, are the prompt's max and min
    from rlhf_diffusion.diffusion.sampling import decode_latents

    with torch.no_grad():
        r_w = trainer.reward.score(decode_latents(trainer.model, pairs.x0_w), PROMPTS).total
        r_l = trainer.reward.score(decode_latents(trainer.model, pairs.x0_l), PROMPTS).total
    torch.testing.assert_close(r_w, best, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(r_l, worst, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["diffusion_dpo", "dde_single"])
def test_loss_is_the_mean_over_draws_and_one_draw_is_the_papers(tiny_sd15_dir, tmp_path, one_torch_thread, name):
    trainer = tiny_trainer(
        tiny_sd15_dir, tmp_path, {"name": name, "draws_per_pair": 3, "timestep_range": [100, 900]}, **TRAINER
    )
    algorithm, learner = trainer.algorithm, trainer.learner_obj
    batch = trainer.rollout(PROMPTS)
    examples = batch.pairs
    m = len(examples)
    cond = learner.encode(batch.prompts).index(examples.prompt_index)
    loss = algorithm.loss(learner.predictor, cond, examples, torch.Generator().manual_seed(7)).loss
    # by hand: 3·M draws, draw-major, then one paper-style loss per draw
    gen = torch.Generator().manual_seed(7)
    t = sample_timesteps(3 * m, (100, 900), gen)
    noise = torch.randn((3 * m, *examples.x0_w.shape[1:]), generator=gen)
    per_draw = [
        algorithm.pair_loss(learner.predictor, cond, examples, t[d * m : (d + 1) * m], noise[d * m : (d + 1) * m]).loss
        for d in range(3)
    ]
    torch.testing.assert_close(loss, torch.stack(per_draw).mean(), rtol=1e-5, atol=1e-7)
    # rows: the loss gradients of two disjoint row sets, weighted by their sizes, add up to the whole gradient
    params = [p for p in trainable_parameters(trainer.model.unet) if p.requires_grad]
    with torch.no_grad():
        for p in params:  # move off the zero-initialised adapter so that the gradient is not degenerate
            p.add_(0.01 * torch.randn(p.shape, generator=gen))
    whole = algorithm.loss(learner.predictor, cond, examples, torch.Generator().manual_seed(9)).loss
    expected = torch.cat([g.flatten() for g in torch.autograd.grad(whole, params)])
    total = torch.zeros_like(expected)
    for rows in (torch.arange(0, m, 2), torch.arange(1, m, 2)):
        part = algorithm.loss_on_rows(learner.predictor, cond, examples, torch.Generator().manual_seed(9), rows)
        total += torch.cat([g.flatten() for g in torch.autograd.grad(part.loss * len(rows) / m, params)])
    assert expected.norm() > 0
    # equal up to float rounding (DDE's logit scale amplifies it) ...
    assert float((total - expected).norm() / expected.norm()) < 1e-2
    # ... while other draws for the same rows are a different gradient altogether
    other = algorithm.loss_on_rows(
        learner.predictor, cond, examples, torch.Generator().manual_seed(10), torch.arange(m)
    ).loss
    moved = torch.cat([g.flatten() for g in torch.autograd.grad(other, params)])
    assert float((moved - expected).norm() / expected.norm()) > 0.1


def test_one_draw_draws_as_the_papers_method(tiny_sd15_dir, tmp_path, one_torch_thread):
    trainer = tiny_trainer(tiny_sd15_dir, tmp_path, {"name": "diffusion_dpo"}, **TRAINER)
    algorithm, learner = trainer.algorithm, trainer.learner_obj
    batch = trainer.rollout(PROMPTS)
    examples = batch.pairs
    cond = learner.encode(batch.prompts).index(examples.prompt_index)
    loss = algorithm.loss(learner.predictor, cond, examples, torch.Generator().manual_seed(3)).loss
    gen = torch.Generator().manual_seed(3)
    t = sample_timesteps(len(examples), (0, 999), gen)
    noise = torch.randn(examples.x0_w.shape, generator=gen)
    torch.testing.assert_close(loss, algorithm.pair_loss(learner.predictor, cond, examples, t, noise).loss)


def test_shared_initial_noise_starts_a_prompts_samples_from_one_x_T(tiny_sd15_dir, tmp_path, one_torch_thread):
    """At a small η the sampler's later noise barely moves a sample, so a prompt's images from one x_T are nearly
    the same image, while independent ones (the papers') are as far apart as any two samples."""
    distances = {}
    for shared in (False, True):
        trainer = tiny_trainer(
            tiny_sd15_dir,
            tmp_path / str(shared),
            {"name": "dde_single", "samples_per_prompt": 3, "shared_initial_noise": shared},
            **TRAINER,
            sampling={"eta": 0.01},
        )
        pairs = trainer.rollout(PROMPTS).pairs
        assert len(pairs) == len(PROMPTS)
        distances[shared] = float((pairs.x0_w - pairs.x0_l).norm() / pairs.x0_w.norm())
    assert distances[True] < 0.1 * distances[False]
    assert distances[True] > 0  # η > 0: the samples still differ


def test_shared_initial_noise_is_refused_on_the_flow_ode():
    from rlhf_diffusion.workers.policy import flow_method_problem

    config = parse_config(
        {
            "run_name": "t",
            "model": {"pretrained": "tiny:sd15"},
            "rewards": [{"name": "brightness"}],
            "algorithm": {"name": "dde_single", "shared_initial_noise": True},
            "sampling": {"flow_noise_level": 0.0},
        }
    )
    assert "algorithm.shared_initial_noise" in flow_method_problem(config, "sd3")
    assert flow_method_problem(config, "sd15") is None


@pytest.mark.parametrize("name", ["diffusion_dpo", "dde_single"])
def test_winner_sft_term_adds_the_winners_relative_fit_at_the_logits_scale(
    tiny_sd15_dir, tmp_path, one_torch_thread, name
):
    """λ c_t (e^w_θ − e^w_ref) on top of the papers' loss, c_t the logit's coefficient on −Δ_t; 0 = the papers'."""
    from rlhf_diffusion.algorithms.diffusion_dpo import relative_mse_terms

    losses = {}
    for weight in (0.0, 0.7):
        trainer = tiny_trainer(
            tiny_sd15_dir,
            tmp_path / str(weight),
            {"name": name, "winner_sft_weight": weight, "timestep_range": [300, 900]},
            **TRAINER,
        )
        algorithm, learner = trainer.algorithm, trainer.learner_obj
        params = [p for p in trainable_parameters(trainer.model.unet) if p.requires_grad]
        with torch.no_grad():
            gen = torch.Generator().manual_seed(1)
            for p in params:  # off the zero-initialised adapter: d^w ≠ 0
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
        batch = trainer.rollout(PROMPTS)
        examples = batch.pairs
        cond = learner.encode(batch.prompts).index(examples.prompt_index)
        out = algorithm.loss(learner.predictor, cond, examples, torch.Generator().manual_seed(4))
        losses[weight] = out.loss
        gen = torch.Generator().manual_seed(4)
        t = sample_timesteps(len(examples), (300, 900), gen)
        noise = torch.randn(examples.x0_w.shape, generator=gen)
        d_w, d_l, _ = relative_mse_terms(learner.predictor, trainer.grid, cond, examples.x0_w, examples.x0_l, t, noise)
        scale = (
            0.5 * algorithm.config.beta
            if name == "diffusion_dpo"
            else algorithm.config.beta_s * ((1 - trainer.grid.alphas_cumprod[t]) / trainer.grid.alphas_cumprod[t])
        )
        papers = -torch.nn.functional.logsigmoid(-scale * (d_w - d_l)).mean()
        expected = papers + weight * (scale * d_w).mean()
        torch.testing.assert_close(out.loss, expected.float(), rtol=1e-4, atol=1e-6)
        assert out.metrics["winner_rel_mse"] == pytest.approx(d_w.mean().item(), rel=1e-4, abs=1e-9)
        assert out.metrics["loser_rel_mse"] == pytest.approx(d_l.mean().item(), rel=1e-4, abs=1e-9)
        assert abs(d_w.mean().item()) > 0


def test_guided_loss_evaluates_the_pair_loss_on_the_samplers_cfg_prediction(tiny_sd15_dir, tmp_path, one_torch_thread):
    """`guided_loss` (ours): the learner's predictions carry the sampler's CFG weight; off, the conditional model's
    alone (the papers'). The two losses of one batch at one draw differ once the adapter has moved."""
    losses = {}
    for guided in (False, True):
        trainer = tiny_trainer(
            tiny_sd15_dir, tmp_path / str(guided), {"name": "dde_single", "guided_loss": guided}, **TRAINER
        )
        learner = trainer.learner_obj
        assert learner.predictor.guidance_scale == (2.0 if guided else 1.0)  # tiny_run_config's guidance_scale
        params = [p for p in trainable_parameters(trainer.model.unet) if p.requires_grad]
        with torch.no_grad():
            gen = torch.Generator().manual_seed(1)
            for p in params:
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
        batch = trainer.rollout(PROMPTS)
        cond = learner.encode(batch.prompts).index(batch.pairs.prompt_index)
        losses[guided] = trainer.algorithm.loss(learner.predictor, cond, batch.pairs, torch.Generator().manual_seed(3))
        assert torch.isfinite(losses[guided].loss)
    assert losses[True].metrics["mean_delta"] != pytest.approx(losses[False].metrics["mean_delta"], rel=1e-3)


@pytest.mark.parametrize("name", ["diffusion_dpo", "dde_single"])
def test_policy_reference_makes_the_loss_linear_in_the_policys_own_mse(tiny_sd15_dir, tmp_path, one_torch_thread, name):
    """`reference: policy` (ours): the reference is θ itself, stop-gradient, so every logit is 0 (the loss log 2) and
    the gradient is that of ½ mean c_t (e^w_θ − e^l_θ): every pair at the sigmoid weight ½. The base reference's
    gradient differs once the adapter has moved (its weights σ(−z) are not ½)."""
    from rlhf_diffusion.diffusion.forward_process import forward_process_for
    from rlhf_diffusion.models.conditioning import TextConditioning

    scale_field = {"beta_s": 50.0} if name == "dde_single" else {"beta": 2000.0}
    grads = {}
    for reference in ("base", "policy"):
        trainer = tiny_trainer(
            tiny_sd15_dir,
            tmp_path / reference,
            {"name": name, "reference": reference, "timestep_range": [300, 900], **scale_field},
            **TRAINER,
        )
        algorithm, learner = trainer.algorithm, trainer.learner_obj
        params = [p for p in trainable_parameters(trainer.model.unet) if p.requires_grad]
        with torch.no_grad():
            gen = torch.Generator().manual_seed(1)
            for p in params:  # off the zero-initialised adapter: the base reference's logits are not 0
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        batch = trainer.rollout(PROMPTS)
        examples = batch.pairs
        cond = learner.encode(batch.prompts).index(examples.prompt_index)
        out = algorithm.loss(learner.predictor, cond, examples, torch.Generator().manual_seed(4))
        grads[reference] = torch.cat([g.flatten() for g in torch.autograd.grad(out.loss, params)])
        if reference == "policy":
            assert out.loss.item() == pytest.approx(float(torch.log(torch.tensor(2.0))), abs=1e-6)
            # by hand: ½ mean c_t (e^w_θ − e^l_θ) at the same draw
            gen = torch.Generator().manual_seed(4)
            t = sample_timesteps(len(examples), (300, 900), gen)
            noise = torch.randn(examples.x0_w.shape, generator=gen)
            process = forward_process_for(trainer.grid)
            x0 = torch.cat([examples.x0_w, examples.x0_l])
            noise2, t2 = noise.repeat(2, 1, 1, 1), t.repeat(2)
            pred = learner.predictor(
                process.noised(x0, noise2, t2), process.model_timesteps(t2), TextConditioning.cat([cond, cond])
            )
            err = ((pred - process.target(x0, noise2)) ** 2).mean(dim=(1, 2, 3))
            m = len(examples)
            linear = 0.5 * (algorithm.logit_scale(t) * (err[:m] - err[m:])).mean()
            expected = torch.cat([g.flatten() for g in torch.autograd.grad(linear, params)])
            torch.testing.assert_close(grads["policy"], expected, rtol=1e-4, atol=1e-9)
    assert not torch.allclose(grads["base"], grads["policy"], rtol=1e-2, atol=0)

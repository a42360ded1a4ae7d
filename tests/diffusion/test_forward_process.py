"""The forward processes of the final-pair losses (`diffusion/forward_process.py`) and the flow maths under them
(`flow.train_sigmas`, `x0_error_weight`, `vp_equivalent_*`), against closed forms and the diffusers scheduler."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from rlhf_diffusion.algorithms.diffusion_dpo import sample_timesteps
from rlhf_diffusion.diffusion import ddim, flow
from rlhf_diffusion.diffusion.forward_process import EpsilonProcess, FlowProcess, forward_process_for
from rlhf_diffusion.diffusion.sampling import DDIMGrid


def test_train_sigmas_are_the_schedulers_training_table_ascending():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sigmas = flow.train_sigmas(1000, 3.0)
    torch.testing.assert_close(sigmas, scheduler.sigmas.flip(0).float(), atol=2e-7, rtol=0)
    assert sigmas[0].item() == pytest.approx(3 * 0.001 / 1.002, rel=1e-6)
    assert sigmas[499].item() == pytest.approx(0.75, rel=1e-6) and sigmas[999].item() == 1.0
    torch.testing.assert_close(flow.train_sigmas(4, None), torch.tensor([0.25, 0.5, 0.75, 1.0]))


def test_x0_error_weight_turns_a_velocity_error_into_the_x0_error():
    g = torch.Generator().manual_seed(0)
    x0, eps, v_hat = (torch.randn(3, 4, 5, 5, generator=g) for _ in range(3))
    sigma = torch.tensor([0.1, 0.5, 0.9])
    x = flow.add_noise(x0, eps, sigma)
    x0_err = ((x0 - flow.pred_x0_from_velocity(x, v_hat, sigma)) ** 2).mean(dim=(1, 2, 3))
    v_err = ((flow.velocity_target(x0, eps) - v_hat) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(x0_err, flow.x0_error_weight(sigma) * v_err, rtol=1e-5, atol=0)


def test_vp_equivalent_alpha_has_the_same_snr_and_maps_ddes_weight_to_sigma_squared():
    sigma = torch.tensor([0.01, 0.25, 0.5, 0.8, 0.99])
    a = flow.vp_equivalent_alpha_prod(sigma)  # float32: 1 − ᾱ loses digits at small σ, hence rtol 1e-3
    torch.testing.assert_close(a / (1 - a), ((1 - sigma) / sigma) ** 2, rtol=1e-3, atol=0)
    # (1 − ᾱ)/ᾱ on ε-MSEs = σ²/(1 − σ)², and an ε-MSE is (1 − σ)² times the velocity-MSE: σ² on velocity-MSEs
    torch.testing.assert_close(
        ddim.x0_error_coefficient(a) * (1 - sigma) ** 2, flow.x0_error_weight(sigma), rtol=1e-3, atol=0
    )
    # the ε a velocity implies: ε − ε̂ = (1 − σ)(v − v̂)
    g = torch.Generator().manual_seed(1)
    x0, eps, v_hat = (torch.randn(5, 2, 3, 3, generator=g) for _ in range(3))
    x = flow.add_noise(x0, eps, sigma)
    eps_err = eps - flow.pred_noise_from_velocity(x, v_hat, sigma)
    torch.testing.assert_close(
        eps_err, (1 - sigma).view(-1, 1, 1, 1) * (flow.velocity_target(x0, eps) - v_hat), rtol=1e-5, atol=1e-6
    )


def test_vp_equivalent_kl_weights_closed_form():
    sigmas = flow.train_sigmas(1000, 3.0).double()
    lam = flow.vp_equivalent_kl_weights(sigmas.float())
    assert lam.shape == (1000,) and lam[0] == 0 and (lam[1:] > 0).all() and torch.isfinite(lam).all()
    # below σ = 1 it is the DDPM weight of the same-SNR chain (ddim.ddpm_kl_weights) times (1 − σ_t)²
    alpha_prod = flow.vp_equivalent_alpha_prod(sigmas).double()
    betas = 1 - alpha_prod / torch.cat([torch.ones(1, dtype=torch.float64), alpha_prod[:-1]])
    via_ddpm = ddim.ddpm_kl_weights(betas) * (1 - sigmas.float()) ** 2
    torch.testing.assert_close(lam[1:990], via_ddpm[1:990], rtol=2e-3, atol=0)
    for t in (1, 300, 998):
        a_t = (1 - sigmas[t]) ** 2 / ((1 - sigmas[t]) ** 2 + sigmas[t] ** 2)
        a_prev = (1 - sigmas[t - 1]) ** 2 / ((1 - sigmas[t - 1]) ** 2 + sigmas[t - 1] ** 2)
        alpha = a_t / a_prev
        hand = (1 - alpha) / (2 * alpha * (1 - a_prev)) * (1 - sigmas[t]) ** 2  # λ_t (ε units) × (1 − σ_t)²
        assert lam[t].item() == pytest.approx(hand.item(), rel=1e-3)


def test_flow_process_noises_targets_and_calls_at_sigma_times_n():
    process = FlowProcess(sigmas=flow.train_sigmas(1000, 3.0))
    t = torch.tensor([0, 499, 999])
    g = torch.Generator().manual_seed(2)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    s = torch.tensor([3 * 0.001 / 1.002, 0.75, 1.0]).view(-1, 1, 1, 1)
    torch.testing.assert_close(process.noised(x0, eps, t), (1 - s) * x0 + s * eps)
    torch.testing.assert_close(process.target(x0, eps), eps - x0)
    torch.testing.assert_close(process.model_timesteps(t), s.flatten() * 1000)
    torch.testing.assert_close(process.x0_error_weight(t), s.flatten() ** 2)
    assert process.num_train_timesteps == 1000 and process.prediction == "v"


def test_epsilon_process_is_the_ddpm_forward_process():
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    grid = DDIMGrid.from_scheduler(scheduler, 4, 1.0)
    process = forward_process_for(grid)
    assert isinstance(process, EpsilonProcess) and process.prediction == "eps"
    t = torch.tensor([10, 500, 990])
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(3, 4, 4, 4, generator=g), torch.randn(3, 4, 4, 4, generator=g)
    torch.testing.assert_close(process.noised(x0, eps, t), scheduler.add_noise(x0, eps, t))
    assert torch.equal(process.target(x0, eps), eps) and torch.equal(process.model_timesteps(t), t)
    a = scheduler.alphas_cumprod[t]
    torch.testing.assert_close(process.x0_error_weight(t), (1 - a) / a)
    torch.testing.assert_close(process.kl_weights(), ddim.ddpm_kl_weights(scheduler.betas))


def test_forward_process_for_a_flow_grid():
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    process = forward_process_for(flow.FlowGrid.from_scheduler(scheduler, 4, 0.7))
    assert isinstance(process, FlowProcess)
    torch.testing.assert_close(process.sigmas, flow.train_sigmas(1000, 3.0))
    with pytest.raises(TypeError):
        forward_process_for(object())


def test_logit_normal_timesteps_follow_flow_grpos_draw():
    g = torch.Generator().manual_seed(4)
    t = sample_timesteps(200_000, (0, 999), g, "logit_normal")
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    # P(t < 500) = P(u < 1/2) = 1/2; P(t < 119) = P(n < logit(0.119)) = Φ(−2.0)
    assert (t < 500).float().mean().item() == pytest.approx(0.5, abs=0.005)
    expected = 0.5 * (1 + math.erf(math.log(0.119 / 0.881) / math.sqrt(2)))
    assert (t < 119).float().mean().item() == pytest.approx(expected, abs=0.003)
    narrow = sample_timesteps(1000, (200, 299), g, "logit_normal")
    assert narrow.min() >= 200 and narrow.max() <= 299
    uniform = sample_timesteps(1000, (200, 299), torch.Generator().manual_seed(5))
    assert torch.equal(uniform, torch.randint(200, 300, (1000,), generator=torch.Generator().manual_seed(5)))
    with pytest.raises(ValueError, match="density"):
        sample_timesteps(1, (0, 9), g, "cosine")

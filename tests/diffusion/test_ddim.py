"""DDIM maths against hand-derived values, closed forms and diffusers' own DDIMScheduler."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

from rlhf_diffusion.diffusion import ddim
from rlhf_diffusion.models.tiny import SD_SCHEDULER_CONFIG  # SD's schedule, with DDIM's SD-style settings


@pytest.fixture(scope="module")
def scheduler():
    return DDIMScheduler(**SD_SCHEDULER_CONFIG)


def _alphas(scheduler, t, prev):
    a = ddim.gather_alpha(scheduler.alphas_cumprod, t)
    a_prev = ddim.gather_alpha_prev(scheduler.alphas_cumprod, prev, scheduler.final_alpha_cumprod)
    return a, a_prev


def test_timesteps_match_diffusers(scheduler):
    for k in (1, 4, 20, 50):
        scheduler.set_timesteps(k)
        assert torch.equal(ddim.ddim_timesteps(1000, k, 1), scheduler.timesteps)
    assert ddim.ddim_timesteps(1000, 20)[:3].tolist() == [951, 901, 851]
    assert ddim.ddim_timesteps(1000, 20)[-1].item() == 1


def test_alpha_bar_endpoints(scheduler):
    # docs/algorithms.md §0: ᾱ_0 = 0.99915, ᾱ_999 = 0.00466 for SD's scaled_linear schedule.
    assert scheduler.alphas_cumprod[0].item() == pytest.approx(0.99915, abs=1e-5)
    assert scheduler.alphas_cumprod[999].item() == pytest.approx(0.00466, abs=1e-5)
    prev = ddim.previous_timesteps(torch.tensor([1]), 1000, 20)
    assert prev.item() == -49
    # negative previous timestep -> final_alpha_cumprod = ᾱ_0 (set_alpha_to_one=False)
    a_prev = ddim.gather_alpha_prev(scheduler.alphas_cumprod, prev, scheduler.final_alpha_cumprod)
    assert a_prev.item() == pytest.approx(0.99915, abs=1e-5)


@pytest.mark.parametrize(
    "t, sigma, kappa, r",
    [  # docs/algorithms.md §0 reference table (SD1.5, K=20, η=1), 3 significant digits
        (951, 0.644, -0.550, 11.03),
        (801, 0.581, -0.433, 5.13),
        (601, 0.483, -0.313, 2.29),
        (401, 0.373, -0.233, 1.17),
        (201, 0.251, -0.189, 0.57),
        (101, 0.167, -0.191, 0.35),
        (51, 0.041, -0.221, 0.23),
        (1, 0.021, -0.021, 0.04),
    ],
)
def test_sigma_kappa_reference_table(scheduler, t, sigma, kappa, r):
    t = torch.tensor([t])
    a, a_prev = _alphas(scheduler, t, ddim.previous_timesteps(t, 1000, 20))
    std = ddim.ddim_std(a, a_prev, eta=1.0)
    assert std.item() == pytest.approx(sigma, abs=1.5e-3)
    assert ddim.ddim_kappa(a, a_prev, std).item() == pytest.approx(kappa, abs=1.5e-3)
    assert math.sqrt(ddim.x0_error_coefficient(a).item()) == pytest.approx(r, abs=0.011)


@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("t_val", [951, 501, 51, 1])
def test_step_matches_diffusers_ddim_step(scheduler, eta, t_val):
    scheduler.set_timesteps(20)
    g = torch.Generator().manual_seed(t_val)
    x_t = torch.randn(3, 4, 8, 8, generator=g)
    eps = torch.randn(3, 4, 8, 8, generator=g)
    z = torch.randn(3, 4, 8, 8, generator=g)
    expected = scheduler.step(eps, t_val, x_t, eta=eta, variance_noise=z).prev_sample
    t = torch.full((3,), t_val)
    a, a_prev = _alphas(scheduler, t, ddim.previous_timesteps(t, 1000, 20))
    std = ddim.ddim_std(a, a_prev, eta)
    mean, x0 = ddim.ddim_step_mean(x_t, eps, a, a_prev, std)
    ours = mean + std.view(-1, 1, 1, 1) * z if eta > 0 else mean
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    expected_x0 = scheduler.step(eps, t_val, x_t, eta=eta, variance_noise=z).pred_original_sample
    torch.testing.assert_close(x0, expected_x0, atol=1e-5, rtol=1e-5)
    if eta > 0:
        x_prev, _, _, _ = ddim.ddim_step_with_logprob(x_t, eps, a, a_prev, eta, noise=z)
        torch.testing.assert_close(x_prev, expected, atol=1e-5, rtol=1e-5)


def test_step_with_batched_mixed_timesteps(scheduler):
    """A batch whose samples sit at different timesteps equals per-sample diffusers steps."""
    scheduler.set_timesteps(20)
    g = torch.Generator().manual_seed(0)
    ts = torch.tensor([951, 451, 1])
    x_t, eps, z = (torch.randn(3, 4, 4, 4, generator=g) for _ in range(3))
    a, a_prev = _alphas(scheduler, ts, ddim.previous_timesteps(ts, 1000, 20))
    x_prev, _, _, _ = ddim.ddim_step_with_logprob(x_t, eps, a, a_prev, 1.0, noise=z)
    for i, t in enumerate(ts.tolist()):
        ref = scheduler.step(eps[i : i + 1], t, x_t[i : i + 1], eta=1.0, variance_noise=z[i : i + 1]).prev_sample
        torch.testing.assert_close(x_prev[i : i + 1], ref, atol=1e-5, rtol=1e-5)


def test_logprob_matches_torch_normal_and_replay():
    g = torch.Generator().manual_seed(1)
    x_t, eps = torch.randn(2, 4, 4, 4, generator=g), torch.randn(2, 4, 4, 4, generator=g)
    a, a_prev = torch.tensor([0.3, 0.6]), torch.tensor([0.4, 0.7])
    x_prev, logp, mean, std = ddim.ddim_step_with_logprob(x_t, eps, a, a_prev, 1.0, generator=g)
    normal = torch.distributions.Normal(mean, std.view(-1, 1, 1, 1))
    torch.testing.assert_close(logp, normal.log_prob(x_prev).mean(dim=(1, 2, 3)))
    _, logp_sum, _, _ = ddim.ddim_step_with_logprob(x_t, eps, a, a_prev, 1.0, prev_sample=x_prev, reduction="sum")
    torch.testing.assert_close(logp_sum, normal.log_prob(x_prev).sum(dim=(1, 2, 3)))
    # STYLE practice 2: sampling and replaying the stored action give the same log-prob.
    _, replay, _, _ = ddim.ddim_step_with_logprob(x_t, eps, a, a_prev, 1.0, prev_sample=x_prev)
    torch.testing.assert_close(replay, logp, atol=1e-5, rtol=0)


def test_logprob_needs_positive_eta():
    x = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="eta must be > 0"):
        ddim.ddim_step_with_logprob(x, x, torch.tensor([0.5]), torch.tensor([0.6]), eta=0.0)


def test_logprob_gradient_flows_into_mean_not_action():
    x_t = torch.randn(1, 4, 2, 2)
    eps = torch.randn(1, 4, 2, 2, requires_grad=True)
    action = torch.randn(1, 4, 2, 2, requires_grad=True)
    _, logp, _, _ = ddim.ddim_step_with_logprob(
        x_t, eps, torch.tensor([0.5]), torch.tensor([0.6]), 1.0, prev_sample=action
    )
    logp.sum().backward()
    assert eps.grad is not None and eps.grad.abs().sum() > 0
    assert action.grad is None


def test_log_ratio_of_gaussians_with_shared_sigma_hand_values():
    # 1-D by hand: x = 1, μ_θ = 0.5, μ_ref = 0, σ = 0.5 -> ((1-0)^2 - (1-0.5)^2) / (2·0.25) = 0.75/0.5 = 1.5
    x, m_t, m_r = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 0.5), torch.zeros(1, 1, 1, 1)
    assert ddim.log_ratio_same_std(x, m_t, m_r, torch.tensor([0.5])).item() == pytest.approx(1.5)
    # equals the difference of two full Gaussian log-densities (normalisers cancel), any reduction
    g = torch.Generator().manual_seed(2)
    x, m_t, m_r = (torch.randn(3, 4, 5, 5, generator=g) for _ in range(3))
    std = torch.tensor([0.3, 0.7, 1.1])
    for red in ("mean", "sum"):
        diff = ddim.gaussian_log_prob(x, m_t, std, red) - ddim.gaussian_log_prob(x, m_r, std, red)
        torch.testing.assert_close(ddim.log_ratio_same_std(x, m_t, m_r, std, red), diff, atol=1e-4, rtol=1e-5)


def test_pair_log_ratio_closed_form_equals_difference_of_single_ratios(scheduler):
    g = torch.Generator().manual_seed(3)
    t = torch.tensor([951, 401, 51])
    a, a_prev = _alphas(scheduler, t, ddim.previous_timesteps(t, 1000, 20))
    std = ddim.ddim_std(a, a_prev, 1.0)
    kappa = ddim.ddim_kappa(a, a_prev, std)
    x_t, eps_th, eps_ref = (torch.randn(3, 4, 4, 4, generator=g) for _ in range(3))
    mu_th, _ = ddim.ddim_step_mean(x_t, eps_th, a, a_prev, std)
    mu_ref, _ = ddim.ddim_step_mean(x_t, eps_ref, a, a_prev, std)
    # μ_θ − μ_ref = κ (ε̂_θ − ε̂_ref)
    torch.testing.assert_close(mu_th - mu_ref, kappa.view(-1, 1, 1, 1) * (eps_th - eps_ref), atol=1e-5, rtol=1e-5)
    x_w = mu_th + std.view(-1, 1, 1, 1) * torch.randn(3, 4, 4, 4, generator=g)
    x_l = mu_th + std.view(-1, 1, 1, 1) * torch.randn(3, 4, 4, 4, generator=g)
    direct = ddim.log_ratio_same_std(x_w, mu_th, mu_ref, std) - ddim.log_ratio_same_std(x_l, mu_th, mu_ref, std)
    closed = ddim.pair_log_ratio_same_state(x_w, x_l, eps_th, eps_ref, kappa, std)
    torch.testing.assert_close(closed, direct, atol=1e-3, rtol=1e-4)


def test_ddim_jump_to_previous_step_equals_one_step(scheduler):
    g = torch.Generator().manual_seed(4)
    x_t, eps, z = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([601, 601])
    a, a_prev = _alphas(scheduler, t, ddim.previous_timesteps(t, 1000, 20))
    x_prev, _, _, _ = ddim.ddim_step_with_logprob(x_t, eps, a, a_prev, 1.0, noise=z)
    x_s, _ = ddim.ddim_jump(x_t, eps, a, a_prev, 1.0, noise=z)
    torch.testing.assert_close(x_s, x_prev)
    # jump to s = 0 with η = 0: mean ≈ x̂_0 up to sqrt(ᾱ_0) and the tiny direction term
    a0 = scheduler.alphas_cumprod[:1].expand(2)
    x_0, std0 = ddim.ddim_jump(x_t, eps, a, a0, 0.0, noise=z)
    assert torch.all(std0 == 0)
    x0_pred = ddim.pred_x0_from_eps(x_t, eps, a)
    expected = a0[0].sqrt() * x0_pred + (1 - a0[0]).sqrt() * eps
    torch.testing.assert_close(x_0, expected)


def test_add_noise_matches_scheduler_and_x0_error_identity(scheduler):
    g = torch.Generator().manual_seed(5)
    x0, noise, eps_model = (torch.randn(2, 4, 4, 4, generator=g) for _ in range(3))
    t = torch.tensor([10, 700])
    a = ddim.gather_alpha(scheduler.alphas_cumprod, t)
    x_t = ddim.add_noise(x0, noise, a)
    torch.testing.assert_close(x_t, scheduler.add_noise(x0, noise, t))
    # DDE single-shot identity: ||x_0 − x̂_0(x_t)||² = ((1−ᾱ)/ᾱ) ||ε − ε̂||²
    x0_hat = ddim.pred_x0_from_eps(x_t, eps_model, a)
    lhs = ((x0 - x0_hat) ** 2).sum(dim=(1, 2, 3))
    rhs = ddim.x0_error_coefficient(a) * ((noise - eps_model) ** 2).sum(dim=(1, 2, 3))
    torch.testing.assert_close(lhs, rhs, rtol=1e-4, atol=1e-4)


def test_ddpm_kl_weights_reference_values(scheduler):
    # docs/algorithms.md §0: λ_t ≈ 0.0033–0.0066 for t ≥ 100, ≈ 0.01 at t = 50, ≈ 0.05 at t = 10, ≈ 0.5 at t = 1.
    lam = ddim.ddpm_kl_weights(scheduler.betas)
    assert lam[0].item() == 0.0
    assert lam[1].item() == pytest.approx(0.5, rel=0.05)
    assert lam[10].item() == pytest.approx(0.05, rel=0.1)
    assert lam[50].item() == pytest.approx(0.01, rel=0.2)
    assert 0.0032 < lam[100:].min().item() and lam[100:].max().item() < 0.0067
    # identity: λ_t ||ε − ε_θ||² = ||μ̃ − μ_θ||² / (2 β̃_t)
    t = 300
    b, a_cum = scheduler.betas[t], scheduler.alphas_cumprod
    alpha = 1 - b
    beta_tilde = b * (1 - a_cum[t - 1]) / (1 - a_cum[t])
    coef = b**2 / (alpha * (1 - a_cum[t]))  # ||μ̃ − μ_θ||² = coef ||ε − ε_θ||²
    assert lam[t].item() == pytest.approx((coef / (2 * beta_tilde)).item(), rel=1e-5)

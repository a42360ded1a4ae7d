"""The guards' KL maths (diffusion/ddim.py `kl_same_std`, `ddpm_step_kl`; algorithms/common.py diagnostics) against
hand-derived values, torch.distributions and Monte Carlo."""

import pytest
import torch
from diffusers import DDPMScheduler
from torch.distributions import Normal, kl_divergence

from rlhf_diffusion.algorithms.common import step_kl_diagnostics
from rlhf_diffusion.algorithms.diffusion_dpo import KL_TIMESTEP_BUCKET, timestep_kl_diagnostics
from rlhf_diffusion.diffusion import ddim


def test_kl_same_std_hand_value():
    # μ_θ − μ_ref = 0.3 everywhere, σ = 0.5: KL per element = 0.3² / (2 · 0.5²) = 0.18; the sum over D = 2·3·4·4
    mean_ref = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    kl = ddim.kl_same_std(mean_ref + 0.3, mean_ref, torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(kl, torch.tensor([0.18, 0.18]))
    torch.testing.assert_close(
        ddim.kl_same_std(mean_ref + 0.3, mean_ref, torch.tensor([0.5, 0.5]), "sum"),
        torch.tensor([0.18 * 48, 0.18 * 48]),
    )
    assert ddim.kl_same_std(mean_ref, mean_ref, torch.tensor([0.5, 1.0])).abs().max() == 0


def test_kl_same_std_equals_the_gaussian_kl():
    g = torch.Generator().manual_seed(1)
    mean_theta, mean_ref = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    std = torch.tensor([0.2, 0.7, 1.3])
    s = std.view(-1, 1, 1, 1).expand_as(mean_theta)
    expected = kl_divergence(Normal(mean_theta, s), Normal(mean_ref, s)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(ddim.kl_same_std(mean_theta, mean_ref, std, "sum"), expected)
    torch.testing.assert_close(ddim.kl_same_std(mean_theta, mean_ref, std), expected / (4 * 8 * 8))


def test_the_mean_log_ratio_of_on_policy_actions_estimates_the_kl():
    # E_{x ~ π_θ}[log π_θ(x) − log π_ref(x)] = KL(π_θ ‖ π_ref): what kl/log_ratio_step_<k> estimates on-policy
    g = torch.Generator().manual_seed(2)
    mean_theta = torch.randn(1, 4, 8, 8, generator=g)
    mean_ref = mean_theta + 0.2 * torch.randn(1, 4, 8, 8, generator=g)
    std = torch.tensor([0.5])
    n = 4000
    x = mean_theta + std * torch.randn(n, 4, 8, 8, generator=g)
    log_ratios = ddim.log_ratio_same_std(
        x, mean_theta.expand(n, -1, -1, -1), mean_ref.expand(n, -1, -1, -1), std.expand(n)
    )
    kl = ddim.kl_same_std(mean_theta, mean_ref, std).item()
    assert log_ratios.mean().item() == pytest.approx(kl, rel=0.05)
    # actions from the reference instead give −KL(π_ref ‖ π_θ) (= −KL here: shared σ makes the KL symmetric)
    x_ref = mean_ref + std * torch.randn(n, 4, 8, 8, generator=g)
    from_ref = ddim.log_ratio_same_std(
        x_ref, mean_theta.expand(n, -1, -1, -1), mean_ref.expand(n, -1, -1, -1), std.expand(n)
    )
    assert from_ref.mean().item() == pytest.approx(-kl, rel=0.05)


def test_ddpm_step_kl_equals_the_kl_of_the_two_reverse_gaussians():
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
    )
    betas, alphas_cumprod = scheduler.betas.double(), scheduler.alphas_cumprod.double()
    t = torch.tensor([1, 250, 999])
    g = torch.Generator().manual_seed(3)
    x_t = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    eps_theta = torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    eps_ref = eps_theta + 0.1 * torch.randn(3, 4, 8, 8, generator=g, dtype=torch.float64)
    beta, a_bar = betas[t].view(-1, 1, 1, 1), alphas_cumprod[t].view(-1, 1, 1, 1)
    a_bar_prev = alphas_cumprod[t - 1].view(-1, 1, 1, 1)
    alpha = 1 - beta

    def mean(eps):  # DDPM eq. 11: μ(x_t) = (x_t − β_t / sqrt(1 − ᾱ_t) ε) / sqrt(α_t)
        return (x_t - beta / (1 - a_bar).sqrt() * eps) / alpha.sqrt()

    std = (beta * (1 - a_bar_prev) / (1 - a_bar)).sqrt().expand_as(x_t)  # posterior σ = sqrt(β̃_t)
    expected = kl_divergence(Normal(mean(eps_theta), std), Normal(mean(eps_ref), std)).sum(dim=(1, 2, 3))
    lam = ddim.ddpm_kl_weights(scheduler.betas)[t]
    got = ddim.ddpm_step_kl(eps_theta.float(), eps_ref.float(), lam, "sum")
    torch.testing.assert_close(got, expected.float(), rtol=1e-4, atol=0)
    torch.testing.assert_close(ddim.ddpm_step_kl(eps_theta, eps_ref, lam), got / (4 * 8 * 8))


def test_step_diagnostics_group_by_step_index():
    grouped = step_kl_diagnostics(
        torch.tensor([0, 2]), torch.tensor([0.1, 0.2]), torch.tensor([0, 2, 0, 2]), torch.tensor([1.0, 2.0, 3.0, 4.0])
    )
    assert set(grouped) == {"kl/step", "kl/log_ratio_step"}
    assert grouped["kl/step"][0].tolist() == [0, 2] and grouped["kl/log_ratio_step"][0].tolist() == [0, 2, 0, 2]


def test_timestep_diagnostics_bucket_t_and_weight_by_lambda():
    assert KL_TIMESTEP_BUCKET == 100
    lam = ddim.ddpm_kl_weights(DDPMScheduler(num_train_timesteps=1000).betas)
    t = torch.tensor([0, 99, 100, 950])
    diff = torch.tensor([1.0, 2.0, 3.0, 4.0])
    grouped = timestep_kl_diagnostics(t, diff, lam)
    buckets, values = grouped["kl/eps_sq_diff_t"]
    assert buckets.tolist() == [0, 0, 100, 900] and values.tolist() == diff.tolist()
    buckets, values = grouped["kl/ddpm_step_t"]
    assert buckets.tolist() == [0, 0, 100, 900]
    torch.testing.assert_close(values, lam[t] * diff)
    assert values[0] == 0  # λ_0 = 0: the step into x_0 has no Gaussian-to-Gaussian KL

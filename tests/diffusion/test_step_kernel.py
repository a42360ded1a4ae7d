"""The step kernels DDPO and GRPO re-score their steps with (diffusion/step_kernel.py): the flow kernel's log-prob,
mean and KL against the hand-derived Gaussian of Flow-GRPO's SDE step (docs/algorithms.md §10), the DDIM kernel
against the DDIM functions, and the dispatch on the grid."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from rlhf_diffusion.diffusion import ddim, flow
from rlhf_diffusion.diffusion.flow import FlowGrid
from rlhf_diffusion.diffusion.sampling import DDIMGrid
from rlhf_diffusion.diffusion.step_kernel import DDIMKernel, FlowKernel, step_kernel_for

A = 0.7


def _flow_kernel(k=6, a=A):
    return FlowKernel(FlowGrid.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), k, a))


def _tensors(seed, m=3, shape=(4, 4, 4)):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, *shape, generator=g) for _ in range(4))


def test_flow_kernel_log_prob_is_the_hand_derived_gaussian():
    """Step i from σ to σ' (Δ = σ − σ'), g = a sqrt(σ/(1 − σ)) (σ = 1: 1 − σ → Δ), s = g sqrt(Δ),
    μ = (1 − g²Δ/(2σ)) x + κ v̂ with κ = −Δ(1 + g²(1 − σ)/(2σ)); ℓ = mean[−(x' − μ)²/(2s²)] − log s − ½ log 2π.
    Steps 0 (σ = 1, where s = a exactly) and 3 are checked in one batch, with an arbitrary action."""
    kernel = _flow_kernel()
    x, v, action, _ = _tensors(0)
    steps = torch.tensor([0, 3, 5])
    log_prob, mean, std = kernel.log_prob(x, v, steps, action)
    for row, i in enumerate(steps.tolist()):
        sigma, sigma_next = kernel.grid.sigmas[i].double().item(), kernel.grid.sigmas[i + 1].double().item()
        delta = sigma - sigma_next
        g2 = A**2 * sigma / (delta if sigma >= 1 else 1 - sigma)
        s = math.sqrt(g2 * delta)
        if i == 0:
            assert s == pytest.approx(A, rel=1e-6)
        kappa = -delta * (1 + g2 * (1 - sigma) / (2 * sigma))
        mu = (1 - g2 * delta / (2 * sigma)) * x[row].double() + kappa * v[row].double()
        expected = (
            (-((action[row].double() - mu) ** 2) / (2 * s * s)).mean() - math.log(s) - 0.5 * math.log(2 * math.pi)
        )
        assert std[row].item() == pytest.approx(s, rel=1e-6)
        assert log_prob[row].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-5)
        torch.testing.assert_close(mean[row].double(), mu, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kernel.mean(x, v, steps), mean)  # the mean alone is the same μ
    torch.testing.assert_close(kernel.std(steps), std)
    torch.testing.assert_close(kernel.timesteps(steps), kernel.grid.sigmas[steps] * 1000)


def test_flow_kernel_rescores_the_action_the_sde_step_drew():
    """The sampler's draw x' = μ + s z, re-scored by the kernel: ℓ = −mean(z²)/2 − log s − ½ log 2π, the same value
    `flow.sde_step_with_logprob` returned when it drew x'."""
    kernel = _flow_kernel()
    x, v, _, z = _tensors(1)
    steps = torch.tensor([1, 2, 4])
    sigma, sigma_next = kernel.grid.sigmas[steps], kernel.grid.sigmas[steps + 1]
    drawn, logp_sampler, _, s = flow.sde_step_with_logprob(x, v, sigma, sigma_next, A, noise=z)
    log_prob, _, _ = kernel.log_prob(x, v, steps, drawn)
    torch.testing.assert_close(log_prob, logp_sampler, atol=1e-6, rtol=0)
    hand = -(z**2).mean(dim=(1, 2, 3)) / 2 - s.log() - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(log_prob, hand, atol=1e-4, rtol=0)


def test_flow_kernel_kl_and_log_ratio_closed_forms():
    """With the kernel's means of two velocities at one state, KL = (κ²/(2s²)) mean (v̂_θ − v̂_ref)² and the
    single-action log-ratio is the difference of the two kernel log-probs; both 0 when the velocities agree."""
    kernel = _flow_kernel()
    x, v_theta, v_ref, action = _tensors(2)
    steps = torch.tensor([0, 2, 5])
    mean_theta, mean_ref, s = kernel.mean(x, v_theta, steps), kernel.mean(x, v_ref, steps), kernel.std(steps)
    kl = ddim.kl_same_std(mean_theta, mean_ref, s)
    kappa = kernel.grid.kappa[steps]
    expected = kappa**2 / (2 * s**2) * ((v_theta - v_ref) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(kl, expected, rtol=1e-4, atol=0)
    assert ddim.kl_same_std(mean_theta, kernel.mean(x, v_theta, steps), s).abs().max() == 0
    log_ratio = flow.log_ratio_same_std(action, mean_theta, mean_ref, s)
    direct = kernel.log_prob(x, v_theta, steps, action)[0] - kernel.log_prob(x, v_ref, steps, action)[0]
    torch.testing.assert_close(log_ratio, direct, atol=2e-4, rtol=1e-4)


def test_flow_kernel_at_noise_level_zero_has_no_density():
    kernel = _flow_kernel(a=0.0)
    x, v, action, _ = _tensors(3)
    log_prob, _, std = kernel.log_prob(x, v, torch.tensor([0, 1, 2]), action)
    assert torch.isnan(log_prob).all() and (std == 0).all()


def test_ddim_kernel_is_the_ddim_step():
    grid = DDIMGrid.from_scheduler(DDIMScheduler(), 5, 1.0)
    kernel = DDIMKernel(grid)
    x, eps, action, _ = _tensors(4)
    steps = torch.tensor([0, 1, 3])
    t, a, a_prev, s = grid.scalars(steps)
    _, expected, expected_mean, expected_std = ddim.ddim_step_with_logprob(x, eps, a, a_prev, 1.0, prev_sample=action)
    log_prob, mean, std = kernel.log_prob(x, eps, steps, action)
    torch.testing.assert_close(log_prob, expected, atol=0, rtol=0)
    torch.testing.assert_close(mean, expected_mean, atol=0, rtol=0)
    torch.testing.assert_close(kernel.mean(x, eps, steps), expected_mean, atol=0, rtol=0)
    torch.testing.assert_close(kernel.std(steps), s)
    assert kernel.timesteps(steps).tolist() == t.tolist()


def test_the_grid_picks_the_kernel():
    assert isinstance(step_kernel_for(DDIMGrid.from_scheduler(DDIMScheduler(), 5, 1.0)), DDIMKernel)
    assert isinstance(step_kernel_for(_flow_kernel().grid), FlowKernel)
    with pytest.raises(TypeError, match="no step kernel"):
        step_kernel_for(object())


def test_kernel_kappa_is_the_mean_coefficient_of_the_prediction():
    """μ(p + d) − μ(p) = κ d at a fixed state, for both kernels (κ_i of flow.sde_kappa, κ_τ of ddim.ddim_kappa)."""
    kernels = [_flow_kernel(), DDIMKernel(DDIMGrid.from_scheduler(DDIMScheduler(), 5, 1.0))]
    for kernel in kernels:
        x, p, d, _ = _tensors(5)
        steps = torch.tensor([0, 1, 3])
        shift = kernel.mean(x, p + d, steps) - kernel.mean(x, p, steps)
        torch.testing.assert_close(shift, kernel.kappa()[steps].view(-1, 1, 1, 1) * d, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(kernels[0].kappa(), kernels[0].grid.kappa)


def test_x0_after_recovers_the_clean_latent_from_the_true_prediction():
    """A latent at the noise level step i lands on, x = (1 − σ_{i+1}) x_0 + σ_{i+1} ε (flow) or sqrt(ᾱ_prev) x_0 +
    sqrt(1 − ᾱ_prev) ε (DDIM), with the true prediction (v = ε − x_0, or ε) gives x̂_0 = x_0 back."""
    x0, eps, _, _ = _tensors(6)
    steps = torch.tensor([0, 2, 4])
    kernel = _flow_kernel()
    sigma_next = kernel.grid.sigmas[steps + 1]
    x = flow.add_noise(x0, eps, sigma_next)
    torch.testing.assert_close(kernel.x0_after(x, eps - x0, steps), x0, atol=1e-5, rtol=1e-5)
    ddim_kernel = DDIMKernel(DDIMGrid.from_scheduler(DDIMScheduler(), 5, 1.0))
    steps = torch.tensor([0, 1, 3])
    x = ddim.add_noise(x0, eps, ddim_kernel.grid.alpha_prod_prev[steps])
    torch.testing.assert_close(ddim_kernel.x0_after(x, eps, steps), x0, atol=1e-4, rtol=1e-4)

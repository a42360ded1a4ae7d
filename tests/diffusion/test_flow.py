"""Rectified-flow maths (diffusion/flow.py) against diffusers' FlowMatchEulerDiscreteScheduler, hand-derived values,
closed forms, torch.distributions and Monte Carlo."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch.distributions import Normal, kl_divergence

from rlhf_diffusion.diffusion import ddim, flow


def _randn(*shape, g):
    return torch.randn(*shape, generator=g)


def _scheduler(shift):
    """shift = float: static shift; shift = ("mu", μ): FLUX's dynamic shift."""
    if isinstance(shift, tuple):
        return FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), shift[1]
    return FlowMatchEulerDiscreteScheduler(shift=shift), None


SHIFTS = [1.0, 3.0, ("mu", 0.63), ("mu", 1.15)]


# --------------------------------------------------------------------------------------------------------------
# Forward process and predictions
# --------------------------------------------------------------------------------------------------------------


def test_forward_process_and_predictions():
    g = torch.Generator().manual_seed(0)
    x0, eps, v_any = (_randn(3, 4, 4, 4, g=g) for _ in range(3))
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    t = scheduler.timesteps[[0, 400, 900]]
    sigma = t / 1000
    x = flow.add_noise(x0, eps, sigma)
    torch.testing.assert_close(x, scheduler.scale_noise(x0, t, eps))
    v = flow.velocity_target(x0, eps)
    # the true velocity recovers x_0 and ε exactly
    torch.testing.assert_close(flow.pred_x0_from_velocity(x, v, sigma), x0, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(flow.pred_noise_from_velocity(x, v, sigma), eps, atol=1e-5, rtol=1e-5)
    # x = (1 − σ) x̂_0 + σ ε̂ for any velocity
    x0_hat = flow.pred_x0_from_velocity(x, v_any, sigma)
    eps_hat = flow.pred_noise_from_velocity(x, v_any, sigma)
    torch.testing.assert_close(flow.add_noise(x0_hat, eps_hat, sigma), x, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# The grid
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("k", [1, 4, 10, 28])
def test_flow_sigmas_and_grid_match_diffusers(shift, k):
    scheduler, mu = _scheduler(shift)
    untouched = scheduler.sigmas.clone()
    reference = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
    reference.set_timesteps(k, mu=mu)
    ours = flow.flow_sigmas(k, shift=1.0 if mu is not None else shift, mu=mu)
    torch.testing.assert_close(ours, reference.sigmas, atol=1e-6, rtol=0)
    grid = flow.FlowGrid.from_scheduler(scheduler, k, noise_level=0.7, mu=mu)
    assert torch.equal(grid.sigmas, reference.sigmas) and torch.equal(grid.timesteps, reference.timesteps)
    assert grid.sigmas[0].item() == 1.0 and grid.sigmas[-1].item() == 0.0 and grid.num_steps == k
    assert torch.equal(scheduler.sigmas, untouched)  # the caller's scheduler is untouched
    assert (grid.shift is None) == (mu is not None) and grid.mu == mu


def test_flow_sigmas_hand_values_and_custom_sigmas():
    # SD3.5 (static shift 3), K = 10: linspace(1, shift(1/1000) = 0.0029940, 10)[1] = 0.889222 → 3·0.889222/2.778444
    expected = [1, 0.9601, 0.9133, 0.8577, 0.7904, 0.7073, 0.6022, 0.4649, 0.2780, 0.0089, 0]
    torch.testing.assert_close(flow.flow_sigmas(10, shift=3.0), torch.tensor(expected), atol=6e-5, rtol=0)
    assert flow.flow_sigmas(10, shift=3.0)[1].item() == pytest.approx(0.960130, abs=2e-6)
    # FLUX passes its own sigmas linspace(1, 1/K, K) with μ = 0.63 (512²): 1, .9037, .7897, .6525, .4842, .2730, 0
    scheduler = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    grid = flow.FlowGrid.from_scheduler(scheduler, 6, 0.9, mu=0.63, sigmas=torch.linspace(1, 1 / 6, 6).tolist())
    torch.testing.assert_close(
        grid.sigmas, torch.tensor([1, 0.9037, 0.7897, 0.6525, 0.4842, 0.2730, 0]), atol=6e-5, rtol=0
    )
    # static shift s is the dynamic shift with μ = ln s: e^μ / (e^μ + 1/σ − 1)
    sig = torch.tensor([0.3, 0.7], dtype=torch.float64)
    torch.testing.assert_close(flow.shift_sigmas(sig, 3.0), 3.0 / (3.0 + 1 / sig - 1))


def test_grid_refuses_bad_schedulers_and_noise_levels():
    with pytest.raises(ValueError, match="invert_sigmas"):
        flow.FlowGrid.from_scheduler(FlowMatchEulerDiscreteScheduler(invert_sigmas=True), 4, 0.7)
    with pytest.raises(ValueError, match="noise_level"):
        flow.FlowGrid.from_scheduler(FlowMatchEulerDiscreteScheduler(), 4, -0.1)
    with pytest.raises(ValueError, match="mu"):  # diffusers' own check: a dynamic shift needs μ
        flow.FlowGrid.from_scheduler(FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), 4, 0.7)


@pytest.mark.parametrize(
    "step, sigma, std",
    [  # SD3.5 (shift 3), K = 10, a = 0.7. Step 5 by hand: σ = .7073, Δ = .1051, g = .7·sqrt(.7073/.2927) = 1.0882,
        # s = 1.0882·sqrt(.1051) = .3528. Step 0: σ = 1 → s = a exactly.
        (0, 1.0, 0.700),
        (2, 0.9133, 0.536),
        (5, 0.7073, 0.353),
        (8, 0.2780, 0.225),
        (9, 0.0089, 0.0063),
    ],
)
def test_grid_std_reference_table(step, sigma, std):
    grid = flow.FlowGrid.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), 10, noise_level=0.7)
    assert grid.sigmas[step].item() == pytest.approx(sigma, abs=6e-5)
    assert grid.std_dev[step].item() == pytest.approx(std, abs=6e-4)
    # κ = −Δ (1 + a²/2) for σ < 1, −Δ at σ = 1
    delta = (grid.sigmas[step] - grid.sigmas[step + 1]).item()
    assert grid.kappa[step].item() == pytest.approx(-delta * (1 if step == 0 else 1 + 0.49 / 2), rel=1e-5)
    t, s, s_next, sd = grid.scalars(torch.tensor([step, 0]))
    assert torch.equal(s, grid.sigmas[[step, 0]]) and torch.equal(s_next, grid.sigmas[[step + 1, 1]])
    assert torch.equal(t, grid.timesteps[[step, 0]]) and torch.equal(sd, grid.std_dev[[step, 0]])


# --------------------------------------------------------------------------------------------------------------
# The ODE step against diffusers; the SDE step at a = 0
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("k", [1, 4, 10])
def test_euler_step_equals_diffusers_step(shift, k):
    scheduler, mu = _scheduler(shift)
    grid = flow.FlowGrid.from_scheduler(scheduler, k, noise_level=0.0, mu=mu)
    scheduler.set_timesteps(k, mu=mu)
    g = torch.Generator().manual_seed(k)
    x = _randn(2, 4, 8, 8, g=g)
    for i, t in enumerate(scheduler.timesteps):
        v = _randn(2, 4, 8, 8, g=g)  # the same model output for both
        expected = scheduler.step(v, t, x).prev_sample
        ours = flow.euler_step(x, v, grid.sigmas[i], grid.sigmas[i + 1])
        assert torch.equal(ours, expected)
        sde, logp, mean, std = flow.sde_step_with_logprob(
            x, v, grid.sigmas[i].expand(2), grid.sigmas[i + 1].expand(2), 0.0, generator=g
        )
        assert torch.equal(sde, expected) and torch.equal(mean, expected)  # a = 0: the ODE step, bit for bit
        assert torch.all(std == 0) and torch.all(torch.isnan(logp))  # and no density
        x = expected


def test_batched_mixed_steps_and_noise_levels():
    """A shuffled batch (a different step per row, a per-row a with ODE rows) equals per-row computations."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    grid = flow.FlowGrid.from_scheduler(scheduler, 10, noise_level=0.7)
    scheduler.set_timesteps(10)
    g = torch.Generator().manual_seed(1)
    idx = torch.tensor([7, 0, 3, 9])
    a = torch.tensor([0.0, 0.7, 0.7, 0.0])
    x, v, z = (_randn(4, 4, 4, 4, g=g) for _ in range(3))
    _, s, s_next, _ = grid.scalars(idx)
    x_prev, logp, _, std = flow.sde_step_with_logprob(x, v, s, s_next, a, noise=z)
    for row, i in enumerate(idx.tolist()):
        if a[row] == 0:
            scheduler._step_index = i
            expected = scheduler.step(v[row : row + 1], scheduler.timesteps[i], x[row : row + 1]).prev_sample
            assert torch.equal(x_prev[row : row + 1], expected) and torch.isnan(logp[row])
        else:
            single, single_logp, _, single_std = flow.sde_step_with_logprob(
                x[row : row + 1], v[row : row + 1], grid.sigmas[i], grid.sigmas[i + 1], 0.7, noise=z[row : row + 1]
            )
            torch.testing.assert_close(x_prev[row : row + 1], single)
            torch.testing.assert_close(logp[row : row + 1], single_logp)
            assert std[row].item() == pytest.approx(grid.std_dev[i].item(), rel=1e-6)


# --------------------------------------------------------------------------------------------------------------
# The SDE step: hand values, moments, log-prob
# --------------------------------------------------------------------------------------------------------------


def test_sde_step_hand_values():
    # σ = 0.75 → σ' = 0.5, a = 0.5: g² = 0.25·0.75/0.25 = 0.75, Δ = 0.25, s = sqrt(0.75·0.25) = 0.4330,
    # g²Δ/(2σ) = 0.125, κ = −0.25·(1 + 0.75·0.25/1.5) = −0.28125; μ = 0.875 x − 0.28125 v; x = 1, v = 2 → 0.3125.
    x, v = torch.ones(1, 1, 1, 1), torch.full((1, 1, 1, 1), 2.0)
    sigma, sigma_next = torch.tensor([0.75]), torch.tensor([0.5])
    gsc = flow.sde_noise_scale(sigma, sigma_next, 0.5)
    assert gsc.item() == pytest.approx(math.sqrt(0.75))
    assert flow.sde_std(sigma, sigma_next, gsc).item() == pytest.approx(math.sqrt(0.1875))
    assert flow.sde_kappa(sigma, sigma_next, gsc).item() == pytest.approx(-0.28125)
    mean, x0_pred = flow.sde_step_mean(x, v, sigma, sigma_next, gsc)
    assert mean.item() == pytest.approx(0.3125) and x0_pred.item() == pytest.approx(-0.5)
    # second form: (1 − σ') x̂_0 + (σ' − g²Δ/(2σ)) ε̂ = 0.5·(−0.5) + 0.375·(1 + 0.25·2) = 0.3125
    eps_pred = flow.pred_noise_from_velocity(x, v, sigma)
    assert (0.5 * x0_pred + 0.375 * eps_pred).item() == pytest.approx(0.3125)
    _, _, mean2, std2 = flow.sde_step_with_logprob(x, v, sigma, sigma_next, 0.5, noise=torch.zeros(1, 1, 1, 1))
    assert mean2.item() == pytest.approx(0.3125) and std2.item() == pytest.approx(math.sqrt(0.1875))
    # σ = 1 → σ' = 0.8, a = 0.7 (Flow-GRPO's first step): g² = 0.49/(1 − 0.8) = 2.45, s = sqrt(2.45·0.2) = 0.7 = a,
    # μ = (1 − a²/2) x − Δ v = 0.755 x − 0.2 v; x = 1, v = 2 → 0.355.
    one, s08 = torch.tensor([1.0]), torch.tensor([0.8])
    _, _, mean, std = flow.sde_step_with_logprob(x, v, one, s08, 0.7, noise=torch.zeros(1, 1, 1, 1))
    assert std.item() == pytest.approx(0.7) and mean.item() == pytest.approx(0.355)
    assert flow.sde_kappa(one, s08, flow.sde_noise_scale(one, s08, 0.7)).item() == pytest.approx(-0.2)


def test_sde_mean_equals_flow_grpo_coded_form():
    """μ = x (1 − g²Δ/(2σ)) + κ v̂ (how Flow-GRPO writes it) = our Euler-plus-score form, at every grid step."""
    grid = flow.FlowGrid.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), 10, noise_level=0.7)
    g = torch.Generator().manual_seed(2)
    x, v = _randn(10, 4, 4, 4, g=g), _randn(10, 4, 4, 4, g=g)
    s, s_next = grid.sigmas[:-1], grid.sigmas[1:]
    mean, _ = flow.sde_step_mean(x, v, s, s_next, grid.noise_scale)
    dt = (s_next - s).view(-1, 1, 1, 1)
    gt2, sv = grid.noise_scale.view(-1, 1, 1, 1) ** 2, s.view(-1, 1, 1, 1)
    coded = x * (1 + gt2 * dt / (2 * sv)) + v * (1 + gt2 * (1 - sv) / (2 * sv)) * dt
    torch.testing.assert_close(mean, coded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        mean - x * (1 + gt2 * dt / (2 * sv)), grid.kappa.view(-1, 1, 1, 1) * v, atol=1e-5, rtol=1e-5
    )


def test_sde_step_empirical_moments_match_the_formula():
    g = torch.Generator().manual_seed(3)
    x, v = _randn(1, 4, 4, 4, g=g), _randn(1, 4, 4, 4, g=g)
    m = 20000
    sigma, sigma_next = torch.full((m,), 0.7073), torch.full((m,), 0.6022)
    x_prev, _, mean, std = flow.sde_step_with_logprob(
        x.expand(m, -1, -1, -1), v.expand(m, -1, -1, -1), sigma, sigma_next, 0.7, generator=g
    )
    s = std[0].item()
    assert s == pytest.approx(0.7 * math.sqrt(0.7073 / (1 - 0.7073)) * math.sqrt(0.7073 - 0.6022), rel=1e-5)
    # mean: 64 elements, each averaged over m draws: |error| < 5 standard errors
    assert (x_prev.mean(0) - mean[0]).abs().max().item() < 5 * s / math.sqrt(m)
    # variance per element: relative standard error sqrt(2/m) = 1%
    torch.testing.assert_close(x_prev.var(0), torch.full_like(x_prev[0], s**2), rtol=0.05, atol=0)
    assert abs(x_prev.var(0).mean().item() / s**2 - 1) < 0.01


def test_logprob_matches_torch_normal_and_replay():
    g = torch.Generator().manual_seed(4)
    x, v = _randn(3, 4, 4, 4, g=g), _randn(3, 4, 4, 4, g=g)
    sigma, sigma_next = torch.tensor([1.0, 0.6, 0.2]), torch.tensor([0.9, 0.4, 0.0])
    x_prev, logp, mean, std = flow.sde_step_with_logprob(x, v, sigma, sigma_next, 0.7, generator=g)
    normal = Normal(mean, std.view(-1, 1, 1, 1))
    torch.testing.assert_close(logp, normal.log_prob(x_prev).mean(dim=(1, 2, 3)))
    _, logp_sum, _, _ = flow.sde_step_with_logprob(x, v, sigma, sigma_next, 0.7, prev_sample=x_prev, reduction="sum")
    torch.testing.assert_close(logp_sum, normal.log_prob(x_prev).sum(dim=(1, 2, 3)))
    # sampling and replaying the stored action give the same log-prob
    _, replay, _, _ = flow.sde_step_with_logprob(x, v, sigma, sigma_next, 0.7, prev_sample=x_prev)
    torch.testing.assert_close(replay, logp, atol=1e-5, rtol=0)
    # with x' = μ + s z: ℓ = −mean(z²)/2 − log s − ½ log 2π
    z = _randn(3, 4, 4, 4, g=g)
    _, logp_z, _, std = flow.sde_step_with_logprob(x, v, sigma, sigma_next, 0.7, noise=z)
    expected = -(z**2).mean(dim=(1, 2, 3)) / 2 - std.log() - 0.5 * math.log(2 * math.pi)
    torch.testing.assert_close(logp_z, expected, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# The rectified-flow marginal under the SDE step (a point mass x_0, its exact velocity v(x, σ) = (x − x_0)/σ)
# --------------------------------------------------------------------------------------------------------------
#
# From x_σ = (1 − σ) x_0 + τ ξ (τ = σ for the forward process), v = (x_σ − x_0)/σ gives ε̂ = τξ/σ and
#     x_{σ'} = (1 − σ') x_0 + (τ/σ) (σ' − g²Δ/(2σ)) ξ + s z        exactly, for every draw (ξ, z).
# So the mean (1 − σ') x_0 is kept exactly at every a and Δ; the output is Gaussian with variance
#     τ'² = (τ/σ)² (σ' − g²Δ/(2σ))² + g²Δ,
# which at τ = σ is σ'² + Δ² (g²/σ + g⁴/(4σ²)): σ'² exactly for the ODE (a = 0), and an excess of order Δ² for a > 0
# at a fixed σ < 1 (g depends on σ only). At σ = 1 Flow-GRPO's g² = a²/Δ makes the excess a²Δ + a⁴/4.


def _point_mass_step(x0, sigma, sigma_next, a, xi, z, tau=None):
    tau = sigma if tau is None else tau
    x = (1 - sigma) * x0 + tau * xi
    v = (x - x0) / sigma
    s, s_next = torch.tensor([sigma]), torch.tensor([sigma_next])
    return flow.sde_step_with_logprob(x, v, s, s_next, a, noise=z)


@pytest.mark.parametrize("sigma, sigma_next", [(1.0, 0.9601), (0.7073, 0.6022), (0.278, 0.0089), (0.278, 0.0)])
@pytest.mark.parametrize("a", [0.0, 0.7])
def test_point_mass_step_exact_per_draw(sigma, sigma_next, a):
    g = torch.Generator().manual_seed(5)
    x0, xi, z = (_randn(1, 4, 8, 8, g=g) for _ in range(3))
    x_prev, _, _, std = _point_mass_step(x0, sigma, sigma_next, a, xi, z)
    gsc = flow.sde_noise_scale(torch.tensor(sigma), torch.tensor(sigma_next), a).item()
    c_xi = sigma_next - gsc**2 * (sigma - sigma_next) / (2 * sigma)
    torch.testing.assert_close(x_prev, (1 - sigma_next) * x0 + c_xi * xi + std.item() * z, atol=2e-6, rtol=1e-5)
    if a == 0:  # the ODE keeps the rectified-flow marginal exactly: x_{σ'} = (1 − σ') x_0 + σ' ξ
        torch.testing.assert_close(x_prev, (1 - sigma_next) * x0 + sigma_next * xi, atol=2e-6, rtol=1e-5)


def test_point_mass_step_excess_variance_is_of_order_delta_squared():
    a, sigma = 0.7, 0.7073
    gsc = flow.sde_noise_scale(torch.tensor(sigma), torch.tensor(0.5), a).item()  # g depends on σ only (σ < 1)
    excess = []
    for delta in (0.2, 0.1, 0.05, 0.025):
        x0, xi = torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)
        # read the step's coefficients off the function: with x_0 = 0, ξ = 1, z = 0 the output is c_ξ; s is returned
        c_xi, _, _, std = _point_mass_step(x0, sigma, sigma - delta, a, xi, torch.zeros(1, 1, 1, 1))
        variance = c_xi.item() ** 2 + std.item() ** 2
        excess.append(variance - (sigma - delta) ** 2)
        expected = delta**2 * (gsc**2 / sigma + gsc**4 / (4 * sigma**2))
        assert excess[-1] == pytest.approx(expected, rel=1e-4)
    # halving Δ quarters the excess
    for big, small in zip(excess, excess[1:]):
        assert small / big == pytest.approx(0.25, rel=1e-3)
    # at σ = 1 the excess is a²Δ + a⁴/4, not small in Δ (the step's std is a whatever Δ)
    c_xi, _, _, std = _point_mass_step(
        torch.zeros(1, 1, 1, 1), 1.0, 0.9, a, torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1)
    )
    assert c_xi.item() ** 2 + std.item() ** 2 - 0.81 == pytest.approx(a**2 * 0.1 + a**4 / 4, rel=1e-4)


@pytest.mark.parametrize("a", [0.0, 0.7])
def test_point_mass_chain_keeps_the_mean_and_follows_the_variance_recursion(a):
    """The K = 10 SD3.5 grid from x_1 = ξ: the empirical mean is (1 − σ_i) x_0 at every step and the empirical
    variance follows τ'² = (τ/σ)² (σ' − g²Δ/(2σ))² + s²; at a = 0 the chain ends at x_0."""
    grid = flow.FlowGrid.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), 10, noise_level=a)
    g = torch.Generator().manual_seed(6)
    n = 100_000
    x0 = torch.full((1, 1, 1, n), 0.8)
    x = _randn(1, 1, 1, n, g=g)
    tau2 = 1.0
    for i in range(10):
        sigma, sigma_next = grid.sigmas[i], grid.sigmas[i + 1]
        v = (x - x0) / sigma
        x, _, _, std = flow.sde_step_with_logprob(x, v, sigma.view(1), sigma_next.view(1), a, generator=g)
        c = sigma_next.item() - grid.noise_scale[i].item() ** 2 * (sigma - sigma_next).item() / (2 * sigma.item())
        tau2 = tau2 / sigma.item() ** 2 * c**2 + std.item() ** 2
        se = math.sqrt(tau2 / n)
        assert abs(x.mean().item() - (1 - sigma_next.item()) * 0.8) < 5 * se + 1e-6
        assert x.var().item() == pytest.approx(tau2, rel=0.03, abs=1e-10)
    if a == 0:
        torch.testing.assert_close(x, x0, atol=1e-5, rtol=0)
        assert tau2 == 0
    else:
        # the chain does not end at the point mass: the last step's own noise (s_9 = 0.0063) plus what the earlier
        # steps' excess leaves (the final std is about 0.06)
        assert tau2 > 10 * grid.std_dev[-1].item() ** 2


# --------------------------------------------------------------------------------------------------------------
# Same-state pair log-ratio and KL
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_pair_log_ratio_equals_two_direct_log_prob_differences(reduction):
    grid = flow.FlowGrid.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), 10, noise_level=0.7)
    g = torch.Generator().manual_seed(7)
    idx = torch.tensor([0, 3, 8])
    _, s, s_next, _ = grid.scalars(idx)
    x = _randn(3, 4, 4, 4, g=g)
    v_theta = _randn(3, 4, 4, 4, g=g)
    v_ref = v_theta + 0.3 * _randn(3, 4, 4, 4, g=g)
    x_a, lp_theta_a, mean_theta, std = flow.sde_step_with_logprob(x, v_theta, s, s_next, 0.7, generator=g)
    x_b, lp_theta_b, _, _ = flow.sde_step_with_logprob(x, v_theta, s, s_next, 0.7, generator=g)

    def logp(v, action):
        return flow.sde_step_with_logprob(x, v, s, s_next, 0.7, prev_sample=action, reduction=reduction)[1]

    direct = (logp(v_theta, x_a) - logp(v_ref, x_a)) - (logp(v_theta, x_b) - logp(v_ref, x_b))
    _, _, mean_ref, _ = flow.sde_step_with_logprob(x, v_ref, s, s_next, 0.7, prev_sample=x_a)
    closed = flow.pair_log_ratio_from_means(x_a, x_b, mean_theta, mean_ref, std, reduction)
    scale = 64 if reduction == "sum" else 1
    torch.testing.assert_close(closed, direct, atol=2e-4 * scale, rtol=1e-4)
    # the velocity form: μ_θ − μ_ref = κ (v̂_θ − v̂_ref), the pair through ddim's κ-form
    kappa = grid.kappa[idx]
    torch.testing.assert_close(mean_theta - mean_ref, kappa.view(-1, 1, 1, 1) * (v_theta - v_ref), atol=1e-5, rtol=1e-4)
    via_kappa = ddim.pair_log_ratio_same_state(x_a, x_b, v_theta, v_ref, kappa, std, reduction)
    torch.testing.assert_close(via_kappa, closed, atol=1e-4 * scale, rtol=1e-4)
    # the single-action log-ratio (ddim's, shared)
    single = flow.log_ratio_same_std(x_a, mean_theta, mean_ref, std, reduction)
    torch.testing.assert_close(single, logp(v_theta, x_a) - logp(v_ref, x_a), atol=2e-4 * scale, rtol=1e-4)


def test_kl_between_two_sde_steps():
    assert flow.kl_same_std is ddim.kl_same_std
    grid = flow.FlowGrid.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), 10, noise_level=0.7)
    g = torch.Generator().manual_seed(8)
    idx = torch.tensor([0, 5, 8])
    _, s, s_next, std = grid.scalars(idx)
    x, v_theta, v_ref = (_randn(3, 4, 4, 4, g=g) for _ in range(3))
    mean_theta, _ = flow.sde_step_mean(x, v_theta, s, s_next, grid.noise_scale[idx])
    mean_ref, _ = flow.sde_step_mean(x, v_ref, s, s_next, grid.noise_scale[idx])
    kl = flow.kl_same_std(mean_theta, mean_ref, std, "sum")
    sd = std.view(-1, 1, 1, 1).expand_as(mean_theta)
    torch_kl = kl_divergence(Normal(mean_theta, sd), Normal(mean_ref, sd)).sum(dim=(1, 2, 3))
    torch.testing.assert_close(kl, torch_kl, atol=1e-4, rtol=1e-4)
    # = (Δ/2) (κ/Δ)² / g² ‖v̂_θ − v̂_ref‖²: the KL in velocity units
    delta = s - s_next
    in_v = delta / 2 * (grid.kappa[idx] / delta) ** 2 / grid.noise_scale[idx] ** 2
    torch.testing.assert_close(kl, in_v * ((v_theta - v_ref) ** 2).sum(dim=(1, 2, 3)), atol=1e-4, rtol=1e-4)


# --------------------------------------------------------------------------------------------------------------
# Gradients reach the velocity (a tiny linear "model"), never the action
# --------------------------------------------------------------------------------------------------------------


def test_gradients_flow_to_the_velocity_model():
    torch.manual_seed(9)
    model = torch.nn.Conv2d(4, 4, kernel_size=1)  # v̂ = W x + b
    g = torch.Generator().manual_seed(9)
    x = _randn(2, 4, 4, 4, g=g)
    s, s_next = torch.tensor([0.7073, 0.278]), torch.tensor([0.6022, 0.0089])
    with torch.no_grad():
        action, _, _, _ = flow.sde_step_with_logprob(x, model(x), s, s_next, 0.7, generator=g)
    action.requires_grad_(True)
    v = model(x)
    v.retain_grad()
    _, logp, mean, std = flow.sde_step_with_logprob(x, v, s, s_next, 0.7, prev_sample=action)
    logp.sum().backward()
    assert action.grad is None
    # ∂ℓ/∂v̂ = κ (x' − μ) / (s² D) with D = 64 (mean reduction)
    kappa = flow.sde_kappa(s, s_next, flow.sde_noise_scale(s, s_next, 0.7)).view(-1, 1, 1, 1)
    expected = kappa * (action.detach() - mean.detach()) / (std.view(-1, 1, 1, 1) ** 2 * 64)
    torch.testing.assert_close(v.grad, expected, atol=1e-6, rtol=1e-4)
    torch.testing.assert_close(
        model.weight.grad[:, :, 0, 0], torch.einsum("bohw,bihw->oi", v.grad, x), atol=1e-5, rtol=1e-4
    )
    assert model.weight.grad.abs().sum() > 0 and model.bias.grad.abs().sum() > 0

    # the pair log-ratio: its gradient pulls μ_θ toward x_a; one small ascent step on θ increases it
    with torch.no_grad():
        v_ref = model(x)
        x_a, _, mean_ref, std = flow.sde_step_with_logprob(x, v_ref, s, s_next, 0.7, generator=g)
        x_b, _, _, _ = flow.sde_step_with_logprob(x, v_ref, s, s_next, 0.7, generator=g)
    model.zero_grad()

    def pair():
        mean_theta, _ = flow.sde_step_mean(x, model(x), s, s_next, flow.sde_noise_scale(s, s_next, 0.7))
        return flow.pair_log_ratio_from_means(x_a, x_b, mean_theta, mean_ref, std).sum()

    before = pair()
    assert before.abs().item() < 1e-4  # θ = ref
    before.backward()
    with torch.no_grad():
        for p in model.parameters():
            p += 1e-3 * p.grad
    assert pair().item() > 1e-6


# --------------------------------------------------------------------------------------------------------------
# Flow-CPS's coefficients-preserving step (kind="cps")
# --------------------------------------------------------------------------------------------------------------


def test_cps_std_and_kappa_hand_values():
    assert flow.cps_std(torch.tensor(0.5), 1.0).item() == pytest.approx(0.5)
    assert flow.cps_std(torch.tensor(0.5), 0.7).item() == pytest.approx(0.5 * math.sin(0.35 * math.pi))
    assert flow.cps_std(torch.tensor(0.0), 0.7).item() == 0.0  # the last step: no noise
    # κ = (1 − σ) sqrt(σ'² − s²) − σ (1 − σ'): σ = 0.8, σ' = 0.5, s = 0.3 → 0.2·0.4 − 0.8·0.5 = −0.32
    assert flow.cps_kappa(torch.tensor(0.8), torch.tensor(0.5), torch.tensor(0.3)).item() == pytest.approx(-0.32)
    assert flow.cps_kappa(torch.tensor(0.8), torch.tensor(0.5), torch.tensor(0.0)).item() == pytest.approx(-0.3)


@pytest.mark.parametrize("shift", SHIFTS)
def test_cps_at_noise_level_zero_is_the_diffusers_euler_step(shift):
    scheduler, mu = _scheduler(shift)
    grid = flow.FlowGrid.from_scheduler(scheduler, 6, noise_level=0.0, mu=mu, kind="cps")
    scheduler.set_timesteps(6, mu=mu)
    g = torch.Generator().manual_seed(2)
    x = _randn(2, 4, 8, 8, g=g)
    for i, t in enumerate(scheduler.timesteps):
        v = _randn(2, 4, 8, 8, g=g)
        expected = scheduler.step(v, t, x).prev_sample
        out, logp, mean, std = flow.sde_step_with_logprob(
            x, v, grid.sigmas[i].expand(2), grid.sigmas[i + 1].expand(2), 0.0, generator=g, kind="cps"
        )
        torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
        assert torch.all(std == 0) and torch.all(torch.isnan(logp))
        x = expected


def test_cps_keeps_the_forward_marginal_coefficients_exactly():
    """With exact predictions (x_σ = (1 − σ) x_0 + σ ε, v = ε − x_0) the CPS step lands on
    (1 − σ') x_0 + sqrt(σ'² − s²) ε + s z: data coefficient 1 − σ', noise variance σ'², for every draw."""
    g = torch.Generator().manual_seed(5)
    x0, eps, z = (_randn(3, 4, 4, 4, g=g) for _ in range(3))
    sigma, sigma_next = torch.tensor([1.0, 0.7, 0.3]), torch.tensor([0.8, 0.3, 0.0])
    x = (1 - sigma.view(-1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1) * eps
    out, logp, mean, std = flow.sde_step_with_logprob(x, eps - x0, sigma, sigma_next, 0.7, noise=z, kind="cps")
    s = torch.sin(torch.tensor(0.35 * math.pi)) * sigma_next
    torch.testing.assert_close(std, s)
    keep = (sigma_next**2 - s**2).sqrt().view(-1, 1, 1, 1)
    expected = (1 - sigma_next.view(-1, 1, 1, 1)) * x0 + keep * eps + s.view(-1, 1, 1, 1) * z
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(keep.flatten() ** 2 + s**2, sigma_next**2)
    assert torch.isfinite(logp[:2]).all() and torch.isnan(logp[2])  # σ' = 0: no noise, no density


def test_cps_logprob_is_the_gaussian_density_and_kappa_its_mean_slope():
    g = torch.Generator().manual_seed(6)
    x, v, w = (_randn(2, 4, 4, 4, g=g) for _ in range(3))
    sigma, sigma_next = torch.tensor([0.9, 0.5]), torch.tensor([0.6, 0.2])
    out, logp, mean, std = flow.sde_step_with_logprob(x, v, sigma, sigma_next, 0.8, generator=g, kind="cps")
    normal = Normal(mean, std.view(-1, 1, 1, 1))
    torch.testing.assert_close(logp, normal.log_prob(out).mean(dim=(1, 2, 3)))
    _, replay, _, _ = flow.sde_step_with_logprob(x, v, sigma, sigma_next, 0.8, prev_sample=out, kind="cps")
    torch.testing.assert_close(replay, logp, atol=1e-5, rtol=0)
    other, _ = flow.step_mean_and_std(x, w, sigma, sigma_next, 0.8, "cps")
    kappa = flow.cps_kappa(sigma, sigma_next, std).view(-1, 1, 1, 1)
    torch.testing.assert_close(mean - other, kappa * (v - w), atol=1e-5, rtol=0)  # μ_θ − μ_ref = κ (v̂_θ − v̂_ref)


def test_cps_grid_columns():
    grid = flow.FlowGrid.from_scheduler(FlowMatchEulerDiscreteScheduler(shift=3.0), 5, 0.7, kind="cps")
    sigma, sigma_next = grid.sigmas[:-1], grid.sigmas[1:]
    assert grid.kind == "cps"
    torch.testing.assert_close(grid.std_dev, sigma_next * math.sin(0.35 * math.pi))
    torch.testing.assert_close(grid.noise_scale * (sigma - sigma_next).sqrt(), grid.std_dev)
    torch.testing.assert_close(grid.kappa, flow.cps_kappa(sigma, sigma_next, grid.std_dev))
    assert grid.std_dev[-1] == 0
    with pytest.raises(ValueError, match="kind must be one of"):
        flow.FlowGrid.from_scheduler(FlowMatchEulerDiscreteScheduler(), 5, 0.7, kind="ddim")

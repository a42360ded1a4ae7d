"""Loss functions of every method on hand-built tensors: values, signs, gradients, closed forms."""

import math

import pytest
import torch
import torch.nn.functional as F

from rlhf_diffusion.algorithms.common import dpo_step_loss, preference_labels
from rlhf_diffusion.algorithms.d3po import select_steps
from rlhf_diffusion.algorithms.dde import dde_logits, ema_update, suffix_sums
from rlhf_diffusion.diffusion import ddim


def test_dpo_step_loss_hand_value_inside_band():
    # Δ_w = 0.05, Δ_l = −0.02, β = 0.1, inside [log 0.9, log 1.1] → L = −log σ(0.1 · 0.07)
    loss, metrics = dpo_step_loss(torch.tensor([0.05]), torch.tensor([-0.02]), beta=0.1, clip_epsilon=0.1)
    assert loss.item() == pytest.approx(-math.log(1 / (1 + math.exp(-0.007))), rel=1e-6)
    assert metrics["implicit_accuracy"] == 1.0
    assert metrics["clamp_fraction"] == 0.0


def test_dpo_step_loss_clamps_and_kills_gradient_outside_band():
    delta_w = torch.tensor([0.5, 0.01], requires_grad=True)  # 0.5 > log 1.1 = 0.0953 → clamped
    delta_l = torch.tensor([0.0, 0.0], requires_grad=True)
    loss, metrics = dpo_step_loss(delta_w, delta_l, beta=1.0, clip_epsilon=0.1)
    expected = -(F.logsigmoid(torch.tensor(math.log(1.1))) + F.logsigmoid(torch.tensor(0.01))) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert delta_w.grad[0].item() == 0.0  # clamped: zero gradient (D3PO §1c)
    assert delta_w.grad[1].item() < 0  # descent raises the winner's log-ratio
    assert delta_l.grad[1].item() > 0  # and lowers the loser's
    assert metrics["clamp_fraction"] == pytest.approx(0.25)


def test_ties_give_log2():
    loss, _ = dpo_step_loss(torch.zeros(3), torch.zeros(3), beta=0.1, clip_epsilon=0.1)
    assert loss.item() == pytest.approx(math.log(2))


def test_tailorpo_gradient_identity():
    """TailorPO Eq. 11: ∇_μθ L = −β f (x_w − x_l)/(σ² D), f = 1 − σ(logit) — exactly, for the same state."""
    g = torch.Generator().manual_seed(0)
    shape = (1, 4, 3, 3)
    d = 4 * 3 * 3
    mu_ref = torch.randn(shape, generator=g)
    mu_theta = (mu_ref + 0.01 * torch.randn(shape, generator=g)).requires_grad_(True)
    std = torch.tensor([0.5])
    x_w = mu_ref + std * torch.randn(shape, generator=g)
    x_l = mu_ref + std * torch.randn(shape, generator=g)
    beta = 0.1
    delta_w = ddim.log_ratio_same_std(x_w, mu_theta, mu_ref, std)
    delta_l = ddim.log_ratio_same_std(x_l, mu_theta, mu_ref, std)
    assert (delta_w.abs() < math.log(1.1)).all() and (delta_l.abs() < math.log(1.1)).all()  # clamp inactive
    loss, _ = dpo_step_loss(delta_w, delta_l, beta=beta, clip_epsilon=0.1)
    (grad,) = torch.autograd.grad(loss, mu_theta)
    logit = beta * (delta_w - delta_l)
    f = 1 - torch.sigmoid(logit)
    expected = -beta * f * (x_w - x_l) / (std**2 * d)
    torch.testing.assert_close(grad, expected.view(shape), atol=1e-7, rtol=1e-5)
    # cosine(−∇L, x_w − x_l) = 1: a descent step moves the mean toward the winner, away from the loser.
    cos = F.cosine_similarity(-grad.flatten(), (x_w - x_l).flatten(), dim=0)
    assert cos.item() == pytest.approx(1.0, abs=1e-6)
    # and, through μ = A x + κ ε̂, the ε̂-gradient is κ times it (κ < 0 flips its sign).
    kappa = -0.3
    eps_theta = torch.zeros(shape, requires_grad=True)
    mu = mu_theta.detach() + kappa * eps_theta
    lw = ddim.log_ratio_same_std(x_w, mu, mu_ref, std)
    ll = ddim.log_ratio_same_std(x_l, mu, mu_ref, std)
    (g_eps,) = torch.autograd.grad(dpo_step_loss(lw, ll, beta, 0.1)[0], eps_theta)
    torch.testing.assert_close(g_eps, kappa * grad, atol=1e-7, rtol=1e-5)


def test_preference_labels_weighted_sum_and_pareto():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])  # (P, 2)
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [0.0, 5.0]])
    ws = preference_labels({"a": a}, {"a": 1.0}, "weighted_sum")
    assert ws.tolist() == [0, 1, -1, 0]
    assert preference_labels({"a": a}, {"a": -1.0}, "weighted_sum").tolist() == [1, 0, -1, 1]
    # Pareto over two rewards: pair 0: a 1>0, b 1>0 → 0 wins; pair 1: both prefer 1; pair 2: a tie, b prefers 1 →
    # 1 wins; pair 3: a prefers 0, b prefers 1 → non-dominated → tie.
    pareto = preference_labels({"a": a, "b": b}, {"a": 1.0, "b": 1.0}, "pareto")
    assert pareto.tolist() == [0, 1, 1, -1]
    # a negative weight means lower is better for that reward
    assert preference_labels({"a": a, "b": b}, {"a": 1.0, "b": -1.0}, "pareto").tolist() == [-1, -1, 0, 0]
    with pytest.raises(ValueError, match="unknown preference rule"):
        preference_labels({"a": a}, {"a": 1.0}, "borda")


def test_select_steps():
    g = torch.Generator().manual_seed(0)
    assert select_steps(3, 5, 1.0, g).tolist() == [[0, 1, 2, 3, 4]] * 3
    part = select_steps(4, 10, 0.3, g)
    assert part.shape == (4, 3)
    assert all(len(set(row)) == 3 and max(row) < 10 for row in part.tolist())


def test_suffix_sums_and_ema_update():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0])
    assert suffix_sums(values).tolist() == [9.0, 7.0, 4.0, 0.0]  # C_t = Σ_{k>t} A[k]
    table = torch.tensor([0.0, 10.0, 0.0, 0.0])
    updated = ema_update(table, torch.tensor([1, 1, 3]), torch.tensor([2.0, 4.0, 5.0]), momentum=0.9)
    # t=1: 0.9·10 + 0.1·mean(2,4) = 9.3; t=3: 0.1·5 = 0.5; others unchanged
    torch.testing.assert_close(updated, torch.tensor([0.0, 9.3, 0.0, 0.5]))
    assert table[1].item() == 10.0  # returns a new table


def test_dde_logit_signs_and_correction_sign():
    """Once θ prefers winners (Δ < 0): the single-shot logit and the correction C_t are both ≥ 0 (§3f)."""
    delta = torch.tensor([-1e-3, -1e-3])
    alpha = torch.tensor([0.9, 0.1])  # small t, large t
    kl = torch.full((4,), 0.005)
    table = ema_update(torch.zeros(4), torch.arange(4), -kl * delta[0], momentum=0.0)  # A[k] = −λ Δ > 0
    correction = suffix_sums(table)
    assert (correction[:-1] > 0).all()
    logits = dde_logits(delta, ddim.x0_error_coefficient(alpha), torch.zeros(2), beta_s=100.0, beta_c=100.0)
    assert (logits > 0).all()
    # the single-shot coefficient (1−ᾱ)/ᾱ grows with t: the large-t pair gets the larger logit (DDE §3b)
    assert logits[1] > logits[0]
    # hand value: −β_s · ((1−0.9)/0.9) · (−1e-3) = 100 · 0.1111 · 1e-3
    assert logits[0].item() == pytest.approx(100 * (0.1 / 0.9) * 1e-3, rel=1e-5)
    with_corr = dde_logits(
        delta, ddim.x0_error_coefficient(alpha), torch.tensor([0.02, 0.0]), beta_s=100.0, beta_c=100.0
    )
    assert with_corr[0].item() == pytest.approx(logits[0].item() + 2.0, rel=1e-5)


def test_diffusion_dpo_inside_term_matches_official_form():
    """inside = −0.5 β [(e^w_θ − e^l_θ) − (e^w_ref − e^l_ref)] equals −0.5 β Δ_t with our Δ grouping."""
    e = {"wt": 0.30, "wr": 0.35, "lt": 0.50, "lr": 0.45}
    beta = 5000.0
    official = -0.5 * beta * ((e["wt"] - e["lt"]) - (e["wr"] - e["lr"]))
    delta = (e["wt"] - e["wr"]) - (e["lt"] - e["lr"])
    assert -0.5 * beta * delta == pytest.approx(official)


def test_dde_correction_share_is_the_corrections_part_of_the_logit():
    from rlhf_diffusion.algorithms.dde import correction_share, dde_logits

    delta = torch.tensor([1e-4, -2e-4])
    alpha = torch.tensor([0.5, 0.25])  # (1 − ᾱ)/ᾱ = 1 and 3
    correction = torch.tensor([1e-4, -1e-4])
    logits = dde_logits(delta, ddim.x0_error_coefficient(alpha), correction, beta_s=1000.0, beta_c=500.0)
    # |β_s S_t| = 0.1, 0.6 (mean 0.35); |β_c C_t| = 0.05, 0.05 (mean 0.05)
    assert correction_share(logits, correction, 500.0) == pytest.approx(0.05 / 0.40, rel=1e-5)
    assert correction_share(logits, torch.zeros(2), 500.0) == 0.0

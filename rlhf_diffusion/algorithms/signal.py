"""Learning-signal diagnostics: is there anything coherent in the gradient a method trains on?

A preference loss can run for hours on a gradient that is pure noise (labels that disagree with the reward's real
preference, pairs whose two samples differ in nothing the reward sees) or on a gradient that one near-deterministic
denoising step dominates. Both look alike in the loss curve (ln 2 throughout). These diagnostics tell them apart
from the gradient itself, at the start of each training round (`train.signal_every`), on a random subset of the
round's examples (`train.signal_examples`), without touching the weights, the optimizer or the training draws:

- **coherence** (`signal/coherence`): the round's prompts are split at random into two halves A and B, every
  example going with its prompt, and the loss gradient of each half is taken w.r.t. the trainable parameters;
  coherence = cos(g_A, g_B). The prompt is the unit because a prompt's examples are not independent: its GRPO group
  shares a zero-sum advantage (split across halves, its common score direction enters A and B with opposite signs:
  a negative bias, built by hand in tests/algorithms/test_signal.py), and a trajectory's steps share their states
  (a positive one). If each prompt's gradient is g_i = μ + ξ_i (a shared direction μ plus noise of mean square
  s²), then for halves of n/2 prompts E[g_A·g_B] = (n/2)²|μ|² and |g_A|² ≈ (n/2)²|μ|² + (n/2)s², so
  cos ≈ (n/2)ρ / ((n/2)ρ + 1) with ρ = |μ|²/s², the per-prompt signal-to-noise ratio. Noise only: cos ≈ 0 (either
  sign). A method that learns shows clearly positive coherence. (Until 2026-12-01 the split was by example; for
  the final-pair methods, one pair per prompt, that is the same split.)
- **per-prompt SNR²** (`signal/snr2`): ρ̂ = cos / ((n/2)(1 − cos)), n the prompts (`signal/units`), the inverse of
  that relation; comparable across batch sizes (the coherence itself grows with n). Negative values mean "no signal
  detected".
- **per-group share and coherence** (`signal/share_<group>`, `signal/coherence_<group>`): the same for the examples
  of one group — a DDIM step index `step_<k>` for D3PO / TailorPO(-G), a timestep bucket `t_<lo>` for DDE /
  Diffusion-DPO. share_k = |g_{k,A} + g_{k,B}|² / Σ_j |g_{j,A} + g_{j,B}|²: how much of the squared gradient norm
  group k contributes (with noisy gradients ≈ its share of Σ_i |g_i|²). A step with share 0.9 and coherence ≈ 0
  is a step that moves the model without teaching it anything.

The clamp fraction per step (D3PO / TailorPO: examples whose ratio sits at the clamp and so give no gradient) comes
from the loss itself (`LossOutput.grouped`, `signal/clamp_step_<k>`).

(Ours: none of the papers reports these; ddpo-pytorch logs the clip fraction, verl the gradient norm.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from rlhf_diffusion.models.conditioning import TextConditioning

__all__ = ["cosine", "measure_signal", "signal_metrics", "split_half_gradients", "split_halves"]


def cosine(a: Tensor, b: Tensor) -> float:
    """cos(a, b) of two flat vectors; 0 when either is zero."""
    na, nb = a.norm(), b.norm()
    if na == 0 or nb == 0:
        return 0.0
    return float(torch.dot(a, b) / (na * nb))


def split_halves(groups: Tensor, generator: torch.Generator, units: Tensor | None = None) -> Tensor:
    """A random half assignment (0 = A, 1 = B) per example. Without `units`: balanced within each group, the
    examples of a group shuffled and alternating A, B, A, ... (an odd group gives A one more). With `units` (one id
    per example, e.g. its prompt): the distinct units are shuffled and alternate A, B, A, ..., and every example goes
    with its unit, so no unit is split."""
    half = torch.zeros(len(groups), dtype=torch.long)
    if units is not None:
        distinct = units.unique()
        distinct = distinct[torch.randperm(len(distinct), generator=generator)]
        for unit in distinct[1::2].tolist():
            half[units == unit] = 1
        return half
    for group in groups.unique().tolist():
        rows = (groups == group).nonzero().squeeze(1)
        rows = rows[torch.randperm(len(rows), generator=generator)]
        half[rows[1::2]] = 1
    return half


def signal_metrics(grads: dict[str, tuple[Tensor, Tensor]], num_examples: int) -> dict[str, float]:
    """The coherence, SNR² and per-group share and coherence of split-half gradients.

    Args:
        grads: group name → (g_A, g_B), the flat gradients of the group's examples in half A and half B (a zero
            vector where a half has no example of the group).
        num_examples: n, the examples behind all the gradients (for the SNR² estimate).

    Returns:
        `signal/coherence`, `signal/snr2`, and per group `signal/share_<group>`, `signal/coherence_<group>`
        (the latter only for groups with examples in both halves).
    """
    if not grads:
        return {}
    total_a = torch.stack([a for a, _ in grads.values()]).sum(0)
    total_b = torch.stack([b for _, b in grads.values()]).sum(0)
    coherence = cosine(total_a, total_b)
    half = num_examples / 2
    out = {
        "signal/coherence": coherence,
        "signal/snr2": coherence / (half * (1 - coherence)) if coherence < 1 else math.inf,
    }
    squares = {name: float((a + b).pow(2).sum()) for name, (a, b) in grads.items()}
    total = sum(squares.values())
    for name, (a, b) in grads.items():
        out[f"signal/share_{name}"] = squares[name] / total if total > 0 else 0.0
        if a.any() and b.any():
            out[f"signal/coherence_{name}"] = cosine(a, b)
    return out


def measure_signal(
    algorithm,
    predictor,
    cond_all: TextConditioning,
    examples,
    parameters: Sequence[Tensor],
    generator_seed: int,
    max_examples: int,
) -> dict[str, float]:
    """Split-half gradient diagnostics (`signal_metrics`, per prompt) of `algorithm`'s loss on (up to `max_examples`
    of) `examples`, plus `signal/examples` and `signal/units` (the prompts they come from); {} for fewer than two
    examples. Arguments as `split_half_gradients`."""
    grads, n, units = split_half_gradients(
        algorithm, predictor, cond_all, examples, parameters, generator_seed, max_examples
    )
    if not grads:
        return {}
    return {**signal_metrics(grads, units), "signal/examples": float(n), "signal/units": float(units)}


def split_half_gradients(
    algorithm,
    predictor,
    cond_all: TextConditioning,
    examples,
    parameters: Sequence[Tensor],
    generator_seed: int,
    max_examples: int,
) -> tuple[dict[str, tuple[Tensor, Tensor]], int, int]:
    """The flat loss gradients of each (group, half) of (up to `max_examples` of) `examples`, the halves split by
    prompt (`split_halves` with the examples' `prompt_index` as units).

    The subset is treated as one minibatch: every random draw of the loss (DDE's t and ε) is made for the whole
    subset from a generator seeded by `generator_seed` (`Algorithm.loss_on_rows`), so each (group, half) chunk sees
    the draws the whole subset would, and the chunk gradients add up to the subset's gradient. Gradients are taken
    with `torch.autograd.grad` (never accumulated into `.grad`), so the optimizer and the next training step are
    untouched; the training generator is not used.

    Args:
        algorithm: the method (its `loss_on_rows` and `signal_groups`).
        predictor: the policy's noise prediction, calling the bare module (not a DDP wrapper).
        cond_all: one conditioning per prompt of the round (indexed by the examples' `prompt_index`).
        examples: the round's `StepPairBatch` or `FinalPairBatch`.
        parameters: the trainable parameters.
        generator_seed: seeds the subset choice, the halves and the loss's draws.
        max_examples: the subset size.

    Returns:
        (group name → (g_A, g_B), n, u): the gradients of each group's half-A and half-B examples' part of the
        subset's mean loss (they sum to the subset's loss gradient), n, the subset size, and u, its prompts.
    """
    if len(examples) < 2:
        return {}, 0, 0
    gen = torch.Generator().manual_seed(generator_seed)
    pick = torch.randperm(len(examples), generator=gen)[:max_examples].sort().values
    subset = examples.select(pick)
    cond = cond_all.index(subset.prompt_index)
    groups, names = algorithm.signal_groups(subset, torch.Generator().manual_seed(generator_seed))
    half = split_halves(groups, gen, units=subset.prompt_index)
    params = [p for p in parameters if p.requires_grad]
    n = len(subset)
    grads: dict[str, tuple[Tensor, Tensor]] = {}
    for group in groups.unique().tolist():
        pair = []
        for h in (0, 1):
            rows = ((groups == group) & (half == h)).nonzero().squeeze(1)
            if len(rows) == 0:
                pair.append(None)
                continue
            out = algorithm.loss_on_rows(predictor, cond, subset, torch.Generator().manual_seed(generator_seed), rows)
            loss = out.loss * (len(rows) / n)  # the chunk's part of the subset's mean loss
            chunk = torch.autograd.grad(loss, params, allow_unused=True)
            pair.append(
                torch.cat(
                    [
                        (g if g is not None else torch.zeros_like(p)).detach().flatten().float()
                        for g, p in zip(chunk, params)
                    ]
                )
            )
        like = next(v for v in pair if v is not None)
        grads[names[group]] = tuple(v if v is not None else torch.zeros_like(like) for v in pair)
    return grads, n, len(subset.prompt_index.unique())

"""Primitives shared by several methods (docs/algorithms.md §5): the clamped DPO step loss (D3PO / TailorPO / SPO),
step log-ratios under the DDIM policy, the Diffusion-DPO ε-MSE difference (Uniform baseline, DDE), preference
labels (weighted sum or Pareto), the final-image pair sampler used by the online DDE / Diffusion-DPO, and
`FinalPairAlgorithm`, the part those two methods share (rollout, per-pair t and ε draws, data-parallel shares).
Section numbers (§) in this file refer to docs/algorithms.md."""

from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_diffusion.algorithms.base import Algorithm, LossOutput, RolloutContext
from rlhf_diffusion.batches import FinalPairBatch, RolloutBatch
from rlhf_diffusion.diffusion import ddim
from rlhf_diffusion.diffusion.sampling import (
    DDIMGrid,
    NoisePredictor,
    Trajectory,
    decode_latents,
    initial_noise,
    sample_trajectory,
)
from rlhf_diffusion.models.conditioning import TextConditioning

__all__ = [
    "KL_TIMESTEP_BUCKET",
    "FinalPairAlgorithm",
    "RankedPairs",
    "diffusion_dpo_mse_delta",
    "diffusion_dpo_mse_terms",
    "dpo_step_loss",
    "preference_labels",
    "sample_final_pairs",
    "sample_ranked_pairs",
    "sample_timesteps",
    "step_clamp_diagnostics",
    "step_kl_diagnostics",
    "step_log_ratios",
    "step_log_ratios_and_kl",
    "step_weights",
    "timestep_kl_diagnostics",
    "timestep_saturation_diagnostics",
    "trainable_step_count",
]

# Width of the timestep buckets (on the 1000-step training grid) of the final-image methods' KL diagnostics.
KL_TIMESTEP_BUCKET = 100


def step_weights(grid: DDIMGrid, mode: str) -> Tensor:
    """The factor each DDIM step's log-ratio is multiplied by before the clamp (`algorithm.step_weight`): (K,).

    'uniform' = 1 (the papers). 'eps_scale' (ours) = σ_τ/|κ_τ|: Δ changes by |κ_τ|/σ_τ per unit of ε̂ along the
    sampled noise (μ_θ − μ_ref = κ_τ (ε̂_θ − ε̂_ref), Δ ∝ (x − μ)·(μ_θ − μ_ref)/σ²), so the weighted Δ measures
    every step in units of ε̂.
    """
    if mode == "uniform":
        return torch.ones(grid.num_steps)
    if mode == "eps_scale":
        kappa = ddim.ddim_kappa(grid.alpha_prod, grid.alpha_prod_prev, grid.std_dev)
        return grid.std_dev.to(torch.float32) / kappa.abs().clamp(min=1e-12)
    raise ValueError(f"unknown step_weight {mode!r}; expected 'uniform' or 'eps_scale'")


def trainable_step_count(num_steps: int, skip_final_steps: int) -> int:
    """The steps whose pairs are trained: the first K − `skip_final_steps` (`algorithm.skip_final_steps`)."""
    return max(1, num_steps - skip_final_steps)


def dpo_step_loss(
    delta_w: Tensor, delta_l: Tensor, beta: float, clip_epsilon: float, weight: Tensor | None = None
) -> tuple[Tensor, dict[str, float]]:
    """Clamped DPO loss on one denoising step (D3PO §1b; TailorPO Eq. 10 with D3PO's ratio constraint, §5.6).

    log ρ = clamp(w Δ, log(1 − ε), log(1 + ε));  L = −log σ(β (log ρ_w − log ρ_l)), averaged over the batch.

    Args:
        delta_w, delta_l: (M,) log π_θ/π_ref of the winner's and the loser's action.
        beta: DPO temperature β.
        clip_epsilon: ε of the ratio clamp [1 − ε, 1 + ε].
        weight: (M,) per-example step weight w (`step_weights`), or None = 1 (the papers).

    Returns:
        (scalar loss, metrics): implicit accuracy (Δ_w > Δ_l), fraction of clamped ratios, mean |Δ|.
    """
    lo, hi = math.log(1 - clip_epsilon), math.log(1 + clip_epsilon)
    if weight is not None:
        weight = weight.to(delta_w)
        delta_w, delta_l = weight * delta_w, weight * delta_l
    log_ratio_w = delta_w.clamp(lo, hi)
    log_ratio_l = delta_l.clamp(lo, hi)
    logits = beta * (log_ratio_w - log_ratio_l)
    loss = -F.logsigmoid(logits).mean()
    with torch.no_grad():
        both = torch.cat([delta_w, delta_l])
        metrics = {
            "implicit_accuracy": (delta_w > delta_l).float().mean().item(),
            "clamp_fraction": ((both <= lo) | (both >= hi)).float().mean().item(),
            "mean_abs_log_ratio": both.abs().mean().item(),
        }
    return loss, metrics


def step_log_ratios(
    predictor: NoisePredictor,
    grid: DDIMGrid,
    cond: TextConditioning,
    step_index: Tensor,
    states: Tensor,
    *actions: Tensor,
) -> tuple[Tensor, ...]:
    """Δ = log π_θ(action | state) − log π_ref(action | state) under the DDIM policy, per example.

    Both policies share σ_τ, so Δ is the closed form of §5.5 (per-element mean, as the official codes). One
    evaluation of θ and of ref at `states` serves every action given (TailorPO's winner and loser share x_τ).

    Args:
        predictor: CFG noise prediction (θ with gradient; reference without).
        grid: the DDIM grid of the rollout.
        cond: M conditionings.
        step_index: (M,) grid indices.
        states: (M, C, h, w) x_τ.
        *actions: one or more (M, C, h, w) x_prev taken from `states`.

    Returns:
        One (M,) Δ per action, differentiable w.r.t. the LoRA parameters.
    """
    return step_log_ratios_and_kl(predictor, grid, cond, step_index, states, *actions)[1]


def step_log_ratios_and_kl(
    predictor: NoisePredictor,
    grid: DDIMGrid,
    cond: TextConditioning,
    step_index: Tensor,
    states: Tensor,
    *actions: Tensor,
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """`step_log_ratios` plus the exact per-step KL(π_θ(·|x_τ) ‖ π_ref(·|x_τ)) at each state, from the same two
    UNet evaluations (`ddim.kl_same_std`, per-element mean: the unit of Δ).

    Returns:
        (kl (M,) detached, one (M,) Δ per action differentiable w.r.t. the LoRA parameters).
    """
    device = predictor.model.device
    t, a, a_prev, std = (v.to(device) for v in grid.scalars(step_index))
    states = states.to(device)
    eps_theta = predictor(states, t, cond)
    eps_ref = predictor(states, t, cond, reference=True)
    mean_theta, _ = ddim.ddim_step_mean(states, eps_theta, a, a_prev, std)
    mean_ref, _ = ddim.ddim_step_mean(states, eps_ref, a, a_prev, std)
    kl = ddim.kl_same_std(mean_theta.detach(), mean_ref.detach(), std)
    return kl, tuple(ddim.log_ratio_same_std(x.to(device), mean_theta, mean_ref, std) for x in actions)


def step_kl_diagnostics(
    state_steps: Tensor, kl: Tensor, action_steps: Tensor, log_ratios: Tensor
) -> dict[str, tuple[Tensor, Tensor]]:
    """The step-wise methods' `LossOutput.grouped` KL diagnostics, grouped by DDIM step index k:

    - `kl/step_<k>`: the closed-form KL(π_θ ‖ π_ref) of step k at the trained states (per latent element);
    - `kl/log_ratio_step_<k>`: the mean log π_θ/π_ref of the stored actions — a Monte-Carlo estimate of the same
      KL only when the actions are samples of the current policy (on-policy D3PO, TailorPO with two candidates);
      selection (more candidates) and TailorPO-G's guidance bias it.

    Args:
        state_steps, kl: (S,) step index and KL of each state.
        action_steps, log_ratios: (A,) step index and Δ of each action.
    """
    return {
        "kl/step": (state_steps.detach().cpu(), kl.detach().float().cpu()),
        "kl/log_ratio_step": (action_steps.detach().cpu(), log_ratios.detach().float().cpu()),
    }


def step_clamp_diagnostics(
    steps: Tensor, delta_w: Tensor, delta_l: Tensor, clip_epsilon: float
) -> dict[str, tuple[Tensor, Tensor]]:
    """`signal/clamp_step_<k>`: the fraction of the step-k log-ratios (winner's and loser's) outside the clamp
    [log(1 − ε), log(1 + ε)], which therefore give no gradient (`LossOutput.grouped`).

    Args:
        steps: (M,) step index of each pair; delta_w, delta_l: (M,) Δ of the winner's and the loser's action.
    """
    lo, hi = math.log(1 - clip_epsilon), math.log(1 + clip_epsilon)
    both = torch.cat([delta_w, delta_l]).detach()
    return {"signal/clamp_step": (steps.repeat(2).detach().cpu(), ((both <= lo) | (both >= hi)).float().cpu())}


def preference_labels(per_reward: dict[str, Tensor], weights: dict[str, float], rule: str) -> Tensor:
    """Which of two samples wins, from their rewards (D3PO §1a step 4).

    Args:
        per_reward: name → (P, 2) raw scores of sample 0 and sample 1 of each pair.
        weights: name → weight (its sign says whether higher is better).
        rule: "weighted_sum" (compare Σ w_i r_i) or "pareto" (sample 0 wins iff it is at least as good on every
            reward and strictly better on one; non-dominated pairs are ties).

    Returns:
        (P,) long: 0 if sample 0 wins, 1 if sample 1 wins, −1 for a tie.
    """
    if rule == "weighted_sum":
        total = sum(weights[name] * scores for name, scores in per_reward.items())
        diff = total[:, 0] - total[:, 1]
        return torch.where(diff > 0, 0, torch.where(diff < 0, 1, -1))
    if rule == "pareto":
        signed = torch.stack([math.copysign(1.0, weights[n]) * s for n, s in per_reward.items()])  # (R, P, 2)
        d = signed[..., 0] - signed[..., 1]  # (R, P)
        zero_wins = (d >= 0).all(0) & (d > 0).any(0)
        one_wins = (d <= 0).all(0) & (d < 0).any(0)
        return torch.where(zero_wins, 0, torch.where(one_wins, 1, -1))
    raise ValueError(f"unknown preference rule {rule!r}; expected 'weighted_sum' or 'pareto'")


@dataclass
class RankedPairs:
    """Two sampled trajectories per prompt and which one the reward prefers.

    Attributes:
        trajectory: 2P trajectories; rows [0, P) are sample 0 of each prompt, rows [P, 2P) sample 1.
        labels: (P,) long, 0 or 1 = the winning sample, −1 = tie.
        rewards: (P, 2) weighted total reward of sample 0 and sample 1.
        images: (P, 3, H, W) decoded final images of sample 0 (for grids).
        per_reward: reward name → (P, 2) raw scores of both samples.
    """

    trajectory: Trajectory
    labels: Tensor
    rewards: Tensor
    images: Tensor
    per_reward: dict[str, Tensor] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        return {
            "tie_fraction": (self.labels < 0).float().mean().item(),
            "reward_gap": (self.rewards[:, 0] - self.rewards[:, 1]).abs().mean().item(),
        }


@torch.no_grad()
def sample_ranked_pairs(
    ctx: RolloutContext,
    prompts: list[str],
    cond: TextConditioning,
    *,
    shared_initial_noise: bool,
    rule: str = "weighted_sum",
) -> RankedPairs:
    """Samples two trajectories per prompt in one 2P batch, decodes and scores the finals, and labels the pairs.

    Args:
        shared_initial_noise: both samples start from the same x_T (D3PO §1a.3) or from independent noise.
        rule: "weighted_sum" or "pareto" (see `preference_labels`).
    """
    p = len(prompts)
    h, w = ctx.predictor.height, ctx.predictor.width
    if shared_initial_noise:
        x_T = initial_noise(p, ctx.model, ctx.generator, h, w).repeat(2, 1, 1, 1)
    else:
        x_T = initial_noise(2 * p, ctx.model, ctx.generator, h, w)
    traj = sample_trajectory(ctx.predictor, TextConditioning.cat([cond, cond]), x_T, ctx.grid, ctx.generator)
    images = decode_latents(ctx.model, traj.final).cpu()
    result = ctx.reward_fn(images, prompts + prompts)
    per_reward = {k: v.view(2, p).T for k, v in result.per_reward.items()}  # (P, 2)
    labels = preference_labels(per_reward, ctx.reward_weights, rule)
    return RankedPairs(
        trajectory=traj, labels=labels, rewards=result.total.view(2, p).T, images=images[:p], per_reward=per_reward
    )


@torch.no_grad()
def sample_final_pairs(
    ctx: RolloutContext, prompts: list[str], cond: TextConditioning, samples: int = 2
) -> RolloutBatch:
    """Independent samples per prompt, ranked by the reward: online pairs for DDE / Diffusion-DPO.

    (DDE's paper trains offline on Pick-a-Pic pairs; the online variant samples its pairs from the current
    policy and labels them with the reward model, as an AI annotator does.) Ties are dropped.

    Args:
        samples: S images per prompt (one S·P batch); the pair is the best against the worst by the weighted
            total reward (S = 2: the two samples, the papers' pairs).
    """
    if samples == 2:
        ranked = sample_ranked_pairs(ctx, prompts, cond, shared_initial_noise=False)
        labels, finals, rewards = ranked.labels, ranked.trajectory.final, ranked.rewards
        per_reward, images, metrics = ranked.per_reward, ranked.images, ranked.metrics()
        winner, loser = labels.clamp(min=0), 1 - labels.clamp(min=0)
        keep = labels >= 0
    else:
        p = len(prompts)
        h, w = ctx.predictor.height, ctx.predictor.width
        x_T = initial_noise(samples * p, ctx.model, ctx.generator, h, w)
        traj = sample_trajectory(ctx.predictor, TextConditioning.cat([cond] * samples), x_T, ctx.grid, ctx.generator)
        finals = traj.final
        decoded = decode_latents(ctx.model, finals).cpu()
        result = ctx.reward_fn(decoded, list(prompts) * samples)
        rewards = result.total.view(samples, p).T  # (P, S)
        per_reward = {k: v.view(samples, p).T for k, v in result.per_reward.items()}
        winner, loser = rewards.argmax(1), rewards.argmin(1)
        rows = torch.arange(p)
        gap = rewards[rows, winner] - rewards[rows, loser]
        keep = gap > 0
        images = decoded[:p]
        metrics = {"tie_fraction": (~keep).float().mean().item(), "reward_gap": gap.mean().item()}
    p = len(prompts)
    finals = finals.view(-1, p, *finals.shape[1:])  # (S, P, C, h, w)
    rows = torch.arange(p)
    pairs = FinalPairBatch(
        prompt_index=rows[keep],
        x0_w=finals[winner, rows][keep],
        x0_l=finals[loser, rows][keep],
    )
    return RolloutBatch(
        prompts=list(prompts), pairs=pairs, rewards=rewards, final_images=images, metrics=metrics, per_reward=per_reward
    )


def diffusion_dpo_mse_delta(
    predictor: NoisePredictor,
    grid: DDIMGrid,
    cond: TextConditioning,
    x0_w: Tensor,
    x0_l: Tensor,
    timesteps: Tensor,
    noise: Tensor,
) -> Tensor:
    """Δ_t = (e^w_θ − e^w_ref) − (e^l_θ − e^l_ref), e^i_m = mean_{C,H,W}(ε − ε_m(x^i_t, t, c))² (§5.7).
    (`diffusion_dpo_mse_terms` without the diagnostics.)

    t and ε are shared within a pair (Diffusion-DPO train.py [C]); x^i_t = sqrt(ᾱ_t) x^i_0 + sqrt(1 − ᾱ_t) ε.
    Δ_t < 0 means θ fits the winner better (relative to ref) than the loser.

    Args:
        predictor: noise prediction (conditional only for these methods).
        grid: supplies the training-grid ᾱ table.
        cond: M conditionings.
        x0_w, x0_l: (M, C, h, w) latents.
        timesteps: (M,) long on the 1000-step training grid.
        noise: (M, C, h, w) ε.

    Returns:
        (M,) Δ_t, differentiable w.r.t. the LoRA parameters.
    """
    return diffusion_dpo_mse_terms(predictor, grid, cond, x0_w, x0_l, timesteps, noise)[0]


def diffusion_dpo_mse_terms(
    predictor: NoisePredictor,
    grid: DDIMGrid,
    cond: TextConditioning,
    x0_w: Tensor,
    x0_l: Tensor,
    timesteps: Tensor,
    noise: Tensor,
) -> tuple[Tensor, Tensor]:
    """`diffusion_dpo_mse_delta` plus mean_{C,H,W}(ε_θ − ε_ref)² at each noised latent, from the same UNet calls.

    Returns:
        (Δ_t (M,) differentiable, eps_sq_diff (2M,) detached: winners' rows first, then the losers').
    """
    device = predictor.model.device
    alpha_prod = ddim.gather_alpha(grid.alphas_cumprod, timesteps).to(device)
    noise = noise.to(device)
    x_t = torch.cat(
        [ddim.add_noise(x0_w.to(device), noise, alpha_prod), ddim.add_noise(x0_l.to(device), noise, alpha_prod)]
    )  # (2M, C, h, w)
    t2 = timesteps.to(device).repeat(2)
    cond2 = TextConditioning.cat([cond, cond])
    target = noise.repeat(2, 1, 1, 1)
    eps_theta = predictor(x_t, t2, cond2)
    eps_ref = predictor(x_t, t2, cond2, reference=True)
    err_theta = ((eps_theta - target) ** 2).mean(dim=(1, 2, 3))
    err_ref = ((eps_ref - target) ** 2).mean(dim=(1, 2, 3))
    eps_sq_diff = ((eps_theta.detach() - eps_ref.detach()) ** 2).mean(dim=(1, 2, 3))
    m = x0_w.shape[0]
    return (err_theta[:m] - err_ref[:m]) - (err_theta[m:] - err_ref[m:]), eps_sq_diff


def timestep_kl_diagnostics(
    timesteps: Tensor, eps_sq_diff: Tensor, kl_weights: Tensor
) -> dict[str, tuple[Tensor, Tensor]]:
    """The final-image methods' `LossOutput.grouped` KL diagnostics, grouped by timestep bucket
    lo = KL_TIMESTEP_BUCKET · floor(t / KL_TIMESTEP_BUCKET) (t ∈ [lo, lo + 100)):

    - `kl/eps_sq_diff_t_<lo>`: mean (ε_θ − ε_ref)² per latent element at x_t noised from the pairs' images (not a
      KL: the raw noise-prediction difference, every t alike);
    - `kl/ddpm_step_t_<lo>`: λ_t × that = the KL of the DDPM reverse step at t (`ddim.ddpm_step_kl`, nats per
      element; λ_0 = 0). The samplers run DDIM with η, so it measures the drift of the model, not of the sampler.

    Args:
        timesteps: (R,) long t of each row.
        eps_sq_diff: (R,) per-row mean (ε_θ − ε_ref)².
        kl_weights: (N,) λ_t table (`ddim.ddpm_kl_weights`).
    """
    t = timesteps.detach().cpu().long()
    diff = eps_sq_diff.detach().float().cpu()
    buckets = torch.div(t, KL_TIMESTEP_BUCKET, rounding_mode="floor") * KL_TIMESTEP_BUCKET
    return {"kl/eps_sq_diff_t": (buckets, diff), "kl/ddpm_step_t": (buckets, kl_weights.to(diff)[t] * diff)}


def timestep_saturation_diagnostics(
    timesteps: Tensor, logits: Tensor, threshold: float = 5.0
) -> dict[str, tuple[Tensor, Tensor]]:
    """`signal/saturated_t_<lo>`: per timestep bucket, the fraction of pairs whose logit z exceeds `threshold`, where
    −log σ(z) has gradient 1 − σ(z) < 0.007: pairs already won that no longer train (`LossOutput.grouped`)."""
    t = timesteps.detach().cpu().long()
    buckets = torch.div(t, KL_TIMESTEP_BUCKET, rounding_mode="floor") * KL_TIMESTEP_BUCKET
    return {"signal/saturated_t": (buckets, (logits.detach().float().cpu() > threshold).float())}


def sample_timesteps(count: int, timestep_range: tuple[int, int], generator: torch.Generator) -> Tensor:
    """One t per pair, uniform on [lo, hi] of the 1000-step training grid (§3a, uniform assumed [U])."""
    lo, hi = timestep_range
    return torch.randint(lo, hi + 1, (count,), generator=generator)


class FinalPairAlgorithm(Algorithm):
    """A method trained on final-image pairs (DDE, Diffusion-DPO): online pairs from `sample_final_pairs`
    (`config.samples_per_prompt` images per prompt), and `config.draws_per_pair` draws of (t, ε) per pair — t uniform
    on `config.timestep_range`, ε shared by winner and loser [C] — made for the whole minibatch before a
    data-parallel rank takes its rows; a pair's loss is the mean over its draws. Subclasses implement `pair_loss`."""

    cfg_in_training = False  # ε-MSE on the conditional model, as Diffusion-DPO

    def __init__(self, config, grid: DDIMGrid):
        super().__init__(config, grid)
        self.kl_weights = ddim.ddpm_kl_weights(grid.betas)  # λ_t (N,): DDE's statistic, the KL diagnostics
        self.draws = config.draws_per_pair

    def rollout(self, ctx: RolloutContext, prompts: list[str], cond: TextConditioning) -> RolloutBatch:
        return sample_final_pairs(ctx, prompts, cond, samples=self.config.samples_per_prompt)

    def loss(
        self, predictor: NoisePredictor, cond: TextConditioning, examples: FinalPairBatch, generator: torch.Generator
    ) -> LossOutput:
        return self.loss_on_rows(predictor, cond, examples, generator, torch.arange(len(examples)))

    def loss_on_rows(
        self,
        predictor: NoisePredictor,
        cond: TextConditioning,
        examples: FinalPairBatch,
        generator: torch.Generator,
        rows: Tensor,
    ) -> LossOutput:
        timesteps, noise = self.draw(examples, generator)  # drawn for the whole minibatch, then sliced
        m = len(examples)
        drawn = (rows[None, :] + m * torch.arange(self.draws)[:, None]).flatten()  # draw-major: d·M + row
        repeated = rows.repeat(self.draws)
        return self.pair_loss(
            predictor, cond.index(repeated), examples.select(repeated), timesteps[drawn], noise[drawn]
        )

    def signal_groups(self, examples: FinalPairBatch, generator: torch.Generator) -> tuple[Tensor, dict[int, str]]:
        """The timestep bucket (`t_<lo>`, KL_TIMESTEP_BUCKET wide) of each pair's t, as `loss` would draw it (with
        several draws per pair, of its first draw)."""
        timesteps, _ = self.draw(examples, generator)
        buckets = torch.div(timesteps[: len(examples)], KL_TIMESTEP_BUCKET, rounding_mode="floor")
        buckets = buckets * KL_TIMESTEP_BUCKET
        return buckets, {lo: f"t_{lo:03d}" for lo in buckets.unique().tolist()}

    def draw(self, examples: FinalPairBatch, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """`draws_per_pair` × M values of t (uniform on `timestep_range`) and of ε (each shared by winner and
        loser), draw-major: entry d·M + i is pair i's draw d (one draw: the papers' one t and ε per pair)."""
        count = self.draws * len(examples)
        timesteps = sample_timesteps(count, self.config.timestep_range, generator)
        return timesteps, torch.randn((count, *examples.x0_w.shape[1:]), generator=generator)

    @abc.abstractmethod
    def pair_loss(
        self,
        predictor: NoisePredictor,
        cond: TextConditioning,
        examples: FinalPairBatch,
        timesteps: Tensor,
        noise: Tensor,
    ) -> LossOutput:
        """The loss of `examples` at the given per-pair `timesteps` (M,) and `noise` (M, C, h, w)."""

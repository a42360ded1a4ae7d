"""TailorPO and TailorPO-G (Ren et al., ICLR 2025 submission; arXiv 2502.01667): step-level preference pairs
ranked by the reward of the predicted clean image, both candidates drawn from the same state (docs/algorithms.md
§2; § numbers in this file refer to that page).

Samples (§2a): at every DDIM step τ of a trajectory, n candidates x^(j) = μ_θ(x_τ) + σ_τ z^(j) from the shared
    state; each is scored by r(c, Decode(x̂_0(x^(j)))), x̂_0 taken with the current θ at the candidate's own
    timestep prev(τ) (their Eq. 12, Tweedie + Jensen); the last step scores x_0 itself. Winner = argmax,
    loser = argmin; ties dropped [UNCONFIRMED choice]. TailorPO-G moves the winner along the reward gradient
    (§2b Eq. G, a reconstruction, see `guide_winner`). The trajectory continues from the (guided) winner
    [R for -G; UNCONFIRMED for plain TailorPO → `continuation` in the config, "random" = SPO's choice].
    With `sampling.preview_decoder` the intermediate x̂_0 are decoded by a tiny TAESD decoder (`decode_preview`);
    the last step's x_0 and TailorPO-G's guidance gradient always use the full VAE.
Example: (c, τ, x_τ, x^w, x^l) — `StepPairBatch` with state_w == state_l.
Loss (Eq. 10 with D3PO's ratio constraint, [R]): −log σ(β [log clamp(ρ_w) − log clamp(ρ_l)]), whose gradient
    is ∝ ∇_θ μ_θ(x_τ)ᵀ (x^w − x^l)/σ_τ² (Eq. 11).
Ours (config fields; the paper's settings are the defaults except where noted): `skip_final_steps` leaves the last
    transitions untrained, `step_ranking: completion` scores each candidate by a deterministic DDIM completion in
    `completion_jumps` UNet calls instead of its x̂_0, `step_weight: eps_scale` multiplies each log-ratio by σ_τ/|κ_τ|
    before the clamp (`common.step_weights`), `guidance_decode: straight_through` (default; the paper does not say)
    lets the reward gradient pass the decoder's clamp.
Flow models (SD3 / SD3.5, ours): the same code through the grid's step kernel (`step_kernel.step_kernel_for`): the
    candidates are Flow-GRPO's SDE step μ + s z, the preview x̂_0 = x − σ' v̂ at the candidate's own σ', Δ the
    closed form of two SDE steps with the same s; `step_ranking: completion` is refused there
    (docs/algorithms.md §10(e)).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rlhf_diffusion.algorithms.base import Algorithm, LossOutput, RolloutContext, register_algorithm
from rlhf_diffusion.algorithms.common import (
    dpo_step_loss,
    step_clamp_diagnostics,
    step_kl_diagnostics,
    step_log_ratios_and_kl,
    step_weights,
    trainable_step_count,
)
from rlhf_diffusion.algorithms.d3po import select_steps
from rlhf_diffusion.batches import RolloutBatch, StepPairBatch
from rlhf_diffusion.diffusion import ddim
from rlhf_diffusion.diffusion.sampling import (
    NoisePredictor,
    ddim_completion,
    decode_latents,
    decode_preview,
    draw_candidates,
    initial_noise,
)
from rlhf_diffusion.diffusion.step_kernel import step_kernel_for
from rlhf_diffusion.models.conditioning import TextConditioning


def guide_winner(
    ctx: RolloutContext,
    x_w: Tensor,
    eps_w: Tensor | None,
    t_w: Tensor,
    alpha_prod_w: Tensor,
    std_dev_t: Tensor,
    cond: TextConditioning,
    prompts: list[str],
    *,
    gradient: str,
    norm: str,
    gamma: float,
    raw_scale: float,
    decode: str = "clamped",
    x0_from_pred: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """TailorPO-G: x^w ← x^w + g, g ∝ ∇_x r(c, Decode(x̂_0(x))) at x = x^w (§2b, §5.10).

    UNCONFIRMED reconstruction of the paper's Eq. 13 (not retrievable): p(r_high | x) ∝ exp(η r(c, x̂_0(x))).
    Only x receives a gradient (`torch.autograd.grad`), so no θ-gradient accumulates.

    Args:
        x_w: (B, C, h, w) winners at timestep prev(τ).
        eps_w: (B, C, h, w) ε̂_θ at (x_w, prev(τ)), or None at the last step (x_w is x_0; x̂_0 = x_w).
        t_w: (B,) long, the winners' timestep prev(τ) (used by the full chain).
        alpha_prod_w: (B,) ᾱ_{prev(τ)} (1 at the last step: x̂_0 = x).
        std_dev_t: (B,) σ_τ of the step that produced the candidates.
        gradient: "tweedie_const_eps" — ε̂ held constant, ∂x̂_0/∂x = 1/sqrt(ᾱ) (cheap); "full_chain" — through the
            UNet call inside x̂_0 (one extra UNet backward).
        norm: "sigma_relative" — ||g|| = γ σ_τ sqrt(D) per sample; "raw" — g = raw_scale · ∇_x r.
        gamma, raw_scale: the two scales.
        decode: "clamped" — the gradient passes the decoder's clamp to [0, 1] (zero for out-of-range pixels);
            "straight_through" — the reward scores the clamped image and its gradient flows to the unclamped
            decoder output (ours).
        x0_from_pred: x̂_0 from (x, prediction at x) — a flow model's x − σ v̂ (`step_kernel.FlowKernel.x0_after`);
            None = the DDIM Tweedie estimate with `alpha_prod_w`.

    Returns:
        (guided winners (B, C, h, w), the reward of Decode(x̂_0(x_w)) before guidance (B,)).
    """
    if x0_from_pred is None:

        def x0_from_pred(x: Tensor, eps: Tensor) -> Tensor:
            return ddim.pred_x0_from_eps(x, eps, alpha_prod_w.to(x.device))

    x = x_w.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        if gradient == "full_chain" and eps_w is not None:  # re-run the UNet with x on the tape
            x0 = x0_from_pred(x, ctx.predictor(x, t_w, cond))
        elif eps_w is not None:
            x0 = x0_from_pred(x, eps_w.detach())
        else:
            x0 = x
        images = decode_latents(ctx.model, x0, clamp=decode == "clamped")
        result, image_grad = ctx.reward_grad_fn(images.detach().clamp(0, 1).cpu(), prompts)
        (grad,) = torch.autograd.grad(images, x, grad_outputs=image_grad.to(images))
    grad = grad.detach().to(torch.float32)
    if norm == "sigma_relative":
        d = grad[0].numel()
        scale = gamma * std_dev_t.to(grad.device).view(-1, 1, 1, 1) * d**0.5
        g = scale * grad / grad.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
    else:
        g = raw_scale * grad
    return (x_w + g).detach(), result.total


@register_algorithm("tailorpo")
class TailorPO(Algorithm):
    """TailorPO: same-state candidate pairs ranked by r(c, x̂_0) at every step (§2)."""

    name = "tailorpo"
    cfg_in_training = True  # D3PO's training recipe (CFG in training) [R: they follow D3PO]
    guided = False
    flow_models = True  # on SD3: candidates from Flow-GRPO's SDE step, previews x − σ v̂ (docs/algorithms.md §10(e))
    needs_step_density = True

    @classmethod
    def flow_problem(cls, config) -> str | None:
        """The DDIM completion (`step_ranking: completion`) has no flow counterpart here."""
        if config.algorithm.step_ranking == "completion":
            return "algorithm.step_ranking: 'completion' (a deterministic DDIM completion) is not implemented"
        return None

    def __init__(self, config, grid):
        super().__init__(config, grid)
        self.step_weight = step_weights(grid, config.step_weight)  # (K,), 1 = the paper (`step_weight`)

    @torch.no_grad()
    def rollout(self, ctx: RolloutContext, prompts: list[str], cond: TextConditioning) -> RolloutBatch:
        cfg, grid, gen = self.config, self.grid, ctx.generator
        kernel = step_kernel_for(grid)  # the DDIM step, or a flow model's SDE step (docs/algorithms.md §10(e))
        p, n, k = len(prompts), cfg.num_candidates, grid.num_steps
        device = ctx.model.device
        prompts_n = [q for q in prompts for _ in range(n)]  # candidate order (P, n) flattened
        cond_n = cond.repeat_interleave(n)
        rows = torch.arange(p)
        trained_steps = torch.zeros((p, k), dtype=torch.bool)
        trainable = trainable_step_count(k, cfg.skip_final_steps)  # the last skip_final_steps are not trained
        trained_steps[rows.view(-1, 1), select_steps(p, trainable, cfg.timestep_fraction, gen)] = True

        x = initial_noise(p, ctx.model, gen, ctx.predictor.height, ctx.predictor.width).to(device)
        eps = ctx.predictor(x, grid.timesteps[0].expand(p), cond)
        examples: list[StepPairBatch] = []
        gaps, ties, final_rewards, final_images = [], [], None, None
        for i in range(k):
            idx = torch.full((p,), i, dtype=torch.long)
            std = kernel.std(idx).to(device)
            mean = kernel.mean(x, eps, idx)
            cands = draw_candidates(mean, std, n, gen)  # (P, n, C, h, w), step 2 of §2a
            flat = cands.flatten(0, 1)
            last = i == k - 1
            if last:  # the candidates are x_0: score them directly [D]
                eps_c, x0_hat = None, flat
            else:  # step 3: x̂_0 at the candidate's own timestep prev(τ), current θ
                eps_c = ctx.predictor(flat, grid.timesteps[i + 1].expand(p * n), cond_n)
                if cfg.step_ranking == "completion":  # ours: a deterministic DDIM completion (first jump = eps_c)
                    x0_hat = ddim_completion(ctx.predictor, grid, cond_n, flat, i, eps_c, cfg.completion_jumps)
                else:
                    x0_hat = kernel.x0_after(flat, eps_c, idx.repeat_interleave(n))
            # the final x_0 with the full VAE; intermediate x̂_0 with the preview decoder if one is configured
            images = (decode_latents if last else decode_preview)(ctx.model, x0_hat).cpu()
            result = ctx.reward_fn(images, prompts_n)
            scores = result.total.view(p, n)
            w_idx, l_idx = scores.argmax(dim=1), scores.argmin(dim=1)  # step 4
            gap = scores[rows, w_idx] - scores[rows, l_idx]
            valid = gap > 0  # ties dropped [U]
            x_w, x_l = cands[rows, w_idx], cands[rows, l_idx]
            eps_w = None if last else eps_c.view(p, n, *eps_c.shape[1:])[rows, w_idx]
            if self.guided:  # step 5 (TailorPO-G)
                t_w = grid.timesteps[min(i + 1, k - 1)].expand(p)  # the winner's own level (unused at the last step)
                x_w, _ = guide_winner(
                    ctx,
                    x_w,
                    eps_w,
                    t_w,
                    torch.ones(p, device=device),  # unused: x0_from_pred below
                    std,
                    cond,
                    list(prompts),
                    gradient=cfg.guidance_gradient,
                    norm=cfg.guidance_norm,
                    gamma=cfg.guidance_gamma,
                    raw_scale=cfg.guidance_scale_raw,
                    decode=cfg.guidance_decode,
                    x0_from_pred=lambda x, pred, idx=idx: kernel.x0_after(x, pred, idx),
                )
            keep = valid & trained_steps[:, i]
            if keep.any():
                examples.append(
                    StepPairBatch(
                        prompt_index=rows[keep],
                        step_index=idx[keep],
                        state_w=x[keep].cpu(),
                        action_w=x_w[keep].cpu(),
                        state_l=x[keep].cpu(),
                        action_l=x_l[keep].cpu(),
                    )
                )
            gaps.append(gap.mean().item())
            ties.append(1 - valid.float().mean().item())
            if last:
                final_rewards, final_images = scores, images.view(p, n, *images.shape[1:])[rows, w_idx]
                final_per_reward = {name: v.view(p, n) for name, v in result.per_reward.items()}
                break
            # step 6: continue from the (guided) winner, or from a random candidate (SPO)
            if cfg.continuation == "random":
                c_idx = torch.randint(0, n, (p,), generator=gen)
                x, eps = cands[rows, c_idx], eps_c.view(p, n, *eps_c.shape[1:])[rows, c_idx]
            elif self.guided:  # the state moved: recompute ε̂ at the guided winner
                x = x_w
                eps = ctx.predictor(x, grid.timesteps[i + 1].expand(p), cond)
            else:  # reuse the winner's UNet call as the next step's ε̂ [D]
                x, eps = x_w, eps_w
        pairs = StepPairBatch.concat(examples) if examples else _empty_step_pairs(x)
        metrics = {
            "tie_fraction": sum(ties) / k,
            "reward_gap_first_step": gaps[0],
            "reward_gap_last_step": gaps[-1],
            "reward_gap": sum(gaps) / k,
        }
        return RolloutBatch(
            prompts=list(prompts),
            pairs=pairs,
            rewards=final_rewards,
            final_images=final_images,
            metrics=metrics,
            per_reward=final_per_reward,
        )

    def loss(
        self, predictor: NoisePredictor, cond: TextConditioning, examples: StepPairBatch, generator: torch.Generator
    ) -> LossOutput:
        # shared x_τ: one evaluation of θ and of ref serves both actions
        steps = examples.step_index
        kl, (delta_w, delta_l) = step_log_ratios_and_kl(
            predictor, self.grid, cond, steps, examples.state_w, examples.action_w, examples.action_l
        )
        weight = self.step_weight[steps]
        loss, metrics = dpo_step_loss(delta_w, delta_l, self.config.beta, self.config.clip_epsilon, weight)
        w = weight.to(delta_w)
        grouped = {
            **step_kl_diagnostics(steps, kl, steps.repeat(2), torch.cat([delta_w, delta_l])),
            **step_clamp_diagnostics(steps, w * delta_w.detach(), w * delta_l.detach(), self.config.clip_epsilon),
        }
        return LossOutput(loss=loss, metrics=metrics, grouped=grouped)


@register_algorithm("tailorpo_g")
class TailorPOG(TailorPO):
    """TailorPO-G: TailorPO with the winner moved along the reward gradient before it is stored and continued."""

    name = "tailorpo_g"
    guided = True
    needs_reward_gradient = True

    @torch.no_grad()
    def rollout(self, ctx: RolloutContext, prompts: list[str], cond: TextConditioning) -> RolloutBatch:
        ctx.require_reward_grad(self.name)
        return super().rollout(ctx, prompts, cond)


def _empty_step_pairs(like: Tensor) -> StepPairBatch:
    empty = torch.empty((0, *like.shape[1:]))
    index = torch.empty(0, dtype=torch.long)
    return StepPairBatch(
        prompt_index=index, step_index=index, state_w=empty, action_w=empty, state_l=empty, action_l=empty
    )

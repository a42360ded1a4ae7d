"""D3PO (Yang et al., CVPR 2024, arXiv 2311.13231; code yk7333/D3PO): DPO on every step of two trajectories that
share x_T, each step inheriting the final preference (docs/algorithms.md §1;
§ numbers in this file refer to that page).

Samples: two stochastic DDIM trajectories per prompt from the same x_T with fresh noise at every step (§1a.3).
Example: one denoising step (state, action) of the winner and of the loser at the same step index.
Loss:    L_k = −log σ(β [log clamp(ρ_w,k) − log clamp(ρ_l,k)]), ρ = π_θ/π_ref of the stored action, with the
         CFG-combined prediction for θ and ref (§1b) — `dpo_step_loss` on `step_log_ratios`.
Ours (config fields, off by default): `skip_final_steps` (the last transitions are not trained) and `step_weight:
         eps_scale` (each log-ratio times σ_τ/|κ_τ| before the clamp, `common.step_weights`).
Flow models (SD3 / SD3.5, ours): the same code with Flow-GRPO's SDE step at `sampling.flow_noise_level` a > 0 in
         place of the DDIM step — the pair shares x_T, every step draws fresh noise, Δ is the closed-form log-ratio
         of two SDE steps with the same s (`step_kernel.FlowKernel`; docs/algorithms.md §10(d)).
"""

from __future__ import annotations

import torch

from rlhf_diffusion.algorithms.base import Algorithm, LossOutput, RolloutContext, register_algorithm
from rlhf_diffusion.algorithms.common import (
    dpo_step_loss,
    sample_ranked_pairs,
    step_clamp_diagnostics,
    step_kl_diagnostics,
    step_log_ratios_and_kl,
    step_weights,
    trainable_step_count,
)
from rlhf_diffusion.batches import RolloutBatch, StepPairBatch
from rlhf_diffusion.diffusion.sampling import NoisePredictor
from rlhf_diffusion.models.conditioning import TextConditioning


def select_steps(num_pairs: int, num_steps: int, fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Step indices to train per pair among the first `num_steps` (K less `skip_final_steps`): all of them when
    fraction = 1 (D3PO default), else a random subset per pair.

    Returns:
        (num_pairs, k) long, k = max(1, round(fraction · K)); the same subset is used for winner and loser.
    """
    k = max(1, round(fraction * num_steps))
    scores = torch.rand((num_pairs, num_steps), generator=generator)
    return scores.argsort(dim=1)[:, :k].sort(dim=1).values


@register_algorithm("d3po")
class D3PO(Algorithm):
    """D3PO with the official code's choices: mean log-probs, ratio clamp ε = 0.1, β = 0.1, all K steps."""

    name = "d3po"
    cfg_in_training = True  # train.cfg = True in the official code: same w for θ and ref (§1b)
    flow_models = True  # on SD3: the pair sampled and re-scored with Flow-GRPO's SDE step (§10(d))
    needs_step_density = True

    def __init__(self, config, grid):
        super().__init__(config, grid)
        self.step_weight = step_weights(grid, config.step_weight)  # (K,), 1 = the paper (`step_weight`)

    @torch.no_grad()
    def rollout(self, ctx: RolloutContext, prompts: list[str], cond: TextConditioning) -> RolloutBatch:
        # Two trajectories per prompt from the same x_T, fresh noise at every step (§1a.2–3), ranked (§1a.4).
        ranked = sample_ranked_pairs(ctx, prompts, cond, shared_initial_noise=True, rule=self.config.multi_reward)
        p, traj = len(prompts), ranked.trajectory
        keep = ranked.keep.nonzero().squeeze(1)  # ties give a constant loss: filter them (§1f)
        latents = traj.latents.view(2, p, *traj.latents.shape[1:])  # (2, P, K+1, C, h, w)
        winner, loser = ranked.winner[keep], ranked.loser[keep]
        trainable = trainable_step_count(self.grid.num_steps, self.config.skip_final_steps)
        steps = select_steps(len(keep), trainable, self.config.timestep_fraction, ctx.generator)
        k = steps.shape[1]
        pair_rows = keep.repeat_interleave(k)  # (M,) prompt index per example
        winner_rows, loser_rows = winner.repeat_interleave(k), loser.repeat_interleave(k)
        step_index = steps.reshape(-1)
        lat_w = latents[winner_rows, pair_rows]  # (M, K+1, C, h, w)
        lat_l = latents[loser_rows, pair_rows]
        m = torch.arange(len(pair_rows))
        pairs = StepPairBatch(
            prompt_index=pair_rows,
            step_index=step_index,
            state_w=lat_w[m, step_index],
            action_w=lat_w[m, step_index + 1],
            state_l=lat_l[m, step_index],
            action_l=lat_l[m, step_index + 1],
        )
        return ranked.rollout_batch(prompts, pairs)

    def loss(
        self, predictor: NoisePredictor, cond: TextConditioning, examples: StepPairBatch, generator: torch.Generator
    ) -> LossOutput:
        # Winner and loser sit in different states: one batched (2M) evaluation of θ and of ref.
        states = torch.cat([examples.state_w, examples.state_l])
        actions = torch.cat([examples.action_w, examples.action_l])
        steps = examples.step_index.repeat(2)
        kl, (delta,) = step_log_ratios_and_kl(
            predictor, self.grid, TextConditioning.cat([cond, cond]), steps, states, actions
        )
        m = len(examples)
        weight = self.step_weight[examples.step_index]
        loss, metrics = dpo_step_loss(delta[:m], delta[m:], self.config.beta, self.config.clip_epsilon, weight)
        weighted = delta.detach() * weight.repeat(2).to(delta)
        grouped = {
            **step_kl_diagnostics(steps, kl, steps, delta),
            **step_clamp_diagnostics(examples.step_index, weighted[:m], weighted[m:], self.config.clip_epsilon),
        }
        return LossOutput(loss=loss, metrics=metrics, grouped=grouped)

"""Diffusion-DPO (Wallace et al. 2024; code SalesforceAIResearch/DiffusionDPO): the "Uniform" baseline of DDE
(ALGORITHMS.md §3b, §5.7) — every t weighted alike.

Samples: online final-image pairs ranked by the reward (as DDE here; the original trains offline on Pick-a-Pic).
Example: `FinalPairBatch`; t ~ U[timestep_range] and ε shared within a pair [C].
Loss:    −log σ(−0.5 β_dpo Δ_t), Δ_t = (e^w_θ − e^w_ref) − (e^l_θ − e^l_ref) with per-element-mean MSEs [C train.py].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_diffusion.algorithms.base import (
    Algorithm,
    FinalPairBatch,
    LossOutput,
    RolloutBatch,
    RolloutContext,
    register_algorithm,
)
from rlhf_diffusion.algorithms.common import diffusion_dpo_mse_delta, sample_final_pairs
from rlhf_diffusion.algorithms.dde import sample_timesteps
from rlhf_diffusion.diffusion.sampling import NoisePredictor
from rlhf_diffusion.models.conditioning import TextConditioning


@register_algorithm("diffusion_dpo")
class DiffusionDPO(Algorithm):
    """Diffusion-DPO's uniform-in-t loss on online pairs."""

    name = "diffusion_dpo"
    cfg_in_training = False

    def rollout(self, ctx: RolloutContext, prompts: list[str], cond: TextConditioning) -> RolloutBatch:
        return sample_final_pairs(ctx, prompts, cond)

    def loss(self, predictor: NoisePredictor, cond: TextConditioning, examples: FinalPairBatch,
             generator: torch.Generator) -> LossOutput:
        timesteps, noise = self.draw(examples, generator)
        return self._loss(predictor, cond, examples, timesteps, noise)

    def loss_on_rows(self, predictor: NoisePredictor, cond: TextConditioning, examples: FinalPairBatch,
                     generator: torch.Generator, rows: Tensor) -> LossOutput:
        timesteps, noise = self.draw(examples, generator)  # drawn for the whole minibatch, then sliced
        return self._loss(predictor, cond.index(rows), examples.select(rows), timesteps[rows], noise[rows])

    def draw(self, examples: FinalPairBatch, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """One t (uniform on `timestep_range`) and one ε per pair, shared by winner and loser [C]."""
        timesteps = sample_timesteps(len(examples), self.config.timestep_range, generator)
        return timesteps, torch.randn(examples.x0_w.shape, generator=generator)

    def _loss(self, predictor: NoisePredictor, cond: TextConditioning, examples: FinalPairBatch, timesteps: Tensor,
              noise: Tensor) -> LossOutput:
        delta = diffusion_dpo_mse_delta(predictor, self.grid, cond, examples.x0_w, examples.x0_l, timesteps, noise)
        logits = -0.5 * self.config.beta * delta  # inside = −0.5 β_dpo [(e^w_θ − e^l_θ) − (e^w_ref − e^l_ref)]
        loss = -F.logsigmoid(logits).mean()
        metrics = {"implicit_accuracy": (delta < 0).float().mean().item(), "mean_delta": delta.mean().item()}
        return LossOutput(loss=loss, metrics=metrics)

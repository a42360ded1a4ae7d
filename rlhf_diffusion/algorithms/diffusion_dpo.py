"""Diffusion-DPO (Wallace et al. 2024; code SalesforceAIResearch/DiffusionDPO): the "Uniform" baseline of DDE
(docs/algorithms.md §3b, §5.7) — every t weighted alike.

Samples: online final-image pairs ranked by the reward (as DDE here; the original trains offline on Pick-a-Pic).
Example: `FinalPairBatch`; t ~ U[timestep_range] and ε shared within a pair [C].
Loss:    −log σ(−0.5 β_dpo Δ_t), Δ_t = (e^w_θ − e^w_ref) − (e^l_θ − e^l_ref) with per-element-mean MSEs [C train.py].
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from rlhf_diffusion.algorithms.base import LossOutput, register_algorithm
from rlhf_diffusion.algorithms.common import (
    FinalPairAlgorithm,
    diffusion_dpo_mse_terms,
    timestep_kl_diagnostics,
    timestep_saturation_diagnostics,
)
from rlhf_diffusion.batches import FinalPairBatch
from rlhf_diffusion.diffusion.sampling import NoisePredictor
from rlhf_diffusion.models.conditioning import TextConditioning


@register_algorithm("diffusion_dpo")
class DiffusionDPO(FinalPairAlgorithm):
    """Diffusion-DPO's uniform-in-t loss on online pairs."""

    name = "diffusion_dpo"

    def pair_loss(
        self,
        predictor: NoisePredictor,
        cond: TextConditioning,
        examples: FinalPairBatch,
        timesteps: Tensor,
        noise: Tensor,
    ) -> LossOutput:
        delta, eps_sq_diff = diffusion_dpo_mse_terms(
            predictor, self.grid, cond, examples.x0_w, examples.x0_l, timesteps, noise
        )
        logits = -0.5 * self.config.beta * delta  # inside = −0.5 β_dpo [(e^w_θ − e^l_θ) − (e^w_ref − e^l_ref)]
        loss = -F.logsigmoid(logits).mean()
        metrics = {"implicit_accuracy": (delta < 0).float().mean().item(), "mean_delta": delta.mean().item()}
        grouped = {
            **timestep_kl_diagnostics(timesteps.repeat(2), eps_sq_diff, self.kl_weights),
            **timestep_saturation_diagnostics(timesteps, logits),
        }
        return LossOutput(loss=loss, metrics=metrics, grouped=grouped)

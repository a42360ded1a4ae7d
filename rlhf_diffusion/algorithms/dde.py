"""DDE (Shi et al., arXiv 2411.14871, "Prioritize Denoising Steps on Diffusion Model Preference Alignment via
Explicit Denoised Distribution Estimation") and its DDE-Single ablation (docs/algorithms.md §3;
§ numbers in this file refer to that page).

The paper's equations were lost in our copy: the loss below is the reconstruction of §3b, named
UNCONFIRMED wherever it is one, with DDE-Single (`correction: none`, which the paper reports as at least as
good) as the safe variant.

What DDE shares with Diffusion-DPO it takes from `diffusion_dpo.py` (`DDE` derives from `DiffusionDPO`): the
pairs, the (t, ε) draws and Δ_t. This file holds what DDE changes: the logit and its EMA table.

Samples: final-image pairs (c, x^w_0, x^l_0). The paper trains offline on Pick-a-Pic pairs; here pairs are
    sampled online from the current policy and ranked by the reward (`diffusion_dpo.sample_final_pairs`). Ties
    dropped.
Example: `FinalPairBatch`; at loss time one t per pair (uniform on `timestep_range`) and ε shared by the pair.
Loss:    Δ_t = (e^w_θ − e^w_ref) − (e^l_θ − e^l_ref), e = mean (ε − ε_m(x_t, t, c))²
         S_t = ((1 − ᾱ_t)/ᾱ_t) Δ_t                               single-shot estimation (Eq. 9–10) [D]
               (flow models: S_σ = σ_t² Δ_t with velocity MSEs, the same x_0-MSE difference [derived])
         C_t = Σ_{k=t+1}^{T−1} A[k]  (stop-gradient)              stepwise correction (Eq. 7–8) [UNCONFIRMED]
         L   = −log σ(−β_s S_t + β_c C_t)                          (Eq. 11) [UNCONFIRMED constants]
         after the step, for each t in the batch: A[t] ← m A[t] + (1 − m) mean(−λ_t Δ_t)  ("delay update",
         Algorithm 1; λ_t the DDPM KL weight) [UNCONFIRMED details].
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from rlhf_diffusion.algorithms.base import register_algorithm
from rlhf_diffusion.algorithms.diffusion_dpo import DiffusionDPO
from rlhf_diffusion.diffusion.flow import FlowGrid
from rlhf_diffusion.diffusion.sampling import DDIMGrid


def dde_logits(delta: Tensor, x0_weight: Tensor, correction: Tensor, beta_s: float, beta_c: float) -> Tensor:
    """The DDE logit −β_s w_t Δ_t + β_c C_t per pair (§3b, §5.7), w_t the weight that turns Δ_t into an x_0-MSE
    difference (`ForwardProcess.x0_error_weight`): (1 − ᾱ_t)/ᾱ_t on ε-models (the paper's), σ_t² on flow models
    (derived: the same x_0-space quantity; docs/algorithms.md "Final-pair methods on flow models").

    Args:
        delta: (M,) Δ_t.
        x0_weight: (M,) w_t.
        correction: (M,) C_t (zero for DDE-Single).

    Returns:
        (M,) logits (fp32: the single-shot coefficient spans five orders of magnitude over t).
    """
    single_shot = x0_weight.to(delta.device, torch.float32) * delta.to(torch.float32)  # S_t
    return -beta_s * single_shot + beta_c * correction.to(torch.float32)


def suffix_sums(values: Tensor) -> Tensor:
    """C[t] = Σ_{k=t+1}^{T−1} values[k] for every t: (T,) → (T,) (reverse cumsum shifted by one)."""
    rev = torch.flip(torch.cumsum(torch.flip(values, [0]), 0), [0])  # Σ_{k ≥ t}
    return torch.cat([rev[1:], rev.new_zeros(1)])


def ema_update(table: Tensor, timesteps: Tensor, statistic: Tensor, momentum: float) -> Tensor:
    """A[t] ← m A[t] + (1 − m) mean_{pairs at t}(statistic) for each distinct t in the batch; returns a new table.

    Args:
        table: (T,) fp32.
        timesteps: (M,) long.
        statistic: (M,) per-pair values (−λ_t Δ_t, detached).
    """
    sums = torch.zeros_like(table).index_add_(0, timesteps, statistic.to(table))
    counts = torch.zeros_like(table).index_add_(0, timesteps, torch.ones_like(statistic, dtype=table.dtype))
    seen = counts > 0
    batch_mean = sums / counts.clamp(min=1)
    return torch.where(seen, momentum * table + (1 - momentum) * batch_mean, table)


def correction_share(logits: Tensor, correction: Tensor, beta_c: float) -> float:
    """mean |β_c C_t| / (mean |β_c C_t| + mean |β_s S_t|): the stepwise correction's part of the DDE logit (0 for
    DDE-Single; near 0 means the correction cannot change training)."""
    corr = (beta_c * correction.detach().float()).abs()
    single = (logits.detach().float() - beta_c * correction.detach().float()).abs()
    total = corr.mean() + single.mean()
    return float(corr.mean() / total) if total > 0 else 0.0


@register_algorithm("dde", "dde_single")
class DDE(DiffusionDPO):
    """DDE with the EMA stepwise correction (`correction: ema`) or DDE-Single (`correction: none`): Diffusion-DPO's
    pairs, (t, ε) draws and Δ_t (inherited), with DDE's logit and its EMA table (`pair_logits`)."""

    def __init__(self, config, grid: DDIMGrid | FlowGrid):
        super().__init__(config, grid)
        self.name = config.name
        t_count = self.process.num_train_timesteps
        self.correction_table = torch.zeros(t_count, dtype=torch.float32)  # A[0..T−1], fp32, checkpointed

    def logit_scale(self, timesteps: Tensor) -> Tensor:
        """c_t = β_s w_t, the single-shot logit's coefficient on −Δ_t (w_t: `ForwardProcess.x0_error_weight`)."""
        return self.config.beta_s * self.process.x0_error_weight(timesteps).to(torch.float32)

    def pair_logits(self, delta: Tensor, timesteps: Tensor) -> tuple[Tensor, dict[str, float], Any]:
        """DDE's logit of Δ_t (`dde_logits`: β_s S_t plus, with `correction: ema`, β_c C_t from the EMA table), its
        metrics, and the EMA statistic −λ_t Δ_t at `timesteps` as the state update (None for DDE-Single)."""
        x0_weight = self.process.x0_error_weight(timesteps).to(delta.device)  # (1 − ᾱ_t)/ᾱ_t, or σ_t² on flows
        if self.config.correction == "ema":
            correction = suffix_sums(self.correction_table)[timesteps].to(delta.device)  # C_t, stop-gradient
        else:
            correction = torch.zeros_like(delta)
        logits = dde_logits(delta, x0_weight, correction, self.config.beta_s, self.config.beta_c)
        statistic = -self.kl_weights[timesteps] * delta.detach().cpu().to(torch.float32)  # −λ_t Δ_t
        metrics = {
            "implicit_accuracy": (delta < 0).float().mean().item(),
            "mean_delta": delta.mean().item(),
            "mean_correction": correction.mean().item(),
            # how much of the logit the correction is: |β_c C_t| / (|β_c C_t| + |β_s S_t|), batch means
            "correction_logit_share": correction_share(logits, correction, self.config.beta_c),
            "saturated_fraction": (logits.abs() > 10).float().mean().item(),
        }
        update = (timesteps, statistic) if self.config.correction == "ema" else None
        return logits, metrics, update

    def apply_state_update(self, update) -> None:
        if update is not None:
            timesteps, statistic = update
            self.correction_table = ema_update(self.correction_table, timesteps, statistic, self.config.ema_momentum)

    def state_dict(self) -> dict[str, Tensor]:
        return {"correction_table": self.correction_table.clone()}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        table = state["correction_table"]
        if table.shape != self.correction_table.shape:
            raise ValueError(
                f"DDE correction table has shape {tuple(table.shape)}, expected {tuple(self.correction_table.shape)}"
            )
        self.correction_table = table.to(torch.float32).clone()

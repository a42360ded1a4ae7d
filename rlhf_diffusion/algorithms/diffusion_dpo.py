"""Diffusion-DPO (Wallace et al. 2024; code SalesforceAIResearch/DiffusionDPO): the "Uniform" baseline of DDE
(docs/algorithms.md §3, §5.7) — every t weighted alike. The method is whole in this file; DDE (`dde.py`) reuses its
pairs, its (t, ε) draws and its Δ_t, and changes only the logit.

Samples: online final-image pairs (`sample_final_pairs`): `samples_per_prompt` independent images per prompt,
    ranked by the reward, the best against the worst (2: the papers' pairs); ties dropped. The original trains
    offline on Pick-a-Pic; offline pairs come in through `data/offline.py` as the same example.
Example: `FinalPairBatch`; at loss time `draws_per_pair` draws of (t, ε) per pair, t ~ U[timestep_range] and ε
    shared within a pair [C], made for the whole minibatch before a data-parallel rank takes its rows.
Loss:    −log σ(−0.5 β_dpo Δ_t), Δ_t = (e^w_θ − e^w_ref) − (e^l_θ − e^l_ref) with per-element-mean MSEs [C train.py];
    a pair's loss is the mean over its draws.
Ours, off by default (measured on the testbed, none raises the held-out gain: docs/learning_signal.md):
    `shared_initial_noise` (a prompt's samples from one x_T), `guided_loss` (the MSEs of the sampler's CFG
    prediction) and `winner_sft_weight` λ (adds λ c_t (e^w_θ − e^w_ref), c_t the logit's scale: `logit_scale`).

Flow models (SD3 / SD3.5): the same loss on the model's own forward process (`diffusion.forward_process`):
    x_σ = (1 − σ) x_0 + σ ε, e = mean (v_m(x_σ) − (ε − x_0))² (flow_grpo train_sd3_dpo.py [C]), σ drawn on the
    scheduler's training table (logit-normal by default, as flow_grpo [C]); the pairs are sampled by the flow loop
    at `sampling.flow_noise_level` (docs/algorithms.md "Final-pair methods on flow models").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_diffusion.algorithms.base import Algorithm, LossOutput, RolloutContext, register_algorithm
from rlhf_diffusion.algorithms.common import sample_ranked_pairs
from rlhf_diffusion.batches import FinalPairBatch, RolloutBatch
from rlhf_diffusion.diffusion.flow import FlowGrid
from rlhf_diffusion.diffusion.forward_process import forward_process_for
from rlhf_diffusion.diffusion.sampling import DDIMGrid, NoisePredictor
from rlhf_diffusion.models.conditioning import TextConditioning

__all__ = [
    "KL_TIMESTEP_BUCKET",
    "DiffusionDPO",
    "diffusion_dpo_mse_terms",
    "relative_mse_terms",
    "sample_final_pairs",
    "sample_timesteps",
    "timestep_kl_diagnostics",
    "timestep_saturation_diagnostics",
]

# Width of the timestep buckets (on the 1000-step training grid) of the final-image methods' KL diagnostics.
KL_TIMESTEP_BUCKET = 100


@torch.no_grad()
def sample_final_pairs(
    ctx: RolloutContext,
    prompts: list[str],
    cond: TextConditioning,
    samples: int = 2,
    shared_initial_noise: bool = False,
) -> RolloutBatch:
    """Independent samples per prompt, ranked by the reward: online pairs for Diffusion-DPO and DDE.

    (DDE's paper trains offline on Pick-a-Pic pairs; the online variant samples its pairs from the current
    policy and labels them with the reward model, as an AI annotator does.) Ties are dropped.

    Every image starts from its own x_T (the papers'), or a prompt's images from one (`shared_initial_noise`,
    ours: the pair then differs only by the sampler's later noise). On a flow model (a `FlowGrid` in `ctx`) the
    images are sampled by the flow loop at the grid's noise level (`sampling.flow_noise_level`: Flow-GRPO's SDE, as
    flow_grpo's DPO samples its pairs [C]; 0 = the stock pipeline's ODE): either gives independent samples, which is
    all these losses need (they use only the final images, never a step's log-prob).

    Args:
        samples: S images per prompt (one S·P batch); the pair is the best against the worst by the weighted
            total reward (S = 2: the two samples, the papers' pairs).
        shared_initial_noise: all S images of a prompt start from the same x_T.
    """
    ranked = sample_ranked_pairs(ctx, prompts, cond, samples=samples, shared_initial_noise=shared_initial_noise)
    p = len(prompts)
    finals = ranked.trajectory.final
    finals = finals.view(-1, p, *finals.shape[1:])  # (S, P, C, h, w)
    rows, keep = torch.arange(p), ranked.keep
    pairs = FinalPairBatch(
        prompt_index=rows[keep],
        x0_w=finals[ranked.winner, rows][keep],
        x0_l=finals[ranked.loser, rows][keep],
    )
    return ranked.rollout_batch(prompts, pairs)


def sample_timesteps(
    count: int, timestep_range: tuple[int, int], generator: torch.Generator, density: str = "uniform"
) -> Tensor:
    """One t per pair on [lo, hi] of the N-step training table (larger t = noisier; on a flow model t indexes the
    scheduler's σ table, `diffusion.forward_process`).

    'uniform': t ~ U{lo, …, hi} (Diffusion-DPO train.py [C]; DDE: uniform assumed [U]). 'logit_normal':
    t = lo + ⌊u (hi − lo + 1)⌋ with u = sigmoid(n), n ~ N(0, 1): over the whole table (0, 999) this is flow_grpo's
    SD3 DPO draw [C] (its index ⌊1000 u⌋ into the descending schedule; u and 1 − u have the same law, so the
    ascending index has it too); over a narrower range the stretch is ours.
    """
    lo, hi = timestep_range
    if density == "uniform":
        return torch.randint(lo, hi + 1, (count,), generator=generator)
    if density == "logit_normal":
        u = torch.sigmoid(torch.randn((count,), generator=generator, dtype=torch.float64))
        return (lo + torch.floor(u * (hi - lo + 1)).long()).clamp(max=hi)
    raise ValueError(f"unknown timestep density {density!r}; expected 'uniform' or 'logit_normal'")


def diffusion_dpo_mse_terms(
    predictor: NoisePredictor,
    grid: DDIMGrid | FlowGrid,
    cond: TextConditioning,
    x0_w: Tensor,
    x0_l: Tensor,
    timesteps: Tensor,
    noise: Tensor,
) -> tuple[Tensor, Tensor]:
    """Δ_t = (e^w_θ − e^w_ref) − (e^l_θ − e^l_ref) (M,) and the detached mean_{C,H,W}(y_θ − y_ref)² (2M,) of
    `relative_mse_terms` (which see)."""
    d_w, d_l, pred_sq_diff = relative_mse_terms(predictor, grid, cond, x0_w, x0_l, timesteps, noise)
    return d_w - d_l, pred_sq_diff


def relative_mse_terms(
    predictor: NoisePredictor,
    grid: DDIMGrid | FlowGrid,
    cond: TextConditioning,
    x0_w: Tensor,
    x0_l: Tensor,
    timesteps: Tensor,
    noise: Tensor,
    reference_is_policy: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """d^i = e^i_θ − e^i_ref for the winners and the losers, e^i_m = mean_{C,H,W}(y^i − y_m(x^i_t, t, c))² (§5.7;
    Δ_t = d^w − d^l), and mean_{C,H,W}(y_θ − y_ref)² at each noised latent, from the same network calls.

    The forward process is the model's (`forward_process_for(grid)`): ε-models x^i_t = sqrt(ᾱ_t) x^i_0 +
    sqrt(1 − ᾱ_t) ε with target y = ε (Diffusion-DPO [C]); flow models x^i_σ = (1 − σ_t) x^i_0 + σ_t ε with target
    y = ε − x^i_0, the velocity (flow_grpo train_sd3_dpo.py [C]). t and ε are shared within a pair [C].
    Δ_t < 0 means θ fits the winner better (relative to ref) than the loser.

    Args:
        predictor: noise or velocity prediction (conditional only for these methods).
        grid: the sampling grid; its model's forward process supplies the training tables.
        cond: M conditionings.
        x0_w, x0_l: (M, C, h, w) latents.
        timesteps: (M,) long on the N-step training table.
        noise: (M, C, h, w) ε.
        reference_is_policy: the reference is θ itself, stop-gradient (`reference: policy`): d^i is 0 in value
            and ∇e^i_θ in gradient, with no reference call.

    Returns:
        (d^w (M,), d^l (M,), both differentiable w.r.t. the LoRA parameters, pred_sq_diff (2M,) detached: winners'
        rows first, then the losers').
    """
    process = forward_process_for(grid)
    device = predictor.model.device
    x0 = torch.cat([x0_w, x0_l]).to(device)  # (2M, C, h, w)
    noise2 = noise.to(device).repeat(2, 1, 1, 1)
    t2 = timesteps.repeat(2)
    x_t = process.noised(x0, noise2, t2)
    target = process.target(x0, noise2)
    cond2 = TextConditioning.cat([cond, cond])
    model_t = process.model_timesteps(t2).to(device)
    pred_theta = predictor(x_t, model_t, cond2)
    if reference_is_policy:
        pred_ref = pred_theta.detach()
    else:
        pred_ref = predictor(x_t, model_t, cond2, reference=True)
    err_theta = ((pred_theta - target) ** 2).mean(dim=(1, 2, 3))
    err_ref = ((pred_ref - target) ** 2).mean(dim=(1, 2, 3))
    pred_sq_diff = ((pred_theta.detach() - pred_ref.detach()) ** 2).mean(dim=(1, 2, 3))
    m = x0_w.shape[0]
    return err_theta[:m] - err_ref[:m], err_theta[m:] - err_ref[m:], pred_sq_diff


def timestep_kl_diagnostics(
    timesteps: Tensor, eps_sq_diff: Tensor, kl_weights: Tensor, prediction: str = "eps"
) -> dict[str, tuple[Tensor, Tensor]]:
    """The final-image methods' `LossOutput.grouped` KL diagnostics, grouped by timestep bucket
    lo = KL_TIMESTEP_BUCKET · floor(t / KL_TIMESTEP_BUCKET) (t ∈ [lo, lo + 100)):

    - `kl/eps_sq_diff_t_<lo>`: mean (ε_θ − ε_ref)² per latent element at x_t noised from the pairs' images (not a
      KL: the raw noise-prediction difference, every t alike);
    - `kl/ddpm_step_t_<lo>`: λ_t × that = the KL of the DDPM reverse step at t (`ddim.ddpm_step_kl`, nats per
      element; λ_0 = 0). The samplers run DDIM with η, so it measures the drift of the model, not of the sampler.

    A flow model's rows are velocities: `kl/v_sq_diff_t_<lo>` = mean (v_θ − v_ref)², and `kl/ddpm_step_t_<lo>` its
    λ_t in velocity units (`flow.vp_equivalent_kl_weights`: the DDPM step KL of the same-SNR chain, derived).

    Args:
        timesteps: (R,) long t of each row.
        eps_sq_diff: (R,) per-row mean (ε_θ − ε_ref)² (or (v_θ − v_ref)²).
        kl_weights: (N,) λ_t table (`ForwardProcess.kl_weights`).
        prediction: "eps" or "v" (`ForwardProcess.prediction`), the name of the raw difference.
    """
    t = timesteps.detach().cpu().long()
    diff = eps_sq_diff.detach().float().cpu()
    buckets = torch.div(t, KL_TIMESTEP_BUCKET, rounding_mode="floor") * KL_TIMESTEP_BUCKET
    return {
        f"kl/{prediction}_sq_diff_t": (buckets, diff),
        "kl/ddpm_step_t": (buckets, kl_weights.to(diff)[t] * diff),
    }


def timestep_saturation_diagnostics(
    timesteps: Tensor, logits: Tensor, threshold: float = 5.0
) -> dict[str, tuple[Tensor, Tensor]]:
    """`signal/saturated_t_<lo>`: per timestep bucket, the fraction of pairs whose logit z exceeds `threshold`, where
    −log σ(z) has gradient 1 − σ(z) < 0.007: pairs already won that no longer train (`LossOutput.grouped`)."""
    t = timesteps.detach().cpu().long()
    buckets = torch.div(t, KL_TIMESTEP_BUCKET, rounding_mode="floor") * KL_TIMESTEP_BUCKET
    return {"signal/saturated_t": (buckets, (logits.detach().float().cpu() > threshold).float())}


@register_algorithm("diffusion_dpo")
class DiffusionDPO(Algorithm):
    """Diffusion-DPO's uniform-in-t loss on final-image pairs: online pairs from `sample_final_pairs`
    (`config.samples_per_prompt` images per prompt), and `config.draws_per_pair` draws of (t, ε) per pair — t uniform
    on `config.timestep_range`, ε shared by winner and loser [C] — made for the whole minibatch before a
    data-parallel rank takes its rows; a pair's loss is the mean over its draws. DDE derives from it and overrides
    `pair_logits` (its logit). Trains ε-models and flow models alike (`flow_models`): the model's forward process
    (`self.process`) supplies the noising, the target and the tables."""

    name = "diffusion_dpo"
    # ε-MSE (v-MSE) on the conditional model, as Diffusion-DPO (flow_grpo: no CFG [C]); `guided_loss` sets it per run
    cfg_in_training = False
    flow_models = True

    @classmethod
    def flow_problem(cls, config) -> str | None:
        """A prompt's images from one x_T (`shared_initial_noise`) are identical on the ODE (noise level 0)."""
        if config.algorithm.shared_initial_noise and config.sampling.flow_noise_level <= 0:
            return (
                "algorithm.shared_initial_noise: needs sampling.flow_noise_level > 0 (at 0 the flow sampler is the "
                "ODE, and images from one x_T are identical)"
            )
        return None

    def __init__(self, config, grid: DDIMGrid | FlowGrid):
        super().__init__(config, grid)
        # `guided_loss` (ours): the ε-MSEs of the CFG-guided prediction, as the sampler draws
        self.cfg_in_training = config.guided_loss
        self.process = forward_process_for(grid)
        self.kl_weights = self.process.kl_weights()  # λ_t (N,): DDE's statistic, the KL diagnostics
        self.draws = config.draws_per_pair

    def rollout(self, ctx: RolloutContext, prompts: list[str], cond: TextConditioning) -> RolloutBatch:
        return sample_final_pairs(
            ctx,
            prompts,
            cond,
            samples=self.config.samples_per_prompt,
            shared_initial_noise=self.config.shared_initial_noise,
        )

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
        """`draws_per_pair` × M values of t (on `timestep_range`, with `timestep_density`) and of ε (each shared by
        winner and loser), draw-major: entry d·M + i is pair i's draw d (one draw: the papers' one t and ε per
        pair)."""
        count = self.draws * len(examples)
        density = self.config.timestep_density
        density = self.process.default_density if density == "auto" else density
        timesteps = sample_timesteps(count, self.config.timestep_range, generator, density)
        return timesteps, torch.randn((count, *examples.x0_w.shape[1:]), generator=generator)

    def pair_loss(
        self,
        predictor: NoisePredictor,
        cond: TextConditioning,
        examples: FinalPairBatch,
        timesteps: Tensor,
        noise: Tensor,
    ) -> LossOutput:
        """The loss of `examples` at the given per-pair `timesteps` (M,) and `noise` (M, C, h, w): −log σ of the
        method's logit of Δ_t (`pair_logits`), plus, with `winner_sft_weight` λ > 0 (ours), λ c_t d^w: the winner's
        own ε-MSE relative to the reference at the logit's scale c_t (`logit_scale`), so that the pair cannot be won
        by fitting both images worse. Metrics add `winner_rel_mse` and `loser_rel_mse` (the means of d^w and d^l:
        both rising while Δ_t stays small is the likelihood displacement docs/learning_signal.md measures), with the
        per-timestep KL and saturation diagnostics."""
        d_w, d_l, pred_sq_diff = relative_mse_terms(
            predictor,
            self.grid,
            cond,
            examples.x0_w,
            examples.x0_l,
            timesteps,
            noise,
            reference_is_policy=self.config.reference == "policy",
        )
        logits, metrics, update = self.pair_logits(d_w - d_l, timesteps)
        loss = -F.logsigmoid(logits).mean()
        if self.config.winner_sft_weight > 0:
            scale = self.logit_scale(timesteps).to(d_w.device, torch.float32)
            loss = loss + self.config.winner_sft_weight * (scale * d_w.to(torch.float32)).mean()
        metrics |= {"winner_rel_mse": d_w.mean().item(), "loser_rel_mse": d_l.mean().item()}
        grouped = {
            **timestep_kl_diagnostics(timesteps.repeat(2), pred_sq_diff, self.kl_weights, self.process.prediction),
            **timestep_saturation_diagnostics(timesteps, logits),
        }
        return LossOutput(loss=loss, metrics=metrics, state_update=update, grouped=grouped)

    def logit_scale(self, timesteps: Tensor) -> Tensor:
        """c_t (M,), the logit's coefficient on −Δ_t at each pair's t: Diffusion-DPO's 0.5 β, every t alike."""
        return torch.full(timesteps.shape, 0.5 * self.config.beta, dtype=torch.float32)

    def pair_logits(self, delta: Tensor, timesteps: Tensor) -> tuple[Tensor, dict[str, float], Any]:
        """Each pair's logit from its Δ_t (M,) at `timesteps`, the loss's metrics, and the state update (None):
        Diffusion-DPO's −0.5 β Δ_t. DDE overrides it (its logit and EMA statistic)."""
        # inside = −0.5 β_dpo [(e^w_θ − e^l_θ) − (e^w_ref − e^l_ref)]
        logits = -self.logit_scale(timesteps).to(delta.device, delta.dtype) * delta
        metrics = {"implicit_accuracy": (delta < 0).float().mean().item(), "mean_delta": delta.mean().item()}
        return logits, metrics, None

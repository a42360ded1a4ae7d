"""GRPO for text-to-image diffusion (group-relative policy optimisation, Shao et al. 2024's advantage on DDPO's
PPO-clip; as DanceGRPO's SD path, XueZeyue/DanceGRPO, and Flow-GRPO, yifan123/flow_grpo): docs/algorithms.md §9
(§ numbers in this file refer to that page).

Samples: a group of G = `group_size` independent stochastic DDIM trajectories per prompt (fresh x_T each), recording
         every state, action and the per-element-mean log-prob ℓ_old of each action (§9a) [C].
Advantage: within the group, A_i = (r_i − mean_G r)/(std_G r + 1e-8), unbiased std (DanceGRPO [C]); with `global_std`
         one std for the sampler's whole shard, population std + 1e-4 (Flow-GRPO's option [C]); a group whose
         rewards are all equal gets A = 0 exactly and its trajectories are not emitted (Flow-GRPO drops samples
         whose advantage is zero [C]: they carry no gradient). Computed at rollout: a group never spans two shards.
Example: one DDIM step of one trajectory (`TrajectoryStepBatch`, shared with DDPO), a random floor(`timestep_fraction`
         · (K − skip_final_steps)) steps per trajectory, the last step never (`skip_final_steps` 1, DanceGRPO [C]).
Loss:    L = mean_examples [max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε)) + β KL(π_θ(·|x_τ) ‖ π_ref(·|x_τ))],
         ρ = exp(ℓ_θ − ℓ_old) with ℓ_θ recomputed with CFG as sampled, A clipped to ±adv_clip_max (§9b) [C]; the KL is
         the closed form for the two Gaussian DDIM steps with the same σ_τ, per latent element, the reference being
         the UNet with the LoRA disabled; β = `kl_beta`, 0 by default (DanceGRPO has none [C]).
Ours:    the closed-form per-step KL in the DDIM kernel (Flow-GRPO's coded KL lacks its SDE step's Δt, flow_grpo#78
         [I]); the step subset drawn once at rollout.
Flow models (SD3 / SD3.5): this is Flow-GRPO — the same rollout and loss, the steps sampled and re-scored with
         Flow-GRPO's SDE step at `sampling.flow_noise_level` a > 0 (`step_kernel.FlowKernel`), the KL the closed
         form of two such steps, (κ²/(2s²)) mean (v̂_θ − v̂_ref)² (docs/algorithms.md §10(c)).
"""

from __future__ import annotations

import torch
from torch import Tensor

from rlhf_diffusion.algorithms.base import RolloutContext, register_algorithm
from rlhf_diffusion.algorithms.ddpo import PolicyGradientAlgorithm, sample_trajectory_steps
from rlhf_diffusion.batches import RolloutBatch
from rlhf_diffusion.models.conditioning import TextConditioning

__all__ = ["GRPO", "group_advantages"]


# Flow-GRPO's std floor with `global_std` (flow_grpo stat_tracking.py: np.std(rewards) + 1e-4 [C]).
GLOBAL_STD_EPS = 1e-4


def group_advantages(rewards: Tensor, eps: float = 1e-8, *, global_std: bool = False) -> Tensor:
    """Group-normalised advantages: (P, G) rewards → (P, G) A = (r − mean_G r)/(std_G r + eps) per row (one row =
    one prompt's group), with the unbiased std (torch.std, DanceGRPO [C]). With `global_std` (Flow-GRPO's option
    [C]) the denominator is one std for all rows: the population std of every reward in `rewards` + 1e-4
    (`GLOBAL_STD_EPS`, `eps` unused), so a prompt whose images differ little gets small advantages instead of
    unit-scale ones. A row whose rewards are all equal gets A = 0 exactly (the floating-point mean of equal values
    need not equal them)."""
    if rewards.ndim != 2 or rewards.shape[1] < 2:
        raise ValueError(f"rewards must be (P, G) with G >= 2, got {tuple(rewards.shape)}")
    values = rewards.double()
    mean = values.mean(dim=1, keepdim=True)
    if global_std:
        std, eps = values.std(unbiased=False), GLOBAL_STD_EPS
    else:
        std = values.std(dim=1, keepdim=True)
    advantages = (values - mean) / (std + eps)
    constant = (values == values[:, :1]).all(dim=1, keepdim=True)
    return torch.where(constant, torch.zeros_like(advantages), advantages).float()


@register_algorithm("grpo")
class GRPO(PolicyGradientAlgorithm):
    """GRPO with DanceGRPO's SD choices: G = 16, PPO-clip ε = 1e-4, advantages clipped at 5, the last step not
    trained, no KL (β = 0) unless `kl_beta` is set."""

    name = "grpo"
    cfg_in_training = True  # ℓ_θ with the same CFG as sampling (DanceGRPO / ddpo-pytorch train.cfg = True [C])

    def rollout(self, ctx: RolloutContext, prompts: list[str], cond: TextConditioning) -> RolloutBatch:
        cfg = self.config
        sampled = sample_trajectory_steps(
            ctx, prompts, cond, cfg.group_size, cfg.timestep_fraction, cfg.skip_final_steps
        )
        advantages = group_advantages(sampled.rewards, global_std=cfg.global_std)  # (P, G)
        steps = sampled.steps
        steps.advantage = advantages[steps.prompt_index, steps.sample_index]
        constant = (advantages == 0).all(dim=1)  # groups with nothing to learn from
        keep = (~constant[steps.prompt_index]).nonzero().squeeze(1)
        rewards = sampled.rewards.double()
        return RolloutBatch(
            prompts=list(prompts),
            pairs=steps.select(keep),
            rewards=sampled.rewards,
            final_images=sampled.images,
            metrics={
                "zero_std_fraction": constant.float().mean().item(),
                "group_reward_std": rewards.std(dim=1).mean().item(),
            },
            per_reward=sampled.per_reward,
        )

    def kl_beta(self) -> float:
        """`kl_beta` of the config: the loss (PolicyGradientAlgorithm's) adds β · KL(π_θ ‖ π_ref) per step."""
        return self.config.kl_beta

"""TailorPO and TailorPO-G on a tiny SD3 (flow-matching) pipeline: the candidates branch from one state with
Flow-GRPO's SDE step and are ranked by the reward of their preview x̂_0 = x − σ' v̂, the pair's Δ_w − Δ_l is the
closed form (κ/s²) mean[(v̂_θ − v̂_ref)(x_w − x_l)], TailorPO-G's guidance moves the winner by γ s sqrt(D) and raises
the preview's reward, the production trainer trains 2 iterations in process and the LoRA changes, and the settings
with no flow counterpart are refused naming the field (docs/algorithms.md §10(e))."""

import math

import pytest
import torch

from rlhf_diffusion.algorithms.common import step_log_ratios
from rlhf_diffusion.algorithms.tailorpo import guide_winner
from rlhf_diffusion.diffusion import flow
from rlhf_diffusion.diffusion.flow import FlowGrid
from rlhf_diffusion.diffusion.sampling import decode_latents
from rlhf_diffusion.diffusion.step_kernel import FlowKernel
from rlhf_diffusion.models.loading import ModelLoadError
from rlhf_diffusion.testing import (
    check_lora_changed,
    launch_tiny,
    perturb_lora,
    run_metrics,
    tiny_loop_trainer,
    tiny_trainer,
)

PROMPTS = ["a cat", "a dog", "a fox"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_candidates_share_the_state_are_ranked_by_their_preview_and_delta_is_the_pair_closed_form(sd3_dir, tmp_path):
    trainer = tiny_trainer(sd3_dir, tmp_path, {"name": "tailorpo"})
    grid = trainer.grid
    assert isinstance(grid, FlowGrid) and grid.noise_level == 0.7
    batch = trainer.rollout(PROMPTS)
    ex = batch.pairs
    assert len(ex) >= 2 and set(ex.step_index.tolist()) <= set(range(grid.num_steps))
    torch.testing.assert_close(ex.state_w, ex.state_l)  # both candidates from the same state
    assert (ex.action_w - ex.action_l).flatten(1).norm(dim=1).min() > 0
    cond = trainer.encode(batch.prompts).index(ex.prompt_index)

    # the winner's preview x̂_0 = x − σ_{i+1} v̂(x, σ_{i+1}) scores above the loser's (not at the last step: x_0 itself)
    inner = (ex.step_index < grid.num_steps - 1).nonzero().squeeze(1)
    with torch.no_grad():
        i = ex.step_index[inner]
        t_next, sigma_next = grid.timesteps[i + 1], grid.sigmas[i + 1]
        scores = []
        for action in (ex.action_w[inner], ex.action_l[inner]):
            v = trainer.sample_predictor(action, t_next, cond.index(inner))
            x0 = action - sigma_next.view(-1, 1, 1, 1) * v
            prompts = [batch.prompts[k] for k in ex.prompt_index[inner].tolist()]
            scores.append(trainer.reward.score(decode_latents(trainer.model, x0), prompts).total)
    assert len(inner) > 0 and (scores[0] > scores[1]).all()

    # Δ_w − Δ_l of the pair = (κ_i/s_i²) mean[(v̂_θ − v̂_ref)(x_w − x_l)] (§10), v̂ at the shared state with CFG
    perturb_lora(trainer)
    predictor = trainer.train_predictor
    with torch.no_grad():
        dw, dl = step_log_ratios(predictor, grid, cond, ex.step_index, ex.state_w, ex.action_w, ex.action_l)
        t = grid.timesteps[ex.step_index]
        v_theta, v_ref = predictor(ex.state_w, t, cond), predictor(ex.state_w, t, cond, reference=True)
        kappa, s = grid.kappa[ex.step_index], grid.std_dev[ex.step_index]
        hand = kappa / s**2 * ((v_theta - v_ref) * (ex.action_w - ex.action_l)).mean(dim=(1, 2, 3))
        kernel = FlowKernel(grid)
        closed = flow.pair_log_ratio_from_means(
            ex.action_w,
            ex.action_l,
            kernel.mean(ex.state_w, v_theta, ex.step_index),
            kernel.mean(ex.state_w, v_ref, ex.step_index),
            s,
        )
    assert hand.abs().min() > 0
    torch.testing.assert_close(dw - dl, hand, rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(closed, hand, rtol=2e-3, atol=1e-5)


def test_tailorpo_g_guidance_moves_the_winner_by_the_configured_norm_and_raises_the_preview_reward(sd3_dir, tmp_path):
    trainer = tiny_trainer(sd3_dir, tmp_path, {"name": "tailorpo_g", "guidance_gamma": 0.3})
    ctx, grid = trainer.rollout_context(), trainer.grid
    prompts = PROMPTS[:2]
    cond = trainer.encode(prompts)
    x = torch.randn(2, 16, 16, 16, generator=torch.Generator().manual_seed(0))
    i = torch.tensor([1, 1])  # candidates of step 1, at σ_2
    t_w, s = grid.timesteps[i + 1], grid.std_dev[i]
    kernel = FlowKernel(grid)
    with torch.no_grad():
        v_w = trainer.sample_predictor(x, t_w, cond)
    guided, before = guide_winner(
        ctx,
        x,
        v_w,
        t_w,
        torch.ones(2),
        s,
        cond,
        prompts,
        gradient="tweedie_const_eps",
        norm="sigma_relative",
        gamma=0.3,
        raw_scale=1.0,
        x0_from_pred=lambda x, v: kernel.x0_after(x, v, i),
    )
    move = (guided - x).flatten(1).norm(dim=1)
    torch.testing.assert_close(move, 0.3 * s * (16 * 16 * 16) ** 0.5, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        x0 = guided - grid.sigmas[i + 1].view(-1, 1, 1, 1) * v_w  # ∂x̂_0/∂x = 1 with v̂ held
        after = trainer.reward.score(decode_latents(trainer.model, x0), prompts).total
    assert (after > before).all()


@pytest.mark.parametrize("name", ["tailorpo", "tailorpo_g"])
def test_the_trainer_trains_an_sd3_lora_with_tailorpo(sd3_dir, tmp_path, name):
    trainer = tiny_loop_trainer(
        sd3_dir,
        tmp_path,
        f"sd3_{name}",
        {"name": name},
        seed=0,
        train={"iterations": 2},
        rewards=[{"name": "brightness"}],
    )
    result = trainer.fit()
    records = [r for r in run_metrics(result.run_dir) if "train/loss" in r]
    assert [r["iteration"] for r in records] == [1.0, 2.0]
    assert all(math.isfinite(r["train/loss"]) and r["train/optimizer_steps"] >= 1 for r in records)
    check_lora_changed(result.run_dir)  # B starts at 0: the LoRA changed


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("sampling.flow_noise_level=0", "error: sampling.flow_noise_level: must be > 0 for algorithm.name 'tailorpo'"),
        ("algorithm={name: tailorpo, step_ranking: completion}", "error: algorithm.step_ranking: 'completion'"),
    ],
)
def test_settings_without_a_flow_counterpart_are_refused_naming_the_field(sd3_dir, tmp_path, capsys, setting, message):
    from rlhf_diffusion.config import load_config
    from rlhf_diffusion.workers.policy import load_policy

    overrides = [f"model.pretrained={sd3_dir}", "algorithm={name: tailorpo}", setting]
    code, err = launch_tiny(overrides, tmp_path, capsys)
    assert code == 2 and err.startswith(message), err
    assert "SD3 (flow-matching) pipeline in model.pretrained" in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())
    with pytest.raises(ModelLoadError, match=message.removeprefix("error: ").split(":")[0]):
        load_policy(load_config("configs/tiny.yaml", overrides), str(sd3_dir), torch.device("cpu"))

"""`train.ema_decay`: the moving average of the trained weights (flow_grpo's EMA), by hand on the learner; the
held-out evaluations and the exports use it, the rollouts do not; it is checkpointed (with the fp16 loss scale and
the optimizer-step count) and a resumed run ends with the same average."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load

from rlhf_diffusion.checkpoint import CheckpointState, load_checkpoint, save_checkpoint
from rlhf_diffusion.config import parse_config
from rlhf_diffusion.local_trainer import LocalTrainer
from rlhf_diffusion.models.loading import get_trainable_state, trainable_parameters
from rlhf_diffusion.testing import tiny_loop_run_config
from rlhf_diffusion.workers.learner import ema_decay_at

LORA = "lora/pytorch_lora_weights.safetensors"


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    """Two LoRA files' tensors are equal (their bytes are not compared: the order of a safetensors header's metadata
    is not deterministic)."""
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_decay_warms_up_as_flow_grpos():
    assert ema_decay_at(0.9, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.9, 7) == pytest.approx(8 / 17)
    assert ema_decay_at(0.9, 80) == pytest.approx(0.9)  # (1 + n)/(10 + n) reaches 0.9 at n = 80
    assert ema_decay_at(0.5, 1000) == 0.5


def _trainer(model_dir, tmp_path, name, iterations, *, resume=False, **train):
    data = tiny_loop_run_config(
        model_dir,
        tmp_path,
        name,
        "dde_single",
        seed=3,
        num_steps=2,
        train={"iterations": iterations, "learning_rate": 5e-2, "train_batch_size": 1, **train},
        checkpoint={"every": 2, "keep_last": 5},
        tracking={"enabled": False},
    )
    return LocalTrainer(parse_config(data), resume=resume, log=lambda *_: None)


def test_the_average_follows_the_recurrence_by_hand(tiny_sd15_dir, tmp_path):
    """Every optimizer step n (here 2 per iteration: 2 pairs, batch 1) the weights are followed; the average is
    updated when (n + 1) % 2 == 0 with d_n = min((1 + n)/(10 + n), 0.5)."""
    trainer = _trainer(tiny_sd15_dir, tmp_path, "hand", 2, ema_decay=0.5, ema_every=2)
    learner = trainer.learner_obj
    params = trainable_parameters(learner.model.unet)
    expected = [p.detach().clone() for p in params]
    step = learner.optimizer.step

    def step_and_follow(*args, **kwargs):
        out = step(*args, **kwargs)
        n = learner.optimizer_steps + 1  # the learner counts this step right after
        if (n + 1) % 2 == 0:
            d = min((1 + n) / (10 + n), 0.5)
            for e, p in zip(expected, params, strict=True):
                e.mul_(d).add_(p.detach(), alpha=1 - d)
        return out

    learner.optimizer.step = step_and_follow
    result = trainer.fit()
    assert learner.optimizer_steps == 4
    for e, v in zip(expected, learner.ema, strict=True):
        torch.testing.assert_close(v, e, atol=1e-7, rtol=0)
    assert max((e - p).abs().max().item() for e, p in zip(expected, params, strict=True)) > 1e-4  # it lags

    # the average is what was evaluated and exported; the weights themselves are unchanged by either
    current = get_trainable_state(learner.model.unet)
    averaged = learner.weights(average=True)
    assert averaged.average and not learner.weights().average
    assert all(torch.equal(current[k], v) for k, v in get_trainable_state(learner.model.unet).items())
    images = trainer.sampler.evaluate(trainer.eval_prompts, [0], 1, averaged).images
    torch.testing.assert_close(result.eval_after.images, images, atol=0, rtol=0)
    # an on-policy sampler shares the learner's UNet: judging the average leaves the weights as they were
    assert trainer.sampler.model is learner.model
    assert all(torch.equal(current[k], v) for k, v in get_trainable_state(learner.model.unet).items())
    plain = trainer.sampler.evaluate(trainer.eval_prompts, [0], 1, learner.weights()).images
    assert (plain - images).abs().max() > 1e-4
    # the run's lora/ is the average's export, not the weights'
    run_lora = load(result.lora_file.read_bytes())
    assert same(run_lora, load(learner.export_files()[LORA]))
    average, learner.ema = learner.ema, None
    assert not same(run_lora, load(learner.export_files()[LORA]))
    learner.ema = average


def test_the_checkpoint_keeps_the_average_the_step_count_and_the_loss_scale(tmp_path):
    lora = {"a.lora_A.weight": torch.ones(2, 3)}
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([param], lr=0.1)
    scaler = {
        "scale": 2048.0,
        "growth_factor": 2.0,
        "backoff_factor": 0.5,
        "growth_interval": 2000,
        "_growth_tracker": 7,
    }
    state = CheckpointState(
        iteration=3,
        learner={
            "version": 3,
            "lora": lora,
            "optimizer": optimizer.state_dict(),
            "algorithm": {},
            "optimizer_steps": 9,
            "grad_scaler": scaler,
            "ema": {"000000": torch.full((2, 3), 0.5)},
        },
        weights_history={},
        meta={"seed": 1},
    )
    loaded = load_checkpoint(save_checkpoint(tmp_path, state)).learner
    assert loaded["optimizer_steps"] == 9 and loaded["grad_scaler"] == scaler
    assert torch.equal(loaded["ema"]["000000"], torch.full((2, 3), 0.5))
    without = load_checkpoint(
        save_checkpoint(
            tmp_path / "plain",
            CheckpointState(
                iteration=1,
                learner={"version": 1, "lora": lora, "optimizer": optimizer.state_dict(), "algorithm": {}},
                weights_history={},
                meta={},
            ),
        )
    ).learner
    assert without["ema"] == {} and without["optimizer_steps"] == 0 and without["grad_scaler"] == {}


def test_a_resumed_run_ends_with_the_same_average(tiny_sd15_dir, tmp_path):
    whole = _trainer(tiny_sd15_dir, tmp_path, "whole", 4, ema_decay=0.8, ema_every=1).fit()
    first = _trainer(tiny_sd15_dir, tmp_path, "split", 2, ema_decay=0.8, ema_every=1).fit()
    assert not same(load(first.lora_file.read_bytes()), load(whole.lora_file.read_bytes()))
    resumed = _trainer(tiny_sd15_dir, tmp_path, "split", 4, resume=True, ema_decay=0.8, ema_every=1).fit()
    assert same(load(resumed.lora_file.read_bytes()), load(whole.lora_file.read_bytes()))

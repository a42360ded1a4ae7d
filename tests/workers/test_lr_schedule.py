"""The learning-rate schedule (`train.lr_schedule`): hand values of the pure function, the config's checks, and the
learner training each iteration at the scheduled rate, also after a resume."""

from __future__ import annotations

import math

import pytest
import torch

from rlhf_diffusion.batches import FinalPairBatch, RolloutBatch
from rlhf_diffusion.config import ConfigError, TrainConfig, parse_config
from rlhf_diffusion.workers.learner import Learner, learning_rate_at


def rates(**fields) -> list[float]:
    train = TrainConfig(**fields)
    return [learning_rate_at(train, i) for i in range(1, train.iterations + 1)]


def test_constant_is_the_default_and_the_papers():
    assert rates(iterations=4, learning_rate=0.5) == [0.5] * 4
    assert learning_rate_at(TrainConfig(iterations=4, learning_rate=0.5), 0) == 0.5  # a probe round before any


def test_linear_runs_from_lr_at_the_first_iteration_to_the_final_ratio_at_the_last():
    assert rates(iterations=5, learning_rate=1.0, lr_schedule="linear") == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    assert rates(iterations=3, learning_rate=2.0, lr_schedule="linear", lr_final_ratio=0.5) == pytest.approx(
        [2.0, 1.5, 1.0]
    )


def test_cosine_by_hand():
    half = 0.5 * (1 + math.cos(math.pi / 4))  # progress 1/4 → (1 + cos(π/4)) / 2
    assert rates(iterations=5, learning_rate=1.0, lr_schedule="cosine") == pytest.approx(
        [1.0, half, 0.5, 1 - half, 0.0]
    )
    assert rates(iterations=3, learning_rate=1.0, lr_schedule="cosine", lr_final_ratio=0.2) == pytest.approx(
        [1.0, 0.6, 0.2]
    )


def test_warmup_ramps_linearly_then_the_schedule_starts_at_full_rate():
    assert rates(iterations=6, learning_rate=1.0, lr_warmup_iterations=2, lr_schedule="linear") == pytest.approx(
        [0.5, 1.0, 1.0, 2 / 3, 1 / 3, 0.0]
    )
    assert rates(iterations=3, learning_rate=1.0, lr_warmup_iterations=3, lr_schedule="cosine") == pytest.approx(
        [1 / 3, 2 / 3, 1.0]
    )


def test_past_the_last_iteration_the_rate_stays_at_its_end_value():
    train = TrainConfig(iterations=3, learning_rate=1.0, lr_schedule="linear", lr_final_ratio=0.1)
    assert learning_rate_at(train, 7) == pytest.approx(0.1)
    assert learning_rate_at(TrainConfig(iterations=1, learning_rate=1.0, lr_schedule="cosine"), 1) == 0.0


def test_bad_schedule_fields_name_the_field():
    rewards = [{"name": "jpeg_compressibility"}]
    with pytest.raises(ConfigError, match="lr_warmup_iterations"):
        parse_config({"rewards": rewards, "train": {"iterations": 3, "lr_warmup_iterations": 4}})
    with pytest.raises(ConfigError, match="lr_schedule"):
        parse_config({"rewards": rewards, "train": {"lr_schedule": "exponential"}})
    with pytest.raises(ConfigError, match="lr_final_ratio"):
        parse_config({"rewards": rewards, "train": {"lr_final_ratio": 1.5}})


def test_the_learner_steps_at_the_scheduled_rate_and_a_resumed_one_keeps_to_it(
    tiny_sd15_dir, tmp_path, one_torch_thread
):
    config = parse_config(
        {
            "output_dir": str(tmp_path),
            "device": "cpu",
            "model": {"pretrained": str(tiny_sd15_dir)},
            "sampling": {"num_steps": 3, "batch_size": 2},
            "algorithm": {"name": "dde_single"},
            "rewards": [{"name": "jpeg_compressibility"}],
            "train": {"iterations": 4, "learning_rate": 1e-2, "lr_schedule": "linear", "train_batch_size": 2},
            "prompts": {"train": {"inline": ["a cat", "a dog"]}},
        }
    )
    learner = Learner(config, str(tiny_sd15_dir))
    side = learner.resolution // learner.model.vae_scale_factor
    shape = (2, learner.model.latent_channels, side, side)

    def batch() -> RolloutBatch:
        g = torch.Generator().manual_seed(3)
        pairs = FinalPairBatch(
            prompt_index=torch.arange(2), x0_w=torch.randn(shape, generator=g), x0_l=torch.randn(shape, generator=g)
        )
        out = RolloutBatch(prompts=["a cat", "a dog"], pairs=pairs, rewards=torch.zeros(2, 2))
        out.weights_version = learner.version
        return out

    seen = [learner.train(batch(), iteration=i).metrics["learning_rate"] for i in (0, 1)]  # 0-based, as the loop
    assert seen == pytest.approx([1e-2, 1e-2 * 2 / 3])
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 2 / 3)
    state = learner.state_dict()
    learner = Learner(config, str(tiny_sd15_dir))
    learner.load_state_dict(state)  # the saved optimizer carries the second iteration's rate; the third sets its own
    assert learner.train(batch(), iteration=2).metrics["learning_rate"] == pytest.approx(1e-2 / 3)
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 / 3)


def test_a_run_logs_its_schedule_from_the_first_to_the_last_iteration(tiny_sd15_dir, tmp_path, one_torch_thread):
    from rlhf_diffusion.testing import run_metrics, tiny_loop_trainer

    trainer = tiny_loop_trainer(
        tiny_sd15_dir,
        tmp_path,
        "linear",
        "dde_single",
        seed=0,
        num_steps=2,
        train={"iterations": 3, "learning_rate": 1e-3, "lr_schedule": "linear"},
        tracking={"enabled": False},
    )
    result = trainer.fit()
    rates = [r["train/learning_rate"] for r in run_metrics(result.run_dir) if "train/learning_rate" in r]
    assert rates == pytest.approx([1e-3, 5e-4, 0.0])

"""The shipped SD3.5 configs (configs/sd35_*.yaml) run their own settings on a tiny SD3.5-shaped pipeline for one
iteration in process: only the model, the sizes (steps, prompts, group), the reward weights (tiny PickScore /
aesthetic models of the real format), the resources and CPU-only options are overridden; the method, its
hyperparameters, the LoRA (rank, α, targets), the noise level and the optimizer are the config's."""

import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlhf_diffusion import testing
from rlhf_diffusion.config import load_config
from rlhf_diffusion.local_trainer import LocalTrainer
from rlhf_diffusion.models import LORA_WEIGHT_NAME, build_tiny_pipeline
from rlhf_diffusion.testing import run_metrics

ROOT = Path(__file__).resolve().parents[2]
REWARD_BUILDERS = {"pickscore": testing.build_tiny_pickscore, "aesthetic": testing.build_tiny_aesthetic}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sd35_dir(tmp_path_factory):
    return build_tiny_pipeline(tmp_path_factory.mktemp("sd35_configs"), "sd3", sd35=True)


@pytest.mark.parametrize(
    ("name", "sizes"),
    [
        ("sd35_flow_grpo", ["sampling.eval_num_steps=2", "algorithm.group_size=3"]),
        ("sd35_tailorpo", []),
        ("sd35_dde", []),
    ],
)
def test_the_sd35_config_trains_the_tiny_sd35_pipeline_for_one_iteration(sd35_dir, tmp_path, name, sizes):
    path = ROOT / "configs" / f"{name}.yaml"
    shipped = load_config(path)
    reward = shipped.rewards[0].name
    reward_dir = REWARD_BUILDERS[reward](tmp_path / reward)
    config = load_config(
        path,
        [
            f"model.pretrained={sd35_dir}",
            "model.resolution=null",  # the tiny pipeline's 64 px
            f"output_dir={tmp_path}",
            "device=cpu",
            "sampling.num_steps=3",
            "sampling.batch_size=2",
            *sizes,
            f"rewards.0.path={reward_dir}",
            "resources={num_samplers: 1, num_learners: 1, cpus_per_actor: 1}",
            "train.iterations=1",
            "train.mixed_precision=no",  # fp16 autocast is CUDA only
            "train.signal_every=0",
            "train.ema_every=1",  # sd35_flow_grpo's average (every 8 steps) would not move in one iteration
            "prompts.train={inline: [a cat, a dog]}",
            "prompts.eval={inline: [a cow]}",
            "prompts.eval_seeds=1",
            "tracking.enabled=false",
        ],
    )
    # the config's own method settings reach the run unchanged
    assert config.algorithm == shipped.algorithm.model_copy(update={"group_size": 3} if sizes else {})
    assert config.model.lora == shipped.model.lora and config.train.learning_rate == shipped.train.learning_rate
    assert config.sampling.flow_noise_level == shipped.sampling.flow_noise_level > 0
    result = LocalTrainer(config, log=lambda *_: None).fit()
    records = [r for r in run_metrics(result.run_dir) if "train/loss" in r]
    assert [r["iteration"] for r in records] == [1.0]
    assert math.isfinite(records[0]["train/loss"]) and records[0]["train/optimizer_steps"] >= 1
    saved = load_file(result.run_dir / "lora" / LORA_WEIGHT_NAME)
    assert any(".attn.add_q_proj.lora_B" in key for key in saved)  # the text stream is adapted too
    assert not any(".attn2." in key for key in saved)  # SD3.5's second attention is not (flow_grpo's targets)
    b_weights = [v for k, v in saved.items() if "lora_B" in k]
    assert max(v.abs().max().item() for v in b_weights) > 0  # B starts at 0: the LoRA changed

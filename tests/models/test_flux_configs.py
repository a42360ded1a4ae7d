"""configs/flux_dde.yaml validates as shipped (FLUX.1-dev's hub id, nothing fetched) and runs its own settings on the
tiny FLUX.1-dev-shaped pipeline (`tiny:flux`) for one iteration in process: only the model, the sizes (steps,
prompts), the reward weights (a tiny PickScore of the real format), the resources and CPU-only options are
overridden; the method, its hyperparameters, the LoRA (rank, α, targets), the noise level, the CFG weight and the
optimizer are the config's."""

import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from rlhf_diffusion import testing
from rlhf_diffusion.config import load_config
from rlhf_diffusion.local_trainer import LocalTrainer
from rlhf_diffusion.models import LORA_WEIGHT_NAME
from rlhf_diffusion.testing import run_metrics

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "flux_dde.yaml"

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_the_flux_config_validates_as_shipped():
    config = load_config(CONFIG)
    assert config.model.pretrained == "black-forest-labs/FLUX.1-dev" and config.model.resolution == 512
    assert config.algorithm.name == "dde" and config.sampling.guidance_scale == 1.0
    assert config.sampling.flow_noise_level > 0 and config.train.gradient_checkpointing


def test_the_flux_config_trains_the_tiny_flux_pipeline_for_one_iteration(tmp_path):
    shipped = load_config(CONFIG)
    reward_dir = testing.build_tiny_pickscore(tmp_path / "pickscore")
    config = load_config(
        CONFIG,
        [
            "model.pretrained=tiny:flux",
            "model.resolution=null",  # the tiny pipeline's 64 px
            f"output_dir={tmp_path}",
            "device=cpu",
            "sampling.num_steps=3",
            "sampling.batch_size=2",
            f"rewards.0.path={reward_dir}",
            "resources={num_samplers: 1, num_learners: 1, cpus_per_actor: 1}",
            "train.iterations=1",
            "train.signal_every=0",
            "prompts.train={inline: [a cat, a dog]}",
            "prompts.eval={inline: [a cow]}",
            "prompts.eval_seeds=1",
            "tracking.enabled=false",
        ],
    )
    # the config's own method settings reach the run unchanged
    assert config.algorithm == shipped.algorithm and config.model.lora == shipped.model.lora
    assert config.train.learning_rate == shipped.train.learning_rate and config.train.gradient_checkpointing
    assert config.sampling.flow_noise_level == shipped.sampling.flow_noise_level > 0
    assert config.sampling.guidance_scale == shipped.sampling.guidance_scale
    result = LocalTrainer(config, log=lambda *_: None).fit()
    records = [r for r in run_metrics(result.run_dir) if "train/loss" in r]
    assert [r["iteration"] for r in records] == [1.0]
    assert math.isfinite(records[0]["train/loss"]) and records[0]["train/optimizer_steps"] >= 1
    assert (tmp_path / "_tiny_models" / "flux" / "model_index.json").is_file()  # tiny:flux was built there
    saved = load_file(result.run_dir / "lora" / LORA_WEIGHT_NAME)
    assert any(k.startswith("transformer.transformer_blocks.0.attn.add_q_proj.lora_B") for k in saved)  # text stream
    assert any(k.startswith("transformer.single_transformer_blocks.0.attn.to_q.lora_B") for k in saved)
    assert max(v.abs().max().item() for k, v in saved.items() if "lora_B" in k) > 0  # B starts at 0: the LoRA changed

"""Full-UNet fine-tuning (`model.finetune: full`, DDE's setting): the learner trains every UNet weight against a
frozen reference copy, samplers receive the whole UNet, the run exports a diffusers `unet/` directory that a stock
pipeline loads, checkpoints resume; and the same loop runs with a 2-rank data-parallel learner on Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from rlhf_diffusion.checkpoint import latest_checkpoint
from rlhf_diffusion.config import parse_config
from rlhf_diffusion.trainer import Trainer


def full_config(model_dir: Path, output_dir: Path, run_name: str, **resources):
    return parse_config(
        {
            "run_name": run_name,
            "seed": 4,
            "output_dir": str(output_dir),
            "device": "cpu",
            "model": {"pretrained": str(model_dir), "finetune": "full"},
            "sampling": {"num_steps": 3, "batch_size": 2},
            "algorithm": {"name": "dde", "correction": "ema"},
            "rewards": [{"name": "jpeg_compressibility"}],
            "resources": {"cpus_per_actor": 0.5, **resources},
            "train": {"iterations": 2, "learning_rate": 1e-4, "train_batch_size": 2},
            "prompts": {
                "train": {"inline": ["a cat", "a dog", "a fox"]},
                "eval": {"inline": ["a cow"]},
                "eval_seeds": 1,
            },
            "tracking": {"enabled": False},
            "checkpoint": {"every": 1, "keep_last": 2},
        }
    )


def unet_weights(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().float().clone() for k, v in unet.state_dict().items()}


def test_full_finetune_trains_every_weight_and_exports_a_stock_unet(tiny_sd15_dir, tmp_path, one_torch_thread):
    base = unet_weights(UNet2DConditionModel.from_pretrained(tiny_sd15_dir, subfolder="unet"))
    trainer = Trainer(full_config(tiny_sd15_dir, tmp_path, "full"), use_ray=False, log=lambda *_: None)
    model = trainer.learner_obj.model
    assert model.reference_unet is not None and not any(p.requires_grad for p in model.reference_unet.parameters())
    assert all(p.requires_grad and p.dtype == torch.float32 for p in model.unet.parameters())
    result = trainer.fit()

    trained = unet_weights(model.unet)
    moved = [k for k in base if not torch.equal(base[k], trained[k])]
    assert len(moved) > 0.9 * len(base)  # full fine-tuning: (nearly) every tensor changed, not an adapter
    assert all(torch.equal(base[k], v) for k, v in unet_weights(model.reference_unet).items())  # reference frozen
    assert result.lora_file is None and result.unet_dir == tmp_path / "full" / "unet"
    # The export is a stock diffusers UNet directory: it loads into a stock pipeline and holds the trained weights.
    exported = UNet2DConditionModel.from_pretrained(result.unet_dir)
    assert all(torch.equal(trained[k], v) for k, v in unet_weights(exported).items())
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15_dir, unet=exported, safety_checker=None)
    image = pipe("a cat", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape[-1] == 3 and image.std() > 0
    assert (latest_checkpoint(tmp_path / "full" / "checkpoints") / "learner_unet.safetensors").is_file()

    # Resume from the iteration-1 checkpoint (as after a crash) and end at the same UNet.
    checkpoints = tmp_path / "full" / "checkpoints"
    (checkpoints / "latest").write_text("iter_000001\n")
    resumed = Trainer(full_config(tiny_sd15_dir, tmp_path, "full"), use_ray=False, resume=True, log=lambda *_: None)
    resumed.fit()
    again = unet_weights(resumed.learner_obj.model.unet)
    assert max((again[k] - trained[k]).abs().max().item() for k in trained) < 1e-6


@pytest.mark.ray
def test_two_learner_ranks_run_the_distributed_loop(ray_connected, tiny_sd15_dir, tmp_path):
    config = full_config(tiny_sd15_dir, tmp_path, "ddp", num_learners=2, num_samplers=1)
    trainer = Trainer(config, log=lambda *_: None)
    try:
        result = trainer.fit()
    finally:
        trainer.shutdown()
    lines = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [1, 2] and all(r["train/optimizer_steps"] >= 1 for r in lines)
    exported = UNet2DConditionModel.from_pretrained(result.unet_dir)
    base = unet_weights(UNet2DConditionModel.from_pretrained(tiny_sd15_dir, subfolder="unet"))
    assert any(not torch.equal(base[k], v) for k, v in unet_weights(exported).items())
    assert result.eval_after.mean == pytest.approx(json.loads((result.run_dir / "eval.json").read_text())["eval_after"])

"""Every method, 30 iterations on the tiny SD1.5- and SDXL-shaped pipelines: the held-out reward rises (where the
tiny model gives a signal above seed noise; see CASES).

The reward is the differentiable `saturation` pixel statistic (TailorPO-G needs a gradient; one reward keeps the
table comparable). Evaluation uses 4 held-out prompts × 4 fixed seeds, so "before" is the same number for every
method of a pipeline and the comparison is deterministic for the fixed run seed. Figures: benchmarks/tiny_learning.py.
"""

import sys
from pathlib import Path

import pytest

from rlhf_diffusion.config import load_config
from rlhf_diffusion.models.loading import get_lora_state_dict
from rlhf_diffusion.trainer import LocalTrainer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from tiny_learning import METHODS, learning_overrides  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny_learning.yaml"


# On the tiny random SD1.5 pipeline the final-image-pair methods (DDE, DDE-Single, Diffusion-DPO) move held-out
# saturation by less than the seed-to-seed noise (DDE, seeds 0/1/2: -0.0010 / +0.0004 / +0.0011), so a 30-iteration
# "it rises" assertion there would test the seed, not the method. Their optimisation is checked on a fixed batch in
# tests/algorithms/test_methods.py (one descent step lowers Δ_t); issue 6's pretrained testbed compares methods.
CASES = [(kind, method) for kind in ("sd15", "sdxl") for method in METHODS
         if not (kind == "sd15" and method in ("dde", "dde_single", "diffusion_dpo"))]


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "method"), CASES)
def test_thirty_iterations_raise_held_out_reward(kind, method, tmp_path):
    config = load_config(CONFIG, learning_overrides(kind, method, "saturation", 30, str(tmp_path)))
    trainer = LocalTrainer(config, log=lambda *_: None)
    result = trainer.fit()
    assert len(result.history) == 30
    assert all(r["train/optimizer_steps"] >= 1 for r in result.history)
    assert any(v.abs().max() > 0 for k, v in get_lora_state_dict(trainer.model.unet).items() if "lora_B" in k)
    assert result.eval_after.mean > result.eval_before.mean, (
        f"{kind}/{method}: held-out saturation {result.eval_before.mean:.5f} -> {result.eval_after.mean:.5f}"
    )
    assert (result.run_dir / "lora" / "pytorch_lora_weights.safetensors").exists()

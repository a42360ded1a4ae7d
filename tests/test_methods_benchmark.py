"""benchmarks/methods.py's budget accounting: the reward-scored images per iteration it computes from a config are
what the samplers measure (`rollout/reward_images_count`), for every method, so equal budgets are really equal."""

import sys
from pathlib import Path

import pytest

from rlhf_diffusion.config import load_config
from rlhf_diffusion.trainer import LocalTrainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from methods import METHODS, reward_images_per_iteration, unet_rows_per_iteration  # noqa: E402


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_reward_images_per_iteration_is_what_the_samplers_measure(method, tiny_sd15_dir, tmp_path):
    config = load_config(ROOT / "configs" / "tiny_learning.yaml", [
        f"model.pretrained={tiny_sd15_dir}", f"algorithm={{name: {method}}}", "rewards=[{name: saturation}]",
        "train.iterations=2", "sampling.batch_size=3", "sampling.num_steps=3", "resources.num_samplers=2",
        f"output_dir={tmp_path}", "prompts.eval.inline=[a fox]", "prompts.eval_seeds=1", "tracking.enabled=false",
        "checkpoint.every=0", "tracking.image_grid_every=0"])
    result = LocalTrainer(config, log=lambda *_: None).fit()
    expected = reward_images_per_iteration(config)
    assert [row["rollout/reward_images_count"] for row in result.history] == [expected, expected]
    # 3 prompts x 2 samplers: two final images per prompt, or n candidates (+ TailorPO-G's guided winner) per step
    assert expected == {"tailorpo": 6 * 3 * 2, "tailorpo_g": 6 * 3 * 3}.get(method, 2 * 6)
    assert unet_rows_per_iteration(config) == ({"tailorpo": 6 * (1 + 2 * 2), "tailorpo_g": 6 * (1 + 2 * 2)}
                                               .get(method, 2 * 6 * 3))

"""`sampling.eval_num_steps`: the held-out evaluation samples on its own number of steps, the rollouts on
`sampling.num_steps`."""

import torch

from rlhf_diffusion.diffusion.sampling import initial_noise, sample_trajectory
from rlhf_diffusion.testing import tiny_trainer


def _evaluation(trainer):
    return trainer.sampler.evaluate(["a cow", "a hen"], [0, 1], num_seeds=2)


def test_evaluation_uses_eval_num_steps_and_rollouts_num_steps(tiny_sd15_dir, tmp_path, one_torch_thread):
    mixed = tiny_trainer(tiny_sd15_dir, tmp_path / "a", "dde_single", num_steps=3, sampling={"eval_num_steps": 2})
    two = tiny_trainer(tiny_sd15_dir, tmp_path / "b", "dde_single", num_steps=2)
    three = tiny_trainer(tiny_sd15_dir, tmp_path / "c", "dde_single", num_steps=3)
    assert mixed.sampler.grid.num_steps == 3 and mixed.sampler.eval_grid.num_steps == 2
    assert three.sampler.eval_grid.num_steps == 3  # None: the rollouts' steps
    images = _evaluation(mixed).images
    assert torch.equal(images, _evaluation(two).images)
    assert not torch.allclose(images, _evaluation(three).images, atol=1e-3)
    # the rollouts still take num_steps: a plain trajectory of the mixed run has 3 transitions
    cond = mixed.encode(["a cat"])
    gen = torch.Generator().manual_seed(0)
    x_t = initial_noise(1, mixed.sampler.model, gen)
    trajectory = sample_trajectory(mixed.sampler.predictor, cond, x_t, mixed.sampler.grid, gen)
    assert trajectory.log_probs.shape == (1, 3)

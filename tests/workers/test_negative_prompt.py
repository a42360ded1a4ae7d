"""`sampling.negative_prompt`: the sampler (rollouts and held-out evaluation) and the learner's guided losses use it
in the CFG branch; None keeps the stock pipelines' empty prompt."""

import torch

from rlhf_diffusion.models import encode_negative
from rlhf_diffusion.testing import tiny_trainer


def test_the_negative_prompt_reaches_the_sampler_the_evaluation_and_the_learner(
    tiny_sd15_dir, tmp_path, one_torch_thread
):
    negative = "blurry, low quality"
    trainer = tiny_trainer(tiny_sd15_dir, tmp_path / "neg", "d3po", num_steps=2, sampling={"negative_prompt": negative})
    plain = tiny_trainer(tiny_sd15_dir, tmp_path / "plain", "d3po", num_steps=2)
    expected = encode_negative(trainer.sampler.model, 1, negative_prompt=negative).prompt_embeds
    for predictor in (trainer.sample_predictor, trainer.train_predictor):  # D3PO guides in training too
        assert predictor.negative_prompt == negative
        torch.testing.assert_close(predictor._uncond_row.prompt_embeds, expected, atol=0, rtol=0)
    assert plain.sample_predictor.negative_prompt is None
    images = trainer.sampler.evaluate(["a cow"], [0], num_seeds=1).images
    assert (images - plain.sampler.evaluate(["a cow"], [0], num_seeds=1).images).abs().max() > 1e-3

"""Held-out evaluation of an SD3 (flow-matching) model samples the ODE, the stock pipeline's sampler, as flow_grpo
evaluates (noise level 0), whatever noise level the rollouts use: a run's evaluation images (a sampler's
`evaluate`) equal a stock `StableDiffusion3Pipeline`'s with the same initial latents and the exported LoRA loaded,
do not depend on `sampling.flow_noise_level`, and `python -m rlhf_diffusion.evaluate` samples the same images from
the run's `lora/` (docs/algorithms.md §10(c))."""

import pytest
import torch
from diffusers import StableDiffusion3Pipeline

from rlhf_diffusion.config import RewardConfig
from rlhf_diffusion.diffusion.sampling import initial_noise
from rlhf_diffusion.evaluate import EvaluateError, PromptSet, evaluate, write_report
from rlhf_diffusion.evaluation import eval_generators
from rlhf_diffusion.models import export_lora
from rlhf_diffusion.testing import perturb_lora, tiny_trainer

PROMPTS = ["a cow", "a hen"]
SEEDS, STEPS, GUIDANCE = 2, 4, 2.0

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _trained_sampler(sd3_dir, out, noise_level):
    """A run's sampler at `noise_level` with a perturbed LoRA (the same one at every noise level)."""
    trainer = tiny_trainer(
        sd3_dir,
        out,
        {"name": "grpo", "group_size": 2},
        num_steps=3,
        sampling={"eval_num_steps": STEPS, "flow_noise_level": noise_level},
    )
    perturb_lora(trainer.sampler, seed=7, scale=0.05)
    return trainer.sampler


def test_sd3_evaluation_is_the_stock_pipelines_ode_and_ignores_the_rollout_noise_level(sd3_dir, tmp_path):
    sampler = _trained_sampler(sd3_dir, tmp_path / "a", 0.7)
    assert sampler.grid.noise_level == 0.7 and sampler.grid.num_steps == 3  # the rollouts: Flow-GRPO's SDE
    assert sampler.eval_grid.noise_level == 0.0 and sampler.eval_grid.num_steps == STEPS  # the evaluation: the ODE
    images = sampler.evaluate(PROMPTS, [0, 1], num_seeds=SEEDS).images
    lora_file = export_lora(sampler.model, tmp_path / "lora")

    pipe = StableDiffusion3Pipeline.from_pretrained(sd3_dir, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora_file.parent)
    for j, prompt in enumerate(PROMPTS):
        x_T = torch.cat([initial_noise(1, sampler.model, g) for g in eval_generators(j, SEEDS)])
        stock = pipe(
            [prompt] * SEEDS, num_inference_steps=STEPS, guidance_scale=GUIDANCE, latents=x_T, output_type="pt"
        ).images
        torch.testing.assert_close(images[j * SEEDS : (j + 1) * SEEDS], stock, atol=1e-4, rtol=0)

    other = _trained_sampler(sd3_dir, tmp_path / "b", 0.3)  # another rollout noise level: the same held-out images
    assert other.grid.noise_level == 0.3 and other.eval_grid.noise_level == 0.0
    torch.testing.assert_close(other.evaluate(PROMPTS, [0, 1], num_seeds=SEEDS).images, images, atol=1e-6, rtol=0)

    # the evaluate CLI's sampler: the run's LoRA file (transformer keys) gives the run's images, the base row the base
    result = evaluate(
        str(sd3_dir),
        PromptSet(source="inline", prompts=PROMPTS),
        [RewardConfig(name="brightness")],
        [("trained", lora_file)],
        seeds=SEEDS,
        steps=STEPS,
        guidance_scale=GUIDANCE,
        device="cpu",
        log=lambda *_: None,
    )
    assert result.settings["sampler"] == "flow_ode"
    torch.testing.assert_close(result.rows[1].images, images, atol=1e-4, rtol=0)
    assert (result.rows[0].images - images).abs().max() > 1e-3  # the LoRA changes them
    table = write_report(result, tmp_path / "report")["table"].read_text(encoding="utf-8")
    assert "flow-matching ODE (Euler, the stock pipeline's sampler) 4 steps" in table and "η" not in table


def test_evaluate_refuses_a_unet_lora_on_an_sd3_model_naming_the_file(sd3_dir, tmp_path, tiny_sd15_dir):
    trainer = tiny_trainer(tiny_sd15_dir, tmp_path / "sd15", "dde_single", num_steps=2)
    unet_lora = export_lora(trainer.sampler.model, tmp_path / "unet_lora")
    with pytest.raises(EvaluateError, match="a unet LoRA does not fit this sd3 model") as info:
        evaluate(
            str(sd3_dir),
            PromptSet(source="inline", prompts=PROMPTS[:1]),
            [RewardConfig(name="brightness")],
            [("unet", unet_lora)],
            seeds=1,
            steps=1,
            device="cpu",
            log=lambda *_: None,
        )
    assert str(unet_lora) in str(info.value)

"""CLIP score (rewards/clip_score.py): a tiny random CLIP saved as a Hugging Face model directory (model, tokenizer,
preprocessor config), loaded through the production code and checked against transformers' own CLIP path."""

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

from rlhf_diffusion.rewards import build_reward
from rlhf_diffusion.rewards.clip_score import ClipScore
from rlhf_diffusion.testing import build_tiny_clip_score, check_reward_gradients, random_images


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_clip_score(tmp_path_factory.mktemp("tiny_clip_score"))


@pytest.fixture(scope="module")
def reward(tiny_dir):
    return build_reward("clip_score", path=str(tiny_dir))


def _reference_cosine(tiny_dir, images, prompts):
    """cos(image, text) computed by transformers alone: CLIPImageProcessor (float input) + CLIPModel features."""
    model = CLIPModel.from_pretrained(tiny_dir).eval()
    tokenizer = CLIPTokenizer.from_pretrained(tiny_dir)
    processor = CLIPImageProcessor.from_pretrained(tiny_dir)
    pixel_values = processor(images=list(images), do_rescale=False, return_tensors="pt").pixel_values
    tokens = tokenizer(list(prompts), padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        img = model.get_image_features(pixel_values=pixel_values).pooler_output
        txt = model.get_text_features(input_ids=tokens.input_ids, attention_mask=tokens.attention_mask).pooler_output
    return torch.nn.functional.cosine_similarity(img, txt, dim=-1)


def test_score_is_100_times_transformers_cosine(tiny_dir, reward):
    images = random_images(3, 80, 64)
    prompts = ["a photo of a cat", "a red car, oil painting", "a photo of a cat"]
    expected = 100 * _reference_cosine(tiny_dir, images, prompts)
    torch.testing.assert_close(reward.score(images, prompts), expected, rtol=0, atol=1e-3)


def test_scale_and_nonnegative(tiny_dir, reward):
    images = random_images(4, seed=5)
    prompts = ["a", "b", "c", "d"]
    cosine = build_reward("clip_score", path=str(tiny_dir), scale=1.0).score(images, prompts)
    torch.testing.assert_close(reward.score(images, prompts), 100 * cosine, rtol=1e-5, atol=1e-5)
    hessel = ClipScore(path=str(tiny_dir), scale=2.5, nonnegative=True).score(images, prompts)
    torch.testing.assert_close(hessel, (2.5 * cosine).clamp(min=0), rtol=1e-5, atol=1e-6)
    for bad in (0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="scale must be a finite positive number"):
            ClipScore(path=str(tiny_dir), scale=bad)


def test_prompts_matter_and_repeated_prompts_share_embeddings(reward):
    image = random_images(1)
    scores = reward.score(image.expand(3, -1, -1, -1), ["a dog", "an astronaut riding a horse", "a dog"])
    assert scores[0] != scores[1]
    assert scores[0] == scores[2]


def test_gradients_are_finite_nonzero_and_per_image(reward):
    images = random_images(2)
    prompts = ["a cat", "a dog"]
    scores, grad = check_reward_gradients(reward, images, prompts)
    for i in range(2):  # batch of 2 == two batches of 1
        s_i, g_i = reward.score_and_grad(images[i : i + 1], prompts[i : i + 1])
        torch.testing.assert_close(s_i, scores[i : i + 1], rtol=0, atol=1e-4)
        torch.testing.assert_close(g_i, grad[i : i + 1], rtol=1e-4, atol=1e-6)


def test_long_prompts_are_truncated_to_77_tokens(reward):
    long_prompt = " ".join(["a very detailed painting of a castle"] * 30)  # ≈ 210 tokens
    assert torch.isfinite(reward.score(random_images(1), [long_prompt])).all()


def test_frozen_and_in_eval_mode(reward):
    assert all(not p.requires_grad for p in reward.model.parameters())
    assert not reward.model.training and not reward.image_encoder.training


def test_missing_path_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_clip"):
        ClipScore(path=str(tmp_path / "no_such_clip"))


def test_directory_without_a_model_raises_value_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot load a CLIPModel from .*empty"):
        ClipScore(path=str(tmp_path / "empty"))


def test_checkpoint_with_wrong_keys_raises_value_error(tiny_dir, tmp_path):
    bad_dir = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad_dir)
    weights = load_file(bad_dir / "model.safetensors")
    save_file(
        {k.replace("vision_model.", "image_tower."): v for k, v in weights.items()},
        bad_dir / "model.safetensors",
        metadata={"format": "pt"},
    )
    with pytest.raises(ValueError, match=r"does not match CLIPModel: \d+ missing"):
        ClipScore(path=str(bad_dir))

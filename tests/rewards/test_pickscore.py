"""PickScore (rewards/pickscore.py): a tiny random CLIP saved like `yuvalkirstain/PickScore_v1` plus its processor,
loaded through the production code and checked against the upstream README's recipe run on transformers alone."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import CLIPModel, CLIPProcessor

from rlhf_diffusion.rewards import build_reward
from rlhf_diffusion.rewards.pickscore import DEFAULT_MODEL, DEFAULT_PROCESSOR, PickScore
from rlhf_diffusion.testing import (
    build_tiny_pickscore,
    check_reward_batch_independence,
    check_reward_gradients,
    random_images,
)

PROMPTS = ["a photo of a cat", "a red car, oil painting"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_pickscore(tmp_path_factory.mktemp("tiny_pickscore"))


@pytest.fixture(scope="module")
def reward(tiny_dir):
    return build_reward("pickscore", path=str(tiny_dir))


@pytest.fixture(scope="module")
def reference(tiny_dir):
    return CLIPModel.from_pretrained(tiny_dir).eval(), CLIPProcessor.from_pretrained(tiny_dir)


def _readme_scores(reference, images, prompts, **image_kwargs):
    """The upstream README recipe, one (image, prompt) pair per row: processor → get_*_features → L2-normalise →
    logit_scale.exp() * dot. `images` is whatever the processor takes (float tensors need do_rescale=False)."""
    model, processor = reference
    pixel_values = processor(images=images, return_tensors="pt", **image_kwargs).pixel_values
    tokens = processor(text=prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        image_embs = model.get_image_features(pixel_values=pixel_values).pooler_output
        text_embs = model.get_text_features(**tokens).pooler_output
    image_embs = image_embs / image_embs.norm(dim=-1, keepdim=True)
    text_embs = text_embs / text_embs.norm(dim=-1, keepdim=True)
    return model.logit_scale.exp() * (image_embs * text_embs).sum(dim=-1)


def test_builder_writes_a_hub_style_model_and_processor(tiny_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        assert (tiny_dir / name).is_file()
    assert (tiny_dir / "processor_config.json").is_file() or (tiny_dir / "preprocessor_config.json").is_file()


def test_score_matches_readme_recipe_on_float_pixels(reward, reference):
    # Float input with do_rescale=False: transformers' processor is the same resize/crop/normalise (§1).
    images = torch.cat([random_images(2, 64, 64, seed=1), random_images(1, 64, 64, seed=2)])
    prompts = [*PROMPTS, "a photo of a cat"]
    expected = _readme_scores(reference, list(images), prompts, do_rescale=False)
    torch.testing.assert_close(reward.score(images, prompts), expected, rtol=1e-5, atol=1e-4)
    assert reward.model.logit_scale.exp().item() == pytest.approx(reference[0].logit_scale.exp().item())


def test_non_square_images_use_shortest_side_resize_and_centre_crop(reward, reference):
    images = random_images(2, 96, 64, seed=3)  # portrait: 224 × 336 after resizing, centre crop 224 × 224
    expected = _readme_scores(reference, list(images), PROMPTS, do_rescale=False)
    torch.testing.assert_close(reward.score(images, PROMPTS), expected, rtol=1e-5, atol=1e-4)


def test_preprocessing_parity_with_processor_on_uint8(reward, reference):
    """The README feeds PIL/uint8 images. The processor then resizes the uint8-valued image and our path resizes
    the same pixels / 255 in float; they differ only by rounding (docs/rewards.md §1: mean ≈ 0.004 in normalised
    units, measured 0.0046 here), so pixel values agree to ~1e-2 and scores, exp(logit_scale) ≈ 14.3 times a cosine
    that moves by < 1e-3, to 0.02 (measured ≤ 0.007)."""
    smooth = torch.nn.functional.interpolate(random_images(2, 8, 8, seed=4), size=(64, 64), mode="bilinear")
    pixels = (smooth * 255).round().to(torch.uint8)
    _, processor = reference
    processed = processor(images=list(pixels), return_tensors="pt").pixel_values
    ours = reward.preprocess(pixels.float() / 255)
    diff = (ours - processed).abs()
    assert diff.mean() < 0.01 and diff.max() < 0.05
    expected = _readme_scores(reference, list(pixels), PROMPTS)
    torch.testing.assert_close(reward.score(pixels.float() / 255, PROMPTS), expected, rtol=0, atol=0.02)


def test_gradients_are_finite_and_nonzero(reward):
    images = random_images(2, 48, 48)
    scores, _ = check_reward_gradients(reward, images, PROMPTS)
    torch.testing.assert_close(scores, reward.score(images, PROMPTS))


def test_batch_independence(reward):
    check_reward_batch_independence(reward, random_images(2, seed=5), PROMPTS)


def test_prompt_changes_the_score(reward):
    images = random_images(1, seed=6)
    a, b = reward.score(images, ["a photo of a cat"]), reward.score(images, ["a red car, oil painting"])
    assert (a - b).abs().item() > 1e-2


def test_defaults_and_weights_frozen(reward):
    assert (DEFAULT_MODEL, DEFAULT_PROCESSOR) == ("yuvalkirstain/PickScore_v1", "laion/CLIP-ViT-H-14-laion2B-s32B-b79K")
    assert reward.name == "pickscore" and reward.differentiable
    assert not any(p.requires_grad for p in reward.model.parameters()) and not reward.model.training


def test_separate_processor_dir(tiny_dir, tmp_path, reward):
    # Like the real release: a model directory without tokenizer + the LAION processor elsewhere.
    model_dir, processor_dir = tmp_path / "model", tmp_path / "processor"
    model_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_dir / name, model_dir / name)
    CLIPProcessor.from_pretrained(tiny_dir).save_pretrained(processor_dir)
    separate = build_reward("pickscore", path=str(model_dir), processor_path=str(processor_dir))
    images = random_images(2, seed=7)
    torch.testing.assert_close(separate.score(images, PROMPTS), reward.score(images, PROMPTS))


def test_processor_with_other_image_settings_is_rejected(tiny_dir, tmp_path):
    processor = CLIPProcessor.from_pretrained(tiny_dir)
    processor.image_processor.crop_size = {"height": 256, "width": 256}
    processor.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"does not match PickScore's preprocessing: crop_size=\(256, 256\)"):
        PickScore(path=str(tiny_dir), processor_path=str(tmp_path))


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PickScore(path=str(tmp_path / "no_such_dir"))
    with pytest.raises(ValueError, match="cannot load a CLIPModel from"):
        PickScore(path=str(tmp_path), processor_path=str(tmp_path))  # exists, but holds no model


def test_wrong_keys_are_rejected(tiny_dir, tmp_path):
    shutil.copytree(tiny_dir, tmp_path, dirs_exist_ok=True)
    weights = load_file(tmp_path / "model.safetensors")
    weights["visual_projection.renamed"] = weights.pop("visual_projection.weight")
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"does not match CLIPModel: 1 missing.*visual_projection\.weight"):
        PickScore(path=str(tmp_path))


def test_unknown_kwarg_is_rejected(tiny_dir):
    with pytest.raises(ValueError, match="unknown argument"):
        build_reward("pickscore", path=str(tiny_dir), scale=100.0)
    config = json.loads((tiny_dir / "config.json").read_text())
    assert config["vision_config"]["image_size"] == 224

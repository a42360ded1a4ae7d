"""HPSv2 / v2.1 (rewards/hpsv2.py): a tiny random open_clip model saved as an open_clip model directory and as an
HPS-style checkpoint (`{'state_dict': ...}`, fp16), loaded through the production code and checked against
open_clip's own transforms and `encode_image` / `encode_text`."""

import shutil

import open_clip
import pytest
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, Normalize, Resize

from rlhf_diffusion.rewards import build_reward
from rlhf_diffusion.rewards import hpsv2 as hpsv2_module
from rlhf_diffusion.rewards.hpsv2 import HPSv2
from rlhf_diffusion.rewards.preprocess import CLIP_MEAN, CLIP_STD
from rlhf_diffusion.testing import build_tiny_hpsv2, check_reward_gradients, random_images, smooth_uint8_image

# open_clip's transform resizes PIL uint8 images (output rounded to whole grey levels), ours works on floats: they
# differ by up to ~1 grey level = 1/255/std ≈ 0.015 in normalised units (std ≥ 0.2613) and ~0.25 level on
# average. Bounds: 1.5 levels max, 0.5 level mean.
MAX_LEVEL_DIFF = 1.5 / 255 / 0.2613
MEAN_LEVEL_DIFF = 0.5 / 255 / 0.2613


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_hpsv2(tmp_path_factory.mktemp("tiny_hpsv2"))


@pytest.fixture(scope="module")
def reward(tiny_dir):
    return build_reward("hpsv2", path=str(tiny_dir))


@pytest.fixture(scope="module")
def open_clip_reference(tiny_dir):
    """The tiny model, its eval transform and tokenizer as open_clip itself loads them from the directory."""
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tiny_dir}")
    return model.eval(), preprocess, open_clip.get_tokenizer(f"local-dir:{tiny_dir}")


def test_score_is_raw_cosine_of_open_clip_features(reward, open_clip_reference):
    model, _, tokenizer = open_clip_reference
    images = random_images(3, 96, 96)
    prompts = ["a photo of a cat", "concept art of a castle", "a photo of a cat"]
    # Square images: HPS's ResizeMaxSize is a plain resize; here done by torchvision on tensors.
    pixels = Normalize(CLIP_MEAN, CLIP_STD)(Resize(224, InterpolationMode.BICUBIC, antialias=True)(images))
    with torch.no_grad():
        image_features = model.encode_image(pixels, normalize=True)
        text_features = model.encode_text(tokenizer(prompts), normalize=True)
    expected = (image_features * text_features).sum(dim=-1)
    torch.testing.assert_close(reward.score(images, prompts), expected, rtol=0, atol=1e-5)


def test_preprocess_matches_open_clip_transform_on_pil(reward, open_clip_reference):
    _, preprocess, _ = open_clip_reference  # resize longest side + zero pad (the tiny config's HPS preprocessing)
    for h, w in [(64, 64), (60, 90), (91, 61), (300, 451)]:
        pixels = smooth_uint8_image(h, w)
        official = preprocess(Image.fromarray(pixels.permute(1, 2, 0).numpy()))[None]  # (1, 3, 224, 224)
        ours = reward.preprocess(pixels.float()[None] / 255)
        assert ours.shape == official.shape == (1, 3, 224, 224)
        diff = (ours - official).abs()
        assert diff.max() < MAX_LEVEL_DIFF and diff.mean() < MEAN_LEVEL_DIFF, (h, w, diff.max(), diff.mean())
    # the padding is black before normalisation, i.e. -mean/std after it
    padded = reward.preprocess(torch.ones(1, 3, 40, 80))
    torch.testing.assert_close(padded[0, :, 0, 0], -torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD))


def test_prompts_matter_and_repeated_prompts_share_embeddings(reward):
    image = random_images(1)
    scores = reward.score(image.expand(3, -1, -1, -1), ["a dog", "an astronaut riding a horse", "a dog"])
    assert scores[0] != scores[1]
    assert scores[0] == scores[2]


def test_gradients_are_finite_nonzero_and_per_image(reward):
    images = random_images(2, 64, 48)
    prompts = ["a cat", "a dog"]
    scores, grad = check_reward_gradients(reward, images, prompts)
    for i in range(2):  # batch of 2 == two batches of 1
        s_i, g_i = reward.score_and_grad(images[i : i + 1], prompts[i : i + 1])
        torch.testing.assert_close(s_i, scores[i : i + 1], rtol=0, atol=1e-6)
        torch.testing.assert_close(g_i, grad[i : i + 1], rtol=1e-4, atol=1e-7)


def test_frozen_and_in_eval_mode(reward):
    assert all(not p.requires_grad for p in reward.model.parameters())
    assert not reward.model.training


def _hps_style_checkpoint(tiny_dir, file, prefix=""):
    """Writes the tiny weights the way HPS checkpoints are published: {'state_dict': ...}, fp16 ("compressed")."""
    state_dict = torch.load(tiny_dir / "open_clip_pytorch_model.bin", weights_only=True)
    torch.save({"state_dict": {prefix + k: v.half() for k, v in state_dict.items()}}, file)
    return file


@pytest.mark.parametrize("prefix", ["", "module."])
def test_hps_checkpoint_file(tiny_dir, reward, tmp_path, monkeypatch, prefix):
    file = _hps_style_checkpoint(tiny_dir, tmp_path / "HPS_v2.1_compressed.pt", prefix)
    # A bare checkpoint file is built as ViT-H-14; point the architecture at the tiny config instead.
    monkeypatch.setattr(hpsv2_module, "HPS_ARCHITECTURE", f"local-dir:{tiny_dir}")
    from_file = HPSv2(path=str(file))
    images, prompts = random_images(2), ["a", "b"]
    torch.testing.assert_close(from_file.score(images, prompts), reward.score(images, prompts), rtol=0, atol=2e-3)


def test_directory_with_hps_checkpoint_picks_the_versions_file(tiny_dir, reward, tmp_path):
    hps_dir = tmp_path / "hps"
    hps_dir.mkdir()
    shutil.copy(tiny_dir / "open_clip_config.json", hps_dir)
    _hps_style_checkpoint(tiny_dir, hps_dir / "HPS_v2.1_compressed.pt")
    images, prompts = random_images(2), ["a", "b"]
    from_dir = build_reward("hpsv2", path=str(hps_dir), version="v2.1")
    torch.testing.assert_close(from_dir.score(images, prompts), reward.score(images, prompts), rtol=0, atol=2e-3)
    with pytest.raises(FileNotFoundError, match=r"HPS_v2_compressed\.pt"):
        HPSv2(path=str(hps_dir), version="v2.0")


def test_missing_path_and_bad_directory_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="HPS_nowhere"):
        HPSv2(path=str(tmp_path / "HPS_nowhere.pt"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="open_clip_config.json"):
        HPSv2(path=str(tmp_path / "empty"))


def test_checkpoint_with_wrong_keys_raises_value_error(tiny_dir, tmp_path):
    bad_dir = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad_dir)
    weights = bad_dir / "open_clip_pytorch_model.bin"
    state_dict = torch.load(weights, weights_only=True)
    torch.save({k.replace("visual.", "vision."): v for k, v in state_dict.items()}, weights)
    with pytest.raises(ValueError, match=r"open_clip_pytorch_model\.bin.* 32 missing key.*visual\.class_embedding"):
        HPSv2(path=str(bad_dir))
    torch.save({"state_dict": {"visual.proj": torch.zeros(3, 3)}}, weights)  # right key, wrong shape
    with pytest.raises(ValueError, match=r"(?s)cannot load .*open_clip_pytorch_model\.bin.*size mismatch"):
        HPSv2(path=str(bad_dir))


def test_invalid_version_and_dtype(tiny_dir):
    with pytest.raises(ValueError, match="version must be one of 'v2.0', 'v2.1'"):
        HPSv2(path=str(tiny_dir), version="v3")
    with pytest.raises(ValueError, match="dtype must be one of"):
        HPSv2(path=str(tiny_dir), dtype="half")


def test_bfloat16_gives_close_scores(tiny_dir, reward):
    images, prompts = random_images(2), ["a", "b"]
    bf16 = HPSv2(path=str(tiny_dir), dtype="bfloat16")
    scores, grad = bf16.score_and_grad(images, prompts)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    torch.testing.assert_close(scores, reward.score(images, prompts), rtol=0, atol=2e-2)

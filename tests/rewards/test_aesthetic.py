"""LAION aesthetic predictor v2 (rewards/aesthetic.py): a tiny random CLIP + random MLP head, saved in the real
formats (Hugging Face `CLIPModel` directory, `sac+logos+ava1-l14-linearMSE.pth` state dict), loaded through the
production code and checked against a hand-computed reference."""

import shutil

import pytest
import torch
from PIL import Image
from transformers import CLIPImageProcessor, CLIPModel

from rlhf_diffusion.rewards import build_reward
from rlhf_diffusion.rewards.aesthetic import MLP_FILENAMES, Aesthetic
from rlhf_diffusion.testing import (
    build_tiny_aesthetic,
    build_tiny_clip_score,
    check_reward_gradients,
    random_images,
    smooth_uint8_image,
)

# Layer names and weight shapes of the real `sac+logos+ava1-l14-linearMSE.pth` (docs/rewards.md §2.1).
REAL_MLP_SHAPES = {
    "layers.0.weight": (1024, 768),
    "layers.0.bias": (1024,),
    "layers.2.weight": (128, 1024),
    "layers.2.bias": (128,),
    "layers.4.weight": (64, 128),
    "layers.4.bias": (64,),
    "layers.6.weight": (16, 64),
    "layers.6.bias": (16,),
    "layers.7.weight": (1, 16),
    "layers.7.bias": (1,),
}

# The official processor works on uint8 pixels (PIL input): its resize output is rounded to whole grey levels, ours
# is not, so the two differ by up to ~1 grey level = 1/255/std ≈ 0.015 in normalised units (std ≥ 0.2613), and by
# ~0.25 level on average (uniform rounding error). Bounds: 1.5 levels max, 0.5 level mean.
MAX_LEVEL_DIFF = 1.5 / 255 / 0.2613
MEAN_LEVEL_DIFF = 0.5 / 255 / 0.2613


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_aesthetic(tmp_path_factory.mktemp("tiny_aesthetic"))


@pytest.fixture(scope="module")
def reward(tiny_dir):
    return build_reward("aesthetic", path=str(tiny_dir))


def _manual_score(tiny_dir, pixel_values):
    """MLP(ê) with ê the L2-normalised `CLIPModel.get_image_features`, the MLP as explicit affine layers."""
    clip = CLIPModel.from_pretrained(tiny_dir).eval()
    with torch.no_grad():
        embeds = clip.get_image_features(pixel_values=pixel_values).pooler_output  # (N, 768)
    x = embeds / embeds.norm(dim=-1, keepdim=True)
    sd = torch.load(tiny_dir / MLP_FILENAMES[0], weights_only=True)
    for i in (0, 2, 4, 6, 7):  # dropout layers 1, 3, 5 are identities in eval mode; no activations
        x = x @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    return x[:, 0]


def test_tiny_head_has_the_real_file_layout(tiny_dir):
    state_dict = torch.load(tiny_dir / "sac+logos+ava1-l14-linearMSE.pth", weights_only=True)
    assert {k: tuple(v.shape) for k, v in state_dict.items()} == REAL_MLP_SHAPES
    assert all(v.dtype == torch.float32 for v in state_dict.values())


def test_score_matches_manual_reference(tiny_dir, reward):
    images = random_images(3, 64, 96)
    # Reference pixels from the official processor on float input (exact there, docs/rewards.md §1).
    processor = CLIPImageProcessor.from_pretrained(tiny_dir)
    pixel_values = processor(images=list(images), do_rescale=False, return_tensors="pt").pixel_values
    expected = _manual_score(tiny_dir, pixel_values)
    torch.testing.assert_close(reward.score(images, ["a", "b", "c"]), expected, rtol=0, atol=1e-5)


def test_preprocess_matches_official_processor_on_pil(tiny_dir, reward):
    processor = CLIPImageProcessor.from_pretrained(tiny_dir)
    for h, w in [(64, 64), (60, 90), (300, 451)]:
        pixels = smooth_uint8_image(h, w)
        pil = Image.fromarray(pixels.permute(1, 2, 0).numpy())
        official = processor(images=pil, return_tensors="pt").pixel_values  # (1, 3, 224, 224)
        ours = reward.preprocess(pixels.float()[None] / 255)
        assert ours.shape == official.shape == (1, 3, 224, 224)
        diff = (ours - official).abs()
        assert diff.max() < MAX_LEVEL_DIFF and diff.mean() < MEAN_LEVEL_DIFF, (h, w, diff.max(), diff.mean())


def test_gradients_are_finite_nonzero_and_per_image(reward):
    images = random_images(2)
    scores, grad = check_reward_gradients(reward, images, ["x", "y"])
    torch.testing.assert_close(scores, reward.score(images, ["x", "y"]), rtol=0, atol=1e-6)
    # batch of 2 == two batches of 1, for scores and gradients
    for i in range(2):
        s_i, g_i = reward.score_and_grad(images[i : i + 1], ["x"])
        torch.testing.assert_close(s_i, scores[i : i + 1], rtol=0, atol=1e-5)
        torch.testing.assert_close(g_i, grad[i : i + 1], rtol=1e-4, atol=1e-7)


def test_prompts_are_ignored_and_images_matter(reward):
    images = random_images(1).expand(2, -1, -1, -1)
    a, b = reward.score(images, ["a cat", "a completely different prompt"])
    assert a == b
    s = reward.score(random_images(2, seed=3), ["p", "p"])
    assert s[0] != s[1]


def test_mlp_file_with_separate_clip_path(tiny_dir, reward):
    images = random_images(2)
    separate = Aesthetic(path=str(tiny_dir / MLP_FILENAMES[0]), clip_path=str(tiny_dir))
    torch.testing.assert_close(separate.score(images, ["", ""]), reward.score(images, ["", ""]), rtol=0, atol=0)


def test_frozen_and_in_eval_mode(reward):
    modules = [reward.mlp, reward.image_encoder]
    assert all(not p.requires_grad for m in modules for p in m.parameters())
    assert all(not m.training for m in modules)


def test_missing_path_raises_file_not_found(tmp_path):
    missing = tmp_path / "nowhere" / "sac+logos+ava1-l14-linearMSE.pth"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        Aesthetic(path=str(missing), clip_path=str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"sac\+logos\+ava1-l14-linearMSE\.pth"):
        Aesthetic(path=str(tmp_path / "empty"), clip_path=str(tmp_path))


def test_wrong_mlp_keys_raise_value_error_naming_the_file(tiny_dir, tmp_path):
    bad_dir = tmp_path / "bad"
    shutil.copytree(tiny_dir, bad_dir)
    state_dict = torch.load(bad_dir / MLP_FILENAMES[0], weights_only=True)
    renamed = {k.replace("layers.", "net."): v for k, v in state_dict.items()}
    torch.save(renamed, bad_dir / MLP_FILENAMES[0])
    with pytest.raises(ValueError, match=r"sac\+logos\+ava1-l14-linearMSE\.pth.*layers\.0\.weight"):
        Aesthetic(path=str(bad_dir))
    (bad_dir / MLP_FILENAMES[0]).write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match=r"cannot read aesthetic MLP file .*linearMSE\.pth"):
        Aesthetic(path=str(bad_dir))


def test_clip_with_wrong_projection_width_is_rejected(tiny_dir, tmp_path):
    clip16 = build_tiny_clip_score(tmp_path / "clip16")  # projection width 16, not 768
    with pytest.raises(ValueError, match="projection width 16"):
        Aesthetic(path=str(tiny_dir / MLP_FILENAMES[0]), clip_path=str(clip16))


def test_bfloat16_tower_gives_close_scores(tiny_dir, reward):
    images = random_images(2)
    bf16 = Aesthetic(path=str(tiny_dir), dtype="bfloat16")
    scores, grad = bf16.score_and_grad(images, ["a", "b"])
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    torch.testing.assert_close(scores, reward.score(images, ["a", "b"]), rtol=0, atol=2e-2)
    with pytest.raises(ValueError, match="dtype must be one of"):
        Aesthetic(path=str(tiny_dir), dtype="fp8")

"""Testbed training script (testbed/train.py): BPE merges, the world tokenizer, the built-in prompt sets, a
miniature end-to-end run whose outputs load through the stock and the production loaders, and the checker reward."""

from collections import Counter

import numpy as np
import pytest
import torch

from rlhf_diffusion.prompts import load_builtin
from rlhf_diffusion.rewards.base import build_reward
from rlhf_diffusion.testbed import train
from rlhf_diffusion.testbed.reward import CheckerReward
from rlhf_diffusion.testbed.world import as_float_tensor, enumerate_captions, parse_caption, render, split_captions


def test_bpe_merges_hand_derived():
    # ab -> (a, b</w>) x2, abc -> (a, b, c</w>) x1. Pair counts: (a, b</w>) 2, (a, b) 1, (b, c</w>) 1 -> merge
    # (a, b</w>); then (a, b) and (b, c</w>) tie at 1 -> the smaller pair (a, b); then (ab, c</w>).
    merges = train.learn_bpe_merges(Counter({"ab": 2, "abc": 1}))
    assert merges == [("a", "b</w>"), ("a", "b"), ("ab", "c</w>")]


def test_world_tokenizer_one_token_per_word_and_short():
    tok = train.build_world_tokenizer()
    assert len(tok) < 700
    for caption in enumerate_captions():
        ids = tok(caption).input_ids
        assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
        assert len(ids) == len(caption.split()) + 2 <= train.TOKENIZER_MAX_LENGTH
        assert tok.decode(ids, skip_special_tokens=True).strip() == caption
    assert tok("").input_ids == [tok.bos_token_id, tok.eos_token_id]


def test_builtin_prompt_sets_are_the_fixed_split():
    texts = train.prompt_set_texts()
    for name, text in texts.items():
        assert (train.PROMPT_SETS_DIR / f"{name}.txt").read_text() == text, f"regenerate {name}"
    tr, ho = split_captions(**train.PROMPT_SPLIT)
    assert load_builtin("testbed_train") == tr and load_builtin("testbed_heldout") == ho
    assert not set(tr) & set(ho)


@pytest.mark.slow
def test_miniature_training_run_loads_through_stock_and_production_code(tmp_path):
    from diffusers import StableDiffusionPipeline

    from rlhf_diffusion.models.loading import load_diffusion_model
    from rlhf_diffusion.rewards.clip_score import ClipScore

    s = train.TrainSettings(
        threads=1,  # the session's one thread (tests/conftest.py); train_testbed sets it for the whole process
        n_images=128,
        vae_steps=2,
        vae_batch=4,
        clip_steps=2,
        clip_batch=8,
        unet_steps=3,
        unet_batch=4,
        unet_warmup=1,
        eval_images_per_caption=1,
        eval_steps=1,
        log_every=1,
    )
    lines = []
    card = train.train_testbed(tmp_path, s, log=lines.append)
    assert {"data", "vae", "clip", "unet", "eval"} <= set(card)
    assert set(card["eval"]["checker_accuracy"]) >= {"background", "count", "colour", "shape", "all"}
    assert (tmp_path / "samples_before_alignment.png").exists()
    assert card["vae"]["scaling_factor"] > 0 and len(card["unet"]["loss_curve"]) == 3
    model = load_diffusion_model(str(tmp_path / "pipeline"))
    assert model.vae_scale_factor == 8 and model.resolution == 64
    assert model.unet.dtype == torch.float32  # stored in float16, loaded in the requested dtype
    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline")
    assert pipe.tokenizer.model_max_length == train.TOKENIZER_MAX_LENGTH
    reward = ClipScore(str(tmp_path / "clip"))
    scores = reward.score(torch.rand(2, 3, 64, 64), ["a red circle on the left on a white background"] * 2)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    # resuming: only the eval stage reruns, the trained parts are reused
    again = train.train_testbed(tmp_path, train.TrainSettings(**{**s.__dict__, "stages": ("eval",)}), log=lines.append)
    assert again["unet"] == card["unet"]


def _images(captions, seed=0):
    rng = np.random.default_rng(seed)
    return torch.stack([as_float_tensor(render(parse_caption(c), 64, rng)) for c in captions])


def test_checker_reward_scores_matching_and_mismatching_captions():
    caps = [
        "a red circle on the left on a white background",
        "two blue squares on a black background",
        "a green triangle and a yellow circle on a gray background",
    ]
    images = _images(caps)
    assert CheckerReward().score(images, caps).tolist() == [1.0, 1.0, 1.0]
    wrong = [
        "a red circle on the right on a white background",  # position wrong: 4 of 5 attributes
        "three blue squares on a black background",  # count wrong: 3 of 4
        "a green triangle and a yellow circle on a white background",
    ]  # background wrong: 4 of 5
    assert CheckerReward().score(images, wrong).tolist() == pytest.approx([4 / 5, 3 / 4, 4 / 5])
    assert CheckerReward(mode="all").score(images, wrong).tolist() == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="'a cat' is not a caption of the testbed world"):
        CheckerReward().score(images[:1], ["a cat"])
    with pytest.raises(ValueError, match="mode"):
        CheckerReward(mode="some")


def test_checker_reward_through_the_custom_reward_path():
    reward = build_reward("custom", target="rlhf_diffusion.testbed.reward:CheckerReward", mode="all")
    caps = ["a yellow square in the center on a black background"]
    assert reward.score(_images(caps), caps).tolist() == [1.0]
    assert not reward.differentiable


def test_unet_training_resumes_from_its_checkpoint_loaded_weights_only(tmp_path, monkeypatch):
    """The UNet stage's resume file holds only tensors, numbers and lists, so it is loaded with weights_only=True
    (no pickle code runs): a run of 2 steps, then the same run extended to 3 steps, resumes at step 2."""
    s = train.TrainSettings(n_images=16, unet_steps=2, unet_batch=4, unet_warmup=1, log_every=1)
    tokenizer = train.build_world_tokenizer()
    torch.manual_seed(0)
    vae = train.build_vae(s).eval()
    images, captions = train.render_dataset(16, s.size, seed=0)
    checkpoint = tmp_path / "unet_train.pt"
    train.train_unet(s, tokenizer, vae, images, captions, log=lambda *_: None, checkpoint=checkpoint)
    loads, load = [], torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: loads.append(kw.get("weights_only")) or load(*a, **kw))
    lines = []
    unet, _, card = train.train_unet(
        train.TrainSettings(**{**vars(s), "unet_steps": 3}),
        tokenizer,
        vae,
        images,
        captions,
        log=lines.append,
        checkpoint=checkpoint,
    )
    assert loads == [True]
    assert any("resumed at step 2" in line for line in lines)
    assert all(torch.isfinite(v).all() for v in unet.state_dict().values())

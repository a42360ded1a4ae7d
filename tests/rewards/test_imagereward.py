"""ImageReward (rewards/imagereward.py): a tiny random checkpoint in the official `ImageReward.pt` format, loaded
through the production code and checked against an independent re-implementation of upstream's forward pass that
reads the official key names directly."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import CenterCrop, Compose, InterpolationMode, Normalize, Resize, ToTensor
from transformers import BertTokenizer

from rlhf_diffusion.rewards import build_reward
from rlhf_diffusion.rewards.imagereward import (
    CHECKPOINT_FILENAME,
    CONFIG_FILENAME,
    DROPPED_OFFICIAL_KEYS,
    ImageReward,
    ImageRewardConfig,
    ImageRewardModel,
    convert_official_state_dict,
    hf_to_official_key,
    load_imagereward_tokenizer,
    official_to_hf_key,
)
from rlhf_diffusion.testing import (
    build_tiny_imagereward,
    check_reward_batch_independence,
    check_reward_gradients,
    random_images,
)

# Upstream constants (THUDM/ImageReward `ImageReward.py`: self.mean, self.std) and preprocessing (`_transform`).
UPSTREAM_MEAN = 0.16717362830052426
UPSTREAM_STD = 1.0333394966054072
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PROMPTS = ["a photo of a cat", "a red car, oil painting"]


def official_keys(vision_blocks: int, text_layers: int) -> set[str]:
    """Every key of upstream's `ImageReward` state dict, written out from its module tree: `blip` =
    BLIP_Pretrain(visual_encoder = timm-style VisionTransformer, text_encoder = med.py BertModel with
    cross-attention and no pooler, vision_proj, text_proj) and `mlp.layers` (Linear at 0, 2, 4, 6, 7)."""
    wb = ("weight", "bias")
    keys = {"blip.visual_encoder.cls_token", "blip.visual_encoder.pos_embed"}
    keys |= {f"blip.visual_encoder.patch_embed.proj.{p}" for p in wb}
    keys |= {
        f"blip.visual_encoder.blocks.{i}.{m}.{p}"
        for i in range(vision_blocks)
        for m in ("norm1", "attn.qkv", "attn.proj", "norm2", "mlp.fc1", "mlp.fc2")
        for p in wb
    }
    keys |= {f"blip.visual_encoder.norm.{p}" for p in wb}
    t = "blip.text_encoder."
    keys |= {
        t + "embeddings.position_ids",
        t + "embeddings.word_embeddings.weight",
        t + "embeddings.position_embeddings.weight",
    } | {t + f"embeddings.LayerNorm.{p}" for p in wb}
    keys |= {
        t + f"encoder.layer.{i}.{a}.{m}.{p}"
        for i in range(text_layers)
        for a in ("attention", "crossattention")
        for m in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm")
        for p in wb
    }
    keys |= {
        t + f"encoder.layer.{i}.{m}.{p}"
        for i in range(text_layers)
        for m in ("intermediate.dense", "output.dense", "output.LayerNorm")
        for p in wb
    }
    keys |= {f"blip.{proj}.{p}" for proj in ("vision_proj", "text_proj") for p in wb}
    keys |= {f"mlp.layers.{j}.{p}" for j in (0, 2, 4, 6, 7) for p in wb}
    return keys


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_imagereward(tmp_path_factory.mktemp("tiny_imagereward"))


@pytest.fixture(scope="module")
def reward(tiny_dir):
    return build_reward("imagereward", path=str(tiny_dir))


@pytest.fixture(scope="module")
def tiny_config(tiny_dir):
    return ImageRewardConfig.from_json_file(tiny_dir / CONFIG_FILENAME)


def _official_forward(sd, config, pixel_values, input_ids, attention_mask):
    """Upstream's `ImageReward.score` written out with torch.nn.functional on the official state dict: BLIP ViT
    (pre-norm blocks, LayerNorm eps 1e-6, final norm on all tokens) → med BERT (post-norm, eps 1e-12, additive
    −10000 padding mask, cross-attention to every image token) → MLP on [CLS] → (raw − mean) / std."""

    def w(key):
        return sd[key].float()

    def ln(x, prefix, eps):
        return F.layer_norm(x, x.shape[-1:], w(prefix + ".weight"), w(prefix + ".bias"), eps)

    def lin(x, prefix):
        return F.linear(x, w(prefix + ".weight"), w(prefix + ".bias"))

    def heads(x, n):  # (N, T, D) -> (N, n, T, D / n)
        return x.unflatten(-1, (n, -1)).transpose(1, 2)

    # Vision transformer
    v = "blip.visual_encoder."
    x = (
        F.conv2d(
            pixel_values, w(v + "patch_embed.proj.weight"), w(v + "patch_embed.proj.bias"), stride=config.patch_size
        )
        .flatten(2)
        .transpose(1, 2)
    )  # (N, P, Dv)
    x = torch.cat([w(v + "cls_token").expand(x.shape[0], -1, -1), x], dim=1) + w(v + "pos_embed")
    hv = config.vision_num_heads
    for i in range(config.vision_num_layers):
        b = f"{v}blocks.{i}."
        q, k, val = lin(ln(x, b + "norm1", 1e-6), b + "attn.qkv").chunk(3, dim=-1)
        attn = (heads(q, hv) @ heads(k, hv).transpose(-1, -2) * (q.shape[-1] // hv) ** -0.5).softmax(-1)
        x = x + lin((attn @ heads(val, hv)).transpose(1, 2).flatten(2), b + "attn.proj")
        x = x + lin(F.gelu(lin(ln(x, b + "norm2", 1e-6), b + "mlp.fc1")), b + "mlp.fc2")
    image_embeds = ln(x, v + "norm", 1e-6)

    # BERT with cross-attention
    t = "blip.text_encoder."
    ht = config.text_num_heads
    h = (
        w(t + "embeddings.word_embeddings.weight")[input_ids]
        + w(t + "embeddings.position_embeddings.weight")[: input_ids.shape[1]]
    )
    h = ln(h, t + "embeddings.LayerNorm", 1e-12)
    pad_mask = (1.0 - attention_mask[:, None, None, :].float()) * -10000.0

    def attention(hidden, context, prefix, mask):
        q, k, val = (
            heads(lin(s, f"{prefix}.self.{n}"), ht)
            for s, n in ((hidden, "query"), (context, "key"), (context, "value"))
        )
        scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask
        ctx = (scores.softmax(-1) @ val).transpose(1, 2).flatten(2)
        return ln(lin(ctx, f"{prefix}.output.dense") + hidden, f"{prefix}.output.LayerNorm", 1e-12)

    for i in range(config.text_num_layers):
        b = f"{t}encoder.layer.{i}."
        h = attention(h, h, b + "attention", pad_mask)
        h = attention(h, image_embeds, b + "crossattention", 0.0)
        h = ln(lin(F.gelu(lin(h, b + "intermediate.dense")), b + "output.dense") + h, b + "output.LayerNorm", 1e-12)

    raw = h[:, 0]
    for j in (0, 2, 4, 6, 7):
        raw = lin(raw, f"mlp.layers.{j}")
    return (raw.squeeze(-1) - UPSTREAM_MEAN) / UPSTREAM_STD


def _official_inputs(tiny_dir, images, prompts):
    """Upstream's preprocessing on tensors (torchvision Resize(224, BICUBIC) + CenterCrop + Normalize) and its
    tokenizer (bert vocab + [DEC] + [ENC], max_length 35)."""
    transform = Compose(
        [
            Resize(224, interpolation=InterpolationMode.BICUBIC, antialias=True),
            CenterCrop(224),
            Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )
    tokenizer = BertTokenizer.from_pretrained(tiny_dir / "tokenizer")
    tokenizer.add_tokens(["[DEC]", "[ENC]"], special_tokens=True)
    tokens = tokenizer(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    return transform(images), tokens.input_ids, tokens.attention_mask


# --- checkpoint format and key map ------------------------------------------------------------------------------


def test_builder_writes_the_official_key_names(tiny_dir, tiny_config):
    state_dict = torch.load(tiny_dir / CHECKPOINT_FILENAME, weights_only=True)
    assert set(state_dict) == official_keys(tiny_config.vision_num_layers, tiny_config.text_num_layers)
    assert (tiny_dir / "tokenizer" / "vocab.txt").is_file()


def test_key_map_covers_every_official_key_and_every_model_weight():
    config = ImageRewardConfig(
        vision_hidden_size=8,
        vision_num_layers=2,
        vision_num_heads=2,
        vision_intermediate_size=8,
        vocab_size=16,
        text_hidden_size=8,
        text_num_layers=3,
        text_num_heads=2,
        text_intermediate_size=8,
        max_position_embeddings=40,
    )
    model_keys = set(ImageRewardModel(config).state_dict())
    mapped, dropped = {}, set()
    for key in official_keys(vision_blocks=2, text_layers=3):
        hf_key = official_to_hf_key(key)
        if hf_key is None:
            dropped.add(key)
        else:
            mapped[key] = hf_key
            assert hf_to_official_key(hf_key) == key  # the inverse map round-trips
    assert set(mapped.values()) == model_keys  # nothing left over, nothing missing
    assert len(set(mapped.values())) == len(mapped)  # injective
    assert dropped == {
        "blip.text_encoder.embeddings.position_ids",
        "blip.vision_proj.weight",
        "blip.vision_proj.bias",
        "blip.text_proj.weight",
        "blip.text_proj.bias",
    }
    assert len(DROPPED_OFFICIAL_KEYS) == 3
    # Spot checks of the renames that differ between timm/BLIP and transformers.
    assert (
        official_to_hf_key("blip.visual_encoder.blocks.1.attn.proj.bias")
        == "vision_model.encoder.layers.1.self_attn.projection.bias"
    )
    assert official_to_hf_key("blip.visual_encoder.norm.weight") == "vision_model.post_layernorm.weight"
    assert official_to_hf_key("blip.visual_encoder.pos_embed") == "vision_model.embeddings.position_embedding"
    with pytest.raises(KeyError):
        official_to_hf_key("blip.visual_encoder.blocks.0.attn.qkv.scale")


def test_unknown_keys_are_listed():
    with pytest.raises(ValueError, match=r"2 key\(s\) are not part of .*blip\.itm_head\.weight, visual\.proj"):
        convert_official_state_dict(
            {"visual.proj": torch.zeros(1), "blip.itm_head.weight": torch.zeros(1), "mlp.layers.0.bias": torch.zeros(1)}
        )


def test_default_config_is_the_real_architecture():
    with torch.device("meta"):
        model = ImageRewardModel()
    vision, text = model.vision_model.config, model.text_model.config
    assert (
        vision.hidden_size,
        vision.num_hidden_layers,
        vision.num_attention_heads,
        vision.patch_size,
        vision.image_size,
        vision.layer_norm_eps,
    ) == (1024, 24, 16, 16, 224, 1e-6)
    assert (
        text.hidden_size,
        text.num_hidden_layers,
        text.num_attention_heads,
        text.encoder_hidden_size,
        text.vocab_size,
        text.layer_norm_eps,
    ) == (768, 12, 12, 1024, 30524, 1e-12)
    # ViT-L/16 303,301,632 + BERT-base with cross-attention 141,977,088 + MLP 927,969 (counted from upstream's
    # layer shapes). With the dropped ITC projections (459,264) that is 447.67M fp32 params = the 1.79 GB file.
    assert sum(p.numel() for p in model.parameters()) == 446_206_689


# --- scores -----------------------------------------------------------------------------------------------------


def test_score_matches_upstream_forward_on_the_official_state_dict(tiny_dir, tiny_config, reward):
    images = torch.cat([random_images(2, 64, 64, seed=1), random_images(1, 64, 64, seed=2)])
    prompts = [*PROMPTS, "Sunset over the HOUSE!"]
    state_dict = torch.load(tiny_dir / CHECKPOINT_FILENAME, weights_only=True)
    with torch.no_grad():
        expected = _official_forward(state_dict, tiny_config, *_official_inputs(tiny_dir, images, prompts))
    scores = reward.score(images, prompts)
    torch.testing.assert_close(scores, expected, rtol=0, atol=1e-4)
    assert expected.std() > 0.05  # the tiny model is not blind to its inputs


def test_normalisation_constants(tiny_dir, reward):
    images = random_images(2)
    pixel_values = reward.preprocess(images)
    input_ids, attention_mask = reward.tokenize(PROMPTS)
    m = reward.model
    with torch.no_grad():
        image_embeds = m.vision_model(pixel_values=pixel_values).last_hidden_state
        cls = m.text_model(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds, is_decoder=False
        ).last_hidden_state[:, 0]
        raw = m.mlp(cls).squeeze(-1)
    torch.testing.assert_close(reward.score(images, PROMPTS), (raw - UPSTREAM_MEAN) / UPSTREAM_STD)


def test_preprocessing_matches_upstream_pil_transform(reward):
    """Upstream feeds a PIL image through Resize(224, BICUBIC) + CenterCrop + ToTensor + Normalize. PIL resizes in
    uint8, so its output is rounded to 1/255 (≤ 0.5/255/0.26 ≈ 0.0075 after normalisation, ≈ 0.004 on average)
    and clipped where bicubic overshoots; a smooth image (no overshoot) stays within two rounding steps."""
    smooth = F.interpolate(
        torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(3)), size=(80, 48), mode="bilinear"
    )
    pixels = (smooth * 255).round().to(torch.uint8)  # the same pixels for both paths
    pil = Image.fromarray(pixels[0].permute(1, 2, 0).numpy())
    upstream = Compose(
        [
            Resize(224, interpolation=InterpolationMode.BICUBIC),
            CenterCrop(224),
            ToTensor(),
            Normalize(CLIP_MEAN, CLIP_STD),
        ]
    )(pil)[None]
    ours = reward.preprocess(pixels.float() / 255)
    assert ours.shape == upstream.shape == (1, 3, 224, 224)
    diff = (ours - upstream).abs()
    assert diff.mean() < 0.008 and diff.max() < 0.03


def test_gradients_are_finite_and_nonzero(reward):
    images = random_images(2, 48, 48)
    scores, _ = check_reward_gradients(reward, images, PROMPTS)
    torch.testing.assert_close(scores, reward.score(images, PROMPTS))


def test_batch_independence(reward):
    check_reward_batch_independence(reward, random_images(2, seed=4), PROMPTS)


def test_prompt_and_image_change_the_score(reward):
    images = random_images(1, seed=5)
    a, b = reward.score(images, ["a photo of a cat"]), reward.score(images, ["a blue house with a tree"])
    assert (a - b).abs().item() > 1e-3
    other = reward.score(random_images(1, seed=6), ["a photo of a cat"])
    assert (a - other).abs().item() > 1e-3


# --- loading and errors -----------------------------------------------------------------------------------------


def test_loads_from_the_pt_file_with_explicit_tokenizer(tiny_dir, reward):
    from_file = ImageReward(path=str(tiny_dir / CHECKPOINT_FILENAME), tokenizer_path=str(tiny_dir / "tokenizer"))
    images = random_images(2, seed=7)
    torch.testing.assert_close(from_file.score(images, PROMPTS), reward.score(images, PROMPTS))
    assert not any(p.requires_grad for p in from_file.model.parameters()) and not from_file.model.training


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="ImageReward.pt"):
        ImageReward(path=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ImageReward(path=str(tmp_path / "nope" / "ImageReward.pt"))
    with pytest.raises(FileNotFoundError, match="tokenizer directory .*no_tokenizer"):
        load_imagereward_tokenizer(str(tmp_path / "no_tokenizer"))


def test_wrong_keys_are_listed(tiny_dir, tmp_path):
    state_dict = torch.load(tiny_dir / CHECKPOINT_FILENAME, weights_only=True)
    state_dict["blip.visual_encoder.blocks.0.attn.qkv_renamed.weight"] = state_dict.pop(
        "blip.visual_encoder.blocks.0.attn.qkv.weight"
    )
    torch.save(state_dict, tmp_path / CHECKPOINT_FILENAME)
    shutil.copy(tiny_dir / CONFIG_FILENAME, tmp_path / CONFIG_FILENAME)
    with pytest.raises(ValueError, match=r"not part of the official .*blocks\.0\.attn\.qkv_renamed\.weight"):
        ImageReward(path=str(tmp_path), tokenizer_path=str(tiny_dir / "tokenizer"))
    del state_dict["blip.visual_encoder.blocks.0.attn.qkv_renamed.weight"]
    torch.save(state_dict, tmp_path / CHECKPOINT_FILENAME)
    with pytest.raises(ValueError, match=r"1 weight\(s\) missing .*: blip\.visual_encoder\.blocks\.0\.attn\.qkv\.w"):
        ImageReward(path=str(tmp_path), tokenizer_path=str(tiny_dir / "tokenizer"))


def test_shape_mismatch_without_sidecar_names_the_config(tiny_dir, tmp_path):
    shutil.copy(tiny_dir / CHECKPOINT_FILENAME, tmp_path / CHECKPOINT_FILENAME)  # no imagereward_config.json
    with pytest.raises(ValueError, match=r"does not fit the architecture of the real model .*shape mismatch.*missing"):
        ImageReward(path=str(tmp_path), tokenizer_path=str(tiny_dir / "tokenizer"))
    (tmp_path / CONFIG_FILENAME).write_text(json.dumps({"vision_width": 32}))
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['vision_width'\]"):
        ImageReward(path=str(tmp_path), tokenizer_path=str(tiny_dir / "tokenizer"))


def test_build_reward_checks_kwargs(tiny_dir):
    with pytest.raises(ValueError, match="unknown argument"):
        build_reward("imagereward", path=str(tiny_dir), med_config="med_config.json")
    reward = build_reward("imagereward", path=str(tiny_dir), tokenizer_path=str(tiny_dir / "tokenizer"))
    assert reward.name == "imagereward" and reward.differentiable


def test_tokenizer_adds_upstream_special_tokens_and_checks_the_vocabulary(tiny_dir, tiny_config):
    tokenizer = load_imagereward_tokenizer(str(tiny_dir / "tokenizer"))
    base = len((tiny_dir / "tokenizer" / "vocab.txt").read_text().split())
    # As bert-base-uncased (30,522) + [DEC] 30522 + [ENC] 30523 = the model's 30,524.
    assert tokenizer.convert_tokens_to_ids(["[DEC]", "[ENC]"]) == [base, base + 1]
    assert len(tokenizer) == tiny_config.vocab_size
    ids = tokenizer(["a photo of a cat"], padding="max_length", truncation=True, max_length=35).input_ids[0]
    assert len(ids) == 35 and ids[0] == tokenizer.cls_token_id and tokenizer.sep_token_id in ids
    with pytest.raises(ValueError, match="but the ImageReward text encoder has 10"):
        load_imagereward_tokenizer(str(tiny_dir / "tokenizer"), vocab_size=10)


def test_bfloat16_towers_stay_close_to_float32(tiny_dir, reward):
    half = ImageReward(path=str(tiny_dir), dtype="bfloat16")
    assert half.model.vision_model.embeddings.patch_embedding.weight.dtype == torch.bfloat16
    assert half.model.mlp.layers[0].weight.dtype == torch.float32
    images = random_images(2, seed=8)
    torch.testing.assert_close(half.score(images, PROMPTS), reward.score(images, PROMPTS), rtol=0, atol=0.08)

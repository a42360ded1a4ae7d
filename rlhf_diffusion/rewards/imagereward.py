"""ImageReward v1.0 (THUDM/ImageReward, Xu et al. 2023): a BLIP-based human-preference reward (docs/rewards.md §2.2),
re-hosted on transformers' BLIP classes because the `image-reward` package does not import with transformers 5.

Real weights: hub repo `THUDM/ImageReward`, file `ImageReward.pt` (1.79 GB fp32 `torch.save`d state dict,
Apache-2.0; the default `path=None` downloads it with `hf_hub_download`). The repo's `med_config.json` is not
needed: its values are the code defaults of `ImageRewardConfig`. Tokenizer: BERT `bert-base-uncased`
(`vocab.txt`), extended with `[DEC]` and `[ENC]` (ids 30522, 30523) exactly as upstream's `init_tokenizer`.

Architecture (upstream `ImageReward.py` + `models/BLIP/*`):

    image (N, 3, H, W) in [0, 1]
      → resize shortest side to 224 (bicubic, antialiased) → centre crop 224 → OpenAI CLIP mean/std   (§1)
      → BLIP ViT-L/16 (`BlipVisionModel`: width 1024, 24 blocks, 16 heads, LayerNorm eps 1e-6)
      → image tokens (N, 197, 1024), after the final LayerNorm
    prompt → BERT tokens, padded/truncated to 35 ([CLS] … [SEP] [PAD] …)
      → BLIP "med" BERT (`BlipTextModel`: width 768, 12 layers, 12 heads, every layer with cross-attention
        to the image tokens, key/value Linear(1024 → 768); bidirectional self-attention, no pooler)
      → hidden state of [CLS] (N, 768)
      → MLP 768 → 1024 → 128 → 64 → 16 → 1 (dropouts, NO activations; same head as the aesthetic predictor)
      → raw (N,)

    imagereward = (raw − 0.16717362830052426) / 1.0333394966054072

The two constants are upstream's `self.mean` / `self.std`, which standardise the scores on the authors' data.
Value range: unbounded, "roughly standard normal" (upstream README; its examples score −2.0 … +0.6); SD1.5 on
generic prompts ≈ 0 to +0.3 (unverified estimate). Differentiable with respect to the pixels (the path ReFL
trains through).

Checkpoint format and key map: `ImageReward.pt` uses upstream's module names (`blip.visual_encoder.*` timm-style
ViT, `blip.text_encoder.*` BLIP med BERT, `mlp.layers.*`). `official_to_hf_key` renames each to this module's
`ImageRewardModel` names through the explicit table `IMAGEREWARD_KEY_MAP`; `DROPPED_OFFICIAL_KEYS` lists the keys
that are deliberately not loaded (with the reason). Any other key, and any weight the model lacks, is an error
that lists them (upstream loads with `strict=False` and would silently skip them).

Files, for a `path` that is a directory (or the directory of a `.pt` file):

    ImageReward.pt            the state dict (official key names); loaded with torch.load(weights_only=True)
    imagereward_config.json   optional sidecar: `ImageRewardConfig` fields (architecture sizes) that differ from
                              the real model; absent for the real checkpoint. Needed because attention head counts
                              cannot be inferred from tensor shapes. `testing.build_tiny_imagereward` writes one.
    tokenizer/                optional BERT tokenizer directory (`vocab.txt`, or `tokenizer.json`)

The tokenizer is taken from, in order: the `tokenizer_path` argument (a local directory or a hub id), the
`tokenizer/` folder next to the checkpoint, the hub id `bert-base-uncased` (found in the Hugging Face cache, e.g.
with `HF_HUB_OFFLINE=1`, or downloaded).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import BertTokenizer, BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

from rlhf_diffusion.models.sources import is_hub_id
from rlhf_diffusion.rewards.aesthetic import AestheticMLP
from rlhf_diffusion.rewards.base import RewardModel, register_reward
from rlhf_diffusion.rewards.clip_score import resolve_dtype
from rlhf_diffusion.rewards.preprocess import normalize, resize_shortest_and_center_crop

__all__ = [
    "CHECKPOINT_FILENAME",
    "CONFIG_FILENAME",
    "DEFAULT_REPO",
    "DEFAULT_TOKENIZER",
    "DROPPED_OFFICIAL_KEYS",
    "IMAGEREWARD_KEY_MAP",
    "MAX_PROMPT_TOKENS",
    "REWARD_MEAN",
    "REWARD_STD",
    "ImageReward",
    "ImageRewardConfig",
    "ImageRewardModel",
    "convert_official_state_dict",
    "hf_to_official_key",
    "load_imagereward_model",
    "load_imagereward_tokenizer",
    "official_to_hf_key",
]

DEFAULT_REPO = "THUDM/ImageReward"
CHECKPOINT_FILENAME = "ImageReward.pt"
CONFIG_FILENAME = "imagereward_config.json"
TOKENIZER_DIRNAME = "tokenizer"
DEFAULT_TOKENIZER = "bert-base-uncased"
# Upstream's `init_tokenizer` adds bos_token '[DEC]' then additional special token '[ENC]' (ids 30522, 30523 on
# bert-base-uncased's 30,522 tokens); prompts are tokenised with padding='max_length', truncation, max_length 35.
EXTRA_SPECIAL_TOKENS = ("[DEC]", "[ENC]")
MAX_PROMPT_TOKENS = 35
# Upstream `ImageReward.mean` / `ImageReward.std`: reward = (mlp(CLS) − REWARD_MEAN) / REWARD_STD.
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072


# --------------------------------------------------------------------------------------------------------------------
# Architecture
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImageRewardConfig:
    """Architecture sizes. The defaults are the real ImageReward v1.0 (BLIP ViT-L/16 @ 224 + BERT-base with
    cross-attention, `med_config.json`), so the real checkpoint needs no config file."""

    image_size: int = 224
    patch_size: int = 16
    vision_hidden_size: int = 1024
    vision_num_layers: int = 24
    vision_num_heads: int = 16
    vision_intermediate_size: int = 4096
    vision_layer_norm_eps: float = 1e-6  # timm ViT with partial(nn.LayerNorm, eps=1e-6)
    vocab_size: int = 30524  # bert-base-uncased 30,522 + [DEC] + [ENC]
    text_hidden_size: int = 768
    text_num_layers: int = 12
    text_num_heads: int = 12
    text_intermediate_size: int = 3072
    max_position_embeddings: int = 512
    text_layer_norm_eps: float = 1e-12
    pad_token_id: int = 0  # BERT [PAD]

    def vision_config(self) -> BlipVisionConfig:
        """The transformers config of the image tower (GELU, qkv bias, as BLIP's ViT)."""
        return BlipVisionConfig(
            hidden_size=self.vision_hidden_size,
            intermediate_size=self.vision_intermediate_size,
            num_hidden_layers=self.vision_num_layers,
            num_attention_heads=self.vision_num_heads,
            image_size=self.image_size,
            patch_size=self.patch_size,
            layer_norm_eps=self.vision_layer_norm_eps,
            hidden_act="gelu",
            attention_dropout=0.0,
        )

    def text_config(self) -> BlipTextConfig:
        """The transformers config of the text tower. `is_decoder=True` only makes every layer own a
        cross-attention block; the reward calls the model with `is_decoder=False` (bidirectional self-attention),
        which is BLIP's `mode='multimodal'` text encoder."""
        return BlipTextConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.text_hidden_size,
            encoder_hidden_size=self.vision_hidden_size,
            intermediate_size=self.text_intermediate_size,
            num_hidden_layers=self.text_num_layers,
            num_attention_heads=self.text_num_heads,
            max_position_embeddings=self.max_position_embeddings,
            layer_norm_eps=self.text_layer_norm_eps,
            hidden_act="gelu",
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            is_decoder=True,
            pad_token_id=self.pad_token_id,
            bos_token_id=None,
            eos_token_id=None,
            sep_token_id=None,
        )

    @classmethod
    def from_json_file(cls, file: str | Path) -> ImageRewardConfig:
        """Reads a sidecar JSON object of config fields (missing fields keep the real model's defaults).

        Raises:
            ValueError: the file is not a JSON object or has unknown fields (the message lists the known ones).
        """
        try:
            values = json.loads(Path(file).read_text())
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot read ImageReward config {str(file)!r}: {err}") from err
        known = {f.name for f in fields(cls)}
        if not isinstance(values, dict) or set(values) - known:
            unknown = sorted(set(values) - known) if isinstance(values, dict) else type(values).__name__
            raise ValueError(
                f"ImageReward config {str(file)!r} has unknown field(s) {unknown}; "
                f"known fields: {', '.join(sorted(known))}"
            )
        return cls(**values)

    def to_json_file(self, file: str | Path) -> None:
        """Writes every field as a JSON object."""
        Path(file).write_text(json.dumps(asdict(self), indent=2) + "\n")


class ImageRewardModel(nn.Module):
    """BLIP image encoder + BLIP text encoder with cross-attention + MLP head → standardised ImageReward.

    Parameter names (see `IMAGEREWARD_KEY_MAP` for the official ones): `vision_model.*` (`BlipVisionModel`),
    `text_model.*` (`BlipTextModel` without pooler), `mlp.layers.{0,2,4,6,7}.*`.
    """

    def __init__(self, config: ImageRewardConfig | None = None):
        super().__init__()
        self.config = config or ImageRewardConfig()
        self.vision_model = BlipVisionModel(self.config.vision_config())
        self.text_model = BlipTextModel(self.config.text_config(), add_pooling_layer=False)
        self.mlp = AestheticMLP(self.config.text_hidden_size)

    def forward(self, pixel_values: Tensor, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """Scores preprocessed images against tokenised prompts.

        Args:
            pixel_values: (N, 3, S, S) normalised pixels (S = `config.image_size`), in the towers' dtype.
            input_ids: (N, L) BERT token ids ([CLS] first).
            attention_mask: (N, L) 1 for tokens, 0 for padding.

        Returns:
            (N,) float32 standardised rewards (raw − REWARD_MEAN) / REWARD_STD.
        """
        image_embeds = self.vision_model(pixel_values=pixel_values).last_hidden_state  # (N, 1 + P, Dv)
        # No encoder attention mask: every image token is attended to (upstream passes all ones).
        text_states = self.text_model(
            input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image_embeds, is_decoder=False
        ).last_hidden_state
        raw = self.mlp(text_states[:, 0, :].float()).squeeze(-1)  # (N,) from the [CLS] state (N, Dt)
        return (raw - REWARD_MEAN) / REWARD_STD


# --------------------------------------------------------------------------------------------------------------------
# Official checkpoint key map
# --------------------------------------------------------------------------------------------------------------------

# (official `ImageReward.pt` key, `ImageRewardModel` key). `{i}` stands for a block/layer index, `{w}` for
# `weight` or `bias`. Upstream names: timm-style `VisionTransformer` (BLIP `models/vit.py`) under
# `blip.visual_encoder`, BLIP's `med.py` `BertModel(add_pooling_layer=False)` under `blip.text_encoder` (whose
# names transformers' `BlipTextModel` kept), and the MLP head `mlp.layers`.
_BERT_NAMES = (
    "embeddings.word_embeddings.weight",
    "embeddings.position_embeddings.weight",
    "embeddings.LayerNorm.{w}",
    *(
        f"encoder.layer.{{i}}.{block}.{name}.{{w}}"
        for block in ("attention", "crossattention")
        for name in ("self.query", "self.key", "self.value", "output.dense", "output.LayerNorm")
    ),
    "encoder.layer.{i}.intermediate.dense.{w}",
    "encoder.layer.{i}.output.dense.{w}",
    "encoder.layer.{i}.output.LayerNorm.{w}",
)
IMAGEREWARD_KEY_MAP: tuple[tuple[str, str], ...] = (
    ("blip.visual_encoder.cls_token", "vision_model.embeddings.class_embedding"),  # (1, 1, Dv)
    ("blip.visual_encoder.pos_embed", "vision_model.embeddings.position_embedding"),  # (1, 1 + P, Dv)
    ("blip.visual_encoder.patch_embed.proj.{w}", "vision_model.embeddings.patch_embedding.{w}"),  # Conv2d
    ("blip.visual_encoder.blocks.{i}.norm1.{w}", "vision_model.encoder.layers.{i}.layer_norm1.{w}"),
    ("blip.visual_encoder.blocks.{i}.attn.qkv.{w}", "vision_model.encoder.layers.{i}.self_attn.qkv.{w}"),
    ("blip.visual_encoder.blocks.{i}.attn.proj.{w}", "vision_model.encoder.layers.{i}.self_attn.projection.{w}"),
    ("blip.visual_encoder.blocks.{i}.norm2.{w}", "vision_model.encoder.layers.{i}.layer_norm2.{w}"),
    ("blip.visual_encoder.blocks.{i}.mlp.fc1.{w}", "vision_model.encoder.layers.{i}.mlp.fc1.{w}"),
    ("blip.visual_encoder.blocks.{i}.mlp.fc2.{w}", "vision_model.encoder.layers.{i}.mlp.fc2.{w}"),
    ("blip.visual_encoder.norm.{w}", "vision_model.post_layernorm.{w}"),
    *((f"blip.text_encoder.{name}", f"text_model.{name}") for name in _BERT_NAMES),
    ("mlp.layers.{i}.{w}", "mlp.layers.{i}.{w}"),
)
# Official keys that are deliberately not loaded: key template → reason.
DROPPED_OFFICIAL_KEYS: dict[str, str] = {
    "blip.text_encoder.embeddings.position_ids": "a persistent arange buffer in upstream's BERT; transformers "
    "rebuilds it (non-persistent)",
    "blip.vision_proj.{w}": "BLIP's image-text-contrastive image projection; not used by the ImageReward score",
    "blip.text_proj.{w}": "BLIP's image-text-contrastive text projection; not used by the ImageReward score",
}


def _template_regex(template: str) -> re.Pattern[str]:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{w\}", r"(?P<w>weight|bias)")
    return re.compile(pattern)


_FORWARD_RULES = tuple((_template_regex(official), hf) for official, hf in IMAGEREWARD_KEY_MAP)
_INVERSE_RULES = tuple((_template_regex(hf), official) for official, hf in IMAGEREWARD_KEY_MAP)
_DROPPED_RULES = tuple(_template_regex(template) for template in DROPPED_OFFICIAL_KEYS)


def official_to_hf_key(key: str) -> str | None:
    """Maps an official `ImageReward.pt` key to the `ImageRewardModel` key, by `IMAGEREWARD_KEY_MAP`.

    Returns:
        The model key, or None for a key in `DROPPED_OFFICIAL_KEYS` (deliberately not loaded).

    Raises:
        KeyError: `key` is not part of the official checkpoint format.
    """
    for regex, hf_template in _FORWARD_RULES:
        match = regex.fullmatch(key)
        if match:
            return hf_template.format(**match.groupdict())
    if any(regex.fullmatch(key) for regex in _DROPPED_RULES):
        return None
    raise KeyError(key)


def hf_to_official_key(key: str) -> str:
    """The inverse of `official_to_hf_key` on model keys (used to write checkpoints in the official format).

    Raises:
        KeyError: `key` is not an `ImageRewardModel` parameter name.
    """
    for regex, official_template in _INVERSE_RULES:
        match = regex.fullmatch(key)
        if match:
            return official_template.format(**match.groupdict())
    raise KeyError(key)


def convert_official_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Renames an official ImageReward state dict to `ImageRewardModel` keys, dropping `DROPPED_OFFICIAL_KEYS`.

    A leading `module.` (a checkpoint saved from a DistributedDataParallel wrapper) is stripped first.

    Raises:
        ValueError: some keys are not part of the official format (the message lists them).
    """
    if state_dict and all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module.") :]: v for k, v in state_dict.items()}
    converted, unknown = {}, []
    for key, value in state_dict.items():
        try:
            hf_key = official_to_hf_key(key)
        except KeyError:
            unknown.append(key)
            continue
        if hf_key is not None:
            converted[hf_key] = value
    if unknown:
        raise ValueError(
            f"{len(unknown)} key(s) are not part of the official ImageReward checkpoint format "
            f"(`blip.visual_encoder.*`, `blip.text_encoder.*`, `mlp.layers.*`): {_listed(unknown)}"
        )
    return converted


def _listed(keys: Sequence[str], limit: int = 10) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", … ({len(keys) - limit} more)" if len(keys) > limit else "")


# --------------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------------


def _resolve_checkpoint(path: str) -> Path:
    """`path` (the .pt file, a directory holding `ImageReward.pt`, or a hub repo id) → local checkpoint file."""
    local = Path(path).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        if (local / CHECKPOINT_FILENAME).is_file():
            return local / CHECKPOINT_FILENAME
        raise FileNotFoundError(f"ImageReward checkpoint {str(local / CHECKPOINT_FILENAME)!r} does not exist")
    if not is_hub_id(path):
        raise FileNotFoundError(
            f"ImageReward checkpoint {path!r} does not exist (expected the {CHECKPOINT_FILENAME} "
            "file, a directory holding it, or a hub id 'owner/name')"
        )
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(path, CHECKPOINT_FILENAME))
    except Exception as err:  # noqa: BLE001 - hub errors come in many types; one clear message for all
        raise FileNotFoundError(
            f"could not get {CHECKPOINT_FILENAME} from hub repo {path!r}: {type(err).__name__}: {err}"
        ) from err


def load_imagereward_model(path: str | Path, *, dtype: torch.dtype = torch.float32) -> ImageRewardModel:
    """Loads a frozen `ImageRewardModel` (eval mode, no parameter requires grad) from an official checkpoint.

    Args:
        path: `ImageReward.pt`, a directory holding it, or a hub repo id. The architecture is
            `ImageRewardConfig()` unless `imagereward_config.json` sits next to the checkpoint.
        dtype: dtype of the two transformer towers; the MLP head always runs in float32 (as upstream).

    Raises:
        FileNotFoundError: the checkpoint does not exist (the message names the file).
        ValueError: the file is not a readable state dict, has keys outside the official format, lacks weights
            of the model, or has shapes that do not fit the config (each message lists the keys).
    """
    file = _resolve_checkpoint(str(path))
    sidecar = file.parent / CONFIG_FILENAME
    config = ImageRewardConfig.from_json_file(sidecar) if sidecar.is_file() else ImageRewardConfig()
    try:
        state_dict = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling raises UnpicklingError, RuntimeError, EOFError, ...
        raise ValueError(f"cannot read ImageReward checkpoint {str(file)!r}: {type(err).__name__}: {err}") from err
    if not isinstance(state_dict, dict) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise ValueError(f"ImageReward checkpoint {str(file)!r} does not hold a state dict of tensors")
    try:
        converted = convert_official_state_dict(state_dict)
    except ValueError as err:
        raise ValueError(f"ImageReward checkpoint {str(file)!r}: {err}") from err

    _check_fits(converted, config, file, sidecar if sidecar.is_file() else None)
    model = ImageRewardModel(config)
    model.load_state_dict(converted, strict=True)
    model.vision_model.to(dtype)
    model.text_model.to(dtype)
    return model.eval().requires_grad_(False)


def _check_fits(converted: Mapping[str, Tensor], config: ImageRewardConfig, file: Path, sidecar: Path | None) -> None:
    """Compares the converted weights with the architecture of `config` (built on the meta device, so nothing is
    allocated) and raises one `ValueError` listing missing, unexpected and wrongly shaped weights by official name."""
    with torch.device("meta"):
        expected = {k: v.shape for k, v in ImageRewardModel(config).state_dict().items()}
    missing = [hf_to_official_key(k) for k in expected if k not in converted]
    unexpected = [hf_to_official_key(k) for k in converted if k not in expected]
    mismatched = [
        f"{hf_to_official_key(k)} {tuple(v.shape)} vs {tuple(expected[k])}"
        for k, v in converted.items()
        if k in expected and v.shape != expected[k]
    ]
    if not (missing or unexpected or mismatched):
        return
    where = repr(str(sidecar)) if sidecar else f"the real model (defaults; no {CONFIG_FILENAME} beside it)"
    problems = [
        f"{len(items)} {what}: {_listed(items, 5)}"
        for what, items in (
            ("shape mismatch(es) (checkpoint vs model)", mismatched),
            ("weight(s) missing from the checkpoint", missing),
            ("weight(s) the architecture lacks", unexpected),
        )
        if items
    ]
    raise ValueError(
        f"ImageReward checkpoint {str(file)!r} does not fit the architecture of {where}; " + "; ".join(problems)
    )


def _looks_local(source: str) -> bool:
    return Path(source).is_absolute() or source.startswith((".", "~")) or Path(source).expanduser().exists()


def load_imagereward_tokenizer(source: str, *, vocab_size: int | None = None) -> BertTokenizer:
    """Loads a BERT tokenizer (local directory or hub id) and adds `[DEC]`, `[ENC]` as upstream does.

    Args:
        source: directory with `vocab.txt` or `tokenizer.json`, or a hub id such as `bert-base-uncased`.
        vocab_size: the text tower's vocabulary size; the tokenizer must not produce larger ids.

    Raises:
        FileNotFoundError: `source` is a local path that does not exist.
        ValueError: no BERT tokenizer can be loaded from `source`, or it has more tokens than `vocab_size`.
    """
    if _looks_local(source) and not Path(source).expanduser().exists():
        raise FileNotFoundError(f"ImageReward tokenizer directory {source!r} does not exist")
    local = Path(source).expanduser()
    try:
        tokenizer = BertTokenizer.from_pretrained(str(local) if local.exists() else source)
    except Exception as err:  # noqa: BLE001 - tokenizer loading raises OSError, ValueError, hub errors, ...
        raise ValueError(f"cannot load a BERT tokenizer from {source!r}: {type(err).__name__}: {err}") from err
    vocab = tokenizer.get_vocab()
    tokenizer.add_tokens([t for t in EXTRA_SPECIAL_TOKENS if t not in vocab], special_tokens=True)
    if vocab_size is not None and len(tokenizer) > vocab_size:
        raise ValueError(
            f"tokenizer {source!r} has {len(tokenizer)} tokens (with {', '.join(EXTRA_SPECIAL_TOKENS)}) "
            f"but the ImageReward text encoder has {vocab_size}; use the checkpoint's tokenizer "
            "(bert-base-uncased for the real model)"
        )
    return tokenizer


# --------------------------------------------------------------------------------------------------------------------
# The reward
# --------------------------------------------------------------------------------------------------------------------


@register_reward("imagereward")
class ImageReward(RewardModel):
    """ImageReward v1.0: standardised BLIP preference score of (image, prompt), ≈ N(0, 1); differentiable.

    Args:
        path: `ImageReward.pt`, a directory holding it (plus optional `imagereward_config.json` and
            `tokenizer/`), or a hub repo id; None = `THUDM/ImageReward`.
        tokenizer_path: BERT tokenizer directory or hub id. None = the `tokenizer/` folder next to the
            checkpoint if there is one, else `bert-base-uncased`.
        dtype: dtype the two transformer towers run in ("float32", "bfloat16", "float16"); the MLP head and
            the preprocessing run in float32.

    Raises:
        FileNotFoundError: the checkpoint or a local tokenizer path does not exist (the message names it).
        ValueError: the checkpoint or tokenizer cannot be loaded or does not match (the message lists the keys);
            unknown `dtype`.
    """

    differentiable = True

    def __init__(self, path: str | None = None, *, tokenizer_path: str | None = None, dtype: str = "float32"):
        self.source = path if path is not None else DEFAULT_REPO
        torch_dtype = resolve_dtype(dtype)
        checkpoint = _resolve_checkpoint(self.source)
        self.model = load_imagereward_model(checkpoint, dtype=torch_dtype)
        if tokenizer_path is None:
            beside = checkpoint.parent / TOKENIZER_DIRNAME
            tokenizer_path = str(beside) if beside.is_dir() else DEFAULT_TOKENIZER
        self.tokenizer_source = tokenizer_path
        self.tokenizer = load_imagereward_tokenizer(tokenizer_path, vocab_size=self.model.config.vocab_size)

    @property
    def device(self) -> torch.device:
        return self.model.mlp.layers[0].weight.device

    def to(self, device: str | torch.device) -> ImageReward:
        self.model.to(device)
        return self

    def preprocess(self, images: Tensor) -> Tensor:
        """(N, 3, H, W) in [0, 1] → (N, 3, 224, 224) normalised float32 pixels (upstream's `Resize(224, BICUBIC)`,
        `CenterCrop(224)`, OpenAI CLIP mean/std), keeping the graph to `images`."""
        return normalize(resize_shortest_and_center_crop(images.float(), self.model.config.image_size))

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """N prompts → input_ids, attention_mask, each (N, 35) on the reward's device."""
        tokens = self.tokenizer(
            list(prompts), padding="max_length", truncation=True, max_length=MAX_PROMPT_TOKENS, return_tensors="pt"
        )
        return tokens.input_ids.to(self.device), tokens.attention_mask.to(self.device)

    def _score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        tower_dtype = self.model.vision_model.embeddings.patch_embedding.weight.dtype
        pixel_values = self.preprocess(images.to(self.device)).to(tower_dtype)  # (N, 3, 224, 224)
        input_ids, attention_mask = self.tokenize(prompts)  # (N, 35) each
        return self.model(pixel_values, input_ids, attention_mask)  # (N,)

    def __repr__(self) -> str:
        return f"ImageReward(path={self.source!r}, tokenizer_path={self.tokenizer_source!r})"

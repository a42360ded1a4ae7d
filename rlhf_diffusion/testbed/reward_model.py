"""A learned reward model of the testbed world (`testbed:reward`), as ImageReward / PickScore are for real images.

    rewards: [{name: testbed_reward, path: "testbed:reward"}]                   # differentiable, scores in [0, 1]
    python -m rlhf_diffusion.testbed.reward_model --out rlhf_diffusion/assets/testbed/reward   # ~30 min, 2 CPU cores

Why: the testbed CLIP (`clip_score` on "testbed:clip") orders two samples of one caption the way the world's checker
does on only ~70% of the pairs the checker tells apart, so RL toward it barely moves the checker. This model is
trained on the shipped pipeline's OWN samples labelled by the checker, so that RL methods can train on a learned
reward that agrees with the checker far better, while the checker itself stays held out as the gold judge.

What it predicts
----------------
For an image x and a caption c, the checker (`world.check`) returns a verdict per attribute the caption states
(background, count, colour, shape, position, binding); the reward it stands for is the fraction of stated
attributes that are right (`testbed.reward.CheckerReward`, mode "fraction"). The network has two heads:

    p_a(x, c) = sigmoid(attribute head)   P(attribute a is right | x, c), a = background ... binding
    q_a(c)    = sigmoid(stated head)      P(caption c states attribute a): a function of the caption ONLY

and the score is the expected fraction under the stated head,

    score(x, c) = sum_a q_a(c) p_a(x, c) / sum_a q_a(c)           in [0, 1]

The attribute heads are trained with binary cross-entropy on the checker's verdicts, masked to the attributes the
caption states; the stated head with binary cross-entropy on that mask (the keys of the checker's answer). The mask
is used at TRAINING time only: at scoring time the model reads nothing but the pixels and the caption's tokens (no
`parse_caption`, no checker), and the stated head, which sees only the caption, says which attributes count
(it is ~100% sure on every caption of the grammar: which attributes a caption states follows from its words; it
rather than a separately regressed fraction, so that the score stays the mean of interpretable per-attribute
probabilities). Two more training terms:

- ranking: a logistic loss -log sigmoid((score_i - score_j) / `rank_temperature`) over the pairs of a group that
  the checker's fraction orders (i better than j). A group is either several images of one caption (what a
  preference method compares) or one image with its own caption and one-attribute mutations of it (so that a
  wrong background, colour or shape costs reward although the pipeline's own samples rarely get those wrong: a
  model trained on own-caption samples only learned to ignore those words, and a policy could have drifted to
  wrong colours for free);
- reading: an auxiliary head on the visual features predicts what the checker's `world.detect` reads from the
  image alone (background, number of objects, colours present, shapes present, position of the largest object,
  (colour, shape) pairs present); this dense target trains the CNN far faster than the six verdicts (measured,
  1500 steps: 0.88 against 0.83 agreement on train-caption pairs). It is not part of the saved model.

Architecture (1.13M parameters, 4.5 MB in float32)
--------------------------------------------------
- caption: the world tokenizer (a CLIP BPE whose every word is one token, 16 tokens; a copy ships beside the
  weights) -> token + position embeddings -> a 2-layer pre-norm transformer encoder -> masked mean pool -> MLP ->
  a caption vector t (128).
- image: (3, 64, 64) in [0, 1] (resized to 64 if another size comes in), plus two coordinate channels (x, y in
  [-1, 1]: position is an absolute property here) -> a 7-conv CNN (64 -> 32 -> 16 -> 8 pixels, 32 / 64 / 128
  channels), each conv followed by GroupNorm, a FiLM modulation (1 + gamma(t)) * h + beta(t) of its channels by
  the caption vector, and SiLU (GroupNorm keeps every image's score independent of the rest of the batch).
- head: the 8x8 map -> 1x1 conv to 16 channels -> flattened (keeps where things are: position, count) together
  with a global max pool (what is there at all) and t -> MLP -> 6 attribute logits; t -> MLP -> 6 stated logits.

Every operation is differentiable in the pixels, so `forward_differentiable` / `score_and_grad` backpropagate
through the network (TailorPO-G, guidance).

Training data (`python -m rlhf_diffusion.testbed.reward_model`)
---------------------------------------------------------------
1. samples: the shipped `testbed:pipeline` sampled by the production sampler (`diffusion/sampling.py`: DDIM grid,
   eta 1, 10 steps, classifier-free guidance through `NoisePredictor`, as configs/tiny.yaml samples) on the 332
   `testbed_train` captions, `--samples-per-caption` (12, 20, 36) per single / count / pair caption (pairs are
   where the pipeline and the reward err most; single-object scenes are easy), the guidance scale cycling over
   `--guidance` (default 2, 3, 4, 5, 6: what a policy drifting under RL draws is covered better than by
   guidance 4 alone);
2. renders: world renders of train captions, blurred, noised and faded at random (clean examples of every
   attribute), `--renders` of them;
3. every image is read once by the checker's `world.detect` (and once mirrored left-right: a mirror image has
   the caption with left and right swapped, an exact augmentation); its verdicts against ANY caption are then
   computed from that reading exactly as `world.check` computes them (checked against `world.check` on 500
   random combinations every run). Only `testbed_train` captions are ever used, so the 82 `testbed_heldout`
   captions are unseen text at evaluation.

Evaluation: fresh seeds, guidance 4 (the tiny config), on the train captions and on the held-out captions; the
figure is the agreement with the checker on decisive pairs (two samples of one caption whose checker fractions
differ: the share of them that the reward orders the same way; a tie counts one half), for this model and for the
testbed CLIP score on the same pairs. Everything lands in `card.json` beside the weights.

Files: `config.json` (the network's settings, `RewardNetConfig`), `model.safetensors` (float32 weights),
`tokenizer.json` + `tokenizer_config.json` (the world tokenizer), `card.json` (how it was trained, what it
measures). Loading reads JSON and safetensors only (no pickle).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from rlhf_diffusion.models.sources import resolve_source
from rlhf_diffusion.rewards.base import RewardModel, register_reward

if __name__ == "__main__":  # `python -m`: run the imported module's `main`, so the reward is registered once only
    from rlhf_diffusion.testbed.reward_model import main as _main

    raise SystemExit(_main())

__all__ = [
    "ATTRIBUTES",
    "DEFAULT_PATH",
    "RewardNet",
    "RewardNetConfig",
    "TestbedReward",
    "TrainSettings",
    "decisive_pair_agreement",
    "load_reward_net",
    "main",
    "save_reward_net",
    "train_reward_model",
]

ATTRIBUTES: tuple[str, ...] = ("background", "count", "colour", "shape", "position", "binding")
DEFAULT_PATH = "testbed:reward"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "card.json"
# Auxiliary reading targets (training only): background (white, black, gray, none), number of objects (0..3, 4+),
# colours present (4 bits), shapes present (3 bits), position of the largest object (5 + none), (colour, shape)
# pairs present (12 bits).
READING_SLICES = {
    "background": (0, 4),
    "count": (4, 9),
    "colours": (9, 13),
    "shapes": (13, 16),
    "position": (16, 22),
    "pairs": (22, 34),
}
READING_LOGITS = 34


# ---------------------------------------------------------------------------------------------------------------
# The network
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class RewardNetConfig:
    """The network's settings (saved as config.json)."""

    vocab_size: int = 592
    max_length: int = 16
    image_size: int = 64
    channels: tuple[int, ...] = (32, 64, 128)
    groups: int = 8
    text_dim: int = 64
    text_layers: int = 2
    text_heads: int = 4
    cond_dim: int = 128
    head_channels: int = 16
    head_hidden: int = 256
    attributes: tuple[str, ...] = ATTRIBUTES

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> RewardNetConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"RewardNetConfig: unknown key(s) {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


class TextEncoder(nn.Module):
    """Token ids (N, L) + attention mask (N, L) -> caption vector (N, cond_dim)."""

    def __init__(self, c: RewardNetConfig):
        super().__init__()
        self.token = nn.Embedding(c.vocab_size, c.text_dim)
        self.position = nn.Parameter(torch.randn(c.max_length, c.text_dim) * 0.02)
        layer = nn.TransformerEncoderLayer(
            c.text_dim, c.text_heads, 2 * c.text_dim, dropout=0.0, activation="gelu", batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, c.text_layers, enable_nested_tensor=False)
        self.out = nn.Sequential(
            nn.LayerNorm(c.text_dim), nn.Linear(c.text_dim, c.cond_dim), nn.SiLU(), nn.Linear(c.cond_dim, c.cond_dim)
        )

    def forward(self, ids: Tensor, mask: Tensor) -> Tensor:
        h = self.token(ids) + self.position[: ids.shape[1]]
        h = self.encoder(h, src_key_padding_mask=~mask)
        m = mask.unsqueeze(-1).to(h.dtype)
        return self.out((h * m).sum(1) / m.sum(1).clamp_min(1.0))


class FiLMConv(nn.Module):
    """conv -> GroupNorm -> (1 + gamma(t)) h + beta(t) -> SiLU."""

    def __init__(self, c_in: int, c_out: int, cond_dim: int, groups: int, kernel: int = 3, stride: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding=(kernel - 1) // 2 if stride == 1 else 1)
        self.norm = nn.GroupNorm(groups, c_out)
        self.film = nn.Linear(cond_dim, 2 * c_out)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        gamma, beta = self.film(t)[:, :, None, None].chunk(2, dim=1)
        return F.silu((1 + gamma) * self.norm(self.conv(x)) + beta)


class RewardNet(nn.Module):
    """(images (N, 3, H, W) in [0, 1], token ids (N, L), attention mask (N, L)) -> attribute and stated logits
    (N, 6) each; `score` composes them into the predicted fraction of stated attributes that are right."""

    def __init__(self, config: RewardNetConfig):
        super().__init__()
        self.config = c = config
        self.text = TextEncoder(c)
        c0, c1, c2 = c.channels
        d = c.cond_dim
        self.blocks = nn.ModuleList(
            [
                FiLMConv(5, c0, d, c.groups, kernel=4, stride=2),  # 64 -> 32
                FiLMConv(c0, c0, d, c.groups),
                FiLMConv(c0, c1, d, c.groups, stride=2),  # 32 -> 16
                FiLMConv(c1, c1, d, c.groups),
                FiLMConv(c1, c2, d, c.groups, stride=2),  # 16 -> 8
                FiLMConv(c2, c2, d, c.groups),
                FiLMConv(c2, c2, d, c.groups),
            ]
        )
        self.reduce = nn.Conv2d(c2, c.head_channels, 1)
        side = c.image_size // 8
        self.attribute_head = nn.Sequential(
            nn.Linear(c.head_channels * side * side + c2 + d, c.head_hidden),
            nn.SiLU(),
            nn.Linear(c.head_hidden, c.head_hidden),
            nn.SiLU(),
            nn.Linear(c.head_hidden, len(c.attributes)),
        )
        self.stated_head = nn.Sequential(nn.Linear(d, d), nn.SiLU(), nn.Linear(d, len(c.attributes)))
        ramp = torch.linspace(-1, 1, c.image_size)
        self.register_buffer(
            "coords",
            torch.stack([ramp.view(1, -1).expand(c.image_size, -1), ramp.view(-1, 1).expand(-1, c.image_size)]),
            persistent=False,
        )

    @property
    def visual_dim(self) -> int:
        """Width of the visual features (`forward(..., features=True)`)."""
        c = self.config
        return c.head_channels * (c.image_size // 8) ** 2 + c.channels[-1]

    def forward(
        self, images: Tensor, ids: Tensor, mask: Tensor, *, features: bool = False
    ) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
        """(attribute logits (N, 6), stated logits (N, 6)), plus the visual features (N, `visual_dim`) when
        `features` (training: the auxiliary reading head sees them)."""
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        t = self.text(ids, mask)
        x = torch.cat([images * 2 - 1, self.coords.to(images.dtype).expand(images.shape[0], -1, -1, -1)], dim=1)
        for block in self.blocks:
            x = block(x, t)
        visual = torch.cat([self.reduce(x).flatten(1), x.amax(dim=(2, 3))], dim=1)
        out = self.attribute_head(torch.cat([visual, t], dim=1)), self.stated_head(t)
        return (*out, visual) if features else out

    @staticmethod
    def compose(attribute_logits: Tensor, stated_logits: Tensor) -> Tensor:
        """(N,) sum_a q_a p_a / sum_a q_a: the expected fraction of the stated attributes that are right."""
        p, q = torch.sigmoid(attribute_logits), torch.sigmoid(stated_logits)
        return (p * q).sum(-1) / q.sum(-1).clamp_min(1e-6)

    def score(self, images: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
        return self.compose(*self(images, ids, mask))


def _load_tokenizer(path: Path):
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(str(path))
    except Exception as err:  # noqa: BLE001 - tokenizer loading raises OSError, ValueError, TypeError, ...
        raise ValueError(f"cannot load the world tokenizer from {str(path)!r}: {type(err).__name__}: {err}") from err


def tokenize(
    tokenizer, prompts: Sequence[str], max_length: int, device: torch.device | str = "cpu"
) -> tuple[Tensor, Tensor]:
    """(ids, mask): (N, max_length) long and bool, padded / truncated to max_length."""
    out = tokenizer(list(prompts), padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    return out.input_ids.to(device), out.attention_mask.to(device).bool()


def save_reward_net(out: str | Path, net: RewardNet, tokenizer) -> Path:
    """Writes config.json, model.safetensors (float32) and the tokenizer files to `out`."""
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / CONFIG_FILE).write_text(json.dumps(net.config.to_json(), indent=2) + "\n")
    state = {k: v.detach().float().contiguous().cpu() for k, v in net.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": "pt", "model": "rlhf_diffusion.testbed.reward_model"})
    tokenizer.save_pretrained(str(out))
    for extra in ("special_tokens_map.json", "vocab.json", "merges.txt"):  # slow-tokenizer duplicates
        if (out / extra).exists() and (out / "tokenizer.json").exists():
            (out / extra).unlink()
    return out


def resolve_reward_path(path: str | Path | None) -> Path:
    """`testbed:reward` (or None) -> the shipped directory; a local directory -> itself.

    Raises:
        FileNotFoundError: the directory or its config.json / model.safetensors is missing.
    """
    source = DEFAULT_PATH if path is None else str(path)
    source = resolve_source(source)
    directory = Path(source).expanduser()
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(
                f"testbed reward model {str(path)!r}: {directory} has no {name}; train one with "
                f"`python -m rlhf_diffusion.testbed.reward_model --out DIR`"
            )
    return directory


def load_reward_net(path: str | Path | None = DEFAULT_PATH) -> tuple[RewardNet, Any]:
    """(network in eval mode, frozen; tokenizer) from a directory written by `save_reward_net` or `testbed:reward`.

    Every weight must be present and no extra one (a foreign state dict is an error, never a random layer).
    """
    from safetensors.torch import load_file

    directory = resolve_reward_path(path)
    config = RewardNetConfig.from_json(json.loads((directory / CONFIG_FILE).read_text()))
    net = RewardNet(config)
    state = load_file(str(directory / WEIGHTS_FILE))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{directory / WEIGHTS_FILE} does not match RewardNet({CONFIG_FILE}): missing "
            f"{list(missing)[:5]}, unexpected {list(unexpected)[:5]}"
        )
    return net.eval().requires_grad_(False), _load_tokenizer(directory)


# ---------------------------------------------------------------------------------------------------------------
# The reward
# ---------------------------------------------------------------------------------------------------------------


@register_reward("testbed_reward")
class TestbedReward(RewardModel):
    """The learned testbed reward: per image, the predicted fraction of its caption's attributes that the image gets
    right (in [0, 1]), from the pixels and the caption's tokens only. Differentiable with respect to the pixels.

    Args:
        path: a directory written by `python -m rlhf_diffusion.testbed.reward_model --out DIR`, or
            "testbed:reward" (default), the shipped model.

    Raises:
        FileNotFoundError: the directory or one of its files is missing.
        ValueError: the weights do not match the config, or the tokenizer cannot be loaded.
    """

    differentiable = True

    def __init__(self, path: str | None = DEFAULT_PATH):
        self.source = DEFAULT_PATH if path is None else str(path)
        self.net, self.tokenizer = load_reward_net(self.source)
        self._device = torch.device("cpu")

    @property
    def device(self) -> torch.device:
        return self._device

    def to(self, device: str | torch.device) -> TestbedReward:
        self._device = torch.device(device)
        self.net.to(self._device)
        return self

    def _score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        ids, mask = tokenize(self.tokenizer, prompts, self.net.config.max_length, self._device)
        return self.net.score(images.to(device=self._device, dtype=torch.float32), ids, mask)

    def __repr__(self) -> str:
        return f"TestbedReward(path={self.source!r})"


# ---------------------------------------------------------------------------------------------------------------
# Labels: the checker's verdicts for any (image, caption), from one reading of the image
# ---------------------------------------------------------------------------------------------------------------

# Codes of a reading (`world.Detection`) and of a caption (`world.Scene`), one int64 row each, so that the verdicts
# of many (image, caption) combinations are a few vectorised comparisons: background id (-1: none), number of
# objects, bitmask of colours, bitmask of shapes, position of the largest object (-1: none), bitmask of
# (colour, shape) pairs; a caption adds its kind (0 single, 1 count, 2 pair).
_BG, _N, _COLOURS, _SHAPES, _POS, _PAIRS, _KIND = range(7)


def _world():
    from rlhf_diffusion.testbed import world

    return world


def _index(names: Sequence[str], name: str | None) -> int:
    return -1 if name is None else list(names).index(name)


def _pair_bit(world, colour: str, shape: str) -> int:
    return 1 << (_index(world.PALETTE, colour) * len(world.SHAPES) + _index(world.SHAPES, shape))


def detection_code(detection) -> np.ndarray:
    world = _world()
    objects = detection.objects
    code = np.zeros(6, dtype=np.int64)
    code[_BG] = _index(world.BACKGROUNDS, detection.background)
    code[_N] = len(objects)
    for o in objects:
        code[_COLOURS] |= 1 << _index(world.PALETTE, o.colour)
        code[_SHAPES] |= 1 << _index(world.SHAPES, o.shape)
        code[_PAIRS] |= _pair_bit(world, o.colour, o.shape)
    code[_POS] = _index(world.POSITIONS, objects[0].position) if objects else -1
    return code


def scene_code(scene) -> np.ndarray:
    world = _world()
    code = np.zeros(7, dtype=np.int64)
    code[_BG] = _index(world.BACKGROUNDS, scene.background)
    code[_N] = len(scene.objects)
    for o in scene.objects:
        code[_COLOURS] |= 1 << _index(world.PALETTE, o.colour)
        code[_SHAPES] |= 1 << _index(world.SHAPES, o.shape)
        code[_PAIRS] |= _pair_bit(world, o.colour, o.shape)
    code[_POS] = _index(world.POSITIONS, scene.position)
    code[_KIND] = ("single", "count", "pair").index(scene.kind)
    return code


def verdicts(det: np.ndarray, cap: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(labels, stated): (..., 6) float arrays for detection codes (..., 6) and caption codes (..., 7), exactly
    `world.check`'s per-attribute verdicts (labels; 0 where not stated) and which attributes the caption states."""
    labels = np.stack(
        [
            det[..., _BG] == cap[..., _BG],
            det[..., _N] == cap[..., _N],
            det[..., _COLOURS] == cap[..., _COLOURS],
            det[..., _SHAPES] == cap[..., _SHAPES],
            (det[..., _N] > 0) & (det[..., _POS] == cap[..., _POS]),
            det[..., _PAIRS] == cap[..., _PAIRS],
        ],
        axis=-1,
    )
    kind = cap[..., _KIND]
    stated = np.stack([np.ones_like(kind, dtype=bool)] * 4 + [kind == 0, kind == 2], axis=-1)
    return (labels & stated).astype(np.float32), stated.astype(np.float32)


def fractions(labels: np.ndarray, stated: np.ndarray) -> np.ndarray:
    """The checker reward (fraction of the stated attributes that are right) from `verdicts`."""
    return labels.sum(-1) / stated.sum(-1)


def mirror_caption(text: str) -> str:
    """The caption of the left-right mirror image: "on the left" <-> "on the right" (others unchanged)."""
    return text.replace("on the left", "\0").replace("on the right", "on the left").replace("\0", "on the right")


def mutations(scene) -> list:
    """Scenes that differ from `scene` in one attribute: the background, one object's colour or shape, the position,
    the count (single <-> two <-> three of a kind), or the binding (a pair's shapes swapped)."""
    world = _world()
    out = []

    def add(*args):
        try:
            out.append(world.Scene(*args))
        except ValueError:
            pass

    objects = scene.objects
    for bg in world.BACKGROUNDS:
        if bg != scene.background:
            add(bg, objects, scene.position)
    for k, o in enumerate(objects[:2] if scene.kind == "pair" else objects[:1]):
        for colour in world.PALETTE:
            if colour != o.colour:
                new = world.SceneObject(colour, o.shape)
                add(
                    scene.background,
                    tuple(new if (scene.kind != "pair" or j == k) else p for j, p in enumerate(objects)),
                    scene.position,
                )
        for shape in world.SHAPES:
            if shape != o.shape:
                new = world.SceneObject(o.colour, shape)
                add(
                    scene.background,
                    tuple(new if (scene.kind != "pair" or j == k) else p for j, p in enumerate(objects)),
                    scene.position,
                )
    if scene.kind == "single":
        for position in world.POSITIONS:
            if position != scene.position:
                add(scene.background, objects, position)
        for n in world.COUNT_WORDS:
            add(scene.background, objects * n)
    elif scene.kind == "count":
        for n in (1, 2, 3):
            if n != len(objects):
                for position in world.POSITIONS if n == 1 else (None,):
                    add(scene.background, objects[:1] * n, position)
    else:
        a, b = objects
        add(scene.background, (world.SceneObject(a.colour, b.shape), world.SceneObject(b.colour, a.shape)))
    return [s for s in out if s != scene]


# ---------------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ImageSet:
    """Images (N, 64, 64, 3) uint8 with their own caption (index into the caption table), the guidance scale they
    were sampled with (0: a render), and the checker's reading of them and of their mirror images (codes)."""

    images: np.ndarray
    caption_index: np.ndarray
    guidance: np.ndarray
    det: np.ndarray  # (N, 6)
    det_mirror: np.ndarray  # (N, 6)

    def __len__(self) -> int:
        return len(self.images)

    @staticmethod
    def cat(sets: Sequence[ImageSet]) -> ImageSet:
        return ImageSet(*(np.concatenate([getattr(s, f.name) for s in sets]) for f in fields(ImageSet)))


def _read(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    world = _world()
    det = np.stack([detection_code(world.detect(im)) for im in images])
    mirror = np.stack([detection_code(world.detect(np.ascontiguousarray(im[:, ::-1]))) for im in images])
    return det, mirror


def sample_pipeline(
    captions: Sequence[str],
    guidance: Sequence[float],
    *,
    seed: int,
    steps: int,
    eta: float,
    batch_size: int,
    log: Callable[[str], None] = print,
    what: str = "samples",
) -> tuple[np.ndarray, np.ndarray]:
    """Samples `testbed:pipeline` once per entry of `captions` with the production sampler; the guidance scale of
    image i is `guidance[i]` (a batch holds one scale: entries are grouped by it). Returns uint8 (N, 64, 64, 3)
    images in the order of `captions` and the guidance per image."""
    from rlhf_diffusion.diffusion.sampling import (
        DDIMGrid,
        NoisePredictor,
        decode_latents,
        initial_noise,
        sample_trajectory,
    )
    from rlhf_diffusion.models.conditioning import encode_prompts
    from rlhf_diffusion.models.loading import load_diffusion_model
    from rlhf_diffusion.testbed.assets import resolve_testbed

    model = load_diffusion_model(resolve_testbed("testbed:pipeline"))
    grid = DDIMGrid.from_scheduler(model.scheduler, steps, eta)
    guidance = np.asarray(guidance, dtype=np.float64)
    images = np.zeros((len(captions), model.resolution, model.resolution, 3), dtype=np.uint8)
    t0, done, batch_index = time.time(), 0, 0
    for scale in sorted(set(guidance.tolist())):
        predictor = NoisePredictor(model, float(scale))
        where = np.flatnonzero(guidance == scale)
        for start in range(0, len(where), batch_size):
            idx = where[start : start + batch_size]
            prompts = [captions[i] for i in idx]
            generator = torch.Generator().manual_seed(seed * 1_000_003 + batch_index)
            batch_index += 1
            with torch.no_grad():
                cond = encode_prompts(model, prompts)
                x_T = initial_noise(len(prompts), model, generator)
                trajectory = sample_trajectory(predictor, cond, x_T, grid, generator)
                pixels = decode_latents(model, trajectory.final)
            images[idx] = pixels.mul(255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            done += len(idx)
            if batch_index % 20 == 0 or done == len(captions):
                log(f"[{what}] {done}/{len(captions)} images, {time.time() - t0:.0f} s")
    return images, guidance


def _degrade(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random blur (sigma 0..1.5 px), fading toward the background (contrast 0.55..1), pixel noise (std 0..12)."""
    from scipy import ndimage

    out = np.empty_like(images)
    for i, im in enumerate(images.astype(np.float64)):
        sigma = rng.uniform(0, 1.5)
        if sigma > 0.2:
            im = ndimage.gaussian_filter(im, sigma=(sigma, sigma, 0), mode="nearest")
        background = np.median(np.concatenate([im[:2].reshape(-1, 3), im[-2:].reshape(-1, 3)]), axis=0)
        im = background + rng.uniform(0.55, 1.0) * (im - background)
        im = im + rng.normal(0, rng.uniform(0, 12), im.shape)
        out[i] = np.clip(im, 0, 255).round().astype(np.uint8)
    return out


def render_set(captions: Sequence[str], n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n` renders of captions drawn uniformly from `captions`, degraded at random; (images, caption indices into
    `captions`)."""
    world = _world()
    rng = np.random.default_rng(seed)
    which = rng.integers(len(captions), size=n)
    clean = (
        np.stack([world.render(world.parse_caption(captions[j]), 64, rng) for j in which])
        if n
        else np.zeros((0, 64, 64, 3), np.uint8)
    )
    return _degrade(clean, rng), which


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class TrainSettings:
    """Every knob of a training run (all saved in card.json)."""

    seed: int = 0
    threads: int = 2
    # data
    samples_per_caption: tuple[int, ...] = (12, 20, 36)  # per single / count / pair caption (pairs are hardest)
    guidance: tuple[float, ...] = (2.0, 3.0, 4.0, 5.0, 6.0)
    steps: int = 10
    eta: float = 1.0
    sample_batch: int = 64
    renders: int = 3000
    max_captions: int = 0  # 0: all; else the first N train and held-out captions (tests)
    # evaluation
    eval_guidance: float = 4.0
    eval_train_seeds: int = 4
    eval_heldout_seeds: int = 8
    clip_baseline: bool = True
    # optimisation
    train_steps: int = 3000
    batch_size: int = 64
    group_size: int = 4  # images of one caption per group (the ranking term compares them)
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    warmup: int = 100
    image_groups: float = 0.5  # share of image groups (one image, its own caption and mutations; see Batcher)
    own_caption: float = 0.7  # in caption groups: share paired with their own caption; the rest: mutations, random
    random_caption: float = 0.1
    render_share: float = 0.2  # share of groups drawn from the renders
    rank_weight: float = 1.0
    rank_temperature: float = 0.05
    reading_weight: float = 1.0
    log_every: int = 100
    # network
    channels: tuple[int, ...] = (32, 64, 128)
    head_channels: int = 16
    head_hidden: int = 256


class CaptionTable:
    """The train captions (the only text the model trains on) with their codes, their mirror captions and their
    one-attribute mutations."""

    def __init__(self, captions: Sequence[str]):
        world = _world()
        self.captions = list(captions)
        self.index = {c: i for i, c in enumerate(self.captions)}
        scenes = [world.parse_caption(c) for c in self.captions]
        self.kinds = [scene.kind for scene in scenes]
        self.codes = np.stack([scene_code(s) for s in scenes])
        self.mirror = np.array([self.index.get(mirror_caption(c), -1) for c in self.captions])
        self.neighbours = [
            [self.index[m] for m in (world.caption(s) for s in mutations(scene)) if m in self.index] for scene in scenes
        ]


def _lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * 0.95 + 0.05


class Batcher:
    """Training batches of `batch_size / group_size` groups of `group_size` examples, labels from the stored
    readings. Two kinds of group, both ranked by the ranking term:

    - caption groups: `group_size` images of one caption (samples or renders) paired with their own caption (share
      `own_caption`), a mutation of it, or a random train caption (share `random_caption`): which of several
      images of one prompt is better, what a preference method asks;
    - image groups (share `image_groups`): one image with its own caption and `group_size - 1` mutations of it (a
      random caption with probability `random_caption` each): which caption fits an image better, so that a wrong
      background, colour or shape costs reward even where the pipeline's own samples rarely get it wrong.

    An image is mirrored left-right at random where the mirror of its caption is a train caption."""

    def __init__(self, data: ImageSet, table: CaptionTable, s: TrainSettings, rng: np.random.Generator):
        self.data, self.table, self.s, self.rng = data, table, s, rng
        by_caption: dict[tuple[bool, int], list[int]] = {}
        for i, (j, g) in enumerate(zip(data.caption_index, data.guidance)):
            by_caption.setdefault((bool(g == 0), int(j)), []).append(i)
        self.groups = {kind: [np.array(v) for (r, _), v in by_caption.items() if r == kind] for kind in (False, True)}
        # a group is drawn with probability proportional to its images (captions with more samples, the pairs,
        # come up more often)
        self.weights = {
            kind: np.array([len(g) for g in groups], dtype=np.float64) / max(1, sum(map(len, groups)))
            for kind, groups in self.groups.items()
        }

    def __call__(self) -> tuple[Tensor, np.ndarray, Tensor, Tensor, Tensor, np.ndarray]:
        s, rng, table = self.s, self.rng, self.table
        n_groups = s.batch_size // s.group_size
        idx, caps, mirror = [], [], []
        for _ in range(n_groups):
            use_renders = bool(self.groups[True]) and (not self.groups[False] or rng.random() < s.render_share)
            pool = self.groups[use_renders]
            members = pool[rng.choice(len(pool), p=self.weights[use_renders])]
            image_group = rng.random() < s.image_groups
            if image_group:
                chosen = np.repeat(rng.choice(members), s.group_size)
            else:
                chosen = rng.choice(members, size=s.group_size, replace=len(members) < s.group_size)
            own = int(self.data.caption_index[chosen[0]])
            flip = bool(rng.random() < 0.5) and table.mirror[own] >= 0
            base = int(table.mirror[own]) if flip else own
            neighbours = table.neighbours[base]
            if image_group:
                others = list(rng.choice(neighbours, size=min(len(neighbours), s.group_size - 1), replace=False))
                others += [int(rng.integers(len(table.captions))) for _ in range(s.group_size - 1 - len(others))]
                others = [
                    int(rng.integers(len(table.captions))) if rng.random() < s.random_caption else int(c)
                    for c in others
                ]
                caps += [base, *others]
            else:
                u = rng.random()
                if u < s.own_caption or not neighbours:
                    cap = base
                elif u < 1 - s.random_caption:
                    cap = int(rng.choice(neighbours))
                else:
                    cap = int(rng.integers(len(table.captions)))
                caps += [cap] * s.group_size
            idx += list(chosen)
            mirror += [flip] * s.group_size
        idx, caps, mirror = np.array(idx), np.array(caps), np.array(mirror)
        images = self.data.images[idx]
        images = np.where(mirror[:, None, None, None], images[:, :, ::-1], images)
        det = np.where(mirror[:, None], self.data.det_mirror[idx], self.data.det[idx])
        labels, stated = verdicts(det, table.codes[caps])
        pixels = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float().div(255)
        return (
            pixels,
            caps,
            torch.from_numpy(labels),
            torch.from_numpy(stated),
            torch.from_numpy(fractions(labels, stated)),
            det,
        )


def reading_targets(det: np.ndarray) -> dict[str, np.ndarray]:
    """Targets of the reading head from detection codes (N, 6): class indices or bit matrices."""
    bits = lambda v, n: ((v[:, None] >> np.arange(n)) & 1).astype(np.float32)  # noqa: E731
    return {
        "background": np.where(det[:, _BG] < 0, 3, det[:, _BG]),
        "count": np.minimum(det[:, _N], 4),
        "colours": bits(det[:, _COLOURS], 4),
        "shapes": bits(det[:, _SHAPES], 3),
        "position": np.where(det[:, _POS] < 0, 5, det[:, _POS]),
        "pairs": bits(det[:, _PAIRS], 12),
    }


def _reading_loss(logits: Tensor, det: np.ndarray) -> Tensor:
    """Mean over the six reading targets of cross-entropy (classes) or binary cross-entropy (bits)."""
    losses = []
    for name, target in reading_targets(det).items():
        a, b = READING_SLICES[name]
        y = torch.from_numpy(target)
        if y.dtype == torch.float32:
            losses.append(F.binary_cross_entropy_with_logits(logits[:, a:b], y))
        else:
            losses.append(F.cross_entropy(logits[:, a:b], y.long()))
    return torch.stack(losses).mean()


def _rank_loss(scores: Tensor, target: Tensor, group_size: int, temperature: float) -> Tensor:
    """Mean logistic loss -log sigmoid((s_i - s_j) / T) over the pairs of one group with target_i > target_j."""
    s = scores.view(-1, group_size)
    y = target.view(-1, group_size)
    diff = (s[:, :, None] - s[:, None, :]) / temperature
    better = (y[:, :, None] > y[:, None, :] + 1e-6).float()
    if better.sum() == 0:
        return scores.sum() * 0
    return (F.softplus(-diff) * better).sum() / better.sum()


def train_net(
    data: ImageSet, table: CaptionTable, tokenizer, s: TrainSettings, log: Callable[[str], None] = print
) -> tuple[RewardNet, dict[str, Any]]:
    torch.manual_seed(s.seed)
    config = RewardNetConfig(
        vocab_size=len(tokenizer), channels=tuple(s.channels), head_hidden=s.head_hidden, head_channels=s.head_channels
    )
    net = RewardNet(config)
    # What the checker reads from the image alone (`world.detect`): an auxiliary target of the visual features
    # during training (dense supervision of the CNN); not part of the saved model.
    reading_head = nn.Sequential(
        nn.Linear(net.visual_dim, s.head_hidden), nn.SiLU(), nn.Linear(s.head_hidden, READING_LOGITS)
    )
    ids_all, mask_all = tokenize(tokenizer, table.captions, config.max_length)
    named = [*net.named_parameters(), *(("reading." + n, p) for n, p in reading_head.named_parameters())]
    decay = [p for n, p in named if p.ndim >= 2 and "position" not in n]
    rest = [p for n, p in named if not (p.ndim >= 2 and "position" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": s.weight_decay}, {"params": rest, "weight_decay": 0}], lr=s.learning_rate
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: _lr(k, s.train_steps, s.warmup))
    batcher = Batcher(data, table, s, np.random.default_rng(s.seed + 17))
    t0, history, window = time.time(), [], []
    net.train()
    for step in range(s.train_steps):
        pixels, caps, labels, stated, target, det = batcher()
        attribute_logits, stated_logits, visual = net(pixels, ids_all[caps], mask_all[caps], features=True)
        reading_logits = reading_head(visual)
        bce = (
            F.binary_cross_entropy_with_logits(attribute_logits, labels, weight=stated, reduction="sum") / stated.sum()
        )
        stated_bce = F.binary_cross_entropy_with_logits(stated_logits, stated)
        scores = RewardNet.compose(attribute_logits, stated_logits)
        rank = _rank_loss(scores, target, s.group_size, s.rank_temperature)
        reading = _reading_loss(reading_logits, det)
        loss = bce + stated_bce + s.rank_weight * rank + s.reading_weight * reading
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], 1.0)
        opt.step()
        sched.step()
        window.append((loss.item(), bce.item(), stated_bce.item(), rank.item(), reading.item()))
        if (step + 1) % s.log_every == 0 or step + 1 == s.train_steps:
            mean = np.mean(window, axis=0)
            window = []
            history.append(
                {
                    "step": step + 1,
                    "loss": float(mean[0]),
                    "attribute_bce": float(mean[1]),
                    "stated_bce": float(mean[2]),
                    "rank": float(mean[3]),
                    "reading": float(mean[4]),
                }
            )
            log(
                f"[train] step {step + 1}/{s.train_steps} loss {mean[0]:.4f} (attribute {mean[1]:.4f}, stated "
                f"{mean[2]:.4f}, rank {mean[3]:.4f}, reading {mean[4]:.4f}) {time.time() - t0:.0f} s"
            )
    net.eval().requires_grad_(False)
    reading_head.eval().requires_grad_(False)
    return net, {
        "seconds": time.time() - t0,
        "parameters": sum(p.numel() for p in net.parameters()),
        "history": history,
        "reading_head": reading_head,
    }


# ---------------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------------


def decisive_pair_agreement(scores: np.ndarray, gold: np.ndarray, groups: np.ndarray) -> tuple[float, int, int]:
    """(agreement, decisive pairs, all pairs): over pairs (i, j) of one group (same caption) whose gold scores
    differ, the share that `scores` orders the same way (a tie in `scores` counts 1/2)."""
    agree, decisive, total = 0.0, 0, 0
    for g in np.unique(groups):
        members = np.flatnonzero(groups == g)
        for i, j in itertools.combinations(members, 2):
            total += 1
            if abs(gold[i] - gold[j]) < 1e-9:
                continue
            decisive += 1
            d = (scores[i] - scores[j]) * np.sign(gold[i] - gold[j])
            agree += 1.0 if d > 0 else 0.5 if d == 0 else 0.0
    return (agree / decisive if decisive else float("nan")), decisive, total


def _score_in_batches(
    fn: Callable[[Tensor, list[str]], Tensor], images: np.ndarray, prompts: Sequence[str], batch: int = 256
) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch):
        pixels = torch.from_numpy(images[i : i + batch]).permute(0, 3, 1, 2).float().div(255)
        out.append(fn(pixels, list(prompts[i : i + batch])).detach().float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros(0)


def evaluate_split(net: RewardNet, tokenizer, images: np.ndarray, prompts: Sequence[str], clip=None) -> dict[str, Any]:
    """The checker, the model and (optionally) the CLIP reward on one split: agreement on decisive pairs, the mean
    absolute error of the predicted fraction, the attribute heads' accuracy, and the checker's accuracy."""
    world = _world()
    checks = [world.check(im, p) for im, p in zip(images, prompts)]
    gold = np.array([np.mean([v for k, v in r.items() if k != "all"]) for r in checks])
    groups = np.array([hash(p) for p in prompts])

    def model_fn(pixels, ps):
        ids, mask = tokenize(tokenizer, ps, net.config.max_length)
        with torch.no_grad():
            return net(pixels, ids, mask)

    def model_score(pixels, ps):
        return RewardNet.compose(*model_fn(pixels, ps))

    logits = [
        model_fn(torch.from_numpy(images[i : i + 256]).permute(0, 3, 1, 2).float().div(255), list(prompts[i : i + 256]))
        for i in range(0, len(images), 256)
    ]
    attribute_logits = torch.cat([a for a, _ in logits])
    stated_logits = torch.cat([b for _, b in logits])
    scores = RewardNet.compose(attribute_logits, stated_logits).numpy()
    agreement, decisive, pairs = decisive_pair_agreement(scores, gold, groups)
    kinds = np.array(["single" if "position" in r else "pair" if "binding" in r else "count" for r in checks])
    by_kind = {}
    for kind in ("single", "count", "pair"):
        rows = kinds == kind
        if rows.any():
            value, n_decisive, _ = decisive_pair_agreement(scores[rows], gold[rows], groups[rows])
            by_kind[kind] = {"agreement": value, "decisive_pairs": n_decisive}
    heads = {}
    for k, name in enumerate(ATTRIBUTES):
        rows = [i for i, r in enumerate(checks) if name in r]
        if rows:
            predicted = attribute_logits[rows, k].numpy() > 0
            heads[name] = float(np.mean(predicted == np.array([checks[i][name] for i in rows])))
    stated_true = np.array([[name in r for name in ATTRIBUTES] for r in checks])
    result = {
        "images": len(images),
        "captions": len(set(prompts)),
        "pairs": pairs,
        "decisive_pairs": decisive,
        "agreement": agreement,
        "agreement_by_kind": by_kind,
        "score_mean": float(scores.mean()),
        "checker_fraction_mean": float(gold.mean()),
        "fraction_mae": float(np.abs(scores - gold).mean()),
        "pearson": float(np.corrcoef(scores, gold)[0, 1]) if gold.std() > 0 else float("nan"),
        "attribute_head_accuracy": heads,
        "stated_head_accuracy": float(np.mean((stated_logits.numpy() > 0) == stated_true)),
        "checker_accuracy": world.accuracy_of_checks(checks),
    }
    # Each image against its own caption and one random one-attribute mutation of it: does the reward prefer the
    # caption the checker prefers (a policy must not gain by drawing a wrong background, colour or shape)?
    rng = np.random.default_rng(len(prompts))
    mutated = []
    for p in prompts:
        options = mutations(world.parse_caption(p))
        mutated.append(world.caption(options[rng.integers(len(options))]))
    gold_mutated = np.array(
        [np.mean([v for k, v in world.check(im, m).items() if k != "all"]) for im, m in zip(images, mutated)]
    )
    both_gold = np.concatenate([gold, gold_mutated])
    pair_groups = np.concatenate([np.arange(len(prompts))] * 2)
    mutated_scores = _score_in_batches(model_score, images, mutated)
    caption_pairs = decisive_pair_agreement(np.concatenate([scores, mutated_scores]), both_gold, pair_groups)
    result["caption_pair_agreement"], result["caption_pairs_decisive"], _ = caption_pairs
    if clip is not None:
        clip_scores = _score_in_batches(clip.score, images, prompts)
        result["clip_agreement"], _, _ = decisive_pair_agreement(clip_scores, gold, groups)
        for kind, entry in by_kind.items():
            rows = kinds == kind
            entry["clip_agreement"] = decisive_pair_agreement(clip_scores[rows], gold[rows], groups[rows])[0]
        clip_mutated = _score_in_batches(clip.score, images, mutated)
        result["clip_caption_pair_agreement"] = decisive_pair_agreement(
            np.concatenate([clip_scores, clip_mutated]), both_gold, pair_groups
        )[0]
    return result


# ---------------------------------------------------------------------------------------------------------------
# The whole run
# ---------------------------------------------------------------------------------------------------------------


def _splits(s: TrainSettings) -> tuple[list[str], list[str]]:
    from rlhf_diffusion.prompts import load_builtin

    train, heldout = load_builtin("testbed_train"), load_builtin("testbed_heldout")
    if s.max_captions:  # evenly spaced, so that every scene kind is represented
        train, heldout = (c[:: max(1, len(c) // s.max_captions)][: s.max_captions] for c in (train, heldout))
    return train, heldout


def _verify_codes(data: ImageSet, table: CaptionTable, n: int, seed: int) -> int:
    """Asserts that `verdicts` equals `world.check` on `n` random (image, caption) combinations (own, mutated and
    random captions, mirrored or not); returns n."""
    world = _world()
    rng = np.random.default_rng(seed)
    for _ in range(n):
        i = int(rng.integers(len(data)))
        j = int(rng.integers(len(table.captions))) if rng.random() < 0.5 else int(data.caption_index[i])
        flip = bool(rng.random() < 0.5)
        image = np.ascontiguousarray(data.images[i][:, ::-1]) if flip else data.images[i]
        labels, stated = verdicts((data.det_mirror if flip else data.det)[i], table.codes[j])
        expected = world.check(image, table.captions[j])
        got = {a: bool(labels[k]) for k, a in enumerate(ATTRIBUTES) if stated[k]}
        if got != {k: v for k, v in expected.items() if k != "all"}:
            raise AssertionError(f"label codes disagree with world.check on {table.captions[j]!r}: {got} vs {expected}")
    return n


def _cached(
    cache: Path | None,
    name: str,
    key: dict[str, Any],
    log: Callable[[str], None],
    make: Callable[[], tuple[np.ndarray, np.ndarray]],
) -> tuple[np.ndarray, np.ndarray]:
    """`make()` (sampled images, guidance per image), stored in / reused from `cache` under a digest of `key`."""
    if cache is None:
        return make()
    import hashlib

    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache) / f"{name}_{digest}.npz"
    if path.exists():
        with np.load(path, allow_pickle=False) as stored:
            log(f"[cache] reusing {path}")
            return stored["images"], stored["guidance"]
    images, guidance = make()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, images=images, guidance=guidance)
    return images, guidance


def train_reward_model(
    out: Path,
    s: TrainSettings,
    log: Callable[[str], None] = print,
    cache: Path | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Samples, labels, trains, evaluates and saves (module docstring); returns the card. With `cache`, sampled
    images are stored there and reused by a later run with the same sampling settings (the card then counts the
    sampling seconds of this run only)."""
    torch.set_num_threads(s.threads)
    t_start = time.time()
    times: dict[str, float] = {}
    tokenizer = _load_tokenizer(Path(_pipeline_dir()) / "tokenizer")
    train_captions, heldout_captions = _splits(s)
    table = CaptionTable(train_captions)

    t0 = time.time()
    rng = np.random.default_rng(s.seed)
    kinds = [("single", "count", "pair").index(k) for k in table.kinds]
    per_kind = tuple(s.samples_per_caption) * (3 if len(s.samples_per_caption) == 1 else 1)
    plan = np.repeat(np.arange(len(train_captions)), [per_kind[k] for k in kinds])
    plan = plan[rng.permutation(len(plan))]
    guidance = np.array([s.guidance[k % len(s.guidance)] for k in range(len(plan))])
    sampled, guidance = _cached(
        cache,
        "train",
        dict(
            captions=train_captions,
            plan=plan.tolist(),
            guidance=guidance.tolist(),
            seed=s.seed,
            steps=s.steps,
            eta=s.eta,
        ),
        log,
        lambda: sample_pipeline(
            [train_captions[j] for j in plan],
            guidance,
            seed=s.seed * 2 + 1,
            steps=s.steps,
            eta=s.eta,
            batch_size=s.sample_batch,
            log=log,
        ),
    )
    times["sampling"] = time.time() - t0
    t0 = time.time()
    rendered, render_index = render_set(train_captions, s.renders, s.seed + 5)
    times["rendering"] = time.time() - t0
    t0 = time.time()
    images = np.concatenate([sampled, rendered])
    det, det_mirror = _read(images)
    data = ImageSet(
        images,
        np.concatenate([plan, render_index]),
        np.concatenate([guidance, np.zeros(len(rendered))]),
        det,
        det_mirror,
    )
    verified = _verify_codes(data, table, min(500, 4 * len(data)), s.seed + 7)
    times["labelling"] = time.time() - t0
    own = verdicts(data.det, table.codes[data.caption_index])
    own_fraction = fractions(*own)
    log(
        f"[data] {len(sampled)} samples ({times['sampling']:.0f} s), {len(rendered)} renders; checker fraction of "
        f"the samples {own_fraction[: len(sampled)].mean():.3f}, of the renders "
        f"{own_fraction[len(sampled) :].mean() if len(rendered) else float('nan'):.3f} ({times['labelling']:.0f} s)"
    )

    net, train_info = train_net(data, table, tokenizer, s, log)
    times["training"] = train_info.pop("seconds")
    train_info.pop("reading_head")

    t0 = time.time()
    splits = {}
    eval_sets = (
        ("train_captions", train_captions, s.eval_train_seeds),
        ("heldout_captions", heldout_captions, s.eval_heldout_seeds),
    )
    clip = None
    if s.clip_baseline:
        from rlhf_diffusion.rewards import build_reward

        clip = build_reward("clip_score", path="testbed:clip", scale=100.0)
    for k, (name, captions, seeds) in enumerate(eval_sets):
        prompts = [c for c in captions for _ in range(seeds)]
        images_eval, _ = _cached(
            cache,
            name,
            dict(prompts=prompts, guidance=s.eval_guidance, seed=s.seed, steps=s.steps, eta=s.eta),
            log,
            lambda prompts=prompts, k=k, name=name: sample_pipeline(
                prompts,
                [s.eval_guidance] * len(prompts),
                seed=10_000 + 97 * s.seed + k,
                steps=s.steps,
                eta=s.eta,
                batch_size=s.sample_batch,
                log=log,
                what=f"eval {name}",
            ),
        )
        splits[name] = evaluate_split(net, tokenizer, images_eval, prompts, clip)
        r = splits[name]
        log(
            f"[eval] {name}: agreement on {r['decisive_pairs']} decisive pairs (of {r['pairs']}): model "
            f"{r['agreement']:.3f}, CLIP {r.get('clip_agreement', float('nan')):.3f}; own vs mutated caption "
            f"({r['caption_pairs_decisive']} decisive): model {r['caption_pair_agreement']:.3f}, CLIP "
            f"{r.get('clip_caption_pair_agreement', float('nan')):.3f}; fraction MAE {r['fraction_mae']:.3f}"
        )
    times["evaluation"] = time.time() - t0

    save_reward_net(out, net, tokenizer)
    times["total"] = time.time() - t_start
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()}
    card = {
        "what": "testbed:reward, a learned model of the testbed checker's verdicts (rlhf_diffusion/testbed/"
        "reward_model.py); score = predicted fraction of the caption's attributes the image gets right",
        "command": command or "python -m rlhf_diffusion.testbed.reward_model --out " + str(out),
        "settings": settings,
        "network": {**net.config.to_json(), "parameters": train_info["parameters"]},
        "data": {
            "train_captions": len(train_captions),
            "heldout_captions": len(heldout_captions),
            "pipeline_samples": int(len(sampled)),
            "renders": int(len(rendered)),
            "samples_per_kind": {
                k: int(sum(n for n, kk in zip(np.bincount(plan, minlength=len(kinds)), kinds) if kk == i))
                for i, k in enumerate(("single", "count", "pair"))
            },
            "samples_per_guidance": {str(g): int((guidance == g).sum()) for g in sorted(set(guidance.tolist()))},
            "checker_fraction_of_samples": float(own_fraction[: len(sampled)].mean()) if len(sampled) else None,
            "checker_accuracy_of_samples": _accuracy(data.det[: len(sampled)], table.codes[plan]),
            "label_codes_verified_against_world_check": verified,
            "sampler": {
                "steps": s.steps,
                "eta": s.eta,
                "guidance": list(s.guidance),
                "batch": s.sample_batch,
                "code": "rlhf_diffusion.diffusion.sampling (DDIMGrid, NoisePredictor, sample_trajectory)",
            },
        },
        "evaluation": {
            "guidance": s.eval_guidance,
            "steps": s.steps,
            "eta": s.eta,
            "seeds_per_caption": {"train_captions": s.eval_train_seeds, "heldout_captions": s.eval_heldout_seeds},
            "metric": "agreement with the checker's fraction on decisive pairs (two fresh samples of one "
            "caption whose checker fractions differ; a tie counts 1/2)",
            "caption_pair_metric": "the same for each image scored with its own caption and with one "
            "random one-attribute mutation of it (decisive where the checker's "
            "fractions differ)",
            "clip_baseline": "clip_score on testbed:clip, scale 100" if s.clip_baseline else None,
            **splits,
        },
        "training": train_info,
        "seconds": times,
        "threads": s.threads,
    }
    (Path(out) / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    log(f"[done] {out} in {times['total']:.0f} s")
    return card


def _accuracy(det: np.ndarray, caps: np.ndarray) -> dict[str, float]:
    if len(det) == 0:
        return {}
    labels, stated = verdicts(det, caps)
    acc = {a: float(labels[stated[:, k] > 0, k].mean()) for k, a in enumerate(ATTRIBUTES) if stated[:, k].any()}
    acc["all"] = float((labels.sum(-1) == stated.sum(-1)).mean())
    return acc


def _pipeline_dir() -> str:
    from rlhf_diffusion.testbed.assets import resolve_testbed

    return resolve_testbed("testbed:pipeline")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="output directory (weights, config, card.json)")
    parser.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="keep the sampled images here and reuse them when the sampling settings match",
    )
    for f in fields(TrainSettings):
        value = f.default
        flag = f"--{f.name.replace('_', '-')}"
        if isinstance(value, bool):
            parser.add_argument(flag, type=lambda t: t.lower() in ("1", "true", "yes"), default=value, metavar="BOOL")
        elif isinstance(value, tuple):
            kind = type(value[0])
            parser.add_argument(
                flag, type=lambda t, kind=kind: tuple(kind(x) for x in t.split(",")), default=value, metavar="A,B,..."
            )
        else:
            parser.add_argument(flag, type=type(value), default=value)
    args = parser.parse_args(argv)
    settings = TrainSettings(**{f.name: getattr(args, f.name) for f in fields(TrainSettings)})
    if settings.batch_size % settings.group_size:
        parser.error("--batch-size must be a multiple of --group-size")
    command = "python -m rlhf_diffusion.testbed.reward_model " + " ".join(sys.argv[1:] if argv is None else list(argv))
    train_reward_model(args.out, settings, cache=args.cache, command=command)
    return 0

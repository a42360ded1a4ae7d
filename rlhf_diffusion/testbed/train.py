"""Trains the testbed's small text-to-image pipeline and its CLIP on the procedural world, on CPU.

    python -m rlhf_diffusion.testbed.train --out rlhf_diffusion/assets/testbed      # ~45 min on 2 CPU cores

Why: no real Stable Diffusion weights can be loaded here and a random-weight pipeline draws noise, so nobody could
see whether a method aligns a model. This script builds a model that draws recognisable scenes of the world
(`testbed/world.py`) but still makes attribute mistakes (wrong shape, colour, count, position, binding), and a CLIP
that scores image-caption agreement. Both are saved in the real formats and load through the production code:

    <out>/pipeline/   a diffusers StableDiffusionPipeline directory (UNet2DConditionModel, AutoencoderKL,
                      CLIPTextModel, CLIPTokenizer, DDIMScheduler); `model.pretrained: testbed:pipeline`
    <out>/clip/       a transformers CLIPModel directory with tokenizer and preprocessor config;
                      `rewards: [{name: clip_score, path: testbed:clip}]`
    <out>/card.json   settings, per-stage losses and times, and the measured quality of every stage

Shapes: image (3, 64, 64) <-> VAE (4 blocks, scale factor 8) <-> latents (4, 8, 8); caption -> world tokenizer
(16 tokens) -> text encoder -> (16, 64) -> UNet cross-attention.

Stages (each saved before the next starts; `--stages` reruns a subset, e.g. after changing UNet settings):

1. data: renders `n_images` scenes drawn uniformly over all 414 captions (fixed seed).
2. vae: an `AutoencoderKL` trained on random 32x32 crops (it is convolutional; 4x cheaper than whole images) with
   L1 + L2 weighted 11x on object pixels (objects are ~5% of a scene; unweighted, the objects come last) + 1e-6 KL
   (the KL weight SD's autoencoder used); the latent scaling factor is set to 1 / std of the latents, as Rombach
   et al. did for SD (0.18215 there).
3. clip: a CLIP (ViT 64 px patch 8, 3 layers; text 2 layers), symmetric InfoNCE over batches of distinct
   captions, images with random noise and blur so it also judges the imperfect images a diffusion model draws.
4. unet: the UNet and the text encoder trained jointly from scratch (SD froze a pretrained CLIP text encoder; here
   there is none worth freezing), epsilon prediction on SD's scaled-linear 1000-step schedule, Min-SNR-5 loss
   weights (Hang et al. 2023: faster convergence), 10% empty captions for classifier-free guidance, an EMA of
   the weights (decay 0.999) is what is saved. The UNet is stored in float16 to keep the repository small; it loads
   in any dtype.
5. eval: the stock `StableDiffusionPipeline` loads <out>/pipeline and draws 2 images per caption (DDIM, 20 steps,
   eta 1, guidance 4); the world's checker scores them per attribute (the pre-alignment accuracy), and a grid
   PNG is written; the CLIP's caption retrieval accuracy on fresh renders is measured too.

The tokenizer is a real `CLIPTokenizer` (CLIP's byte-level BPE), but its merges are learned on the world's
captions until every word is one token, so the vocabulary is ~560 tokens instead of 49,408 (the token embedding
would otherwise be most of the file size); captions are at most 14 tokens, hence `model_max_length` 16.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from rlhf_diffusion.testbed import world

__all__ = ["TrainSettings", "build_world_tokenizer", "main", "train_testbed", "TOKENIZER_MAX_LENGTH"]

TOKENIZER_MAX_LENGTH = 16
TEXT_HIDDEN = 64
STAGES = ("data", "vae", "clip", "unet", "eval")
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


@dataclass
class TrainSettings:
    """Every knob of the training run (all saved in card.json)."""

    seed: int = 0
    size: int = 64
    n_images: int = 16384
    threads: int = 2
    # VAE
    vae_channels: tuple[int, ...] = (16, 32, 64, 64)
    vae_steps: int = 2000
    vae_batch: int = 32
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-6
    vae_crop: int = 32
    vae_object_weight: float = 5.0
    latent_channels: int = 8
    # CLIP
    clip_steps: int = 900
    clip_batch: int = 128
    clip_lr: float = 5e-4
    # UNet + text encoder
    unet_channels: tuple[int, ...] = (64, 128)
    unet_steps: int = 4000
    unet_batch: int = 64
    unet_lr: float = 4e-4
    unet_warmup: int = 200
    ema_decay: float = 0.999
    min_snr_gamma: float = 5.0
    uncond_prob: float = 0.1
    # eval
    eval_images_per_caption: int = 2
    eval_steps: int = 20
    eval_guidance: float = 4.0
    log_every: int = 100
    stages: tuple[str, ...] = field(default=STAGES)


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------


def learn_bpe_merges(words: Counter) -> list[tuple[str, str]]:
    """Byte-pair merges learned greedily (Sennrich et al.) on `words` until every word is a single symbol.

    Symbols follow CLIP's convention: a word is split into characters and its last character carries "</w>".
    Ties between equally frequent pairs go to the lexicographically smallest pair, so the result is deterministic.
    """
    seqs = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in words}
    merges: list[tuple[str, str]] = []
    while True:
        pairs: Counter = Counter()
        for w, freq in words.items():
            s = seqs[w]
            for a, b in zip(s, s[1:]):
                pairs[(a, b)] += freq
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        for w, s in seqs.items():
            out, i = [], 0
            while i < len(s):
                if i + 1 < len(s) and (s[i], s[i + 1]) == best:
                    out.append(s[i] + s[i + 1])
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = tuple(out)


def build_world_tokenizer():
    """A `CLIPTokenizer` whose BPE merges are learned on the world's captions (every word one token)."""
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    words = Counter(w for c in world.enumerate_captions() for w in c.split())
    merges = learn_bpe_merges(words)
    byte_symbols = list(bytes_to_unicode().values())
    tokens = byte_symbols + [s + "</w>" for s in byte_symbols] + ["".join(m) for m in merges] + list(SPECIAL_TOKENS)
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))
    tokenizer = CLIPTokenizer(
        vocab=vocab, merges=merges, pad_token="<|endoftext|>", model_max_length=TOKENIZER_MAX_LENGTH
    )
    longest = max(len(tokenizer(c).input_ids) for c in world.enumerate_captions())
    if longest > TOKENIZER_MAX_LENGTH:
        raise AssertionError(f"a caption has {longest} tokens > {TOKENIZER_MAX_LENGTH}")
    return tokenizer


def _text_config(tokenizer, **overrides):
    from transformers import CLIPTextConfig

    params = dict(
        vocab_size=len(tokenizer),
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        projection_dim=TEXT_HIDDEN,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    params.update(overrides)
    return CLIPTextConfig(**params)


def _tokens(tokenizer, captions: Sequence[str]) -> Tensor:
    return tokenizer(
        list(captions), padding="max_length", max_length=TOKENIZER_MAX_LENGTH, truncation=True, return_tensors="pt"
    ).input_ids


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


def render_dataset(n: int, size: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """`n` renders (n, size, size, 3) uint8 of scenes drawn uniformly over every caption, and their captions."""
    rng = np.random.default_rng(seed)
    captions = world.enumerate_captions()
    images = np.empty((n, size, size, 3), dtype=np.uint8)
    chosen = []
    for i in range(n):
        c = captions[rng.integers(len(captions))]
        images[i] = world.render(world.parse_caption(c), size, rng)
        chosen.append(c)
    return images, chosen


def _to_pixels(images: np.ndarray) -> Tensor:
    """uint8 (N, H, W, 3) -> float (N, 3, H, W) in [-1, 1]."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def _degrade(x: Tensor, gen: torch.Generator) -> Tensor:
    """Random Gaussian blur (sigma 0..1.2 px) and pixel noise (std 0..0.1 in [0, 1] units) per image, x in [0, 1]."""
    n = x.shape[0]
    sigma = torch.rand(n, generator=gen) * 1.2
    out = torch.empty_like(x)
    grid = torch.arange(-2, 3, dtype=torch.float32)
    for i in range(n):
        if sigma[i] < 0.2:
            out[i] = x[i]
            continue
        k = torch.exp(-(grid**2) / (2 * sigma[i] ** 2))
        k = k / k.sum()
        img = x[i : i + 1]
        img = F.conv2d(F.pad(img, (2, 2, 0, 0), mode="replicate"), k.view(1, 1, 1, 5).repeat(3, 1, 1, 1), groups=3)
        img = F.conv2d(F.pad(img, (0, 0, 2, 2), mode="replicate"), k.view(1, 1, 5, 1).repeat(3, 1, 1, 1), groups=3)
        out[i] = img[0]
    noise = torch.randn(x.shape, generator=gen) * torch.rand(n, 1, 1, 1, generator=gen) * 0.1
    return (out + noise).clamp(0, 1)


def _cosine_lr(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup))) * 0.9 + 0.1


def _log(log: Callable[[str], None], stage: str, step: int, total: int, loss: float, t0: float) -> None:
    log(f"[{stage}] step {step}/{total} loss {loss:.4f} ({time.time() - t0:.0f} s)")


def _stage_card(losses: list[float], t0: float, module: torch.nn.Module, **measured: object) -> dict[str, object]:
    """The card entry of a trained stage (VAE, CLIP): first loss, mean of the last 50, seconds since `t0`, the
    stage's `measured` values, and the module's parameter count."""
    return {
        "loss_first": losses[0],
        "loss_last": float(np.mean(losses[-50:])),
        "seconds": time.time() - t0,
        **measured,
        "parameters": sum(p.numel() for p in module.parameters()),
    }


# --------------------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------------------


def build_vae(s: TrainSettings):
    from diffusers import AutoencoderKL

    n = len(s.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=s.vae_channels,
        layers_per_block=1,
        latent_channels=s.latent_channels,
        norm_num_groups=16,
        sample_size=s.size,
        mid_block_add_attention=False,
    )  # fully convolutional: trains on crops, runs on wholes


def _object_weight(x: Tensor, object_weight: float) -> Tensor:
    """(N, 1, H, W) loss weights: 1 + object_weight where a pixel differs from the image's background colour (the
    median of its top two rows). Objects cover ~5% of a scene, so an unweighted loss learns the background first
    and the objects late (measured: 500 unweighted steps reconstructed backgrounds, but 2% of the colours)."""
    background = x[:, :, :2, :].flatten(2).median(-1).values[..., None, None]
    return 1 + object_weight * ((x - background).abs().amax(1, keepdim=True) > 0.1).float()


@torch.no_grad()
def _reconstruction_accuracy(vae, s: TrainSettings, n: int) -> dict[str, float]:
    """The checker on VAE reconstructions (posterior mode) of `n` fresh renders: the ceiling of the pipeline."""
    fresh, captions = render_dataset(n, s.size, s.seed + 1000)
    recon = vae.decode(vae.encode(_to_pixels(fresh)).latent_dist.mode()).sample
    return world.batch_accuracy(_from_pixels(recon), captions)


def train_vae(s: TrainSettings, images: np.ndarray, log) -> tuple[object, dict]:
    torch.manual_seed(s.seed)
    vae = build_vae(s)
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: _cosine_lr(k, s.vae_steps, 50))
    rng = np.random.default_rng(s.seed + 1)
    t0, losses = time.time(), []
    vae.train()
    for step in range(s.vae_steps):
        x = _to_pixels(images[rng.integers(len(images), size=s.vae_batch)])
        weight = _object_weight(x, s.vae_object_weight)
        if s.vae_crop < s.size:  # a random crop on the 8-pixel latent grid: the VAE is convolutional
            top, left = (8 * int(rng.integers((s.size - s.vae_crop) // 8 + 1)) for _ in range(2))
            x = x[:, :, top : top + s.vae_crop, left : left + s.vae_crop]
            weight = weight[:, :, top : top + s.vae_crop, left : left + s.vae_crop]
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample()).sample
        error = (recon - x).abs() + (recon - x).pow(2)
        loss = (weight * error).mean() / weight.mean() + s.vae_kl_weight * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % s.log_every == 0:
            _log(log, "vae", step + 1, s.vae_steps, float(np.mean(losses[-s.log_every :])), t0)
        if (step + 1) % 500 == 0:
            vae.eval()
            log(
                f"[vae] checker accuracy of reconstructions at step {step + 1}: {_reconstruction_accuracy(vae, s, 128)}"
            )
            vae.train()
    vae.eval()
    # Latent scale (Rombach et al.): 1 / std of the posterior samples, so the diffusion model sees unit variance.
    with torch.no_grad():
        z = torch.cat(
            [
                vae.encode(_to_pixels(images[i : i + 256])).latent_dist.sample()
                for i in range(0, min(len(images), 2048), 256)
            ]
        )
    scale = float(1.0 / z.std())
    vae.register_to_config(scaling_factor=scale)
    acc = _reconstruction_accuracy(vae, s, 256)
    log(f"[vae] scaling_factor {scale:.4f}; checker accuracy of reconstructions: {acc}")
    return vae, _stage_card(losses, t0, vae, scaling_factor=scale, reconstruction_checker_accuracy=acc)


def _from_pixels(x: Tensor) -> np.ndarray:
    """float (N, 3, H, W) in [-1, 1] -> uint8 (N, H, W, 3)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def build_clip(s: TrainSettings, tokenizer):
    from transformers import CLIPConfig, CLIPModel

    text = _text_config(tokenizer).to_dict()
    vision = dict(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        patch_size=8,
        image_size=s.size,
        projection_dim=TEXT_HIDDEN,
    )
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=TEXT_HIDDEN))


def _clip_normalise(x01: Tensor) -> Tensor:
    from rlhf_diffusion.rewards.preprocess import normalize

    return normalize(x01)


def train_clip(s: TrainSettings, tokenizer, images: np.ndarray, captions: list[str], log) -> tuple[object, dict]:
    torch.manual_seed(s.seed + 2)
    clip = build_clip(s, tokenizer)
    by_caption: dict[str, list[int]] = {}
    for i, c in enumerate(captions):
        by_caption.setdefault(c, []).append(i)
    names = sorted(by_caption)
    all_tokens = _tokens(tokenizer, names)
    opt = torch.optim.AdamW(clip.parameters(), lr=s.clip_lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: _cosine_lr(k, s.clip_steps, 100))
    rng = np.random.default_rng(s.seed + 2)
    gen = torch.Generator().manual_seed(s.seed + 2)
    t0, losses = time.time(), []
    clip.train()
    for step in range(s.clip_steps):
        chosen = rng.choice(len(names), size=min(s.clip_batch, len(names)), replace=False)
        idx = [by_caption[names[j]][rng.integers(len(by_caption[names[j]]))] for j in chosen]
        x = _degrade(_to_pixels(images[idx]).add(1).div(2), gen)
        out = clip(input_ids=all_tokens[chosen], pixel_values=_clip_normalise(x), return_loss=True)
        loss = out.loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(clip.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            clip.logit_scale.clamp_(0, math.log(100))
        losses.append(loss.item())
        if (step + 1) % s.log_every == 0:
            _log(log, "clip", step + 1, s.clip_steps, float(np.mean(losses[-s.log_every :])), t0)
    clip.eval()
    retrieval = clip_retrieval_accuracy(clip, tokenizer, s.size, s.seed + 2000)
    log(f"[clip] caption retrieval over all 414 captions on fresh renders: {retrieval}")
    return clip, _stage_card(losses, t0, clip, retrieval=retrieval)


def _features(out) -> Tensor:
    """L2-normalised projected CLIP features (transformers >= 5 wraps them in an output object)."""
    return F.normalize(getattr(out, "pooler_output", out).float(), dim=-1)


@torch.no_grad()
def clip_retrieval_accuracy(clip, tokenizer, size: int, seed: int, n: int = 512) -> dict[str, float]:
    """Top-1 accuracy of picking an image's caption among all 414 (clean renders, and blurred + noisy ones)."""
    names = world.enumerate_captions()
    text = _features(clip.get_text_features(input_ids=_tokens(tokenizer, names)))
    images, captions = render_dataset(n, size, seed)
    x = _to_pixels(images).add(1).div(2)
    target = torch.tensor([names.index(c) for c in captions])
    result = {}
    for name, pixels in (("clean", x), ("degraded", _degrade(x, torch.Generator().manual_seed(seed)))):
        feats = _features(clip.get_image_features(pixel_values=_clip_normalise(pixels)))
        result[name] = float(((feats @ text.T).argmax(-1) == target).float().mean())
    return result


def build_unet(s: TrainSettings):
    from diffusers import UNet2DConditionModel

    n = len(s.unet_channels)
    return UNet2DConditionModel(
        sample_size=s.size // 8,
        in_channels=s.latent_channels,
        out_channels=s.latent_channels,
        block_out_channels=s.unet_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        attention_head_dim=16,
        norm_num_groups=16,
        cross_attention_dim=TEXT_HIDDEN,
    )


def _scheduler():
    from diffusers import DDIMScheduler

    from rlhf_diffusion.models.tiny import SD_SCHEDULER_CONFIG

    return DDIMScheduler(**SD_SCHEDULER_CONFIG)


def train_unet(
    s: TrainSettings, tokenizer, vae, images: np.ndarray, captions: list[str], log, checkpoint: Path | None = None
) -> tuple[object, object, dict]:
    from transformers import CLIPTextModel

    torch.manual_seed(s.seed + 3)
    unet = build_unet(s)
    text_encoder = CLIPTextModel(_text_config(tokenizer))
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=s.unet_lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: _cosine_lr(k, s.unet_steps, s.unet_warmup))
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    t0 = time.time()
    log(f"[unet] encoding {len(images)} images to latents")
    with torch.no_grad():
        stats = [vae.encode(_to_pixels(images[i : i + 256])).latent_dist for i in range(0, len(images), 256)]
    mean = torch.cat([d.mean for d in stats])
    std = torch.cat([d.std for d in stats])
    scale = vae.config.scaling_factor
    tokens = _tokens(tokenizer, captions)
    empty = _tokens(tokenizer, [""])[0]
    alphas_cumprod = _scheduler().alphas_cumprod
    start, losses = 0, []
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        for module, key in ((unet, "unet"), (text_encoder, "text"), (ema_unet, "ema_unet"), (ema_text, "ema_text")):
            module.load_state_dict(state[key])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, losses = state["step"], state["losses"]
        torch.set_rng_state(state["torch_rng"])
        log(f"[unet] resumed at step {start}")
    rng = np.random.default_rng(s.seed + 3 + start)
    unet.train()
    text_encoder.train()
    for step in range(start, s.unet_steps):
        idx = rng.integers(len(images), size=s.unet_batch)
        z0 = (mean[idx] + std[idx] * torch.randn_like(mean[idx])) * scale
        ids = tokens[idx].clone()
        drop = torch.from_numpy(rng.random(s.unet_batch) < s.uncond_prob)
        ids[drop] = empty
        t = torch.randint(0, len(alphas_cumprod), (s.unet_batch,))
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        eps = torch.randn_like(z0)
        zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
        cond = text_encoder(ids).last_hidden_state
        pred = unet(zt, t, encoder_hidden_states=cond).sample
        snr = a.view(-1) / (1 - a.view(-1))
        weight = torch.clamp(snr, max=s.min_snr_gamma) / snr  # Min-SNR-gamma for epsilon prediction
        loss = (weight * (pred - eps).pow(2).mean(dim=(1, 2, 3))).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(s.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)
        losses.append(loss.item())
        if (step + 1) % s.log_every == 0:
            _log(log, "unet", step + 1, s.unet_steps, float(np.mean(losses[-s.log_every :])), t0)
        if checkpoint is not None and ((step + 1) % 500 == 0 or step + 1 == s.unet_steps):
            tmp = checkpoint.with_suffix(".tmp")
            torch.save(
                {
                    "unet": unet.state_dict(),
                    "text": text_encoder.state_dict(),
                    "ema_unet": ema_unet.state_dict(),
                    "ema_text": ema_text.state_dict(),
                    "opt": opt.state_dict(),
                    "sched": sched.state_dict(),
                    "step": step + 1,
                    "losses": losses,
                    "torch_rng": torch.get_rng_state(),
                },
                tmp,
            )
            tmp.replace(checkpoint)
    return (
        ema_unet.eval(),
        ema_text.eval(),
        {
            "loss_first": losses[0],
            "loss_last": float(np.mean(losses[-200:])),
            "seconds_this_session": time.time() - t0,
            "unet_parameters": sum(p.numel() for p in unet.parameters()),
            "text_parameters": sum(p.numel() for p in text_encoder.parameters()),
            "loss_curve": [float(np.mean(losses[i : i + s.log_every])) for i in range(0, len(losses), s.log_every)],
        },
    )


def save_pipeline(out: Path, unet, vae, text_encoder, tokenizer) -> Path:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=copy.deepcopy(unet).half(),
        scheduler=_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    return out


def save_clip(out: Path, clip, tokenizer, size: int) -> Path:
    from transformers import CLIPImageProcessor

    from rlhf_diffusion.rewards.preprocess import CLIP_MEAN, CLIP_STD

    clip.save_pretrained(out)
    tokenizer.save_pretrained(out)
    CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        resample=3,
        do_center_crop=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    ).save_pretrained(out)
    return out


@torch.no_grad()
def sample_every_caption(
    pipe, captions: Sequence[str], k: int, seed: int, steps: int, guidance: float, **call_kwargs
) -> tuple[np.ndarray, list[str]]:
    """`k` images of each caption from a stock diffusers pipeline, 32 captions a call, one generator seeded `seed`:
    uint8 (N, H, W, 3) caption-major, and the caption of each image. `call_kwargs` go to every pipeline call."""
    gen = torch.Generator().manual_seed(seed)
    images, prompts = [], []
    for i in range(0, len(captions), 32):
        chunk = [c for c in captions[i : i + 32] for _ in range(k)]
        out = pipe(
            chunk,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gen,
            output_type="np",
            **call_kwargs,
        ).images
        images.append((out * 255).round().astype(np.uint8))
        prompts += chunk
    return np.concatenate(images), prompts


@torch.no_grad()
def evaluate_pipeline(pipeline_dir: Path, s: TrainSettings, log, grid_path: Path | None = None) -> dict:
    """Loads `pipeline_dir` with the stock diffusers pipeline and measures the checker accuracy per attribute."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipeline_dir, dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    captions = world.enumerate_captions()
    k = s.eval_images_per_caption
    t0 = time.time()
    images_np, prompts = sample_every_caption(pipe, captions, k, s.seed + 4, s.eval_steps, s.eval_guidance, eta=1.0)
    acc = world.batch_accuracy(list(images_np), prompts)
    log(
        f"[eval] checker accuracy of the pipeline before alignment ({len(prompts)} images, "
        f"{time.time() - t0:.0f} s): {acc}"
    )
    if grid_path is not None:
        write_sample_grid(images_np, captions, k, grid_path)
    return {
        "checker_accuracy": acc,
        "images": len(prompts),
        "steps": s.eval_steps,
        "guidance": s.eval_guidance,
        "eta": 1.0,
    }


def write_sample_grid(images: np.ndarray, captions: Sequence[str], k: int, path: Path) -> None:
    """A PNG of 16 fixed captions (rows) x their `k` images (`images` caption-major, k per caption), 128 px a cell,
    and the captions beside it in `path` with the suffix .txt."""
    from PIL import Image

    rng = np.random.default_rng(0)
    pick = sorted(rng.choice(len(captions), size=16, replace=False))
    rows = [np.concatenate([images[j * k + m] for m in range(k)], axis=1) for j in pick]
    Image.fromarray(np.concatenate(rows, axis=0)).resize((k * 128, 16 * 128), Image.NEAREST).save(path)
    path.with_suffix(".txt").write_text("\n".join(captions[j] for j in pick) + "\n")


PROMPT_SPLIT = dict(seed=0, held_out_fraction=0.2)
PROMPT_SETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "prompts"


def prompt_set_texts() -> dict[str, str]:
    """The built-in prompt sets `testbed_train` / `testbed_heldout`: the world's fixed caption split, as files."""
    train, held_out = world.split_captions(**PROMPT_SPLIT)
    texts = {}
    for name, index, captions in (("testbed_train", 0, train), ("testbed_heldout", 1, held_out)):
        header = (
            f"# {len(captions)} captions of the testbed world (rlhf_diffusion/testbed/world.py): "
            f"testbed.world.split_captions(seed={PROMPT_SPLIT['seed']}, "
            f"held_out_fraction={PROMPT_SPLIT['held_out_fraction']})[{index}].\n"
            "# Regenerate: python -m rlhf_diffusion.testbed.train --write-prompt-sets\n"
        )
        texts[name] = header + "\n".join(captions) + "\n"
    return texts


def train_testbed(out: Path, s: TrainSettings, log: Callable[[str], None] = print) -> dict:
    """Runs the stages in `s.stages`, reusing the saved results of the others from `out`."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel

    torch.set_num_threads(s.threads)
    out.mkdir(parents=True, exist_ok=True)
    cache = out / "_cache"
    cache.mkdir(exist_ok=True)
    card_path = out / "card.json"
    card = json.loads(card_path.read_text()) if card_path.exists() else {}
    card["settings"] = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()}
    tokenizer = build_world_tokenizer()
    data_file = cache / f"data_{s.n_images}_{s.size}_{s.seed}.npz"
    if "data" in s.stages or not data_file.exists():
        t0 = time.time()
        images, captions = render_dataset(s.n_images, s.size, s.seed)
        np.savez(data_file, images=images, captions=np.array(captions))
        card["data"] = {"images": s.n_images, "seconds": time.time() - t0}
        log(f"[data] {s.n_images} renders in {time.time() - t0:.0f} s")
    loaded = np.load(data_file)
    images, captions = loaded["images"], [str(c) for c in loaded["captions"]]

    vae_dir = cache / "vae"
    if "vae" in s.stages or not vae_dir.exists():
        vae, card["vae"] = train_vae(s, images, log)
        vae.save_pretrained(vae_dir)
    vae = AutoencoderKL.from_pretrained(vae_dir).eval()

    clip_dir = out / "clip"
    if "clip" in s.stages or not clip_dir.exists():
        clip, card["clip"] = train_clip(s, tokenizer, images, captions, log)
        save_clip(clip_dir, clip, tokenizer, s.size)
    card_path.write_text(json.dumps(card, indent=2))

    pipeline_dir = out / "pipeline"
    if "unet" in s.stages or not pipeline_dir.exists():
        unet, text_encoder, card["unet"] = train_unet(
            s, tokenizer, vae, images, captions, log, checkpoint=cache / "unet_train.pt"
        )
        save_pipeline(pipeline_dir, unet, vae, text_encoder, tokenizer)
        card_path.write_text(json.dumps(card, indent=2))
    else:
        UNet2DConditionModel.from_pretrained(pipeline_dir, subfolder="unet")  # fail early if unreadable
        CLIPTextModel.from_pretrained(pipeline_dir, subfolder="text_encoder")
        CLIPModel.from_pretrained(clip_dir)

    if "eval" in s.stages:
        card["eval"] = evaluate_pipeline(pipeline_dir, s, log, grid_path=out / "samples_before_alignment.png")
    card_path.write_text(json.dumps(card, indent=2))
    return card


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="output directory (pipeline/, clip/, card.json)")
    parser.add_argument(
        "--write-prompt-sets",
        action="store_true",
        help="(re)write the built-in prompt sets testbed_train / testbed_heldout and exit",
    )
    parser.add_argument(
        "--stages",
        default=",".join(STAGES),
        help=f"comma-separated subset of {','.join(STAGES)}; the others reuse saved results",
    )
    for name, value in asdict(TrainSettings()).items():
        if name == "stages" or isinstance(value, tuple):
            continue
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    if args.write_prompt_sets:
        for name, text in prompt_set_texts().items():
            (PROMPT_SETS_DIR / f"{name}.txt").write_text(text)
        return 0
    if args.out is None:
        parser.error("--out is required")
    stages = tuple(x for x in args.stages.split(",") if x)
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f"--stages: unknown stage(s) {sorted(unknown)}; valid: {','.join(STAGES)}")
    values = {k: getattr(args, k) for k in asdict(TrainSettings()) if hasattr(args, k) and k != "stages"}
    settings = TrainSettings(**values, stages=stages)
    t0 = time.time()
    train_testbed(args.out, settings)
    print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

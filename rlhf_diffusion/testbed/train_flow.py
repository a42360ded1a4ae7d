"""Trains the testbed's flow-matching pipeline (SD3-shaped, `testbed:flow`) on the procedural world, on CPU.

    python -m rlhf_diffusion.testbed.train_flow --out rlhf_diffusion/assets/testbed/flow     # ~35 min on 1 core

The flow counterpart of `testbed/train.py` (the UNet pipeline, `testbed:pipeline`): the same world, the same 16,384
renders (same seed), the same world tokenizer and the same image decoder, so that the UNet and the flow model are
judged by the same checker on the same captions and differ in their denoiser and its training objective only.

What is built, in the stock `StableDiffusion3Pipeline` layout (loads with `StableDiffusion3Pipeline.from_pretrained`):

    transformer/      SD3Transformer2DModel (MMDiT): 8 joint blocks, 4 heads x 32, 2x2 latent patches (16 image
                      tokens), float16 on disk
    vae/              the UNet testbed's AutoencoderKL (8 latent channels, 8x down-sampling), with SD3's latent
                      convention: latents = (vae.encode(x) - shift_factor) * scaling_factor, both measured here
    text_encoder(_2)/ two CLIPTextModelWithProjection (3 layers, width 64; CLIP-L / CLIP-G's roles) trained jointly
                      with the transformer from scratch; tokenizer(_2)/ the world tokenizer (16 tokens)
    scheduler/        FlowMatchEulerDiscreteScheduler (rectified flow) with the shift chosen by the eval below
    (no T5)           trained with no T5 tokens: a stock pipeline call must pass `max_sequence_length=0`
                      (`TESTBED_FLOW_T5_TOKENS`); call_defaults.json says so, and the package's loader reads it

Training: rectified flow (Esser et al. 2024, SD3): x_σ = (1 − σ) x_0 + σ ε, the transformer predicts v = ε − x_0 at
timestep 1000 σ, σ drawn logit-normal(0, 1) (their best-ranked sampler), an unweighted MSE; 10% empty captions for
classifier-free guidance; an EMA of the weights (decay 0.999) is what is saved, as for the UNet testbed.

Why no T5 tokens: without a T5 encoder the stock pipeline appends `max_sequence_length` (default 256) zero tokens
to the 16 CLIP tokens; on CPU they made a training step 4.4x slower (measured on a smaller version: 4 blocks of
width 64, 1x1 patches) while carrying nothing. A real SD3 without T5 reads them; this testbed was trained without
them, so it must be called without them.

Eval: the stock pipeline draws 2 images per caption (all 414 captions, 20 Euler steps, guidance 4) for each
candidate scheduler shift; the world's checker scores them; the best shift goes into the saved scheduler config.
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from rlhf_diffusion.models.loading import CALL_DEFAULTS_FILE
from rlhf_diffusion.testbed import world
from rlhf_diffusion.testbed.train import (
    _cosine_lr,
    _log,
    _text_config,
    _to_pixels,
    _tokens,
    build_world_tokenizer,
    render_dataset,
    sample_every_caption,
    write_sample_grid,
)

__all__ = ["FlowTrainSettings", "TESTBED_FLOW_T5_TOKENS", "main", "train_flow_testbed"]

# T5 tokens the testbed flow model was trained with (the pipelines' `max_sequence_length`); see the module docstring.
TESTBED_FLOW_T5_TOKENS = 0


@dataclass
class FlowTrainSettings:
    """Every knob of the flow testbed's training run (all saved in card.json)."""

    seed: int = 0
    size: int = 64
    n_images: int = 16384  # the same renders as testbed/train.py (same seed)
    threads: int = 1
    vae: str = ""  # the VAE directory; "" = the shipped UNet testbed's (testbed:pipeline/vae)
    layers: int = 8
    heads: int = 4
    head_dim: int = 32
    patch_size: int = 2
    text_hidden: int = 64
    text_layers: int = 3
    steps: int = 5000
    batch: int = 64
    lr: float = 4e-4
    warmup: int = 200
    ema_decay: float = 0.999
    uncond_prob: float = 0.1
    logit_mean: float = 0.0
    logit_std: float = 1.0
    eval_images_per_caption: int = 2
    eval_steps: int = 20
    eval_guidance: float = 4.0
    eval_shifts: str = "1,3"  # comma-separated scheduler shifts the eval compares (SD3's is 3)
    log_every: int = 100
    skip_train: bool = False  # reuse <out>/_cache/train.pt at its last step (re-run the eval only)


def _vae_dir(s: FlowTrainSettings) -> str:
    if s.vae:
        return s.vae
    from rlhf_diffusion.testbed.assets import resolve_testbed

    return str(Path(resolve_testbed("testbed:pipeline")) / "vae")


@torch.no_grad()
def sd3_latent_vae(vae_dir: str, images: np.ndarray):
    """The VAE at `vae_dir` with SD3's latent convention measured on `images` (posterior samples of up to 2048):
    shift_factor = their mean, scaling_factor = 1 / their std after the shift, so the transformer sees zero-mean,
    unit-variance latents (SD3's VAE config carries the two numbers, 0.0609 and 1.5305, the same way)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir).eval()
    z = torch.cat(
        [
            vae.encode(_to_pixels(images[i : i + 256])).latent_dist.sample()
            for i in range(0, min(len(images), 2048), 256)
        ]
    )
    shift = float(z.mean())
    vae.register_to_config(shift_factor=shift, scaling_factor=float(1.0 / (z - shift).std()))
    return vae


def build_transformer(s: FlowTrainSettings, latent_channels: int):
    from diffusers import SD3Transformer2DModel

    side = s.size // 8
    return SD3Transformer2DModel(
        sample_size=side,
        patch_size=s.patch_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        num_layers=s.layers,
        attention_head_dim=s.head_dim,
        num_attention_heads=s.heads,
        joint_attention_dim=2 * s.text_hidden,  # CLIP-L || CLIP-G hidden states (SD3 pads them to T5's width)
        caption_projection_dim=s.heads * s.head_dim,
        pooled_projection_dim=2 * s.text_hidden,  # CLIP-L || CLIP-G pooled projections
        pos_embed_max_size=side // s.patch_size,
    )


def build_text_encoders(s: FlowTrainSettings, tokenizer):
    from transformers import CLIPTextModelWithProjection

    config = _text_config(
        tokenizer,
        hidden_size=s.text_hidden,
        intermediate_size=4 * s.text_hidden,
        num_hidden_layers=s.text_layers,
        projection_dim=s.text_hidden,
    )
    torch.manual_seed(s.seed + 11)
    first = CLIPTextModelWithProjection(config)
    torch.manual_seed(s.seed + 12)
    return first, CLIPTextModelWithProjection(config)


def encode(text_encoders, ids: Tensor) -> tuple[Tensor, Tensor]:
    """StableDiffusion3Pipeline.encode_prompt without T5: both encoders' penultimate hidden states concatenated on
    the feature axis (B, 16, 2 D), and their projected pooled embeddings concatenated (B, 2 D)."""
    hidden, pooled = [], []
    for encoder in text_encoders:
        out = encoder(ids, output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
        pooled.append(out.text_embeds)
    return torch.cat(hidden, dim=-1), torch.cat(pooled, dim=-1)


def train_transformer(
    s: FlowTrainSettings, tokenizer, vae, images: np.ndarray, captions: list[str], log, checkpoint: Path | None
) -> tuple[object, list, dict]:
    """Trains the transformer and both text encoders jointly; returns the EMA copies and the stage's card entry."""
    torch.manual_seed(s.seed + 10)
    transformer = build_transformer(s, vae.config.latent_channels)
    encoders = list(build_text_encoders(s, tokenizer))
    params = list(transformer.parameters()) + [p for e in encoders for p in e.parameters()]
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: _cosine_lr(k, s.steps, s.warmup))
    ema = [copy.deepcopy(m).requires_grad_(False) for m in (transformer, *encoders)]
    t0 = time.time()
    log(f"[flow] encoding {len(images)} images to latents")
    with torch.no_grad():
        stats = [vae.encode(_to_pixels(images[i : i + 256])).latent_dist for i in range(0, len(images), 256)]
    mean, std = torch.cat([d.mean for d in stats]), torch.cat([d.std for d in stats])
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    tokens, empty = _tokens(tokenizer, captions), _tokens(tokenizer, [""])[0]
    start, losses = 0, []
    if checkpoint is not None and checkpoint.exists():
        state = torch.load(checkpoint, weights_only=True)
        for module, key in zip((transformer, *encoders, *ema), ("tr", "te1", "te2", "ema_tr", "ema_te1", "ema_te2")):
            module.load_state_dict(state[key])
        opt.load_state_dict(state["opt"])
        sched.load_state_dict(state["sched"])
        start, losses = state["step"], state["losses"]
        torch.set_rng_state(state["torch_rng"])
        log(f"[flow] resumed at step {start}")
    rng = np.random.default_rng(s.seed + 10 + start)
    modules = (transformer, *encoders)
    for m in modules:
        m.train()
    for step in range(start, s.steps):
        idx = rng.integers(len(images), size=s.batch)
        x0 = (mean[idx] + std[idx] * torch.randn_like(mean[idx]) - shift) * scale
        ids = tokens[idx].clone()
        ids[torch.from_numpy(rng.random(s.batch) < s.uncond_prob)] = empty
        sigma = torch.sigmoid(s.logit_mean + s.logit_std * torch.randn(s.batch))
        eps = torch.randn_like(x0)
        s4 = sigma.view(-1, 1, 1, 1)
        x_sigma = (1 - s4) * x0 + s4 * eps
        hidden, pooled = encode(encoders, ids)
        v = transformer(
            hidden_states=x_sigma, encoder_hidden_states=hidden, pooled_projections=pooled, timestep=sigma * 1000
        ).sample
        loss = (v - (eps - x0)).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(s.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for slow, live in zip(ema, modules):
                for pe, pl in zip(slow.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)
        losses.append(loss.item())
        if (step + 1) % s.log_every == 0:
            _log(log, "flow", step + 1, s.steps, float(np.mean(losses[-s.log_every :])), t0)
        if checkpoint is not None and ((step + 1) % 250 == 0 or step + 1 == s.steps):
            state = dict(
                zip(("tr", "te1", "te2", "ema_tr", "ema_te1", "ema_te2"), (m.state_dict() for m in (*modules, *ema)))
            )
            state.update(
                opt=opt.state_dict(),
                sched=sched.state_dict(),
                step=step + 1,
                losses=losses,
                torch_rng=torch.get_rng_state(),
            )
            tmp = checkpoint.with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(checkpoint)
    card = {
        "loss_first": losses[0] if losses else None,
        "loss_last": float(np.mean(losses[-200:])) if losses else None,
        "seconds_this_session": time.time() - t0,
        "transformer_parameters": sum(p.numel() for p in transformer.parameters()),
        "text_encoder_parameters": sum(p.numel() for e in encoders for p in e.parameters()),
        "loss_curve": [float(np.mean(losses[i : i + s.log_every])) for i in range(0, len(losses), s.log_every)],
    }
    return ema[0].eval(), [e.eval() for e in ema[1:]], card


def save_flow_pipeline(out: Path, transformer, vae, text_encoders, tokenizer, shift: float) -> Path:
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline(
        transformer=copy.deepcopy(transformer).half(),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        vae=vae,
        text_encoder=text_encoders[0],
        tokenizer=tokenizer,
        text_encoder_2=text_encoders[1],
        tokenizer_2=tokenizer,
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.save_pretrained(out)
    # Trained without T5 tokens: every loader of this directory in the package calls it so (models/loading.py).
    (out / CALL_DEFAULTS_FILE).write_text(json.dumps({"max_sequence_length": TESTBED_FLOW_T5_TOKENS}) + "\n")
    return out


@torch.no_grad()
def evaluate_flow_pipeline(
    pipeline_dir: Path, s: FlowTrainSettings, shift: float, log, grid_path: Path | None = None
) -> dict:
    """Loads `pipeline_dir` with the stock `StableDiffusion3Pipeline` (its scheduler's shift set to `shift`) and
    measures the checker accuracy per attribute on `eval_images_per_caption` images of every caption."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    pipe = StableDiffusion3Pipeline.from_pretrained(
        pipeline_dir, text_encoder_3=None, tokenizer_3=None, dtype=torch.float32
    )
    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=shift)
    pipe.set_progress_bar_config(disable=True)
    captions = world.enumerate_captions()
    k = s.eval_images_per_caption
    t0 = time.time()
    images_np, prompts = sample_every_caption(
        pipe, captions, k, s.seed + 4, s.eval_steps, s.eval_guidance, max_sequence_length=TESTBED_FLOW_T5_TOKENS
    )
    acc = world.batch_accuracy(list(images_np), prompts)
    log(f"[eval] shift {shift}: checker accuracy ({len(prompts)} images, {time.time() - t0:.0f} s): {acc}")
    if grid_path is not None:
        write_sample_grid(images_np, captions, k, grid_path)
    return {"checker_accuracy": acc, "images": len(prompts), "steps": s.eval_steps, "guidance": s.eval_guidance}


def train_flow_testbed(out: Path, s: FlowTrainSettings, log: Callable[[str], None] = print) -> dict:
    """Renders the data, trains, evaluates each candidate shift, saves `<out>` (the pipeline directory) with the
    best, and writes the card `<out>/../<name>_card.json` beside it; renders and the training checkpoint are cached
    in `<out>/../_cache_<name>` (a rerun resumes from it)."""
    torch.set_num_threads(s.threads)
    out.mkdir(parents=True, exist_ok=True)
    cache = out.parent / f"_cache_{out.name}"
    cache.mkdir(exist_ok=True)
    card: dict = {"settings": asdict(s)}
    tokenizer = build_world_tokenizer()
    data_file = cache / f"data_{s.n_images}_{s.size}_{s.seed}.npz"
    if not data_file.exists():
        t0 = time.time()
        images, captions = render_dataset(s.n_images, s.size, s.seed)
        np.savez(data_file, images=images, captions=np.array(captions))
        log(f"[data] {s.n_images} renders in {time.time() - t0:.0f} s")
    loaded = np.load(data_file)
    images, captions = loaded["images"], [str(c) for c in loaded["captions"]]
    torch.manual_seed(s.seed + 9)  # the posterior samples the latent statistics are measured on
    vae = sd3_latent_vae(_vae_dir(s), images)
    card["vae"] = {
        "source": s.vae or "testbed:pipeline/vae",
        "shift_factor": vae.config.shift_factor,
        "scaling_factor": vae.config.scaling_factor,
    }
    log(f"[vae] {card['vae']}")
    if s.skip_train:
        s_done = FlowTrainSettings(**{**asdict(s), "steps": torch.load(cache / "train.pt", weights_only=True)["step"]})
        transformer, encoders, card["flow"] = train_transformer(
            s_done, tokenizer, vae, images, captions, log, cache / "train.pt"
        )
    else:
        transformer, encoders, card["flow"] = train_transformer(
            s, tokenizer, vae, images, captions, log, cache / "train.pt"
        )
    shifts = [float(x) for x in s.eval_shifts.split(",") if x]
    card["eval"] = {}
    best = None
    for shift in shifts:
        save_flow_pipeline(out, transformer, vae, encoders, tokenizer, shift)
        result = evaluate_flow_pipeline(out, s, shift, log, grid_path=cache / f"samples_shift{shift:g}.png")
        card["eval"][f"shift_{shift:g}"] = result
        if (
            best is None
            or result["checker_accuracy"]["all"] > card["eval"][f"shift_{best:g}"]["checker_accuracy"]["all"]
        ):
            best = shift
    save_flow_pipeline(out, transformer, vae, encoders, tokenizer, best)
    card["chosen_shift"] = best
    card_path = out.parent / f"{out.name}_card.json"
    card_path.write_text(json.dumps(card, indent=2))
    log(f"[done] shift {best} saved; card {card_path}")
    return card


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the pipeline directory to write")
    for name, value in asdict(FlowTrainSettings()).items():
        if isinstance(value, bool):
            parser.add_argument(f"--{name.replace('_', '-')}", action="store_true")
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    settings = FlowTrainSettings(**{k: getattr(args, k) for k in asdict(FlowTrainSettings())})
    t0 = time.time()
    train_flow_testbed(args.out, settings)
    print(f"done in {time.time() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

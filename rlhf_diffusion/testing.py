"""Helpers for the tests and benchmarks: tiny random-weight reward models, each builder writing a directory in the
real model's published format so the production loaders read it (no downloads); `tiny_run_config` and
`tiny_loop_run_config`, the configs of small runs on a tiny pipeline, `tiny_trainer` and `tiny_loop_trainer`, the
in-process trainers the method tests build on them, and what those tests do to a trainer and a run (`perturb_lora`,
`descend_lora`, `check_lora_changed`, `launch_tiny`); and the checks the policy-gradient method tests (DDPO, GRPO)
share. Test code only; no product module imports this one (the tiny diffusion pipelines, which
`model.pretrained: tiny:sd15` builds, stay in `models/tiny.py`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import open_clip
import torch
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

from rlhf_diffusion.models.tiny import build_clip_tokenizer, clip_text_config
from rlhf_diffusion.rewards.aesthetic import EMBED_DIM, MLP_FILENAMES, AestheticMLP
from rlhf_diffusion.rewards.hpsv2 import OPEN_CLIP_CONFIG
from rlhf_diffusion.rewards.imagereward import (
    CHECKPOINT_FILENAME,
    CONFIG_FILENAME,
    EXTRA_SPECIAL_TOKENS,
    TOKENIZER_DIRNAME,
    ImageRewardConfig,
    ImageRewardModel,
    hf_to_official_key,
)
from rlhf_diffusion.rewards.preprocess import CLIP_MEAN, CLIP_STD

if TYPE_CHECKING:
    from rlhf_diffusion.batches import RolloutBatch
    from rlhf_diffusion.local_trainer import LocalTrainer

__all__ = [
    "build_tiny_aesthetic",
    "build_tiny_clip_score",
    "build_tiny_hpsv2",
    "build_tiny_imagereward",
    "build_tiny_pickscore",
    "check_algorithm_config_errors",
    "check_lora_changed",
    "check_reward_batch_independence",
    "check_reward_gradients",
    "clip_image_processor",
    "descend_lora",
    "kl_term_alone",
    "launch_tiny",
    "pair_log_ratios",
    "perturb_lora",
    "random_images",
    "check_ratio_one_on_the_first_step",
    "log_prob_change_after_one_step",
    "run_metrics",
    "save_tiny_clip",
    "smooth_uint8_image",
    "tiny_trainer",
    "tiny_clip_config",
    "tiny_imagereward_config",
    "tiny_loop_run_config",
    "tiny_loop_trainer",
    "tiny_open_clip_config",
    "tiny_run_config",
]


def random_images(n: int = 2, h: int = 64, w: int = 64, seed: int = 0) -> torch.Tensor:
    """(n, 3, h, w) uniform noise in [0, 1), seeded: the reward tests' images."""
    return torch.rand(n, 3, h, w, generator=torch.Generator().manual_seed(seed))


def smooth_uint8_image(h: int, w: int, seed: int = 0) -> torch.Tensor:
    """A smooth (3, H, W) uint8 image in grey levels 51..204, so no resize overshoots [0, 255]."""
    coarse = torch.rand(1, 3, 4, 6, generator=torch.Generator().manual_seed(seed)) * 0.6 + 0.2
    smooth = torch.nn.functional.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=True)
    return (smooth * 255).round().to(torch.uint8)[0]


def check_reward_gradients(
    reward: Any, images: torch.Tensor, prompts: Sequence[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """A differentiable reward's gradient contract: d score / d image has the images' shape, is finite, and is
    non-zero for every image. Returns `reward.score_and_grad(images, prompts)`."""
    scores, grad = reward.score_and_grad(images, prompts)
    assert grad.shape == images.shape and torch.isfinite(grad).all()
    assert (grad.flatten(1).abs().sum(dim=1) > 0).all()
    return scores, grad


def check_reward_batch_independence(reward: Any, images: torch.Tensor, prompts: Sequence[str]) -> None:
    """A batch scores each image as that image alone would (to 1e-5)."""
    together = reward.score(images, prompts)
    alone = torch.cat([reward.score(images[i : i + 1], prompts[i : i + 1]) for i in range(len(images))])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


def tiny_clip_config(*, projection_dim: int = 16) -> CLIPConfig:
    """A tiny CLIP (2-layer width-32 vision tower, patch 14, input 224 as the real processor config; 1-layer
    width-16 text tower with the real 49,408-token vocabulary and 77 positions) with the special-token ids of the
    real OpenAI CLIP tokenizer."""
    text = clip_text_config(
        hidden_size=16, intermediate_size=32, num_layers=1, num_heads=2, projection_dim=projection_dim
    )
    return CLIPConfig(
        text_config=text.to_dict(),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            patch_size=14,
            image_size=224,
            projection_dim=projection_dim,
        ),
        projection_dim=projection_dim,
    )


def clip_image_processor() -> CLIPImageProcessor:
    """The real CLIP / PickScore processor settings: shortest edge 224, centre crop 224, bicubic, OpenAI mean/std."""
    return CLIPImageProcessor(
        size={"shortest_edge": 224},
        crop_size={"height": 224, "width": 224},
        resample=3,
        do_center_crop=True,
        image_mean=list(CLIP_MEAN),
        image_std=list(CLIP_STD),
    )


def save_tiny_clip(out_dir: str | Path, *, projection_dim: int, seed: int = 0) -> Path:
    """Saves a tiny random-weight CLIP as a Hugging Face model directory laid out like `openai/clip-vit-large-patch14`:
    `config.json` + `model.safetensors`, the CLIP BPE tokenizer, and `preprocessor_config.json` with the real
    processor settings (shortest edge 224, centre crop 224, bicubic, OpenAI mean/std)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    CLIPModel(tiny_clip_config(projection_dim=projection_dim)).save_pretrained(out_dir)
    build_clip_tokenizer().save_pretrained(out_dir)
    clip_image_processor().save_pretrained(out_dir)
    return out_dir


def build_tiny_clip_score(out_dir: str | Path, seed: int = 0) -> Path:
    """Builds a tiny random-weight CLIP model directory for the `clip_score` reward (tests only).

    Same format as the real hub model (`CLIPModel.save_pretrained` + tokenizer + preprocessor config), so
    `ClipScore(path=<returned dir>)` exercises the production loading code. Projection width 16, input 224.

    Returns:
        `out_dir` as a `Path`, to pass as the reward's `path`.
    """
    return save_tiny_clip(out_dir, projection_dim=16, seed=seed)


def build_tiny_aesthetic(out_dir: str | Path, seed: int = 0) -> Path:
    """Builds a tiny random-weight aesthetic predictor directory (tests only).

    The directory holds a tiny CLIP in Hugging Face `CLIPModel` format with the real projection width 768
    (so the real MLP file would fit it) and a random MLP head saved as `sac+logos+ava1-l14-linearMSE.pth` with the
    real file's layer names and shapes; `Aesthetic(path=<returned dir>)` loads both through the production code.

    Returns:
        `out_dir` as a `Path`, to pass as the reward's `path`.
    """
    out_dir = save_tiny_clip(out_dir, projection_dim=EMBED_DIM, seed=seed)
    torch.manual_seed(seed + 1)
    torch.save(AestheticMLP().state_dict(), out_dir / MLP_FILENAMES[0])
    return out_dir


def tiny_open_clip_config() -> dict:
    """`open_clip_config.json` content of the tiny test model: a 2-layer width-32 ViT (patch 14, input 224) and a
    1-layer width-16 text transformer with the real 49,408-token vocabulary and 77 positions, embed width 16;
    preprocessing = HPSv2's (longest side, zero fill, bicubic, OpenAI mean/std)."""
    return {
        "model_cfg": {
            "embed_dim": 16,
            "vision_cfg": {"image_size": 224, "layers": 2, "width": 32, "head_width": 16, "patch_size": 14},
            "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 16, "heads": 2, "layers": 1},
        },
        "preprocess_cfg": {
            "size": 224,
            "mean": list(CLIP_MEAN),
            "std": list(CLIP_STD),
            "interpolation": "bicubic",
            "resize_mode": "longest",
            "fill_color": 0,
        },
    }


def build_tiny_hpsv2(out_dir: str | Path, seed: int = 0) -> Path:
    """Builds a tiny random-weight HPS-shaped model as an open_clip model directory (tests only).

    The directory holds `open_clip_config.json` and `open_clip_pytorch_model.bin` (a plain state dict), the format
    `open_clip.create_model_and_transforms("local-dir:<dir>")` reads; `HPSv2(path=<returned dir>)` loads it through
    the production code.

    Returns:
        `out_dir` as a `Path`, to pass as the reward's `path`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = tiny_open_clip_config()
    (out_dir / OPEN_CLIP_CONFIG).write_text(json.dumps(config, indent=2))
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**config["model_cfg"])
    torch.save(model.state_dict(), out_dir / "open_clip_pytorch_model.bin")
    return out_dir


def build_tiny_pickscore(out_dir: str | Path, seed: int = 0) -> Path:
    """Builds a tiny random-weight PickScore directory (tests only).

    Same format as the real model plus its processor: `CLIPModel.save_pretrained` (config.json, model.safetensors)
    and `CLIPProcessor.save_pretrained` (the CLIP BPE tokenizer, built offline from open_clip's vocabulary, and the
    image processor with the LAION ViT-H/14 settings: shortest edge 224, centre crop 224, bicubic, OpenAI
    mean/std). Tiny CLIP: vision width 32 × 2 layers, patch 14, input 224; text width 16 × 1 layer; projection 16.
    `logit_scale` keeps CLIP's initial value ln(1/0.07) (exp ≈ 14.3; the real model's is ≈ 100).

    Returns:
        `out_dir` as a `Path`, to pass as the reward's `path`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    CLIPModel(tiny_clip_config(projection_dim=16)).save_pretrained(out_dir)
    CLIPProcessor(image_processor=clip_image_processor(), tokenizer=build_clip_tokenizer()).save_pretrained(out_dir)
    return out_dir


# A tiny lower-case WordPiece vocabulary: BERT's special tokens first ([PAD] = 0 as in bert-base-uncased), then
# single characters and their '##' continuations (so any ASCII prompt tokenises), then a few whole words.
_TINY_WORDS = (
    "a",
    "an",
    "the",
    "of",
    "on",
    "in",
    "with",
    "and",
    "photo",
    "painting",
    "cat",
    "dog",
    "red",
    "blue",
    "car",
    "tree",
    "house",
    "oil",
    "portrait",
    "sunset",
)
_TINY_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789.,!?'-"


def _tiny_vocab() -> list[str]:
    chars = list(dict.fromkeys(_TINY_CHARS))
    words = [w for w in _TINY_WORDS if w not in chars]
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *(f"##{c}" for c in chars), *words]


def tiny_imagereward_config(vocab_size: int) -> ImageRewardConfig:
    """A tiny ImageReward: real input size 224 and patch 16 (196 image tokens), vision width 32 × 2 blocks,
    text width 24 × 2 layers, 40 positions (≥ 35 prompt tokens)."""
    return ImageRewardConfig(
        vision_hidden_size=32,
        vision_num_layers=2,
        vision_num_heads=2,
        vision_intermediate_size=64,
        vocab_size=vocab_size,
        text_hidden_size=24,
        text_num_layers=2,
        text_num_heads=2,
        text_intermediate_size=48,
        max_position_embeddings=40,
    )


def build_tiny_imagereward(out_dir: str | Path, seed: int = 0) -> Path:
    """Builds a tiny random-weight ImageReward directory in the official format (tests only).

    Writes `ImageReward.pt` (state dict with the official key names, including the keys the loader drops:
    `blip.vision_proj.*`, `blip.text_proj.*`, `blip.text_encoder.embeddings.position_ids`), the sidecar
    `imagereward_config.json` (tiny sizes) and `tokenizer/` (a tiny lower-case BERT `vocab.txt` +
    `tokenizer_config.json`, without [DEC]/[ENC], like bert-base-uncased). Every 1-D weight (biases, LayerNorm
    scales) is perturbed away from its default and every matrix is drawn with std 1/√fan_in (transformers' 0.02
    init leaves a tiny model nearly blind to its inputs), so the image and the prompt visibly move the score and a
    wrong key map changes it.

    Returns:
        `out_dir` as a `Path`, to pass as the reward's `path`.
    """
    out_dir = Path(out_dir)
    tokenizer_dir = out_dir / TOKENIZER_DIRNAME
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    vocab = _tiny_vocab()
    (tokenizer_dir / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (tokenizer_dir / "tokenizer_config.json").write_text(
        json.dumps({"do_lower_case": True, "model_max_length": 512}) + "\n"
    )

    config = tiny_imagereward_config(vocab_size=len(vocab) + len(EXTRA_SPECIAL_TOKENS))
    config.to_json_file(out_dir / CONFIG_FILENAME)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ImageRewardModel(config)
    state_dict = {}
    for key, value in model.state_dict().items():
        if value.ndim == 1:  # LayerNorm scales (≈ 1) and biases (≈ 0)
            value = value + 0.1 * torch.randn(value.shape, generator=generator)
        elif value.ndim in (2, 4):  # Linear / Conv2d / embedding matrices: unit-scale activations (fan-in init)
            value = torch.randn(value.shape, generator=generator) / (value[0].numel() ** 0.5)
        state_dict[hf_to_official_key(key)] = value.clone()
    text_width, vision_width, itc_width = config.text_hidden_size, config.vision_hidden_size, 16
    state_dict["blip.text_encoder.embeddings.position_ids"] = torch.arange(config.max_position_embeddings)[None]
    state_dict["blip.vision_proj.weight"] = 0.02 * torch.randn(itc_width, vision_width, generator=generator)
    state_dict["blip.vision_proj.bias"] = torch.zeros(itc_width)
    state_dict["blip.text_proj.weight"] = 0.02 * torch.randn(itc_width, text_width, generator=generator)
    state_dict["blip.text_proj.bias"] = torch.zeros(itc_width)
    torch.save(state_dict, out_dir / CHECKPOINT_FILENAME)
    return out_dir


def model_with_random_lora(path: str | Path, target_modules: Sequence[str], seed: int = 0) -> Any:
    """The pipeline at `path` loaded by the production loader, with a rank-4 LoRA (alpha 12, so alpha / r matters)
    on `target_modules` whose A and B are random (seeded), so that it changes the model's output."""
    from rlhf_diffusion.models.loading import (
        attach_lora,
        get_lora_state_dict,
        load_diffusion_model,
        set_lora_state_dict,
    )

    model = load_diffusion_model(str(path))
    attach_lora(model.unet, rank=4, alpha=12.0, target_modules=list(target_modules))
    g = torch.Generator().manual_seed(seed)
    set_lora_state_dict(
        model.unet, {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in get_lora_state_dict(model.unet).items()}
    )
    return model


def tiny_run_config(
    model_dir: str | Path,
    output_dir: str | Path,
    algorithm: str | dict[str, Any],
    *,
    train_prompts: Sequence[str] = ("a cat", "a dog", "a fox"),
    num_steps: int = 4,
    batch_size: int = 3,
    reward: str = "brightness",
    settings: dict[str, Any] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """The config (a dict for `config.parse_config`) of a small run of `algorithm` (a name or an `algorithm` section)
    on the pipeline in `model_dir`: a `num_steps`-step DDIM grid with guidance 2, `batch_size` prompts per rollout
    from `train_prompts`, one built-in `reward`, learning rate 1e-3 and minibatches of 64, no tracking.

    `settings` (a test module's own defaults), then `sections`, override top-level entries: a dict is merged into the
    section of that name (`train={"signal_every": 0}` keeps the learning rate), anything else replaces it (`seed=3`).
    """
    data: dict[str, Any] = {
        "run_name": "t",
        "output_dir": str(output_dir),
        "device": "cpu",
        "model": {"pretrained": str(model_dir)},
        "sampling": {"num_steps": num_steps, "guidance_scale": 2.0, "batch_size": batch_size},
        "algorithm": {"name": algorithm} if isinstance(algorithm, str) else algorithm,
        "rewards": [{"name": reward}],
        "train": {"learning_rate": 1e-3, "train_batch_size": 64},
        "prompts": {"train": {"inline": list(train_prompts)}},
        "tracking": {"enabled": False},
    }
    return _override(data, settings or {}, sections)


def _override(data: dict[str, Any], *overrides: dict[str, Any]) -> dict[str, Any]:
    """`data` with each of `overrides` in turn applied to its top-level entries: a dict is merged into the section of
    that name, anything else replaces it."""
    for entries in overrides:
        for key, value in entries.items():
            default = data.get(key)
            data[key] = {**default, **value} if isinstance(value, dict) and isinstance(default, dict) else value
    return data


def tiny_trainer(
    model_dir: str | Path, output_dir: str | Path, algorithm: str | dict[str, Any], **kwargs: Any
) -> LocalTrainer:
    """A `LocalTrainer` (every role in this process, no log lines) of `tiny_run_config(model_dir, output_dir,
    algorithm, **kwargs)`."""
    from rlhf_diffusion.config import parse_config
    from rlhf_diffusion.local_trainer import LocalTrainer

    return LocalTrainer(parse_config(tiny_run_config(model_dir, output_dir, algorithm, **kwargs)), log=lambda *_: None)


def tiny_loop_run_config(
    model_dir: str | Path,
    output_dir: str | Path,
    run_name: str,
    algorithm: str | dict[str, Any],
    *,
    seed: int,
    num_steps: int = 3,
    train_prompts: Sequence[str] = ("a cat", "a dog", "a fox"),
    eval_prompts: Sequence[str] = ("a cow",),
    eval_seeds: int = 1,
    settings: dict[str, Any] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """The config (a dict for `config.parse_config`) of a short run of the whole loop, as the Ray cluster, fault,
    resume and tracking tests run it: `tiny_run_config` with the run named `run_name`, `seed`, rollouts of 2 images
    from `train_prompts`, the JPEG-compressibility reward, learning rate 1e-2, and `eval_prompts` judged on
    `eval_seeds` seeds each. `settings`, then `sections`, override top-level entries as in `tiny_run_config`
    (`resources`, `train`, `checkpoint`, ...)."""
    data = tiny_run_config(
        model_dir,
        output_dir,
        algorithm,
        train_prompts=train_prompts,
        num_steps=num_steps,
        batch_size=2,
        reward="jpeg_compressibility",
        settings={
            "run_name": run_name,
            "seed": seed,
            "train": {"learning_rate": 1e-2},
            "prompts": {"eval": {"inline": list(eval_prompts)}, "eval_seeds": eval_seeds},
        },
    )
    return _override(data, settings or {}, sections)


def tiny_loop_trainer(
    model_dir: str | Path, output_dir: str | Path, run_name: str, algorithm: str | dict[str, Any], **kwargs: Any
) -> LocalTrainer:
    """A `LocalTrainer` (every role in this process, no log lines) of `tiny_loop_run_config(model_dir, output_dir,
    run_name, algorithm, **kwargs)`: `.fit()` runs the whole loop."""
    from rlhf_diffusion.config import parse_config
    from rlhf_diffusion.local_trainer import LocalTrainer

    config = parse_config(tiny_loop_run_config(model_dir, output_dir, run_name, algorithm, **kwargs))
    return LocalTrainer(config, log=lambda *_: None)


def check_lora_changed(run_dir: str | Path) -> Path:
    """Checks that the LoRA a run exported (`<run_dir>/lora/`) has B weights and that they moved from their init 0;
    returns the weights file."""
    from safetensors.torch import load_file

    from rlhf_diffusion.models import LORA_WEIGHT_NAME

    weights = Path(run_dir) / "lora" / LORA_WEIGHT_NAME
    b_weights = [v for k, v in load_file(weights).items() if "lora_B" in k]
    assert b_weights and max(v.abs().max().item() for v in b_weights) > 0  # B starts at 0: the LoRA changed
    return weights


def launch_tiny(overrides: Sequence[str], output_dir: str | Path, capsys: Any) -> tuple[int, str]:
    """`rlhf-diffusion configs/tiny.yaml --no-ray` in this process with `--set` of each of `overrides`, then of
    `output_dir`: its exit code and what it wrote on stderr (read through pytest's `capsys`)."""
    from rlhf_diffusion import launch

    sets = [a for o in [*overrides, f"output_dir={output_dir}"] for a in ("--set", o)]
    code = launch.main(["configs/tiny.yaml", "--no-ray", *sets])
    return code, capsys.readouterr().err


def perturb_lora(trainer: Any, seed: int = 0, scale: float = 0.05) -> None:
    """Adds `scale` · N(0, 1) (seeded) to every LoRA weight of `trainer.model` (a trainer's or a sampler's): θ away
    from the reference (at the LoRA's init θ = ref), so log-ratios and the KL are non-zero."""
    from rlhf_diffusion.models.loading import get_lora_state_dict, set_lora_state_dict

    g = torch.Generator().manual_seed(seed)
    state = get_lora_state_dict(trainer.model.unet)
    set_lora_state_dict(
        trainer.model.unet, {k: v + scale * torch.randn(v.shape, generator=g) for k, v in state.items()}
    )


def descend_lora(trainer: LocalTrainer, loss: torch.Tensor, lr: float = 1e-3) -> torch.Tensor:
    """One normalised descent step θ −= lr · g / ‖g‖ on `loss`, g its gradient in the LoRA weights of the trainer's
    model; returns ‖g‖ (the caller checks it is non-zero where it matters)."""
    from rlhf_diffusion.models.loading import lora_parameters

    params = lora_parameters(trainer.model.unet)
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        norm = torch.cat([g.flatten() for g in grads]).norm()
        for p, g in zip(params, grads):
            p -= lr * g / norm
    return norm


def run_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """The records of a run directory's `metrics.jsonl`, one dict a line."""
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def check_algorithm_config_errors(
    data: dict[str, Any], name: str, settings: Sequence[str], named: dict[str, str] | None = None
) -> None:
    """Checks that each of `settings` ("key: value") and of `named`'s keys, set on algorithm `name` (the override
    `algorithm={name: <name>, <setting>}`), makes `parse_config(data)` fail with a line naming `algorithm.<key>`, or
    `algorithm.<named[setting]>` (a field checked against another)."""
    from rlhf_diffusion.config import ConfigError, parse_config

    fields = {setting: setting.split(":")[0].strip() for setting in settings} | dict(named or {})
    for setting, field in fields.items():
        override = f"algorithm={{name: {name}, {setting}}}"
        try:
            parse_config(data, overrides=[override])
        except ConfigError as err:
            assert f"  algorithm.{field}: " in str(err), (override, str(err))
        else:
            raise AssertionError(f"{override} passed")


# -- the step-pair methods (D3PO, TailorPO): examples are a winner's and a loser's step -------------------------------


def pair_log_ratios(trainer: LocalTrainer, cond: Any, examples: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Δ_w and Δ_l, log π_θ / π_ref of the winner's and of the loser's step of each of `examples` (step pairs, each
    from its own state) at the current LoRA, without gradient."""
    from rlhf_diffusion.algorithms.common import step_log_ratios

    ex, predictor, grid = examples, trainer.train_predictor, trainer.grid
    with torch.no_grad():
        (dw,) = step_log_ratios(predictor, grid, cond, ex.step_index, ex.state_w, ex.action_w)
        (dl,) = step_log_ratios(predictor, grid, cond, ex.step_index, ex.state_l, ex.action_l)
    return dw, dl


# -- the policy-gradient methods (DDPO, GRPO): examples are trajectory steps with the sampler's log-prob ℓ_old -------


def _step_log_probs(trainer: LocalTrainer, cond: Any, examples: Any) -> torch.Tensor:
    from rlhf_diffusion.algorithms.ddpo import step_log_probs

    with torch.no_grad():
        log_prob, _, _ = step_log_probs(
            trainer.train_predictor, trainer.grid, cond, examples.step_index, examples.state, examples.action
        )
    return log_prob


def kl_term_alone(trainer: LocalTrainer, batch: RolloutBatch, kl_beta: float = 1.0) -> tuple[Any, Any, Any]:
    """`batch`'s trajectory steps with every advantage set to 0, their conditioning, and a function that gives the
    GRPO loss on them at the current LoRA (clip range 1e-4, β = `kl_beta`): with A = 0 the surrogate is 0 and the
    loss is the KL term alone, β · KL."""
    import dataclasses

    from rlhf_diffusion.algorithms.ddpo import policy_gradient_loss

    examples = dataclasses.replace(batch.pairs, advantage=torch.zeros(len(batch.pairs)))
    cond = trainer.encode(batch.prompts).index(examples.prompt_index)

    def kl_loss() -> Any:
        return policy_gradient_loss(
            trainer.train_predictor, trainer.grid, cond, examples, clip_range=1e-4, adv_clip_max=5.0, kl_beta=kl_beta
        )

    return examples, cond, kl_loss


def check_ratio_one_on_the_first_step(trainer: LocalTrainer, batch: RolloutBatch) -> dict[str, float]:
    """Checks that before any update the learner's recomputed ℓ_θ of `batch`'s trajectory steps (CFG, another batch
    composition) equals the ℓ_old the sampler recorded (to 1e-5), so ρ = 1, and that a learner round on `batch`
    takes one optimizer step with |log ρ| < 1e-5 and nothing clipped; returns the round's metrics."""
    examples = batch.pairs
    cond = trainer.encode(batch.prompts).index(examples.prompt_index)
    log_prob = _step_log_probs(trainer, cond, examples)
    assert (log_prob - examples.log_prob).abs().max().item() < 1e-5
    metrics = trainer.train_on(batch)
    assert metrics["optimizer_steps"] == 1.0
    assert metrics["log_ratio_abs_max"] < 1e-5 and metrics["clipfrac"] == 0.0
    return metrics


def log_prob_change_after_one_step(trainer: LocalTrainer, batch: RolloutBatch, lr: float = 1e-3) -> torch.Tensor:
    """The change of ℓ_θ of each of `batch.pairs` (with their advantages as they are) after one normalised descent
    step θ −= lr · g / ‖g‖ on the method's loss over them, g its gradient in the LoRA weights (checked nonzero)."""
    examples = batch.pairs
    cond = trainer.encode(batch.prompts).index(examples.prompt_index)
    before = _step_log_probs(trainer, cond, examples)
    out = trainer.algorithm.loss(trainer.train_predictor, cond, examples, trainer.train_generator)
    assert descend_lora(trainer, out.loss, lr) > 0, "the loss has no gradient in the LoRA weights"
    return _step_log_probs(trainer, cond, examples) - before

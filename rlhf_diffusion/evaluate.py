"""Offline evaluation: sample a prompt set with a base model and trained LoRAs, score the images, write the table.

    python -m rlhf_diffusion.evaluate --model runwayml/stable-diffusion-v1-5 --prompts partiprompts:animals \\
        --limit 100 --seeds 4 --reward aesthetic@/weights/aesthetic --reward clip_score@/weights/clip \\
        --lora runs/d3po/lora --lora tailorpo=runs/tailorpo/lora --out eval/animals

One row per model: the base model, then each `--lora` (a directory written by `export_lora`, i.e. a run's
`<run>/lora/`, the `.safetensors` file itself, or a run directory holding `lora/`). Every row samples the same
images: image s of prompt j draws its x_T and its per-step noise from its own generator
`evaluation.eval_generators(j, seeds, first_seed)[s]` (seed `--first-seed` + s), in the batches of
`evaluation.sample_held_out`, exactly as the trainer's held-out evaluation does, so with the run's sampling settings
(`--steps`, `--eta`, `--guidance`, `--resolution`) and its eval prompts a LoRA row reproduces the run's final
evaluation (`eval.json`) image for image.

An SD3 / SD3.5 model (a `StableDiffusion3Pipeline` directory or hub id) samples with the ODE, the stock pipeline's
Euler sampler (noise level 0; `--eta` does not apply), as a run's held-out evaluation of such a model does and as
flow_grpo evaluates; its LoRA files are the `transformer.`-keyed ones `StableDiffusion3Pipeline.save_lora_weights`
writes (a run's `lora/`).

Written to `--out DIR`:

    results.md       the table: one row per model, "mean ± std" of every reward (and of the weighted total when
                     there are several rewards or a weight != 1) over all prompts × seeds images (std: sample std)
    results.csv      the same numbers, full precision: model, lora, images, <reward>_mean, <reward>_std, ...
    per_prompt.csv   one row per (model, prompt): each reward's mean over the seeds (+ PartiPrompts category and
                     challenge columns when the prompts are a partiprompts set)
    grid.png         the first --grid-prompts prompts, one per row; columns: base seeds K..K+S-1 (--first-seed K),
                     then each LoRA's
    paired.json      each LoRA against base, image by image: per reward the mean change, its paired SE, the images
                     that rose / fell (fixed / broken for 0-or-1 scores) and the sign test (also a table in results.md)
    images/          with --save-images: every image as images/<row>/p<prompt index>_s<seed>.png

With `--mlflow-uri URI` (alias `--tracking-uri`) the evaluation is logged to MLflow (experiment `--experiment`):
one parent run (params: model, prompts, sampling settings, rewards, LoRAs; artifacts: the table, both CSVs, the
grid and paired.json) and one child run per model row (params: label, lora; metrics `eval/<reward>`,
`eval/<reward>_std`, `eval/reward_mean`, `eval/reward_std`, named like the trainer's eval metrics).

Rewards: `--reward name[:weight][@path]` (repeatable) and/or `--rewards-yaml FILE`, a YAML list of reward entries
(`{name, weight, path, kwargs}`, the run config's `rewards` schema) or a mapping with such a `rewards` list (e.g. a
run config). Rewards that load a model (aesthetic, imagereward, pickscore, hpsv2, clip_score) need a path: a local
directory or file in the model's published format, or a hub id (downloaded by the reward's own loader).

Exit codes: 0 done; 2 a problem with the input (missing LoRA or prompt file, unknown reward, a model reward without
a path, a LoRA file that does not fit the model, ...), reported as one message naming it, without a traceback;
1 an unexpected failure, or MLflow logging failed (the results are written first).
"""

from __future__ import annotations

import argparse
import csv
import inspect
import json
import math
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rlhf_diffusion.models.sources import (
    HUB_ID_RE,
    TESTBED_PREFIX,
    TINY_MODELS,
    TINY_PREFIX,
    is_hub_id,
    resolve_source,
)

if TYPE_CHECKING:
    from rlhf_diffusion.models.lora import LoraFile

__all__ = [
    "EvaluateError",
    "EvaluationResult",
    "LoraFileError",
    "ModelRow",
    "PromptSet",
    "apply_lora",
    "evaluate",
    "log_to_mlflow",
    "main",
    "parse_reward_spec",
    "resolve_lora_path",
    "resolve_prompts",
    "rewards_from_arguments",
    "write_report",
]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # = models.loading.LORA_WEIGHT_NAME (not imported: lazy torch)
EVAL_ADAPTER = "eval_lora"  # the peft adapter name a loaded LoRA gets on the evaluation UNet
DEFAULT_EXPERIMENT = "rlhf_diffusion"  # the trainer's default experiment, so evaluations sit beside the runs


class EvaluateError(Exception):
    """A problem with the input (a path, a reward, a prompt set); `str(error)` is the one message to show."""


class LoraFileError(EvaluateError, ValueError):
    """A LoRA file that cannot be read or does not fit the model; the message starts with the file's path."""


# ---------------------------------------------------------------------------------------------------------------
# Inputs: prompts, rewards, LoRA files
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PromptSet:
    """The prompts to evaluate and where they came from.

    Attributes:
        source: what the user named (a built-in set, a file path, or "inline").
        prompts: the prompts, in order; prompt j is seeded by its index j.
        extra: per-prompt columns for per_prompt.csv (PartiPrompts: category, challenge), each a list as long as
            `prompts`.
    """

    source: str
    prompts: list[str]
    extra: dict[str, list[str]] = field(default_factory=dict)


def resolve_prompts(spec: str | None, inline: Sequence[str] = (), limit: int | None = None) -> PromptSet:
    """The prompt set named by `--prompts` (a built-in set or a prompt file) or given inline, cut to `limit`.

    Raises:
        EvaluateError: neither or both given, an unknown set / missing file, an empty or blank prompt.
    """
    from rlhf_diffusion.prompts import BUILTIN_PROMPT_SETS, load_builtin, load_partiprompts, load_prompt_file

    if (spec is None) == (not inline):
        raise EvaluateError("give the prompts with either --prompts SET_OR_FILE or --prompt TEXT (repeatable)")
    extra: dict[str, list[str]] = {}
    if inline:
        blank = [i for i, p in enumerate(inline) if not p.strip()]
        if blank:
            raise EvaluateError(f"--prompt {blank[0] + 1} is empty")
        source, prompts = "inline", list(inline)
    elif spec in BUILTIN_PROMPT_SETS:
        source, prompts = spec, load_builtin(spec)
        if spec.startswith("partiprompts"):
            rows = load_partiprompts(category=spec.partition(":")[2] or None)
            extra = {"category": [r.category for r in rows], "challenge": [r.challenge for r in rows]}
    elif Path(spec).expanduser().is_file():
        source = spec
        try:
            prompts = load_prompt_file(Path(spec).expanduser())
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise EvaluateError(f"--prompts {spec}: {error}") from None
    else:
        raise EvaluateError(
            f"--prompts {spec!r}: no such prompt file, and not a built-in set ({', '.join(BUILTIN_PROMPT_SETS)})"
        )
    if limit is not None:
        prompts = prompts[:limit]
        extra = {k: v[:limit] for k, v in extra.items()}
    return PromptSet(source=source, prompts=prompts, extra=extra)


def _model_reward_names() -> set[str]:
    """Registered rewards whose constructor needs a `path` (they load model weights and ship none: `testbed_reward`
    defaults to the shipped `testbed:reward`, as in a run config)."""
    from rlhf_diffusion.rewards import REWARD_REGISTRY

    return {
        name
        for name, cls in REWARD_REGISTRY.items()
        if (param := inspect.signature(cls).parameters.get("path")) is not None and param.default is None
    }


def parse_reward_spec(text: str) -> dict[str, Any]:
    """`name[:weight][@path]` -> a reward entry `{"name", "weight", "path"}` (checked by `check_rewards`).

    Raises:
        EvaluateError: an empty name or a weight that is not a number.
    """
    head, at, path = text.partition("@")
    name, colon, weight_text = head.partition(":")
    name = name.strip()
    if not name:
        raise EvaluateError(f"--reward {text!r}: expected name[:weight][@path]")
    if at and not path.strip():
        raise EvaluateError(f"--reward {text!r}: empty path after '@'")
    entry: dict[str, Any] = {"name": name, "path": path.strip() if at else None}
    if colon:
        try:
            entry["weight"] = float(weight_text)
        except ValueError:
            raise EvaluateError(f"--reward {text!r}: weight {weight_text!r} is not a number") from None
    return entry


def _read_rewards_yaml(path: str) -> list[dict[str, Any]]:
    import yaml

    file = Path(path).expanduser()
    if not file.is_file():
        raise EvaluateError(f"--rewards-yaml {path}: no such file")
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        raise EvaluateError(f"--rewards-yaml {path}: cannot read it: {error}") from None
    if isinstance(data, dict) and "rewards" in data:
        data = data["rewards"]
    if not isinstance(data, list) or not data or not all(isinstance(entry, dict) for entry in data):
        raise EvaluateError(
            f"--rewards-yaml {path}: expected a non-empty list of reward entries "
            "({name, weight, path, kwargs}) or a mapping with such a `rewards` list"
        )
    return data


def check_rewards(entries: Sequence[dict[str, Any]], origins: Sequence[str]) -> list[Any]:
    """Validates reward entries with the run config's `RewardConfig` schema, plus: names are distinct, and a
    reward that loads a model has a path that exists (or is a hub id).

    Args:
        entries: `{name, weight, path, kwargs}` mappings.
        origins: for each entry, how to name it in a message (`--reward aesthetic`, `rewards.yaml entry 0`).

    Returns:
        The validated `config.RewardConfig` objects.

    Raises:
        EvaluateError: the first problem, naming the entry and the reward.
    """
    from pydantic import ValidationError

    from rlhf_diffusion.config import REWARD_NAMES, RewardConfig

    if not entries:
        raise EvaluateError("no rewards: give at least one --reward name[:weight][@path] or --rewards-yaml FILE")
    model_rewards = _model_reward_names()
    specs, seen = [], set()
    for entry, origin in zip(entries, origins):
        name = entry.get("name")
        if name not in REWARD_NAMES and name != "custom":
            raise EvaluateError(
                f"{origin}: unknown reward {name!r}; valid rewards: {', '.join(REWARD_NAMES)}, "
                "custom (with target: 'package.module:Attribute')"
            )
        try:
            spec = RewardConfig.model_validate(entry)
        except ValidationError as error:
            problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in error.errors())
            raise EvaluateError(f"{origin}: {problems}") from None
        if not math.isfinite(spec.weight):
            raise EvaluateError(f"{origin}: the weight must be finite (got {spec.weight})")
        if spec.key in seen:
            raise EvaluateError(f"{origin}: reward {spec.key!r} is given twice")
        seen.add(spec.key)
        if spec.name == "custom":  # the target was checked by RewardConfig; it is imported when built
            pass
        elif spec.path is not None and spec.path.startswith(TESTBED_PREFIX):
            try:
                resolve_source(spec.path)
            except (ValueError, FileNotFoundError) as error:
                raise EvaluateError(f"{origin}: reward {spec.name!r}: {error}") from None
        elif spec.name in model_rewards:
            if spec.path is None:
                raise EvaluateError(
                    f"{origin}: reward {spec.name!r} loads a model and needs its weights' location: "
                    f"--reward {spec.name}@PATH (a local directory/file or a hub id)"
                )
            if not Path(spec.path).expanduser().exists() and not is_hub_id(spec.path):
                raise EvaluateError(f"{origin}: reward {spec.name!r}: no such file or directory: {spec.path}")
        elif spec.path is not None:
            raise EvaluateError(
                f"{origin}: reward {spec.name!r} loads no weights and takes no path (got {spec.path!r})"
            )
        specs.append(spec)
    return specs


def rewards_from_arguments(rewards_yaml: str | None, reward_texts: Sequence[str]) -> list[Any]:
    """The validated rewards of `--rewards-yaml FILE` (its entries first) and each `--reward SPEC`, every entry named
    by where it came from in a message (`check_rewards`)."""
    entries, origins = [], []
    if rewards_yaml:
        for i, entry in enumerate(_read_rewards_yaml(rewards_yaml)):
            entries.append(entry)
            origins.append(f"--rewards-yaml {rewards_yaml} entry {i}")
    for text in reward_texts:
        entries.append(parse_reward_spec(text))
        origins.append(f"--reward {text}")
    return check_rewards(entries, origins)


def resolve_lora_path(path: str | Path) -> Path:
    """The LoRA file a `--lora` argument names: the file itself, `DIR/pytorch_lora_weights.safetensors` (an
    `export_lora` directory, e.g. `<run>/lora`), or `RUN/lora/pytorch_lora_weights.safetensors` (a run directory).

    Raises:
        LoraFileError: nothing there, or a directory without a LoRA file.
    """
    given = Path(path).expanduser()
    if given.is_file():
        return given
    if given.is_dir():
        for candidate in (given / LORA_WEIGHT_NAME, given / "lora" / LORA_WEIGHT_NAME):
            if candidate.is_file():
                return candidate
        raise LoraFileError(f"{path}: no {LORA_WEIGHT_NAME} in this directory (nor in its lora/ subdirectory)")
    raise LoraFileError(f"{path}: no such LoRA file or directory")


def apply_lora(unet: Any, lora: LoraFile, adapter_name: str = EVAL_ADAPTER) -> None:
    """Loads `lora` into the UNet as the active adapter `adapter_name`, replacing an adapter of that name.

    Raises:
        LoraFileError: the file's target modules, keys or shapes do not fit this UNet (message names the file).
    """
    from peft import LoraConfig

    from rlhf_diffusion.models.loading import set_lora_state_dict

    if adapter_name in (getattr(unet, "peft_config", None) or {}):
        unet.delete_adapters(adapter_name)
    try:
        unet.add_adapter(LoraConfig(**lora.config), adapter_name=adapter_name)
    except (ValueError, TypeError, KeyError) as error:
        raise LoraFileError(f"{lora.path}: its LoRA does not fit this UNet: {error}") from None
    try:
        set_lora_state_dict(unet, lora.state, adapter_name=adapter_name)
    except (ValueError, RuntimeError) as error:
        unet.delete_adapters(adapter_name)
        raise LoraFileError(f"{lora.path}: its LoRA does not fit this UNet: {error}") from None
    unet.set_adapter(adapter_name)
    unet.requires_grad_(False)
    unet.eval()


# ---------------------------------------------------------------------------------------------------------------
# Sampling and scoring
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class ModelRow:
    """The scores of one model (base or base + one LoRA) on every (prompt, seed).

    Attributes:
        label: the row's name in the table ("base", or the LoRA's label).
        lora: the LoRA file, None for the base model.
        scores: reward name -> (P, S) float32 raw scores, prompt-major.
        total: (P, S) float32 weighted totals.
        images: (min(P, grid_prompts) * S, 3, H, W) float32 in [0, 1], prompt-major: the images of the grid.
        seconds: wall time of the row.
    """

    label: str
    lora: Path | None
    scores: dict[str, Any]
    total: Any
    images: Any
    seconds: float = 0.0

    def stats(self, name: str) -> tuple[float, float]:
        """(mean, sample std) over all images of a reward, or of the weighted total for name "total"."""
        values = (self.total if name == "total" else self.scores[name]).flatten()
        std = values.std().item() if values.numel() > 1 else 0.0
        return values.mean().item(), std


@dataclass
class EvaluationResult:
    """Everything `evaluate` measured, and the settings it used (for the report and MLflow)."""

    model: str
    prompts: PromptSet
    rewards: list[Any]
    rows: list[ModelRow]
    settings: dict[str, Any]

    @property
    def columns(self) -> list[str]:
        """The table's score columns: every reward, plus "total" when it differs from the only reward."""
        names = [spec.key for spec in self.rewards]
        if len(self.rewards) > 1 or self.rewards[0].weight != 1.0:
            names.append("total")
        return names


def evaluate(
    model: str,
    prompts: PromptSet,
    rewards: Sequence[Any],
    loras: Sequence[tuple[str, Path]] = (),
    *,
    seeds: int = 2,
    first_seed: int = 0,
    steps: int = 20,
    eta: float = 1.0,
    guidance_scale: float = 5.0,
    negative_prompt: str | None = None,
    resolution: int | None = None,
    device: str = "auto",
    dtype: str = "float32",
    kind: str = "auto",
    revision: str | None = None,
    max_sequence_length: int | None = None,
    flux_guidance: float | None = None,
    cache_dir: str | Path = ".",
    grid_prompts: int = 8,
    image_dir: Path | None = None,
    log: Callable[[str], None] = print,
) -> EvaluationResult:
    """Samples every prompt × seed with the base model and with each LoRA, and scores the images.

    Args:
        model: a diffusers pipeline directory, a hub id, "testbed:pipeline", or "tiny:sd15" / "tiny:sdxl" (built
            under `cache_dir`).
        prompts: the prompts; prompt j is seeded by j (`eval_generators(j, seeds)`).
        rewards: `RewardConfig`-like entries (name, weight, path, kwargs).
        loras: (label, LoRA file) per extra row, evaluated in order after the base row.
        seeds: images per prompt.
        first_seed: the first fixed seed: image s of prompt j is seed `first_seed + s` (`eval_generators`).
        steps, eta, guidance_scale: the DDIM sampler (K steps, η in [0, 1], CFG weight); an SD3 model samples the
            ODE on its scheduler's K-step flow grid (the stock pipeline's sampler) and ignores eta.
        negative_prompt: CFG's unconditional prompt (as the run config's `sampling.negative_prompt`); None = the
            stock pipelines' default.
        resolution: image side in pixels; None = the model's native size.
        device, dtype, kind, revision, max_sequence_length, flux_guidance: how to load the model (as the run
            config's `device` and `model.*`; flux_guidance None = FluxPipeline's default 3.5).
        grid_prompts: how many prompts' images each row keeps for the grid.
        image_dir: when set, every image is also written to `image_dir/<row>/p<j>_s<s>.png`.
        log: progress lines.

    Raises:
        EvaluateError: the model, a reward or a LoRA cannot be loaded (the message names it).
    """
    import torch

    from rlhf_diffusion.diffusion.flow_sampling import VelocityPredictor, flow_grid_for
    from rlhf_diffusion.diffusion.sampling import DDIMGrid, NoisePredictor
    from rlhf_diffusion.evaluation import sample_held_out
    from rlhf_diffusion.models.loading import FLOW_KINDS, ModelLoadError, load_diffusion_model
    from rlhf_diffusion.models.lora import LoraFormatError, read_lora_file
    from rlhf_diffusion.workers.policy import DTYPES, resolve_device, resolve_model_source

    try:
        torch_device = resolve_device(device)
    except RuntimeError as error:
        raise EvaluateError(f"--device: {error}") from None
    try:  # unreadable files fail before loading
        lora_files = [(label, read_lora_file(path)) for label, path in loras]
    except LoraFormatError as error:  # the message starts with the file's path
        raise LoraFileError(str(error)) from None
    try:
        source = resolve_model_source(model, Path(cache_dir))
        pipeline = load_diffusion_model(
            source,
            kind=kind,
            dtype=DTYPES[dtype],
            device=torch_device,
            revision=revision,
            max_sequence_length=max_sequence_length,
        )
        if flux_guidance is not None:
            pipeline.flux_guidance = flux_guidance
    except ModelLoadError as error:
        raise EvaluateError(f"--model {model}: {error}") from None
    flow_model = pipeline.kind in FLOW_KINDS
    network = "transformer" if flow_model else "unet"
    for _, lora in lora_files:  # an SD1.5 / SDXL LoRA on an SD3 model or the other way round: named, before sampling
        if lora.component != network:
            raise LoraFileError(
                f"{lora.path}: a {lora.component} LoRA does not fit this {pipeline.kind} model, whose network is "
                f"its {network}"
            )
    reward_fn = _build_rewards(rewards, torch_device)
    res = resolution or pipeline.resolution
    multiple = pipeline.vae_scale_factor * (2 if pipeline.kind == "flux" else 1)  # FLUX packs 2x2 latent patches
    if res < 8 or res % multiple:
        raise EvaluateError(f"--resolution {res}: must be a multiple of {multiple} for this model")
    if flow_model:  # the ODE (noise level 0), as the trainer's held-out evaluation of a flow model
        grid = flow_grid_for(pipeline, steps, 0.0, res, res)
        predictor = VelocityPredictor(pipeline, guidance_scale, res, res, negative_prompt)
    else:
        grid = DDIMGrid.from_scheduler(pipeline.scheduler, steps, eta)
        predictor = NoisePredictor(pipeline, guidance_scale, res, res, negative_prompt)
    settings = {
        "seeds": seeds,
        "first_seed": first_seed,
        "steps": steps,
        "sampler": "flow_ode" if flow_model else "ddim",
        "eta": eta,
        "guidance_scale": guidance_scale,
        "negative_prompt": negative_prompt,
        "resolution": res,
        "device": str(torch_device),
        "dtype": dtype,
        "kind": pipeline.kind,
        "source": source,
    }

    rows = []
    for index, (label, lora) in enumerate([("base", None), *lora_files]):
        start = time.perf_counter()
        if lora is not None:  # the base row comes first, before any adapter exists
            apply_lora(pipeline.unet, lora)
        pipeline.unet.eval()
        per: dict[str, list] = {spec.key: [] for spec in rewards}
        totals, kept = [], []
        with torch.no_grad():
            # The trainer's held-out evaluation loop (evaluation.py sample_held_out), same batches.
            j = 0
            for batch_prompts, batch_images in sample_held_out(
                pipeline,
                predictor,
                grid,
                list(prompts.prompts),
                list(range(len(prompts.prompts))),
                seeds,
                res,
                first_seed=first_seed,
            ):
                batch_result = reward_fn.score(batch_images, batch_prompts)
                for first in range(0, len(batch_prompts), seeds):  # per prompt: (S,) scores, (S, 3, H, W)
                    own = slice(first, first + seeds)
                    images = batch_images[own]
                    totals.append(batch_result.total[own])
                    for name, value in batch_result.per_reward.items():
                        per[name].append(value[own])
                    if j < grid_prompts:
                        kept.append(images)
                    if image_dir is not None:
                        _save_images(images, image_dir / _row_dirname(index, label), j, first_seed)
                    j += 1
        row = ModelRow(
            label=label,
            lora=None if lora is None else lora.path,
            scores={name: torch.stack(v) for name, v in per.items()},
            total=torch.stack(totals),
            images=torch.cat(kept) if kept else torch.empty(0),
            seconds=time.perf_counter() - start,
        )
        rows.append(row)
        summary = ", ".join(f"{name} {row.stats(name)[0]:.4f} ± {row.stats(name)[1]:.4f}" for name in per)
        log(f"[evaluate] {label}: {summary} ({len(prompts.prompts) * seeds} images, {row.seconds:.1f} s)")
    return EvaluationResult(model=model, prompts=prompts, rewards=list(rewards), rows=rows, settings=settings)


def _seed_range(settings: dict[str, Any]) -> str:
    """The fixed seeds of the images, "first–last" (`--first-seed`, `--seeds`)."""
    first = settings.get("first_seed", 0)
    return f"{first}–{first + settings['seeds'] - 1}"


def _sampler_text(settings: dict[str, Any]) -> str:
    """How the images were sampled, for the report: DDIM with its η, or the flow ODE of an SD3 model."""
    if settings.get("sampler") == "flow_ode":
        return f"flow-matching ODE (Euler, the stock pipeline's sampler) {settings['steps']} steps"
    return f"DDIM {settings['steps']} steps, η {settings['eta']:g}"


def _build_rewards(specs: Sequence[Any], device: Any) -> Any:
    """The weighted sum, built exactly as the trainer builds it (custom rewards and labels included)."""
    from rlhf_diffusion.rewards import WeightedReward

    try:
        return WeightedReward.from_specs(specs, device=device)
    except Exception as error:  # noqa: BLE001 - loaders raise many types; one message naming the reward
        raise EvaluateError(f"cannot load the rewards: {type(error).__name__}: {error}") from None


def _row_dirname(index: int, label: str) -> str:
    return f"{index:02d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', label).strip('_') or 'lora'}"


def _save_images(images: Any, directory: Path, prompt_index: int, first_seed: int = 0) -> None:
    from torchvision.utils import save_image

    directory.mkdir(parents=True, exist_ok=True)
    for s, image in enumerate(images, start=first_seed):
        save_image(image, directory / f"p{prompt_index:05d}_s{s}.png")


# ---------------------------------------------------------------------------------------------------------------
# Report and MLflow
# ---------------------------------------------------------------------------------------------------------------


def write_report(result: EvaluationResult, out_dir: str | Path) -> dict[str, Path]:
    """Writes results.md, results.csv, per_prompt.csv and grid.png under `out_dir`; returns their paths by name."""
    import torch

    from rlhf_diffusion.evaluation import save_grid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    columns = result.columns
    paths = {
        "table": out / "results.md",
        "csv": out / "results.csv",
        "per_prompt": out / "per_prompt.csv",
        "grid": out / "grid.png",
    }
    num_prompts, seeds = len(result.prompts.prompts), result.settings["seeds"]

    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["model", "lora", "images", *(f"{c}_{s}" for c in columns for s in ("mean", "std"))])
        for row in result.rows:
            writer.writerow(
                [row.label, row.lora or "", num_prompts * seeds, *(repr(v) for c in columns for v in row.stats(c))]
            )

    with open(paths["per_prompt"], "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        extra = list(result.prompts.extra)
        writer.writerow(["model", "prompt_index", "prompt", *extra, "seeds", *columns])
        for row in result.rows:
            for j, prompt in enumerate(result.prompts.prompts):
                values = [(row.total if c == "total" else row.scores[c])[j].mean().item() for c in columns]
                writer.writerow(
                    [
                        row.label,
                        j,
                        prompt,
                        *(result.prompts.extra[k][j] for k in extra),
                        seeds,
                        *(repr(v) for v in values),
                    ]
                )

    shown = result.rows[0].images.shape[0] // seeds if result.rows[0].images.numel() else 0
    if shown:
        per_prompt = [r.images.view(-1, seeds, *r.images.shape[1:])[:shown] for r in result.rows]  # (P', S, 3, H, W)
        grid = torch.cat(per_prompt, dim=1).flatten(0, 1)  # prompt-major, then model, then seed
        save_grid(grid, paths["grid"], nrow=len(result.rows) * seeds)
    else:
        paths.pop("grid")

    header = "| model | " + " | ".join("weighted total" if c == "total" else c for c in columns) + " |"
    lines = [
        "# Evaluation",
        "",
        f"Base model `{result.model}`; prompts `{result.prompts.source}` ({num_prompts} prompts × {seeds} seeds "
        f"{_seed_range(result.settings)} = {num_prompts * seeds} images per row); {_sampler_text(result.settings)}, "
        f"guidance {result.settings['guidance_scale']:g}, {result.settings['resolution']} px.",
        "Rewards: "
        + ", ".join(f"`{_reward_label(spec)}`" for spec in result.rewards)
        + ". Cells: mean ± sample std over all images.",
        "",
        header,
        "|" + "---|" * (len(columns) + 1),
    ]
    for row in result.rows:
        cells = [f"{m:.4f} ± {s:.4f}" for m, s in (row.stats(c) for c in columns)]
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    lines.append("")
    comparisons = paired_against_base(result)
    if comparisons:
        lines += [
            "Each LoRA against the base model, image by image (the same prompt and seed): the mean change ± its "
            "paired standard error (the finiteness of this image set, not the spread over training seeds); the "
            "images whose score rose / fell (for a 0-or-1 score: fixed / broken) and the exact two-sided sign test.",
            "",
            "| model | reward | Δ ± paired SE | rose / fell (fixed / broken) | sign test p |",
            "|---|---|---|---|---|",
        ]
        for label, per_column in comparisons.items():
            for column, c in per_column.items():
                up, down = (c["fixed"], c["broken"]) if "fixed" in c else (c["rose"], c["fell"])
                lines.append(
                    f"| {label} | {'weighted total' if column == 'total' else column} | {c['delta']:+.4f} ± "
                    f"{c['paired_se']:.4f} | {int(up)} / {int(down)} | {c['sign_test_p']:.2g} |"
                )
        lines.append("")
        paths["paired"] = out / "paired.json"
        paths["paired"].write_text(json.dumps(comparisons, indent=1) + "\n", encoding="utf-8")
    lines.append(
        "LoRAs: " + (", ".join(f"{row.label} = `{row.lora}`" for row in result.rows if row.lora) or "none") + "."
    )
    if "grid" in paths:
        lines.append(
            f"`grid.png`: the first {shown} prompts, one per row; columns: "
            + ", then ".join(f"{row.label} seeds {_seed_range(result.settings)}" for row in result.rows)
            + "."
        )
    paths["table"].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def paired_against_base(result: EvaluationResult) -> dict[str, dict[str, dict[str, float]]]:
    """Every LoRA row against the base row (the first), per score column, paired by (prompt, seed):
    `stats.paired_comparison` (mean change, paired SE; fixed / broken for 0-or-1 scores, else rose / fell; the sign
    test). Empty without a LoRA row."""
    from rlhf_diffusion.stats import paired_comparison

    base = result.rows[0]
    out: dict[str, dict[str, dict[str, float]]] = {}
    for row in result.rows[1:]:
        out[row.label] = {}
        for column in result.columns:
            before = (base.total if column == "total" else base.scores[column]).flatten().tolist()
            after = (row.total if column == "total" else row.scores[column]).flatten().tolist()
            out[row.label][column] = paired_comparison(before, after)
    return out


def _reward_label(spec: Any) -> str:
    text = spec.key if spec.weight == 1.0 else f"{spec.key}:{spec.weight:g}"
    return f"{text}@{spec.path}" if spec.path else text


def _experiment_id(client: Any, name: str, uri: str) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    artifact_location = None
    if uri.startswith("sqlite:///"):  # artifacts beside the database, as the trainer's tracker does
        artifact_location = (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=artifact_location)


def log_to_mlflow(
    result: EvaluationResult,
    paths: dict[str, Path],
    uri: str,
    experiment: str = DEFAULT_EXPERIMENT,
    run_name: str = "evaluate",
) -> str:
    """Logs one parent run (params, the report files as artifacts) and one child run per row (metrics).

    Returns:
        The parent run's id.
    """
    import mlflow
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    experiment_id = _experiment_id(client, experiment, uri)
    tags = {"rlhf_diffusion.kind": "evaluation"}
    parent = client.create_run(experiment_id, run_name=run_name, tags={**tags, "mlflow.runName": run_name})
    parent_id = parent.info.run_id
    try:
        params = {
            "model": result.model,
            "prompts": result.prompts.source,
            "num_prompts": str(len(result.prompts.prompts)),
            "rewards": json.dumps([_reward_label(spec) for spec in result.rewards]),
            "loras": json.dumps([str(row.lora) for row in result.rows if row.lora]),
            **{key: str(value) for key, value in result.settings.items()},
        }
        client.log_batch(parent_id, params=[mlflow.entities.Param(k, v[:500]) for k, v in params.items()])
        for path in paths.values():
            client.log_artifact(parent_id, str(path))
        now = mlflow.utils.time.get_current_time_millis()
        for row in result.rows:
            child = client.create_run(
                experiment_id,
                run_name=row.label,
                tags={**tags, "mlflow.parentRunId": parent_id, "mlflow.runName": row.label},
            )
            metrics = {}
            for spec in result.rewards:
                metrics[f"eval/{spec.key}"], metrics[f"eval/{spec.key}_std"] = row.stats(spec.key)
            metrics["eval/reward_mean"], metrics["eval/reward_std"] = row.stats("total")
            client.log_batch(
                child.info.run_id,
                metrics=[mlflow.entities.Metric(k, v, now, 0) for k, v in metrics.items() if math.isfinite(v)],
                params=[
                    mlflow.entities.Param("label", row.label),
                    mlflow.entities.Param("lora", str(row.lora or "")),
                    mlflow.entities.Param("model", result.model[:500]),
                ],
            )
            client.set_terminated(child.info.run_id, status="FINISHED")
    except BaseException:
        client.set_terminated(parent_id, status="FAILED")
        raise
    client.set_terminated(parent_id, status="FINISHED")
    return parent_id


# ---------------------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------------------


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse `type`: an integer of at least `minimum` ("must be >= minimum" otherwise)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_diffusion.evaluate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--model",
        required=True,
        help="base pipeline: a diffusers directory, a hub id, testbed:pipeline, or tiny:sd15 / tiny:sdxl",
    )
    parser.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="[LABEL=]PATH",
        help="a LoRA to compare (repeatable; one row each after the base row): an export_lora "
        "directory such as <run>/lora, its .safetensors file, or a run directory",
    )
    parser.add_argument(
        "--prompts",
        metavar="SET_OR_FILE",
        help="a built-in prompt set (simple_animals, partiprompts, partiprompts:<category>) or a "
        "text file with one prompt per line",
    )
    parser.add_argument(
        "--prompt",
        action="append",
        default=[],
        metavar="TEXT",
        help="an inline prompt (repeatable; instead of --prompts)",
    )
    parser.add_argument("--limit", type=_positive_int, help="evaluate only the first N prompts")
    parser.add_argument("--seeds", type=_positive_int, default=2, help="images (fixed seeds) per prompt; default 2")
    parser.add_argument(
        "--first-seed",
        type=_int_at_least(0),
        default=0,
        metavar="K",
        help="the first fixed seed: images of seeds K..K+S-1 (default 0, as a run's own evaluation); settings "
        "chosen on seeds 0..K-1 are judged on images they never saw",
    )
    parser.add_argument(
        "--reward",
        action="append",
        default=[],
        metavar="NAME[:WEIGHT][@PATH]",
        help="a reward (repeatable); model rewards need @PATH",
    )
    parser.add_argument(
        "--rewards-yaml",
        metavar="FILE",
        help="YAML list of reward entries {name, weight, path, kwargs}, or a run config",
    )
    parser.add_argument(
        "--steps", type=_positive_int, default=20, help="denoising steps (DDIM, or the SD3 ODE); default 20"
    )
    parser.add_argument(
        "--eta",
        type=float,
        default=1.0,
        help="DDIM η in [0, 1] (0 = deterministic DDIM); default 1.0; SD3 models sample the ODE and ignore it",
    )
    parser.add_argument(
        "--guidance", type=float, default=5.0, help="classifier-free guidance scale (>= 1); default 5.0"
    )
    parser.add_argument("--resolution", type=int, help="image side in pixels (default: the model's native size)")
    parser.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto = cuda when a GPU is visible"
    )
    parser.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="dtype of the UNet and text encoders (the VAE stays float32); default float32",
    )
    parser.add_argument("--kind", choices=("auto", "sd15", "sdxl"), default="auto", help="model family")
    parser.add_argument("--revision", help="hub revision of a hub-id --model")
    parser.add_argument(
        "--negative-prompt",
        metavar="TEXT",
        help="the CFG branch's prompt (as the run config's sampling.negative_prompt); default: the stock pipelines' "
        "(the empty prompt; SDXL base: zero embeddings)",
    )
    parser.add_argument(
        "--flux-guidance",
        type=float,
        metavar="G",
        help="FLUX.1-dev: its guidance embedding's value (as the run config's model.flux_guidance); default 3.5",
    )
    parser.add_argument(
        "--max-sequence-length",
        type=int,
        metavar="N",
        help="SD3 / FLUX: T5 tokens (as the run config's model.max_sequence_length); default: the model directory's "
        "call_defaults.json, else the pipeline's default",
    )
    parser.add_argument(
        "--out", required=True, metavar="DIR", help="output directory (tiny:* models are built under DIR/_tiny_models)"
    )
    parser.add_argument("--grid-prompts", type=int, default=8, help="prompts shown in grid.png; default 8")
    parser.add_argument("--save-images", action="store_true", help="also write every image under DIR/images/")
    parser.add_argument(
        "--mlflow-uri",
        "--tracking-uri",
        dest="mlflow_uri",
        metavar="URI",
        help="log to this MLflow tracking URI (e.g. sqlite:///runs/mlflow.db)",
    )
    parser.add_argument(
        "--experiment", default=DEFAULT_EXPERIMENT, help=f"MLflow experiment; default {DEFAULT_EXPERIMENT}"
    )
    parser.add_argument("--run-name", default="evaluate", help="MLflow name of the parent run; default evaluate")
    return parser


def _parse_loras(args: list[str]) -> list[tuple[str, Path]]:
    loras, labels = [], set()
    for text in args:
        label, eq, path = text.partition("=")
        if not eq or Path(text).expanduser().exists() or "/" in label or not label:
            label, path = text, text
        file = resolve_lora_path(path)
        if label in labels or label == "base":
            raise EvaluateError(f"--lora {text}: the label {label!r} is already used; name it with LABEL=PATH")
        labels.add(label)
        loras.append((label, file))
    return loras


def _check_sampling(args: argparse.Namespace) -> None:
    if not 0.0 <= args.eta <= 1.0:
        raise EvaluateError(f"--eta {args.eta}: must be in [0, 1]")
    if not args.guidance >= 1.0:
        raise EvaluateError(f"--guidance {args.guidance}: must be >= 1 (1 = no guidance)")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise EvaluateError(f"--resolution {args.resolution}: must be >= 8 and a multiple of 8")
    if args.grid_prompts < 0:
        raise EvaluateError(f"--grid-prompts {args.grid_prompts}: must be >= 0")
    model = args.model
    if model.startswith(TINY_PREFIX):
        if model not in TINY_MODELS:
            raise EvaluateError(f"--model {model}: unknown tiny model; valid: {', '.join(TINY_MODELS)}")
    elif model.startswith(TESTBED_PREFIX):
        try:
            resolve_source(model)
        except (ValueError, FileNotFoundError) as err:
            raise EvaluateError(f"--model {model}: {err}") from None
    elif not Path(model).expanduser().is_dir() and not HUB_ID_RE.match(model):
        raise EvaluateError(f"--model {model}: no such pipeline directory (and not a hub id 'org/name')")


def main(argv: Sequence[str] | None = None) -> int:
    """CLI entry point; returns the exit code (0 done, 2 bad input with one message on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        _check_sampling(args)
        prompts = resolve_prompts(args.prompts, args.prompt, args.limit)
        rewards = rewards_from_arguments(args.rewards_yaml, args.reward)
        loras = _parse_loras(args.lora)
        out = Path(args.out)
        result = evaluate(
            args.model,
            prompts,
            rewards,
            loras,
            seeds=args.seeds,
            first_seed=args.first_seed,
            steps=args.steps,
            eta=args.eta,
            guidance_scale=args.guidance,
            negative_prompt=args.negative_prompt,
            resolution=args.resolution,
            device=args.device,
            dtype=args.dtype,
            kind=args.kind,
            revision=args.revision,
            max_sequence_length=args.max_sequence_length,
            flux_guidance=args.flux_guidance,
            cache_dir=out,
            grid_prompts=args.grid_prompts,
            image_dir=out / "images" if args.save_images else None,
            log=lambda line: print(line, file=sys.stderr),
        )
    except EvaluateError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    paths = write_report(result, out)
    sys.stdout.write(paths["table"].read_text(encoding="utf-8"))
    if args.mlflow_uri:
        try:
            run_id = log_to_mlflow(result, paths, args.mlflow_uri, args.experiment, args.run_name)
        except Exception as error:  # noqa: BLE001 - a store or server problem; the results are already written
            print(
                f"error: logging to MLflow at {args.mlflow_uri} failed ({type(error).__name__}: {error}); the "
                f"results are in {out}",
                file=sys.stderr,
            )
            return 1
        print(f"[evaluate] logged to MLflow {args.mlflow_uri}, run {run_id}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The schema of a whole run: one frozen, strict pydantic model loaded from YAML plus `--set key=value` overrides.

Every knob of `rlhf_diffusion` lives here and nowhere else. Each field's description gives its unit and, where the
default comes from a paper or its official code, the source and an evidence tag (see docs/algorithms.md §0):

    [C] confirmed in official code   [R] OpenReview discussion   [P] paper text   [I] GitHub issue
    [D] our own derivation           [U] UNCONFIRMED reconstruction (a design decision, not what a paper did)

Loading:

    cfg = load_config("configs/tiny.yaml", overrides=["train.learning_rate=1e-4", "rewards.0.weight=0.5"])

Every problem a user can cause (missing file, YAML syntax, unknown key, bad value, bad override) is raised as one
`ConfigError` whose message starts with the config's source and lists each problem as
`  <dotted.path>: <problem> (got <value>)`. List indices are written as path parts (`rewards.0.weight`), the same
form `--set` accepts and MLflow parameter names allow.

CLI: `python -m rlhf_diffusion.config CONFIG.yaml [--set k=v ...]` prints the resolved config as YAML, or the
error message on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import itertools
import json
import math
import re
import reprlib
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from rlhf_diffusion.models.sources import (
    HUB_ID_RE,
    PATH_PREFIXES,
    TESTBED_PREFIX,
    TINY_MODELS,
    TINY_PREFIX,
    resolve_source,
)

__all__ = [
    "ALGORITHM_NAMES",
    "DataConfig",
    "DEFAULT_LORA_TARGETS",
    "NON_DIFFERENTIABLE_REWARDS",
    "NUM_TRAIN_TIMESTEPS",
    "REWARD_NAMES",
    "TINY_MODELS",
    "AlgorithmConfig",
    "CheckpointConfig",
    "ConfigError",
    "D3POConfig",
    "DDEConfig",
    "DDPOConfig",
    "DRaFTConfig",
    "DiffusionDPOConfig",
    "EarlyStopConfig",
    "GRPOConfig",
    "GuardsConfig",
    "LoraConfig",
    "ModelConfig",
    "PromptSource",
    "PromptsConfig",
    "ResourcesConfig",
    "RewardConfig",
    "RewardName",
    "RunConfig",
    "SamplingConfig",
    "TailorPOConfig",
    "TailorPOGConfig",
    "TimestepRange",
    "TrackingConfig",
    "TrainConfig",
    "add_override_option",
    "apply_overrides",
    "flatten_config",
    "load_config",
    "main",
    "parse_config",
]

# ----------------------------------------------------------------------------------------------------------------
# Constants
# ----------------------------------------------------------------------------------------------------------------

RewardName = Literal[
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "brightness",
    "saturation",
    "aesthetic",
    "imagereward",
    "pickscore",
    "hpsv2",
    "clip_score",
    "testbed_reward",
    "custom",
]
# `name: custom` = a user's reward loaded from `target` ("package.module:Attribute", rewards/custom.py).
CUSTOM_REWARD = "custom"
# The built-in (registered) rewards: every name but `custom`.
REWARD_NAMES: tuple[str, ...] = tuple(name for name in get_args(RewardName) if name != CUSTOM_REWARD)
# Built-in rewards without a gradient. A custom reward's differentiability is only known once it is built.
NON_DIFFERENTIABLE_REWARDS: frozenset[str] = frozenset({"jpeg_compressibility", "jpeg_incompressibility"})
# `package.module:Attribute` (the attribute may be dotted: `module:Class.factory`); same grammar as rewards/custom.py.
_REWARD_TARGET_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")

DEFAULT_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
NUM_TRAIN_TIMESTEPS = 1000  # N of the SD1.5 / SDXL DDPM schedule; t ∈ {0 .. N−1}

_RUN_NAME_PATTERN = r"^[A-Za-z0-9._-]+$"
_NUMBER_RE = re.compile(r"^[+-]?(\d[\d_]*\.?\d*|\.\d+)([eE][+-]?\d+)?$")
_INDEXED_PART_RE = re.compile(r"^([^\[\]]*)((?:\[-?\d+\])+)$")
_MAX_SHOWN_VALUE = 80


class ConfigError(Exception):
    """A config a user wrote or overrode is invalid. `str(error)` is the one message to show them."""


def _field_error(path: str, problem: str, value: Any) -> PydanticCustomError:
    """Builds a validation error that points at `path` (relative to the validating model) instead of at the model.

    Model-level validators can only raise at the model's own location; this error carries the field's path in its
    context so that `ConfigError` messages (and pydantic's own string form) still name the offending field.
    """
    return PydanticCustomError(
        "config_field", "{path}: {problem}", {"path": path, "problem": problem, "value": _show(value)}
    )


class _ShortRepr(reprlib.Repr):
    """A `repr` that never renders more than a few levels and items of a value (a YAML alias bomb expands to
    billions of shared items; rendering it whole took minutes and gigabytes), keeping mappings in their order."""

    def __init__(self):
        super().__init__()
        self.maxlevel, self.maxdict, self.maxlist, self.maxtuple, self.maxset = 3, 8, 8, 8, 8
        self.maxstring = self.maxother = self.maxlong = _MAX_SHOWN_VALUE

    def repr_dict(self, x: dict, level: int) -> str:
        if not x:
            return "{}"
        if level <= 0:
            return "{...}"
        items = [
            f"{self.repr1(k, level - 1)}: {self.repr1(v, level - 1)}"
            for k, v in itertools.islice(x.items(), self.maxdict)
        ]
        return "{" + ", ".join(items + (["..."] if len(x) > self.maxdict else [])) + "}"


def _show(value: Any) -> str:
    """`repr` of a value, shortened for one line of an error message (bounded work, whatever the value's size)."""
    text = _ShortRepr().repr(value)
    return text if len(text) <= _MAX_SHOWN_VALUE else text[: _MAX_SHOWN_VALUE - 3] + "..."


class _FrozenModel(BaseModel):
    """Base of every config section; every section inherits this `model_config`.

    - extra="forbid": an unknown (e.g. misspelt) key is an error, never silently ignored.
    - frozen=True: a loaded config cannot be changed (`cfg.train.learning_rate = ...` raises).
    - allow_inf_nan=False: `.inf` / `.nan` are rejected for every float field.
    - coerce_numbers_to_str=True: a YAML number given for a string field (`run_name: 2024`) is read as text.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, coerce_numbers_to_str=True)


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


class LoraConfig(_FrozenModel):
    """LoRA adapter on the UNet; the only trained parameters (the reference is the same UNet with it disabled)."""

    rank: int = Field(
        4,
        ge=1,
        description="LoRA rank r (dimension of the low-rank update). Default 4: diffusers LoRAAttnProcessor default "
        "used by D3PO [C] and SPO's SD1.5 config [C] (SPO uses 64 for SDXL [C]).",
    )
    alpha: float = Field(
        4.0,
        gt=0,
        description="LoRA alpha; the update is scaled by alpha / rank. Default 4.0 from SPO (rank 4 / alpha 4) [C].",
    )
    target_modules: list[str] = Field(
        default_factory=lambda: list(DEFAULT_LORA_TARGETS),
        min_length=1,
        description="Names (suffixes) of the UNet linear layers that get an adapter. Default: the attention "
        "projections to_q, to_k, to_v, to_out.0, as SPO [C] (D3PO adapts the same attention processors [C]).",
    )
    init: Literal["gaussian", "default"] = Field(
        "gaussian",
        description="LoRA weight init (peft init_lora_weights): 'gaussian' = A ~ N(0, 1/r), B = 0, as SPO [C]; "
        "'default' = peft's Kaiming-uniform A, B = 0. Both start as the identity (LoRA output 0).",
    )


# FLUX.1-dev's guidance-embedding value: FluxPipeline's default `guidance_scale` [C].
FLUX_DEFAULT_GUIDANCE = 3.5


class ModelConfig(_FrozenModel):
    """Which pretrained pipeline to fine-tune and how to load it."""

    pretrained: str = Field(
        description="The base pipeline: a local diffusers pipeline directory, a Hugging Face hub id ('org/name', "
        "e.g. 'runwayml/stable-diffusion-v1-5', the D3PO base [C]), 'testbed:pipeline' (the shipped model trained on "
        "the procedural world of rlhf_diffusion/testbed, 64 px; 'testbed:flow' its SD3-shaped flow-matching twin), "
        "or 'tiny:sd15' / 'tiny:sdxl' / 'tiny:flux' (tiny random-weight pipelines the package builds itself, for "
        "tests and the embedded CPU default). Relative "
        "paths are relative to the working directory.",
    )
    kind: Literal["auto", "sd15", "sdxl"] = Field(
        "auto",
        description="Model family: 'sd15' (one text encoder), 'sdxl' (two text encoders, pooled embeds, "
        "micro-conditioning), or 'auto' = detect from the pipeline's components.",
    )
    revision: str | None = Field(
        None,
        description="Hub revision (branch, tag or commit) of a hub id; None = the default branch. Only valid when "
        "`pretrained` is a hub id.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32",
        description="dtype the frozen pipeline components are loaded in. Default float32 for CPU portability "
        "(D3PO and SPO load fp16 on GPU [C]).",
    )
    resolution: int | None = Field(
        None,
        description="Image side length in pixels for sampling and training (square); must be >= 8 and a multiple "
        "of 8 (the VAE downsamples by 8). None = the model's native size (512 SD1.5, 1024 SDXL).",
    )
    attention: Literal["sdpa", "default"] = Field(
        "sdpa",
        description="Attention kernel of every UNet attention layer (set by every actor after loading): 'sdpa' = "
        "diffusers' AttnProcessor2_0, torch scaled_dot_product_attention (flash / memory-efficient kernels on "
        "CUDA); 'default' = diffusers' AttnProcessor, the plain softmax(QKᵀ/√d)V maths (for debugging). Same "
        "output up to float rounding; the LoRA (on the q/k/v/out Linear layers) is the same under both.",
    )
    channels_last: bool = Field(
        False,
        description="Store the UNet and VAE weights in the channels_last memory format (faster convolutions on "
        "CUDA tensor cores, especially with bf16/fp16). Same output; on CPU it only changes the memory layout.",
    )
    finetune: Literal["lora", "full"] = Field(
        "lora",
        description="What the learner trains: 'lora' = a LoRA adapter on the UNet (the reference policy is the "
        "UNet with the adapter disabled; the run exports pytorch_lora_weights.safetensors); 'full' = every UNet "
        "weight, as DDE trains in its paper [C] (the learner keeps float32 master weights plus a frozen reference "
        "copy in `dtype`, samplers receive the whole UNet in `dtype` at every publish, and the run exports a "
        "diffusers `unet/` directory). `lora` is ignored under 'full'. Full SD1.5/SDXL needs a GPU learner "
        "(Adam state is 2x the UNet) and usually several learner ranks (resources.num_learners).",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA adapter settings.")
    max_sequence_length: int | None = Field(
        None,
        ge=0,
        le=512,
        description="SD3 / FLUX only: T5 tokens in the transformer's text stream (the stock pipelines' "
        "`max_sequence_length`; zeros in SD3 without T5). None = what the pipeline directory's call_defaults.json "
        "says (testbed:flow was trained with 0), else the pipelines' defaults, 256 (SD3) and 512 (FLUX.1-dev). "
        "Ignored by SD1.5 / SDXL.",
    )
    flux_guidance: float = Field(
        FLUX_DEFAULT_GUIDANCE,
        ge=0,
        description="FLUX.1-dev (a guidance-distilled transformer, `guidance_embeds`) only: the value of its "
        "guidance embedding in every transformer call, sampling and training alike (FluxPipeline's `guidance_scale`; "
        "default 3.5, FluxPipeline's [C]). Not classifier-free guidance (that is sampling.guidance_scale, 1 for "
        "FLUX). Ignored by other models, FLUX.1-schnell included (no guidance embedding).",
    )

    @field_validator("pretrained")
    @classmethod
    def _check_pretrained(cls, value: str) -> str:
        if value.startswith(TINY_PREFIX):
            if value not in TINY_MODELS:
                raise ValueError(f"unknown tiny model; valid tiny models: {', '.join(TINY_MODELS)}")
            return value
        if value.startswith(TESTBED_PREFIX):
            try:
                resolve_source(value)
            except (ValueError, FileNotFoundError) as err:
                raise ValueError(str(err)) from None
            return value
        path = Path(value).expanduser()
        if path.is_dir():
            return value
        if path.exists():
            raise ValueError(
                "is a file, not a diffusers pipeline directory (single-file checkpoints are not supported)"
            )
        if value.startswith(PATH_PREFIXES):
            raise ValueError("no such directory (a local model must be a diffusers pipeline directory)")
        if not HUB_ID_RE.match(value):
            raise ValueError(
                "not a local directory, a hub id of the form 'org/name', or one of " + ", ".join(TINY_MODELS)
            )
        return value

    @field_validator("resolution")
    @classmethod
    def _check_resolution(cls, value: int | None) -> int | None:
        if value is not None and (value < 8 or value % 8 != 0):
            raise ValueError("must be >= 8 and a multiple of 8 (the VAE downsamples images by 8)")
        return value

    @model_validator(mode="after")
    def _check_consistency(self) -> ModelConfig:
        if self.pretrained in TINY_MODELS and self.kind not in ("auto", self.pretrained.removeprefix("tiny:")):
            raise _field_error("kind", f"contradicts pretrained {self.pretrained!r}", self.kind)
        is_local = (
            self.pretrained in TINY_MODELS
            or self.pretrained.startswith(TESTBED_PREFIX)
            or Path(self.pretrained).expanduser().is_dir()
        )
        if self.revision is not None and is_local:
            raise _field_error("revision", "only valid when `pretrained` is a hub id", self.revision)
        return self


# ----------------------------------------------------------------------------------------------------------------
# Sampling
# ----------------------------------------------------------------------------------------------------------------


class SamplingConfig(_FrozenModel):
    """The stochastic DDIM sampler every algorithm rolls out with (on SD3 / SD3.5: the flow sampler,
    `diffusion/flow_sampling.py`, at `flow_noise_level`)."""

    num_steps: int = Field(
        20,
        ge=1,
        description="K, number of DDIM denoising steps per trajectory. Default 20 from D3PO config/base.py [C] "
        "and TailorPO [R].",
    )
    eval_num_steps: int | None = Field(
        None,
        ge=1,
        description="Denoising steps of the held-out evaluation (the before / after images, their rewards and the "
        "guards' evaluations); None = `num_steps`. Ours: the final-pair methods (DDE, DDE-Single, Diffusion-DPO) "
        "train on final images from any sampler, so their rollouts may use fewer steps than the images a user "
        "judges (configs/tiny.yaml: 5 against 10, docs/learning_signal.md). The step methods train on the "
        "rollout's own steps, whatever this is.",
    )
    eta: float = Field(
        1.0,
        le=1.0,
        description="DDIM η in (0, 1]: the per-step std is σ_τ = η·sqrt(...) (0 = deterministic DDIM, 1 = DDPM "
        "variance). Must be > 0 because the per-step log-prob divides by σ_τ. Default 1.0 from D3PO/SPO [C]. SD3 "
        "models ignore it (`flow_noise_level`).",
    )
    guidance_scale: float = Field(
        5.0,
        ge=1.0,
        description="Classifier-free guidance scale w (1 = no guidance); used identically when sampling and when "
        "re-scoring in training. Default 5.0 from D3PO config/base.py [C] (assumed for TailorPO, UNCONFIRMED [U]).",
    )
    negative_prompt: str | None = Field(
        None,
        description="The prompt of classifier-free guidance's unconditional branch, in sampling and in every loss "
        'that guides (as the stock pipelines\' `negative_prompt`). None = the stock default: the empty prompt "" '
        "(SDXL base: all-zero embeddings, its `force_zeros_for_empty_prompt`). On FLUX the guided branch is "
        "FluxPipeline's true CFG (`guidance_scale` > 1). The held-out evaluation uses it too. Not a paper setting "
        "(D3PO, TailorPO and DDE sample without one [C]).",
    )
    flow_noise_level: float = Field(
        0.7,
        ge=0,
        description="SD3 / SD3.5 (flow-matching) models only, in place of `eta`: Flow-GRPO's noise level a of its "
        "SDE sampler (per-step diffusion coefficient a·sqrt(σ/(1 − σ))). Default 0.7, Flow-GRPO's and flow_grpo's "
        "DPO sampling value on SD3.5 [C]; 0 = the probability-flow ODE the stock StableDiffusion3Pipeline samples "
        "(no per-step log-prob: allowed for the final-pair methods, which never use one). SD1.5 / SDXL ignore it.",
    )
    flow_sde: Literal["flow_grpo", "cps"] = Field(
        "flow_grpo",
        description="Flow-matching models only: the SDE step's noise schedule at `flow_noise_level` a. 'flow_grpo': "
        "Flow-GRPO's Euler–Maruyama step, std a·sqrt(σ/(1 − σ))·sqrt(σ − σ') [C]. 'cps': Flow-CPS's "
        "coefficients-preserving step (Wang & Yu 2025; flow_grpo's sde_type 'cps' [C]), std σ'·sin(aπ/2), mean "
        "(1 − σ')x̂_0 + sqrt(σ'² − s²)ε̂, so each state stays on the forward process's marginal; its last step has "
        "no noise, so the step-wise methods need algorithm.skip_final_steps >= 1. The log-prob is the Gaussian "
        "density's under both (flow_grpo's cps code drops its 1/(2s²); docs/algorithms.md §10).",
    )
    batch_size: int = Field(
        8,
        ge=1,
        description="Prompts per sampler per iteration. Each prompt yields one trajectory pair (D3PO, DDE / "
        "Diffusion-DPO online) or one branched trajectory (TailorPO). Samples per iteration = batch_size × "
        "resources.num_samplers. Default 8 = D3PO's aesthetic reproduction sample batch per GPU [C].",
    )
    preview_decoder: str | None = Field(
        None,
        description="A local diffusers AutoencoderTiny directory (TAESD format, e.g. a copy of madebyollin/taesd "
        "for SD1.5 or madebyollin/taesdxl for SDXL) that decodes TailorPO(-G)'s intermediate x̂_0 previews for the "
        "per-step rewards: much cheaper than the full VAE, but approximate, so it changes which candidate wins. "
        "The final images (last step, rewards logged, image grids) and TailorPO-G's guidance gradient always use "
        "the full VAE. None = the full VAE everywhere. Other algorithms ignore it.",
    )

    @field_validator("preview_decoder")
    @classmethod
    def _check_preview_decoder(cls, value: str | None) -> str | None:
        if value is not None and not (Path(value).expanduser() / "config.json").is_file():
            raise ValueError("not a diffusers AutoencoderTiny directory (no config.json in it)")
        return value

    @field_validator("eta")
    @classmethod
    def _check_eta(cls, value: float) -> float:
        if value <= 0:
            raise ValueError(
                "must be > 0: the per-step DDIM log-prob has the std σ_τ = η·sqrt(...) in its denominator, so it "
                "is undefined at eta = 0 (deterministic DDIM)"
            )
        return value


# ----------------------------------------------------------------------------------------------------------------
# Algorithms (discriminated union on `name`)
# ----------------------------------------------------------------------------------------------------------------


def _check_ordered(value: tuple[int, int]) -> tuple[int, int]:
    if value[0] > value[1]:
        raise ValueError("must be (lo, hi) with lo <= hi")
    return value


_Timestep = Annotated[int, Field(ge=0, le=NUM_TRAIN_TIMESTEPS - 1)]
TimestepRange = Annotated[tuple[_Timestep, _Timestep], AfterValidator(_check_ordered)]


def _skip_final_steps_field() -> Any:
    """`skip_final_steps` of the step methods (D3PO, TailorPO, TailorPO-G): one declaration, a fresh Field each."""
    return Field(
        0,
        ge=0,
        description="The last N denoising transitions are sampled but not trained on (ours). With η = 1 the last "
        "transitions are nearly deterministic (σ small, |κ|/σ up to 8× that of the other steps, κ = ∂μ/∂ε̂), so "
        "their log-ratios dominate the gradient and drift the model without changing anything a reward can see "
        "(docs/learning_signal.md). 0 = every step, the paper's setting.",
    )


def _step_weight_field() -> Any:
    """`step_weight` of the step methods (D3PO, TailorPO, TailorPO-G): one declaration, a fresh Field each."""
    return Field(
        "uniform",
        description="How each step's log-ratio enters the loss. 'uniform' = as the paper (log π_θ/π_ref per element, "
        "which scales as |κ_τ|/σ_τ per unit change of ε̂). 'eps_scale' (ours) = the log-ratio times σ_τ/|κ_τ| "
        "before the clamp: every step's gradient then has the scale of one unit of ε̂, so no step dominates by its "
        "noise schedule alone (≈ 1 at every step but the last ones).",
    )


def _selector_field() -> Any:
    """`name` of an algorithm section with one method: the discriminator of `RunConfig.algorithm`."""
    return Field(description="Algorithm selector.")


def _step_beta_field(description: str) -> Any:
    """`beta` of the step DPO methods (D3PO, TailorPO, TailorPO-G): default 0.1, > 0; each method its own
    description."""
    return Field(0.1, gt=0, description=description)


def _step_clip_epsilon_field(description: str) -> Any:
    """`clip_epsilon` of the step DPO methods (D3PO, TailorPO, TailorPO-G): the ratio clamp, default 0.1, in
    (0, 1); each method its own description."""
    return Field(0.1, gt=0, lt=1, description=description)


def _timestep_fraction_field(description: str) -> Any:
    """`timestep_fraction` of the step methods and the policy-gradient ones: default 1.0 (every step), in (0, 1];
    each its own description."""
    return Field(1.0, gt=0, le=1, description=description)


def _timestep_range_field(description: str) -> Any:
    """`timestep_range` of DDE and Diffusion-DPO: default (0, NUM_TRAIN_TIMESTEPS − 1), every t; each its own
    description."""
    return Field((0, NUM_TRAIN_TIMESTEPS - 1), description=description)


class D3POConfig(_FrozenModel):
    """D3PO (Yang et al., CVPR 2024): two trajectories from a shared x_T; the final-image preference is assigned to
    every step; clamped step-wise DPO loss (docs/algorithms.md §1)."""

    name: Literal["d3po"] = _selector_field()
    beta: float = _step_beta_field(
        "DPO temperature β on the per-step log-ratios (per-element mean log-probs). Default 0.1 from "
        "D3PO config/base.py [C].",
    )
    clip_epsilon: float = _step_clip_epsilon_field(
        "Ratio clamp ε: π_θ/π_ref is clamped to [1−ε, 1+ε] (zero gradient outside). Default 0.1 from "
        "D3PO config/base.py [C] (changed from 0.2, D3PO issue #4 [I]).",
    )
    timestep_fraction: float = _timestep_fraction_field(
        "Fraction of the K denoising steps trained per pair (a random subset of steps). Default 1.0 = "
        "all steps, D3PO config/base.py [C].",
    )
    skip_final_steps: int = _skip_final_steps_field()
    step_weight: Literal["uniform", "eps_scale"] = _step_weight_field()
    multi_reward: Literal["weighted_sum", "pareto"] = Field(
        "weighted_sum",
        description="How several rewards decide the winner: 'weighted_sum' of the rewards with their weights, or "
        "'pareto' = D3PO's dominance rule (A wins iff A >= B on every reward and > on one; non-dominated pairs "
        "are ties) [C].",
    )


class TailorPOConfig(_FrozenModel):
    """TailorPO (Ren et al., ICLR 2025 submission): at every step two candidates from the same x_τ are ranked by the
    step reward r(c, x̂_0) and trained with the clamped DPO step loss (docs/algorithms.md §2)."""

    name: Literal["tailorpo"] = _selector_field()
    beta: float = _step_beta_field(
        "DPO temperature β. Default 0.1: D3PO's default assumed, UNCONFIRMED for TailorPO [U].",
    )
    clip_epsilon: float = _step_clip_epsilon_field(
        "Ratio clamp δ: π_θ/π_ref clamped to [1−δ, 1+δ]. Form from the TailorPO authors (they reuse "
        "D3PO's constraint) [R]; value 0.1 assumed from D3PO, UNCONFIRMED [U].",
    )
    num_candidates: int = Field(
        2,
        ge=2,
        description="Candidates drawn from the same x_τ at each step; winner = highest step reward, loser = lowest. "
        "Default 2 from TailorPO [R] (SPO uses 4 for SD1.5 [C]).",
    )
    step_ranking: Literal["x0_prediction", "completion"] = Field(
        "x0_prediction",
        description="How the candidates of a step are scored. 'x0_prediction' = the reward of the decoded one-step "
        "prediction x̂_0 (TailorPO Eq. 12, the paper). 'completion' (ours) = the reward of a deterministic DDIM "
        "completion in `completion_jumps` UNet calls: on the testbed it agrees with the candidates' value (mean "
        "reward of 6 stochastic completions) on 0.81 of the decisive pairs of steps 1-4 against 0.47 for x̂_0 "
        "(benchmarks/step_labels.py). The last step scores x_0 either way.",
    )
    completion_jumps: int = Field(
        4,
        ge=1,
        description="UNet calls per candidate of the 'completion' ranking (1 ≈ x̂_0; more than the remaining steps "
        "= every remaining step).",
    )
    continuation: Literal["winner", "random"] = Field(
        "winner",
        description="Which candidate the trajectory continues from. 'winner' (stated for TailorPO-G [R]; "
        "UNCONFIRMED for plain TailorPO [U]) or 'random' (SPO's step-wise resampling [C]).",
    )
    timestep_fraction: float = _timestep_fraction_field(
        "Fraction of the K denoising steps whose pairs are trained. Default 1.0 = all steps, UNCONFIRMED [U].",
    )
    skip_final_steps: int = _skip_final_steps_field()
    step_weight: Literal["uniform", "eps_scale"] = _step_weight_field()


class TailorPOGConfig(TailorPOConfig):
    """TailorPO-G: TailorPO plus a reward-gradient step on the winner (needs differentiable rewards;
    docs/algorithms.md §2b)."""

    name: Literal["tailorpo_g"] = _selector_field()  # type: ignore[assignment]
    guidance_gamma: float = Field(
        0.3,
        gt=0,
        le=2,
        description="γ, size of the guidance step as a fraction of the sampling noise: ||g|| = γ·σ_τ·sqrt(D) "
        "(D = latent elements). Used when guidance_norm == 'sigma_relative'. UNCONFIRMED reconstruction of "
        "TailorPO's Eq. 13 [U].",
    )
    guidance_gradient: Literal["tweedie_const_eps", "full_chain"] = Field(
        "tweedie_const_eps",
        description="How ∇_x r(c, decode(x̂_0(x))) is computed: 'tweedie_const_eps' treats ε̂ as constant "
        "(∂x̂_0/∂x = 1/sqrt(ᾱ_p), no UNet backward) or 'full_chain' backpropagates through the UNet call. "
        "UNCONFIRMED [U] (docs/algorithms.md §2b).",
    )
    guidance_norm: Literal["sigma_relative", "raw"] = Field(
        "sigma_relative",
        description="'sigma_relative': rescale the reward gradient to norm guidance_gamma·σ_τ·sqrt(D); 'raw': "
        "g = guidance_scale_raw·∇_x r. UNCONFIRMED [U].",
    )
    guidance_scale_raw: float = Field(
        1.0,
        gt=0,
        description="η in g = η·∇_x r; used only when guidance_norm == 'raw' (units: latent per reward unit). "
        "The paper's value was not retrieved, UNCONFIRMED [U].",
    )
    guidance_decode: Literal["clamped", "straight_through"] = Field(
        "straight_through",
        description="How the reward gradient passes the decoder's clamp to [0, 1]: 'clamped' = through the clamp, "
        "which zeroes the gradient of every out-of-range pixel (3-13% of them on the testbed); 'straight_through' "
        "(ours) = the reward sees the clamped image, the gradient flows to the unclamped decoder output. The paper "
        "does not say, UNCONFIRMED [U].",
    )


class _FinalPairConfig(_FrozenModel):
    """Fields shared by the final-pair methods (DDE, DDE-Single, Diffusion-DPO): how online pairs are formed and how
    many (t, ε) draws each pair's loss averages. Both are ours; the defaults are the papers' (two samples, one draw)."""

    samples_per_prompt: int = Field(
        2,
        ge=2,
        description="Images sampled per prompt for each online pair; the pair is the reward's best against its "
        "worst (ties dropped). 2 = the papers' pairs (DDE and Diffusion-DPO train on two images per prompt) [C]; "
        "more is ours: wider reward gaps and labels the held-out judge agrees with more often, at S/2 times the "
        "sampling per pair (docs/learning_signal.md).",
    )
    draws_per_pair: int = Field(
        1,
        ge=1,
        description="Independent (t, ε) draws per pair in each loss evaluation, the pair's loss their mean. 1 = "
        "the papers' one draw per pair [C]; more is ours: the single draw's t and ε are most of the gradient's "
        "noise, so k draws raise the per-pair signal-to-noise ratio at k times the training compute per pair "
        "(docs/learning_signal.md).",
    )
    shared_initial_noise: bool = Field(
        False,
        description="Start a prompt's `samples_per_prompt` images from one x_T (they then differ only by the "
        "sampler's later noise, η > 0) instead of independent x_T. False = independent samples, as the papers' "
        "pairs (Pick-a-Pic's two images are independent generations); True is ours: the pair's two ε-MSE "
        "gradients share the common layout's part, which cancels in the pair's difference, so the per-prompt "
        "signal-to-noise ratio of the pair gradient is 2.5 times higher on the testbed, but the held-out gain is "
        'lower (measured: docs/learning_signal.md, "More signal per pair does not raise the gain"). Needs '
        "η > 0 (`sampling.eta`; on flow models `sampling.flow_noise_level` > 0), or the samples are identical.",
    )
    guided_loss: bool = Field(
        False,
        description="Evaluate the loss's noise predictions with the sampler's classifier-free guidance (ε_u + "
        "w (ε_c − ε_u) at `sampling.guidance_scale`, twice the network calls) instead of the conditional model's "
        "alone. False = the papers' (Diffusion-DPO and DDE train the conditional ε-MSE [C]); True is ours: the "
        "preference is then stated on the denoiser that draws the images (docs/learning_signal.md).",
    )
    winner_sft_weight: float = Field(
        0.0,
        ge=0,
        description="λ of a term λ·c_t·(e^w_θ − e^w_ref) added to each pair's loss: the winner's own ε-MSE relative to "
        "the reference, at the logit's scale c_t (0.5 β for Diffusion-DPO, β_s (1 − ᾱ_t)/ᾱ_t for DDE): a "
        "fine-tuning step on the reward's best sample, as RPO adds the winner's NLL to DPO. 0 = the papers' loss; "
        "λ > 0 is ours: without it the testbed's DDE-Single wins its pairs by fitting the winner and the loser "
        "both worse (likelihood displacement), but λ = 0.5 removes that and harms the held-out checker (measured: "
        'docs/learning_signal.md, "The pairs are won by fitting both images worse").',
    )
    reference: Literal["base", "policy"] = Field(
        "base",
        description="The reference of the relative ε-MSEs d^i = e^i_θ − e^i_ref. 'base' = the model before "
        "fine-tuning (the LoRA switched off; the papers' fixed reference [C]). 'policy' is ours: the current policy "
        "itself, stop-gradient (TR-DPO's reference update at every step): every logit is then 0, every pair's "
        "sigmoid weight 1/2, the loss linear in Δ_t with no pull back toward the base model, and the reference's "
        "network call is saved. On the testbed it harms: −0.099 on the held-out checker where the fixed reference "
        'gains +0.072 (docs/learning_signal.md, "What the default learns"). The KL diagnostics then read 0.',
    )
    timestep_density: Literal["auto", "uniform", "logit_normal"] = Field(
        "auto",
        description="How each draw's t is drawn on `timestep_range` (t indexes the model's 1000-step training table; "
        "on an SD3 flow model the scheduler's shifted σ table, larger t = noisier). 'uniform': t ~ U{lo..hi}, as "
        "Diffusion-DPO train.py [C]. 'logit_normal': t = lo + floor(u (hi − lo + 1)), u = sigmoid(N(0, 1)), as "
        "flow_grpo's SD3 DPO draws σ over the whole table [C] (a narrower range stretches it: ours). 'auto' = "
        "'uniform' on SD1.5 / SDXL, 'logit_normal' on SD3 (docs/algorithms.md, \"Final-pair methods on flow "
        'models").',
    )


class DDEConfig(_FinalPairConfig):
    """DDE (Shi et al., arXiv 2411.14871): Diffusion-DPO-style pairs at one t with the single-shot term and an
    optional EMA step-wise correction (docs/algorithms.md §3). 'dde_single' is the DDE-Single ablation (no
    correction)."""

    name: Literal["dde", "dde_single"] = Field(
        description="Algorithm selector: 'dde' (single-shot + step-wise correction) or 'dde_single' (the "
        "DDE-Single ablation, correction 'none').",
    )
    beta_s: float = Field(
        1000.0,
        gt=0,
        description="β_s, scale of the single-shot logit −β_s·((1−ᾱ_t)/ᾱ_t)·Δ_t (Δ_t from per-element mean "
        "ε-MSEs). The paper's value was lost: UNCONFIRMED [U].",
    )
    beta_c: float = Field(
        1000.0,
        gt=0,
        description="β_c, scale of the step-wise correction term +β_c·C_t in the logit. The paper's value was "
        "lost: UNCONFIRMED [U].",
    )
    correction: Literal["ema", "none"] = Field(
        "ema",
        description="Step-wise correction C_t: 'ema' = suffix sum of an EMA array over t (delay update, DDE "
        "Algorithm 1 [P], details UNCONFIRMED [U]); 'none' = DDE-Single. Defaults to 'none' for 'dde_single', "
        "where 'ema' is an error.",
    )
    ema_momentum: float = Field(
        0.9,
        ge=0,
        lt=1,
        description="Momentum m of the correction EMA: A[t] ← m·A[t] + (1−m)·batch statistic. The paper's value "
        "was lost: UNCONFIRMED [U] (0.9–0.99 reasonable).",
    )
    timestep_range: TimestepRange = _timestep_range_field(
        "Inclusive range (lo, hi) of DDPM timesteps t (on the 1000-step grid) drawn uniformly per "
        "pair. Default (0, 999) = all t (uniform sampling assumed, UNCONFIRMED [U]); DDE's motivating ablation "
        "trains on (200, 700) [P].",
    )

    @model_validator(mode="before")
    @classmethod
    def _default_correction(cls, data: Any) -> Any:
        if isinstance(data, dict) and "name" in data and data["name"] == "dde_single" and "correction" not in data:
            return {**data, "correction": "none"}
        return data

    @model_validator(mode="after")
    def _check_correction(self) -> DDEConfig:
        if self.name == "dde_single" and self.correction != "none":
            raise _field_error(
                "correction",
                "must be 'none' for dde_single (DDE-Single has no correction; use name 'dde')",
                self.correction,
            )
        return self


class DiffusionDPOConfig(_FinalPairConfig):
    """Diffusion-DPO (Wallace et al.; DDE's 'Uniform' baseline): ε-MSE DPO loss at one random t per pair."""

    name: Literal["diffusion_dpo"] = _selector_field()
    beta: float = Field(
        5000.0,
        gt=0,
        description="β_dpo in −logσ(−0.5·β_dpo·Δ_t) with per-element mean ε-MSEs. Default 5000 from DiffusionDPO "
        "train.py [C]. On SD3 Δ_t is a velocity-MSE difference; flow_grpo's SD3.5-M DPO uses 100 there [C].",
    )
    timestep_range: TimestepRange = _timestep_range_field(
        "Inclusive range (lo, hi) of DDPM timesteps t (1000-step grid) drawn uniformly per pair. "
        "Default (0, 999) = DiffusionDPO train.py [C]; DDE reports (200, 700) trains better [P].",
    )


class _PolicyGradientConfig(_FrozenModel):
    """Fields shared by the policy-gradient methods (DDPO, GRPO): PPO-clip on the per-step DDIM log-probs recorded by
    the sampler (docs/algorithms.md §8). The optimizer steps and passes are `train.train_batch_size` (examples = one
    trajectory step each) and `train.num_inner_epochs`."""

    clip_range: float = Field(
        1e-4,
        gt=0,
        lt=1,
        description="PPO clip ε: the importance ratio π_θ/π_old of each step (per-element-mean log-probs) is clipped "
        "to [1−ε, 1+ε] in the surrogate. Default 1e-4 from ddpo-pytorch config/base.py train.clip_range [C] (also "
        "DanceGRPO's SD config and Flow-GRPO [C]).",
    )
    adv_clip_max: float = Field(
        5.0,
        gt=0,
        description="Advantages are clipped to [−adv_clip_max, adv_clip_max] before the surrogate. Default 5 from "
        "ddpo-pytorch config/base.py train.adv_clip_max [C] (also DanceGRPO, Flow-GRPO [C]).",
    )
    timestep_fraction: float = _timestep_fraction_field(
        "Fraction of the trainable steps (K less skip_final_steps) trained per trajectory: a random "
        "subset of floor(fraction · steps) of them (at least 1), drawn per trajectory at rollout. Default 1.0 = "
        "every step, ddpo-pytorch config/base.py train.timestep_fraction [C] (ddpo-pytorch redraws the subset "
        "every inner epoch; here it is fixed at rollout).",
    )


class DDPOConfig(_PolicyGradientConfig):
    """DDPO (Black et al., ICLR 2024, arXiv 2305.13301; code kvablack/ddpo-pytorch): PPO-clip on every DDIM step
    of independently sampled trajectories, advantages from a per-prompt reward tracker (docs/algorithms.md §8)."""

    name: Literal["ddpo"] = _selector_field()
    samples_per_prompt: int = Field(
        1,
        ge=1,
        description="Images sampled per prompt of the iteration. Default 1: ddpo-pytorch samples each prompt draw "
        "once (repeats come only from the prompt function) [C]; more gives the per-prompt tracker more values per "
        "visit.",
    )
    per_prompt_stat_tracking: bool = Field(
        True,
        description="Advantages from a per-prompt tracker: A = (r − mean)/(std + 1e-6) over a FIFO buffer of the "
        "prompt's last `stat_buffer_size` rewards (kept across iterations, checkpointed), or over the whole "
        "iteration's rewards while the buffer holds fewer than `stat_min_count`. False = the iteration's z-score "
        "(std + 1e-8). Default on, ddpo-pytorch config/base.py per_prompt_stat_tracking [C]; population std as "
        "numpy's [C].",
    )
    stat_buffer_size: int = Field(
        16,
        ge=1,
        description="Rewards kept per prompt by the tracker. Default 16 from ddpo-pytorch config/base.py [C] (its "
        "aesthetic / alignment presets use 32 [C]).",
    )
    stat_min_count: int = Field(
        16,
        ge=1,
        description="Rewards a prompt's buffer must hold before its own mean and std are used (else the "
        "iteration's). Default 16 from ddpo-pytorch config/base.py [C].",
    )
    skip_final_steps: int = Field(
        0,
        ge=0,
        description="The last N denoising transitions are sampled but not trained on (ours; as for D3PO). 0 = every "
        "step, ddpo-pytorch's setting [C].",
    )

    @model_validator(mode="after")
    def _check_min_count(self) -> DDPOConfig:
        if self.stat_min_count > self.stat_buffer_size:
            raise _field_error(
                "stat_min_count",
                f"must be at most stat_buffer_size ({self.stat_buffer_size}): a buffer never holds more values than "
                "that, so the per-prompt statistics would never be used",
                self.stat_min_count,
            )
        return self


class GRPOConfig(_PolicyGradientConfig):
    """GRPO for diffusion (as DanceGRPO's SD path and Flow-GRPO): a group of G images per prompt, advantages
    normalised within the group, PPO-clip on the per-step DDIM log-probs, an optional KL to the reference
    (docs/algorithms.md §9)."""

    name: Literal["grpo"] = _selector_field()
    group_size: int = Field(
        16,
        ge=2,
        description="G, images sampled per prompt (independent x_T); A_i = (r_i − mean_G r)/(std_G r + 1e-8) with the "
        "unbiased std; a group whose rewards are all equal has A = 0 and is not trained on. Default 16 = DanceGRPO's "
        "SD config num_generations [C] (Flow-GRPO: 24 on SD3.5 [C]).",
    )
    kl_beta: float = Field(
        0.0,
        ge=0,
        description="β of the KL penalty β · KL(π_θ ‖ π_ref) per trained step, the closed form for two Gaussians "
        "with the same σ_τ (nats per latent element), the reference being the UNet with the LoRA disabled. Default "
        "0 = off, as DanceGRPO's SD path [C]. Flow-GRPO uses 0.01-0.04 on SD3.5 [C], but its KL is per-element in "
        "its own SDE kernel without the step size Δt (flow_grpo#78 [I]), so the value does not carry over to the "
        "DDIM step; >0 costs one reference UNet pass per example.",
    )
    skip_final_steps: int = Field(
        1,
        ge=0,
        description="The last N denoising transitions are sampled but not trained on. Default 1: DanceGRPO's SD "
        "path never trains the last DDIM step [C] (Flow-GRPO drops it too [C]); 0 = every step.",
    )
    global_std: bool = Field(
        False,
        description="Normalise the advantages by one std for all groups, the population std of every reward of the "
        "sampler's shard + 1e-4, instead of each group's own (Flow-GRPO's `sample.global_std`, set in most of "
        "flow_grpo's configs [C]; there the std is over the whole iteration's rewards, here over one sampler's "
        "prompts x G images, since advantages are computed at rollout). Default False = DanceGRPO's per-group std.",
    )


class DRaFTConfig(_FrozenModel):
    """DRaFT (Clark et al., ICLR 2024): the differentiable reward's gradient back-propagated through the last K steps
    of the sampled chain (docs/algorithms.md, "DRaFT"). Needs a differentiable reward."""

    name: Literal["draft"] = _selector_field()
    grad_steps: int = Field(
        1,
        ge=1,
        description="K: the last K denoising steps carry the gradient; the earlier ones are replayed as sampled, as "
        "constants. 1 = DRaFT-1, the paper's efficient variant [P]; K >= sampling.num_steps = the whole chain "
        "(AlignProp's full back-propagation [P]). The learner's memory and time grow with K.",
    )


AlgorithmConfig = Annotated[
    D3POConfig
    | TailorPOConfig
    | TailorPOGConfig
    | DDEConfig
    | DiffusionDPOConfig
    | DDPOConfig
    | GRPOConfig
    | DRaFTConfig,
    Field(discriminator="name"),
]
_ALGORITHM_CLASSES: tuple[type[_FrozenModel], ...] = (
    D3POConfig,
    TailorPOConfig,
    TailorPOGConfig,
    DDEConfig,
    DiffusionDPOConfig,
    DDPOConfig,
    GRPOConfig,
    DRaFTConfig,
)
ALGORITHM_NAMES: tuple[str, ...] = tuple(
    name for cls in _ALGORITHM_CLASSES for name in get_args(cls.model_fields["name"].annotation)
)
_ALGORITHM_BY_NAME: Mapping[str, type[_FrozenModel]] = MappingProxyType(
    {name: cls for cls in _ALGORITHM_CLASSES for name in get_args(cls.model_fields["name"].annotation)}
)


# ----------------------------------------------------------------------------------------------------------------
# Rewards, resources, training, prompts, tracking, checkpoints
# ----------------------------------------------------------------------------------------------------------------


class RewardConfig(_FrozenModel):
    """One reward model; several are combined by their weights (or by Pareto dominance for D3PO)."""

    name: RewardName = Field(
        description="Reward model. JPEG (in)compressibility are not differentiable (no TailorPO-G); see "
        "docs/rewards.md for each model's source and preprocessing. 'custom' = a user's reward loaded from "
        "`target` (docs/rewards.md §6).",
    )
    weight: float = Field(
        1.0,
        description="Multiplier of this reward in the weighted sum (finite, non-zero; negative = minimise).",
    )
    path: str | None = Field(
        None,
        description="Weights of a model-based reward: a local file or directory in the model's published format, "
        "or a hub id. None = the reward module's default location.",
    )
    kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra keyword arguments for the reward's constructor (reward-specific, e.g. a JPEG quality).",
    )
    target: str | None = Field(
        None,
        description="Only for name 'custom' (required there): 'package.module:Attribute', a RewardModel subclass or "
        "a factory returning a reward, called with `kwargs` (and `path` when set). The module must be importable "
        "on every Ray node (ray job submit --working-dir, runtime_env py_modules, or PYTHONPATH).",
    )
    label: str | None = Field(
        None,
        pattern=_RUN_NAME_PATTERN,
        description="The reward's key in metrics (reward/<label>_mean), per-reward scores and Pareto ranking; keys "
        "must be distinct. None = the attribute name of a custom `target`, else `name`.",
    )

    @property
    def key(self) -> str:
        """The reward's key in metrics, `per_reward` dicts and Pareto ranking (see `label`)."""
        if self.label is not None:
            return self.label
        if self.name == CUSTOM_REWARD and self.target is not None:
            return self.target.rpartition(":")[2].rpartition(".")[2]
        return self.name

    @field_validator("weight")
    @classmethod
    def _check_weight(cls, value: float) -> float:
        if value == 0:
            raise ValueError("must be non-zero (remove the reward instead)")
        return value

    @model_validator(mode="after")
    def _check_target(self) -> RewardConfig:
        if self.name == CUSTOM_REWARD:
            if self.target is None:
                raise _field_error(
                    "target", "required for name 'custom': the reward's import path 'package.module:Attribute'", None
                )
            if not _REWARD_TARGET_RE.match(self.target):
                raise _field_error(
                    "target", "expected 'package.module:Attribute' (e.g. 'my_pkg.rewards:MyReward')", self.target
                )
        elif self.target is not None:
            raise _field_error(
                "target", f"only for name 'custom' ({self.name!r} is a built-in reward; remove `target`)", self.target
            )
        return self


def _same_reward_model(a: RewardConfig, b: RewardConfig) -> bool:
    """Whether two reward entries build the same model (label and weight aside)."""
    return (a.name, a.target, a.path, a.kwargs) == (b.name, b.target, b.path, b.kwargs)


def _check_distinct_reward_keys(rewards: list[RewardConfig], where: str) -> list[RewardConfig]:
    """Rewards are keyed by `RewardConfig.key` (label, else a custom target's attribute, else name) in metrics,
    per-reward scores and Pareto ranking, so the keys of one list (`where`: its dotted path) must be distinct; a
    built-in may appear twice with labels. Error paths are relative to the list."""
    first_index: dict[str, int] = {}
    for index, reward in enumerate(rewards):
        key = reward.key
        if key in first_index:
            first = rewards[first_index[key]]
            if reward.label is None and first.label is None and reward.name == first.name != CUSTOM_REWARD:
                raise _field_error(
                    f"{index}.name",
                    f"duplicate reward (already {where}.{first_index[key]}.name); give each a "
                    "distinct `label` to use a reward twice",
                    reward.name,
                )
            raise _field_error(
                f"{index}.label",
                f"duplicate reward key {key!r} (already the key of {where}.{first_index[key]}); "
                "give each reward a distinct `label`",
                key,
            )
        first_index[key] = index
    return rewards


class ResourcesConfig(_FrozenModel):
    """How many Ray actors of each role to start and what each one reserves."""

    num_samplers: int = Field(1, ge=1, description="Number of SamplerWorker actors (rollouts run in parallel).")
    sampler_gpus: float = Field(
        0.0, ge=0, description="GPUs reserved per sampler (a fraction shares a GPU); 0 = CPU only."
    )
    num_reward_servers: int = Field(1, ge=1, description="Number of RewardServer actors hosting the reward models.")
    reward_server_gpus: float = Field(
        0.0, ge=0, description="GPUs reserved per reward server (a fraction shares a GPU); 0 = CPU only."
    )
    learner_gpus: float = Field(0.0, ge=0, description="GPUs reserved by each learner rank; 0 = CPU only.")
    num_learners: int = Field(
        1,
        ge=1,
        description="Learner ranks (data-parallel, torch DistributedDataParallel: NCCL on GPUs, gloo on "
        "CPU). Each rank reserves learner_gpus and cpus_per_actor, computes its contiguous share of every "
        "minibatch (random draws are made for the whole minibatch, so any rank count computes the same "
        "gradient) and all ranks step identically; rank 0 publishes and checkpoints. >1 needs Ray (not --no-ray).",
    )
    cpus_per_actor: float = Field(
        1.0,
        gt=0,
        description="CPU cores reserved by each actor (Ray num_cpus); also its torch thread count (at least 1).",
    )
    max_actor_restarts: int = Field(
        3,
        ge=0,
        description="How often Ray restarts a dead sampler or reward server (its work is redone); the "
        "learner is never restarted (the run ends with a resumable checkpoint).",
    )
    reward_batch_window_ms: float = Field(
        2.0,
        ge=0,
        description="How long a reward server's idle queue waits for more requests before a batch; "
        "requests arriving while a batch runs always join the next one.",
    )
    reward_max_batch_images: int = Field(256, ge=1, description="Most images in one batched reward-model call.")
    actor_start_timeout_s: float = Field(
        600.0,
        gt=0,
        description="How long the driver waits for every actor to load its models before failing "
        "(a cluster without the reserved CPUs/GPUs never starts them).",
    )


class TrainConfig(_FrozenModel):
    """Optimizer and the learner's loop over each rollout batch."""

    iterations: int = Field(
        100,
        ge=1,
        description="Training iterations (one iteration = one rollout round + training on it). Not a paper value "
        "(D3PO trains 400 epochs [C]).",
    )
    learning_rate: float = Field(
        3e-5,
        gt=0,
        description="AdamW learning rate (constant). Default 3e-5 from the D3PO paper appendix per D3PO issue #4 [I].",
    )
    lr_schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant",
        description="How the learning rate changes over the run (ours; a pure function of the iteration, so a "
        "resumed run follows the same schedule): 'constant' (the papers' [C]); 'linear' or 'cosine': from "
        "learning_rate at the first iteration after the warm-up down to learning_rate × lr_final_ratio at the last "
        "(train.iterations), as diffusers' get_scheduler but counted in iterations. Every optimizer step of an "
        "iteration uses that iteration's rate. Logged as train/learning_rate.",
    )
    lr_warmup_iterations: int = Field(
        0,
        ge=0,
        description="Iterations of linear warm-up (iteration i ≤ W trains at learning_rate × i / W) before the "
        "schedule. 0 = none.",
    )
    lr_final_ratio: float = Field(
        0.0,
        ge=0,
        le=1,
        description="The learning rate at the last iteration, as a fraction of learning_rate ('linear' and "
        "'cosine' only).",
    )
    ema_decay: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="An exponential moving average of the trained weights (0 = off, the default): updated after "
        "every ema_every-th optimizer step with decay min((1 + n)/(10 + n), ema_decay) at the learner's n-th step, "
        "as flow_grpo's EMAModuleWrapper [C] (flow_grpo's SD3.5 configs: 0.9 every 8 steps [C]). The held-out "
        "evaluations (before / after, guards, grids) and every export (checkpoints' lora/ or unet/, the run's) use "
        "the average; the rollouts sample the current weights, as flow_grpo's do. Checkpointed, so a resume "
        "continues it.",
    )
    ema_every: int = Field(
        8, ge=1, description="Optimizer steps between updates of the moving average (ema_decay > 0). flow_grpo: 8 [C]."
    )
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW β1. Default 0.9 from D3PO config/base.py [C].")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW β2. Default 0.999 from D3PO config/base.py [C].")
    weight_decay: float = Field(
        1e-4, ge=0, description="AdamW decoupled weight decay. Default 1e-4 from D3PO config/base.py [C]."
    )
    adam_eps: float = Field(1e-8, gt=0, description="AdamW ε. Default 1e-8 from D3PO config/base.py [C].")
    grad_clip: float = Field(
        1.0, gt=0, description="Max global gradient L2 norm. Default 1.0 from D3PO config/base.py [C]."
    )
    train_batch_size: int = Field(
        8,
        ge=1,
        description="Training examples per optimizer step. An example is one (pair, denoising step) for D3PO / "
        "TailorPO(-G) and one (pair, t) for DDE / Diffusion-DPO. Not a paper value (D3PO: 1 pair × K steps [C]).",
    )
    num_inner_epochs: int = Field(1, ge=1, description="Passes over each rollout batch before sampling again.")
    max_staleness: int = Field(
        0,
        ge=0,
        description="Most weights versions a rollout may lag the learner. 0 = strictly on-policy (sample, then "
        "train); >= 1 overlaps the next rollouts with training. Staler rollouts are dropped.",
    )
    mixed_precision: Literal["no", "bf16", "fp16"] = Field(
        "no",
        description="Autocast dtype of the learner's loss forward passes (policy and reference UNet calls) under "
        "torch.autocast; the LoRA parameters, gradients and optimizer state stay float32. 'no' = fp32 "
        "(portable to CPU). 'bf16' works on CUDA and CPU. 'fp16' is CUDA only (with a dynamic GradScaler: the "
        "loss is scaled, gradients are unscaled before clipping, steps with inf/NaN gradients are skipped); "
        "device 'cpu' with 'fp16' is an error. D3PO/SPO use fp16 [C]. An unquoted YAML `no` (read by YAML 1.1 "
        "as false) means 'no'. Samplers are not affected (they run in `model.dtype`).",
    )
    gradient_checkpointing: bool = Field(
        False,
        description="Recompute the learner UNet's block activations in the backward pass instead of storing them "
        "(diffusers enable_gradient_checkpointing): less GPU memory for a larger train_batch_size, about 30% "
        "more learner compute. Same gradients. Learner only (samplers do not backpropagate through the UNet "
        "for training).",
    )

    signal_every: int = Field(
        1,
        ge=0,
        description="Measure the learning signal every this many iterations, at the start of the round (ours; "
        "rlhf_diffusion/algorithms/signal.py): the split-half gradient coherence signal/coherence (cosine of the "
        "loss gradients of two random halves of the round's prompts, each with all its examples: ≈ 0 = noise, "
        "clearly > 0 = a direction the prompts agree on), the per-prompt SNR² estimate signal/snr2, and each DDIM "
        "step's (D3PO / TailorPO(-G)) or t bucket's (DDE / Diffusion-DPO) share of the squared gradient norm and "
        "own coherence (signal/share_<group>, signal/coherence_<group>). Costs one extra forward and backward pass "
        "over signal_examples examples; never changes the weights or the training draws. 0 = off.",
    )
    signal_examples: int = Field(
        64,
        ge=2,
        description="Examples (a random subset of the round's) the learning-signal diagnostics use.",
    )

    @field_validator("mixed_precision", mode="before")
    @classmethod
    def _read_yaml_no(cls, value: Any) -> Any:
        return "no" if value is False else value

    @model_validator(mode="after")
    def _warmup_within_run(self) -> TrainConfig:
        if self.lr_warmup_iterations > self.iterations:
            raise ValueError(
                f"lr_warmup_iterations ({self.lr_warmup_iterations}) is more than iterations ({self.iterations})"
            )
        return self


class PromptSource(_FrozenModel):
    """Where prompts come from: exactly one of a builtin list, a text file, or an inline list."""

    builtin: (
        Literal[
            "simple_animals",
            "partiprompts",
            "partiprompts:abstract",
            "partiprompts:animals",
            "partiprompts:artifacts",
            "partiprompts:arts",
            "partiprompts:food_beverage",
            "partiprompts:illustrations",
            "partiprompts:indoor_scenes",
            "partiprompts:outdoor_scenes",
            "partiprompts:people",
            "partiprompts:produce_plants",
            "partiprompts:vehicles",
            "partiprompts:world_knowledge",
            "testbed_train",
            "testbed_heldout",
        ]
        | None
    ) = Field(
        None,
        description="A builtin prompt list: 'simple_animals' = DDPO's 45 animal names [C], used by D3PO [C] "
        "and TailorPO [R]; 'testbed_train' / 'testbed_heldout' = the 332 / 82 captions of the testbed world's "
        "fixed split (rlhf_diffusion/testbed, for `model.pretrained: testbed:pipeline`); 'partiprompts' = all 1,632 "
        "PartiPrompts (google-research/parti, Apache-2.0); "
        "'partiprompts:<category>' = the PartiPrompts of one category (lower-case, '_' for other characters: "
        "animals, food_beverage, world_knowledge, ...; see rlhf_diffusion/prompts.py).",
    )
    file: str | None = Field(
        None, description="A UTF-8 text file with one prompt per line (relative to the working directory)."
    )
    inline: list[str] | None = Field(None, min_length=1, description="Prompts listed in the config.")

    @field_validator("file")
    @classmethod
    def _check_file(cls, value: str | None) -> str | None:
        if value is not None and not Path(value).expanduser().is_file():
            raise ValueError(f"no such prompt file: {value}")
        return value

    @field_validator("inline")
    @classmethod
    def _check_inline(cls, value: list[str] | None) -> list[str] | None:
        if value is not None:
            for index, prompt in enumerate(value):
                if not prompt.strip():
                    raise ValueError(f"prompt {index} is empty")
        return value

    @model_validator(mode="after")
    def _check_exactly_one(self) -> PromptSource:
        chosen = [name for name in ("builtin", "file", "inline") if getattr(self, name) is not None]
        if len(chosen) != 1:
            got = ", ".join(chosen) if chosen else "none"
            raise PydanticCustomError(
                "prompt_source", "set exactly one of builtin, file, inline (got {got})", {"got": got}
            )
        return self


class PromptsConfig(_FrozenModel):
    """Training and evaluation prompts."""

    train: PromptSource = Field(
        default_factory=lambda: PromptSource(builtin="simple_animals"),
        description="Prompts sampled for rollouts. Default builtin simple_animals (D3PO [C], TailorPO [R]).",
    )
    eval: PromptSource | None = Field(None, description="Held-out evaluation prompts; None = the training prompts.")
    eval_seeds: int = Field(2, ge=1, description="Fixed seeds (images) per evaluation prompt.")


class TrackingConfig(_FrozenModel):
    """MLflow tracking."""

    enabled: bool = Field(True, description="Log params, metrics, image grids and the LoRA to MLflow.")
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI (a server such as http://host:5000, or a store URI); None = "
        "sqlite:///<output_dir>/mlflow.db, shared by every run under output_dir so they can be compared.",
    )
    experiment: str = Field("rlhf_diffusion", min_length=1, description="MLflow experiment name.")
    log_every: int = Field(1, ge=1, description="Log metrics every this many iterations.")
    image_grid_every: int = Field(10, ge=0, description="Log an image grid every this many iterations; 0 = never.")


class CheckpointConfig(_FrozenModel):
    """Run-state checkpoints (LoRA, optimizer, step, RNG, algorithm state) under the run directory."""

    every: int = Field(10, ge=0, description="Checkpoint every this many iterations; 0 = only at the end.")
    keep_last: int = Field(2, ge=1, description="Number of most recent checkpoints kept on disk.")


class EarlyStopConfig(_FrozenModel):
    """Stop the run when a held-out reward has fallen too far below its value before training."""

    reward: str = Field(
        min_length=1,
        description="Key of the held-out reward to watch: the key of a `guards.heldout_rewards` entry (its `label`, "
        "else a custom target's attribute name, else its `name`).",
    )
    drop_fraction: float = Field(
        ge=0,
        description="Stop when the relative drop d = (before − now) / max(|before|, min_scale) exceeds this at "
        "`patience` consecutive evaluation passes. `before` = the reward's mean over the evaluation images before "
        "training (iteration 0), `now` = at a pass during training. Rewards are larger-is-better, so d > 0 means "
        "the reward fell, whatever the sign of `before` (ImageReward and the JPEG rewards can be negative): "
        "before = −2, now = −3 is a drop of 0.5. E.g. 0.1 = stop once the reward is 10% of |before| below where it "
        "started; 0 = stop on any fall.",
    )
    patience: int = Field(
        1,
        ge=1,
        description="How many consecutive evaluation passes must exceed drop_fraction before the run stops (1 = the "
        "first one); a pass within the limit resets the count. Passes run every `guards.every` and "
        "`tracking.image_grid_every` iterations.",
    )
    min_scale: float = Field(
        1e-8,
        gt=0,
        description="Floor of the denominator max(|before|, min_scale), so that a reward starting near 0 (ImageReward "
        "is standardised to mean 0) does not turn a tiny change into a huge relative drop. Set to the reward's "
        "typical spread (e.g. 1.0 for ImageReward) to make drop_fraction an absolute drop in reward units whenever "
        "|before| < min_scale.",
    )


class GuardsConfig(_FrozenModel):
    """Reward-hacking guards (docs/rewards.md §7): rewards the policy is not trained on, scored
    on the fixed evaluation images beside the training reward; the per-step KL of the policy to the reference; an
    optional early stop when a held-out reward falls. Default: no held-out rewards and no early stop; the KL
    metrics are on (they reuse the learner's forward passes: no extra UNet calls)."""

    heldout_rewards: list[RewardConfig] = Field(
        default_factory=list,
        description="Rewards NOT used for training (same schema as `rewards`, custom ones included), scored only on "
        "the evaluation images and logged one by one as heldout/<key> (mean raw score) beside eval/<key> (the "
        "training rewards on the same images). They are hosted on the reward servers next to the training rewards "
        "but never enter the training reward, the preference labels or TailorPO-G's gradient. Keys must be "
        "distinct and differ from the training rewards' keys, and none may be the same model as a training reward "
        "(same name, path, kwargs and target). `weight` has no effect here (nothing is summed), so only the "
        "default 1.0 is accepted.",
    )
    every: int = Field(
        0,
        ge=0,
        description="Run an evaluation pass (the eval prompts × prompts.eval_seeds fixed seeds, scored by the "
        "training and the held-out rewards from the same images) every this many iterations, besides the passes "
        "before training, every tracking.image_grid_every iterations (which also write an image grid) and at the "
        "end. 0 = only those passes. The early stop is checked at every pass during training.",
    )
    early_stop: EarlyStopConfig | None = Field(
        None,
        description="Stop the run cleanly (final checkpoint, export, final evaluation; the reason in eval.json and "
        "the MLflow tag `early_stop`) when a held-out reward falls by more than a set fraction of its value before "
        "training; None = never stop early.",
    )
    log_kl: bool = Field(
        True,
        description="Log the policy's divergence from the reference from the learner's own forward passes, averaged "
        "over each iteration's training examples. D3PO / TailorPO(-G): kl/step_<k> = KL(π_θ ‖ π_ref) of the DDIM "
        "step k (closed form for Gaussians that share σ: mean over latent elements of (μ_θ − μ_ref)²/(2σ²), nats "
        "per element) and kl/log_ratio_step_<k> = mean log π_θ/π_ref of the stored actions. DDE / DDE-Single / "
        "Diffusion-DPO (random t): kl/eps_sq_diff_t_<lo> = mean (ε_θ − ε_ref)² and kl/ddpm_step_t_<lo> = λ_t × "
        "that (the KL of the DDPM reverse step at t), per timestep bucket [lo, lo + 100). Each also as <name>_mean.",
    )

    @field_validator("heldout_rewards")
    @classmethod
    def _check_heldout_rewards(cls, rewards: list[RewardConfig]) -> list[RewardConfig]:
        for index, reward in enumerate(rewards):
            if reward.weight != 1.0:
                raise _field_error(
                    f"{index}.weight",
                    "has no effect on a held-out reward (each is logged on its own, never summed); remove it",
                    reward.weight,
                )
        return _check_distinct_reward_keys(rewards, "guards.heldout_rewards")

    @model_validator(mode="after")
    def _check_early_stop_reward(self) -> GuardsConfig:
        if self.early_stop is not None:
            keys = [reward.key for reward in self.heldout_rewards]
            if self.early_stop.reward not in keys:
                valid = ", ".join(map(repr, keys)) if keys else "none: guards.heldout_rewards is empty"
                raise _field_error(
                    "early_stop.reward",
                    f"is not the key of a held-out reward (valid: {valid})",
                    self.early_stop.reward,
                )
        return self


# ----------------------------------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------------------------------


OFFLINE_DATA_ALGORITHMS = ("dde", "dde_single", "diffusion_dpo")


class DataConfig(_FrozenModel):
    """Offline preference pairs for the final-image methods (DDE, DDE-Single, Diffusion-DPO), streamed from disk
    by the samplers (each reads its own shard), VAE-encoded, and optionally mixed with online pairs."""

    format: Literal["pickapic_parquet", "jsonl"] = Field(
        description="'pickapic_parquet' = Pick-a-Pic v2 Parquet (columns caption, jpg_0, jpg_1, label_0; ties "
        "label_0 = 0.5 are dropped and winners put first, as Diffusion-DPO [C]); 'jsonl' = one {\"prompt\", "
        '"image_w", "image_l"} object per line (paths relative to the file; "tie": true drops the pair).',
    )
    path: str = Field(
        min_length=1,
        description="A Parquet file, a directory of *.parquet shards, a glob, or a JSONL file. It must be readable "
        "on every sampler node.",
    )
    pairs_per_iteration: int = Field(
        8,
        ge=1,
        description="Offline pairs each sampler contributes per iteration (iteration i, counted from 0, "
        "takes pairs i·n … (i+1)·n−1 of the sampler's shard, so a redone shard or a resumed run reads the same pairs).",
    )
    online: bool = Field(
        False,
        description="Also sample online pairs for the iteration's prompts (two images per prompt from the "
        "current policy, ranked by the rewards) and train on both. False = offline only (no images are sampled "
        "for training; the rewards still score evaluations).",
    )
    shuffle_buffer: int = Field(
        1000,
        ge=0,
        description="Streaming shuffle buffer (records); 0 = file order. Order depends on (seed, pass).",
    )
    read_batch_size: int = Field(64, ge=1, description="Parquet rows decoded per read (memory per reader).")


class RunConfig(_FrozenModel):
    """Everything one run needs. Immutable once loaded."""

    run_name: str = Field(
        "run",
        pattern=_RUN_NAME_PATTERN,
        description="Name of the run; the run directory is output_dir/run_name. Letters, digits, '.', '_', '-'.",
    )
    seed: int = Field(0, ge=0, description="Global random seed (samplers derive per-actor seeds from it).")
    output_dir: str = Field("runs", min_length=1, description="Parent directory of run directories.")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto", description="Device of every actor: 'auto' = cuda when the actor has a GPU, else cpu."
    )
    model: ModelConfig = Field(description="The base pipeline and its LoRA.")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="The DDIM sampler.")
    algorithm: AlgorithmConfig = Field(
        description="The preference-RL method, selected by `name`: " + ", ".join(ALGORITHM_NAMES) + "."
    )
    rewards: list[RewardConfig] = Field(
        min_length=1, description="Reward models that decide winners (at least one; names must be distinct)."
    )
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig, description="Ray actors and resources.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Optimizer and learner loop.")
    prompts: PromptsConfig = Field(default_factory=PromptsConfig, description="Training and evaluation prompts.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow tracking.")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="Checkpointing.")
    data: DataConfig | None = Field(
        None, description="Offline preference pairs (DDE / Diffusion-DPO); None = online pairs only."
    )
    guards: GuardsConfig = Field(
        default_factory=GuardsConfig,
        description="Reward-hacking guards: held-out rewards, per-step KL to the reference, early stop.",
    )

    @property
    def run_dir(self) -> Path:
        """The run's directory: `output_dir / run_name`."""
        return Path(self.output_dir) / self.run_name

    @field_validator("run_name")
    @classmethod
    def _run_name_is_a_directory_name(cls, value: str) -> str:
        if set(value) == {"."}:  # '.' and '..' pass the pattern but name output_dir itself or its parent
            raise ValueError("must not be only dots: the run directory is output_dir/run_name")
        return value

    @field_validator("rewards")
    @classmethod
    def _check_distinct_rewards(cls, rewards: list[RewardConfig]) -> list[RewardConfig]:
        return _check_distinct_reward_keys(rewards, "rewards")

    @model_validator(mode="after")
    def _check_heldout_rewards_are_not_trained_on(self) -> RunConfig:
        trained = {reward.key: index for index, reward in enumerate(self.rewards)}
        for index, heldout in enumerate(self.guards.heldout_rewards):
            where = f"guards.heldout_rewards.{index}"
            for train_index, reward in enumerate(self.rewards):
                if _same_reward_model(heldout, reward):
                    raise _field_error(
                        where,
                        f"is the same reward model as rewards.{train_index} (same name, path, kwargs and "
                        "target): a reward the policy is trained on is not held out",
                        heldout.key,
                    )
            if heldout.key in trained:
                field = "label" if heldout.label is not None else "target" if heldout.name == CUSTOM_REWARD else "name"
                raise _field_error(
                    f"{where}.{field}",
                    f"key {heldout.key!r} is also the key of rewards.{trained[heldout.key]}; a "
                    "held-out reward needs its own key (give it a distinct `label`)",
                    heldout.key,
                )
        return self

    @model_validator(mode="after")
    def _check_data_fits_algorithm(self) -> RunConfig:
        if self.data is not None and self.algorithm.name not in OFFLINE_DATA_ALGORITHMS:
            raise _field_error(
                "data",
                f"offline preference pairs train only {', '.join(OFFLINE_DATA_ALGORITHMS)} (final-image "
                f"pairs); {self.algorithm.name} needs trajectories from its own rollouts",
                self.data.format,
            )
        return self

    @model_validator(mode="after")
    def _check_skipped_steps_leave_some(self) -> RunConfig:
        skip = getattr(self.algorithm, "skip_final_steps", 0)
        if skip >= self.sampling.num_steps:
            raise _field_error(
                "algorithm.skip_final_steps",
                f"must be below sampling.num_steps ({self.sampling.num_steps}): no step would be left to train",
                skip,
            )
        return self

    @model_validator(mode="after")
    def _check_mixed_precision_fits_device(self) -> RunConfig:
        if self.device == "cpu" and self.train.mixed_precision == "fp16":
            raise _field_error(
                "train.mixed_precision", "'fp16' needs CUDA (device is 'cpu'); use 'bf16' or 'no' on CPU", "fp16"
            )
        return self

    @model_validator(mode="after")
    def _check_rewards_fit_algorithm(self) -> RunConfig:
        # Built-in rewards only: a custom reward's differentiability is known once it is built (its module is not
        # imported while validating a config), so a non-differentiable custom reward is refused when the run starts.
        needs_gradient = {
            "tailorpo_g": "TailorPO-G needs a reward gradient (use tailorpo, or a differentiable reward)",
            "draft": "DRaFT needs a reward gradient (use a preference method, or a differentiable reward)",
        }
        if self.algorithm.name in needs_gradient:
            for index, reward in enumerate(self.rewards):
                if reward.name in NON_DIFFERENTIABLE_REWARDS:
                    raise _field_error(
                        f"rewards.{index}.name",
                        f"is not differentiable; {needs_gradient[self.algorithm.name]}",
                        reward.name,
                    )
        return self


# ----------------------------------------------------------------------------------------------------------------
# Loading, overrides, error messages
# ----------------------------------------------------------------------------------------------------------------


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """Loads a run config from a YAML file and applies `--set` overrides.

    Args:
        path: The YAML file.
        overrides: `key.path=value` strings (see `apply_overrides`), applied in order after loading.

    Returns:
        The validated, frozen `RunConfig`.

    Raises:
        ConfigError: The file is missing or unreadable, is not valid YAML, is not a mapping, an override is
            malformed, or the config fails validation. The message names the file and every bad field.
    """
    source = str(path)
    file = Path(path)
    if not file.is_file():
        raise ConfigError(f"{source}: no such config file")
    try:
        text = file.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"{source}: cannot read config file: {error}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise ConfigError(f"{source}: {_describe_yaml_error(error)}") from None
    except RecursionError:  # PyYAML's composer recurses once per nesting level
        raise ConfigError(f"{source}: {_TOO_DEEP}") from None
    try:
        return parse_config(data, source=source, overrides=overrides)
    except RecursionError:
        raise ConfigError(f"{source}: {_TOO_DEEP}") from None


def parse_config(data: dict, source: str = "<dict>", overrides: Sequence[str] = ()) -> RunConfig:
    """Validates an already-parsed config mapping (e.g. from YAML) after applying `--set` overrides.

    Args:
        data: The config as nested dicts and lists; not modified.
        source: Where the data came from, for error messages (usually the file path).
        overrides: `key.path=value` strings (see `apply_overrides`).

    Returns:
        The validated, frozen `RunConfig`.

    Raises:
        ConfigError: `data` is not a mapping, an override is malformed, or validation fails.
    """
    if data is None:
        raise ConfigError(f"{source}: the config is empty; expected a mapping with at least model, algorithm, rewards")
    if not isinstance(data, dict):
        raise ConfigError(
            f"{source}: the top level must be a mapping of sections (model, algorithm, rewards, ...), "
            f"got {type(data).__name__} {_show(data)}"
        )
    try:
        data = apply_overrides(data, overrides)
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from None
    try:
        return RunConfig.model_validate(data)
    except ValidationError as error:
        items = error.errors()
        problems = [_cut(_describe_pydantic_error(item)) for item in items[:MAX_LISTED_PROBLEMS]]
        if len(items) > MAX_LISTED_PROBLEMS:
            problems.append(f"  ... and {len(items) - MAX_LISTED_PROBLEMS} more")
        noun = "problem" if len(items) == 1 else "problems"
        raise ConfigError(f"{source}: invalid config ({len(items)} {noun}):\n" + "\n".join(problems)) from None


# A config with thousands of bad keys (or one enormous key) still gets a message a terminal can show: the first
# problems, each line cut, and how many more there are.
MAX_LISTED_PROBLEMS = 20
MAX_PROBLEM_CHARS = 1000


def _cut(line: str) -> str:
    return line if len(line) <= MAX_PROBLEM_CHARS else line[:MAX_PROBLEM_CHARS] + f"... ({len(line)} characters)"


def apply_overrides(data: dict, overrides: Sequence[str]) -> dict:
    """Applies `key.path=value` overrides to a config mapping.

    A key is a dotted path; an integer part indexes a list (`rewards.0.weight`, also written `rewards[0].weight`).
    Missing intermediate mappings are created (and a null one replaced), so `prompts.eval.inline=[a cat]` works
    when `prompts.eval` is unset; whether the final key exists is left to validation, which names it. The value
    is parsed with `yaml.safe_load` (`[a, b]` is a list, `{name: dde}` a mapping), and a string that is a plain
    number in any notation becomes a float (YAML 1.1 reads `1e-4` as a string).

    Args:
        data: The config mapping; not modified.
        overrides: The override strings, applied in order.

    Returns:
        A new mapping with the overrides applied.

    Raises:
        ConfigError: An override has no `=`, an empty key or key part, a value that is not valid YAML, a list
            index that is not a valid index, or a path that indexes into a scalar. The message names the override.
    """
    result = copy.deepcopy(data)
    for override in overrides:
        key, sep, raw_value = override.partition("=")
        key = key.strip()
        if not sep:
            raise ConfigError(f"bad override {override!r}: expected key.path=value")
        if not key:
            raise ConfigError(f"bad override {override!r}: empty key")
        parts = _split_key(key, override)
        value = _parse_override_value(raw_value, override)
        container: Any = result
        for depth, part in enumerate(parts):
            here = ".".join(str(p) for p in parts[:depth]) or "<top level>"
            last = depth == len(parts) - 1
            if isinstance(container, list):
                index = _list_index(part, container, here, override)
                if last:
                    container[index] = value
                else:
                    container[index] = _child_container(container[index], parts, depth, override)
                    container = container[index]
            elif isinstance(container, dict):
                name = str(part)
                if last:
                    container[name] = value
                else:
                    existing = container[name] if name in container else None
                    container[name] = _child_container(existing, parts, depth, override)
                    container = container[name]
            else:
                raise ConfigError(
                    f"bad override {override!r}: {here} is a scalar ({_show(container)}), cannot index into it"
                )
    return result


def _split_key(key: str, override: str) -> list[str | int]:
    """`"rewards[0].weight"` or `"rewards.0.weight"` -> `["rewards", 0, "weight"]`."""
    parts: list[str | int] = []
    for piece in key.split("."):
        match = _INDEXED_PART_RE.match(piece)
        if match:
            name, indices = match.groups()
            if name:
                parts.append(name)
            parts.extend(int(index) for index in re.findall(r"-?\d+", indices))
            continue
        if not piece or "[" in piece or "]" in piece:
            raise ConfigError(f"bad override {override!r}: malformed key part {piece!r}")
        parts.append(int(piece) if re.fullmatch(r"-?\d+", piece) else piece)
    return parts


def _list_index(part: str | int, container: list, here: str, override: str) -> int:
    if not isinstance(part, int):
        raise ConfigError(f"bad override {override!r}: {here} is a list, index it with an integer, not {part!r}")
    if not 0 <= part < len(container):
        raise ConfigError(
            f"bad override {override!r}: list index {part} out of range for {here} (valid: 0..{len(container) - 1})"
            if container
            else f"bad override {override!r}: list index {part} out of range for {here} (it is empty)"
        )
    return part


def _child_container(existing: Any, parts: list[str | int], depth: int, override: str) -> Any:
    """The container to descend into at `parts[depth]`: the existing one, or a new mapping for a missing/null one."""
    if existing is None:
        if isinstance(parts[depth + 1], int):
            here = ".".join(str(p) for p in parts[: depth + 1])
            raise ConfigError(f"bad override {override!r}: {here} is not set, so it cannot be indexed")
        return {}
    if not isinstance(existing, (dict, list)):
        here = ".".join(str(p) for p in parts[: depth + 1])
        raise ConfigError(f"bad override {override!r}: {here} is a scalar ({_show(existing)}), cannot index into it")
    return existing


def _parse_override_value(raw_value: str, override: str) -> Any:
    try:
        value = yaml.safe_load(raw_value)
    except yaml.YAMLError as error:
        raise ConfigError(
            f"bad override {override!r}: value is not valid YAML: {_describe_yaml_error(error)}"
        ) from None
    except RecursionError:
        raise ConfigError(f"bad override {_show(override)}: value is not valid YAML: {_TOO_DEEP}") from None
    if isinstance(value, str) and _NUMBER_RE.match(value.strip()):
        return float(value)
    return value


_TOO_DEEP = "the YAML nests too deeply (lists or mappings inside each other hundreds of levels down); no config does"


def _describe_yaml_error(error: yaml.YAMLError) -> str:
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error)
    if mark is not None:
        return f"YAML syntax error at line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return f"YAML syntax error: {problem}"


def _describe_pydantic_error(error: dict[str, Any]) -> str:
    """One `  <dotted.path>: <problem> (got <value>)` line for a pydantic error."""
    raw_loc = tuple(error["loc"])
    loc = raw_loc
    if len(loc) >= 2 and loc[0] == "algorithm" and loc[1] in _ALGORITHM_BY_NAME:
        loc = loc[:1] + loc[2:]  # pydantic puts the union tag into the location
    path = [str(part) for part in loc]
    kind = error["type"]
    problem = error["msg"]
    shown: str | None = _show(error["input"])

    if kind == "config_field":
        path.extend(error["ctx"]["path"].split("."))
        problem = error["ctx"]["problem"]
        shown = error["ctx"]["value"]
    elif kind == "value_error":
        problem = str(error["ctx"]["error"])
    elif kind == "missing":
        problem = "required field is missing"
        shown = None
    elif kind == "extra_forbidden":
        problem = _describe_unknown_key(raw_loc)
    elif kind == "union_tag_invalid":
        path.append("name")
        problem = f"unknown algorithm {error['ctx']['tag']!r}; valid names: {', '.join(ALGORITHM_NAMES)}"
        shown = None
    elif kind == "union_tag_not_found":
        path.append("name")
        problem = f"required field is missing; valid names: {', '.join(ALGORITHM_NAMES)}"
        shown = None
    elif kind == "prompt_source":
        shown = None  # the message already says which sources were set
    elif kind == "model_attributes_type" and loc == ("algorithm",):
        problem = f"must be a mapping with a `name` (one of {', '.join(ALGORITHM_NAMES)})"
    line = f"  {'.'.join(path) or '<top level>'}: {problem}"
    return f"{line} (got {shown})" if shown is not None else line


def _describe_unknown_key(raw_loc: tuple) -> str:
    section = _model_class_at(raw_loc[:-1])
    if section is None:
        return "unknown key"
    valid = list(section.model_fields)
    problem = "unknown key"
    if section in _ALGORITHM_CLASSES and len(raw_loc) >= 2:
        problem = f"unknown key for algorithm {raw_loc[1]!r}"
    close = difflib.get_close_matches(str(raw_loc[-1]), valid, n=1)
    if close:
        problem += f" (did you mean {close[0]!r}?)"
    return f"{problem}; valid keys: {', '.join(valid)}"


def _model_class_at(raw_loc: tuple) -> type[BaseModel] | None:
    """The config section class at a pydantic location (with the algorithm tag still in it), if any."""
    section: type[BaseModel] = RunConfig
    index = 0
    while index < len(raw_loc):
        part = raw_loc[index]
        if isinstance(part, int):  # a list item keeps the list's item class
            index += 1
            continue
        if part not in section.model_fields:
            return None
        if section is RunConfig and part == "algorithm":
            if index + 1 >= len(raw_loc) or raw_loc[index + 1] not in _ALGORITHM_BY_NAME:
                return None
            section = _ALGORITHM_BY_NAME[raw_loc[index + 1]]
            index += 2
            continue
        found = _model_in(section.model_fields[part].annotation)
        if found is None:
            return None
        section = found
        index += 1
    return section


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The first pydantic model class inside a type annotation (`X | None`, `list[X]`, `Annotated[X, ...]`)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def flatten_config(cfg: RunConfig) -> dict[str, str]:
    """Flattens a config into dotted keys with string values, e.g. for MLflow params.

    Mappings and lists of mappings are expanded (`algorithm.beta`, `rewards.0.weight`); lists of scalars become
    one JSON value (`model.lora.target_modules` -> `["to_q", ...]`). Strings are kept as is, other scalars are
    written as JSON (`0.1`, `true`, `null`). Empty mappings are kept as `{}`.

    Args:
        cfg: The run config.

    Returns:
        A flat mapping from dotted key to string value, in schema order.
    """
    flat: dict[str, str] = {}
    _flatten_into(flat, "", cfg.model_dump(mode="json"))
    return flat


def _flatten_into(flat: dict[str, str], prefix: str, value: Any) -> None:
    if isinstance(value, dict) and value:
        for key, item in value.items():
            _flatten_into(flat, f"{prefix}.{key}" if prefix else str(key), item)
    elif isinstance(value, list) and any(isinstance(item, (dict, list)) for item in value):
        for index, item in enumerate(value):
            _flatten_into(flat, f"{prefix}.{index}", item)
    elif isinstance(value, str):
        flat[prefix] = value
    elif isinstance(value, float) and not math.isfinite(value):
        flat[prefix] = str(value)
    else:
        flat[prefix] = json.dumps(value)


def add_override_option(parser: argparse.ArgumentParser) -> None:
    """The `--set KEY=VALUE` option (repeatable, into `overrides`) of every command that loads a run config."""
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.learning_rate=1e-4 (repeatable)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """CLI: validates a config and prints it, fully resolved, as YAML.

    Args:
        argv: Command-line arguments without the program name; None = `sys.argv[1:]`.

    Returns:
        The exit code: 0 on success, 2 on a config error (message on stderr, no traceback).
    """
    parser = argparse.ArgumentParser(
        prog="python -m rlhf_diffusion.config", description="Validate a run config and print it resolved as YAML."
    )
    parser.add_argument("config", help="the run config YAML file")
    add_override_option(parser)
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    sys.stdout.write(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False, allow_unicode=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

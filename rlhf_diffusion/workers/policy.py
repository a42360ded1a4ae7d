"""Loading the policy every actor holds: the pipeline from `model.pretrained` plus the configured LoRA adapter (or,
for `model.finetune: full`, the bare UNet, with a frozen reference copy in the learner).

Samplers and the learner call `load_policy` with the same config, so their UNets are identical (same base weights,
same LoRA init drawn from a seed derived from `config.seed`) before the learner's first published weights arrive,
and build their sampling grid and predictor with `policy_grid` / `policy_predictor`: a DDIM grid and a
`NoisePredictor` for SD1.5 / SDXL, a flow grid and a `VelocityPredictor` for an SD3 / SD3.5 or FLUX model, which
only the methods with `Algorithm.flow_models` train, the step methods only at a noise level > 0 (`flow_method_problem`).
"""

from __future__ import annotations

import torch

from rlhf_diffusion.algorithms.base import ALGORITHM_REGISTRY
from rlhf_diffusion.config import RunConfig
from rlhf_diffusion.diffusion.flow import FlowGrid
from rlhf_diffusion.diffusion.flow_sampling import VelocityPredictor, flow_grid_for
from rlhf_diffusion.diffusion.sampling import DDIMGrid, NoisePredictor
from rlhf_diffusion.models.loading import (
    FLOW_KINDS,
    DiffusionModel,
    ModelLoadError,
    add_reference_copy,
    attach_lora,
    load_diffusion_model,
    load_preview_decoder,
    set_attention,
    to_channels_last,
)
from rlhf_diffusion.models.sources import TINY_PREFIX, resolve_source
from rlhf_diffusion.seeding import derive_seed

__all__ = [
    "DTYPES",
    "TINY_PREFIX",
    "flow_method_problem",
    "load_policy",
    "policy_grid",
    "policy_predictor",
    "resolve_device",
    "resolve_model_source",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LORA_INIT_STREAM = 4
# The name trainer.py and evaluate.py import; one resolver for every model and reward path (models/sources.py).
resolve_model_source = resolve_source


def resolve_device(name: str) -> torch.device:
    """ "auto" → CUDA when this process sees a GPU (a Ray actor sees one only if it reserved one), else CPU;
    "cuda" without a visible GPU is an error naming `device`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("config device: 'cuda' was requested but no CUDA device is visible")
    return torch.device(name)


def flow_method_problem(config: RunConfig, kind: str) -> str | None:
    """Why `config.algorithm.name` cannot train a model of `kind`, or None. On an SD3 or FLUX (flow-matching) model:
    a method without `Algorithm.flow_models` is refused (every registered method has it now); those that train on the
    sampler's steps (`Algorithm.needs_step_density`: DDPO, GRPO, D3PO, TailorPO(-G)) need the SDE sampler
    (`sampling.flow_noise_level` > 0); a method's settings with no flow counterpart (`Algorithm.flow_problem`:
    TailorPO's `step_ranking: completion`) are refused. One message per refusal, naming the fields;
    `launch.check_inputs` gives it before any work, `load_policy` wherever a model is loaded."""
    name = config.algorithm.name
    if kind not in FLOW_KINDS:
        return None
    method = ALGORITHM_REGISTRY[name]
    family = {"sd3": "SD3", "flux": "FLUX"}[kind]
    if not method.flow_models:
        supported = ", ".join(sorted(n for n, cls in ALGORITHM_REGISTRY.items() if cls.flow_models))
        return (
            f"algorithm.name: {name!r} does not train the {family} (flow-matching) pipeline in model.pretrained "
            f"({config.model.pretrained!r}) yet; on SD3 / SD3.5 and FLUX only these methods train: {supported}"
        )
    if method.needs_step_density and config.sampling.flow_noise_level <= 0:
        return (
            f"sampling.flow_noise_level: must be > 0 for algorithm.name {name!r} on the {family} (flow-matching) "
            f"pipeline in model.pretrained ({config.model.pretrained!r}): it trains on the log-probs of the sampler's "
            "steps, and at noise level 0 (the ODE) a step has no density (Flow-GRPO samples at 0.7)"
        )
    skip = getattr(config.algorithm, "skip_final_steps", 0)
    if method.needs_step_density and config.sampling.flow_sde == "cps" and skip < 1:
        return (
            f"algorithm.skip_final_steps: must be >= 1 for algorithm.name {name!r} with sampling.flow_sde 'cps' on the "
            f"{family} (flow-matching) pipeline in model.pretrained ({config.model.pretrained!r}): CPS's last step "
            "lands on σ = 0 with no noise, so it has no density to train on"
        )
    problem = method.flow_problem(config)
    if problem:
        return f"{problem} on the {family} (flow-matching) pipeline in model.pretrained ({config.model.pretrained!r})"
    return None


def policy_grid(config: RunConfig, model: DiffusionModel, *, evaluation: bool = False) -> DDIMGrid | FlowGrid:
    """The K-step (`sampling.num_steps`) sampling grid of the policy: DDIM at `sampling.eta`, or for an SD3 model
    its scheduler's flow grid at `sampling.flow_noise_level` (at the run's resolution). `evaluation`: the held-out
    evaluation's grid, on `sampling.eval_num_steps` when set; on an SD3 model it is the ODE (noise level 0, the stock
    `StableDiffusion3Pipeline`'s Euler sampler), whatever the rollouts' noise level, as flow_grpo evaluates
    (`noise_level=0` in its eval pass [C]): the held-out images are the ones a user of the LoRA gets, and do not
    depend on `sampling.flow_noise_level` (docs/algorithms.md §10(c)). DDIM models evaluate at `sampling.eta`."""
    steps = config.sampling.num_steps
    if evaluation and config.sampling.eval_num_steps is not None:
        steps = config.sampling.eval_num_steps
    if model.kind in FLOW_KINDS:
        size = config.model.resolution or model.resolution
        noise_level = 0.0 if evaluation else config.sampling.flow_noise_level
        return flow_grid_for(model, steps, noise_level, size, size, kind=config.sampling.flow_sde)
    return DDIMGrid.from_scheduler(model.scheduler, steps, config.sampling.eta)


def policy_predictor(
    model: DiffusionModel, guidance_scale: float, resolution: int, negative_prompt: str | None = None
) -> NoisePredictor:
    """The policy's CFG prediction at `resolution` with `negative_prompt` (`sampling.negative_prompt`) in the CFG
    branch: a `NoisePredictor`, or a flow model's `VelocityPredictor` (the same call shape: prediction at (x, network
    timestep, cond), `reference=True` for the reference)."""
    if model.kind in FLOW_KINDS:
        return VelocityPredictor(model, guidance_scale, resolution, resolution, negative_prompt)
    return NoisePredictor(model, guidance_scale, resolution, resolution, negative_prompt)


def load_policy(config: RunConfig, source: str, device: torch.device, *, for_training: bool = False) -> DiffusionModel:
    """The pipeline at `source` (a directory or hub id, see `models.sources.resolve_source`) with the configured LoRA on
    its UNet; the LoRA's A matrices are drawn from a seed derived from `config.seed` (B = 0, so the policy starts
    equal to the base model). The UNet gets the `model.attention` processor, with `model.channels_last` the
    UNet and VAE (LoRA included) are stored channels_last, and `sampling.preview_decoder` is loaded as
    `model.preview_vae`.

    With `model.finetune: full` no LoRA is attached; `for_training` (the learner) then makes the UNet trainable
    float32 weights and keeps a frozen reference copy in `model.dtype` (samplers need neither)."""
    model = load_diffusion_model(
        source,
        kind=config.model.kind,
        dtype=DTYPES[config.model.dtype],
        device=device,
        revision=config.model.revision,
        max_sequence_length=config.model.max_sequence_length,
    )
    model.flux_guidance = config.model.flux_guidance
    problem = flow_method_problem(config, model.kind)
    if problem:
        raise ModelLoadError(problem)
    set_attention(model.unet, config.model.attention)
    if config.model.finetune == "full":
        if for_training:
            add_reference_copy(model, DTYPES[config.model.dtype])
    else:
        lora = config.model.lora
        rng_state = torch.random.get_rng_state()
        torch.manual_seed(derive_seed(config.seed, LORA_INIT_STREAM))
        try:
            attach_lora(
                model.unet, rank=lora.rank, alpha=lora.alpha, target_modules=list(lora.target_modules), init=lora.init
            )
        finally:
            torch.random.set_rng_state(rng_state)
    if config.sampling.preview_decoder is not None:
        model.preview_vae = load_preview_decoder(config.sampling.preview_decoder, model)
    if config.model.channels_last:
        to_channels_last(model)
    return model

"""Text conditioning of the denoiser (SD1.5; SDXL pooled embeds + micro-conditioning; SD3) and classifier-free
guidance.

Encodings match the stock pipelines' `encode_prompt` exactly (SD1.5: last hidden state of the CLIP text encoder;
SDXL: penultimate hidden states of both encoders concatenated, the pooled projection of the second, and
`add_time_ids = (original_size, crops_coords_top_left, target_size)`; SD3: both CLIP encoders' penultimate hidden
states concatenated and zero-padded to the T5 width, followed on the sequence axis by the T5 tokens (zeros without
T5), and both CLIP pooled projections concatenated; FLUX: the T5 tokens, CLIP-L's pooled output and the
guidance-distillation value), so a LoRA trained on these conditionings behaves the same inside a stock pipeline.

Classifier-free guidance (Ho & Salimans, 2022): ε̂ = ε_θ(x_t, ∅) + w · (ε_θ(x_t, c) − ε_θ(x_t, ∅)).
"""

# Adapted from diffusers 0.42.1: pipelines/stable_diffusion/pipeline_stable_diffusion.py (encode_prompt) and
# pipelines/stable_diffusion_xl/pipeline_stable_diffusion_xl.py (encode_prompt, _get_add_time_ids, the CFG step of
# __call__); the SD3 branch follows pipelines/stable_diffusion_3/pipeline_stable_diffusion_3.py (encode_prompt,
# _get_clip_prompt_embeds, _get_t5_prompt_embeds; the same prompt for all three encoders), the FLUX branch
# pipelines/flux/pipeline_flux.py (encode_prompt, _pack_latents, _unpack_latents, _prepare_latent_image_ids and the
# transformer call of __call__; written anew, not copied). Changes:
# - conditional and unconditional encodings are separate functions returning one `TextConditioning` each;
# - no textual inversion, clip_skip, text-encoder LoRA scaling, num_images_per_prompt or negative prompts;
# - add_time_ids are built per sample (B, 6) instead of once per call;
# - CFG is a function of (unet, x_t, t, cond, uncond, w), differentiable, with batched (B,) timesteps.

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch
from diffusers import FluxTransformer2DModel
from torch import Tensor

from rlhf_diffusion.models.loading import DiffusionModel

__all__ = [
    "FLUX_T5_MAX_LENGTH",
    "SD3_T5_MAX_LENGTH",
    "TextConditioning",
    "encode_negative",
    "encode_prompts",
    "latent_image_ids",
    "pack_latents",
    "predict_cfg",
    "predict_noise",
    "predict_noise_cfg",
    "predict_velocity",
    "unpack_latents",
]

# T5 tokens SD3 appends to the 77 CLIP tokens (`StableDiffusion3Pipeline`'s default `max_sequence_length`).
SD3_T5_MAX_LENGTH = 256
# T5 tokens of a FLUX prompt (`FluxPipeline`'s default `max_sequence_length`, FLUX.1-dev's).
FLUX_T5_MAX_LENGTH = 512
# FluxPipeline calls its transformer at timestep t / 1000 (the transformer multiplies by 1000 again).
_FLUX_TIMESTEP_SCALE = 1000


@dataclass
class TextConditioning:
    """Per-sample text conditioning of the denoiser; row i conditions sample i.

    Attributes:
        prompt_embeds: (B, L, D) token embeddings for cross-attention (L = 77; D = 768 SD1.5, 2048 SDXL) or, for
            SD3, the joint-attention text tokens (L = 77 + 256, D = 4096).
        pooled_prompt_embeds: (B, P) pooled text embedding of SDXL's second encoder (P = 1280) or of SD3's two CLIP
            encoders concatenated (P = 2048); None for SD1.5.
        add_time_ids: (B, 6) SDXL micro-conditioning (orig_h, orig_w, crop_top, crop_left, target_h, target_w);
            None for SD1.5 and SD3.
        guidance: (B, 1) FLUX with a guidance-distillation embedding (FLUX.1-dev): the guidance value its
            transformer embeds (`DiffusionModel.flux_guidance`); None otherwise.
    """

    prompt_embeds: Tensor
    pooled_prompt_embeds: Tensor | None = None
    add_time_ids: Tensor | None = None
    guidance: Tensor | None = None

    def __post_init__(self) -> None:
        if self.prompt_embeds.ndim != 3:
            raise ValueError(f"prompt_embeds must be (B, L, D), got shape {tuple(self.prompt_embeds.shape)}")
        batch = self.prompt_embeds.shape[0]
        if self.add_time_ids is not None and self.pooled_prompt_embeds is None:
            raise ValueError("add_time_ids must be given together with pooled_prompt_embeds (SDXL)")
        for name in ("pooled_prompt_embeds", "add_time_ids", "guidance"):
            value = getattr(self, name)
            if value is not None and (value.ndim != 2 or value.shape[0] != batch):
                raise ValueError(f"{name} must be ({batch}, ·) to match prompt_embeds, got {tuple(value.shape)}")

    @property
    def is_sdxl(self) -> bool:
        """Whether the SDXL extras (pooled embeds and add_time_ids) are present."""
        return self.add_time_ids is not None

    @property
    def _layout(self) -> tuple[bool, ...]:
        """Which fields are set: SD1.5, SDXL and SD3 conditionings differ in it."""
        return tuple(getattr(self, f.name) is not None for f in fields(self))

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def _map(self, fn) -> TextConditioning:
        return TextConditioning(
            **{f.name: (None if getattr(self, f.name) is None else fn(getattr(self, f.name))) for f in fields(self)}
        )

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> TextConditioning:
        """Moves every tensor to `device` and casts every floating tensor to `dtype` (if given)."""

        def move(x: Tensor) -> Tensor:
            return x.to(device=device, dtype=dtype if (dtype is not None and x.is_floating_point()) else None)

        return self._map(move)

    def index(self, idx: Tensor | list[int] | slice) -> TextConditioning:
        """Rows `idx` (integer indices, a (B,) bool mask, or a slice) of every tensor."""
        if isinstance(idx, slice):
            return self._map(lambda x: x[idx])
        idx = torch.as_tensor(idx)
        if idx.dtype != torch.bool:
            idx = idx.long()
        return self._map(lambda x: x[idx.to(x.device)])

    def repeat_interleave(self, n: int) -> TextConditioning:
        """Each row repeated n times in place: rows (a, b) -> (a, a, b, b) for n = 2; B' = n·B."""
        if n < 1:
            raise ValueError(f"repeat_interleave needs n >= 1, got {n}")
        return self._map(lambda x: x.repeat_interleave(n, dim=0))

    @staticmethod
    def cat(items: list[TextConditioning]) -> TextConditioning:
        """Concatenates conditionings along the batch: B' = Σ B_k.

        Raises:
            ValueError: `items` is empty or mixes SD1.5, SDXL and SD3 conditionings.
        """
        if not items:
            raise ValueError("TextConditioning.cat needs at least one item")
        if len({item._layout for item in items}) != 1:
            raise ValueError(
                "TextConditioning.cat cannot mix SD1.5 (embeds only), SDXL (pooled embeds, add_time_ids) and SD3 "
                "(pooled embeds) items"
            )
        return TextConditioning(
            **{
                f.name: (None if getattr(items[0], f.name) is None else torch.cat([getattr(i, f.name) for i in items]))
                for f in fields(TextConditioning)
            }
        )


def _check_prompts(prompts: list[str]) -> None:
    if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"prompts must be a list of strings, got {type(prompts).__name__}: {prompts!r:.80}")
    if not prompts:
        raise ValueError("prompts is empty")


def _tokenize(tokenizer, prompts: list[str], device: torch.device) -> tuple[Tensor, Tensor]:
    """CLIP token ids (B, 77) and attention mask, padded and truncated to the tokenizer's max length."""
    text_inputs = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    return text_inputs.input_ids.to(device), text_inputs.attention_mask.to(device)


def _add_time_ids(model: DiffusionModel, batch_size: int, height: int | None, width: int | None) -> Tensor:
    """SDXL micro-conditioning (B, 6): original_size (h, w), crops_coords_top_left (0, 0), target_size (h, w)."""
    height = height or model.resolution
    width = width or model.resolution
    unet = model.unet
    text_encoder_2 = model.text_encoders[1]
    passed_dim = unet.config.addition_time_embed_dim * 6 + text_encoder_2.config.projection_dim
    expected_dim = unet.add_embedding.linear_1.in_features
    if passed_dim != expected_dim:
        raise ValueError(
            f"UNet add_embedding expects {expected_dim} inputs, but addition_time_embed_dim "
            f"{unet.config.addition_time_embed_dim} x 6 + text_encoder_2 projection_dim "
            f"{text_encoder_2.config.projection_dim} = {passed_dim}"
        )
    row = torch.tensor([[height, width, 0, 0, height, width]], dtype=text_encoder_2.dtype, device=model.device)
    return row.repeat(batch_size, 1)


@torch.no_grad()
def encode_prompts(
    model: DiffusionModel, prompts: list[str], *, height: int | None = None, width: int | None = None
) -> TextConditioning:
    """Encodes prompts exactly as the stock pipeline's `encode_prompt` (no clip_skip, no LoRA on the encoders).

    Args:
        model: loaded SD1.5 / SDXL / SD3 components.
        prompts: B prompts (SD3: the same prompt goes to all three encoders, as the pipeline does by default).
        height, width: SDXL image size in pixels for `add_time_ids`; default the model's native resolution.

    Returns:
        B conditionings on the model's device: SD1.5 `prompt_embeds` (B, 77, D); SDXL additionally
        `pooled_prompt_embeds` (B, P) and `add_time_ids` (B, 6); SD3 `prompt_embeds` (B, 77 + 256, D_T5) and
        `pooled_prompt_embeds` (B, P_1 + P_2).
    """
    _check_prompts(prompts)
    device = model.device
    if model.kind == "sd3":
        return _encode_sd3(model, prompts)
    if model.kind == "flux":
        return _encode_flux(model, prompts)
    if model.kind == "sd15":
        (text_encoder,) = model.text_encoders
        input_ids, attention_mask = _tokenize(model.tokenizers[0], prompts, device)
        use_mask = getattr(text_encoder.config, "use_attention_mask", False)
        prompt_embeds = text_encoder(input_ids, attention_mask=attention_mask if use_mask else None)[0]
        return TextConditioning(prompt_embeds=prompt_embeds.to(dtype=text_encoder.dtype))

    # SDXL: penultimate hidden state of each encoder, concatenated along features; pooled = text_encoder_2's
    # projected EOT embedding (its output[0] is 2-D).
    per_encoder = []
    pooled_prompt_embeds = None
    for tokenizer, text_encoder in zip(model.tokenizers, model.text_encoders):
        input_ids, _ = _tokenize(tokenizer, prompts, device)
        output = text_encoder(input_ids, output_hidden_states=True)
        if output[0].ndim == 2:
            pooled_prompt_embeds = output[0]  # (B, P)
        per_encoder.append(output.hidden_states[-2])  # (B, L, D_k)
    if pooled_prompt_embeds is None:
        raise ValueError(f"SDXL text_encoder_2 of {model.source!r} returned no pooled projection (text_embeds)")
    dtype = model.text_encoders[1].dtype
    prompt_embeds = torch.cat(per_encoder, dim=-1).to(dtype=dtype)  # (B, L, D_1 + D_2)
    return TextConditioning(
        prompt_embeds=prompt_embeds,
        pooled_prompt_embeds=pooled_prompt_embeds.to(dtype=dtype),
        add_time_ids=_add_time_ids(model, len(prompts), height, width),
    )


def _encode_sd3(model: DiffusionModel, prompts: list[str]) -> TextConditioning:
    """SD3: CLIP-L ‖ CLIP-G penultimate hidden states (B, 77, D_1 + D_2), zero-padded on the feature axis to the
    transformer's joint width, then the T5 tokens (B, 256, joint width; zeros without T5; 256 =
    `model.max_sequence_length` when set) on the sequence axis;
    pooled = CLIP-L ‖ CLIP-G projected EOT embeddings."""
    device = model.device
    clip_encoders, clip_tokenizers = model.text_encoders[:2], model.tokenizers[:2]
    dtype = clip_encoders[0].dtype  # the pipeline casts both CLIP streams (and T5's zeros) to text_encoder's dtype
    hidden, pooled = [], []
    for tokenizer, text_encoder in zip(clip_tokenizers, clip_encoders):
        input_ids, _ = _tokenize(tokenizer, prompts, device)
        output = text_encoder(input_ids, output_hidden_states=True)
        pooled.append(output[0])  # (B, P_k): CLIPTextModelWithProjection's text_embeds
        hidden.append(output.hidden_states[-2].to(dtype=dtype))  # (B, 77, D_k)
    clip_embeds = torch.cat(hidden, dim=-1)
    joint_dim = model.unet.config.joint_attention_dim
    t5_length = SD3_T5_MAX_LENGTH if model.max_sequence_length is None else model.max_sequence_length
    if len(model.text_encoders) > 2:
        t5_tokenizer, t5 = model.tokenizers[2], model.text_encoders[2]
        t5_ids = t5_tokenizer(
            prompts,
            padding="max_length",
            max_length=t5_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        t5_embeds = t5(t5_ids.to(device))[0].to(dtype=t5.dtype)
    else:
        t5_embeds = torch.zeros(len(prompts), t5_length, joint_dim, dtype=dtype, device=device)
    if clip_embeds.shape[-1] > t5_embeds.shape[-1]:
        raise ValueError(
            f"SD3 CLIP features ({clip_embeds.shape[-1]}) are wider than the T5 / joint width ({t5_embeds.shape[-1]})"
        )
    clip_embeds = torch.nn.functional.pad(clip_embeds, (0, t5_embeds.shape[-1] - clip_embeds.shape[-1]))
    return TextConditioning(
        prompt_embeds=torch.cat([clip_embeds, t5_embeds], dim=-2),
        pooled_prompt_embeds=torch.cat(pooled, dim=-1),
    )


def _encode_flux(model: DiffusionModel, prompts: list[str]) -> TextConditioning:
    """FLUX: the T5 tokens (B, 512, D_T5) as the text stream, CLIP-L's pooled output (B, P) (`pooler_output`, not a
    projection), and, for a guidance-distilled transformer, the guidance value (B, 1)."""
    device = model.device
    clip_tokenizer, t5_tokenizer = model.tokenizers
    clip, t5 = model.text_encoders
    input_ids, _ = _tokenize(clip_tokenizer, prompts, device)
    pooled = clip(input_ids, output_hidden_states=False).pooler_output.to(dtype=clip.dtype)
    t5_length = FLUX_T5_MAX_LENGTH if model.max_sequence_length is None else model.max_sequence_length
    t5_ids = t5_tokenizer(
        prompts, padding="max_length", max_length=t5_length, truncation=True, return_tensors="pt"
    ).input_ids
    prompt_embeds = t5(t5_ids.to(device), output_hidden_states=False)[0].to(dtype=t5.dtype)
    guidance = None
    if model.unet.config.guidance_embeds:
        guidance = torch.full((len(prompts), 1), float(model.flux_guidance), dtype=torch.float32, device=device)
    return TextConditioning(prompt_embeds=prompt_embeds, pooled_prompt_embeds=pooled, guidance=guidance)


@torch.no_grad()
def encode_negative(
    model: DiffusionModel,
    batch_size: int,
    *,
    height: int | None = None,
    width: int | None = None,
    negative_prompt: str | None = None,
) -> TextConditioning:
    """The unconditional (CFG) conditioning, as the stock pipeline builds it from its `negative_prompt` argument.

    None (the pipelines' default): SD1.5, SD3 and FLUX encode the empty prompt "". SDXL uses all-zero
    `prompt_embeds` and `pooled_prompt_embeds` when the pipeline sets `force_zeros_for_empty_prompt` (SDXL base
    does), else it encodes "" like SD1.5. A string (even "") is encoded as a prompt is, by every family (the stock
    SDXL pipeline zeroes only when no negative prompt is passed). SDXL's `add_time_ids` equal the conditional ones.

    Args:
        model: loaded SD1.5 / SDXL / SD3 / FLUX components.
        batch_size: B, the number of rows.
        height, width: SDXL image size in pixels for `add_time_ids`; default the model's native resolution.
        negative_prompt: the negative prompt, or None.

    Returns:
        B identical unconditional conditionings on the model's device.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if negative_prompt is not None:
        return encode_prompts(model, [negative_prompt], height=height, width=width).repeat_interleave(batch_size)
    if model.kind == "sdxl" and model.force_zeros_for_empty_prompt:
        length = model.tokenizers[0].model_max_length
        width_d = sum(encoder.config.hidden_size for encoder in model.text_encoders)
        dtype = model.text_encoders[1].dtype
        return TextConditioning(
            prompt_embeds=torch.zeros(batch_size, length, width_d, dtype=dtype, device=model.device),
            pooled_prompt_embeds=torch.zeros(
                batch_size, model.text_encoders[1].config.projection_dim, dtype=dtype, device=model.device
            ),
            add_time_ids=_add_time_ids(model, batch_size, height, width),
        )
    return encode_prompts(model, [""], height=height, width=width).repeat_interleave(batch_size)


def predict_noise(unet, x_t: Tensor, t: Tensor, cond: TextConditioning) -> Tensor:
    """ε_θ(x_t, t, c): one UNet call, differentiable.

    Args:
        unet: `UNet2DConditionModel` (with or without an active LoRA), or a DistributedDataParallel wrapping one.
        x_t: (B, C, h, w) noisy latents.
        t: (B,) or scalar timesteps on the training grid (0 … 999).
        cond: B conditionings; moved to x_t's device and cast to its dtype.

    Returns:
        (B, C, h, w) predicted noise, in x_t's dtype.

    Raises:
        ValueError: batch sizes differ, or an SDXL UNet gets a conditioning without pooled embeds / add_time_ids.
    """
    if len(cond) != x_t.shape[0]:
        raise ValueError(f"cond has {len(cond)} rows but x_t has batch {x_t.shape[0]}")
    cond = cond.to(device=x_t.device, dtype=x_t.dtype)
    added_cond_kwargs = None
    config = getattr(unet, "module", unet).config  # `module`: a DistributedDataParallel wrapper
    if config.addition_embed_type == "text_time":
        if not cond.is_sdxl:
            raise ValueError("this SDXL UNet needs pooled_prompt_embeds and add_time_ids in the conditioning")
        added_cond_kwargs = {"text_embeds": cond.pooled_prompt_embeds, "time_ids": cond.add_time_ids}
    return unet(
        x_t,
        t,
        encoder_hidden_states=cond.prompt_embeds,
        added_cond_kwargs=added_cond_kwargs,
        return_dict=False,
    )[0]


def predict_velocity(transformer, x_t: Tensor, t: Tensor, cond: TextConditioning) -> Tensor:
    """v_θ(x_σ, σ, c): one call of SD3's transformer, differentiable, as `StableDiffusion3Pipeline` makes it, or of
    FLUX's, as `FluxPipeline` makes it (`_predict_flux_velocity`: the latents packed into 2x2-patch tokens and back).

    Args:
        transformer: `SD3Transformer2DModel` or `FluxTransformer2DModel` (with or without an active LoRA), or a
            DistributedDataParallel wrapping one.
        x_t: (B, 16, h, w) noisy latents x_σ.
        t: (B,) or scalar timesteps σ·N on the scheduler's scale (`FlowMatchEulerDiscreteScheduler.timesteps`,
            N = 1000), floats.
        cond: B SD3 conditionings (`encode_prompts` of an SD3 model); moved to x_t's device and cast to its dtype.

    Returns:
        (B, 16, h, w) predicted velocity ε − x_0, in x_t's dtype.

    Raises:
        ValueError: batch sizes differ, or the conditioning has no pooled embeds or has SDXL's add_time_ids.
    """
    if len(cond) != x_t.shape[0]:
        raise ValueError(f"cond has {len(cond)} rows but x_t has batch {x_t.shape[0]}")
    if cond.pooled_prompt_embeds is None or cond.add_time_ids is not None:
        raise ValueError(
            "an SD3 / FLUX transformer needs a flow model's conditioning: pooled_prompt_embeds and no add_time_ids"
        )
    if isinstance(getattr(transformer, "module", transformer), FluxTransformer2DModel):
        return _predict_flux_velocity(transformer, x_t, t, cond)
    cond = cond.to(device=x_t.device, dtype=x_t.dtype)
    t = torch.as_tensor(t, device=x_t.device).expand(x_t.shape[0])  # the transformer embeds one t per row
    return transformer(
        hidden_states=x_t,
        encoder_hidden_states=cond.prompt_embeds,
        pooled_projections=cond.pooled_prompt_embeds,
        timestep=t,
        return_dict=False,
    )[0]


def predict_noise_cfg(
    unet,
    x_t: Tensor,
    t: Tensor,
    cond: TextConditioning,
    uncond: TextConditioning | None,
    guidance_scale: float,
) -> Tensor:
    """Classifier-free guided noise ε̂ = ε_θ(x_t, ∅) + w · (ε_θ(x_t, c) − ε_θ(x_t, ∅)), differentiable.

    Both branches run in one batched UNet call on [x_t; x_t] with [uncond; cond], as the stock pipelines do. With
    w = 1 or no `uncond` only the conditional branch runs.

    Args:
        unet: `UNet2DConditionModel`.
        x_t: (B, C, h, w) noisy latents.
        t: (B,) or scalar timesteps.
        cond: B conditional rows.
        uncond: B unconditional rows (`encode_negative`), or None.
        guidance_scale: w.

    Returns:
        (B, C, h, w) guided noise prediction.
    """
    return predict_cfg(predict_noise, unet, x_t, t, cond, uncond, guidance_scale)


def predict_cfg(
    predict: Callable[[Any, Tensor, Tensor, TextConditioning], Tensor],
    network,
    x_t: Tensor,
    t: Tensor,
    cond: TextConditioning,
    uncond: TextConditioning | None,
    guidance_scale: float,
) -> Tensor:
    """Classifier-free guidance around one network call `predict(network, x_t, t, cond)` (`predict_noise`,
    `predict_velocity`): p(∅) + w · (p(c) − p(∅)), both branches in one batched call on [x_t; x_t] with
    [uncond; cond]; with w = 1 or no `uncond` only the conditional branch runs. Returns (B, C, h, w)."""
    if uncond is None or guidance_scale == 1.0:
        return predict(network, x_t, t, cond)
    if len(uncond) != len(cond):
        raise ValueError(f"uncond has {len(uncond)} rows but cond has {len(cond)}")
    t = torch.as_tensor(t, device=x_t.device)
    t_in = t.repeat(2) if t.ndim == 1 else t  # (2B,) or scalar
    both = TextConditioning.cat([c.to(device=x_t.device, dtype=x_t.dtype) for c in (uncond, cond)])  # 2B rows
    out = predict(network, torch.cat([x_t, x_t]), t_in, both)  # (2B, C, h, w)
    out_uncond, out_cond = out.chunk(2)  # (B, C, h, w) each
    return out_uncond + guidance_scale * (out_cond - out_uncond)


def pack_latents(x: Tensor) -> Tensor:
    """FLUX's token layout: (B, C, h, w) latents -> (B, (h/2)(w/2), 4C), token (i, j) (row-major) holding the 2x2
    patch at rows 2i, 2i+1 and columns 2j, 2j+1, channel-major (c, dy, dx) (`FluxPipeline._pack_latents`).

    Raises:
        ValueError: h or w is odd.
    """
    b, c, h, w = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"FLUX packs 2x2 latent patches: latent height and width must be even, got {h}x{w}")
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), 4 * c)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """The inverse of `pack_latents`: (B, (h/2)(w/2), 4C) -> (B, C, h, w) for latent height h and width w."""
    b, _, d = tokens.shape
    c = d // 4
    return tokens.reshape(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, height, width)


def latent_image_ids(height: int, width: int, device=None, dtype: torch.dtype = torch.float32) -> Tensor:
    """FLUX's rotary position ids of the packed image tokens: ((h/2)(w/2), 3) rows (0, i, j), row-major over the
    (h/2) x (w/2) token grid (`FluxPipeline._prepare_latent_image_ids`); the text tokens' ids are all zero."""
    rows = torch.arange(height // 2, dtype=dtype, device=device)
    cols = torch.arange(width // 2, dtype=dtype, device=device)
    ids = torch.zeros(height // 2, width // 2, 3, dtype=dtype, device=device)
    ids[..., 1] = rows[:, None]
    ids[..., 2] = cols[None, :]
    return ids.reshape(-1, 3)


def _predict_flux_velocity(transformer, x_t: Tensor, t: Tensor, cond: TextConditioning) -> Tensor:
    """One `FluxTransformer2DModel` call on (B, C, h, w) latents, as `FluxPipeline.__call__` makes it: packed tokens,
    image ids (0, i, j), zero text ids, timestep σ = t / 1000, the guidance value when the transformer embeds one;
    the output unpacked to (B, C, h, w)."""
    config = getattr(transformer, "module", transformer).config
    if config.guidance_embeds and cond.guidance is None:
        raise ValueError("this FLUX transformer embeds a guidance value; the conditioning has none (encode_prompts)")
    b, _, h, w = x_t.shape
    cond = cond.to(device=x_t.device, dtype=x_t.dtype)
    t = torch.as_tensor(t, device=x_t.device).to(x_t.dtype).expand(b)
    out = transformer(
        hidden_states=pack_latents(x_t),
        encoder_hidden_states=cond.prompt_embeds,
        pooled_projections=cond.pooled_prompt_embeds,
        timestep=t / _FLUX_TIMESTEP_SCALE,
        img_ids=latent_image_ids(h, w, device=x_t.device, dtype=x_t.dtype),
        txt_ids=torch.zeros(cond.prompt_embeds.shape[1], 3, device=x_t.device, dtype=x_t.dtype),
        guidance=cond.guidance[:, 0] if config.guidance_embeds else None,
        return_dict=False,
    )[0]
    return unpack_latents(out, h, w)

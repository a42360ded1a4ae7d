"""The reward interface, the reward registry, and the weighted sum of several rewards.

Contract of every reward (docs/rewards.md §1): images (N, 3, H, W) float in [0, 1] plus N prompts → (N,) scores.

    scores = reward.score(images, prompts)                   # (N,) float32, CPU, no graph
    scores, grad = reward.score_and_grad(images, prompts)    # + (N, 3, H, W) d score_i / d images_i
    scores = reward.forward_differentiable(images, prompts)  # (N,) with an autograd graph to `images`

A reward that cannot be differentiated (JPEG size) says so with `differentiable = False`; asking it for a
gradient raises `NotDifferentiableError`, it never returns zeros (docs/rewards.md §2.5, §5).

A subclass implements one method, `_score`, and registers itself by name:

    @register_reward("brightness")
    class Brightness(RewardModel):
        differentiable = True
        def _score(self, images, prompts):
            return images.mean(dim=(1, 2, 3))

`build_reward(name, path=..., device=..., **kwargs)` constructs a registered reward from a config entry. Rewards
that load weights take a `path` constructor argument; rewards that load nothing take none, and passing one is an
error. `build_reward("custom", target="pkg.module:Attr", **kwargs)` loads a user's reward by import path instead
(rewards/custom.py, which registers its builder here with `set_custom_builder` when imported, so that this module
never imports it). `build_reward` and `WeightedReward.from_specs` are the one reward factory: every reward of a
run, the trained-on ones and the held-out ones alike, is built by them.
"""

from __future__ import annotations

import abc
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor

__all__ = [
    "REWARD_REGISTRY",
    "NotDifferentiableError",
    "RewardModel",
    "RewardResult",
    "WeightedReward",
    "build_reward",
    "build_spec_reward",
    "register_reward",
    "validate_reward_inputs",
]

# Images may overshoot [0, 1] by this much (float rounding in a VAE decode followed by a clamp) before
# `validate_reward_inputs` rejects them.
RANGE_TOLERANCE = 1e-4


class NotDifferentiableError(RuntimeError):
    """A gradient was asked of a reward (or a weighted sum containing one) that has none."""


def validate_reward_inputs(images: Tensor, prompts: Sequence[str]) -> None:
    """Checks the reward input contract and raises `ValueError` naming the first violation.

    Args:
        images: (N, 3, H, W) floating tensor with values in [0, 1] (up to `RANGE_TOLERANCE`), N >= 1.
        prompts: N strings (a single `str` is rejected: it is a sequence of characters, not of prompts).
    """
    if not isinstance(images, Tensor):
        raise ValueError(f"images must be a torch.Tensor of shape (N, 3, H, W), got {type(images).__name__}")
    if images.ndim != 4:
        raise ValueError(f"images must have 4 dims (N, 3, H, W), got {images.ndim} dims, shape {tuple(images.shape)}")
    if images.shape[1] != 3:
        raise ValueError(f"images must have 3 channels (N, 3, H, W), got shape {tuple(images.shape)}")
    if images.shape[0] == 0 or images.shape[2] == 0 or images.shape[3] == 0:
        raise ValueError(f"images must be non-empty, got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a floating tensor with values in [0, 1], got dtype {images.dtype}")
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise ValueError(f"prompts must be a sequence of strings, got {type(prompts).__name__}")
    if len(prompts) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; need one prompt per image")
    bad = [type(p).__name__ for p in prompts if not isinstance(p, str)]
    if bad:
        raise ValueError(f"prompts must all be strings, got {', '.join(sorted(set(bad)))}")
    with torch.no_grad():
        if not bool(torch.isfinite(images).all()):
            raise ValueError("images contain NaN or inf values")
        lo, hi = float(images.min()), float(images.max())
    if lo < -RANGE_TOLERANCE or hi > 1.0 + RANGE_TOLERANCE:
        raise ValueError(
            f"images must have values in [0, 1], got range [{lo:.6g}, {hi:.6g}]; "
            "rewards take decoded images mapped from [-1, 1] to [0, 1]"
        )


class RewardModel(abc.ABC):
    """A reward: images (N, 3, H, W) in [0, 1] and N prompts → (N,) scores, larger is better.

    Subclasses set the class attribute `differentiable`, implement `_score`, and register with
    `@register_reward(name)`, which sets `name`. Scores of different images must not interact (each score
    depends on its own image only), so `d scores.sum() / d images` is the per-image gradient.

    Attributes:
        name: registry name, set by `register_reward`.
        differentiable: whether `_score` is differentiable with respect to the images.
    """

    name: str = ""
    differentiable: bool

    @abc.abstractmethod
    def _score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Computes the scores; the only method a subclass implements.

        Called with validated input. Under `score` it runs inside `torch.no_grad()`; under
        `forward_differentiable` it must keep the autograd graph to `images` (differentiable rewards only).
        The reward moves `images` to its own device if it has one.

        Args:
            images: (N, 3, H, W) floating, values in [0, 1] (up to `RANGE_TOLERANCE`).
            prompts: N strings.

        Returns:
            (N,) scores on any device, any floating dtype.
        """

    def score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Scores a batch without building a graph.

        Args:
            images: (N, 3, H, W) floating, values in [0, 1].
            prompts: N strings, one per image.

        Returns:
            (N,) float32 scores on CPU.

        Raises:
            ValueError: the input breaks the contract (shape, dtype, range, prompt count).
        """
        validate_reward_inputs(images, prompts)
        with torch.no_grad():
            scores = self._score(images, prompts)
        return self._checked(scores, images.shape[0]).detach().to(device="cpu", dtype=torch.float32)

    def forward_differentiable(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """Scores a batch keeping the autograd graph to `images` (for losses that backpropagate a reward).

        Args:
            images: (N, 3, H, W) floating, values in [0, 1]; usually `requires_grad`.
            prompts: N strings, one per image.

        Returns:
            (N,) scores on `images.device` in `images.dtype`, with a graph to `images`.

        Raises:
            NotDifferentiableError: the reward has no gradient.
            ValueError: the input breaks the contract.
        """
        if not self.differentiable:
            raise NotDifferentiableError(
                f"reward '{self.name}' ({type(self).__name__}) is not differentiable; it has scores but no gradient"
            )
        validate_reward_inputs(images, prompts)
        scores = self._score(images, prompts)
        return self._checked(scores, images.shape[0]).to(device=images.device, dtype=images.dtype)

    def score_and_grad(self, images: Tensor, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Scores a batch and returns each score's gradient with respect to its own image.

        The gradient is taken on a detached copy of `images`, so the caller's graph is left alone.

        Args:
            images: (N, 3, H, W) floating, values in [0, 1].
            prompts: N strings, one per image.

        Returns:
            scores: (N,) float32 on CPU.
            grad: (N, 3, H, W) float32 on CPU, grad[i] = d scores[i] / d images[i].

        Raises:
            NotDifferentiableError: the reward has no gradient (never a tensor of zeros).
            ValueError: the input breaks the contract.
        """
        x = images.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            scores = self.forward_differentiable(x, prompts)
            (grad,) = torch.autograd.grad(scores.sum(), x)
        return _to_cpu32(scores), _to_cpu32(grad)

    def to(self, device: str | torch.device) -> RewardModel:
        """Moves the reward's weights to `device` and returns self (a no-op for rewards without weights)."""
        return self

    def describe(self) -> str | None:
        """Where the reward came from, for messages about it (a custom reward's import path); None for a built-in."""
        return None

    def _checked(self, scores: Tensor, n: int) -> Tensor:
        if not isinstance(scores, Tensor) or scores.shape != (n,):
            shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
            raise RuntimeError(f"reward '{self.name}' returned scores of shape {shape}, expected ({n},)")
        return scores


def _to_cpu32(t: Tensor) -> Tensor:
    return t.detach().to(device="cpu", dtype=torch.float32)


# name → reward class; filled by `@register_reward` when `rlhf_diffusion.rewards` is imported.
REWARD_REGISTRY: dict[str, type[RewardModel]] = {}
# The config name of a user's reward loaded by import path (rewards/custom.py); never registered.
CUSTOM_REWARD = "custom"

_RewardClass = TypeVar("_RewardClass", bound=type[RewardModel])

# Builds the reward of name "custom": rewards/custom.py `build_custom_reward`, set by `set_custom_builder` when that
# module is imported (the package imports it), so that this module does not import custom.py, which imports it.
_custom_builder: Callable[..., RewardModel] | None = None


def set_custom_builder(builder: Callable[..., RewardModel]) -> None:
    """Registers the builder of name "custom": `builder(target, *, path, device, kwargs, where)` -> a reward."""
    global _custom_builder
    _custom_builder = builder


def _build_custom(target: str | None, *, path, device, kwargs: dict[str, Any], where: str | None) -> RewardModel:
    if _custom_builder is None:
        raise RuntimeError(
            "no builder for custom rewards: import rlhf_diffusion.rewards (it imports rewards/custom.py)"
        )
    return _custom_builder(target, path=path, device=device, kwargs=kwargs, where=where)


def register_reward(name: str) -> Callable[[_RewardClass], _RewardClass]:
    """Class decorator: registers a `RewardModel` subclass under `name` and sets its `name` attribute.

    Raises:
        ValueError: `name` is empty or already registered.
        TypeError: the class is not a `RewardModel` or does not declare `differentiable` as a bool.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"reward name must be a non-empty string, got {name!r}")
    if name == CUSTOM_REWARD:
        raise ValueError(f"reward name '{CUSTOM_REWARD}' is reserved for rewards loaded by import path")

    def decorator(cls: _RewardClass) -> _RewardClass:
        if not (isinstance(cls, type) and issubclass(cls, RewardModel)):
            raise TypeError(f"@register_reward('{name}') needs a RewardModel subclass, got {cls!r}")
        if not isinstance(getattr(cls, "differentiable", None), bool):
            raise TypeError(f"reward class {cls.__name__} must set the class attribute `differentiable` to a bool")
        if name in REWARD_REGISTRY:
            raise ValueError(f"reward '{name}' is already registered (by {REWARD_REGISTRY[name].__qualname__})")
        cls.name = name
        REWARD_REGISTRY[name] = cls
        return cls

    return decorator


def _registered() -> str:
    return ", ".join(sorted(REWARD_REGISTRY)) or "(none)"


def build_reward(
    name: str, *, path: str | None = None, device: str | torch.device = "cpu", target: str | None = None, **kwargs: Any
) -> RewardModel:
    """Constructs the registered reward `name` (or the custom reward `target`) and moves it to `device`.

    Args:
        name: registry name, e.g. "jpeg_compressibility", or "custom" (then `target` says what to load).
        path: where the reward's weights are (its own published format); only for rewards that load weights.
        device: where the reward runs.
        target: only for name "custom": "package.module:Attribute" (see `rewards.custom.load_custom_reward`).
        **kwargs: the reward class's constructor arguments.

    Raises:
        ValueError: unknown name (the message lists the registered names), or arguments the reward does not take
            or lacks (the message names the reward and the argument); for a custom reward a
            `CustomRewardError` (a ValueError) naming the target.
    """
    if name == CUSTOM_REWARD:
        return _build_custom(target, path=path, device=device, kwargs=kwargs, where=None)
    if target is not None:
        raise ValueError(
            f"reward '{name}' is built in; `target` is only for name '{CUSTOM_REWARD}' (got target={target!r})"
        )
    if name not in REWARD_REGISTRY:
        raise ValueError(f"unknown reward '{name}'; registered: {_registered()}")
    cls = REWARD_REGISTRY[name]
    params = inspect.signature(cls).parameters
    accepted = [p for p, v in params.items() if v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY)]
    takes_any = any(v.kind is v.VAR_KEYWORD for v in params.values())
    if path is not None and "path" not in params and not takes_any:
        raise ValueError(f"reward '{name}' loads no weights and takes no path (got path={path!r})")
    if "path" in kwargs:
        raise ValueError(f"reward '{name}': pass the weights location as `path`, not inside kwargs")
    unknown = [k for k in kwargs if k not in accepted and not takes_any]
    if unknown:
        raise ValueError(
            f"reward '{name}' got unknown argument(s) {', '.join(map(repr, unknown))}; "
            f"it accepts: {', '.join(a for a in accepted if a != 'path') or '(none)'}"
        )
    if path is not None:
        kwargs = {**kwargs, "path": path}
    missing = [
        p
        for p, v in params.items()
        if v.default is v.empty and v.kind in (v.POSITIONAL_OR_KEYWORD, v.KEYWORD_ONLY) and p not in kwargs
    ]
    if missing:
        raise ValueError(f"reward '{name}' needs argument(s) {', '.join(map(repr, missing))}")
    return cls(**kwargs).to(device)


@dataclass
class RewardResult:
    """Scores of a weighted sum of rewards.

    Attributes:
        total: (N,) float32 CPU, Σ_i weight_i · reward_i.
        per_reward: reward name → (N,) float32 CPU raw (unweighted) scores, in the order of the terms.
    """

    total: Tensor
    per_reward: dict[str, Tensor]


def build_spec_reward(spec: Any, device: str | torch.device = "cpu", *, where: str) -> RewardModel:
    """The reward of one config entry (see `WeightedReward.from_specs`, which builds every entry with it), named by
    its `.label` if it has one.

    Args:
        spec: an object with `.name`, `.path` (or None), `.kwargs` (dict or None), optionally `.target` and `.label`.
        device: where the reward runs.
        where: the entry's config key, for messages (`<where>.target`, e.g. `rewards.0.target`).

    Raises:
        ValueError: the reward cannot be built; for a custom reward a `CustomRewardError` naming `<where>.target`.
    """
    kwargs = dict(spec.kwargs or {})
    if spec.name == CUSTOM_REWARD:
        reward = _build_custom(
            getattr(spec, "target", None), path=spec.path, device=device, kwargs=kwargs, where=f"{where}.target"
        )
    else:
        reward = build_reward(spec.name, path=spec.path, device=device, target=getattr(spec, "target", None), **kwargs)
    label = getattr(spec, "label", None)
    if label is not None:
        reward.name = label  # instance attribute: the key in per_reward, metrics and Pareto ranking
    return reward


class WeightedReward:
    """Weighted sum of several rewards, built from [(RewardModel, weight), ...].

    The total is Σ_i w_i · r_i and its gradient Σ_i w_i · ∇r_i; it is differentiable only if every term is.
    Terms are keyed by `reward.name`, so each key appears at most once; `from_specs` sets an instance's name to its
    config key (`label`, else a custom target's attribute name, else the registry name).
    """

    def __init__(self, terms: Sequence[tuple[RewardModel, float]]):
        if len(terms) == 0:
            raise ValueError("WeightedReward needs at least one (reward, weight) term")
        self.terms: list[tuple[RewardModel, float]] = []
        for reward, weight in terms:
            if not isinstance(reward, RewardModel):
                raise ValueError(f"WeightedReward terms must be RewardModel instances, got {type(reward).__name__}")
            if not reward.name:
                raise ValueError(f"reward {type(reward).__name__} has no name; register it with @register_reward")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
                raise ValueError(f"weight of reward '{reward.name}' must be a finite number, got {weight!r}")
            if reward.name in self.names:
                raise ValueError(f"reward '{reward.name}' appears twice in WeightedReward; each reward at most once")
            self.terms.append((reward, float(weight)))

    @property
    def differentiable(self) -> bool:
        """True when every term is differentiable."""
        return all(reward.differentiable for reward, _ in self.terms)

    @property
    def not_differentiable(self) -> list[str]:
        """The terms without a gradient, each as "'key'" or "'key' (custom reward 'pkg.mod:Attr' (rewards.i.target))",
        for error messages; empty when the sum is differentiable."""
        return [
            repr(reward.name) + (f" ({reward.describe()})" if reward.describe() else "")
            for reward, _ in self.terms
            if not reward.differentiable
        ]

    @property
    def names(self) -> list[str]:
        """Reward names, in the order of the terms."""
        return [reward.name for reward, _ in self.terms]

    @property
    def weights(self) -> dict[str, float]:
        """Reward name → weight."""
        return {reward.name: weight for reward, weight in self.terms}

    def score(self, images: Tensor, prompts: Sequence[str]) -> RewardResult:
        """Scores a batch with every term.

        Args:
            images: (N, 3, H, W) floating, values in [0, 1].
            prompts: N strings, one per image.

        Returns:
            `RewardResult` with (N,) float32 CPU total and raw per-reward scores.
        """
        per_reward = {reward.name: reward.score(images, prompts) for reward, _ in self.terms}
        return RewardResult(total=self._weighted_sum(per_reward), per_reward=per_reward)

    def forward_differentiable(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        """The weighted total (N,) with an autograd graph to `images`, on `images.device` in `images.dtype`.

        Raises:
            NotDifferentiableError: some term is not differentiable (the message names it).
        """
        self._require_differentiable()
        return self._weighted_sum({r.name: r.forward_differentiable(images, prompts) for r, _ in self.terms})

    def score_and_grad(self, images: Tensor, prompts: Sequence[str]) -> tuple[RewardResult, Tensor]:
        """Scores a batch and returns the gradient of the weighted total with respect to each image.

        Args:
            images: (N, 3, H, W) floating, values in [0, 1].
            prompts: N strings, one per image.

        Returns:
            result: `RewardResult` (float32 CPU).
            grad: (N, 3, H, W) float32 CPU, grad[i] = Σ_j w_j · d r_j(images[i]) / d images[i].

        Raises:
            NotDifferentiableError: some term is not differentiable (the message names it); never zeros.
        """
        self._require_differentiable()
        x = images.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            per_reward = {r.name: r.forward_differentiable(x, prompts) for r, _ in self.terms}
            total = self._weighted_sum(per_reward)
            (grad,) = torch.autograd.grad(total.sum(), x)
        result = RewardResult(total=_to_cpu32(total), per_reward={k: _to_cpu32(v) for k, v in per_reward.items()})
        return result, _to_cpu32(grad)

    @classmethod
    def from_specs(
        cls, specs: Sequence[Any], device: str | torch.device = "cpu", *, where: str = "rewards", weighted: bool = True
    ) -> WeightedReward:
        """Builds the sum from config entries: the one factory of a run's rewards (`rewards`, and
        `guards.heldout_rewards` through `workers.reward_server.build_heldout_reward`).

        Args:
            specs: objects with attributes `.name`, `.weight`, `.path` (or None) and `.kwargs` (dict or None),
                e.g. the config's `RewardConfig`; optionally `.target` (name "custom": the import path) and
                `.label` (the reward's key; None = a custom target's attribute name, else `.name`).
            device: where every reward runs.
            where: the config key of `specs`, for messages (`<where>.<i>.target`).
            weighted: False = every term gets weight 1 (the entries' `.weight` is not used).

        Raises:
            ValueError: a reward cannot be built; for a custom reward a `CustomRewardError` naming
                `<where>.<i>.target`.
        """
        if len(specs) == 0:
            raise ValueError("no rewards configured; need at least one reward entry")
        terms = [
            (build_spec_reward(spec, device, where=f"{where}.{index}"), spec.weight if weighted else 1.0)
            for index, spec in enumerate(specs)
        ]
        return cls(terms)

    def _require_differentiable(self) -> None:
        offending = self.not_differentiable
        if offending:
            raise NotDifferentiableError(
                f"the weighted reward has no gradient: reward(s) {', '.join(offending)} are not differentiable"
            )

    def _weighted_sum(self, per_reward: dict[str, Tensor]) -> Tensor:
        # (N,) Σ_i w_i · r_i, accumulated in the dtype/device of the first term's scores.
        total = None
        for reward, weight in self.terms:
            term = weight * per_reward[reward.name]
            total = term if total is None else total + term.to(total)
        return total

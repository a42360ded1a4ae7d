"""Custom rewards: a user's reward loaded by import path, `rewards: [{name: custom, target: "pkg.mod:Attr"}]`.

`target` is "package.module:Attribute" (the attribute may be dotted, `module:Class.factory`). The attribute is
called with the entry's `kwargs` (and `path=` when `path` is set) and must return either

- a `RewardModel` instance (subclass `rlhf_diffusion.rewards.RewardModel`: set `differentiable`, implement
  `_score(images, prompts)`; no registration needed), or
- any object with `score(images, prompts)` and, if it is differentiable, `forward_differentiable(images, prompts)`
  (no subclassing needed). An optional bool attribute `differentiable` overrides the default (differentiable iff
  `forward_differentiable` exists).

So the attribute is a `RewardModel` subclass, any class of the second kind, or a factory function returning one.

The contract the user's methods are called with (the same as the built-in rewards'):

    images:  (B, 3, H, W) float tensor, values in [0, 1], already on the reward's device (the run's device)
    prompts: list of B strings
    returns: (B,) float tensor, one finite score per image, larger = better; scores of different images must not
             interact. `score` runs under torch.no_grad(); `forward_differentiable` (or a differentiable
             `_score`) must keep the autograd graph to `images` (no .detach(), .item(), numpy).
    to(device) (optional): move weights; called once after construction.

Whatever the object is, `load_custom_reward` returns a `CustomReward` wrapping it (`.inner` is the object): the
wrapper validates the inputs, moves the images to the reward's device, and checks every result (a tensor of
shape (B,), floating, finite), so a broken reward fails with a message naming its target instead of corrupting a
run. A non-differentiable reward refuses gradients (`NotDifferentiableError`), never returns zeros.

A config is code: the target is imported and called with the entry's kwargs, so a config file from someone else
deserves the trust you would give their Python module. Before anything is called, targets in the standard library
(`os:system`, `subprocess:run`, `builtins:eval`, ...) and attributes that are neither a class nor a Python function
(builtins, other callables) are refused; importing the module still runs its top-level code.

Every loading problem raises one `CustomRewardError` (a `ValueError`) naming the target, and the config entry
(`rewards.<i>.target`) when built from a run config: a malformed target, a module that cannot be imported (it must
be importable on every Ray node: `ray job submit --working-dir .`, `runtime_env: {py_modules: [...]}`, or
PYTHONPATH), a missing attribute, a module or constructor that raises, arguments the constructor does not take,
and an object that is not a reward.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from rlhf_diffusion.rewards.base import (
    NotDifferentiableError,
    RewardModel,
    set_custom_builder,
    validate_reward_inputs,
)

__all__ = ["CustomReward", "CustomRewardError", "default_label", "load_custom_reward", "parse_target"]

# Same grammar as config.py's `_REWARD_TARGET_RE`.
_TARGET_RE = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_IMPORTABLE_HINT = (
    "it must be importable on every Ray node (the driver, reward servers and samplers): submit "
    "with `ray job submit --working-dir .`, ship it with `runtime_env: {py_modules: [...]}`, or put "
    "its directory on PYTHONPATH"
)


class CustomRewardError(ValueError):
    """A custom reward cannot be loaded, or does not fit the reward interface. The message names the target."""


def parse_target(target: str) -> tuple[str, str]:
    """ "package.module:Attribute" → ("package.module", "Attribute").

    Raises:
        CustomRewardError: `target` does not have that form.
    """
    if not isinstance(target, str) or not _TARGET_RE.match(target):
        raise CustomRewardError(
            f"custom reward target {target!r}: expected 'package.module:Attribute' (e.g. 'my_pkg.rewards:MyReward')"
        )
    module, _, attribute = target.partition(":")
    return module, attribute


def default_label(target: str) -> str:
    """The key a custom reward has when its config sets no `label`: the attribute's (last) name."""
    return parse_target(target)[1].rpartition(".")[2]


def load_custom_reward(
    target: str, *, path: str | None = None, device: str | torch.device = "cpu", **kwargs: Any
) -> CustomReward:
    """Imports `target`, builds the reward with `kwargs` (and `path` when not None) and moves it to `device`.

    Args:
        target: "package.module:Attribute"; the attribute is a `RewardModel` subclass, a class with
            `score(images, prompts)` (and `forward_differentiable` if differentiable), or a factory returning one.
        path: passed to the constructor as `path=` when not None (weights location).
        device: where the reward runs; its inputs are moved there.
        **kwargs: the constructor's keyword arguments.

    Returns:
        A `CustomReward` (a `RewardModel`) named after the attribute (see `default_label`).

    Raises:
        CustomRewardError: see the module docstring; the message names the target.
    """
    return build_custom_reward(target, path=path, device=device, kwargs=kwargs)


def build_custom_reward(
    target: str | None,
    *,
    path: str | None = None,
    device: str | torch.device = "cpu",
    kwargs: dict[str, Any] | None = None,
    where: str | None = None,
) -> CustomReward:
    """`load_custom_reward` for a config entry: `where` ("rewards.0.target") prefixes every message."""
    prefix = f"{where}: " if where else ""
    if target is None:
        raise CustomRewardError(
            f"{prefix}required for name 'custom': the reward's import path 'package.module:Attribute'"
        )
    try:
        module_name, attribute = parse_target(target)
    except CustomRewardError as error:
        raise CustomRewardError(f"{prefix}{error}") from None
    what = f"{prefix}custom reward {target!r}"
    factory = _resolve(module_name, attribute, what)
    inner = _construct(factory, dict(kwargs or {}), path, what)
    reward = CustomReward(inner, target, where=where)
    reward.name = default_label(target)
    return reward.to(device)


def _resolve(module_name: str, attribute: str, what: str) -> Callable[..., Any]:
    root = module_name.split(".")[0]
    if root in sys.stdlib_module_names or root in sys.builtin_module_names:
        raise CustomRewardError(
            f"{what}: {module_name!r} is in Python's standard library, which holds no reward; "
            "the target must name your own module's reward class or factory function"
        )
    importlib.invalidate_caches()  # a module written after this process started is found too
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        missing = error.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise CustomRewardError(
                f"{what}: cannot import module {module_name!r} (no module named {missing!r}); {_IMPORTABLE_HINT}"
            ) from None
        raise CustomRewardError(
            f"{what}: importing module {module_name!r} failed: {error} (a dependency of the module is not installed)"
        ) from error
    except Exception as error:  # noqa: BLE001 - user code: any exception becomes one message naming the target
        raise CustomRewardError(
            f"{what}: importing module {module_name!r} raised {type(error).__name__}: {error}"
        ) from error
    value: Any = module
    for i, part in enumerate(attribute.split(".")):
        if not hasattr(value, part):
            owner = module_name if i == 0 else f"{module_name}:{'.'.join(attribute.split('.')[:i])}"
            where = getattr(module, "__file__", None)
            raise CustomRewardError(
                f"{what}: {owner!r}{f' ({where})' if where and i == 0 else ''} has no "
                f"attribute {part!r}{_candidates(value) if i == 0 else ''}"
            )
        value = getattr(value, part)
    if not callable(value):
        raise CustomRewardError(
            f"{what}: {attribute!r} is not a class or a factory function (got "
            f"{type(value).__name__} {value!r:.40}); the target must be a RewardModel subclass, "
            "a class with "
            "score(images, prompts), or a function returning such a reward"
        )
    if not (inspect.isclass(value) or inspect.isfunction(value) or inspect.ismethod(value)):
        raise CustomRewardError(
            f"{what}: {attribute!r} is a {type(value).__name__}, not a class or a Python "
            "function; it is not called (the target must be a RewardModel subclass, a class "
            "with score(images, prompts), or a function returning such a reward)"
        )
    return value


def _candidates(module: Any) -> str:
    names = sorted(
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and callable(value) and getattr(value, "__module__", None) == module.__name__
    )
    return f"; it defines: {', '.join(names[:20])}" if names else ""


def _construct(factory: Callable[..., Any], kwargs: dict[str, Any], path: str | None, what: str) -> Any:
    if isinstance(factory, type) and issubclass(factory, RewardModel) and inspect.isabstract(factory):
        missing = ", ".join(sorted(factory.__abstractmethods__))
        raise CustomRewardError(
            f"{what}: {factory.__name__} is a RewardModel subclass that does not implement "
            f"{missing}; implement _score(images, prompts) -> (B,) scores"
        )
    if "path" in kwargs:
        raise CustomRewardError(f"{what}: pass the weights location as the entry's `path`, not inside kwargs")
    call_kwargs = {**kwargs, **({"path": path} if path is not None else {})}
    shown = ", ".join(f"{k}={v!r}" for k, v in call_kwargs.items()) or "no arguments"
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # some builtins / C types have none: let the call decide
        signature = None
    if signature is not None:
        try:
            signature.bind(**call_kwargs)
        except TypeError as error:
            raise CustomRewardError(
                f"{what}: cannot be called with {shown}: {error}; its signature is "
                f"{getattr(factory, '__name__', 'target')}{signature} (set the entry's "
                "`kwargs`, and `path`, to match)"
            ) from None
    try:
        return factory(**call_kwargs)
    except TypeError as error:
        raise CustomRewardError(
            f"{what}: calling it with {shown} raised TypeError: {error} (check the entry's `kwargs` and `path`)"
        ) from error
    except Exception as error:  # noqa: BLE001 - user code
        raise CustomRewardError(
            f"{what}: constructing it with {shown} raised {type(error).__name__}: {error}"
        ) from error


class CustomReward(RewardModel):
    """A user's reward behind the production `RewardModel` interface, with every result checked.

    Args:
        inner: a `RewardModel` instance, or an object with `score(images, prompts)` and optionally
            `forward_differentiable(images, prompts)` and a bool `differentiable`.
        target: the import path it came from (named in every error).
        where: the config entry ("rewards.0.target"), or None.

    Raises:
        CustomRewardError: `inner` does not fit the interface (no `score`, a non-bool `differentiable`, or
            `differentiable = True` without `forward_differentiable`).
    """

    def __init__(self, inner: Any, target: str, where: str | None = None):
        self.inner = inner
        self.target = target
        self.where = where
        self.device: torch.device = torch.device("cpu")
        what = self._what()
        if isinstance(inner, RewardModel):
            if not isinstance(getattr(inner, "differentiable", None), bool):
                raise CustomRewardError(
                    f"{what}: {type(inner).__name__} must set the class attribute `differentiable` to True or False"
                )
            self.differentiable = inner.differentiable
            self._score_fn = self._grad_fn = inner._score
            return
        score = getattr(inner, "score", None)
        if not callable(score):
            raise CustomRewardError(
                f"{what}: built a {type(inner).__name__}, which is not a reward: it needs a method "
                "score(images, prompts) -> (B,) scores (images (B, 3, H, W) in [0, 1]), or subclass "
                "rlhf_diffusion.rewards.RewardModel"
            )
        grad = getattr(inner, "forward_differentiable", None)
        declared = getattr(inner, "differentiable", None)
        if declared is not None and not isinstance(declared, bool):
            raise CustomRewardError(f"{what}: `differentiable` must be True or False, got {declared!r}")
        if declared and not callable(grad):
            raise CustomRewardError(
                f"{what}: {type(inner).__name__} declares differentiable = True but has no "
                "method forward_differentiable(images, prompts) keeping the graph to images"
            )
        self.differentiable = callable(grad) if declared is None else declared
        self._score_fn = score
        self._grad_fn = grad if self.differentiable else None

    def _what(self) -> str:
        # the start of an error message
        return f"{self.where}: custom reward {self.target!r}" if self.where else f"custom reward {self.target!r}"

    def describe(self) -> str:
        """ "custom reward 'pkg.mod:Attr' (rewards.0.target)", for messages about this reward."""
        return f"custom reward {self.target!r}" + (f" ({self.where})" if self.where else "")

    def _call(self, fn: Callable[[Tensor, list[str]], Any], images: Tensor, prompts: Sequence[str]) -> Any:
        try:
            return fn(images.to(self.device), list(prompts))
        except Exception as error:
            error.add_note(f"raised by {self.describe()} in {getattr(fn, '__qualname__', fn)}")
            raise

    def _score(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        # `RewardModel.score` calls this under no_grad with validated inputs.
        return self._call(self._score_fn, images, prompts)

    def forward_differentiable(self, images: Tensor, prompts: Sequence[str]) -> Tensor:
        if not self.differentiable:
            raise NotDifferentiableError(
                f"reward '{self.name}' ({self.describe()}) is not differentiable: it has scores but no gradient "
                "(subclass RewardModel with differentiable = True, or implement forward_differentiable)"
            )
        validate_reward_inputs(images, prompts)
        scores = self._call(self._grad_fn, images, prompts)
        scores = self._checked(scores, images.shape[0])
        if images.requires_grad and torch.is_grad_enabled() and not scores.requires_grad:
            raise CustomRewardError(
                f"{self._what()}: forward_differentiable returned scores without an autograd "
                "graph to the images (was the result detached, or computed under no_grad?)"
            )
        return scores.to(device=images.device, dtype=images.dtype)

    def to(self, device: str | torch.device) -> CustomReward:
        self.device = torch.device(device)
        move = getattr(self.inner, "to", None)
        if callable(move):
            move(device)
        return self

    def _checked(self, scores: Any, n: int) -> Tensor:
        what = self._what()
        if not isinstance(scores, Tensor):
            raise CustomRewardError(
                f"{what} returned a {type(scores).__name__}, expected a torch.Tensor of "
                f"shape ({n},): one score per image"
            )
        if scores.shape != (n,):
            raise CustomRewardError(
                f"{what} returned scores of shape {tuple(scores.shape)}, expected ({n},): one score per image"
            )
        if not scores.is_floating_point():
            raise CustomRewardError(f"{what} returned scores of dtype {scores.dtype}, expected a floating dtype")
        with torch.no_grad():
            finite = torch.isfinite(scores)
            if not bool(finite.all()):
                bad = [i for i, ok in enumerate(finite.tolist()) if not ok]
                raise CustomRewardError(f"{what} returned non-finite scores (NaN or inf) for image(s) {bad[:10]}")
        return scores

    def __repr__(self) -> str:
        return f"CustomReward({self.target!r}, {self.inner!r})"


# `build_reward("custom", ...)` and `WeightedReward.from_specs` build custom rewards with it.
set_custom_builder(build_custom_reward)

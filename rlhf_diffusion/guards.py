"""`guards.early_stop`: the held-out reward's fall from its value before training, and the stop it triggers
(docs/architecture.md; the held-out scores come from the evaluation passes, `rlhf_diffusion.evaluation`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from rlhf_diffusion.config import EarlyStopConfig, RunConfig

if TYPE_CHECKING:
    from rlhf_diffusion.evaluation import EvalResult

__all__ = ["EarlyStop", "EarlyStopGuard", "early_stop_guard", "relative_drop"]


def relative_drop(before: float, now: float, min_scale: float) -> float:
    """How far a (larger-is-better) reward fell, relative to its starting magnitude:
    (before − now) / max(|before|, min_scale). Positive = it fell, whatever the signs (before −2, now −3 → 0.5);
    negative = it rose."""
    return (before - now) / max(abs(before), min_scale)


class EarlyStopGuard:
    """`guards.early_stop`: counts consecutive evaluation passes at which the watched held-out reward's
    `relative_drop` from its value before training exceeds `drop_fraction`; at `patience` of them the run stops.

    Args:
        config: the early-stop settings.
        before: the reward's held-out mean before training.
        strikes: consecutive passes over the limit so far (restored from a checkpoint on resume).
    """

    def __init__(self, config: EarlyStopConfig, before: float, strikes: int = 0):
        self.config = config
        self.before = before
        self.strikes = strikes

    def drop(self, heldout: dict[str, float]) -> float:
        """The watched reward's `relative_drop` at an evaluation pass (held-out key → mean)."""
        return relative_drop(self.before, heldout[self.config.reward], self.config.min_scale)

    def check(self, heldout: dict[str, float]) -> str | None:
        """Counts one evaluation pass (held-out key → mean); returns why the run must stop, or None."""
        drop = self.drop(heldout)
        self.strikes = self.strikes + 1 if drop > self.config.drop_fraction else 0
        if self.strikes < self.config.patience:
            return None
        return (
            f"held-out reward {self.config.reward!r} fell from {self.before:.6g} before training to "
            f"{heldout[self.config.reward]:.6g} (relative drop {drop:.4g} > guards.early_stop.drop_fraction "
            f"{self.config.drop_fraction:g}"
            + (f" at {self.strikes} consecutive evaluations" if self.config.patience > 1 else "")
            + ")"
        )


def early_stop_guard(config: RunConfig, heldout_before: dict[str, float], strikes: int = 0) -> EarlyStopGuard | None:
    """`guards.early_stop`'s guard, based on the held-out values before training (held-out key → mean); None
    without an early stop."""
    early_stop = config.guards.early_stop
    if early_stop is None:
        return None
    return EarlyStopGuard(early_stop, heldout_before[early_stop.reward], strikes)


@dataclass
class EarlyStop:
    """Why and where `guards.early_stop` ended the run: after training iteration `iteration` (1-based), whose
    evaluation pass (`evaluation`) is also the run's final evaluation."""

    iteration: int
    reason: str
    evaluation: EvalResult

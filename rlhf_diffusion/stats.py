"""Paired before/after statistics of the fixed held-out evaluation images (same prompts, same seeds): how much of a
change is the finite set of images, and, for a pass/fail score (the testbed checker's "all"), how many images a
run fixed and broke with an exact sign test. Pure functions over numbers."""

from __future__ import annotations

import math
from collections.abc import Sequence

__all__ = ["paired_comparison", "paired_standard_error", "sign_test_p"]


def paired_standard_error(before: Sequence[float], after: Sequence[float]) -> float:
    """Standard error of the mean per-image change (after − before), images paired by (prompt, seed); NaN for fewer
    than two images. It measures the eval set's finiteness, not the spread over training seeds."""
    diff = [float(a) - float(b) for b, a in zip(before, after)]
    n = len(diff)
    if n < 2:
        return float("nan")
    mean = sum(diff) / n
    return math.sqrt(sum((d - mean) ** 2 for d in diff) / (n - 1) / n)


def sign_test_p(fixed: int, broken: int) -> float:
    """Two-sided exact sign test of `fixed` vs `broken` (unchanged images dropped): the chance of a split at least
    this uneven if a change were equally likely to go either way."""
    n, k = fixed + broken, min(fixed, broken)
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired_comparison(before: Sequence[float], after: Sequence[float]) -> dict[str, float]:
    """Mean before and after, the mean change and its paired standard error; for scores that are all 0 or 1 also
    the images that went 0 → 1 (`fixed`) and 1 → 0 (`broken`) with the sign test's p; for other scores the images
    that rose and fell, with the sign test on those.

    Raises:
        ValueError: the two lists differ in length or are empty.
    """
    if len(before) != len(after) or not before:
        raise ValueError(f"paired scores need two equally long non-empty lists, got {len(before)} and {len(after)}")
    b, a = [float(v) for v in before], [float(v) for v in after]
    n = len(b)
    out = {
        "before": sum(b) / n,
        "after": sum(a) / n,
        "delta": (sum(a) - sum(b)) / n,
        "paired_se": paired_standard_error(b, a),
        "images": float(n),
    }
    binary = all(v in (0.0, 1.0) for v in b + a)
    up = sum(y > x for x, y in zip(b, a))
    down = sum(y < x for x, y in zip(b, a))
    key_up, key_down = ("fixed", "broken") if binary else ("rose", "fell")
    out.update({key_up: float(up), key_down: float(down), "sign_test_p": sign_test_p(up, down)})
    return out

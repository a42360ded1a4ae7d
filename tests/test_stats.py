"""Paired before/after statistics of the held-out images (`rlhf_diffusion.stats`), against hand-computed values."""

import math

import pytest

from rlhf_diffusion.stats import paired_comparison, paired_standard_error, sign_test_p


def test_binary_scores_count_fixed_and_broken_with_the_sign_test():
    before = [0, 0, 0, 0, 0, 1, 1, 1]
    after = [1, 1, 1, 1, 0, 1, 1, 0]
    out = paired_comparison(before, after)
    assert out["fixed"] == 4 and out["broken"] == 1 and "rose" not in out
    assert out["before"] == pytest.approx(3 / 8) and out["after"] == pytest.approx(6 / 8)
    assert out["delta"] == pytest.approx(3 / 8)
    assert out["sign_test_p"] == pytest.approx(2 * (1 + 5) / 32)  # 2 × (C(5,0) + C(5,1)) / 2^5
    diffs = [1, 1, 1, 1, 0, 0, 0, -1]
    mean = sum(diffs) / 8
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / 7 / 8)
    assert out["paired_se"] == pytest.approx(se)
    assert out["images"] == 8


def test_continuous_scores_count_rises_and_falls():
    out = paired_comparison([0.5, 0.2, 0.9], [0.75, 0.2, 0.8])
    assert out["rose"] == 1 and out["fell"] == 1 and "fixed" not in out
    assert out["sign_test_p"] == 1.0


def test_sign_test_and_standard_error_edges():
    assert sign_test_p(0, 0) == 1.0
    assert sign_test_p(10, 0) == pytest.approx(2 / 1024)
    assert math.isnan(paired_standard_error([1.0], [2.0]))
    with pytest.raises(ValueError, match="equally long"):
        paired_comparison([1.0, 0.0], [1.0])

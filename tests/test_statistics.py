"""Wilson intervals, exact McNemar and mean/std against hand-computed values."""

from __future__ import annotations

import math

import pytest

from lopt.evaluation.statistics import mcnemar_exact, mean_std, wilson_interval


def test_wilson_8_of_10():
    # z = 1.959964 (97.5% normal quantile), z^2 = 3.841459, p = 0.8, n = 10:
    # denominator = 1 + z^2/n = 1.3841459
    # center = (p + z^2/(2n)) / denominator = (0.8 + 0.1920729) / 1.3841459 = 0.7167401
    # half = z * sqrt(p(1-p)/n + z^2/(4n^2)) / denominator
    #      = 1.959964 * sqrt(0.016 + 0.0096036) / 1.3841459 = 0.3136164 / 1.3841459 = 0.2265777
    # -> (center - half, center + half) = (0.4901624, 0.9433178) ~ (0.4902, 0.9433)
    low, high = wilson_interval(8, 10)
    assert low == pytest.approx(0.4901624, abs=1e-6)
    assert high == pytest.approx(0.9433178, abs=1e-6)


def test_wilson_extremes():
    # p = 0: center = half = (z^2/2n) / (1 + z^2/n), so the interval is (0, z^2 / (n + z^2)) = (0, 3.841459 / 13.841459)
    upper = 3.841459 / 13.841459
    low, high = wilson_interval(0, 10)
    assert low == pytest.approx(0.0, abs=1e-12)
    assert high == pytest.approx(upper, abs=1e-6)
    # p = 1 mirrors p = 0
    low, high = wilson_interval(10, 10)
    assert low == pytest.approx(1 - upper, abs=1e-6)
    assert high == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_wider_at_higher_confidence():
    low95, high95 = wilson_interval(8, 10)
    low99, high99 = wilson_interval(8, 10, confidence=0.99)
    assert low99 < low95 and high99 > high95


def pairs(a_only: int, b_only: int, both: int = 5, neither: int = 3) -> tuple[list[bool], list[bool]]:
    a = [True] * a_only + [False] * b_only + [True] * both + [False] * neither
    b = [False] * a_only + [True] * b_only + [True] * both + [False] * neither
    return a, b


def test_mcnemar_1_vs_9():
    # 10 discordant problems; P(k <= 1) = (C(10,0) + C(10,1)) / 2^10 = 11/1024; two-sided: 22/1024
    result = mcnemar_exact(*pairs(1, 9))
    assert (result.a_only, result.b_only) == (1, 9)
    assert result.p_value == pytest.approx(2 * (1 + 10) / 1024)
    assert result.p_value == pytest.approx(0.021484375)


def test_mcnemar_symmetric():
    a, b = pairs(1, 9)
    forward, backward = mcnemar_exact(a, b), mcnemar_exact(b, a)
    assert (backward.a_only, backward.b_only) == (9, 1)
    assert backward.p_value == forward.p_value


def test_mcnemar_no_difference():
    assert mcnemar_exact(*pairs(0, 0)).p_value == 1.0
    # 3 vs 3: 2 * (1 + 6 + 15 + 20) / 64 = 84/64 > 1, clipped to 1
    assert mcnemar_exact(*pairs(3, 3)).p_value == 1.0


def test_mcnemar_length_mismatch():
    with pytest.raises(ValueError, match="a has 3, b has 2"):
        mcnemar_exact([True, False, True], [True, False])


def test_mean_std():
    # mean 5; squared deviations 9+1+1+1+0+0+4+16 = 32; sample variance 32/7
    mean, std = mean_std([2, 4, 4, 4, 5, 5, 7, 9])
    assert mean == pytest.approx(5.0)
    assert std == pytest.approx(math.sqrt(32 / 7))
    assert mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert mean_std([3.5]) == (3.5, 0.0)
    with pytest.raises(ValueError):
        mean_std([])

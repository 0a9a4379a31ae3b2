"""Statistics for comparing fine-tuning methods on a benchmark: intervals, paired tests, seed spread.

Pure Python (math only) so that reports can use it without numpy or scipy.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from statistics import NormalDist
from typing import NamedTuple


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for the accuracy `correct / n`.

    Unlike the normal (Wald) interval it keeps close to its nominal coverage at small n and near 0 or 1,
    where accuracies on short benchmarks live, and it never leaves [0, 1]. No data (n == 0) -> (0, 1).
    """
    if n == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = correct / n
    denominator = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, center - half), min(1.0, center + half)


class McNemar(NamedTuple):
    a_only: int  # problems only a got right
    b_only: int  # problems only b got right
    p_value: float


def mcnemar_exact(a: Sequence[bool], b: Sequence[bool]) -> McNemar:
    """Exact two-sided McNemar test: do two models, scored on the same problems, differ in accuracy?

    Pairing on problems removes the variance of problem difficulty that two independent intervals carry;
    only the discordant problems (one right, the other wrong) are informative, and under the null each
    goes either way with probability 1/2, so the p-value is a two-sided binomial test on them.
    """
    if len(a) != len(b):
        raise ValueError(f"mcnemar_exact needs paired results: a has {len(a)}, b has {len(b)}")
    a_only = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    b_only = sum(1 for x, y in zip(a, b, strict=True) if y and not x)
    n = a_only + b_only
    if n == 0:
        return McNemar(0, 0, 1.0)
    tail = sum(math.comb(n, k) for k in range(min(a_only, b_only) + 1)) / 2**n
    return McNemar(a_only, b_only, min(1.0, 2 * tail))


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value), e.g. of a score over seeds."""
    if len(values) == 0:
        raise ValueError("mean_std of no values")
    mean = sum(values) / len(values)
    if len(values) == 1:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))

"""95% confidence intervals for the evaluation report: a score, a gain over the base on the same rows, a verdict.

A benchmark score is the mean of per-row scores in [0, 1]. Its interval is Wilson's score interval when every row
scores 0 or 1 (a proportion; it stays inside [0, 1] and behaves at 0% and 100%), else the normal approximation.
A gain over the base is paired: both models answered the same rows, so the interval is that of the mean per-row
difference (much tighter than two separate intervals would suggest). A group gain (the mean over the group's
benchmarks) adds the benchmarks' variances. All intervals are normal-theory at z = 1.96 and in percentage points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

Z95 = 1.959964


def wilson(k: float, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a proportion k/n, in [0, 1]."""
    if n <= 0:
        return (0.0, 1.0)
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _mean_var(xs: Sequence[float]) -> tuple[float, float]:
    """Mean and the variance of the mean (sample variance / n)."""
    n = len(xs)
    mean = sum(xs) / n
    var = sum((x - mean) ** 2 for x in xs) / (n - 1) if n > 1 else 0.0
    return mean, var / n


def score_ci(scores: Sequence[float], categories: Sequence[str] | None = None) -> tuple[float, float]:
    """95% interval of the mean of per-row scores in [0, 1] (with `categories`, of the macro mean), in percent."""
    if not scores:
        return (0.0, 100.0)
    if categories is not None:
        by: dict[str, list[float]] = {}
        for c, s in zip(categories, scores, strict=True):
            by.setdefault(c, []).append(s)
        mean, var = macro_mean_var(by)
        lo, hi = max(0.0, mean - Z95 * math.sqrt(var)), min(1.0, mean + Z95 * math.sqrt(var))
    elif all(s in (0.0, 1.0) for s in scores):
        lo, hi = wilson(sum(scores), len(scores))
    else:
        mean, var = _mean_var(scores)
        lo, hi = max(0.0, mean - Z95 * math.sqrt(var)), min(1.0, mean + Z95 * math.sqrt(var))
    return (100.0 * lo, 100.0 * hi)


def paired_gain(model: Sequence[float], base: Sequence[float], categories: Sequence[str] | None = None
                ) -> tuple[float, float]:
    """(mean gain, variance of that mean) of a model over the base on the same rows, in percentage points.
    With `categories` (one per row), the gain of the macro mean over categories."""
    if len(model) != len(base) or not model:
        raise ValueError(f"paired gain needs the same rows for both models, got {len(model)} and {len(base)}")
    diffs = [100.0 * (m - b) for m, b in zip(model, base, strict=True)]
    if categories is None:
        return _mean_var(diffs)
    by: dict[str, list[float]] = {}
    for c, d in zip(categories, diffs, strict=True):
        by.setdefault(c, []).append(d)
    return macro_mean_var(by)


def macro_mean_var(by_category: dict[str, Sequence[float]]) -> tuple[float, float]:
    """Mean over categories of per-category means (MEGA-Bench's macro score), and its variance (strata add)."""
    parts = [_mean_var(xs) for xs in by_category.values() if xs]
    k = len(parts)
    return sum(m for m, _ in parts) / k, sum(v for _, v in parts) / (k * k)


def group_gain_ci(gains: Sequence[tuple[float, float]]) -> tuple[float, float, float]:
    """(gain, low, high) of the mean over benchmarks of paired gains, each given as (mean, variance of mean)."""
    k = len(gains)
    mean = sum(g for g, _ in gains) / k
    half = Z95 * math.sqrt(sum(v for _, v in gains)) / k
    return mean, mean - half, mean + half


def verdict(low: float, high: float) -> str:
    """What a 95% interval of a gain says: it excludes zero upwards, downwards, or includes it."""
    if low > 0:
        return "holds"
    if high < 0:
        return "does not hold: a loss"
    return "not shown: the interval includes zero"

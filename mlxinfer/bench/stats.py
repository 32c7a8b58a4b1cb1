"""Statistics of repeated measurements (the protocol in BENCHMARKS.md).

    summary(values)              mean, sample standard deviation (0 for one value), every sample
    paired_ratio(ours, theirs)   ours / theirs over paired repetitions, with a confidence interval

A ratio of speeds is summarised on the log scale: repetition i gives r_i = ours_i / theirs_i (the
two engines ran back to back, so machine noise that hits both cancels), the ratio is the geometric
mean of the r_i, and its interval is exp(mean(log r) ± t * sd(log r) / sqrt(n)) with Student's t
for n - 1 degrees of freedom.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence

# Two-sided 95% quantiles of Student's t, t_{0.975, df}, df = 1..30 (beyond: the normal's 1.96).
_T975 = (
    12.706,
    4.303,
    3.182,
    2.776,
    2.571,
    2.447,
    2.365,
    2.306,
    2.262,
    2.228,
    2.201,
    2.179,
    2.160,
    2.145,
    2.131,
    2.120,
    2.110,
    2.101,
    2.093,
    2.086,
    2.080,
    2.074,
    2.069,
    2.064,
    2.060,
    2.056,
    2.052,
    2.048,
    2.045,
    2.042,
)


def summary(values: Sequence[float]) -> dict:
    """{"mean", "std", "samples"}: the sample standard deviation, 0 for a single value."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("summary of no values")
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "samples": values,
    }


def t_quantile_975(df: int) -> float:
    """Student's t at 0.975 (a two-sided 95% interval) for `df` degrees of freedom."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def paired_ratio(ours: Sequence[float], theirs: Sequence[float]) -> dict:
    """{"ratio", "low", "high", "n"}: the geometric-mean ratio of paired repetitions and its 95%
    interval (low = high = ratio for a single pair)."""
    if len(ours) != len(theirs) or not ours:
        raise ValueError(f"paired_ratio needs pairs, got {len(ours)} and {len(theirs)} values")
    if any(v <= 0 for v in [*ours, *theirs]):
        raise ValueError("paired_ratio needs positive values")
    logs = [math.log(a / b) for a, b in zip(ours, theirs, strict=True)]
    mean = statistics.fmean(logs)
    if len(logs) == 1:
        return {"ratio": math.exp(mean), "low": math.exp(mean), "high": math.exp(mean), "n": 1}
    half = t_quantile_975(len(logs) - 1) * statistics.stdev(logs) / math.sqrt(len(logs))
    return {
        "ratio": math.exp(mean),
        "low": math.exp(mean - half),
        "high": math.exp(mean + half),
        "n": len(logs),
    }


MIN_REPS = 3  # fewer repetitions give intervals too wide to say anything (t(1) = 12.7)


def verdict(interval: dict | None) -> str:
    """What a ratio's 95% interval (paired_ratio's) lets one say, in words for a table:
    "higher" or "lower" when it excludes 1; otherwise why not."""
    if interval is None:
        return "no interval (unpaired repetitions)"
    if interval["n"] < MIN_REPS:
        return f"too few repetitions ({interval['n']})"
    low, high, ratio = interval["low"], interval["high"], interval["ratio"]
    if low <= 1 <= high:
        return "not significant"
    if high - low > ratio:
        return "not significant (interval wider than the ratio)"
    return "higher" if low > 1 else "lower"


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first position where two token sequences differ (None if they are the same)."""
    for i, (x, y) in enumerate(zip(a, b, strict=False)):  # lengths may differ
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))

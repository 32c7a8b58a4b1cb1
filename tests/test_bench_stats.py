"""Statistics of repeated measurements against numpy and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mlxinfer.bench.stats import first_difference, paired_ratio, summary, t_quantile_975


def test_summary_is_numpys_mean_and_sample_std():
    values = [12.5, 13.1, 11.9, 12.8, 13.4]
    s = summary(values)
    assert s["mean"] == pytest.approx(np.mean(values))
    assert s["std"] == pytest.approx(np.std(values, ddof=1))
    assert s["samples"] == values
    assert summary([7.0])["std"] == 0.0


def test_paired_ratio_is_the_geometric_mean_with_a_t_interval():
    ours, theirs = [20.0, 22.0, 21.0, 19.5], [10.0, 10.5, 10.2, 9.9]
    r = paired_ratio(ours, theirs)
    logs = np.log(np.array(ours) / np.array(theirs))
    half = 3.182 * np.std(logs, ddof=1) / math.sqrt(4)  # t_{0.975, 3}
    assert r["ratio"] == pytest.approx(math.exp(logs.mean()))
    assert (r["low"], r["high"]) == pytest.approx(
        (math.exp(logs.mean() - half), math.exp(logs.mean() + half))
    )
    assert r["low"] < r["ratio"] < r["high"] and r["n"] == 4
    same = paired_ratio([2.0, 4.0], [1.0, 2.0])  # a constant ratio: no spread
    assert same["low"] == pytest.approx(2.0) == same["high"]
    with pytest.raises(ValueError, match="pairs"):
        paired_ratio([1.0], [1.0, 2.0])


def test_t_quantiles_and_the_normal_limit():
    assert t_quantile_975(1) == 12.706 and t_quantile_975(4) == 2.776
    assert t_quantile_975(100) == 1.96


def test_first_difference_of_token_sequences():
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2


def test_a_ratio_is_called_a_difference_only_when_its_interval_says_so():
    from mlxinfer.bench.stats import verdict

    assert verdict(paired_ratio([11.0, 12.0, 11.5, 11.8], [10.0, 10.1, 9.9, 10.0])) == "higher"
    assert verdict(paired_ratio([9.0, 9.1, 8.9, 9.0], [10.0, 10.1, 9.9, 10.0])) == "lower"
    assert verdict(paired_ratio([9.0, 11.0, 10.5, 9.5], [10.0, 10.0, 10.0, 10.0])) == (
        "not significant"
    )
    # the example: 2 repetitions, B/A 2.5 with an interval of [0.00, 34076]
    assert verdict(paired_ratio([5.0, 0.01], [1.0, 1.0])) == "too few repetitions (2)"
    assert verdict(None) == "no interval (unpaired repetitions)"
    wide = {"ratio": 2.0, "low": 1.1, "high": 3.5, "n": 3}
    assert verdict(wide) == "not significant (interval wider than the ratio)"

"""mefbench.stats: the intervals and the exact test, against scipy on known data."""

import math

import numpy as np
import pytest
from scipy import stats

from mefbench.stats import fisher_exact, paired_t_interval, ratio_interval


def test_paired_t_interval_is_scipys():
    # Student's sleep data (Cushny & Peebles): extra hours of sleep with two drugs, paired by patient
    a = np.array([1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4])
    b = np.array([0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0])
    got = paired_t_interval(a - b)
    want = stats.ttest_rel(a, b).confidence_interval(0.95)
    assert got.estimate == pytest.approx(1.58) and got.n == 10
    assert (got.low, got.high) == pytest.approx((want.low, want.high), rel=1e-12)
    assert (got.low, got.high) == pytest.approx((0.7001, 2.4599), abs=1e-4)  # the textbook's interval
    assert got.excludes_zero
    ninety = paired_t_interval(a - b, 0.9)
    assert (ninety.low, ninety.high) == pytest.approx(tuple(stats.ttest_rel(a, b).confidence_interval(0.9)))


def test_paired_t_interval_edge_cases():
    assert paired_t_interval([0.3, math.nan, -0.1, 0.2]).n == 3  # non-finite left out
    one = paired_t_interval([0.5])
    assert one.estimate == 0.5 and math.isnan(one.low) and not one.excludes_zero
    assert math.isnan(paired_t_interval([]).estimate)
    same = paired_t_interval([0.2, 0.2, 0.2])
    assert (same.low, same.high) == pytest.approx((0.2, 0.2))


def test_ratio_interval_is_the_log_interval_mapped_back():
    r = [1.10, 1.05, 1.20, 0.98, 1.12]
    got = ratio_interval(r)
    want = stats.ttest_1samp(np.log(r), 0.0).confidence_interval(0.95)
    assert got.estimate == pytest.approx(math.exp(np.mean(np.log(r))))
    assert (got.low, got.high) == pytest.approx((math.exp(want.low), math.exp(want.high)))


def test_fisher_exact_is_scipys():
    assert fisher_exact(0, 5, 5, 5) == pytest.approx(stats.fisher_exact([[0, 5], [5, 0]]).pvalue)
    assert fisher_exact(0, 5, 5, 5) == pytest.approx(2 / 252)  # the two extreme tables of C(10, 5)
    assert fisher_exact(1, 5, 2, 5) == pytest.approx(1.0)
    assert fisher_exact(0, 0, 3, 5) == 1.0

"""mefbench.plateau: the stopping rule on the validation bits/dim."""

import math

import pytest

from mefbench.plateau import plateau_state


def test_the_rule_counts_epochs_since_the_last_real_improvement():
    values = [5.0, 4.0, 3.95, 3.99, 3.5, 3.49, 3.48]
    # min_improvement 0.1: 4.0 → 3.95 is no improvement, 3.5 is; 3.49 and 3.48 are not
    assert plateau_state(values[:3], 2, 0.1) == plateau_state(values[:3], 2, 0.1)
    s = plateau_state(values[:4], 2, 0.1)
    assert (s.best, s.best_epoch, s.since_best, s.stop) == (4.0, 2, 2, True)
    s = plateau_state(values, 3, 0.1)
    assert (s.best, s.best_epoch, s.since_best, s.stop) == (3.5, 5, 2, False)
    assert plateau_state(values, 2, 0.1).stop
    # without a minimum every decrease counts
    s = plateau_state(values, 1, 0.0)
    assert (s.best, s.best_epoch, s.stop) == (3.48, 7, False)


def test_non_finite_or_missing_values_never_improve():
    s = plateau_state([math.nan, None, math.inf], 3)
    assert (s.best, s.best_epoch, s.since_best, s.stop) == (math.inf, 0, 3, True)
    s = plateau_state([4.0, math.nan, 3.0], 2)
    assert (s.best_epoch, s.stop) == (3, False)
    assert plateau_state([], 1) == plateau_state([], 1) and not plateau_state([], 1).stop


def test_bad_rules_are_refused():
    with pytest.raises(ValueError, match="patience >= 1"):
        plateau_state([1.0], 0)
    with pytest.raises(ValueError, match="min_improvement >= 0"):
        plateau_state([1.0], 1, -0.1)

"""mefbench.outcomes: what happened to a run, from synthetic loss histories."""

import math
from types import SimpleNamespace

import pytest

from mefbench.outcomes import BLOW_UP, flags, run_outcome, summarise_losses
from mefbench.record import Divergence, EpochRecord


def _record(losses: list[float], valid: list[float], initial_valid: float, per_epoch: int = 4):
    """A record of a run with these per-step losses (a non-finite one ends it as a divergence)
    and these validation bits/dim after each finished epoch."""
    epochs, step = [], 0
    for e, start in enumerate(range(0, len(losses), per_epoch)):
        span = losses[start : start + per_epoch]
        bad = next((i for i, v in enumerate(span) if not math.isfinite(v)), None)
        seen = summarise_losses(span[: bad if bad is not None else len(span)], step + 1)
        if bad is not None:
            d = Divergence(epoch=e + 1, step=step + bad + 1, loss=span[bad], loss_first=seen.first,
                           loss_max=seen.max, loss_max_step=seen.max_step)  # fmt: skip
            return SimpleNamespace(epochs=epochs, diverged=d, initial_valid_bpd=initial_valid)
        step += len(span)
        epochs.append(EpochRecord(epoch=e + 1, step=step, lr=0.01, train_bpd=sum(span) / len(span), train_bpd_ema=0,
                                  test_bpd=0, test_bpd_raw=0, train_time_s=1, valid_bpd=valid[e],
                                  loss_first=seen.first, loss_max=seen.max, loss_max_step=seen.max_step))  # fmt: skip
    return SimpleNamespace(epochs=epochs, diverged=None, initial_valid_bpd=initial_valid)


def test_summarise_losses():
    s = summarise_losses([3.0, 5.0, math.nan, 4.0], 11)
    assert (s.first, s.max, s.max_step) == (3.0, 5.0, 12)
    assert math.isnan(summarise_losses([], 1).first) and summarise_losses([math.inf], 1).max_step is None


def test_a_fine_run():
    o = run_outcome(_record([8.0, 7.0, 6.0, 5.5, 5.0, 4.8, 4.6, 4.5], [5.2, 4.7], initial_valid=8.1))
    assert o.initial_loss == 8.0 and o.worst_spike == 1.0 and o.spike_step == 1
    assert (o.final_valid, o.best_valid) == (4.7, 4.7) and o.final_over_initial == pytest.approx(4.7 / 8.1)
    assert flags(o) == {"diverged": False, "blow-up": False, "worse than start": False}


def test_a_diverged_run():
    o = run_outcome(_record([8.0, 7.0, 6.0, 5.5, 5.0, 40.0, math.nan], [5.2], initial_valid=8.1))
    assert o.diverged and o.diverged_step == 7 and o.spike_step == 6 and o.worst_spike == 5.0
    assert math.isnan(o.final_valid) and o.best_valid == 5.2
    assert flags(o) == {"diverged": True, "blow-up": False, "worse than start": False}
    # diverged at its first step: nothing finite, and still a divergence
    o = run_outcome(_record([math.inf], [], initial_valid=8.1))
    assert o.diverged and o.diverged_step == 1 and math.isnan(o.initial_loss) and math.isnan(o.worst_spike)


def test_a_blow_up_that_recovers():
    o = run_outcome(_record([8.0, 7.0, 30.0, 9.0, 6.0, 5.0, 4.9, 4.8], [6.0, 5.0], initial_valid=8.1))
    assert o.worst_spike == 30.0 / 8.0 > BLOW_UP and o.spike_step == 3
    assert flags(o) == {"diverged": False, "blow-up": True, "worse than start": False}
    assert not flags(o, blow_up=4.0)["blow-up"]  # the cut is a parameter: at k = 4 it is not one


def test_a_run_that_ends_worse_than_it_started():
    o = run_outcome(_record([8.0, 7.0, 7.5, 9.0, 12.0, 11.0, 10.0, 9.5], [8.5, 9.2], initial_valid=8.1))
    assert o.final_valid == 9.2 and o.best_valid == 8.5 and o.final_over_initial > 1
    assert flags(o) == {"diverged": False, "blow-up": False, "worse than start": True}
    assert not flags(o, worse=1.2)["worse than start"]

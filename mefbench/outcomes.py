"""What happened to a run, from its record: the stability benchmark's outcomes, as pure functions.

The training loop records, per epoch, the first and the largest training loss and the step of
the largest (:func:`summarise_losses`), the validation bits/dim, and, where a run diverges,
the same summary of its last epoch; :func:`run_outcome` turns a record into

- the initial loss: the loss of step 1, the untrained model's on its first batch;
- the worst spike: the largest finite training loss over the initial loss, and its step;
- diverged: a loss (or an evaluation) became non-finite, with the step;
- the validation bits/dim before training, at the end, and the best; the final over the initial.

and :func:`flags` into the three outcomes the report counts, each apart from the others:
**diverged**; **blow-up**, a run that did not diverge but whose training loss rose above
``k`` × its initial loss (``k`` = :data:`BLOW_UP` unless given); and **worse than start**, a
run that did not diverge but ended with a validation bits/dim above ``ratio`` × the one it
started from (``ratio`` = :data:`WORSE_THAN_START` unless given). A run can blow up and end
worse than it started.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from .stats import as_float

__all__ = [
    "BLOW_UP",
    "BLOW_UP_CUTS",
    "WORSE_CUTS",
    "WORSE_THAN_START",
    "LossSummary",
    "RunOutcome",
    "flags",
    "run_outcome",
    "summarise_losses",
]

BLOW_UP = 2.0  # a blow-up: a training loss above this many times the run's initial loss
BLOW_UP_CUTS = (1.25, 1.5, 2.0, 4.0, 10.0)  # the cuts of the report's threshold-sensitivity line
WORSE_THAN_START = 1.0  # worse than start: final validation bits/dim above this times the initial
WORSE_CUTS = (0.8, 0.9, 1.0, 1.1)


@dataclass(frozen=True)
class LossSummary:
    """A span of training steps: its first loss, its largest finite loss and that step (1-based over
    the run). ``first`` is NaN when no loss of the span was finite."""

    first: float
    max: float
    max_step: int | None


def summarise_losses(losses: Sequence[float], first_step: int) -> LossSummary:
    """The summary of the losses of steps first_step, first_step + 1, …; non-finite losses are
    left out of the maximum (they are the divergence, recorded apart)."""
    finite = [(v, first_step + i) for i, v in enumerate(losses) if math.isfinite(v)]
    if not finite:
        return LossSummary(first=math.nan, max=math.nan, max_step=None)
    first = float(losses[0]) if math.isfinite(losses[0]) else math.nan
    value, step = max(finite, key=lambda p: p[0])
    return LossSummary(first=first, max=float(value), max_step=step)


@dataclass(frozen=True)
class RunOutcome:
    """One run's outcomes (NaN / None where the record does not hold them)."""

    initial_loss: float
    worst_spike: float  # largest finite training loss / initial_loss
    spike_step: int | None
    diverged: bool
    diverged_step: int | None
    initial_valid: float
    final_valid: float
    best_valid: float
    final_over_initial: float  # final_valid / initial_valid


def _num(value: object) -> float:
    return as_float(value)


def run_outcome(record) -> RunOutcome:
    """The outcomes of a :class:`~mefbench.record.RunRecord` (or anything with its ``epochs``,
    ``diverged`` and ``initial_valid_bpd``)."""
    spans = [(e.loss_first, e.loss_max, e.loss_max_step) for e in record.epochs]
    d = record.diverged
    if d is not None:
        spans.append((d.loss_first, d.loss_max, d.loss_max_step))
    initial = _num(spans[0][0]) if spans else math.nan
    worst, spike_step = math.nan, None
    for _, value, step in spans:
        if value is not None and math.isfinite(value) and not (value <= worst):
            worst, spike_step = float(value), step
    valid = [_num(e.valid_bpd) for e in record.epochs]
    finite = [v for v in valid if math.isfinite(v)]
    initial_valid = _num(getattr(record, "initial_valid_bpd", None))
    final_valid = valid[-1] if valid and d is None else math.nan
    return RunOutcome(
        initial_loss=initial,
        worst_spike=worst / initial if initial > 0 and math.isfinite(worst) else math.nan,
        spike_step=spike_step,
        diverged=d is not None,
        diverged_step=d.step if d is not None else None,
        initial_valid=initial_valid,
        final_valid=final_valid,
        best_valid=min(finite) if finite else math.nan,
        final_over_initial=final_valid / initial_valid if initial_valid > 0 else math.nan,
    )


def flags(outcome: RunOutcome, blow_up: float = BLOW_UP, worse: float = WORSE_THAN_START) -> dict[str, bool]:
    """{"diverged", "blow-up", "worse than start"}: the three outcomes, each as the module says;
    a run with none of them is fine."""
    if outcome.diverged:
        return {"diverged": True, "blow-up": False, "worse than start": False}
    return {
        "diverged": False,
        "blow-up": bool(outcome.worst_spike > blow_up),
        "worse than start": bool(outcome.final_over_initial > worse),
    }

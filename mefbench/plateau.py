"""Training to a plateau: the stopping rule on the validation bits/dim, as a pure function.

The rule (``TrainConfig.patience`` and ``min_improvement``): an epoch improves when its
validation bits/dim is below the best so far by at least ``min_improvement``; the run stops
after the first epoch that ends ``patience`` epochs in a row without an improvement. A
non-finite value never improves. The state is a function of the recorded validation values
alone, so a resumed run, whose record holds the same values, stops where an uninterrupted one
stops.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["PlateauState", "plateau_state"]


@dataclass(frozen=True)
class PlateauState:
    """Where the rule stands after the given epochs.

    best: the best validation bits/dim so far (an improvement's value; inf before any).
    best_epoch: the 1-based epoch of that value (0 before any).
    since_best: epochs since best_epoch (all of them when there is none).
    stop: whether the run has reached the plateau (since_best >= patience).
    """

    best: float
    best_epoch: int
    since_best: int
    stop: bool


def plateau_state(values: Sequence[float | None], patience: int, min_improvement: float = 0.0) -> PlateauState:
    """The plateau rule applied to the validation bits/dim of epochs 1..len(values)."""
    if patience < 1 or min_improvement < 0:
        raise ValueError(
            f"plateau_state needs patience >= 1 and min_improvement >= 0, got {patience}, {min_improvement}"
        )
    best, best_epoch = math.inf, 0
    for epoch, value in enumerate(values, 1):
        if value is not None and math.isfinite(value) and value < best - min_improvement:
            best, best_epoch = float(value), epoch
    since = len(values) - best_epoch
    return PlateauState(best=best, best_epoch=best_epoch, since_best=since, stop=since >= patience)

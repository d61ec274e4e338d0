"""Paired comparisons of a table's rows over seeds, and the sentences that say what they show.

Runs of one seed are paired across the rows of a table: they see the same images in the same
order, with the same flips and noise (:func:`mefbench.training.batch_order`), and are evaluated
on the same images. So a row is compared with another through the differences of their seeds'
numbers: the mean difference with its 95% Student-t interval (:func:`mefbench.stats.paired_t_interval`,
seeds where both rows finished). Two rows whose interval includes 0 are not distinguishable at
this scale. A row's rank range runs from 1 + the rows measurably better than it to n − the rows
measurably worse, so rows that no interval separates share ranks. The intervals are per pair,
not adjusted for the number of pairs.

Time ratios pair seeds the same way: per seed, the ratio of the runs' median epoch times, and
the geometric mean of the ratios with the t interval of their logs.

Everything here is pure: frames in, numbers and strings out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..stats import Interval, paired_t_interval, ratio_interval
from .aggregate import finished
from .format import DASH

__all__ = [
    "Row",
    "compare_rows",
    "convergence",
    "convergence_sentence",
    "difference_text",
    "paired",
    "rank_text",
    "ratio_text",
    "time_ratio",
    "what_this_shows",
]

VALUE = "final_bpd"  # the run's test bits/dim: the trained EMA model's final evaluation (see results.load_runs)


def _values(runs: pd.DataFrame, value: str = VALUE) -> dict[int, float]:
    """seed -> value of the finished runs (a finite value only)."""
    fin = runs[finished(runs)]
    out = {}
    for seed, v in zip(fin["seed"], pd.to_numeric(fin[value], errors="coerce"), strict=True):
        if np.isfinite(v):
            out[int(seed)] = float(v)
    return out


def paired(a: pd.DataFrame, b: pd.DataFrame, value: str = VALUE) -> Interval:
    """a − b over the seeds both finished: mean difference with its 95% t interval."""
    va, vb = _values(a, value), _values(b, value)
    return paired_t_interval([va[s] - vb[s] for s in sorted(set(va) & set(vb))])


@dataclass(frozen=True)
class Row:
    """One row of a comparison: its label, its seeds' values, the paired difference to the
    reference row (None for the reference) and its rank range among the rows."""

    label: str
    values: dict[int, float]
    diff: Interval | None
    rank: tuple[int, int]

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return float(np.mean(list(self.values.values()))) if self.values else math.nan


def compare_rows(cells: Sequence[tuple[str, pd.DataFrame]], reference: str | None, value: str = VALUE) -> list[Row]:
    """The rows (label, runs) compared: each with the reference row (lower is better) and with every
    other row, for the rank ranges. ``reference`` is a label of cells (None: no difference column)."""
    values = {label: _values(runs, value) for label, runs in cells}

    def diff(a: str, b: str) -> Interval:
        common = sorted(set(values[a]) & set(values[b]))
        return paired_t_interval([values[a][s] - values[b][s] for s in common])

    labels = [label for label, _ in cells]
    out = []
    for label in labels:
        others = [o for o in labels if o != label and values[o] and values[label]]
        better = sum(1 for o in others if diff(o, label).high < 0)  # o measurably lower (better)
        worse = sum(1 for o in others if diff(o, label).low > 0)
        ranked = [o for o in labels if values[o]]
        rank = (1 + better, len(ranked) - worse) if values[label] else (0, 0)
        d = None if label == reference or reference is None or reference not in values else diff(label, reference)
        out.append(Row(label, values[label], d, rank))
    return out


def rank_text(rank: tuple[int, int]) -> str:
    low, high = rank
    if low == 0:
        return DASH
    return f"{low}" if low == high else f"{low}–{high}"


def difference_text(i: Interval | None, digits: int = 3) -> str:
    """'+0.031 [−0.010, +0.072]' (n < 2: the mean alone), or 'reference'."""
    if i is None:
        return "reference"
    if not np.isfinite(i.estimate):
        return DASH
    text = f"{i.estimate:+.{digits}f}"
    if np.isfinite(i.low):
        text += f" [{i.low:+.{digits}f}, {i.high:+.{digits}f}]"
    return text


def time_ratio(a: pd.DataFrame, b: pd.DataFrame) -> Interval:
    """a's epoch time over b's, paired by seed (runs with a finished epoch): geometric mean of the
    per-seed ratios of median epoch times, with the t interval of their logs."""

    def times(df: pd.DataFrame) -> dict[int, float]:
        timed = df[df["epochs_done"] > 0]
        col = "median_epoch_time_s" if "median_epoch_time_s" in timed else "mean_epoch_time_s"
        return {int(s): float(t) for s, t in zip(timed["seed"], timed[col], strict=True) if np.isfinite(t) and t > 0}

    ta, tb = times(a), times(b)
    return ratio_interval([ta[s] / tb[s] for s in sorted(set(ta) & set(tb))])


def ratio_text(i: Interval) -> str:
    if not np.isfinite(i.estimate):
        return DASH
    return f"{i.estimate:.2f}" + (f" [{i.low:.2f}, {i.high:.2f}]" if np.isfinite(i.low) else "")


def convergence(runs: pd.DataFrame) -> str:
    """How the finished runs of a cell stopped: 'plateau 4/5 (steps 450–600); cap 1/5 (600)'."""
    fin = runs[finished(runs)]
    if fin.empty:
        return DASH
    parts = []
    for reason, what in (("plateau", "plateau"), ("cap", "cap"), ("length", "fixed length")):
        sub = pd.to_numeric(fin.loc[fin["stop_reason"] == reason, "stop_step"], errors="coerce").dropna()
        if len(sub):
            steps = f"{int(sub.min())}" if sub.min() == sub.max() else f"{int(sub.min())}–{int(sub.max())}"
            parts.append(f"{what} {len(sub)}/{len(fin)} (steps {steps})")
    unknown = int(fin["stop_reason"].isna().sum())
    if unknown:
        parts.append(f"not recorded {unknown}/{len(fin)}")
    return "; ".join(parts)


def convergence_sentence(runs: pd.DataFrame) -> str:
    fin = runs[finished(runs)]
    reasons = fin["stop_reason"].value_counts()
    plateau, cap = int(reasons.get("plateau", 0)), int(reasons.get("cap", 0))
    if not plateau and not cap:
        return ""
    text = f"{plateau} of {len(fin)} finished runs stopped at their validation plateau"
    if cap:
        text += f" and {cap} at the step cap, still improving (their numbers are not converged ones)"
    return text + "."


def what_this_shows(rows: Sequence[Row], reference: str, what: str = "test bits/dim") -> str:
    """One sentence generated from the paired intervals: which rows are measurably better or worse
    than the reference row, and which are not distinguishable from it at this scale."""
    head = "**What this shows:**"
    ref = next((r for r in rows if r.label == reference), None)
    if ref is None or ref.n == 0:
        return f"{head} nothing yet: the reference row ({reference}) has no finished run."
    better, worse, same, alone = [], [], [], []
    for r in rows:
        if r.label == reference:
            continue
        if r.diff is None or r.diff.n < 2 or not np.isfinite(r.diff.low):
            alone.append(r.label)
        elif r.diff.high < 0:
            better.append(f"{r.label} ({difference_text(r.diff)})")
        elif r.diff.low > 0:
            worse.append(f"{r.label} ({difference_text(r.diff)})")
        else:
            same.append(f"{r.label} ({difference_text(r.diff)})")
    seeds = sorted({r.diff.n for r in rows if r.diff is not None and r.diff.n})
    n = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}" if seeds else "no"
    parts = []
    if better:
        parts.append(f"measurably lower (better) than {reference}: {_join(better)}")
    if worse:
        parts.append(f"measurably higher (worse) than {reference}: {_join(worse)}")
    if same:
        parts.append(f"not distinguishable from {reference} at this scale: {_join(same)}")
    text = f"{head} differences in {what} to {reference}, paired over {n} seeds with 95% t intervals. "
    text += "; ".join(p[0].upper() + p[1:] for p in parts) + "." if parts else "No other row has an interval."
    if alone:
        text += f" {_join(alone)}: fewer than 2 paired seeds, no interval."
    best = [r.label for r in rows if r.rank == (1, 1)]
    top = [r.label for r in rows if r.rank[0] == 1 and r.n]
    if best:
        text += f" {best[0]} is measurably best: lower than every other row."
    elif len(top) > 1:
        text += f" No row is measurably best: {_join(top)} share rank 1."
    return text


def _join(items: Sequence[str]) -> str:
    items = list(items)
    if len(items) <= 2:
        return " and ".join(items)
    return ", ".join(items[:-1]) + " and " + items[-1]

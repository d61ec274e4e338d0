"""The stability tables: outcomes per coupling × learning rate, their sensitivity to the cuts, and
the per-rate claim sentences, as pure functions of the run frame.

A run's outcomes come from :func:`mefbench.outcomes.run_outcome` (columns of
:func:`mefbench.results.load_runs`): **diverged** (a non-finite loss or evaluation), **blow-up**
(not diverged, but a training loss above k × the run's initial loss) and **worse than start**
(not diverged, and a final validation bits/dim above the one before training). Rates are over
the runs that finished or diverged, per learning rate (never pooled over rates), with Wilson 95%
intervals; two rates are compared with Fisher's exact test, two sets of final bits/dim with the
paired t interval of :mod:`.compare`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, cast

import numpy as np
import pandas as pd

from ..outcomes import BLOW_UP, BLOW_UP_CUTS, WORSE_CUTS, WORSE_THAN_START
from ..presets import variant_label
from ..stats import fisher_exact, paired_t_interval, wilson_interval
from .aggregate import _layer_cells, counts
from .compare import convergence, difference_text
from .format import DASH, params

__all__ = [
    "OUTCOMES",
    "claims",
    "display",
    "flag_frame",
    "outcome_rows",
    "proxy_limits",
    "sensitivity",
]

OUTCOMES = ("diverged", "blow-up", "worse than start")


def flag_frame(df: pd.DataFrame, blow_up: float = BLOW_UP, worse: float = WORSE_THAN_START) -> pd.DataFrame:
    """The decided runs (finished or diverged) of df with a boolean column per outcome."""
    decided = df[df["status"].isin(["finished", "diverged"])]
    diverged = decided["status"] == "diverged"
    spike = pd.to_numeric(decided["worst_spike"], errors="coerce")
    ratio = pd.to_numeric(decided["final_over_initial"], errors="coerce")
    return decided.assign(
        **{
            "diverged": diverged,
            "blow-up": ~diverged & (spike > blow_up),
            "worse than start": ~diverged & (ratio > worse),
        }
    )


def _rate(k: int, n: int) -> dict:
    low, high = wilson_interval(k, n) if n else (math.nan, math.nan)
    return {"k": k, "n": n, "low": low, "high": high}


def _spread(values: pd.Series, fmt: str = "{:.3f}") -> str:
    v = pd.to_numeric(values, errors="coerce")
    v = v[np.isfinite(v)]
    if v.empty:
        return DASH
    f = lambda x: fmt.format(x) if abs(x) < 1e4 else f"{x:.2e}"  # noqa: E731
    return f(v.median()) if len(v) == 1 else f"{f(v.median())} [{f(v.min())}, {f(v.max())}]"


def outcome_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Per (coupling, variant, lr): counts, parameters, the three outcome rates (k, n, Wilson
    interval), the steps of divergence and of the worst spike, and the continuous outcomes."""
    rows = []
    for (coupling, variant, lr), cell in _layer_cells(df, "coupling", ["lr"]):
        flags = flag_frame(cell)
        tally = {k: v for k, v in counts(cell).items() if k != "diverged"}  # the diverged rate says it
        row = {"coupling": coupling, "variant": variant, "lr": lr, **tally,
               "params": ", ".join(params(p) for p in sorted(cell["num_params"].dropna().unique())),
               "stopped": convergence(cell) if "stop_reason" in cell else DASH}  # fmt: skip
        for outcome in OUTCOMES:
            row[outcome] = _rate(int(flags[outcome].sum()), len(flags))
        steps = pd.to_numeric(cell.loc[cell["status"] == "diverged", "diverged_step"], errors="coerce").dropna()
        row["diverged at step"] = ", ".join(str(int(s)) for s in sorted(steps)) or DASH
        row["initial loss"] = _spread(cell["initial_loss"])
        spikes = pd.to_numeric(flags["worst_spike"], errors="coerce")
        worst = flags.loc[cast(Any, spikes.idxmax())] if spikes.notna().any() else None
        row["worst spike (× initial loss)"] = _spread(spikes, "{:.2f}")
        row["largest spike at step"] = f"{int(worst['spike_step'])}" if worst is not None and np.isfinite(
            worst["spike_step"]) else DASH  # fmt: skip
        row["final validation bits/dim"] = _spread(cell["final_valid_bpd"])
        row["best validation bits/dim"] = _spread(cell["best_valid_bpd"])
        row["final / initial"] = _spread(cell["final_over_initial"], "{:.3f}")
        rows.append(row)
    return pd.DataFrame(rows)


def display(rows: pd.DataFrame) -> pd.DataFrame:
    """The rows as the report prints them: 'k/n [low–high]' per outcome."""
    if rows.empty:
        return rows

    def rate(r: dict) -> str:
        if not r["n"]:
            return DASH
        return f"{r['k']}/{r['n']} [{r['low']:.2f}–{r['high']:.2f}]"

    out = rows.assign(lr=rows["lr"].map(lambda v: f"{v:g}"), **{o: rows[o].map(rate) for o in OUTCOMES})
    return out.rename(columns={o: f"{o} (95% CI)" for o in OUTCOMES})


def sensitivity(df: pd.DataFrame) -> list[str]:
    """How the outcome counts move with the cuts: per lr, the blow-up count at each k of
    BLOW_UP_CUTS and the worse-than-start count at each ratio of WORSE_CUTS (all couplings)."""
    decided = df[df["status"].isin(["finished", "diverged"])]
    if decided.empty:
        return []
    lrs = sorted(decided["lr"].unique())
    lines = []
    for name, cuts, current, column in (
        ("blow-up (loss > k × initial loss)", BLOW_UP_CUTS, BLOW_UP, "blow-up"),
        (
            "worse than start (final / initial validation bits/dim > r)",
            WORSE_CUTS,
            WORSE_THAN_START,
            "worse than start",
        ),
    ):
        parts = []
        for cut in cuts:
            kw = {"blow_up": cut} if column == "blow-up" else {"worse": cut}
            flags = flag_frame(decided, **kw)
            per = ", ".join(f"lr {lr:g}: {int(flags.loc[flags['lr'] == lr, column].sum())}" for lr in lrs)
            mark = " (the cut used)" if cut == current else ""
            parts.append(f"{'k' if column == 'blow-up' else 'r'} = {cut:g}{mark}: {per}")
        lines.append(f"- **Sensitivity of {name}**, the runs it counts at each lr ({len(decided)} decided runs in all): "
                     + "; ".join(parts) + ".")  # fmt: skip
    return lines


def _label(coupling: str, variant: str) -> str:
    return variant_label(coupling, variant)


def claims(
    df: pd.DataFrame,
    ours: tuple[str, str] = ("matexp", "default"),
    bounded_affine: tuple[str, str] = ("affine", "tanh"),
    unbounded: Sequence[tuple[str, str]] = (("affine", "exp"),),
    paper_lr: float = 0.01,
) -> list[str]:
    """Per learning rate, one sentence generated from the numbers: which couplings diverged or
    blew up (and when), whether the matrix-exp coupling and the bounded affine one are
    distinguishable (Fisher's exact test on their failure counts, failure = diverged or blew
    up; the paired t interval of their final validation bits/dim), and the contrast of the
    unbounded exp-scale coupling with the bounded ones."""
    decided = flag_frame(df)
    if decided.empty:
        return ["**What this shows:** nothing yet: no run has finished or diverged."]
    decided = decided.assign(failed=decided["diverged"] | decided["blow-up"])
    key = list(zip(decided["coupling"], decided["variant"], strict=True))
    decided = decided.assign(_key=key)
    out = []
    for lr in sorted(decided["lr"].unique()):
        at = decided[decided["lr"] == lr]
        tag = " (the paper's rate)" if math.isclose(lr, paper_lr) else ""
        events = []
        for (coupling, variant), g in at.groupby(["coupling", "variant"], sort=False):
            d, b = int(g["diverged"].sum()), int(g["blow-up"].sum())
            if d:
                steps = ", ".join(str(int(s)) for s in sorted(g.loc[g["diverged"], "diverged_step"].dropna()))
                events.append(f"{_label(coupling, variant)} diverged in {d}/{len(g)} (at step {steps})")
            if b:
                events.append(f"{_label(coupling, variant)} blew up in {b}/{len(g)}")
        text = f"**lr {lr:g}{tag}:** " + ("; ".join(events) if events else "no run diverged or blew up") + "."
        mine, theirs = at[at["_key"] == ours], at[at["_key"] == bounded_affine]
        if len(mine) and len(theirs):
            k1, n1, k2, n2 = int(mine["failed"].sum()), len(mine), int(theirs["failed"].sum()), len(theirs)
            p = fisher_exact(k1, n1, k2, n2)
            name_a, name_b = _label(*ours), _label(*bounded_affine)
            text += f" {name_a} vs {name_b}: failed {k1}/{n1} vs {k2}/{n2} (Fisher's exact p = {p:.2f}"
            text += ", distinguishable at the 5% level)" if p < 0.05 else ", not distinguishable)"
            va = dict(zip(mine["seed"], pd.to_numeric(mine["final_valid_bpd"], errors="coerce"), strict=True))
            vb = dict(zip(theirs["seed"], pd.to_numeric(theirs["final_valid_bpd"], errors="coerce"), strict=True))
            diff = paired_t_interval([va[s] - vb[s] for s in sorted(set(va) & set(vb))])
            if diff.n >= 2 and np.isfinite(diff.low):
                verdict = (
                    f"{name_a} measurably lower" if diff.high < 0 else f"{name_a} measurably higher" if diff.low > 0
                    else "not distinguishable"
                )  # fmt: skip
                text += (f"; final validation bits/dim {name_a} − {name_b} = {difference_text(diff)} (paired t, "
                         f"{diff.n} seeds): {verdict}.")  # fmt: skip
            else:
                text += "; too few paired seeds for an interval on their final validation bits/dim."
        else:
            text += f" ({_label(*ours)} or {_label(*bounded_affine)} has no run at this rate.)"
        loose = at[at["_key"].isin(list(unbounded))]
        tight = at[~at["_key"].isin(list(unbounded))]
        if len(loose) and len(tight):
            k1, n1, k2, n2 = int(loose["failed"].sum()), len(loose), int(tight["failed"].sum()), len(tight)
            p = fisher_exact(k1, n1, k2, n2)
            names = " and ".join(_label(*u) for u in unbounded)
            text += (f" Unbounded scale ({names}) vs every bounded coupling: failed {k1}/{n1} vs {k2}/{n2} "
                     f"(Fisher's exact p = {p:.2g}).")  # fmt: skip
        out.append(text)
    return out


def proxy_limits(df: pd.DataFrame, paper_params: int, paper_steps: int) -> str:
    """What the proxy cannot show, with its own sizes from the records."""
    n = pd.to_numeric(df["num_params"], errors="coerce").dropna()
    steps = pd.to_numeric(df.loc[df["status"] == "finished", "steps_done"], errors="coerce").dropna()
    size = f"{int(n.min()):,}–{int(n.max()):,}" if len(n) else "?"
    length = f"{int(steps.max()):,}" if len(steps) else "?"
    return (
        f"**What the proxy scale cannot show:** these models have {size} parameters and train {length} steps on "
        f"16×16 tiles of a few photographs; the paper's claim is about {paper_params / 1e6:.1f}M-parameter models "
        f"trained ~{paper_steps:,} steps on CIFAR-10. Instabilities that need depth, width or a long horizon to "
        "build up, and the final bits/dim the paper compares, are beyond this benchmark; what it can show is "
        "whether a coupling fails early and how often, under the same recipe, matched parameter counts and paired "
        "seeds."
    )

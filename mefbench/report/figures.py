"""The report's figures, drawn with seaborn/matplotlib from the aggregated frames; each returns the
markdown lines that show it (nothing when there is nothing to draw)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..presets import variant_label
from .aggregate import finished
from .format import slug

__all__ = [
    "FigureContext",
    "curves",
    "epoch_time_bars",
    "loss_curves",
    "lr_errorbars",
    "m_per_run",
    "outcomes_vs_lr",
    "quality_vs_time",
    "scaling_curves",
]


@dataclass
class FigureContext:
    """What a figure of one table and one data group draws from."""

    table: str  # the table id
    title: str  # e.g. "Table 4" or "every mixing layer"
    runs: pd.DataFrame  # the table's runs of this group, with one column per cell key
    epochs: pd.DataFrame  # their epochs
    group: str
    figdir: Path
    cell_keys: tuple[str, ...]

    def name(self, what: str) -> str:
        table = f"table{self.table}" if self.table.isdigit() else slug(self.table)
        return f"{table}_{what}_{slug(self.group)}.png"

    def cell_label(self, row: pd.Series) -> str:
        return (
            ", ".join(f"{row[k]:g}" if isinstance(row[k], float) else str(row[k]) for k in self.cell_keys) or self.group
        )


def _figure(width: float = 6.4, height: float = 4.0) -> tuple[Figure, Axes]:
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def _save(fig: Figure, ctx: FigureContext, what: str) -> str:
    name = ctx.name(what)
    fig.savefig(ctx.figdir / name, dpi=110)
    return f"figures/{name}"


def curves(ctx: FigureContext) -> list[str]:
    """Test bits/dim (EMA) against epoch, hue = the table cell, mean ± sd over seeds."""
    import seaborn as sns

    ep = ctx.epochs[np.isfinite(pd.to_numeric(ctx.epochs["test_bpd"], errors="coerce"))]
    if ep.empty:
        return []
    labels = {r["run"]: ctx.cell_label(r) for _, r in ctx.runs.iterrows()}
    ep = ep.assign(cell=ep["run"].map(labels))
    fig, ax = _figure()
    sns.lineplot(data=ep, x="step", y="test_bpd", hue="cell", errorbar="sd", marker="o", ax=ax)
    ax.set(xlabel="training step", ylabel="test bits/dim (EMA weights)",
           title=f"{ctx.title}: training curves ({ctx.group})")  # fmt: skip
    path = _save(fig, ctx, "curves")
    return [f"![{ctx.title} training curves, {ctx.group}]({path})", "",
            "*Test bits/dim (EMA weights, on the fixed subset of the test split each evaluation uses) after each "
            "evaluation period; line = mean over the seeds still running, band = ± sd. A line ends where its runs "
            "reached their plateau or cap.*", ""]  # fmt: skip


def lr_errorbars(ctx: FigureContext) -> list[str]:
    """Table 4: bits/dim against learning rate per coupling."""
    fin = ctx.runs[finished(ctx.runs)]
    if fin.empty:
        return []
    agg = fin.groupby(["coupling", "lr"])["final_bpd"].agg(["mean", "std"]).reset_index()
    fig, ax = _figure()
    for coupling in list(dict.fromkeys(ctx.runs["coupling"])):
        a = agg[agg["coupling"] == coupling].sort_values("lr")
        if len(a):
            ax.errorbar(a["lr"], a["mean"], yerr=a["std"].fillna(0.0), marker="o", capsize=4, label=coupling)
    ax.set_xscale("log")
    ax.set(
        xlabel="learning rate", ylabel="test bits/dim (EMA weights)", title=f"{ctx.title}: bits/dim vs lr ({ctx.group})"
    )
    ax.legend(title="coupling")
    path = _save(fig, ctx, "bpd_vs_lr")
    return [f"![bits/dim vs learning rate, {ctx.group}]({path})", "",
            "*Mean ± sample std over the finished seeds; diverged runs are not plotted.*", ""]  # fmt: skip


def epoch_time_bars(ctx: FigureContext) -> list[str]:
    """Training time per epoch per cell."""
    import seaborn as sns

    timed = ctx.runs[ctx.runs["epochs_done"] > 0]
    if timed.empty:
        return []
    timed = timed.assign(cell=[ctx.cell_label(r) for _, r in timed.iterrows()])
    fig, ax = _figure(max(6.4, 0.9 * timed["cell"].nunique() + 2), 4.0)
    sns.barplot(data=timed, x="cell", y="median_epoch_time_s", order=list(dict.fromkeys(timed["cell"])),
                errorbar="sd", capsize=0.2, ax=ax)  # fmt: skip
    ax.set(xlabel="", ylabel="training time per epoch (s)", title=f"{ctx.title}: time per epoch ({ctx.group})")
    ax.tick_params(axis="x", rotation=30)
    path = _save(fig, ctx, "epoch_time")
    return [f"![time per epoch, {ctx.group}]({path})", "", "*Mean ± sample std over runs.*", ""]


def m_per_run(ctx: FigureContext) -> list[str]:
    """Table 6: the series length m per run (mean ± std, max, min)."""
    df = ctx.runs[ctx.runs["m_count"] > 0]
    if df.empty:
        return []
    fig, ax = _figure(max(4.0, 0.8 * len(df) + 2), 4.0)
    x = np.arange(len(df))
    ax.bar(x, df["m_mean"], yerr=df["m_std"], capsize=4, color="tab:blue", alpha=0.7, label="mean ± std")
    ax.scatter(x, df["m_max"], marker="v", color="tab:red", zorder=3, label="max")
    ax.scatter(x, df["m_min"], marker="^", color="tab:green", zorder=3, label="min")
    ax.set_xticks(x, [f"{r} ({s})" for r, s in zip(df["run"], df["status"], strict=True)], rotation=30, ha="right")
    ax.set(ylabel="series length m", title=f"{ctx.title}: m per run ({ctx.group})")
    ax.legend()
    path = _save(fig, ctx, "m")
    return [f"![series length m per run, {ctx.group}]({path})", ""]


def quality_vs_time(ctx: FigureContext) -> list[str]:
    """Every mixing layer: test bits/dim against training time per epoch, one point per run."""
    import seaborn as sns

    fin = ctx.runs[finished(ctx.runs)]
    if fin.empty:
        return []
    fin = fin.assign(layer=[ctx.cell_label(r) for _, r in fin.iterrows()])
    fig, ax = _figure(7.0, 4.5)
    sns.scatterplot(data=fin, x="median_epoch_time_s", y="final_bpd", hue="layer", style="layer", s=60, ax=ax)
    ax.set(xlabel="training time per epoch (s)", ylabel="test bits/dim (EMA weights)",
           title=f"{ctx.title}: quality vs cost ({ctx.group})")  # fmt: skip
    ax.legend(fontsize="small", ncol=2)
    path = _save(fig, ctx, "bpd_vs_time")
    return [f"![bits/dim vs time per epoch, {ctx.group}]({path})", "",
            "*One point per finished run; lower left is better.*", ""]  # fmt: skip


def outcomes_vs_lr(ctx: FigureContext) -> list[str]:
    """Stability: per coupling, the rate of each outcome (diverged, blow-up, worse than start)
    against the learning rate, with Wilson 95% intervals."""
    from .stability import OUTCOMES, outcome_rows

    rows = outcome_rows(ctx.runs)
    rows = rows[rows["diverged"].map(lambda o: o["n"]) > 0] if len(rows) else rows
    if rows.empty:
        return []
    fig = Figure(figsize=(14.0, 4.5), layout="constrained")
    axes = fig.subplots(1, len(OUTCOMES), sharey=True)
    labels = [variant_label(c, v) for c, v in zip(rows["coupling"], rows["variant"], strict=True)]
    rows = rows.assign(label=labels)
    names = list(dict.fromkeys(labels))
    for ax, outcome in zip(axes, OUTCOMES, strict=True):
        for i, label in enumerate(names):
            r = rows[rows["label"] == label].sort_values("lr")
            rate = np.array([o["k"] / o["n"] for o in r[outcome]])
            err = np.vstack([rate - np.array([o["low"] for o in r[outcome]]),
                             np.array([o["high"] for o in r[outcome]]) - rate])  # fmt: skip
            jitter = 1 + 0.04 * (i - len(names) / 2)  # keep the points of one rate apart
            ax.errorbar(r["lr"] * jitter, rate, yerr=err, marker="o", capsize=3, label=label)
        ax.set_xscale("log")
        ax.set_ylim(-0.05, 1.05)
        ax.set(xlabel="learning rate", ylabel="fraction of runs", title=outcome)
    axes[0].set_title(f"diverged ({ctx.title}, {ctx.group})")
    axes[-1].legend(fontsize="small")
    path = _save(fig, ctx, "outcomes_vs_lr")
    return [f"![outcome rates vs learning rate, {ctx.group}]({path})", "",
            "*Per coupling, the fraction of runs that diverged, blew up or ended worse than they started, with Wilson "
            "95% intervals; the points of one rate are spread sideways.*", ""]  # fmt: skip


def loss_curves(ctx: FigureContext, rates: tuple[float, float] = (0.01, 0.03)) -> list[str]:
    """Stability: training-loss curves at the paper's lr 0.01 and the next rate up: per evaluation
    period, the largest training loss (spikes) of every run, coloured by coupling."""
    import seaborn as sns

    ep = ctx.epochs[ctx.epochs["lr"].isin(rates)]
    ep = ep[np.isfinite(pd.to_numeric(ep["loss_max"], errors="coerce"))]
    if ep.empty:
        return []
    labels = {r["run"]: variant_label(r["coupling"], r["variant"]) for _, r in ctx.runs.iterrows()}
    ep = ep.assign(coupling=ep["run"].map(labels))
    fig = Figure(figsize=(12.0, 4.5), layout="constrained")
    axes = fig.subplots(1, len(rates), sharey=True)
    for ax, lr in zip(axes, rates, strict=True):
        sub = ep[ep["lr"] == lr]
        if len(sub):
            sns.lineplot(data=sub, x="step", y="loss_max", hue="coupling", units="run", estimator=None, lw=0.8,
                         alpha=0.7, ax=ax, legend=True)  # fmt: skip
            dead = ctx.runs[(ctx.runs["lr"] == lr) & (ctx.runs["status"] == "diverged")]
            for _, r in dead.iterrows():
                ax.axvline(r["diverged_step"], color="black", lw=0.6, ls=":")
        else:
            ax.text(0.5, 0.5, "no runs at this rate", ha="center", va="center", transform=ax.transAxes)
        ax.set_yscale("log")
        ax.set(xlabel="training step", ylabel="largest training loss of the period (bits/dim)", title=f"lr {lr:g}")
    path = _save(fig, ctx, "loss_curves")
    return [f"![training-loss curves at lr {rates[0]:g} and {rates[1]:g}, {ctx.group}]({path})", "",
            "*The largest training loss of each evaluation period, one line per run (seeds of a coupling share its "
            "colour); dotted lines: where a run diverged.*", ""]  # fmt: skip


def scaling_curves(points: pd.DataFrame, figdir: Path) -> list[str]:
    """The scaling part's measured times, log-log: time against n = H·W, one line per C, a panel per
    layer; one figure per timed call (forward+backward, inverse)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    measured = points[points["time_s"].notna()] if len(points) else points
    out = []
    for part in dict.fromkeys(measured["part"]) if len(measured) else ():
        df = measured[measured["part"] == part].assign(
            panel=lambda d: d["kind"] + " " + d["layer"], time_ms=lambda d: 1e3 * d["time_s"]
        )
        grid = sns.relplot(data=df, x="n", y="time_ms", hue="C", col="panel", col_wrap=4, kind="line", marker="o",
                           palette="viridis", height=2.2, aspect=1.2, facet_kws={"sharey": False})  # fmt: skip
        grid.set(xscale="log", yscale="log")
        grid.set_axis_labels("n = H·W (pixels)", "time (ms)")
        grid.set_titles("{col_name}")
        grid.figure.suptitle(f"scaling: {part} time against pixels, one line per channel count C", y=1.02)
        name = f"scaling_{slug(part)}.png"
        grid.figure.savefig(figdir / name, dpi=100, bbox_inches="tight")
        plt.close(grid.figure)
        out += [f"![scaling of {part} time](figures/{name})", ""]
    if out:
        out += ["*Time per call (the fastest of a few) at each measured point, log-log; a missing point was not measured "
                "(beyond a cap). Slope against n is the exponent in n; the spacing of the lines, in C.*", ""]  # fmt: skip
    return out

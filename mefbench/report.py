"""The comparison report: ``README.md`` and PNG figures from run records (DESIGN.md §4).

``write_report(runs_dir, out_dir)`` reads every run under runs_dir (:mod:`mefbench.results`),
aggregates them per paper table and writes ``out_dir/README.md`` and ``out_dir/figures/*.png``.
Every number in the report comes from the records, except Table 3's paper-scale parameter
counts (computed from the models) and the published values, which live only in
``mefbench/published.json`` with their source.
"""

from __future__ import annotations

import datetime as _dt
import functools
import importlib
import json
import math
import platform
import re
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from . import __version__
from .images import save_grid
from .models import MultiScaleFlow, count_parameters
from .presets import PRESETS
from .results import epochs_frame, runs_frame, scan_records
from .training import CHECKPOINT, RunError, load_model, pool_stats

__all__ = [
    "PAPER_COUNT_PRESETS",
    "SAMPLE_TEMPERATURES",
    "load_published",
    "markdown_table",
    "paper_parameter_counts",
    "write_report",
]

SAMPLE_TEMPERATURES = (0.5, 0.7, 1.0)

# (row label, preset) of the paper-scale models whose parameters Table 3 counts
PAPER_COUNT_PRESETS: tuple[tuple[str, str], ...] = (
    ("MEF", "paper-t2-mef-cifar10"),
    ("MEF with affine coupling (hidden 132; Table 4)", "paper-t4-affine-lr0.01"),
    ("MEF with standard 1×1 conv (Table 5)", "paper-t5-standard"),
    ("MEF with PLU 1×1 conv (Table 5)", "paper-t5-plu"),
)

_CONV_ORDER = ("standard", "plu", "matexp")
_COUPLING_ORDER = ("additive", "affine", "matexp")
_DASH = "–"


# ----------------------------------------------------------------------------- small pieces


def load_published() -> dict:
    """The published numbers (``mefbench/published.json``) with their source."""
    return json.loads(resources.files("mefbench").joinpath("published.json").read_text())


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub markdown table of df (no index); numeric columns right-aligned, NaN as '–'."""
    if df.empty and not len(df.columns):
        return ""

    def cell(value: object) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return _DASH
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in df.columns) + " |"
    align = "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(df[c]) else "---" for c in df.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False, name=None)]
    return "\n".join([header, align, *rows])


def _pm(values: pd.Series, digits: int = 3) -> str:
    """'mean ± std' (sample std, ddof=1) of the finite values; the mean alone for one value."""
    v = pd.to_numeric(values, errors="coerce")
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return _DASH
    if len(v) == 1:
        return f"{v.iloc[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def _published_pm(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return "see paper"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _params(n: object) -> str:
    if n is None or (isinstance(n, float) and math.isnan(n)):
        return _DASH
    return f"{int(n) / 1e6:.2f}M ({int(n):,})"


def _scale_label(dataset: str, scale: object) -> str:
    scale = scale if isinstance(scale, str) and scale else "unlabelled"
    return f"{dataset}, {scale} scale"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()


def _finished(df: pd.DataFrame) -> pd.Series:
    return (df["status"] == "finished") & np.isfinite(pd.to_numeric(df["test_bpd"], errors="coerce"))


def _counts(df: pd.DataFrame) -> dict:
    """runs, finished, diverged, unfinished (interrupted or still 'running') of a group."""
    return {
        "runs": len(df),
        "finished": int(_finished(df).sum()),
        "diverged": int((df["status"] == "diverged").sum()),
        "unfinished": int(df["status"].isin(["interrupted", "running"]).sum()),
    }


def _in_table(df: pd.DataFrame, table: int) -> pd.DataFrame:
    return df[df["tables"].map(lambda t: table in t).astype(bool)]  # bool even when df is empty


def _ordered(values: object, order: tuple[str, ...]) -> list:
    values = list(dict.fromkeys(values))
    return [v for v in order if v in values] + sorted(v for v in values if v not in order)


def _presets_for(table: int) -> str:
    names = [n for n, p in PRESETS.items() if table in p.tables]
    return ", ".join(f"`{n}`" for n in names)


def _figure(width: float = 6.4, height: float = 4.0) -> tuple[Figure, object]:
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def _save(fig: Figure, figdir: Path, name: str) -> str:
    fig.savefig(figdir / name, dpi=110)
    return f"figures/{name}"


# ----------------------------------------------------------------------------- Table 3 (models)


@functools.lru_cache(maxsize=1)
def _paper_counts() -> tuple[tuple, ...]:
    rows = []
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # the count does not depend on it; float64 init is slower
    try:
        for label, name in PAPER_COUNT_PRESETS:
            cfg = PRESETS[name].model
            model = MultiScaleFlow(cfg)  # built on the CPU: the layers' init needs real tensors (not meta)
            rows.append((label, name, PRESETS[name].train.dataset, cfg.conv, cfg.coupling, cfg.hidden_channels,
                         cfg.num_blocks, count_parameters(model)))  # fmt: skip
            del model
    finally:
        torch.set_default_dtype(previous)
    return tuple(rows)


def paper_parameter_counts() -> pd.DataFrame:
    """Parameter counts of the paper-scale models (:data:`PAPER_COUNT_PRESETS`), built on the CPU.

    Takes a few seconds (the result is cached for the process). Columns: model, preset,
    dataset, conv, coupling, hidden_channels, num_blocks, num_params.
    """
    cols = ["model", "preset", "dataset", "conv", "coupling", "hidden_channels", "num_blocks", "num_params"]
    return pd.DataFrame(list(_paper_counts()), columns=cols)


# ----------------------------------------------------------------------------- the sections


class _Report:
    def __init__(self, runs: pd.DataFrame, epochs: pd.DataFrame, published: dict, figdir: Path) -> None:
        runs = runs.copy()
        runs["group"] = [_scale_label(d, s) for d, s in zip(runs["dataset"], runs["scale"], strict=True)]
        epochs = epochs.copy()
        epochs["group"] = [_scale_label(d, s) for d, s in zip(epochs["dataset"], epochs["scale"], strict=True)]
        self.runs, self.epochs, self.pub, self.figdir = runs, epochs, published, figdir
        self.samples_slot: list[str] = []  # the samples subsection, shown under Table 2

    # --------------------------------------------------------------- figures shared by tables

    def curves(self, table: int, cell: Callable[[pd.Series], str]) -> list[str]:
        """Test bits/dim (EMA) against epoch, hue = table cell, mean ± sd over seeds."""
        import seaborn as sns

        ep = _in_table(self.epochs, table)
        ep = ep[np.isfinite(pd.to_numeric(ep["test_bpd"], errors="coerce"))]
        if ep.empty:
            return []
        ep = ep.assign(cell=ep.apply(cell, axis=1))
        if ep["group"].nunique() > 1:
            ep["cell"] = ep["cell"] + " [" + ep["group"] + "]"
        fig, ax = _figure()
        sns.lineplot(data=ep, x="epoch", y="test_bpd", hue="cell", errorbar="sd", marker="o", ax=ax)
        ax.set(xlabel="epoch", ylabel="test bits/dim (EMA weights)", title=f"Table {table}: training curves")
        ax.xaxis.get_major_locator().set_params(integer=True)
        path = _save(fig, self.figdir, f"curves_table{table}.png")
        return [f"![Table {table} training curves]({path})", "",
                "*Test bits/dim (EMA weights) after each epoch; line = mean over seeds, band = ± sd.*", ""]  # fmt: skip

    def _missing(self, table: int) -> list[str]:
        return [f"No runs for Table {table} in the runs directory (presets that feed it: {_presets_for(table)}).", ""]

    # --------------------------------------------------------------- Table 2

    def table2(self) -> list[str]:
        out = ["## Table 2: density estimation (test bits/dim)", ""]
        t2 = _in_table(self.runs, 2)
        pub = self.pub["table2"]
        names = pub["datasets"]
        groups = list(dict.fromkeys(t2["group"]))
        rows = []
        for model, values in pub["models"].items():
            row = {"model": model}
            for key, label in names.items():
                v = values.get(key)
                row[f"published: {label}"] = _DASH if key not in values else _published_pm(v, None)
            for g in groups:
                row[f"ours: {g}"] = ""
            rows.append(row)
        ours = {"model": "MEF (ours, this benchmark)", **{f"published: {label}": "" for label in names.values()}}
        for g, df in t2.groupby("group", sort=False):
            ours[f"ours: {g}"] = _pm(df.loc[_finished(df), "test_bpd"])
        rows.append(ours)
        out += [markdown_table(pd.DataFrame(rows)), ""]
        notes = [f"{m}: {vals['note']}" for m, vals in pub["models"].items() if vals.get("note")]
        out += [
            "Published columns: the paper's Table 2 (CIFAR-10 / ImageNet32 / ImageNet64, from "
            "`mefbench/published.json`). Our columns: MEF runs of this benchmark on the dataset and at the "
            "scale named in the column header, mean ± sample std over seeds of finished runs; a CPU- or "
            "smoke-scale run on other data is not comparable with the published numbers."
            + (f" Notes: {'; '.join(notes)}." if notes else ""),
            "",
        ]
        if t2.empty:
            return out + self._missing(2)
        detail = []
        for g, df in t2.groupby("group", sort=False):
            fin = df[_finished(df)]
            detail.append({
                "ours": g, "presets": ", ".join(sorted(map(str, df["preset"].unique()))), **_counts(df),
                "seeds": ", ".join(str(s) for s in sorted(fin["seed"].unique())),
                "epochs": ", ".join(str(e) for e in sorted(df["epochs"].unique())),
                "test bpd (EMA)": _pm(fin["test_bpd"]), "test bpd (raw)": _pm(fin["test_bpd_raw"]),
                "train bpd": _pm(fin["train_bpd"]),
                "params": ", ".join(_params(p) for p in sorted(df["num_params"].dropna().unique())),
            })  # fmt: skip
        out += ["Our Table 2 runs:", "", markdown_table(pd.DataFrame(detail)), ""]
        return out + self.curves(2, lambda r: r["group"]) + self.samples_slot

    # --------------------------------------------------------------- Table 3

    def table3(self) -> list[str]:
        out = ["## Table 3: number of parameters", ""]
        counts = paper_parameter_counts()
        pub = self.pub["table3"]["models"]
        rows = []
        for model, millions in pub.items():
            match = counts[counts["model"] == model]
            computed = _params(match["num_params"].iloc[0]) if len(match) else "not built (baseline)"
            preset = f"`{match['preset'].iloc[0]}`" if len(match) else _DASH
            rows.append({"model": model, "preset": preset, "ours: computed, paper scale": computed,
                         "published (Table 3)": f"{millions:.1f}M"})  # fmt: skip
        for r in counts.itertuples():
            if r.model in pub:
                continue
            rows.append({"model": r.model, "preset": f"`{r.preset}`", "ours: computed, paper scale": _params(r.num_params),
                         "published (Table 3)": _DASH})  # fmt: skip
        out += [
            markdown_table(pd.DataFrame(rows)),
            "",
            ("Computed: `count_parameters(MultiScaleFlow(PRESETS[preset].model))` at the paper's settings "
            "(CIFAR-10 unless named). Published: the paper's Table 3."),
            "",
        ]
        runs = self.runs
        if runs.empty:
            return out
        keys = ["preset", "scale", "dataset", "conv", "coupling", "hidden_channels", "num_blocks"]
        ran = (
            runs.assign(preset=runs["preset"].fillna(_DASH), scale=runs["scale"].fillna("unlabelled"))
            .groupby(keys, sort=True)
            .agg(runs=("run", "size"), num_params=("num_params", lambda s: ", ".join(_params(v) for v in sorted(s.dropna().unique()))))
            .reset_index()
        )  # fmt: skip
        ran = ran.rename(columns={"hidden_channels": "hidden", "num_blocks": "blocks", "num_params": "params (from records)"})
        return out + ["Configurations actually run (parameter counts from the records):", "", markdown_table(ran), ""]

    # --------------------------------------------------------------- Table 4

    def table4(self) -> list[str]:
        out = ["## Table 4: coupling × learning rate (test bits/dim)", ""]
        t4 = _in_table(self.runs, 4)
        if t4.empty:
            return out + self._missing(4)
        cells = self.pub["table4"]["cells"]

        def published(coupling: str, lr: float) -> str:
            for c in cells:
                if c["coupling"] == coupling and math.isclose(c["lr"], lr, rel_tol=1e-9):
                    return _published_pm(c["mean"], c["std"])
            return "not in the paper"

        for g, gdf in t4.groupby("group", sort=False):
            rows = []
            for coupling in _ordered(gdf["coupling"], _COUPLING_ORDER):
                for lr in sorted(gdf.loc[gdf["coupling"] == coupling, "lr"].unique()):
                    df = gdf[(gdf["coupling"] == coupling) & (gdf["lr"] == lr)]
                    rows.append({
                        "coupling": coupling, "lr": f"{lr:g}",
                        "epochs": ", ".join(str(e) for e in sorted(df["epochs"].unique())), **_counts(df),
                        f"ours: {g}": _pm(df.loc[_finished(df), "test_bpd"]),
                        "published (CIFAR-10)": published(coupling, lr),
                    })  # fmt: skip
            out += [f"Runs on {g}:", "", markdown_table(pd.DataFrame(rows)), ""]
            out += self._lr_figure(g, gdf)
        out += [
            ("Mean ± sample std over seeds of finished runs. A diverged run is counted in `runs` and "
            "`diverged` and left out of the mean; `unfinished` counts interrupted runs and records "
            "still marked running. Matrix-exp 1×1 conv in all."),
            "",
        ]
        return out + self.curves(4, lambda r: f"{r['coupling']}, lr {r['lr']:g}")

    def _lr_figure(self, group: str, gdf: pd.DataFrame) -> list[str]:
        fin = gdf[_finished(gdf)]
        if fin.empty:
            return []
        agg = fin.groupby(["coupling", "lr"])["test_bpd"].agg(["mean", "std", "count"]).reset_index()
        fig, ax = _figure()
        for coupling in _ordered(agg["coupling"], _COUPLING_ORDER):
            a = agg[agg["coupling"] == coupling].sort_values("lr")
            ax.errorbar(a["lr"], a["mean"], yerr=a["std"].fillna(0.0), marker="o", capsize=4, label=coupling)
        ax.set_xscale("log")
        ax.set(xlabel="learning rate", ylabel="test bits/dim (EMA weights)", title=f"Table 4: bits/dim vs lr ({group})")
        ax.legend(title="coupling")
        path = _save(fig, self.figdir, f"table4_bpd_vs_lr_{_slug(group)}.png")
        return [f"![bits/dim vs learning rate, {group}]({path})", "",
                "*Mean ± sample std over the finished seeds; diverged runs are not plotted.*", ""]  # fmt: skip

    # --------------------------------------------------------------- Table 5

    def table5(self) -> list[str]:
        out = ["## Table 5: 1×1 convolutions (bits/dim and time per epoch)", ""]
        t5 = _in_table(self.runs, 5)
        if t5.empty:
            return out + self._missing(5)
        cells = {c["conv"]: c for c in self.pub["table5"]["cells"]}
        for g, gdf in t5.groupby("group", sort=False):
            timed = gdf[gdf["epochs_done"] > 0]
            ref = timed.loc[timed["conv"] == "standard", "mean_epoch_time_s"]
            ref_time = ref.mean() if len(ref) else math.nan
            rows = []
            for conv in _ordered(gdf["conv"], _CONV_ORDER):
                df = gdf[gdf["conv"] == conv]
                t = timed.loc[timed["conv"] == conv, "mean_epoch_time_s"]
                ratio = t.mean() / ref_time if len(t) and ref_time > 0 else math.nan
                pub = cells.get(conv)
                rows.append({
                    "conv": conv, **_counts(df),
                    f"ours: {g} bits/dim": _pm(df.loc[_finished(df), "test_bpd"]),
                    "time per epoch (s)": _pm(t, 2),
                    "time / standard": _DASH if math.isnan(ratio) else f"{ratio:.2f}",
                    "device": ", ".join(sorted(map(str, df["device"].unique()))),
                    "published bits/dim (CIFAR-10)": _published_pm(pub["mean"], pub["std"]) if pub else "not in the paper",
                    "published time": "see paper" if pub and pub.get("epoch_time") is None else (pub or {}).get("epoch_time", _DASH),
                })  # fmt: skip
            out += [f"Runs on {g}:", "", markdown_table(pd.DataFrame(rows)), ""]
            if timed.empty:
                continue
            import seaborn as sns

            fig, ax = _figure()
            sns.barplot(data=timed, x="conv", y="mean_epoch_time_s", order=_ordered(timed["conv"], _CONV_ORDER),
                        errorbar="sd", capsize=0.2, ax=ax)  # fmt: skip
            ax.set(xlabel="1×1 convolution", ylabel="training time per epoch (s)", title=f"Table 5: time per epoch ({g})")
            path = _save(fig, self.figdir, f"table5_epoch_time_{_slug(g)}.png")
            out += [f"![time per epoch, {g}]({path})", "", "*Mean ± sample std over runs.*", ""]
        out += [
            ("bits/dim: mean ± sample std over seeds of finished runs (diverged runs counted, not averaged). "
            "Time per epoch: training time only (evaluation excluded), mean ± sample std over the runs' "
            "mean epoch times, including every run with at least one finished epoch; the ratio divides "
            "by the standard conv's mean. Times from different devices are not comparable. "
            "Matrix-exp coupling and lr 0.01 in all."),
            "",
        ]
        return out + self.curves(5, lambda r: r["conv"])

    # --------------------------------------------------------------- Table 6

    def table6(self) -> list[str]:
        out = ["## Table 6: series length m of the matrix exponential", ""]
        t6 = _in_table(self.runs, 6)
        if t6.empty:
            return out + self._missing(6)
        pub_m = self.pub["table6"]["m"]
        for g, gdf in t6.groupby("group", sort=False):
            rows = []
            for name in ("m", "s"):
                parts = [
                    {k: r[f"{name}_{k}"] for k in ("count", "mean", "std", "max", "min")}
                    for _, r in gdf.iterrows()
                    if r[f"{name}_count"] > 0
                ]
                p = pool_stats(parts)
                row = {"": name, "mean": _DASH, "std": _DASH, "max": _DASH, "min": _DASH,
                       "expm calls": 0, "runs pooled": len(parts)}  # fmt: skip
                if p:
                    row.update(mean=f"{p['mean']:.3f}", std=f"{p['std']:.3f}", max=f"{p['max']:g}",
                               min=f"{p['min']:g}", **{"expm calls": int(p["count"])})  # fmt: skip
                pub = [pub_m.get(k) for k in ("mean", "std", "max", "min")] if name == "m" else None
                if pub is None:
                    row["published (paper)"] = _DASH
                elif all(v is None for v in pub):
                    row["published (paper)"] = "see paper"
                else:
                    row["published (paper)"] = " / ".join(_DASH if v is None else f"{v:g}" for v in pub)
                rows.append(row)
            out += [f"Runs on {g}:", "", markdown_table(pd.DataFrame(rows)), ""]
            per_run = gdf[["run", "status", "seed", "m_mean", "m_std", "m_max", "m_min", "m_count", "s_mean", "s_max"]]
            per_run = per_run.assign(
                **{c: per_run[c].map(lambda v: _DASH if not np.isfinite(v) else f"{v:.3f}") for c in ("m_mean", "m_std", "s_mean")},
                **{c: per_run[c].map(lambda v: _DASH if not np.isfinite(v) else f"{v:g}") for c in ("m_max", "m_min", "m_count", "s_max")},
            )  # fmt: skip
            out += ["Per run:", "", markdown_table(per_run), ""]
            out += self._m_figure(g, gdf)
        out += [
            ("m: number of Taylor terms of a matrix exponential (or its action on a vector); s: number "
            "of squarings (or steps). Statistics over every recorded expm call of the runs' finished "
            "epochs (all statuses), pooled from each run's count, mean and population std with "
            "`mefbench.training.pool_stats`."),
            "",
        ]
        return out + self.curves(6, lambda r: r["group"])

    def _m_figure(self, group: str, gdf: pd.DataFrame) -> list[str]:
        df = gdf[gdf["m_count"] > 0]
        if df.empty:
            return []
        fig, ax = _figure(max(4.0, 0.8 * len(df) + 2), 4.0)
        x = np.arange(len(df))
        ax.bar(x, df["m_mean"], yerr=df["m_std"], capsize=4, color="tab:blue", alpha=0.7, label="mean ± std")
        ax.scatter(x, df["m_max"], marker="v", color="tab:red", zorder=3, label="max")
        ax.scatter(x, df["m_min"], marker="^", color="tab:green", zorder=3, label="min")
        ax.set_xticks(x, [f"{r} ({s})" for r, s in zip(df["run"], df["status"], strict=True)], rotation=30, ha="right")
        ax.set(ylabel="series length m", title=f"Table 6: m per run ({group})")
        ax.legend()
        path = _save(fig, self.figdir, f"table6_m_{_slug(group)}.png")
        return [f"![series length m per run, {group}]({path})", ""]

    # --------------------------------------------------------------- samples

    def samples(self, n: int = 16) -> list[str]:
        out = ["### Samples", ""]
        t2 = _in_table(self.runs, 2)
        fin = t2[_finished(t2)].sort_values("test_bpd")
        fin = fin[[(Path(p) / CHECKPOINT).exists() for p in fin["path"]]]
        if fin.empty:
            return out + [f"No finished Table 2 run with a `{CHECKPOINT}` to sample from.", ""]
        best = fin.iloc[0]
        try:
            model = load_model(best["path"])
            dtype = next(model.parameters()).dtype
            paths = []
            for t in SAMPLE_TEMPERATURES:
                g = torch.Generator().manual_seed(0)
                x = model.sample(n, temperature=t, generator=g)
                name = f"samples_t{t:g}.png"
                h = x.shape[-1]
                save_grid(x, self.figdir / name, scale=max(1, math.ceil(64 / h)))
                paths.append((t, f"figures/{name}"))
        except (RunError, RuntimeError, ValueError, OSError) as exc:
            return out + [f"Sampling from run `{best['run']}` failed: {type(exc).__name__}: {exc}", ""]
        out += [
            (f"{n} samples from the best finished Table 2 run, `{best['run']}` ({best['group']}, test "
            f"{best['test_bpd']:.3f} bits/dim), EMA weights, generator seed 0, {dtype}."),
            "",
            "| " + " | ".join(f"temperature {t:g}" for t, _ in paths) + " |",
            "|" + "|".join("---" for _ in paths) + "|",
            "| " + " | ".join(f"![samples at temperature {t:g}]({p})" for t, p in paths) + " |",
            "",
        ]
        return out


# ----------------------------------------------------------------------------- header, extras


def _header(runs: pd.DataFrame, corrupt: list[dict], runs_dir: Path, command: str | None, exists: bool) -> list[str]:
    import matplotlib
    import seaborn

    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    how = f"`{command}`" if command else f"`mefbench.report.write_report({str(runs_dir)!r}, ...)` (no command line given)"
    out = [
        "# mefbench report: Generative Flows with Matrix Exponential (Xiao & Liu, ICML 2020, arXiv 2007.09651)",
        "",
        f"- Produced by: {how}",
        f"- Date: {now}",
        f"- Runs directory: `{runs_dir}`" + ("" if exists else " (does not exist)"),
        f"- Runs: {len(runs)}" + (f" ({', '.join(f'{n} {s}' for s, n in runs['status'].value_counts().items())})" if len(runs) else ""),
        (f"- Report written with mefbench {__version__}, python {platform.python_version()}, torch {torch.__version__}, "
        f"pandas {pd.__version__}, numpy {np.__version__}, matplotlib {matplotlib.__version__}, seaborn {seaborn.__version__}"),
        "",
    ]  # fmt: skip
    if runs.empty:
        out += ["**There are no runs in the runs directory**" + (" (unreadable records are listed below)." if corrupt else "."), ""]
    # Status: every run that did not finish, by name
    not_done = runs[runs["status"] != "finished"]
    if len(runs):
        if not_done.empty:
            out += ["**Status:** all runs finished.", ""]
        else:
            items = []
            for r in not_done.itertuples():
                if r.status == "diverged":
                    where = f"epoch {r.diverged_epoch:g}, step {r.diverged_step:g}" if np.isfinite(r.diverged_step) else "unknown step"
                    items.append(f"`{r.run}` diverged at {where} (loss {r.diverged_loss:g}) after {r.epochs_done}/{r.epochs} epochs")
                elif r.status == "running":
                    items.append(f"`{r.run}` still marked running ({r.epochs_done}/{r.epochs} epochs; running now, or killed before it could record it)")
                else:
                    items.append(f"`{r.run}` {r.status} after {r.epochs_done}/{r.epochs} epochs")
            out += [f"**Status:** {len(not_done)} of {len(runs)} runs not finished: " + "; ".join(items) + ".", ""]
    if corrupt:
        out += ["**Unreadable run records (skipped, in no table):**", ""]
        out += [f"- `{c['path']}`: {c['error']}" for c in corrupt] + [""]
    no_table = runs[runs["tables"].map(len) == 0]
    if len(no_table):
        out += [f"Runs that feed no paper table (listed under All runs only): {', '.join(f'`{r}`' for r in no_table['run'])}.", ""]
    scales = sorted({s if isinstance(s, str) and s else "unlabelled" for s in runs["scale"]} - {"paper"})
    if scales:
        out += [
            "**Scale:** runs at " + ", ".join(f"`{s}`" for s in scales) + " scale train small models on "
            "other data (e.g. 16×16 `patches16`) for minutes; their bits/dim and times are NOT comparable with "
            "the published CIFAR-10 / ImageNet numbers, which are shown only as reference. Every column "
            "says which dataset and scale it comes from.",
            "",
        ]
    if len(runs):
        out += _environment(runs)
    return out


def _environment(runs: pd.DataFrame) -> list[str]:
    out = ["### Versions and machines (from the run records)", ""]
    packages: dict[str, set] = {}
    for v in runs["versions"]:
        for k, val in (v or {}).items():
            packages.setdefault(k, set()).add(str(val))
    if packages:
        out += [markdown_table(pd.DataFrame([{"package": k, "versions": ", ".join(sorted(v))} for k, v in packages.items()])), ""]
    machines: dict[tuple, int] = {}
    for dev, world, m in zip(runs["device"], runs["world_size"], runs["machine"], strict=True):
        m = m or {}
        key = (str(dev), str(world), str(m.get("gpu", _DASH)), str(m.get("processor", _DASH)),
               str(m.get("cpu_count", _DASH)), str(m.get("torch_threads", _DASH)), str(m.get("platform", _DASH)))  # fmt: skip
        machines[key] = machines.get(key, 0) + 1
    cols = ["device", "world size", "gpu", "processor", "cpus", "torch threads", "platform"]
    table = pd.DataFrame([dict(zip(cols, k, strict=True)) | {"runs": n} for k, n in machines.items()])
    return out + [markdown_table(table), ""]


def _all_runs(runs: pd.DataFrame) -> list[str]:
    if runs.empty:
        return []
    df = runs.sort_values(["preset", "seed", "run"], key=lambda s: s.astype(str))
    table = pd.DataFrame({
        "run": df["run"], "preset": df["preset"].fillna(_DASH), "tables": df["tables"].map(lambda t: ",".join(map(str, t)) or _DASH),
        "scale": df["scale"].fillna(_DASH), "status": df["status"], "dataset": df["dataset"], "conv": df["conv"],
        "coupling": df["coupling"], "hidden": df["hidden_channels"], "blocks": df["num_blocks"],
        "lr": df["lr"].map(lambda v: f"{v:g}"), "seed": df["seed"],
        "epochs": [f"{a}/{b}" for a, b in zip(df["epochs_done"], df["epochs"], strict=True)],
        "test bpd": df["test_bpd"].map(lambda v: f"{v:.4f}" if np.isfinite(v) else _DASH),
        "s/epoch": df["mean_epoch_time_s"].map(lambda v: f"{v:.2f}" if np.isfinite(v) else _DASH),
        "params": df["num_params"], "device": df["device"],
    })  # fmt: skip
    return ["## All runs", "", markdown_table(table), ""]


def _asv_section(asv_dir: str | Path | None, figdir: Path) -> list[str]:
    out = ["## Layer speed (asv)", ""]
    if asv_dir is None:
        return out + ["Not included: no asv results directory was given.", ""]
    asv_dir = Path(asv_dir)
    if not asv_dir.exists():
        return out + [f"Not included: the asv results directory `{asv_dir}` does not exist.", ""]
    try:
        asv = importlib.import_module("mefbench.asv_results")
    except ImportError as exc:
        return out + [f"Not included: `mefbench.asv_results` cannot be imported ({exc}).", ""]
    try:
        df = asv.load_asv_results(asv_dir)
        if df is None or len(df) == 0:
            return out + [f"Not included: no asv results in `{asv_dir}`.", ""]
        table = asv.asv_speed_table(df)
    except Exception as exc:  # noqa: BLE001 -- another module's failure must not lose the rest of the report
        return out + [f"Not included: reading the asv results failed: {type(exc).__name__}: {exc}", ""]
    commits = dict(getattr(table, "attrs", {}).get("commits") or {})
    table = pd.DataFrame(table)
    if not isinstance(table.index, pd.RangeIndex):
        table = table.reset_index()
    numeric = [c for c in table.columns if pd.api.types.is_float_dtype(table[c])]
    table[numeric] = table[numeric].map(lambda v: f"{v:.4g}" if np.isfinite(v) else _DASH)
    out += [
        f"From `{asv_dir}`: times in ms of each machine's latest commit"
        + (" (" + ", ".join(f"{m}: `{str(c)[:10]}`" for m, c in commits.items()) + ")" if commits else "")
        + ".",
        "",
        markdown_table(table),
        "",
    ]
    try:
        asv.plot_asv_history(df, figdir / "asv_history.png")
        out += ["![asv history](figures/asv_history.png)", ""]
    except Exception as exc:  # noqa: BLE001 -- as above
        out += [f"History figure not drawn: {type(exc).__name__}: {exc}", ""]
    return out


def _bench_section(bench_file: str | Path | None) -> list[str]:
    out = ["## Performance (`mefbench bench`)", ""]
    if bench_file is None:
        return out + ["Not included: no bench results file was given.", ""]
    path = Path(bench_file)
    if not path.exists():
        return out + [f"Not included: the bench results file `{path}` does not exist.", ""]
    try:
        data = json.loads(path.read_text())
        rows = pd.DataFrame(data["rows"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return out + [f"Not included: `{path}` cannot be read ({type(exc).__name__}: {exc}).", ""]
    cols = [c for c in ("what", "shape", "measured", "unit", "target", "ok", "note") if c in rows.columns]
    rows = rows[cols].copy()
    if "measured" in rows:
        rows["measured"] = rows["measured"].map(lambda v: f"{v:.4g}" if isinstance(v, (int, float)) else v)
    if "ok" in rows:
        rows["ok"] = rows["ok"].map(lambda v: "yes" if v is True else "NO" if v is False else v)
    out += [f"From `{path}`" + (f", produced by `{data['command']}`" if data.get("command") else "") + ".", ""]
    out += [markdown_table(rows), ""]
    for key in ("machine", "versions"):
        if isinstance(data.get(key), dict) and data[key]:
            out += [f"{key.capitalize()}: " + ", ".join(f"{k} {v}" for k, v in data[key].items()), ""]
    return out


# ----------------------------------------------------------------------------- the report


def write_report(
    runs_dir: str | Path,
    out_dir: str | Path = "reports",
    *,
    asv_dir: str | Path | None = None,
    bench_file: str | Path | None = None,
    command: str | None = None,
    samples: bool = True,
) -> Path:
    """Aggregate the runs under runs_dir into ``out_dir/README.md`` and ``out_dir/figures/*.png``.

    Sections: header (command, date, versions, machines, status of every unfinished run,
    unreadable records), Tables 2–6 with figures, samples (``samples=False`` skips them),
    layer speed (asv), performance (``mefbench bench``), all runs. Old PNGs in
    ``out_dir/figures`` are removed first (that folder belongs to the report). Returns the
    README path. An empty or missing runs_dir gives a report that says there are no runs.
    """
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    figdir = out_dir / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    for old in figdir.glob("*.png"):
        old.unlink()
    exists = runs_dir.exists()
    records, corrupt = scan_records(runs_dir) if exists else ([], [])
    runs, epochs = runs_frame(records, corrupt), epochs_frame(records, corrupt)
    published = load_published()
    rep = _Report(runs, epochs, published, figdir)
    rep.samples_slot = rep.samples() if samples else ["### Samples", "", "Not drawn (`samples=False`).", ""]
    lines = _header(runs, corrupt, runs_dir, command, exists)
    lines += rep.table2() + rep.table3() + rep.table4() + rep.table5() + rep.table6()
    lines += _asv_section(asv_dir, figdir) + _bench_section(bench_file) + _all_runs(runs)
    src = published["source"]
    lines += [
        "## Published numbers",
        "",
        (f"From \"{src['title']}\" ({src['authors']}, {src['venue']}, arXiv {src['arxiv']}), Tables 2–6, "
        f"as stored in `mefbench/published.json`. {published['note']}"),
        "",
    ]
    readme = out_dir / "README.md"
    readme.write_text("\n".join(lines).rstrip() + "\n")
    return readme

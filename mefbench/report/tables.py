"""The report's tables as data: a :class:`TableSpec` per table in :data:`TABLES`, one renderer.

A spec says which cell a run fills (``cell_keys``, stored in each run record under its table id),
how one data group's runs become rows (``rows``, a pure function in :mod:`.aggregate`), which
figures to draw, where its published numbers are (``published``, a key of ``published.json``) and
its notes. Which runs fill a table: the presets that list its id in ``Preset.tables``. Adding a
table = one spec here + its presets.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..models import MultiScaleFlow, count_parameters
from ..presets import PRESETS, TABLE4_COUPLINGS
from ..stats import wilson_interval
from . import aggregate as agg
from . import figures as fig
from .format import DASH, markdown_table, number, params, published_pm

__all__ = ["TABLES", "TableSpec", "paper_parameter_counts", "render_table", "table_ids"]


@dataclass(frozen=True)
class TableSpec:
    """One report table.

    Args:
        id: "2" … "6" for the paper's tables, a word for the zoo's ("mixing", "stability").
        title: the section heading.
        short: what figures and captions call it ("Table 4").
        what: one line for listings (`mefbench sweep --help`, the README).
        cell_keys: the keys of the cell a run fills (its record's ``cells[id]``).
        rows: (runs of one data group, published section) -> rows (a DataFrame, or one dict).
        kind: whose variant a ``variant`` cell key names: "conv" or "coupling".
        figures: drawn per data group.
        published: the key of its published numbers in ``published.json``.
        extra: more lines per data group (runs, published section, group label) after the rows.
        notes: the paragraph under the table.
        seeds: seeds a sweep runs by default.
        from_runs: False for a table computed from the models alone (Table 3).
        from_bench: (the ``mefbench bench --json`` data or None, figure folder) -> the section's
            lines, for a table computed from bench results (the scaling table) instead of runs.
    """

    id: str
    title: str
    short: str
    what: str
    cell_keys: tuple[str, ...] = ()
    rows: Callable[[pd.DataFrame, dict], pd.DataFrame | dict] | None = None
    kind: str = "coupling"
    figures: tuple[Callable[[fig.FigureContext], list[str]], ...] = ()
    published: str | None = None
    extra: Callable[[pd.DataFrame, dict, str], list[str]] | None = None
    notes: str = ""
    seeds: int = 3
    from_runs: bool = True
    curves: bool = True
    preamble: Callable[[dict], list[str]] | None = field(default=None)
    from_bench: Callable[[dict | None, Path], list[str]] | None = None


# ----------------------------------------------------------------------------- Table 2's reference


def _published_table2(pub: dict) -> list[str]:
    names = pub["datasets"]
    rows = [
        {
            "model": model,
            **{label: published_pm(values.get(key), None) if key in values else DASH for key, label in names.items()},
        }
        for model, values in pub["models"].items()
    ]
    notes = [f"{m}: {vals['note']}" for m, vals in pub["models"].items() if vals.get("note")]
    return [
        "Published (the paper's Table 2, test bits/dim, from `mefbench/published.json`):",
        "",
        markdown_table(pd.DataFrame(rows)),
        "",
        *([f"Notes: {'; '.join(notes)}.", ""] if notes else []),
        "Ours, below: MEF runs of this benchmark on the data and at the scale the first column names, "
        "mean ± sample std over seeds of finished runs; a CPU- or smoke-scale run on other data is not "
        "comparable with the published numbers.",
        "",
    ]


# ----------------------------------------------------------------------------- Table 3 (models)


def paper_count_presets() -> list[tuple[str, str]]:
    """(row label, preset) of the paper-scale models Table 3 counts: MEF on CIFAR-10, the affine
    model of Table 4 and the other 1×1 convs of Table 5 (read from the presets)."""
    rows = [("MEF", "paper-t2-mef-cifar10")]
    seen = {PRESETS["paper-t2-mef-cifar10"].model.to_json()}
    for name, p in PRESETS.items():
        if p.scale != "paper" or not {"4", "5"} & set(p.tables) or p.train.dataset != "cifar10":
            continue
        key = p.model.to_json()
        if key in seen:
            continue
        seen.add(key)
        m = p.model
        what = (
            f"{m.coupling} coupling (hidden {m.hidden_channels}; Table 4)"
            if "4" in p.tables
            else f"{m.conv} 1×1 conv (Table 5)"
        )
        rows.append((f"MEF with {what}", name))
    return rows


@functools.lru_cache(maxsize=4)
def _paper_counts(key: tuple) -> tuple[tuple, ...]:
    rows = []
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # the count does not depend on it; float64 init is slower
    try:
        for label, name in key:
            cfg = PRESETS[name].model
            model = MultiScaleFlow(cfg)  # built on the CPU: the layers' init needs real tensors (not meta)
            rows.append((label, name, PRESETS[name].train.dataset, cfg.conv, cfg.coupling, cfg.hidden_channels,
                         cfg.num_blocks, count_parameters(model)))  # fmt: skip
            del model
    finally:
        torch.set_default_dtype(previous)
    return tuple(rows)


def paper_parameter_counts() -> pd.DataFrame:
    """Parameter counts of the paper-scale models of Tables 2, 4 and 5, built on the CPU (cached).

    Columns: model, preset, dataset, conv, coupling, hidden_channels, num_blocks, num_params.
    """
    cols = ["model", "preset", "dataset", "conv", "coupling", "hidden_channels", "num_blocks", "num_params"]
    return pd.DataFrame(list(_paper_counts(tuple(paper_count_presets()))), columns=cols)


def _table3(runs: pd.DataFrame, pub: dict, group: str) -> list[str]:
    counts = paper_parameter_counts()
    rows = []
    for model, millions in pub["models"].items():
        match = counts[counts["model"] == model]
        computed = params(match["num_params"].iloc[0]) if len(match) else "not built (baseline)"
        preset = f"`{match['preset'].iloc[0]}`" if len(match) else DASH
        rows.append({"model": model, "preset": preset, "ours: computed, paper scale": computed,
                     "published (Table 3)": f"{millions:.1f}M"})  # fmt: skip
    for r in counts.itertuples():
        if r.model not in pub["models"]:
            rows.append({"model": r.model, "preset": f"`{r.preset}`", "ours: computed, paper scale": params(r.num_params),
                         "published (Table 3)": DASH})  # fmt: skip
    out = [
        markdown_table(pd.DataFrame(rows)),
        "",
        "Computed: `count_parameters(MultiScaleFlow(PRESETS[preset].model))` at the paper's settings (CIFAR-10). "
        "Published: the paper's Table 3.",
        "",
    ]
    paper = {"2", "4", "5", "6"}  # the zoo tables show their own parameter counts
    runs = runs[runs["tables"].map(lambda t: bool(paper & set(t)))] if len(runs) else runs
    if runs.empty:
        return out
    keys = ["preset", "scale", "dataset", "conv", "coupling", "hidden_channels", "num_blocks"]
    ran = (
        runs.assign(preset=runs["preset"].fillna(DASH), scale=runs["scale"].fillna("unlabelled"))
        .groupby(keys, sort=True)
        .agg(runs=("run", "size"), num_params=("num_params", lambda s: ", ".join(params(v) for v in sorted(s.dropna().unique()))))
        .reset_index()
        .rename(columns={"hidden_channels": "hidden", "num_blocks": "blocks", "num_params": "params (from records)"})
    )  # fmt: skip
    return out + [
        "Configurations of the paper's tables actually run (parameter counts from the records):",
        "",
        markdown_table(ran),
        "",
    ]


# ----------------------------------------------------------------------------- extras per group


def _table6_per_run(runs: pd.DataFrame, pub: dict, group: str) -> list[str]:
    cols = ["run", "status", "seed", "m_mean", "m_std", "m_max", "m_min", "m_count", "s_mean", "s_max"]
    per_run = runs[cols].assign(
        **{c: runs[c].map(lambda v: number(v, "{:.3f}")) for c in ("m_mean", "m_std", "s_mean")},
        **{c: runs[c].map(lambda v: number(v, "{:g}")) for c in ("m_max", "m_min", "m_count", "s_max")},
    )
    return ["Per run:", "", markdown_table(per_run), ""]


def _stability_extra(runs: pd.DataFrame, pub: dict, group: str) -> list[str]:
    rows = agg.stability_rows(runs)
    summary = agg.stability_summary(rows)
    out = ["Per coupling:", "", markdown_table(summary), ""] if len(summary) else []
    return out + [_stability_finding(rows), ""]


def _stability_finding(rows: pd.DataFrame) -> str:
    """One sentence, generated from the numbers, on the paper's claim (the matrix-exponential
    coupling trains stably where the affine coupling does not, Table 4 at lr 0.01 and up): the
    failure rates (diverged, or ended worse than the uniform density) of the two at lr ≥ 0.01,
    compared by their Wilson 95% intervals."""
    claim = "**What this shows about the paper's claim:**"
    if rows.empty:
        return f"{claim} nothing yet: no run has finished or diverged."
    high = rows[rows["lr"] >= 0.01]

    def tally(mask: pd.Series) -> tuple[int, int, int]:
        sub = high[mask]
        return (
            int(sub["diverged"].sum()),
            int((sub["diverged"] + sub["worse than uniform"]).sum()),
            int((sub["finished"] + sub["diverged"]).sum()),
        )

    # the paper's Table 4 pair, each in its default (the paper's) form: MEF's coupling and the other
    ours = PRESETS["cpu-t2-mef"].model.coupling
    other = next(c for c in TABLE4_COUPLINGS if c != ours)

    def paper_form(coupling: str) -> pd.Series:
        return (high["coupling"] == coupling) & (high["variant"] == agg.variant_of("coupling", coupling, {}))

    mef, affine = tally(paper_form(ours)), tally(paper_form(other))
    if not mef[2] or not affine[2]:
        return (f"{claim} nothing yet: the claim (the matrix-exp coupling trains stably where the affine one does "
                f"not) needs runs of both at lr ≥ 0.01 in one group; this group has {mef[2]} and {affine[2]}.")  # fmt: skip
    m_low, m_high = wilson_interval(mef[1], mef[2])
    a_low, a_high = wilson_interval(affine[1], affine[2])
    numbers = (f"at lr ≥ 0.01 the matrix-exp coupling failed in {mef[1]} of {mef[2]} runs ({mef[0]} diverged; 95% CI "
               f"{m_low:.2f}–{m_high:.2f}) and the affine coupling with the paper's bounded tanh in {affine[1]} of "
               f"{affine[2]} ({affine[0]} diverged; {a_low:.2f}–{a_high:.2f}), failed meaning diverged or ended worse "
               f"than the uniform density")  # fmt: skip
    if m_high < a_low:
        verdict = "the matrix-exp coupling is measurably more stable here, as the paper claims"
    elif a_high < m_low:
        verdict = "the affine coupling is measurably more stable here, against the paper's claim"
    else:
        verdict = "the intervals overlap, so at this scale the benchmark cannot tell the two apart"
    return f"{claim} {numbers}; {verdict}."


# ----------------------------------------------------------------------------- scaling (bench)


def _scaling_section(bench: dict | None, figdir: Path) -> list[str]:
    """The scaling rows of a ``mefbench bench --scaling --json`` file: a table of fitted exponents
    against the stated costs, the layers that disagree, and the log-log figures."""
    data = agg.scaling_frames(bench)
    if data is None:
        return ["Not included: no bench results with the scaling part were given "
                "(`mefbench bench --scaling --json FILE`, then `mefbench report --bench FILE`).", ""]  # fmt: skip
    fits, points = data
    rows = agg.scaling_rows(fits)
    grid = fits.attrs["grid"]
    quick = " (`--quick` sizes: a smoke check; its exponents are not judged)" if bench.get("quick") else ""
    disagree = rows[rows["verdict"] == "disagrees"]
    listed = "; ".join(f"{layer} {timed}" for layer, timed in zip(disagree["layer"], disagree["timed"], strict=True))
    out = [
        f"From `{bench.get('command', 'mefbench bench --scaling')}`{quick}: C ∈ {{{', '.join(map(str, grid['channels']))}}}, "
        f"H = W ∈ {{{', '.join(map(str, grid['sizes']))}}}, batch {grid['batch']}, float32, "
        f"{(bench.get('machine') or {}).get('processor', 'unknown processor')}, one thread.",
        "",
        markdown_table(rows),
        "",
        f"Measured exponents that disagree with the stated cost (95% CI wholly outside expected ± "
        f"{fits.attrs['tolerance']:g}): {listed or 'none'}.",
        "",
    ]  # fmt: skip
    return out + fig.scaling_curves(points, figdir)


# ----------------------------------------------------------------------------- the registry


TABLES: dict[str, TableSpec] = {
    spec.id: spec
    for spec in (
        TableSpec(
            "2", "Table 2: density estimation (test bits/dim)", "Table 2",
            "test bits/dim of MEF, beside the published RealNVP, Glow, Emerging, Flow++ and MEF",
            cell_keys=("dataset",), rows=lambda df, pub: agg.table2_rows(df), published="table2",
            preamble=_published_table2,
        ),
        TableSpec(
            "3", "Table 3: number of parameters", "Table 3",
            "parameter counts at the paper's scale, computed from the models",
            published="table3", extra=_table3, from_runs=False, curves=False, seeds=0,
        ),
        TableSpec(
            "4", "Table 4: coupling × learning rate (test bits/dim)", "Table 4",
            "affine vs matrix-exp coupling × learning rate 1e-3 / 1e-2, mean ± std over seeds, divergences",
            cell_keys=("coupling", "lr"), rows=agg.table4_rows, figures=(fig.lr_errorbars,), published="table4",
            notes=("Mean ± sample std over seeds of finished runs. A diverged run is counted in `runs` and `diverged` "
                   "and left out of the mean; `unfinished` counts interrupted runs and records still marked running. "
                   "Matrix-exp 1×1 conv in all."),
        ),
        TableSpec(
            "5", "Table 5: 1×1 convolutions (bits/dim and time per epoch)", "Table 5",
            "standard vs PLU vs matrix-exp 1×1 conv: bits/dim and time per epoch",
            cell_keys=("conv",), kind="conv", rows=agg.table5_rows, figures=(fig.epoch_time_bars,), published="table5",
            notes=("bits/dim: mean ± sample std over seeds of finished runs (diverged runs counted, not averaged). "
                   "Time per epoch: training time only (evaluation excluded), mean ± sample std over the runs' mean "
                   "epoch times, every run with at least one finished epoch; the ratio divides by the standard conv's "
                   "mean. Times from different devices are not comparable. Matrix-exp coupling and lr 0.01 in all; "
                   "`form` is the conv's variant (`free`: PLU with U's diagonal learned directly, as in the official "
                   "code and the paper's table; `exp`: Glow's sign·exp form)."),
        ),
        TableSpec(
            "6", "Table 6: series length m of the matrix exponential", "Table 6",
            "mean, std, max, min of the series length m (and squarings s) during training",
            cell_keys=("dataset",), rows=agg.table6_rows, figures=(fig.m_per_run,), published="table6",
            extra=_table6_per_run,
            notes=("m: number of Taylor terms of a matrix exponential (or its action on a vector); s: number of "
                   "squarings (or steps). Statistics over every recorded expm call of the runs' finished epochs (all "
                   "statuses), pooled from each run's count, mean and population std with `mefbench.stats.pool_stats`."),
        ),
        TableSpec(
            "mixing", "Every mixing layer (next to Table 5)", "every mixing layer",
            "every mixing layer of the zoo and its variants: bits/dim, parameters, time, sampling, round trip, memory",
            cell_keys=("conv", "variant"), kind="conv", rows=agg.mixing_rows,
            figures=(fig.quality_vs_time, fig.epoch_time_bars), published="mixing",
            notes=("Every entry of `mefbench.layers.MIXING` and each of its variants in Table 5's setting (matrix-exp "
                   "coupling, lr 0.01), mean ± sample std over seeds. Sampling: the trained EMA model's inverse, per "
                   "image; round-trip error: max |x − f⁻¹(f(x))| of the trained model on a test batch in float32 "
                   "(largest over seeds); peak memory: of one training step (on the CPU, the tensors saved for "
                   "backward plus parameters, gradients and optimiser state; on a GPU, the allocator's peak). "
                   "Published: the layer's own paper on CIFAR-10, with the source, in its own architecture, so "
                   "not comparable with each other or with our rows."),
        ),
        TableSpec(
            "stability", "Stability: every coupling × learning rate (Table 4 generalised)", "stability",
            "every coupling and scale map × learning rates 1e-3…1e-1 × 5 seeds: divergence rate, step, bits/dim",
            cell_keys=("coupling", "variant", "lr"), rows=lambda df, pub: _stability_display(agg.stability_rows(df)),
            figures=(fig.divergence_vs_lr,), extra=_stability_extra, seeds=5, curves=False,
            notes=("A run diverges when its training loss becomes non-finite; it is recorded with that step and "
                   "never retried. A finished run is worse than uniform when its test bits/dim ends above 8, what the "
                   "uniform density on the 256 levels scores: it learned less than nothing. Failed: diverged or worse "
                   "than uniform. Rates: over finished + diverged runs, with Wilson 95% score intervals; runs still "
                   "running or interrupted are counted apart. Largest lr with no divergence (failure): the largest "
                   "rate of the grid at which, and below which, no seed diverged (failed). Matrix-exp 1×1 conv in all; at CPU "
                   "scale a small net without warm-up (see `mefbench presets`), at paper scale Table 4's recipe, "
                   "whose lr-0.01 cells are Table 4's runs."),
        ),
        TableSpec(
            "scaling", "Scaling with channels and pixels (`mefbench bench --scaling`)", "scaling",
            "exponents of every layer's time in C and n = H·W against its stated cost (bench data, no runs)",
            from_runs=False, from_bench=_scaling_section, curves=False, seeds=0,
            notes=("Time ∝ C^a·n^b fitted by least squares on log time over the grid's points at least 4× slower "
                   "than the layer's fastest (where the per-call cost no longer dominates); expected: the same fit "
                   "of the cost the layer's `LayerInfo` states (forward + log-det, inverse + log-det; a coupling "
                   "without its net), evaluated on the same points, its constants at the zoo's defaults "
                   "(`mefbench.scaling.SYMBOLS`). A mixing layer is timed in training mode (every call builds what "
                   "eval mode caches), a coupling's transform given the net's output. Points beyond the time cap, "
                   "the work cap or memory are not measured; the table counts them and the JSON lists them."),
        ),
    )
}  # fmt: skip


def _stability_display(rows: pd.DataFrame) -> pd.DataFrame:
    if rows.empty:
        return rows
    ci = [
        f"{lo:.2f}–{hi:.2f}" if np.isfinite(lo) else DASH
        for lo, hi in zip(rows["rate 95% CI low"], rows["rate 95% CI high"], strict=True)
    ]
    f_ci = [
        f"{lo:.2f}–{hi:.2f}" if np.isfinite(lo) else DASH
        for lo, hi in zip(rows["failure 95% CI low"], rows["failure 95% CI high"], strict=True)
    ]
    out = rows.drop(
        columns=["rate 95% CI low", "rate 95% CI high", "failure 95% CI low", "failure 95% CI high"]
    ).assign(
        lr=rows["lr"].map(lambda v: f"{v:g}"),
        **{name: rows[name].map(lambda v: number(v, "{:.2f}")) for name in ("divergence rate", "failure rate")},
    )
    out.insert(out.columns.get_loc("divergence rate") + 1, "95% CI", ci)
    out.insert(out.columns.get_loc("failure rate") + 1, "failure 95% CI", f_ci)
    return out


def table_ids() -> tuple[str, ...]:
    return tuple(TABLES)


# ----------------------------------------------------------------------------- the renderer


def _presets_for(table: str) -> str:
    return ", ".join(f"`{n}`" for n, p in PRESETS.items() if table in p.tables)


def render_table(
    spec: TableSpec,
    runs: pd.DataFrame,
    epochs: pd.DataFrame,
    published: dict,
    figdir: Path,
    bench: dict | None = None,
) -> list[str]:
    """The section of one table: its rows per data group (dataset, scale, model revision), figures,
    extras and notes. ``runs`` has a ``group`` column and is deduplicated; ``bench`` is the data of
    ``mefbench bench --json`` (or None), for the tables computed from it."""
    out = [f"## {spec.title}", ""]
    if spec.from_bench is not None:
        return out + spec.from_bench(bench, figdir) + ([spec.notes, ""] if spec.notes and bench else [])
    pub = published.get(spec.published, {}) if spec.published else {}
    if spec.preamble:
        out += spec.preamble(pub)
    if not spec.from_runs:
        return out + (spec.extra(runs, pub, "") if spec.extra else [])
    mine = agg.cell_frame(agg.in_table(runs, spec.id), spec.id, spec.cell_keys, spec.kind)
    if mine.empty:
        return out + [
            f"No runs for {spec.short} in the runs directory (presets that feed it: {_presets_for(spec.id)}).",
            "",
        ]
    for group, gdf in mine.groupby("group", sort=False):
        rows = spec.rows(gdf, pub)
        table = pd.DataFrame([rows]) if isinstance(rows, dict) else rows
        out += [f"Runs on {group}:", "", markdown_table(table), ""]
        if spec.extra:
            out += spec.extra(gdf, pub, group)
        ctx = fig.FigureContext(spec.id, spec.short, gdf, epochs[epochs["path"].isin(gdf["path"])], group, figdir,
                                spec.cell_keys)  # fmt: skip
        for draw in spec.figures:
            out += draw(ctx)
        if spec.curves:
            out += fig.curves(ctx)
    if spec.notes:
        out += [spec.notes, ""]
    return out

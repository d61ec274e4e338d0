"""The report's tables as data: a :class:`TableSpec` per table in :data:`TABLES`, one renderer.

A spec says which cell a run fills (``cell_keys``, stored in each run record under its table id),
how one data group's runs become rows (``rows``, a pure function in :mod:`.aggregate`), which
figures to draw, where its published numbers are (``published``, a key of ``published.json``) and
its notes. Which runs fill a table: the presets that list its id in ``Preset.tables``. Adding a
table = one spec here + its presets.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..models import MultiScaleFlow, count_parameters
from ..presets import PAPER_MEF, PRESETS, STABILITY_COUPLINGS, TABLE4_COUPLINGS, TABLE4_LRS
from . import aggregate as agg
from . import compare
from . import figures as fig
from . import stability as stab
from .format import DASH, markdown_table, number, params, published_value

__all__ = ["TABLES", "TableSpec", "paper_parameter_counts", "render_table"]

PAPER_STEPS = 50 * 782  # the paper's CIFAR-10 run: 50 epochs of 782 batches of 64


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
        kind: whose variant a ``variant`` cell key names: "mixing" or "coupling".
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
    preamble: Callable[[dict, dict], list[str]] | None = field(default=None)
    from_bench: Callable[[dict | None, Path], list[str]] | None = None


# ----------------------------------------------------------------------------- Table 2's reference


def _unverified_note(pub: dict, sources: dict) -> list[str]:
    """The line under a table of published numbers: where its unverified values come from."""
    used = set()

    def walk(value: object) -> None:
        if isinstance(value, dict):
            if value.get("status") == "unverified" and value.get("source"):
                used.add(value["source"])
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(pub)
    if not used:
        return []
    where = "; and ".join(sources.get(u, u) for u in sorted(used))
    return [f"*(unverified)*: not checked against the paper by this project; from {where}. Check before quoting.",
            ""]  # fmt: skip


def _published_table2(pub: dict, sources: dict) -> list[str]:
    names = pub["datasets"]
    rows = [
        {"model": model, **{label: published_value(values.get(key)) for key, label in names.items()}}
        for model, values in pub["models"].items()
    ]
    notes = [f"{m}: {vals['note']}" for m, vals in pub["models"].items() if vals.get("note")]
    return [
        "Published (the paper's Table 2, test bits/dim on CIFAR-10 / ImageNet, from `mefbench/published.json`; a "
        "table of its own, as no number of ours is comparable with them):",
        "",
        markdown_table(pd.DataFrame(rows)),
        "",
        *_unverified_note(pub, sources),
        *([f"Notes: {'; '.join(notes)}.", ""] if notes else []),
        "Ours, below: MEF runs of this benchmark on the data and at the scale the first column names, "
        "mean ± sample std over seeds of finished runs.",
        "",
    ]


def _published_cells(what: str, pub: dict, sources: dict) -> list[str]:
    """A paper table's published cells (Tables 4–6), in a table of their own."""
    cells = pub.get("cells") or ([dict(pub["m"], statistic="m")] if isinstance(pub.get("m"), dict) else [])
    if not cells:
        return []
    rows = [{k: (published_value(v) if k in ("mean", "std", "max", "min", "epoch_time") else v) for k, v in c.items()}
            for c in cells]  # fmt: skip
    return [f"Published ({what}, from `mefbench/published.json`; a table of its own, never beside a CPU-scale "
            "number):", "", markdown_table(pd.DataFrame(rows)), "", *_unverified_note(pub, sources)]  # fmt: skip


# ----------------------------------------------------------------------------- Table 3 (models)


def paper_count_presets() -> list[tuple[str, str]]:
    """(row label, preset) of the paper-scale models Table 3 counts: MEF on CIFAR-10, the affine
    model of Table 4 and the other 1×1 convs of Table 5 (read from the presets)."""
    rows = [("MEF", PAPER_MEF)]
    seen = {PRESETS[PAPER_MEF].model.to_json()}
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
            else f"{m.mixing} 1×1 conv (Table 5)"
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
            rows.append((label, name, PRESETS[name].train.dataset, cfg.mixing, cfg.coupling, cfg.hidden_channels,
                         cfg.num_blocks, count_parameters(model)))  # fmt: skip
            del model
    finally:
        torch.set_default_dtype(previous)
    return tuple(rows)


def paper_parameter_counts() -> pd.DataFrame:
    """Parameter counts of the paper-scale models of Tables 2, 4 and 5, built on the CPU (cached).

    Columns: model, preset, dataset, mixing, coupling, hidden_channels, num_blocks, num_params.
    """
    cols = ["model", "preset", "dataset", "mixing", "coupling", "hidden_channels", "num_blocks", "num_params"]
    return pd.DataFrame(list(_paper_counts(tuple(paper_count_presets()))), columns=cols)


def _table3(runs: pd.DataFrame, pub: dict, group: str) -> list[str]:
    counts = paper_parameter_counts()
    rows = []
    for model, millions in pub["models"].items():
        match = counts[counts["model"] == model]
        computed = params(match["num_params"].iloc[0]) if len(match) else "not built (baseline)"
        preset = f"`{match['preset'].iloc[0]}`" if len(match) else DASH
        rows.append({"model": model, "preset": preset, "ours: computed, paper scale": computed,
                     "published (Table 3), millions": published_value(millions, 1)})  # fmt: skip
    for r in counts.itertuples():
        if r.model not in pub["models"]:
            rows.append({"model": r.model, "preset": f"`{r.preset}`", "ours: computed, paper scale": params(r.num_params),
                         "published (Table 3), millions": DASH})  # fmt: skip
    out = [
        markdown_table(pd.DataFrame(rows)),
        "",
        "Computed: `count_parameters(MultiScaleFlow(PRESETS[preset].model))` at the paper's settings (CIFAR-10). "
        "Published: the paper's Table 3 (both are paper-scale parameter counts, so they share a row).",
        "",
        *_matcher_check(),
    ]
    paper = {"2", "4", "5", "6"}  # the zoo tables show their own parameter counts
    runs = runs[runs["tables"].map(lambda t: bool(paper & set(t)))] if len(runs) else runs
    if runs.empty:
        return out
    keys = ["preset", "scale", "dataset", "mixing", "coupling", "hidden_channels", "num_blocks"]
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
    per_run.insert(2, "stopped", [compare.convergence(runs.loc[[i]]) for i in runs.index])
    return ["Per run:", "", markdown_table(per_run), ""]


def _matcher_check() -> list[str]:
    """The parameter matcher at paper scale: the width it picks for every coupling against MEF's
    37.7M parameters (the paper chose hidden 132 for affine by hand)."""
    from ..layers import COUPLING, registry_variants
    from ..matching import match_hidden_channels, parameter_count

    mef = PRESETS[PAPER_MEF].model
    target = parameter_count(mef)
    rows = []
    for coupling, label, options in registry_variants(COUPLING):
        if label not in ("default", "tanh"):
            continue  # the other scale maps have the tanh variant's count, give or take 4 scalars per layer
        config = match_hidden_channels(dataclasses.replace(mef, coupling=coupling, coupling_options=options), target)
        n = parameter_count(config)
        rows.append({"coupling": coupling, "hidden chosen": config.hidden_channels, "params": params(n),
                     "params / MEF": f"{n / target:.4f}"})  # fmt: skip
    return ["The parameter matcher (`mefbench.matching.match_hidden_channels`) at paper scale: the width of each "
            f"coupling's net whose model is nearest MEF's {target:,} parameters (the paper gives its affine model "
            "hidden 132):", "", markdown_table(pd.DataFrame(rows)), ""]  # fmt: skip


def _table4_extra(runs: pd.DataFrame, pub: dict, group: str) -> list[str]:
    """Table 4's sentence: per lr, affine − matexp paired; per coupling, the low rate − the paper's."""
    by = dict(agg._cells(runs, ["coupling", "lr"]))
    ours, other = TABLE4_COUPLINGS[-1], TABLE4_COUPLINGS[0]
    parts = []
    for lr in sorted({k[1] for k in by}, reverse=True):
        if (other, lr) in by and (ours, lr) in by:
            d = compare.paired(by[(other, lr)], by[(ours, lr)])
            parts.append(f"at lr {lr:g}, {other} − {ours} = {compare.difference_text(d)}: {_verdict(d)}")
    for coupling in (ours, other):
        low, high = min(TABLE4_LRS), max(TABLE4_LRS)
        if (coupling, low) in by and (coupling, high) in by:
            d = compare.paired(by[(coupling, low)], by[(coupling, high)])
            parts.append(f"{coupling} at lr {low:g} − at lr {high:g} = {compare.difference_text(d)}: {_verdict(d)}")
    if not parts:
        return []
    seeds = sorted({int(agg.finished(cell).sum()) for cell in by.values()})
    text = (f"**What this shows:** test bits/dim differences paired over seeds (finished seeds per cell: "
            f"{'/'.join(map(str, seeds))}; 95% t intervals): " + "; ".join(parts) + ". "
            + compare.convergence_sentence(runs))  # fmt: skip
    return [text.strip(), ""]


def _verdict(d) -> str:
    if d.n < 2 or not np.isfinite(d.low):
        return "too few paired seeds for an interval"
    if d.high < 0:
        return "measurably lower"
    if d.low > 0:
        return "measurably higher"
    return "not distinguishable at this scale"


def _comparison_extra(label_of, reference: tuple, keys: tuple[str, ...], kind: str, timed: bool):
    """The sentence under Table 5 and the mixing table: every row against the reference row."""

    def extra(runs: pd.DataFrame, pub: dict, group: str) -> list[str]:
        cells = agg._layer_cells(runs, kind, []) if "variant" in keys else agg._cells(runs, list(keys))
        labels = [label_of(*key) for key, _ in cells]
        ref = next((lab for (key, _), lab in zip(cells, labels, strict=True) if key == reference), label_of(*reference))
        rows = compare.compare_rows([(lab, cell) for (_, cell), lab in zip(cells, labels, strict=True)], ref)
        lines = [" ".join(filter(None, [compare.what_this_shows(rows, ref), compare.convergence_sentence(runs)])), ""]
        if timed:
            lines += [_TIMES_NOTE, ""]
        return lines

    return extra


_TIMES_NOTE = (
    "Times: training time per epoch (evaluation excluded), each run's median over its epochs; the ratio pairs runs "
    "of one seed, geometric mean over seeds with the t interval of the log ratios. The runs were timed one after "
    "another on one machine (see Versions and machines), not side by side, so a ratio also carries whatever else "
    "that machine did meanwhile."
)


def _outcome_rows(df: pd.DataFrame, pub: dict) -> pd.DataFrame:
    return stab.display(stab.outcome_rows(df))


def _stability_extra(runs: pd.DataFrame, pub: dict, group: str) -> list[str]:
    ours = ("matexp", "default")
    bounded = next((c for c in STABILITY_COUPLINGS if c[0] == "affine" and c[1] != "exp"), ("affine", "tanh"))
    paper = PRESETS[PAPER_MEF]
    from ..matching import parameter_count

    out = [*stab.sensitivity(runs), ""]
    out += [f"- {claim}" for claim in stab.claims(runs, ours, bounded)] + [""]
    out += [stab.proxy_limits(runs, parameter_count(paper.model), PAPER_STEPS), ""]
    return out


def _stress_extra(runs: pd.DataFrame, pub: dict, group: str) -> list[str]:
    out = [*stab.sensitivity(runs), ""]
    out += [f"- {claim}" for claim in stab.claims(runs)] + [""]
    return out


_OUTCOME_NOTES = (
    "Outcomes, from each run's record (`mefbench.outcomes`): **diverged**, a loss or an evaluation became non-finite "
    "(the run stops there, with its step); **blow-up**, it did not diverge but a training loss rose above "
    f"{stab.BLOW_UP:g} × its initial loss (the loss of step 1); **worse than start**, it did not diverge but ended "
    "with a validation bits/dim (EMA weights, on the held-out validation photograph) above the one of the model "
    "before training. A run can blow up and end worse than it started. Rates: over the runs that finished or "
    "diverged, per learning rate, with Wilson 95% intervals. Worst spike: the run's largest training loss over its "
    "initial loss (median [min, max] over seeds), and the step of the largest of the cell. Final / initial: the "
    "final validation bits/dim over the initial one. Parameters: each coupling's net width is chosen so that the "
    "model's count matches the matrix-exp model's (`mefbench.matching`). Matrix-exp 1×1 conv in all."
)


# ----------------------------------------------------------------------------- scaling (bench)


def _scaling_section(bench: dict | None, figdir: Path) -> list[str]:
    """The scaling rows of a ``mefbench bench --scaling --json`` file: a table of fitted exponents
    against the stated costs, the layers that disagree, and the log-log figures."""
    data = agg.scaling_frames(bench)
    if data is None:
        return ["Not included: no bench results with the scaling part were given "
                "(`mefbench bench --scaling --json FILE`, then `mefbench report --bench FILE`).", ""]  # fmt: skip
    assert bench is not None  # scaling_frames found its rows
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
            preamble=_published_table2, seeds=5,
            notes=("Test bits/dim (EMA): the trained EMA model's final evaluation, on the whole test split at cpu scale "
                   "(the test photographs, one dequantisation sample per image; the column says how many images); raw: the raw weights on the fixed subset each epoch evaluates. "
                   "Mean ± sample std over seeds of finished runs. Stopped: how many runs reached the plateau of "
                   "their validation bits/dim and at which step, and how many the step cap."),
        ),
        TableSpec(
            "3", "Table 3: number of parameters", "Table 3",
            "parameter counts at the paper's scale, computed from the models",
            published="table3", extra=_table3, from_runs=False, curves=False, seeds=0,
        ),
        TableSpec(
            "4", "Table 4: coupling × learning rate (test bits/dim)", "Table 4",
            "affine vs matrix-exp coupling × learning rate 1e-3 / 1e-2, parameter-matched, paired over 5 seeds",
            cell_keys=("coupling", "lr"), rows=agg.table4_rows, figures=(fig.lr_errorbars,), published="table4",
            extra=_table4_extra, seeds=5,
            notes=("Test bits/dim: the trained EMA model's final evaluation (the whole test split at cpu scale), mean ± sample std over seeds of "
                   "finished runs (a diverged run is counted in `runs` and `diverged` and left out). Difference: to "
                   "the paper's MEF cell, paired by seed, mean with its 95% t interval; rank: the rank range the "
                   "paired intervals allow (rows that no interval separates share ranks; per-pair intervals, not "
                   "adjusted). The two couplings are parameter-matched: the affine net's width is chosen so that its "
                   "model's count is within 1% of the matrix-exp model's (`mefbench.matching`); params / reference "
                   "says how close. lr 1e-3 has twice the step cap. Matrix-exp 1×1 conv in all."),
        ),
        TableSpec(
            "5", "Table 5: 1×1 convolutions (bits/dim and time per epoch)", "Table 5",
            "standard vs PLU vs matrix-exp 1×1 conv: bits/dim and time per epoch, paired over 5 seeds",
            cell_keys=("mixing",), kind="mixing", rows=agg.table5_rows, figures=(fig.epoch_time_bars,), published="table5",
            extra=_comparison_extra(lambda c: c, (next(iter(agg.MIXING)),), ("mixing",), "mixing", True), seeds=5,
            notes=("bits/dim: the trained EMA model's final evaluation (the whole test split at cpu scale), mean ± sample std over seeds of finished "
                   "runs; difference to the standard conv paired by seed with its 95% t interval, and the rank range. "
                   "Matrix-exp coupling and lr 0.01 in all; `form` is the conv's variant (`free`: PLU with U's "
                   "diagonal learned directly, as in the official code and the paper's table)."),
        ),
        TableSpec(
            "6", "Table 6: series length m of the matrix exponential", "Table 6",
            "mean, std, max, min of the series length m (and squarings s) during training",
            cell_keys=("dataset",), rows=agg.table6_rows, figures=(fig.m_per_run,), published="table6",
            extra=_table6_per_run, seeds=5,
            notes=("m: number of Taylor terms of a matrix exponential (or its action on a vector); s: number of "
                   "squarings (or steps). Statistics over every recorded expm call of the runs' finished epochs (all "
                   "statuses), pooled from each run's count, mean and population std with `mefbench.stats.pool_stats`."),
        ),
        TableSpec(
            "mixing", "Every mixing layer (next to Table 5)", "every mixing layer",
            "every mixing layer of the zoo and its variants: bits/dim paired over 5 seeds, parameters, time, memory",
            cell_keys=("mixing", "variant"), kind="mixing", rows=agg.mixing_rows,
            figures=(fig.quality_vs_time, fig.epoch_time_bars), published="mixing",
            extra=_comparison_extra(agg.mixing_label, (next(iter(agg.MIXING)), "default"), ("mixing", "variant"),
                                    "mixing", True), seeds=5,
            notes=("Every entry of `mefbench.layers.MIXING` and each of its variants in Table 5's setting (matrix-exp "
                   "coupling, lr 0.01). bits/dim: the trained EMA model's final evaluation (the whole test split at cpu scale); difference to the "
                   "standard conv paired by seed (95% t interval) and the rank range. Params / standard: the model's "
                   "count over the standard conv model's (the mixing layers are not matched: their counts differ by "
                   "what each layer needs). Sampling: the trained EMA model's inverse, per image; round-trip error: "
                   "max |x − f⁻¹(f(x))| of the trained model on a test batch in float32 (largest over seeds); peak "
                   "memory: of one training step, in MiB (2^20 bytes; on the CPU, the tensors saved for backward plus "
                   "parameters, gradients and optimiser state; on a GPU, the allocator's peak)."),
        ),
        TableSpec(
            "stability", "Stability: the paper's recipe at a proxy scale, coupling × learning rate", "stability",
            "affine (tanh, exp), additive, matrix-exp and spline couplings × lr 1e-3…1e-1 × 5 seeds, the paper's "
            "recipe at a proxy scale: divergence, blow-up, ending worse than the start",
            cell_keys=("coupling", "variant", "lr"), rows=_outcome_rows,
            figures=(fig.outcomes_vs_lr, fig.loss_curves), extra=_stability_extra, seeds=5, curves=False,
            notes=_OUTCOME_NOTES + (" At cpu scale the recipe is the paper's at a proxy scale (see `mefbench "
                                    "presets`: Adamax, warm-up over the first 2% of the steps, lr × 0.5 at 80%, EMA "
                                    "weights, a fixed length); at paper scale it is Table 4's, whose lr-0.01 cells are "
                                    "Table 4's runs."),
        ),
        TableSpec(
            "stress", "Stress: every coupling × learning rate, 100 steps without warm-up", "stress",
            "every coupling and scale map × lr 1e-3…1e-1 × 3 seeds, 100 steps without warm-up: the harsher grid",
            cell_keys=("coupling", "variant", "lr"), rows=_outcome_rows, figures=(fig.outcomes_vs_lr,),
            extra=_stress_extra, seeds=3, curves=False,
            notes=_OUTCOME_NOTES + (" The stress grid is not the paper's recipe: 100 steps from the first step at the "
                                    "full rate, no warm-up, a small net; parameter counts matched at a fixed width "
                                    "(see each row's params)."),
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
    sources = published.get("sources", {})
    if spec.preamble:
        out += spec.preamble(pub, sources)
    if not spec.from_runs:
        return out + (spec.extra(runs, pub, "") if spec.extra else [])
    mine = agg.cell_frame(agg.in_table(runs, spec.id), spec.id, spec.cell_keys, spec.kind)
    if mine.empty:
        return out + [
            f"No runs for {spec.short} in the runs directory (presets that feed it: {_presets_for(spec.id)}).",
            "",
        ]
    assert spec.rows is not None  # a table from runs has rows
    for key, gdf in mine.groupby("group", sort=False):
        group = str(key)
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
    if spec.id in ("4", "5", "6"):
        out += _published_cells(f"the paper's Table {spec.id}", pub, sources)
    elif spec.id == "mixing" and pub.get("layers"):
        out += ["Published (each mixing layer's own paper, CIFAR-10 bits/dim, in that paper's own model and training; "
                "not comparable with each other or with the rows above):", "",
                markdown_table(agg.mixing_published(pub)), "", *_unverified_note(pub, sources)]  # fmt: skip
    return out

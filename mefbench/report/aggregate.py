"""Pure pandas: the run records (:func:`mefbench.results.load_runs`) aggregated per report table.

Every function takes the runs of one table and one data group (dataset, scale, model revision)
and returns the rows that table shows; nothing here draws, writes or formats markdown. The
scaling table's come from ``mefbench bench --scaling --json`` data instead (:func:`scaling_frames`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable

import numpy as np
import pandas as pd

from ..layers import COUPLING, MIXING, canonical_options
from ..models import MODEL_REVISION
from ..stats import pool_stats, wilson_interval
from .format import DASH, number, params, pm, published_pm

__all__ = [
    "cell_frame",
    "counts",
    "dedupe",
    "finished",
    "group_label",
    "in_table",
    "mixing_rows",
    "normalise",
    "scaling_frames",
    "scaling_rows",
    "stability_rows",
    "stability_summary",
    "table2_rows",
    "table4_rows",
    "table5_rows",
    "table6_rows",
    "variant_of",
]

_STATUS_RANK = {"finished": 0, "diverged": 1, "interrupted": 2, "running": 3}


# ----------------------------------------------------------------------------- runs -> cells


def group_label(dataset: str, scale: object, revision: object = MODEL_REVISION) -> str:
    scale = scale if isinstance(scale, str) and scale else "unlabelled"
    label = f"{dataset}, {scale} scale"
    if revision is None or (isinstance(revision, float) and math.isnan(revision)):
        return label + ", model revision unknown"
    if int(revision) != MODEL_REVISION:
        label += f", model revision {int(revision)}"
    return label


def finished(df: pd.DataFrame) -> pd.Series:
    return (df["status"] == "finished") & np.isfinite(pd.to_numeric(df["test_bpd"], errors="coerce"))


def counts(df: pd.DataFrame) -> dict:
    """runs, finished, diverged, unfinished (interrupted or still 'running') of a group."""
    return {
        "runs": len(df),
        "finished": int(finished(df).sum()),
        "diverged": int((df["status"] == "diverged").sum()),
        "unfinished": int(df["status"].isin(["interrupted", "running"]).sum()),
    }


def in_table(df: pd.DataFrame, table: str) -> pd.DataFrame:
    return df[df["tables"].map(lambda t: table in {str(v) for v in (t or ())}).astype(bool)]


def normalise(df: pd.DataFrame) -> pd.DataFrame:
    """The run frame with the columns the tables read, whatever the records' schema: table ids
    as strings, and cells / options / model revision / final metrics present (empty or NaN)."""
    df = df.copy()
    df["tables"] = df["tables"].map(lambda t: tuple(str(v) for v in (t or ())))
    defaults = {"cells": dict, "conv_options": dict, "coupling_options": dict}
    for col, make in defaults.items():
        if col not in df:
            df[col] = [make() for _ in range(len(df))]
        df[col] = df[col].map(lambda v, make=make: v if isinstance(v, dict) else make())
    for col in ("model_revision", "sample_time_per_image_s", "roundtrip_error", "peak_memory_bytes"):
        if col not in df:
            df[col] = np.nan
    return df


def dedupe(df: pd.DataFrame) -> tuple[pd.DataFrame, list[dict]]:
    """One run per experiment and seed: the same configuration (model and recipe, ``config``) and
    seed recorded twice, e.g. by two sweeps into two directories or by a sweep and a hand-started
    run of another preset with the same settings, is one seed, not two. Keeps the finished one,
    else the most advanced, else the latest; returns the kept frame and a list of
    {"kept", "dropped", "preset", "seed", "kept_status"}."""
    if df.empty:
        return df, []
    key = df["config"] if "config" in df else df["preset"]
    keyed = df.assign(
        _key=key,
        _rank=df["status"].map(_STATUS_RANK).fillna(9),
        _done=-pd.to_numeric(df["epochs_done"], errors="coerce").fillna(0),
        _when=df["updated_at"].astype(str) if "updated_at" in df else "",
        _rev=df["model_revision"] if "model_revision" in df else MODEL_REVISION,
    )
    has_key = keyed["_key"].notna()
    ordered = keyed[has_key].sort_values(["_rank", "_done", "_when", "path"], ascending=[True, True, False, True])
    duplicates = []
    keep_index = []
    for _, g in ordered.groupby(["_key", "seed", "_rev"], sort=False, dropna=False):
        keep_index.append(g.index[0])
        first = g.iloc[0]
        for _, row in g.iloc[1:].iterrows():
            duplicates.append({"preset": row["preset"], "seed": row["seed"], "kept": first["run"], "dropped": row["run"],
                               "kept_status": first["status"]})  # fmt: skip
    kept = df.loc[sorted(keep_index) + list(df.index[~has_key])]
    return kept.sort_index(), duplicates


def variant_of(kind: str, name: str, options: object) -> str:
    """The label of the class variant whose options match, "default" for the default options, or
    the options themselves (JSON) when no variant matches."""
    registry = MIXING if kind == "conv" else COUPLING
    options = options if isinstance(options, dict) else {}
    cls = registry.get(name)
    if cls is None:
        return "default" if not options else json.dumps(options, sort_keys=True)
    mine = canonical_options(cls, options)
    for label, opts in (getattr(cls, "variants", None) or {}).items():
        if canonical_options(cls, opts) == mine:
            return label
    return "default" if not mine else json.dumps(mine, sort_keys=True)


def _fallback(row: pd.Series, key: str) -> object:
    if key == "variant":
        table_kind = "conv" if row.get("_kind") == "conv" else "coupling"
        name = row.get(table_kind)
        return variant_of(table_kind, name, row.get(f"{table_kind}_options"))
    return row.get(key)


def cell_frame(df: pd.DataFrame, table: str, keys: Iterable[str], kind: str = "coupling") -> pd.DataFrame:
    """df with one column per cell key: the cell the record stores for this table, or (for records
    that do not store it) the value read from the run's configuration."""
    keys = list(keys)
    if df.empty:
        return df.assign(**{k: pd.Series(dtype=object) for k in keys})
    cells = []
    for _, row in df.assign(_kind=kind).iterrows():
        stored = row.get("cells") if isinstance(row.get("cells"), dict) else {}
        mine = dict(stored.get(table) or {})
        cells.append({k: mine[k] if k in mine else _fallback(row, k) for k in keys})
    return df.assign(**{k: [c[k] for c in cells] for k in keys})


def _order(values: Iterable, key: str) -> list:
    """Cell values in registry order (names), variant order, or numeric order (rates)."""
    values = list(dict.fromkeys(v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))))
    if key in ("conv", "coupling"):
        registry = list(MIXING if key == "conv" else COUPLING)
        return [v for v in registry if v in values] + sorted(v for v in values if v not in registry)
    if all(isinstance(v, (int, float)) for v in values):
        return sorted(values)
    return values


def _cells(df: pd.DataFrame, keys: list[str]) -> list[tuple[tuple, pd.DataFrame]]:
    """(cell values, runs) in table order: the first key's order, then the next within it."""
    out = []

    def walk(sub: pd.DataFrame, prefix: tuple, rest: list[str]) -> None:
        if not rest:
            out.append((prefix, sub))
            return
        key = rest[0]
        for value in _order(sub[key], key):
            walk(sub[sub[key] == value], (*prefix, value), rest[1:])

    walk(df, (), keys)
    return out


def _variant_rank(kind: str, name: str, label: str) -> int:
    cls = (MIXING if kind == "conv" else COUPLING).get(name)
    labels = list((getattr(cls, "variants", None) or {}).keys())
    return labels.index(label) if label in labels else len(labels)


def _layer_cells(df: pd.DataFrame, kind: str, extra: list[str]) -> list[tuple[tuple, pd.DataFrame]]:
    cells = _cells(df, [kind, "variant", *extra])
    return sorted(cells, key=lambda c: (_order(df[kind], kind).index(c[0][0]), _variant_rank(kind, c[0][0], c[0][1])))


# ----------------------------------------------------------------------------- the tables


def table2_rows(df: pd.DataFrame) -> dict:
    fin = df[finished(df)]
    return {
        "presets": ", ".join(sorted(map(str, df["preset"].dropna().unique()))), **counts(df),
        "seeds": ", ".join(str(s) for s in sorted(fin["seed"].unique())),
        "epochs": ", ".join(str(e) for e in sorted(df["epochs"].unique())),
        "test bpd (EMA)": pm(fin["test_bpd"]), "test bpd (raw)": pm(fin["test_bpd_raw"]),
        "train bpd": pm(fin["train_bpd"]),
        "params": ", ".join(params(p) for p in sorted(df["num_params"].dropna().unique())),
    }  # fmt: skip


def table4_rows(df: pd.DataFrame, published: dict) -> pd.DataFrame:
    cells = published.get("cells", [])

    def paper(coupling: str, lr: float) -> str:
        for c in cells:
            if c["coupling"] == coupling and math.isclose(c["lr"], lr, rel_tol=1e-9):
                return published_pm(c["mean"], c["std"])
        return "not in the paper"

    rows = []
    for (coupling, lr), cell in _cells(df, ["coupling", "lr"]):
        rows.append({
            "coupling": coupling, "lr": f"{lr:g}", "epochs": ", ".join(str(e) for e in sorted(cell["epochs"].unique())),
            **counts(cell), "test bits/dim": pm(cell.loc[finished(cell), "test_bpd"]),
            "published (CIFAR-10)": paper(coupling, lr),
        })  # fmt: skip
    return pd.DataFrame(rows)


def _reference_time(df: pd.DataFrame, key: str, reference: str) -> float:
    timed = df[df["epochs_done"] > 0]
    ref = timed.loc[timed[key] == reference, "mean_epoch_time_s"]
    return float(ref.mean()) if len(ref) else math.nan


def table5_rows(df: pd.DataFrame, published: dict) -> pd.DataFrame:
    cells = {c["conv"]: c for c in published.get("cells", [])}
    reference = next(iter(MIXING), None)  # the registry's first: the standard 1×1 conv
    ref_time = _reference_time(df, "conv", reference)
    rows = []
    for (conv,), cell in _cells(df, ["conv"]):
        t = cell.loc[cell["epochs_done"] > 0, "mean_epoch_time_s"]
        ratio = t.mean() / ref_time if len(t) and ref_time > 0 else math.nan
        pub = cells.get(conv)
        rows.append({
            "conv": conv, "form": ", ".join(sorted({variant_of("conv", conv, o) for o in cell["conv_options"]})), **counts(cell),
            "bits/dim": pm(cell.loc[finished(cell), "test_bpd"]), "time per epoch (s)": pm(t, 2),
            f"time / {reference}": number(ratio, "{:.2f}"),
            "device": ", ".join(sorted(map(str, cell["device"].unique()))),
            "published bits/dim (CIFAR-10)": published_pm(pub["mean"], pub["std"]) if pub else "not in the paper",
            "published time": "see paper" if pub and pub.get("epoch_time") is None else (pub or {}).get("epoch_time", DASH),
        })  # fmt: skip
    return pd.DataFrame(rows)


def table6_rows(df: pd.DataFrame, published: dict) -> pd.DataFrame:
    pub_m = published.get("m", {})
    rows = []
    for name in ("m", "s"):
        parts = [
            {k: r[f"{name}_{k}"] for k in ("count", "mean", "std", "max", "min")}
            for _, r in df.iterrows()
            if r[f"{name}_count"] > 0
        ]
        p = pool_stats(parts)
        row = {
            "": name,
            "mean": DASH,
            "std": DASH,
            "max": DASH,
            "min": DASH,
            "expm calls": 0,
            "runs pooled": len(parts),
        }
        if p:
            row.update(mean=f"{p['mean']:.3f}", std=f"{p['std']:.3f}", max=f"{p['max']:g}", min=f"{p['min']:g}",
                       **{"expm calls": int(p["count"])})  # fmt: skip
        pub = [pub_m.get(k) for k in ("mean", "std", "max", "min")] if name == "m" else None
        if pub is None:
            row["published (paper)"] = DASH
        elif all(v is None for v in pub):
            row["published (paper)"] = "see paper"
        else:
            row["published (paper)"] = " / ".join(DASH if v is None else f"{v:g}" for v in pub)
        rows.append(row)
    return pd.DataFrame(rows)


def mixing_rows(df: pd.DataFrame, published: dict) -> pd.DataFrame:
    layers = published.get("layers", {})
    reference = next(iter(MIXING), None)
    ref_time = _reference_time(df, "conv", reference)
    rows = []
    for (conv, variant), cell in _layer_cells(df, "conv", []):
        fin = cell[finished(cell)]
        t = cell.loc[cell["epochs_done"] > 0, "mean_epoch_time_s"]
        cls = MIXING.get(conv)
        pub = layers.get(conv, {})
        value = pub.get("cifar10") if (variant in pub.get("variants", [variant])) else None
        rows.append({
            "layer": conv, "variant": variant, "family": cls.info.family if cls else DASH, **counts(cell),
            "bits/dim": pm(fin["test_bpd"]),
            "params": ", ".join(params(p) for p in sorted(cell["num_params"].dropna().unique())),
            "time per epoch (s)": pm(t, 2),
            f"time / {reference}": number(t.mean() / ref_time if len(t) and ref_time > 0 else math.nan, "{:.2f}"),
            "sampling (ms / image)": pm(1e3 * _col(fin, "sample_time_per_image_s"), 3),
            "round-trip error": _roundtrip(_col(fin, "roundtrip_error")),
            "peak memory (MB)": pm(_col(fin, "peak_memory_bytes") / 2**20, 1),
            "published bits/dim (own paper, CIFAR-10)": f"{value:.2f} ({pub.get('source')})" if value is not None else "not available",
        })  # fmt: skip
    return pd.DataFrame(rows)


def _roundtrip(errors: pd.Series) -> str:
    """The largest round-trip error of the finished runs, and how many trained models the inverse
    failed on (recorded as inf, with the reason in the record's ``measure_error``)."""
    finite = errors[np.isfinite(errors)]
    failed = int(np.isinf(errors).sum())
    text = number(finite.max(), "{:.1e}") if len(finite) else DASH
    return text if not failed else f"{text}; inverse failed in {failed} of {len(errors)}"


def _col(df: pd.DataFrame, name: str) -> pd.Series:
    if name not in df:
        return pd.Series(np.nan, index=df.index, dtype=float)
    return pd.to_numeric(df[name], errors="coerce")


# The uniform density on the 256 levels of 8-bit data scores exactly 8 bits/dim: a run that ends
# above it has learned less than nothing, whatever its loss did on the way.
UNIFORM_BPD = 8.0


def stability_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Per (coupling, variant, lr): runs, diverged, divergence rate with its Wilson 95% interval,
    the steps at which runs diverged, the finished runs that ended worse than the uniform density
    (> 8 bits/dim), the failure rate (diverged or worse than uniform), and bits/dim of the finished
    runs (median and range: a failed run's can be astronomically large). Unfinished runs (still
    running or interrupted) are counted apart and left out of the rates."""
    rows = []
    for (coupling, variant, lr), cell in _layer_cells(df, "coupling", ["lr"]):
        c = counts(cell)
        decided = c["finished"] + c["diverged"]
        low, high = wilson_interval(c["diverged"], decided) if decided else (math.nan, math.nan)
        steps = pd.to_numeric(cell.loc[cell["status"] == "diverged", "diverged_step"], errors="coerce").dropna()
        bpd = pd.to_numeric(cell.loc[finished(cell), "test_bpd"], errors="coerce")
        worse = int((bpd > UNIFORM_BPD).sum())
        failed = c["diverged"] + worse
        f_low, f_high = wilson_interval(failed, decided) if decided else (math.nan, math.nan)
        rows.append({
            "coupling": coupling, "variant": variant, "lr": lr, **c,
            "divergence rate": c["diverged"] / decided if decided else math.nan,
            "rate 95% CI low": low, "rate 95% CI high": high,
            "diverged at step": ", ".join(f"{int(s)}" for s in sorted(steps)) or DASH,
            "worse than uniform": worse,
            "failure rate": failed / decided if decided else math.nan,
            "failure 95% CI low": f_low, "failure 95% CI high": f_high,
            "bits/dim (finished): median [min, max]": _median_range(bpd),
        })  # fmt: skip
    return pd.DataFrame(rows)


def _median_range(values: pd.Series) -> str:
    v = values[np.isfinite(values)]
    if v.empty:
        return DASH
    fmt = lambda x: f"{x:.3f}" if abs(x) < 1e4 else f"{x:.2e}"  # noqa: E731
    return fmt(v.median()) if len(v) == 1 else f"{fmt(v.median())} [{fmt(v.min())}, {fmt(v.max())}]"


def stability_summary(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (coupling, variant): the largest rate of the grid at which no run diverged (and every
    smaller rate had none either), the same for failures (diverged or worse than uniform), and the
    totals."""
    out = []
    if rows.empty:
        return pd.DataFrame(out)
    for (coupling, variant), g in rows.groupby(["coupling", "variant"], sort=False):
        g = g.sort_values("lr")
        decided = int((g["finished"] + g["diverged"]).sum())
        out.append({
            "coupling": coupling, "variant": variant,
            "largest lr with no divergence": number(_largest_safe(g, g["diverged"]), "{:g}"),
            "largest lr with no failure": number(_largest_safe(g, g["diverged"] + g["worse than uniform"]), "{:g}"),
            "diverged / decided runs": f"{int(g['diverged'].sum())} / {decided}",
            "failed / decided runs": f"{int((g['diverged'] + g['worse than uniform']).sum())} / {decided}",
        })  # fmt: skip
    return pd.DataFrame(out)


def _largest_safe(rows: pd.DataFrame, bad: pd.Series) -> float:
    """The largest rate at which, and below which, every decided run was good (NaN if none)."""
    safe = math.nan
    for i, r in rows.iterrows():
        if r["finished"] + r["diverged"] == 0 or bad[i] > 0:
            break
        safe = r["lr"]
    return safe


# ----------------------------------------------------------------------------- scaling (bench data)


def scaling_frames(bench: dict | None) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """(fits, points) of the scaling rows of ``mefbench bench --json`` data, or None without them.

    fits: one row per layer and timed call (kind, layer, part, stated, C and n exponents with their
    intervals and expectations, counts, problem), with the grid and tolerance in ``attrs``; points:
    one row per grid point (kind, layer, part, C, H, n, time_s, repeats, skipped). Each fit comes
    in two bench rows (its C and n exponents): it is taken once.
    """
    rows = (bench or {}).get("rows") or []
    found = [r["data"]["scaling"] for r in rows if isinstance(r.get("data"), dict) and "scaling" in r["data"]]
    if not found:
        return None
    fits, points, seen = [], [], set()
    for item in found:
        fit = item["fit"]
        key = (fit["kind"], fit["layer"], fit["part"])
        if key in seen:
            continue
        seen.add(key)
        flat = {k: v for k, v in fit.items() if k not in ("C", "n", "skipped")}
        flat["not measured"] = len(fit.get("skipped") or [])
        for var in ("C", "n"):
            exp = fit.get(var) or {}
            for field in ("value", "low", "high", "expected", "disagrees"):
                flat[f"{var}_{field}"] = exp.get(field, math.nan if field != "disagrees" else None)
        fits.append(flat)
        points += item["points"]
    out = pd.DataFrame(fits)
    out.attrs.update(grid=found[0]["grid"], tolerance=found[0]["tolerance"], quick=bool((bench or {}).get("quick")))
    return out, pd.DataFrame(points)


def scaling_rows(fits: pd.DataFrame) -> pd.DataFrame:
    """The scaling table: per layer and timed call, the fitted exponents with their 95% intervals
    beside those the stated cost expects on the same points, and the verdict."""

    def exponent(row: pd.Series, var: str) -> str:
        value = row[f"{var}_value"]
        if not np.isfinite(value):
            return DASH
        return f"{value:.2f} [{row[f'{var}_low']:.2f}, {row[f'{var}_high']:.2f}]"

    def verdict(row: pd.Series) -> str:
        if isinstance(row.get("problem"), str) and row["problem"]:
            return f"no fit: {row['problem']}"
        if fits.attrs.get("quick"):
            return "not judged (--quick)"
        return "disagrees" if row["C_disagrees"] or row["n_disagrees"] else "agrees"

    return pd.DataFrame({
        "kind": fits["kind"], "layer": fits["layer"], "timed": fits["part"], "stated cost": fits["stated"],
        "C: measured [95% CI]": [exponent(r, "C") for _, r in fits.iterrows()],
        "C: stated": fits["C_expected"].map(lambda v: number(v, "{:.2f}")),
        "n: measured [95% CI]": [exponent(r, "n") for _, r in fits.iterrows()],
        "n: stated": fits["n_expected"].map(lambda v: number(v, "{:.2f}")),
        "points fitted / measured / not measured": [
            f"{r['points_fitted']} / {r['points_measured']} / {r['not measured']}" for _, r in fits.iterrows()
        ],
        "verdict": [verdict(r) for _, r in fits.iterrows()],
    })  # fmt: skip

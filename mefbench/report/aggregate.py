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

from ..layers import COUPLING, MIXING, canonical_options, layer_variants
from ..models import MODEL_REVISION
from ..stats import as_float, pool_stats
from .format import DASH, number, params, pm

__all__ = [
    "cell_frame",
    "counts",
    "dedupe",
    "finished",
    "group_label",
    "in_table",
    "mixing_label",
    "mixing_published",
    "mixing_rows",
    "normalise",
    "scaling_frames",
    "scaling_rows",
    "table2_rows",
    "table4_label",
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
    number = as_float(revision)
    if math.isnan(number):
        return label + ", model revision unknown"
    if int(number) != MODEL_REVISION:
        label += f", model revision {int(number)}"
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
    defaults = {"cells": dict, "mixing_options": dict, "coupling_options": dict}
    for col, make in defaults.items():
        if col not in df:
            df[col] = pd.Series([make() for _ in range(len(df))], index=df.index, dtype=object)
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


def variant_of(kind: str, name: str | None, options: object) -> str:
    """The label of the class's variant (:func:`~mefbench.layers.layer_variants`, "default" for
    the defaults) whose options match, or the options themselves (JSON) when none matches."""
    registry = MIXING if kind == "mixing" else COUPLING
    options = options if isinstance(options, dict) else {}
    cls = registry.get(name)
    if cls is None:
        return "default" if not options else json.dumps(options, sort_keys=True)
    mine = canonical_options(cls, options)
    for label, opts in layer_variants(cls).items():
        if canonical_options(cls, opts) == mine:
            return label
    return json.dumps(mine, sort_keys=True)


def _fallback(row: pd.Series, key: str) -> object:
    if key == "variant":
        table_kind = "mixing" if row.get("_kind") == "mixing" else "coupling"
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
    return df.assign(**{k: pd.Series([c[k] for c in cells], index=df.index) for k in keys})


def _order(values: Iterable, key: str) -> list:
    """Cell values in registry order (names), variant order, or numeric order (rates)."""
    values = list(dict.fromkeys(v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))))
    if key in ("mixing", "coupling"):
        registry = list(MIXING if key == "mixing" else COUPLING)
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
    cls = (MIXING if kind == "mixing" else COUPLING).get(name)
    labels = list(layer_variants(cls)) if cls is not None else []
    return labels.index(label) if label in labels else len(labels)


def _layer_cells(df: pd.DataFrame, kind: str, extra: list[str]) -> list[tuple[tuple, pd.DataFrame]]:
    cells = _cells(df, [kind, "variant", *extra])
    return sorted(cells, key=lambda c: (_order(df[kind], kind).index(c[0][0]), _variant_rank(kind, c[0][0], c[0][1])))


# ----------------------------------------------------------------------------- the tables


def _stopped(cell: pd.DataFrame) -> str:
    from .compare import convergence

    return convergence(cell)


def _seeds(cell: pd.DataFrame) -> str:
    """'5/5': seeds with a finished run over the runs of the cell."""
    return f"{int(finished(cell).sum())}/{len(cell)}"


def _images(fin: pd.DataFrame) -> str:
    """How many test images the final numbers were evaluated on ('2448', or a list when they differ)."""
    n = pd.to_numeric(fin.get("test_images_full", pd.Series(dtype=float)), errors="coerce").dropna()
    return ", ".join(f"{int(v):,}" for v in sorted(n.unique())) or "?"


def table2_rows(df: pd.DataFrame) -> dict:
    fin = df[finished(df)]
    return {
        "presets": ", ".join(sorted(map(str, df["preset"].dropna().unique()))), **counts(df),
        "seeds": ", ".join(str(s) for s in sorted(fin["seed"].unique())),
        "stopped": _stopped(df),
        f"test bits/dim (EMA, {_images(fin)} test images)": pm(fin["final_bpd"]),
        "test bits/dim (raw, epoch subset)": pm(fin["test_bpd_raw"]),
        "train bits/dim": pm(fin["train_bpd"]),
        "params": ", ".join(params(p) for p in sorted(df["num_params"].dropna().unique())),
    }  # fmt: skip


def _param_ratio(cell: pd.DataFrame, reference: float) -> str:
    n = pd.to_numeric(cell["num_params"], errors="coerce").dropna()
    if n.empty or not reference or not np.isfinite(reference):
        return DASH
    return ", ".join(f"{v / reference:.3f}" for v in sorted(n.unique()))


def _reference_params(cells: list[tuple[tuple, pd.DataFrame]], reference: tuple) -> float:
    for key, cell in cells:
        if key == reference:
            n = pd.to_numeric(cell["num_params"], errors="coerce").dropna()
            return float(n.iloc[0]) if len(n) else math.nan
    return math.nan


def _compared(cells: list[tuple[tuple, pd.DataFrame]], labels: list[str], reference: tuple):
    from .compare import compare_rows

    ref_label = next((lab for (key, _), lab in zip(cells, labels, strict=True) if key == reference), None)
    return compare_rows([(lab, cell) for (_, cell), lab in zip(cells, labels, strict=True)], ref_label), ref_label


def table4_label(coupling: str, lr: float) -> str:
    return f"{coupling}, lr {lr:g}"


def table4_rows(df: pd.DataFrame, published: dict, reference: tuple = ("matexp", 0.01)) -> pd.DataFrame:
    """Per (coupling, lr): runs, parameters and their ratio to the reference row, how the runs
    stopped, test bits/dim, the paired difference to the reference row with its 95% interval and
    the rank range (:mod:`.compare`)."""
    from .compare import difference_text, rank_text

    cells = _cells(df, ["coupling", "lr"])
    labels = [table4_label(c, lr) for (c, lr), _ in cells]
    compared, _ = _compared(cells, labels, reference)
    ref_params = _reference_params(cells, reference)
    rows = []
    for ((coupling, lr), cell), row in zip(cells, compared, strict=True):
        rows.append({
            "coupling": coupling, "lr": f"{lr:g}", "hidden": ", ".join(str(h) for h in sorted(cell["hidden_channels"].unique())),
            "params": ", ".join(params(p) for p in sorted(cell["num_params"].dropna().unique())),
            f"params / {table4_label(*reference)}": _param_ratio(cell, ref_params),
            **counts(cell), "seeds": _seeds(cell), "stopped": _stopped(cell),
            "test bits/dim": pm(cell.loc[finished(cell), "final_bpd"]),
            f"difference to {table4_label(*reference)} [95% CI]": difference_text(row.diff), "rank": rank_text(row.rank),
        })  # fmt: skip
    return pd.DataFrame(rows)


def _time_columns(cell: pd.DataFrame, ref_cell: pd.DataFrame | None, reference: str | None) -> dict:
    from .compare import ratio_text, time_ratio

    t = cell.loc[cell["epochs_done"] > 0, "median_epoch_time_s"]
    if ref_cell is not None and ref_cell is cell:
        ratio = "reference"
    else:
        ratio = ratio_text(time_ratio(cell, ref_cell)) if ref_cell is not None else DASH
    return {"time per epoch (s)": pm(t, 2), f"time / {reference} [95% CI]": ratio}


def table5_rows(df: pd.DataFrame, published: dict) -> pd.DataFrame:
    """Per 1×1 conv: parameters, how the runs stopped, bits/dim with the paired difference to the
    reference conv and the rank range, epoch time and its paired ratio to the reference's."""
    from .compare import difference_text, rank_text

    reference = next(iter(MIXING), None)  # the registry's first: the standard 1×1 conv
    cells = _cells(df, ["mixing"])
    labels = [c for (c,), _ in cells]
    compared, _ = _compared(cells, labels, (reference,))
    ref_cell = next((cell for (c,), cell in cells if c == reference), None)
    ref_params = _reference_params(cells, (reference,))
    rows = []
    for ((mixing,), cell), row in zip(cells, compared, strict=True):
        rows.append({
            "mixing": mixing, "form": ", ".join(sorted({variant_of("mixing", mixing, o) for o in cell["mixing_options"]})),
            "params": ", ".join(params(p) for p in sorted(cell["num_params"].dropna().unique())),
            f"params / {reference}": _param_ratio(cell, ref_params),
            **counts(cell), "seeds": _seeds(cell), "stopped": _stopped(cell),
            "bits/dim": pm(cell.loc[finished(cell), "final_bpd"]),
            f"difference to {reference} [95% CI]": difference_text(row.diff), "rank": rank_text(row.rank),
            **_time_columns(cell, ref_cell, reference),
            "device": ", ".join(sorted(map(str, cell["device"].unique()))),
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


def mixing_label(mixing: str, variant: str) -> str:
    from ..presets import variant_label

    return variant_label(mixing, variant)


def mixing_rows(df: pd.DataFrame, published: dict) -> pd.DataFrame:
    """Per mixing layer and variant: family, parameters and their ratio to the standard 1×1 conv's
    model, how the runs stopped, bits/dim with the paired difference to the standard conv and the
    rank range, time per epoch with its paired ratio, sampling time, round-trip error and peak
    memory (MiB). Published numbers are in a table of their own (:func:`mixing_published`)."""
    from .compare import difference_text, rank_text

    reference = (next(iter(MIXING), None), "default")
    cells = _layer_cells(df, "mixing", [])
    labels = [mixing_label(c, v) for (c, v), _ in cells]
    compared, _ = _compared(cells, labels, reference)
    ref_cell = next((cell for key, cell in cells if key == reference), None)
    ref_params = _reference_params(cells, reference)
    rows = []
    for ((mixing, variant), cell), row in zip(cells, compared, strict=True):
        fin = cell[finished(cell)]
        cls = MIXING.get(mixing)
        rows.append({
            "layer": mixing, "variant": variant, "family": cls.info.family if cls else DASH,
            "params": ", ".join(params(p) for p in sorted(cell["num_params"].dropna().unique())),
            f"params / {reference[0]}": _param_ratio(cell, ref_params),
            **counts(cell), "seeds": _seeds(cell), "stopped": _stopped(cell),
            "bits/dim": pm(fin["final_bpd"]),
            f"difference to {reference[0]} [95% CI]": difference_text(row.diff), "rank": rank_text(row.rank),
            **_time_columns(cell, ref_cell, reference[0]),
            "sampling (ms / image)": pm(1e3 * _col(fin, "sample_time_per_image_s"), 3),
            "round-trip error": _roundtrip(_col(fin, "roundtrip_error")),
            "peak memory (MiB)": pm(_col(fin, "peak_memory_bytes") / 2**20, 1),
        })  # fmt: skip
    return pd.DataFrame(rows)


def mixing_published(published: dict) -> pd.DataFrame:
    """The published CIFAR-10 bits/dim of each mixing layer's own paper, with its status and source."""
    from .format import published_value

    rows = []
    for mixing, entry in published.get("layers", {}).items():
        rows.append({"layer": mixing, "variants": ", ".join(entry.get("variants", [])) or "all",
                     "CIFAR-10 bits/dim (own paper)": published_value(entry.get("cifar10")),
                     "paper": entry.get("paper", DASH)})  # fmt: skip
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

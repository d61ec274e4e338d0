"""Formatting for the report: markdown tables and the few number formats every table shares."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd

from ..stats import as_float

__all__ = ["DASH", "markdown_table", "number", "params", "pm", "published_pm", "published_value", "slug"]

DASH = "–"


def markdown_table(df: pd.DataFrame) -> str:
    """A GitHub markdown table of df (no index); numeric columns right-aligned, NaN as '–'."""
    if df.empty and not len(df.columns):
        return ""

    def cell(value: object) -> str:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return DASH
        return str(value).replace("|", "\\|").replace("\n", " ")

    header = "| " + " | ".join(cell(c) for c in df.columns) + " |"
    align = "|" + "|".join("---:" if pd.api.types.is_numeric_dtype(df[c]) else "---" for c in df.columns) + "|"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False, name=None)]
    return "\n".join([header, align, *rows])


def pm(values: pd.Series, digits: int = 3) -> str:
    """'mean ± std' (sample std, ddof=1) of the finite values; the mean alone for one value."""
    v = pd.to_numeric(pd.Series(values), errors="coerce")
    v = v[np.isfinite(v)]
    if len(v) == 0:
        return DASH
    if len(v) == 1:
        return f"{v.iloc[0]:.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def published_pm(mean: float | None, std: float | None, digits: int = 2) -> str:
    if mean is None:
        return "see paper"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def published_value(entry: object, digits: int = 2) -> str:
    """A value of ``published.json`` (``{"value", "status", "read_from" | "source"}``) as the report
    prints it: the number, marked "(unverified)" unless it was read from the paper; "not
    transcribed" for a missing value."""
    if entry is None:
        return "not transcribed"
    if isinstance(entry, (int, float)):
        return f"{entry:.{digits}f} (unverified)"
    if not isinstance(entry, dict):
        raise ValueError(f"published.json: a value must be a number or an object with 'value', got {entry!r}")
    value = entry.get("value")
    if value is None:
        return "not transcribed"
    text = f"{value:.{digits}f}" if isinstance(value, float) else str(value)
    return text if entry.get("status") == "verified" else f"{text} (unverified)"


def params(n: object) -> str:
    x = as_float(n)
    if math.isnan(x):
        return DASH
    return f"{int(x) / 1e6:.2f}M ({int(x):,})"


def number(value: object, fmt: str = "{:.3g}") -> str:
    """A finite number formatted, '–' for None / NaN / anything else."""
    x = as_float(value)
    return fmt.format(x) if math.isfinite(x) else DASH


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-").lower()

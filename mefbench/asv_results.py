"""Read the airspeed velocity (asv 0.6) results of ``benchmarks/`` into a tidy pandas frame.

asv writes one file per machine, commit and environment::

    .asv/results/benchmarks.json                  every benchmark: param_names, params, unit, …
    .asv/results/<machine>/machine.json           the machine's description
    .asv/results/<machine>/<commit>-<env>.json    {"commit_hash", "env_name", "date" (ms), "params",
                                                   "result_columns", "results": {name: row}, …}

Each row of ``results`` lists the fields named by ``result_columns``: ``result`` holds one value per
point of the parameter grid (the product of ``params``, last parameter fastest; ``null`` for a
failed or skipped point) and ``params`` the grid's values as Python reprs.

The benchmarks are in seconds (``time_``), bytes (``peakmem_``) or the unit a ``track_`` declares.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from .stats import as_float

__all__ = ["COLUMNS", "KEY_BENCHMARKS", "asv_speed_table", "load_asv_results", "plot_asv_history"]

COLUMNS = ["machine", "commit", "date", "env", "benchmark", "params", "value", "unit"]


def _mef_pair() -> str:
    from .presets import CPU_MEF, PRESETS

    mef = PRESETS[CPU_MEF].model
    return f"{mef.mixing} + {mef.coupling}"


# Benchmarks shown by plot_asv_history, each with the parameter values it is restricted to.
KEY_BENCHMARKS: dict[str, dict[str, str]] = {
    "model.TrainStep.time_train_step": {"pair": _mef_pair()},
    "model.TrainStep.peakmem_train_step": {"pair": _mef_pair()},
    "model.ShortTraining.track_bits_per_dim": {},
    "linalg.ExpmActionGrad.time_forward_backward": {"n": "6", "batch": "16384"},
    "linalg.ExpmGrad.time_forward_backward": {"n": "48", "batch": "256"},
    "coupling.CouplingLayer.time_forward_backward": {"level": "C12@16x16"},
    "mixing.MixingLayer.time_forward_backward": {"level": "C48@4x4"},
}

_PREFIX_UNITS = {"time_": "seconds", "peakmem_": "bytes", "mem_": "bytes", "timeraw_": "seconds"}


def _default_unit(name: str) -> str:
    method = name.rsplit(".", 1)[-1]
    for prefix, unit in _PREFIX_UNITS.items():
        if method.startswith(prefix):
            return unit
    return "unitless"


def _param_value(text: object) -> str:
    """A parameter value as asv stores it (its repr) without the quotes of a string."""
    text = str(text)
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "'\"":
        return text[1:-1]
    return text


def _read_benchmarks(results_dir: Path) -> dict:
    path = results_dir / "benchmarks.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise TypeError("not a JSON object")
    except (OSError, TypeError, ValueError) as err:
        warnings.warn(f"skipping malformed asv benchmarks file {path}: {err}", stacklevel=3)
        return {}
    return {k: v for k, v in data.items() if isinstance(v, dict)}


def _rows(name: str, row: object, columns: list[str]) -> tuple[list, list]:
    """(values, params) of one benchmark's row, in either asv results layout."""
    if isinstance(row, dict):  # the older layout: {"result": [...], "params": [...]}
        values, params = row.get("result"), row.get("params", [])
    elif isinstance(row, list):
        fields = dict(zip(columns, row, strict=False))  # asv leaves trailing empty fields out
        values, params = fields.get("result"), fields.get("params", [])
    else:
        raise TypeError(f"benchmark {name!r}: row is a {type(row).__name__}")
    if values is None:  # the whole benchmark failed
        values = [None] * math.prod(len(p) for p in params or [])
    if not isinstance(values, list):
        values = [values]
    if not isinstance(params, list) or not all(isinstance(p, list) for p in params):
        raise ValueError(f"benchmark {name!r}: params is not a list of lists")
    expected = math.prod(len(p) for p in params)
    if len(values) != expected:
        raise ValueError(f"benchmark {name!r}: {len(values)} values for a grid of {expected}")
    return values, params


def _read_result_file(path: Path, machine: str, benchmarks: dict) -> list[dict]:
    data = json.loads(path.read_text())
    if not isinstance(data, dict) or not isinstance(data.get("results"), dict):
        raise TypeError("no 'results' object")
    commit = data["commit_hash"]
    env = data.get("env_name", path.stem.split("-", 1)[-1])
    date = pd.to_datetime(data["date"], unit="ms", utc=True) if data.get("date") is not None else pd.NaT
    columns = data.get("result_columns") or ["result", "params"]
    out = []
    for name, row in data["results"].items():
        values, params = _rows(name, row, columns)
        info = benchmarks.get(name, {})
        names = list(info.get("param_names") or [])
        if len(names) != len(params):
            names = [f"p{i}" for i in range(len(params))]
        unit = info.get("unit") or _default_unit(name)
        for value, point in zip(values, itertools.product(*params), strict=False):  # a short row: points not run
            label = ", ".join(f"{n}={_param_value(v)}" for n, v in zip(names, point, strict=True))
            out.append(
                {
                    "machine": machine,
                    "commit": commit,
                    "date": date,
                    "env": env,
                    "benchmark": name,
                    "params": label,
                    "value": as_float(value),
                    "unit": unit,
                }
            )
    return out


def load_asv_results(asv_dir: str | Path = ".asv") -> pd.DataFrame:
    """Every asv result under ``asv_dir/results`` as a tidy frame, one row per benchmark point.

    Columns: machine, commit (full hash), date (the commit's date, UTC), env (asv's environment
    name), benchmark ("module.Class.method"), params ("method=torch, n=6, batch=256"; "" when the
    benchmark has none), value (float; NaN for a failed or skipped point), unit ("seconds",
    "bytes" or a track_ benchmark's unit). Files that cannot be read are skipped with a warning
    that names them.

    ``asv_dir`` is the folder that holds asv's ``results/`` (``.asv`` with this project's
    asv.conf.json); the results folder itself is accepted too. Raises FileNotFoundError when
    there is no results folder (run ``asv run`` first).
    """
    results_dir = Path(asv_dir) / "results"
    if not results_dir.is_dir() and (Path(asv_dir) / "benchmarks.json").is_file():
        results_dir = Path(asv_dir)  # given the results folder itself
    if not results_dir.is_dir():
        raise FileNotFoundError(
            f"no asv results in {results_dir}: run `asv machine --yes && asv run --quick` first (benchmarks/README.md)"
        )
    benchmarks = _read_benchmarks(results_dir)
    rows: list[dict] = []
    for machine_dir in sorted(p for p in results_dir.iterdir() if p.is_dir()):
        for path in sorted(machine_dir.glob("*.json")):
            if path.name == "machine.json":
                continue
            try:
                rows.extend(_read_result_file(path, machine_dir.name, benchmarks))
            except (OSError, ValueError, KeyError, TypeError) as err:
                warnings.warn(f"skipping malformed asv result file {path}: {err}", stacklevel=2)
    frame = pd.DataFrame(rows, columns=COLUMNS)
    frame["value"] = frame["value"].astype(float)
    if frame.empty:
        frame["date"] = pd.to_datetime(frame["date"], utc=True)
    return frame.sort_values(["machine", "date", "benchmark", "env"], kind="stable").reset_index(drop=True)


def _latest(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of the most recent commit (by commit date) of each machine."""
    parts = []
    for _, group in df.groupby("machine", sort=True):
        dated = group.dropna(subset=["date"])
        if dated.empty:
            commit = group["commit"].iloc[-1]
        else:
            commit = dated.loc[dated["date"].idxmax(), "commit"]
        parts.append(group[group["commit"] == commit])
    return pd.concat(parts) if parts else df.iloc[0:0]


def asv_speed_table(df: pd.DataFrame) -> pd.DataFrame:
    """Times in milliseconds of each machine's latest commit: rows (benchmark, params), one column per machine.

    Only timing benchmarks (unit "seconds") are kept. When a machine ran several environments the
    columns are "machine / env". ``table.attrs["commits"]`` maps each column to its commit.
    """
    times = df[df["unit"] == "seconds"]
    latest = _latest(times).copy()
    if latest.empty:
        empty = pd.DataFrame(index=pd.MultiIndex.from_arrays([[], []], names=["benchmark", "params"]))
        empty.attrs["commits"] = {}
        return empty
    several_envs = latest.groupby("machine")["env"].nunique().max() > 1
    latest["column"] = latest["machine"] + (" / " + latest["env"] if several_envs else "")
    latest["ms"] = latest["value"] * 1e3
    latest = latest.sort_values("benchmark", kind="stable")  # keeps each grid in asv's order
    table = latest.groupby(["benchmark", "params", "column"], sort=False)["ms"].first().unstack("column")
    table = table.reindex(pd.unique(latest.set_index(["benchmark", "params"]).index))
    table.columns.name = None
    table.attrs["commits"] = dict(zip(latest["column"], latest["commit"], strict=True))
    return table


def _params_match(label: str, wanted: dict[str, str]) -> bool:
    pieces = dict(p.split("=", 1) for p in label.split(", ") if "=" in p)
    return all(pieces.get(k) == v for k, v in wanted.items())


def _scaled(values: pd.Series, unit: str) -> tuple[pd.Series, str]:
    if unit == "seconds":
        return values * 1e3, "ms"
    if unit == "bytes":
        return values / 2**20, "MiB"
    return values, unit


def plot_asv_history(
    df: pd.DataFrame,
    path: str | Path,
    benchmarks: dict[str, dict[str, str]] | None = None,
) -> Path:
    """Line plot (PNG) of value against commit date for a handful of key benchmarks, one panel each.

    ``benchmarks`` maps a benchmark name to the parameter values it is restricted to (default
    :data:`KEY_BENCHMARKS`); within a panel each remaining parameter point is one line. Drawn on
    an Agg canvas, so no display is needed. Returns the path written.
    """
    import matplotlib.dates as mdates
    import seaborn as sns
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    wanted = KEY_BENCHMARKS if benchmarks is None else benchmarks
    panels = []
    for name, fixed in wanted.items():
        rows = df[(df["benchmark"] == name) & df["params"].map(lambda s, f=fixed: _params_match(s, f))]
        rows = rows.dropna(subset=["value", "date"])
        if not rows.empty:
            panels.append((name, fixed, rows))
    if not panels:
        raise ValueError(
            f"none of the benchmarks to plot ({', '.join(wanted)}) has a value with a date in these results"
        )
    cols = min(2, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(6.5 * cols, 3.6 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = np.atleast_1d(fig.subplots(nrows, cols, squeeze=False)).ravel()
    for ax, (name, fixed, rows) in zip(axes, panels, strict=False):  # the grid may have spare axes
        rows = rows.copy()
        unit = rows["unit"].iloc[0]
        rows["value"], label = _scaled(rows["value"], unit)
        rows["series"] = [
            ", ".join(p for p in s.split(", ") if p.split("=", 1)[0] not in fixed) or "value" for s in rows["params"]
        ]
        if rows["machine"].nunique() > 1:
            rows["series"] = rows["machine"] + ": " + rows["series"]
        rows = rows.sort_values("date")
        sns.lineplot(data=rows, x="date", y="value", hue="series", marker="o", ax=ax, errorbar=None)
        title = name + (f" ({', '.join(f'{k}={v}' for k, v in fixed.items())})" if fixed else "")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("commit date")
        ax.set_ylabel(label)
        locator = mdates.AutoDateLocator()
        ax.xaxis.set_major_locator(locator)
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(locator))
        ax.tick_params(axis="x", labelsize=7)
        legend = ax.get_legend()
        if legend is not None:
            legend.set_title(None)
            for text in legend.get_texts():
                text.set_fontsize(7)
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path

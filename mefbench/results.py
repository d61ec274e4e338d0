"""Run records (``record.json``, see :mod:`mefbench.training`) as tidy pandas tables.

``load_runs(path)`` gives one row per run, ``load_epochs(path)`` one row per (run, epoch).
Both walk ``path`` recursively. A record that cannot be read (bad JSON, missing fields) never
stops the loading: it is named in a :class:`CorruptRecordWarning` and listed, with the reason,
in ``df.attrs["corrupt"]`` (a list of ``{"path", "error"}`` dicts).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import pandas as pd

from .training import RECORD, pool_stats

__all__ = [
    "EPOCH_COLUMNS",
    "RUN_COLUMNS",
    "CorruptRecordWarning",
    "epochs_frame",
    "load_epochs",
    "load_runs",
    "runs_frame",
    "scan_records",
]

_STATS = ("mean", "std", "max", "min", "count")

RUN_COLUMNS: tuple[str, ...] = (
    "run", "path", "preset", "tables", "scale", "status",
    "dataset", "image_shape", "steps", "conv", "coupling", "hidden_channels", "num_blocks",
    "lr", "batch_size", "epochs", "epochs_done", "seed", "num_params",
    "test_bpd", "test_bpd_raw", "train_bpd", "train_bpd_ema",
    "mean_epoch_time_s", "train_time_s",
    "diverged_epoch", "diverged_step", "diverged_loss", "resumes",
    "device", "world_size",
    *(f"m_{k}" for k in _STATS), *(f"s_{k}" for k in _STATS),
    "started_at", "updated_at", "command", "versions", "machine",
)  # fmt: skip

EPOCH_COLUMNS: tuple[str, ...] = (
    "run", "path", "preset", "tables", "scale", "status",
    "dataset", "conv", "coupling", "lr", "seed",
    "epoch", "step", "epoch_lr", "train_bpd", "train_bpd_ema", "test_bpd", "test_bpd_raw",
    "train_time_s", "eval_time_s",
    *(f"m_{k}" for k in _STATS), *(f"s_{k}" for k in _STATS),
)  # fmt: skip

# what a record must hold to be used at all; everything else is read with a default
_REQUIRED = ("status", "model", "train", "epochs")
_REQUIRED_MODEL = ("conv", "coupling", "hidden_channels", "num_blocks")
_REQUIRED_TRAIN = ("dataset", "lr", "epochs")
_REQUIRED_EPOCH = ("epoch", "test_bpd", "train_time_s")


class CorruptRecordWarning(UserWarning):
    """A record.json that could not be read; the message names the file."""


def _check(record: object) -> dict:
    """Raise ValueError (missing field) or TypeError (wrong type) unless record has what the tables need."""
    if not isinstance(record, dict):
        raise TypeError(f"the record is a JSON {type(record).__name__}, not an object")
    missing = [k for k in _REQUIRED if k not in record]
    if missing:
        raise ValueError(f"missing fields {missing}")
    for part, keys in (("model", _REQUIRED_MODEL), ("train", _REQUIRED_TRAIN)):
        if not isinstance(record[part], dict):
            raise TypeError(f"field {part!r} is not an object")
        missing = [k for k in keys if k not in record[part]]
        if missing:
            raise ValueError(f"missing fields {[f'{part}.{k}' for k in missing]}")
    if not isinstance(record["epochs"], list):
        raise TypeError("field 'epochs' is not a list")
    for i, entry in enumerate(record["epochs"]):
        if not isinstance(entry, dict):
            raise TypeError(f"epochs[{i}] is not an object")
        missing = [k for k in _REQUIRED_EPOCH if k not in entry]
        if missing:
            raise ValueError(f"missing fields {[f'epochs[{i}].{k}' for k in missing]}")
    return record


def scan_records(path: str | Path) -> tuple[list[tuple[Path, dict]], list[dict]]:
    """Read every ``record.json`` under path (sorted by path).

    Returns ``(records, corrupt)``: ``records`` is a list of (record file, record) pairs,
    ``corrupt`` a list of ``{"path": str, "error": str}`` for the files that could not be used;
    each of those is also reported with a :class:`CorruptRecordWarning`.
    Raises FileNotFoundError if path does not exist.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"runs directory {root} does not exist")
    files = [root] if root.is_file() else sorted(root.rglob(RECORD))
    records, corrupt = [], []
    for file in files:
        try:
            record = _check(json.loads(file.read_text()))
            _run_row(file, record), _epoch_rows(file, record)  # fields of the wrong type fail here
            records.append((file, record))
        except (OSError, UnicodeDecodeError, ValueError, TypeError, KeyError, AttributeError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            corrupt.append({"path": str(file), "error": error})
            warnings.warn(f"skipping unreadable run record {file}: {error}", CorruptRecordWarning, stacklevel=3)
    return records, corrupt


def _num(value: object) -> float:
    """A float from a JSON number; NaN for null or anything else."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _stats(prefix: str, stats: dict | None) -> dict:
    stats = stats if isinstance(stats, dict) else {}
    return {f"{prefix}_{k}": _num(stats.get(k)) for k in _STATS}


def _identity(file: Path, record: dict) -> dict:
    model, train = record["model"], record["train"]
    return {
        "run": file.parent.name,
        "path": str(file.parent),
        "preset": record.get("preset"),
        "tables": tuple(str(t) for t in record.get("tables") or ()),
        "scale": record.get("scale"),
        "status": record["status"],
        "dataset": train["dataset"],
        "conv": model["conv"],
        "coupling": model["coupling"],
        "lr": _num(train["lr"]),
        "seed": record.get("seed", train.get("seed")),
    }


def _run_row(file: Path, record: dict) -> dict:
    model, train, epochs = record["model"], record["train"], record["epochs"]
    final = record.get("final") or {}
    last = epochs[-1] if epochs else {}
    times = [_num(e["train_time_s"]) for e in epochs]
    # the run's expm statistics: pooled over its epochs (= final["expm"] when present)
    expm = final.get("expm") if isinstance(final.get("expm"), dict) else None
    if expm is None:
        expm = {k: pool_stats([(e.get("expm") or {}).get(k, {}) for e in epochs]) for k in ("m", "s")}
    diverged = record.get("diverged") or {}
    row = _identity(file, record)
    row.update(
        image_shape=tuple(model.get("image_shape") or ()),
        steps=tuple(model.get("steps") or ()),
        hidden_channels=int(model["hidden_channels"]),
        num_blocks=int(model["num_blocks"]),
        batch_size=train.get("batch_size"),
        epochs=int(train["epochs"]),
        epochs_done=len(epochs),
        num_params=record.get("num_params"),
        test_bpd=_num(last.get("test_bpd")),
        test_bpd_raw=_num(last.get("test_bpd_raw")),
        train_bpd=_num(last.get("train_bpd")),
        train_bpd_ema=_num(last.get("train_bpd_ema")),
        mean_epoch_time_s=sum(times) / len(times) if times else math.nan,
        train_time_s=sum(times) if times else math.nan,
        diverged_epoch=_num(diverged.get("epoch")),
        diverged_step=_num(diverged.get("step")),
        diverged_loss=_num(diverged.get("loss")),
        resumes=len(record.get("resumes") or ()),
        device=record.get("device"),
        world_size=record.get("world_size"),
        started_at=record.get("started_at"),
        updated_at=record.get("updated_at"),
        command=record.get("command"),
        versions=record.get("versions") or {},
        machine=record.get("machine") or {},
        **_stats("m", expm.get("m")),
        **_stats("s", expm.get("s")),
    )
    return row


def _epoch_rows(file: Path, record: dict) -> list[dict]:
    ident = _identity(file, record)
    rows = []
    for e in record["epochs"]:
        expm = e.get("expm") or {}
        rows.append({
            **ident,
            "epoch": int(e["epoch"]),
            "step": e.get("step"),
            "epoch_lr": _num(e.get("lr")),
            "train_bpd": _num(e.get("train_bpd")),
            "train_bpd_ema": _num(e.get("train_bpd_ema")),
            "test_bpd": _num(e["test_bpd"]),
            "test_bpd_raw": _num(e.get("test_bpd_raw")),
            "train_time_s": _num(e["train_time_s"]),
            "eval_time_s": _num(e.get("eval_time_s")),
            **_stats("m", expm.get("m")),
            **_stats("s", expm.get("s")),
        })  # fmt: skip
    return rows


def runs_frame(records: list[tuple[Path, dict]], corrupt: list[dict] = ()) -> pd.DataFrame:
    """One row per run from :func:`scan_records` output (columns :data:`RUN_COLUMNS`)."""
    df = pd.DataFrame([_run_row(f, r) for f, r in records], columns=list(RUN_COLUMNS))
    df.attrs["corrupt"] = list(corrupt)
    return df


def epochs_frame(records: list[tuple[Path, dict]], corrupt: list[dict] = ()) -> pd.DataFrame:
    """One row per (run, finished epoch) from :func:`scan_records` output (:data:`EPOCH_COLUMNS`)."""
    rows = [row for f, r in records for row in _epoch_rows(f, r)]
    df = pd.DataFrame(rows, columns=list(EPOCH_COLUMNS))
    df.attrs["corrupt"] = list(corrupt)
    return df


def load_runs(path: str | Path) -> pd.DataFrame:
    """One row per run found under path (a run = a directory holding ``record.json``).

    Metrics are those of the last finished epoch (test_bpd: EMA weights; test_bpd_raw: raw
    weights); ``epochs`` is the configured number, ``epochs_done`` the finished ones; times are
    training time only (evaluation excluded); ``m_*``/``s_*`` pool the run's expm statistics
    over its epochs. Unreadable records are warned about and listed in ``df.attrs["corrupt"]``.
    """
    return runs_frame(*scan_records(path))


def load_epochs(path: str | Path) -> pd.DataFrame:
    """One row per (run, finished epoch) under path, for training curves (``epoch_lr``: the lr
    at the end of that epoch; ``lr``: the configured lr). Corrupt records as in :func:`load_runs`."""
    return epochs_frame(*scan_records(path))

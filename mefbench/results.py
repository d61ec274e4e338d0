"""Run records (``record.json``, see :mod:`mefbench.record`) as tidy pandas tables.

``load_runs(path)`` gives one row per run, ``load_epochs(path)`` one row per (run, epoch).
Both walk ``path`` recursively and read every record through :func:`mefbench.record.read_record`
(so records of every schema load the same way). A record that cannot be read never stops the
loading: it is named in a :class:`CorruptRecordWarning` and listed, with the reason, in
``df.attrs["corrupt"]`` (a list of ``{"path", "error"}`` dicts).
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from .outcomes import run_outcome
from .record import RECORD, RunError, RunRecord, read_record
from .stats import as_float, pool_stats

__all__ = [
    "EPOCH_COLUMNS",
    "RUN_COLUMNS",
    "CorruptRecordWarning",
    "config_key",
    "epochs_frame",
    "load_epochs",
    "load_runs",
    "runs_frame",
    "scan_records",
]

_STATS = ("mean", "std", "max", "min", "count")

_IDENTITY = (
    "run", "path", "preset", "tables", "cells", "scale", "status", "model_revision",
    "dataset", "mixing", "coupling", "mixing_options", "coupling_options", "amp", "channels_last", "lr", "seed",
)  # fmt: skip

RUN_COLUMNS: tuple[str, ...] = (
    *_IDENTITY,
    "config", "image_shape", "steps", "net", "hidden_channels", "num_blocks",
    "batch_size", "epochs", "epochs_done", "num_params",
    "test_bpd", "test_bpd_raw", "train_bpd", "train_bpd_ema", "test_bpd_full", "test_images_full", "final_bpd",
    "mean_epoch_time_s", "median_epoch_time_s", "train_time_s", "steps_done",
    "stop_reason", "stop_step", "best_epoch", "best_valid_bpd",
    "initial_loss", "worst_spike", "spike_step", "initial_valid_bpd", "final_valid_bpd", "final_over_initial",
    "sample_time_per_image_s", "roundtrip_error", "peak_memory_bytes", "peak_memory_method", "measure_error",
    "diverged_epoch", "diverged_step", "diverged_loss", "resumes",
    "device", "world_size",
    *(f"m_{k}" for k in _STATS), *(f"s_{k}" for k in _STATS),
    "schema", "started_at", "updated_at", "command", "versions", "machine",
)  # fmt: skip

EPOCH_COLUMNS: tuple[str, ...] = (
    *_IDENTITY,
    "epoch", "step", "epoch_lr", "train_bpd", "train_bpd_ema", "test_bpd", "test_bpd_raw", "valid_bpd",
    "loss_first", "loss_max", "loss_max_step", "train_time_s", "eval_time_s", "peak_memory_bytes",
    *(f"m_{k}" for k in _STATS), *(f"s_{k}" for k in _STATS),
)  # fmt: skip


class CorruptRecordWarning(UserWarning):
    """A record.json that could not be read; the message names the file."""


def scan_records(path: str | Path) -> tuple[list[tuple[Path, RunRecord]], list[dict]]:
    """Read every ``record.json`` under path (sorted by path).

    Returns ``(records, corrupt)``: ``records`` is a list of (record file, :class:`RunRecord`)
    pairs, ``corrupt`` a list of ``{"path": str, "error": str}`` for the files that could not be
    used; each of those is also reported with a :class:`CorruptRecordWarning`.
    Raises FileNotFoundError if path does not exist.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"runs directory {root} does not exist")
    files = [root] if root.is_file() else sorted(root.rglob(RECORD))
    records, corrupt = [], []
    for file in files:
        try:
            records.append((file, read_record(file)))
        except RunError as exc:
            corrupt.append({"path": str(file), "error": str(exc)})
            warnings.warn(f"skipping unreadable run record {file}: {exc}", CorruptRecordWarning, stacklevel=3)
    return records, corrupt


def _stats(prefix: str, stats: dict | None) -> dict:
    stats = stats if isinstance(stats, dict) else {}
    return {f"{prefix}_{k}": as_float(stats.get(k)) for k in _STATS}


def _identity(file: Path, record: RunRecord) -> dict:
    model, train = record.model, record.train
    return {
        "run": file.parent.name,
        "path": str(file.parent),
        "preset": record.preset,
        "tables": tuple(record.tables),
        "cells": record.cells,
        "scale": record.scale,
        "status": record.status,
        "model_revision": record.model_revision,
        "dataset": train["dataset"],
        "mixing": model["mixing"],
        "coupling": model["coupling"],
        "mixing_options": dict(model.get("mixing_options") or {}),
        "coupling_options": dict(model.get("coupling_options") or {}),
        "amp": train.get("amp"),
        "channels_last": bool(train.get("channels_last", False)),
        "lr": float(train["lr"]),
        "seed": record.seed if record.seed is not None else train.get("seed"),
    }


def config_key(model: dict, train: dict) -> str:
    """What makes two runs the same experiment apart from the seed: the model and the recipe
    (where the data lives and the seed left out), as one string."""
    recipe = {k: v for k, v in train.items() if k not in ("seed", "data_dir")}
    return json.dumps([model, recipe], sort_keys=True)


def _run_row(file: Path, record: RunRecord) -> dict:
    model, train, epochs = record.model, record.train, record.epochs
    final, last = record.final, record.last_epoch
    times = [e.train_time_s for e in epochs]
    # the run's expm statistics: pooled over its epochs (= final.expm when present)
    expm = final.expm if final is not None and final.expm else {
        k: pool_stats([e.expm.get(k, {}) for e in epochs]) for k in ("m", "s")
    }  # fmt: skip
    diverged = record.diverged
    outcome = run_outcome(record)
    stop = record.stop
    full = as_float(final and final.test_bpd_full)
    row = _identity(file, record)
    row.update(
        config=config_key(model, train),
        image_shape=tuple(model["image_shape"]),
        steps=tuple(model["steps"]),
        net=model.get("net", "resnet"),
        hidden_channels=model["hidden_channels"],
        num_blocks=model["num_blocks"],
        batch_size=train.get("batch_size"),
        epochs=train["epochs"],
        epochs_done=len(epochs),
        num_params=record.num_params,
        test_bpd=as_float(last and last.test_bpd),
        test_bpd_raw=as_float(last and last.test_bpd_raw),
        train_bpd=as_float(last and last.train_bpd),
        train_bpd_ema=as_float(last and last.train_bpd_ema),
        test_bpd_full=full,
        test_images_full=as_float(final and final.test_images_full),
        final_bpd=full if math.isfinite(full) else as_float(last and last.test_bpd),
        mean_epoch_time_s=sum(times) / len(times) if times else math.nan,
        median_epoch_time_s=float(pd.Series(times).median()) if times else math.nan,
        train_time_s=sum(times) if times else math.nan,
        steps_done=last.step if last is not None else 0,
        stop_reason=stop.reason if stop is not None else None,
        stop_step=as_float(stop and stop.step),
        best_epoch=as_float(stop and stop.best_epoch),
        best_valid_bpd=outcome.best_valid,
        initial_loss=outcome.initial_loss,
        worst_spike=outcome.worst_spike,
        spike_step=as_float(outcome.spike_step),
        initial_valid_bpd=outcome.initial_valid,
        final_valid_bpd=outcome.final_valid,
        final_over_initial=outcome.final_over_initial,
        sample_time_per_image_s=as_float(final and final.sample_time_per_image_s),
        roundtrip_error=as_float(final and final.roundtrip_error),
        peak_memory_bytes=as_float(final and final.peak_memory_bytes),
        peak_memory_method=final.peak_memory_method if final is not None else None,
        measure_error=final.measure_error if final is not None else None,
        diverged_epoch=as_float(diverged and diverged.epoch),
        diverged_step=as_float(diverged and diverged.step),
        diverged_loss=as_float(diverged and diverged.loss),
        resumes=len(record.resumes),
        device=record.device,
        world_size=record.world_size,
        schema=record.schema,
        started_at=record.started_at,
        updated_at=record.updated_at,
        command=record.command,
        versions=record.versions,
        machine=record.machine,
        **_stats("m", expm.get("m")),
        **_stats("s", expm.get("s")),
    )
    return row


def _epoch_rows(file: Path, record: RunRecord) -> list[dict]:
    ident = _identity(file, record)
    return [
        {
            **ident,
            "epoch": e.epoch,
            "step": e.step,
            "epoch_lr": e.lr,
            "train_bpd": e.train_bpd,
            "train_bpd_ema": e.train_bpd_ema,
            "test_bpd": e.test_bpd,
            "test_bpd_raw": e.test_bpd_raw,
            "valid_bpd": as_float(e.valid_bpd),
            "loss_first": as_float(e.loss_first),
            "loss_max": as_float(e.loss_max),
            "loss_max_step": as_float(e.loss_max_step),
            "train_time_s": e.train_time_s,
            "eval_time_s": e.eval_time_s,
            "peak_memory_bytes": as_float(e.peak_memory_bytes),
            **_stats("m", e.expm.get("m")),
            **_stats("s", e.expm.get("s")),
        }
        for e in record.epochs
    ]


def runs_frame(records: list[tuple[Path, RunRecord]], corrupt: Sequence[dict] = ()) -> pd.DataFrame:
    """One row per run from :func:`scan_records` output (columns :data:`RUN_COLUMNS`)."""
    df = pd.DataFrame([_run_row(f, r) for f, r in records], columns=list(RUN_COLUMNS))
    df.attrs["corrupt"] = list(corrupt)
    return df


def epochs_frame(records: list[tuple[Path, RunRecord]], corrupt: Sequence[dict] = ()) -> pd.DataFrame:
    """One row per (run, finished epoch) from :func:`scan_records` output (:data:`EPOCH_COLUMNS`)."""
    rows = [row for f, r in records for row in _epoch_rows(f, r)]
    df = pd.DataFrame(rows, columns=list(EPOCH_COLUMNS))
    df.attrs["corrupt"] = list(corrupt)
    return df


def load_runs(path: str | Path) -> pd.DataFrame:
    """One row per run found under path (a run = a directory holding ``record.json``).

    Metrics are those of the last finished epoch (test_bpd: EMA weights; test_bpd_raw: raw
    weights) on the images each epoch evaluates; ``test_bpd_full`` is the trained EMA model on the
    whole test split and ``final_bpd`` the run's number for the tables (``test_bpd_full``, else
    ``test_bpd``); ``epochs`` is the configured number (the cap of a run with a plateau rule),
    ``epochs_done`` the finished ones, ``stop_reason`` "plateau", "cap" or "length" with
    ``stop_step``; the stability outcomes are :func:`mefbench.outcomes.run_outcome`'s; times are
    training time only (evaluation excluded); ``m_*``/``s_*`` pool the run's expm statistics
    over its epochs. ``tables`` is a tuple of table ids (str), ``cells`` the cell the run fills in
    each; ``model_revision`` says which model the same config built (runs of different revisions
    do not compare); ``sample_time_per_image_s``, ``roundtrip_error`` and ``peak_memory_bytes``
    (measured as ``peak_memory_method`` says) are measured once a run finishes (NaN before, and
    for records older than schema 2). Unreadable records are warned about and listed in
    ``df.attrs["corrupt"]``.
    """
    return runs_frame(*scan_records(path))


def load_epochs(path: str | Path) -> pd.DataFrame:
    """One row per (run, finished epoch) under path, for training curves (``epoch_lr``: the lr
    at the end of that epoch; ``lr``: the configured lr). Corrupt records as in :func:`load_runs`."""
    return epochs_frame(*scan_records(path))

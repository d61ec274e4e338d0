"""Every run a paper table needs, at a chosen scale; re-running skips finished runs and resumes the rest.

Runs that several tables share (MEF at lr 0.01 fills Table 2, the matrix-exp cell of Table 4 and
of Table 5, and Table 6) are run once and listed under all of them in their record.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .models import FlowConfig
from .presets import PRESETS, SCALES
from .record import ENDED, RECORD, RunError, RunRecord, read_record
from .training import TrainConfig, train

__all__ = ["RunSpec", "TABLES", "parse_tables", "plan", "run_sweep"]

TABLES = (2, 3, 4, 5, 6)


@dataclass
class RunSpec:
    name: str
    presets: list[str]
    tables: tuple[int, ...]
    scale: str
    model: FlowConfig
    train: TrainConfig


def parse_tables(text: str) -> tuple[int, ...]:
    if text == "all":
        return TABLES
    try:
        tables = tuple(sorted({int(t) for t in text.split(",")}))
    except ValueError:
        tables = ()
    if not tables or any(t not in TABLES for t in tables):
        raise ValueError(f"--table takes 'all' or table numbers from {TABLES} (comma-separated), got {text!r}")
    return tables


def _key(model: FlowConfig, train_cfg: TrainConfig) -> str:
    return json.dumps([model.to_dict(), dataclasses.replace(train_cfg, seed=0, data_dir=None).to_dict()], sort_keys=True)


def plan(
    tables: tuple[int, ...],
    scale: str,
    seeds: int = 3,
    data_dirs: dict[str, str] | None = None,
) -> list[RunSpec]:
    """The runs for these tables at this scale, one per distinct configuration and seed.

    Table 3 (parameter counts) needs no runs: the report computes it from the models.
    """
    if scale not in SCALES:
        raise ValueError(f"--scale must be one of {SCALES}, got {scale!r}")
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    groups: dict[str, RunSpec] = {}
    for name in sorted(PRESETS):
        preset = PRESETS[name]
        if preset.scale != scale or not set(preset.tables) & set(tables):
            continue
        model, train_cfg = preset.configs()
        key = _key(model, train_cfg)
        if key in groups:
            spec = groups[key]
            spec.presets.append(name)
            spec.tables = tuple(sorted(set(spec.tables) | set(preset.tables)))
        else:
            groups[key] = RunSpec(name, [name], tuple(preset.tables), scale, model, train_cfg)
    specs = []
    for spec in groups.values():
        dataset = spec.train.dataset
        data_dir = (data_dirs or {}).get(dataset, (data_dirs or {}).get("*"))
        for seed in range(seeds):
            specs.append(
                dataclasses.replace(
                    spec,
                    name=f"{spec.name}-seed{seed}",
                    presets=list(spec.presets),
                    train=dataclasses.replace(spec.train, seed=seed, data_dir=data_dir),
                )
            )
    return specs


def _cells(spec: RunSpec) -> dict[str, dict]:
    """The cell the run fills in each of its tables: the cells of the presets it stands for."""
    cells = getattr(spec, "cells", None)
    if cells is not None:
        return {str(t): dict(c) for t, c in cells.items()}
    out: dict[str, dict] = {}
    for name in spec.presets:
        preset = PRESETS[name]
        for table in preset.tables:
            if str(table) in {str(t) for t in spec.tables}:
                out[str(table)] = dict(preset.cell)
    return out


def _summary(record: RunRecord) -> str:
    final = record.final
    text = record.status
    if final is not None:
        text += f", test bits/dim {final.test_bpd:.4f} (epoch {final.epochs_done}/{record.train.get('epochs', '?')})"
    if record.diverged is not None:
        text += f", diverged at step {record.diverged.step}"
    return text


def run_sweep(
    tables: tuple,
    scale: str,
    runs_dir: str | Path,
    seeds: int = 3,
    device: str = "auto",
    data_dirs: dict[str, str] | None = None,
    progress: bool = True,
    amp: str | None = None,
    channels_last: bool = False,
) -> list[RunRecord]:
    """Run (or keep, or resume) every planned run under runs_dir/<name>; returns their records.

    One line per run is printed whatever ``progress`` says (it only turns the progress bars off):
    name, status and test bits/dim. A run whose directory another process has locked, or whose
    record is unreadable, is skipped with a message and the sweep goes on; so no run is ever
    trained twice, and one bad directory never stops the others. ``amp``/``channels_last`` set
    those TrainConfig fields in every run (a different precision is a different configuration:
    use another runs_dir).
    """
    runs_dir = Path(runs_dir)
    specs = plan(tables, scale, seeds, data_dirs)
    records: list[RunRecord] = []
    skipped: list[str] = []
    for i, spec in enumerate(specs, 1):
        run_dir = runs_dir / spec.name
        head = f"[{i}/{len(specs)}] {spec.name}"
        existing: RunRecord | None = None
        if (run_dir / RECORD).exists():
            try:
                existing = read_record(run_dir)
            except RunError as exc:
                print(f"{head}: skipped: {exc}; move it away to rerun that run", flush=True)
                skipped.append(spec.name)
                continue
        if existing is not None and existing.status in ENDED:
            print(f"{head}: {_summary(existing)} (kept)", flush=True)
            records.append(existing)
            continue
        verb = "resuming" if existing is not None else "running"
        print(f"{head}: {verb} (tables {', '.join(map(str, spec.tables))})", flush=True)
        train_cfg = spec.train
        if amp is not None or channels_last:
            train_cfg = dataclasses.replace(train_cfg, amp=amp, channels_last=channels_last)
        try:
            record = train(
                spec.model,
                train_cfg,
                run_dir,
                resume=existing is not None,
                device=device,
                preset=spec.presets[0],
                tables=spec.tables,
                cells=_cells(spec),
                scale=spec.scale,
                progress=progress,
            )
        except RunError as exc:  # locked by another process, a corrupt checkpoint, ...: this run only
            print(f"{head}: skipped: {exc}", flush=True)
            skipped.append(spec.name)
            continue
        print(f"{head}: {_summary(record)}", flush=True)
        records.append(record)
    if skipped:
        print(f"skipped {len(skipped)} of {len(specs)} runs (locked or unreadable): {', '.join(skipped)}", flush=True)
    return records

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
from .training import RECORD, RunError, TrainConfig, read_record, train

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


def run_sweep(
    tables: tuple[int, ...],
    scale: str,
    runs_dir: str | Path,
    seeds: int = 3,
    device: str = "auto",
    data_dirs: dict[str, str] | None = None,
    progress: bool = True,
) -> list[dict]:
    """Run (or skip, or resume) every planned run under runs_dir/<name>; returns their records."""
    runs_dir = Path(runs_dir)
    specs = plan(tables, scale, seeds, data_dirs)
    records = []
    for i, spec in enumerate(specs, 1):
        run_dir = runs_dir / spec.name
        existing: dict = {}
        if (run_dir / RECORD).exists():
            try:
                existing = read_record(run_dir)
            except RunError as exc:
                raise RunError(f"{exc}; move it away to rerun that run") from exc
        status = existing.get("status")
        if status in ("finished", "diverged"):
            if progress:
                print(f"[{i}/{len(specs)}] {spec.name}: {status}, kept")
            records.append(existing)
            continue
        if progress:
            verb = "resuming" if existing else "running"
            print(f"[{i}/{len(specs)}] {verb} {spec.name} (tables {', '.join(map(str, spec.tables))})")
        record = train(
            spec.model,
            spec.train,
            run_dir,
            resume=bool(existing),
            device=device,
            preset=spec.presets[0],
            tables=spec.tables,
            scale=spec.scale,
            progress=progress,
        )
        records.append(record)
    return records

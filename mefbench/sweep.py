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

__all__ = ["RunSpec", "parse_tables", "plan", "run_sweep"]


@dataclass
class RunSpec:
    name: str
    presets: list[str]
    tables: tuple[str, ...]
    scale: str
    model: FlowConfig
    train: TrainConfig
    cells: dict[str, dict] = dataclasses.field(default_factory=dict)  # table id -> the cell this run fills


def _table_ids() -> tuple[str, ...]:
    from .report.tables import TABLES

    return tuple(TABLES)


def parse_tables(text: str) -> tuple[str, ...]:
    """'all', or a comma list of table ids ("4", "5,mixing", "stability")."""
    ids = _table_ids()
    if text == "all":
        return ids
    tables = tuple(dict.fromkeys(t.strip() for t in text.split(",") if t.strip()))
    if not tables or any(t not in ids for t in tables):
        raise ValueError(f"--table takes 'all' or table ids from {', '.join(ids)} (comma-separated), got {text!r}")
    return tuple(t for t in ids if t in tables)


def _key(model: FlowConfig, train_cfg: TrainConfig) -> str:
    return json.dumps([model.to_dict(), dataclasses.replace(train_cfg, seed=0, data_dir=None).to_dict()], sort_keys=True)


def default_seeds(tables: tuple[str, ...]) -> int:
    """Seeds a sweep runs when --seeds is not given: the most any of the tables asks for."""
    from .report.tables import TABLES

    return max((TABLES[t].seeds for t in tables), default=3) or 3


def plan(
    tables: tuple[str, ...],
    scale: str,
    seeds: int | None = None,
    data_dirs: dict[str, str] | None = None,
) -> list[RunSpec]:
    """The runs for these tables at this scale, one per distinct configuration and seed.

    Presets that build the same model with the same recipe (MEF at lr 0.01 fills Tables 2, 4, 5,
    6 and the zoo tables) are one run, listed under every table and cell they fill. Tables
    computed from the models alone (Table 3) need no runs. ``seeds`` defaults to the tables' own
    (:func:`default_seeds`: 3, and 5 for the stability table).
    """
    if scale not in SCALES:
        raise ValueError(f"--scale must be one of {SCALES}, got {scale!r}")
    tables = tuple(str(t) for t in tables)
    seeds = default_seeds(tables) if seeds is None else seeds
    if seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    groups: dict[str, RunSpec] = {}
    for name in sorted(PRESETS):
        preset = PRESETS[name]
        mine = tuple(t for t in preset.tables if t in tables)
        if preset.scale != scale or not mine:
            continue
        model, train_cfg = preset.configs()
        key = _key(model, train_cfg)
        cells = {t: dict(preset.cell) for t in preset.tables}
        if key in groups:
            spec = groups[key]
            spec.presets.append(name)
            spec.tables = tuple(t for t in _table_ids() if t in set(spec.tables) | set(preset.tables))
            spec.cells.update(cells)
        else:
            groups[key] = RunSpec(name, [name], tuple(preset.tables), scale, model, train_cfg, cells)
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
                    cells={t: dict(c) for t, c in spec.cells.items()},
                    train=dataclasses.replace(spec.train, seed=seed, data_dir=data_dir),
                )
            )
    return specs


def run_sweep(
    tables: tuple[str, ...],
    scale: str,
    runs_dir: str | Path,
    seeds: int | None = None,
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

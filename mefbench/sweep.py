"""Every run a paper table needs, at a chosen scale; re-running skips finished runs and resumes the rest.

Runs that several tables share (MEF at lr 0.01 fills Table 2, the matrix-exp cell of Table 4 and
of Table 5, and Table 6) are run once and listed under all of them in their record.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from .config import TrainConfig
from .models import FlowConfig
from .presets import PRESETS, SCALES
from .record import ENDED, RECORD, RunError, RunRecord, read_record
from .training import train

__all__ = [
    "RunSpec",
    "SweepError",
    "config_differences",
    "parse_tables",
    "plan",
    "planned_train_config",
    "run_sweep",
    "train_planned",
]


class SweepError(RunError):
    """Some planned runs were not done (failed, skipped as locked or unreadable, or refused because
    their directory holds another configuration). ``failures`` maps each run's name to the reason;
    ``records`` are the records of the runs that were done."""

    def __init__(self, failures: dict[str, str], records: list[RunRecord], planned: int) -> None:
        self.failures, self.records = dict(failures), list(records)
        lines = "; ".join(f"{name}: {reason}" for name, reason in failures.items())
        super().__init__(f"{len(failures)} of {planned} runs were not done: {lines}")


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
    return json.dumps(
        [model.to_dict(), dataclasses.replace(train_cfg, seed=0, data_dir=None).to_dict()], sort_keys=True
    )


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
    computed from the models alone (Table 3) need no runs. ``seeds`` defaults, per run, to what
    the tables it fills ask for (:func:`default_seeds`: 3, and 5 for the stability table).
    """
    if scale not in SCALES:
        raise ValueError(f"--scale must be one of {SCALES}, got {scale!r}")
    tables = tuple(str(t) for t in tables)
    if seeds is not None and seeds < 1:
        raise ValueError(f"--seeds must be at least 1, got {seeds}")
    groups: dict[str, RunSpec] = {}
    order = _table_ids()
    # a run that several presets share is named after the one of the earliest table (the paper's
    # Table 2 run, not its row in a zoo table)
    ranked = sorted(PRESETS, key=lambda n: (min((order.index(t) for t in PRESETS[n].tables), default=len(order)), n))
    for name in ranked:
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
        # a run's seeds: as given, else the most any table it fills asks for (Table 4's shared
        # MEF run takes 3, the stability grid's own runs 5)
        n = seeds if seeds is not None else default_seeds(tuple(t for t in spec.tables if t in tables))
        for seed in range(n):
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


def _cells(spec: RunSpec) -> dict[str, dict]:
    """The cell the run fills in each of its tables (from the presets it stands for)."""
    return {str(t): dict(c) for t, c in spec.cells.items()}


def planned_train_config(spec: RunSpec, amp: str | None = None, channels_last: bool = False) -> TrainConfig:
    """The recipe a planned run trains with: its preset's, in the sweep's precision and memory format."""
    if amp is None and not channels_last:
        return spec.train
    return dataclasses.replace(spec.train, amp=amp, channels_last=channels_last)


def train_planned(
    spec: RunSpec,
    run_dir: Path,
    train_cfg: TrainConfig,
    *,
    resume: bool,
    device: str = "auto",
    progress: bool = False,
    interrupt_signals: tuple[int, ...] = (),
) -> RunRecord:
    """Train (or resume) one planned run in run_dir, recording its presets, tables and cells."""
    return train(
        spec.model,
        train_cfg,
        run_dir,
        resume=resume,
        device=device,
        preset=spec.presets[0],
        tables=spec.tables,
        cells=_cells(spec),
        scale=spec.scale,
        progress=progress,
        interrupt_signals=interrupt_signals,
    )


def config_differences(record: RunRecord, model: FlowConfig, train_cfg: TrainConfig) -> list[str]:
    """The fields in which a recorded run differs from a configuration, as "train.lr: 0.05 recorded,
    0.01 planned" (where the data lives is not compared: data may move). Empty when they agree."""
    try:
        recorded = {"model": record.model_config().to_dict(), "train": record.train_config().to_dict()}
    except (ValueError, TypeError) as exc:
        return [f"the recorded configuration cannot be read here ({exc})"]
    planned = {"model": model.to_dict(), "train": train_cfg.to_dict()}
    out = []
    for part in ("model", "train"):
        for key in planned[part]:
            if key == "data_dir":
                continue
            old, new = recorded[part].get(key), planned[part][key]
            if old != new:
                out.append(f"{part}.{key}: {old!r} recorded, {new!r} planned")
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
    tables: tuple[str, ...],
    scale: str,
    runs_dir: str | Path,
    seeds: int | None = None,
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
    trained twice, and one bad directory never stops the others. A directory whose record holds
    another configuration than the plan's (a run trained by hand under the planned name, say with
    another ``--lr``) is refused and left as it is, with the differing fields: the planned cell
    would otherwise never be trained. ``amp``/``channels_last`` set those TrainConfig fields in
    every run (a different precision is a different configuration: use another runs_dir).

    When any planned run was not done (failed, skipped or refused), :class:`SweepError` is raised
    at the end, naming each with its reason and carrying the records of those that were.
    """
    runs_dir = Path(runs_dir)
    if runs_dir.exists() and not runs_dir.is_dir():
        raise ValueError(
            f"--runs {runs_dir} is a file, not a folder: give the folder that holds (or will hold) the runs"
        )
    specs = plan(tables, scale, seeds, data_dirs)
    records: list[RunRecord] = []
    failures: dict[str, str] = {}

    def fail(head: str, name: str, reason: str, advice: str = "") -> None:
        print(f"{head}: {reason}{advice}", flush=True)
        failures[name] = reason

    for i, spec in enumerate(specs, 1):
        run_dir = runs_dir / spec.name
        head = f"[{i}/{len(specs)}] {spec.name}"
        train_cfg = planned_train_config(spec, amp, channels_last)
        existing: RunRecord | None = None
        if (run_dir / RECORD).exists():
            try:
                existing = read_record(run_dir)
            except RunError as exc:
                fail(head, spec.name, f"skipped: {exc}", "; move it away to rerun that run")
                continue
            differences = config_differences(existing, spec.model, train_cfg)
            if differences:
                fail(
                    head,
                    spec.name,
                    f"refused: {run_dir} holds a run of another configuration than planned ({'; '.join(differences)})",
                    "; it is left as it is: move it away (or use another --runs) to run the planned one",
                )
                continue
        if existing is not None and existing.status in ENDED:
            print(f"{head}: {_summary(existing)} (kept)", flush=True)
            records.append(existing)
            continue
        verb = "resuming" if existing is not None else "running"
        print(f"{head}: {verb} (tables {', '.join(map(str, spec.tables))})", flush=True)
        try:
            record = train_planned(
                spec, run_dir, train_cfg, resume=existing is not None, device=device, progress=progress
            )
        except RunError as exc:  # locked by another process, a corrupt checkpoint, ...: this run only
            fail(head, spec.name, f"skipped: {exc}")
            continue
        except Exception as exc:
            recorded = (run_dir / RECORD).exists()
            fail(
                head,
                spec.name,
                f"FAILED ({type(exc).__name__}: {exc})",
                "; its record says how far it got" if recorded else "; nothing was recorded",
            )
            continue
        print(f"{head}: {_summary(record)}", flush=True)
        records.append(record)
    if failures:
        print(f"{len(failures)} of {len(specs)} runs not done: {', '.join(failures)}", flush=True)
        raise SweepError(failures, records, len(specs))
    return records

"""What a sweep's runs are doing: ``mefbench status --runs DIR``.

Every planned run (from ``--table/--scale/--seeds``, or from the plan each sweep writes into the
runs directory, :data:`PLAN`) and every run directory found there gets one state:

========== ==============================================================================
finished   its record says so
diverged   its record says so (data, never retried)
running    a live process holds its lock (host and pid from the lock file)
failed     its last job failed (the job raised, or the scheduler says FAILED, TIMEOUT,
           OUT_OF_MEMORY, NODE_FAIL...) and nothing runs it now
interrupted its record says interrupted, or running while no process holds its lock any more
           (killed); the next sweep resumes it
pending    planned, no record yet (its job may be queued)
corrupt    its record cannot be read (the reason is shown); a sweep skips it
========== ==============================================================================

with the last committed epoch's test bits/dim and, where a sweep submitted jobs
(:mod:`mefbench.cluster`), the state of each run's last job. Everything is read as a sweep
writes it, with the same record reader, and no lock is taken (taking one, even for an instant,
could make a starting job find its run locked and leave it): a lock is known to be held from
``/proc/locks`` on the machine that holds it, and from the process id where ``/proc/locks`` is
missing. A lock held from another machine of a cluster cannot be seen from here: such a run
counts as running while its record and its job say so.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .record import ENDED, LOCK, RECORD, RunError, RunRecord, now, read_record, write_json_atomic

__all__ = [
    "PLAN",
    "STATES",
    "RunStatus",
    "format_status",
    "load_plan",
    "lock_holder",
    "pid_alive",
    "run_statuses",
    "save_plan",
]

PLAN = ".plan.json"  # in the runs directory: every run a sweep planned there, merged over sweeps
STATES = ("finished", "running", "interrupted", "diverged", "failed", "pending", "corrupt")


# ----------------------------------------------------------------------------- the plan


def _planned(spec) -> dict:
    """A RunSpec as the plan file keeps it: tables, the preset that fills each, seed, epochs."""
    from .presets import PRESETS

    by_table = {}
    for table in spec.tables:
        table = str(table)
        by_table[table] = next((p for p in spec.presets if table in PRESETS[p].tables), spec.presets[0])
    return {
        "tables": [str(t) for t in spec.tables],
        "presets": by_table,
        "scale": spec.scale,
        "seed": spec.train.seed,
        "epochs": spec.train.epochs,
    }


def save_plan(runs_dir: str | Path, specs: Sequence) -> Path:
    """Add these planned runs to the runs directory's plan file (earlier sweeps' runs stay)."""
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    path = runs_dir / PLAN
    try:
        runs = load_plan(runs_dir) or {}
    except RunError:
        runs = {}  # an unreadable plan is rewritten: it only tells status what is pending
    runs.update({spec.name: _planned(spec) for spec in specs})
    write_json_atomic(path, {"schema": 1, "updated_at": now(), "runs": runs})
    return path


def load_plan(runs_dir: str | Path) -> dict[str, dict] | None:
    """The planned runs by name (None when no sweep wrote a plan there)."""
    path = Path(runs_dir) / PLAN
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        runs = data["runs"]
        if not isinstance(runs, dict) or not all(isinstance(v, dict) for v in runs.values()):
            raise TypeError("'runs' is not an object of objects")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise RunError(f"unreadable plan {path}: {exc}") from None
    return runs


# ----------------------------------------------------------------------------- the lock, read only


def _proc_locks() -> list[tuple[int, str]] | None:
    """(pid, "major:minor:inode") of every lock in /proc/locks; None where there is none."""
    try:
        text = Path("/proc/locks").read_text()
    except OSError:
        return None
    out = []
    for line in text.splitlines():
        parts = line.split()
        if "->" in parts:  # a process waiting for the lock, not holding it
            continue
        ids = [p for p in parts if re.fullmatch(r"[0-9a-f]+:[0-9a-f]+:\d+", p)]
        pids = [p for p in parts[4:6] if p.isdigit()]
        if ids and pids:
            out.append((int(pids[0]), ids[0]))
    return out


def pid_alive(pid: int) -> bool:
    """Whether a process with this id lives on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def lock_holder(run_dir: str | Path) -> tuple[dict | None, bool | None]:
    """Who last held a run directory's lock (``{"pid", "host", "since"}``, from the lock file)
    and whether the lock is held now: True or False, or None when this machine cannot tell (the
    holder is another host). Takes no lock."""
    path = Path(run_dir) / LOCK
    try:
        st = path.stat()
        text = path.read_bytes().decode("utf-8", "replace")
    except OSError:
        return None, False
    try:
        holder = json.loads(text)
    except json.JSONDecodeError:
        holder = None
    holder = holder if isinstance(holder, dict) and holder else None
    here = socket.gethostname()
    remote = holder is not None and holder.get("host") not in (None, here)
    locks = _proc_locks()
    if locks is not None:
        key = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        if any(k == key for _, k in locks):
            return holder, True
        return holder, None if remote else False
    if remote or holder is None or not isinstance(holder.get("pid"), int):
        return holder, None
    return holder, pid_alive(holder["pid"])


# ----------------------------------------------------------------------------- states


@dataclass
class RunStatus:
    """One run's state (:data:`STATES`) and what is known about it."""

    name: str
    state: str
    tables: tuple[str, ...] = ()
    presets: dict[str, str] = field(default_factory=dict)  # table id -> the preset the run fills it for
    seed: int | None = None
    epochs: int | None = None  # committed
    total_epochs: int | None = None
    test_bpd: float | None = None  # the last committed epoch's, EMA weights
    holder: dict | None = None  # the lock's last holder: pid, host, since
    job_id: str | None = None
    job_state: str | None = None
    note: str = ""
    planned: bool = True

    def summary(self) -> str:
        """``running on HOST (pid P), epoch 1/2, test bits/dim 6.4853, job 12_0 RUNNING``."""
        text = self.state
        if self.state == "running" and self.holder:
            text += f" on {self.holder.get('host', '?')} (pid {self.holder.get('pid', '?')})"
        if self.epochs is not None:
            text += f", epoch {self.epochs}/{self.total_epochs if self.total_epochs is not None else '?'}"
        if self.test_bpd is not None:
            text += (
                f", test bits/dim {self.test_bpd:.4f}"
                if math.isfinite(self.test_bpd)
                else f", test bits/dim {self.test_bpd}"
            )
        if self.job_id is not None:
            text += f", job {self.job_id} {self.job_state or 'UNKNOWN'}"
        if self.note:
            text += f" ({self.note})"
        return text


def _from_record(record: RunRecord) -> dict:
    last = record.last_epoch
    return {
        "epochs": len(record.epochs),
        "total_epochs": record.train.get("epochs"),
        "test_bpd": last.test_bpd if last is not None else None,
    }


def _state(run_dir: Path, job_id: str | None, job_state: str | None, runs_dir: Path) -> dict:
    from .cluster import ACTIVE_STATES, FAILED_STATES, job_failure

    if not (run_dir / RECORD).exists():
        holder, held = lock_holder(run_dir)
        if held:  # a run starting: locked, its first record not yet written
            return {"state": "running", "holder": holder}
        if job_state in FAILED_STATES:
            return {"state": "failed", "note": job_failure(runs_dir, job_id) or f"its job ended {job_state}"}
        return {"state": "pending"}
    try:
        record = read_record(run_dir)
    except RunError as exc:
        return {"state": "corrupt", "note": str(exc)}
    out = _from_record(record)
    if record.status in ENDED:
        return {"state": record.status, **out}
    holder, held = lock_holder(run_dir)
    if held:
        return {"state": "running", "holder": holder, **out}
    if held is None and record.status == "running" and (job_state is None or job_state in ACTIVE_STATES):
        where = holder.get("host") if holder else "another host"
        return {"state": "running", "holder": holder, "note": f"locked on {where}, per its record", **out}
    if job_state in FAILED_STATES:
        return {"state": "failed", "note": job_failure(runs_dir, job_id) or f"its job ended {job_state}", **out}
    if record.status == "running":
        who = f"{holder.get('host', '?')} pid {holder.get('pid', '?')}" if holder else "its process"
        return {"state": "interrupted", "holder": holder, "note": f"{who} ended without marking it", **out}
    return {"state": "interrupted", **out}


def run_statuses(runs_dir: str | Path, specs: Sequence | None = None, others: bool = True) -> list[RunStatus]:
    """The state of every planned run (``specs``; by default the runs directory's plan file)
    and, with ``others``, of every other run directory with a record there; planned runs
    first, in plan order."""
    from .cluster import job_states, latest_jobs

    runs_dir = Path(runs_dir)
    plan = {s.name: _planned(s) for s in specs} if specs is not None else (load_plan(runs_dir) or {})
    found = sorted(p.parent.name for p in runs_dir.glob(f"*/{RECORD}") if not p.parent.name.startswith("."))
    names = [*plan, *(n for n in found if n not in plan and others)]
    try:
        jobs = {n: j for n, j in latest_jobs(runs_dir).items() if n in set(names)}
    except RunError:
        jobs = {}
    states = job_states(runs_dir, list(jobs.values())) if jobs else {}
    rows = []
    for name in names:
        job = jobs.get(name)
        job_id = job.job_id if job else None
        job_state = states.get(job_id) if job_id else None
        row = RunStatus(name=name, state="pending", job_id=job_id, job_state=job_state, planned=name in plan)
        info = plan.get(name)
        if info is not None:
            row.tables = tuple(str(t) for t in info.get("tables", ()))
            row.presets = {str(k): str(v) for k, v in dict(info.get("presets", {})).items()}
            row.seed, row.total_epochs = info.get("seed"), info.get("epochs")
        for key, value in _state(runs_dir / name, job_id, job_state, runs_dir).items():
            if not (key == "total_epochs" and value is None):  # the plan's, when the record has none
                setattr(row, key, value)
        if info is None and row.state != "corrupt":  # a run of no plan: its record says what it fills
            try:
                record = read_record(runs_dir / name)
                row.tables = tuple(record.tables)
                row.presets = dict.fromkeys(row.tables, record.preset or name)
                row.seed = record.seed
            except RunError:
                pass
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------- the text


def format_status(rows: Sequence[RunStatus], runs_dir: str | Path, planned: bool = True) -> str:
    """The status as text: a count line, then per table and per preset one line per run."""
    from .report.tables import TABLES

    counts = {s: sum(r.state == s for r in rows) for s in STATES}
    lines = [f"{runs_dir}: {len(rows)} runs: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n)]
    if not rows:
        lines[0] = f"{runs_dir}: no runs planned or recorded"
    if not planned:
        lines.append("(no plan: pass --table/--scale/--seeds, or run a sweep here, to see the runs not yet started)")
    order = list(TABLES)
    tables = sorted(
        {t for r in rows for t in r.tables}, key=lambda t: (order.index(t) if t in order else len(order), t)
    )
    for table in [*tables, None]:
        members = [r for r in rows if (table in r.tables if table is not None else not r.tables)]
        if not members:
            continue
        title = f"table {table}" if table is not None else "runs that fill no table"
        if table in TABLES:
            title += f": {TABLES[table].what}"
        lines += ["", title]
        by_preset: dict[str, list[RunStatus]] = {}
        for r in members:
            by_preset.setdefault(r.presets.get(table, r.name) if table is not None else r.name, []).append(r)
        width = max(len(p) for p in by_preset)
        for preset, group in by_preset.items():
            for r in group:
                seed = f"seed {r.seed}" if r.seed is not None else ""
                lines.append(f"  {preset:<{width}}  {seed:<7}  {r.summary()}")
    return "\n".join(lines)

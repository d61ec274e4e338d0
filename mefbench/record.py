"""A run directory's files, read and written in one place: the typed record, atomic writes, the lock.

A run directory holds

    record.json     the :class:`RunRecord` (JSON), rewritten atomically after every epoch and at the end
    checkpoint.pt   the training state after the last finished epoch, with the record of that epoch
                    inside it: the commit point of the epoch (see :mod:`mefbench.training`)
    .lock           an ``fcntl.flock`` held by the process that trains in the directory

``read_record`` turns every way a ``record.json`` can be wrong (not UTF-8, not JSON, not an
object, a missing or mistyped field, an unknown schema) into a :class:`RunError` that names the
file and what is wrong. Records of older schemas are migrated on
read. Schema 1 (mefbench before the typed record): table numbers become ids (``"4"``), the model
dict's flat ``scale``/``coupling_rank`` move into ``coupling_options``, ``model_revision`` is 1
and the table cells are derived from the presets. Schemas 1 and 2: the mixing layer, called
``conv`` then, becomes ``mixing`` (``conv_options`` ``mixing_options``), in the model dict and in
the table cells. Schema 4 added the validation bits/dim, the per-epoch loss summary (first and
largest loss, and its step), the validation bits/dim before training, why and where the run
stopped (:class:`Stop`) and the final test bits/dim on the whole test split; an older record
reads as one without them. ``mefbench migrate-records DIR`` rewrites them on disk.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import errno
import json
import os
import socket
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

__all__ = [
    "CHECKPOINT",
    "ENDED",
    "LOCK",
    "RECORD",
    "SCHEMA",
    "STATUSES",
    "Divergence",
    "EpochRecord",
    "FinalMetrics",
    "Resume",
    "RunError",
    "RunLock",
    "RunLockedError",
    "RunRecord",
    "Stop",
    "derive_cells",
    "migrate_records",
    "read_record",
    "remove_stale_temporaries",
    "replace_atomic",
    "write_json_atomic",
    "write_record",
]

RECORD = "record.json"
CHECKPOINT = "checkpoint.pt"
LOCK = ".lock"
SCHEMA = 4
STATUSES = ("running", "finished", "diverged", "interrupted")
ENDED = ("finished", "diverged")  # a run with one of these statuses is never trained again


class RunError(RuntimeError):
    """A run directory that cannot be used as asked (exists already, corrupt, mismatched, locked)."""


class RunLockedError(RunError):
    """Another live process holds the run directory's lock; ``pid`` is that process (None if unknown)."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- the typed record


@dataclass(kw_only=True)
class EpochRecord:
    """One finished epoch. ``test_bpd`` uses the EMA weights, ``test_bpd_raw`` the raw ones;
    ``expm`` is ``{"m": stats, "s": stats}`` over the epoch's matrix-exponential calls;
    ``peak_memory_bytes`` is measured on the epoch's first training step (``peak_memory_method``).
    ``valid_bpd``: the EMA weights on the validation split (runs that validate). ``loss_first``
    is the epoch's first training loss, ``loss_max`` its largest and ``loss_max_step`` the step of
    that (steps counted from 1 over the run): the stability benchmark's spikes, which the
    epoch's mean ``train_bpd`` would hide. ``compile_time_s`` is the first step of a compiled
    training step in this process (compilation plus one step; left out of ``train_time_s``), None
    when nothing was compiled in the epoch."""

    epoch: int
    step: int
    lr: float
    train_bpd: float
    train_bpd_ema: float
    test_bpd: float
    test_bpd_raw: float
    train_time_s: float
    eval_time_s: float = float("nan")
    expm: dict = field(default_factory=dict)
    peak_memory_bytes: int | None = None
    peak_memory_method: str | None = None
    valid_bpd: float | None = None
    loss_first: float | None = None
    loss_max: float | None = None
    loss_max_step: int | None = None
    compile_time_s: float | None = None


@dataclass(kw_only=True)
class FinalMetrics:
    """The run's numbers: those of the last finished epoch, the total training time, the pooled
    expm statistics, and (once the run has finished) the measurements of the trained EMA model."""

    epochs_done: int
    step: int
    test_bpd: float
    test_bpd_raw: float
    train_bpd: float
    train_bpd_ema: float
    train_time_s: float
    mean_epoch_time_s: float
    expm: dict = field(default_factory=dict)
    sample_time_per_image_s: float | None = None  # EMA model.sample(n) / n, synchronised on CUDA
    sample_images: int | None = None  # the n of that timing
    roundtrip_error: float | None = None  # max |x − inverse(forward(x))| on a test batch, float32
    peak_memory_bytes: int | None = None  # one training step, see peak_memory_method
    peak_memory_method: str | None = None
    measure_error: str | None = None  # why a measurement of the trained model failed (it is then inf / None)
    # the trained EMA model on the whole test split, or the first max_final_test of a fixed shuffle of it (epochs
    # evaluate a fixed subset when max_test is set)
    test_bpd_full: float | None = None
    test_images_full: int | None = None

    @classmethod
    def from_epochs(cls, epochs: list[EpochRecord], **measured: Any) -> FinalMetrics:
        from .stats import pool_stats

        last = epochs[-1]
        times = [e.train_time_s for e in epochs]
        return cls(
            epochs_done=len(epochs),
            step=last.step,
            test_bpd=last.test_bpd,
            test_bpd_raw=last.test_bpd_raw,
            train_bpd=last.train_bpd,
            train_bpd_ema=last.train_bpd_ema,
            train_time_s=sum(times),
            mean_epoch_time_s=sum(times) / len(times),
            expm={k: pool_stats([e.expm.get(k, {}) for e in epochs]) for k in ("m", "s")},
            peak_memory_bytes=last.peak_memory_bytes,
            peak_memory_method=last.peak_memory_method,
            **measured,
        )


@dataclass(kw_only=True)
class Divergence:
    """Where a run's loss (or test bits/dim) became non-finite: the run stops there, as data.
    ``loss_first``, ``loss_max`` and ``loss_max_step`` summarise the finite losses of the epoch
    it diverged in, as :class:`EpochRecord` does for a finished epoch."""

    epoch: int
    step: int
    loss: float
    loss_first: float | None = None
    loss_max: float | None = None
    loss_max_step: int | None = None


STOP_REASONS = ("plateau", "cap", "length")


@dataclass(kw_only=True)
class Stop:
    """Why and where a finished run stopped: ``"plateau"`` (the validation bits/dim stopped
    improving, :mod:`mefbench.plateau`), ``"cap"`` (it reached its epoch cap while still
    improving) or ``"length"`` (no plateau rule: it trained its configured epochs). ``best_epoch``
    and ``best_valid_bpd``: the plateau rule's best (runs that validate)."""

    reason: str
    epoch: int
    step: int
    best_epoch: int | None = None
    best_valid_bpd: float | None = None


@dataclass(kw_only=True)
class Resume:
    from_epoch: int
    at: str


@dataclass(kw_only=True)
class RunRecord:
    """Everything recorded about one run (schema 4), written as ``record.json``.

    ``model`` and ``train`` are the JSON forms of the run's :class:`~mefbench.config.FlowConfig`
    and :class:`~mefbench.config.TrainConfig` (kept as data, so that a record stays readable when
    a layer it names is no longer registered; :meth:`model_config` / :meth:`train_config` build
    the typed configs). ``tables`` are table ids (``"2"``, ``"4"``, ``"mixing"``, …) and
    ``cells`` maps each to the cell this run fills there, e.g. ``{"4": {"coupling": "affine",
    "lr": 0.01}}``. ``model_revision`` is :data:`mefbench.models.MODEL_REVISION` when the run
    was made: a checkpoint of another revision has other parameters and is refused.
    """

    schema: int = SCHEMA
    name: str = ""
    preset: str | None = None
    tables: list[str] = field(default_factory=list)
    cells: dict[str, dict] = field(default_factory=dict)
    scale: str | None = None
    status: str
    model: dict
    train: dict
    model_revision: int = 1
    seed: int | None = None
    device: str | None = None
    world_size: int = 1
    versions: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)
    num_params: int | None = None
    epochs: list[EpochRecord]
    final: FinalMetrics | None = None
    diverged: Divergence | None = None
    stop: Stop | None = None
    initial_valid_bpd: float | None = None  # the EMA (= initial) model on the validation split before any step
    resumes: list[Resume] = field(default_factory=list)
    command: list[str] = field(default_factory=list)
    started_at: str | None = None
    updated_at: str | None = None

    # ------------------------------------------------------------------ views

    def model_config(self):
        """The run's :class:`~mefbench.config.FlowConfig` (ValueError if a layer it names is unknown)."""
        from .config import FlowConfig

        return FlowConfig.from_dict(self.model)

    def train_config(self):
        """The run's :class:`~mefbench.config.TrainConfig`."""
        from .config import TrainConfig

        return TrainConfig.from_dict(self.train)

    @property
    def last_epoch(self) -> EpochRecord | None:
        return self.epochs[-1] if self.epochs else None

    def __getitem__(self, key: str) -> Any:
        """Dict-style reads (``record["status"]``) for code written against the schema-1 dicts."""
        if key not in {f.name for f in dataclasses.fields(self)}:
            raise KeyError(key)
        return self.to_dict()[key]

    # ------------------------------------------------------------------ JSON

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, allow_nan=True)

    @classmethod
    def from_dict(cls, data: object, source: str | Path = "run record") -> RunRecord:
        """A record from its JSON form, migrated from older schemas; RunError naming source otherwise."""
        try:
            record = _from_json(cls, _migrate(data, source), "record")
            record._validate()
        except _Invalid as exc:
            raise RunError(f"corrupt run record {source}: {exc}") from None
        return record

    @classmethod
    def from_json(cls, text: str, source: str | Path = "run record") -> RunRecord:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RunError(f"corrupt run record {source}: {_json_problem(text, exc)}") from None
        return cls.from_dict(data, source)

    def _validate(self) -> None:
        if self.status not in STATUSES:
            raise _Invalid(f"field 'status' must be one of {list(STATUSES)}, got {self.status!r}")
        for part, required in (("model", _MODEL_FIELDS), ("train", _TRAIN_FIELDS)):
            data = getattr(self, part)
            missing = [k for k in required if k not in data]
            if missing:
                raise _Invalid(f"missing fields {[f'{part}.{k}' for k in missing]}")
            for key, tp in required.items():
                _check(tp, data[key], f"{part}.{key}")
        if self.stop is not None and self.stop.reason not in STOP_REASONS:
            raise _Invalid(f"field 'stop.reason' must be one of {list(STOP_REASONS)}, got {self.stop.reason!r}")
        numbers = [e.epoch for e in self.epochs]
        if numbers != list(range(1, len(numbers) + 1)):
            raise _Invalid(
                f"its epochs are numbered {numbers}, not 1..{len(numbers)}: an epoch is missing "
                "(runs made before schema 2 could lose one to a kill between checkpoint and record)"
            )


_MODEL_FIELDS: dict[str, Any] = {
    "image_shape": list[int], "steps": list[int], "mixing": str, "coupling": str,
    "hidden_channels": int, "num_blocks": int,
}  # fmt: skip
_TRAIN_FIELDS: dict[str, Any] = {"dataset": str, "lr": float, "epochs": int}


# ----------------------------------------------------------------------------- JSON -> dataclasses


class _Invalid(ValueError):
    """What is wrong with a record's JSON (turned into a RunError that names the file)."""


def _describe(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"the number {value!r}"
    return names.get(type(value), type(value).__name__)


def _check(tp: Any, value: object, where: str) -> Any:
    """value checked against the annotation tp (and converted: int -> float, nested dataclasses)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _check(inner, value, where)
    if dataclasses.is_dataclass(tp):
        return _from_json(tp, value, where)
    if tp is Any:
        return value
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _Invalid(f"field {where!r} must be a number, got {_describe(value)}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _Invalid(f"field {where!r} must be an integer, got {_describe(value)}")
    if tp in (str, bool):
        if isinstance(value, tp):
            return value
        raise _Invalid(f"field {where!r} must be {_describe(tp())}, got {_describe(value)}")
    if tp is list or origin is list:
        if not isinstance(value, list):
            raise _Invalid(f"field {where!r} must be a list, got {_describe(value)}")
        return [_check(args[0], v, f"{where}[{i}]") for i, v in enumerate(value)] if args else list(value)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise _Invalid(f"field {where!r} must be an object, got {_describe(value)}")
        return {k: _check(args[1], v, f"{where}.{k}") for k, v in value.items()} if args else dict(value)
    raise TypeError(f"no JSON check for {tp!r}")  # pragma: no cover - a programming error


def _from_json(cls: Any, data: object, where: str) -> Any:
    if not isinstance(data, dict):
        what = "the record" if where == "record" else f"field {where!r}"
        raise _Invalid(f"{what} must be a JSON object, got {_describe(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise _Invalid(f"unknown fields {[k if where == 'record' else f'{where}.{k}' for k in unknown]}")
    missing = [
        name for name, f in fields.items()
        if name not in data and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]  # fmt: skip
    if missing:
        raise _Invalid(f"missing fields {[k if where == 'record' else f'{where}.{k}' for k in missing]}")
    prefix = "" if where == "record" else f"{where}."
    return cls(**{k: _check(hints[k], v, prefix + k) for k, v in data.items()})


def _json_problem(text: str, exc: json.JSONDecodeError) -> str:
    if not text.strip():
        return "the file is empty"
    return f"not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"


# ----------------------------------------------------------------------------- schema migration


def derive_cells(tables: list[str], model: dict, train: dict, scale: str | None = None) -> dict[str, dict]:
    """The cell a run fills in each of its tables, from what it is: for each table, the keys of the
    cells of the presets (at the run's scale) that list the table, valued from the run's own model
    and training configs, e.g. ``{"4": {"coupling": "matexp", "lr": 0.01}, "5": {"mixing": "matexp"}}``.
    Tables whose keys cannot be found are left out."""
    from .presets import PRESETS

    cells: dict[str, dict] = {}
    for table in tables:
        keys: set[str] = set()
        for preset in PRESETS.values():
            if str(table) in {str(t) for t in preset.tables} and scale in (None, preset.scale):
                keys |= set(preset.cell)
        cell = {}
        for key in sorted(keys):
            if key in model:
                cell[key] = model[key]
            elif key in train:
                cell[key] = train[key]
        if cell:
            cells[str(table)] = cell
    return cells


def _migrate_model(model: dict) -> dict:
    from .config import migrate_model_dict

    try:
        return migrate_model_dict(model)
    except ValueError as exc:
        raise _Invalid(f"field 'model': {exc}") from None


def _v1_to_v2(data: dict) -> dict:
    """Schema 1 (before the typed record): int tables, flat model options, no cells or revision.
    The model dict is brought to today's form at once, so that its cells are derived from today's
    presets."""
    data = {**data, "schema": 2}
    if isinstance(data.get("tables"), list):
        data["tables"] = [str(t) for t in data["tables"]]
    data["tables"] = data.get("tables") or []
    model, train = data.get("model"), data.get("train")
    if isinstance(model, dict):
        data["model"] = model = _migrate_model(model)
    data.setdefault("model_revision", 1)  # MODEL_REVISION 1: every run before the revision was recorded
    if "cells" not in data and isinstance(model, dict) and isinstance(train, dict) and isinstance(data["tables"], list):
        data["cells"] = derive_cells(data["tables"], model, train, data.get("scale"))
    if data.get("final") == {}:
        data["final"] = None
    return data


def _v2_to_v3(data: dict) -> dict:
    """Schema 2: the mixing layer was called ``conv`` (``conv_options``) in the model dict and the
    table cells (``{"5": {"conv": "plu"}}``); schema 3 calls it ``mixing``."""
    data = {**data, "schema": 3}
    if isinstance(data.get("model"), dict):
        data["model"] = _migrate_model(data["model"])
    if isinstance(data.get("cells"), dict):
        data["cells"] = {
            table: {("mixing" if key == "conv" else key): value for key, value in cell.items()}
            if isinstance(cell, dict)
            else cell
            for table, cell in data["cells"].items()
        }
    return data


def _v3_to_v4(data: dict) -> dict:
    """Schema 3 lacks the fields schema 4 added (validation, loss summaries, stop): all optional."""
    return {**data, "schema": 4}


_MIGRATIONS: dict[int, Callable[[dict], dict]] = {1: _v1_to_v2, 2: _v2_to_v3, 3: _v3_to_v4}


def _migrate(data: object, source: str | Path) -> object:
    if not isinstance(data, dict):
        return data  # _from_json says what it is
    schema = data.get("schema", 1)
    if isinstance(schema, bool) or not isinstance(schema, int) or schema < 1:
        raise _Invalid(f"field 'schema' must be a positive integer, got {_describe(schema)}")
    if schema > SCHEMA:
        raise _Invalid(f"it has schema {schema}, written by a newer mefbench (this one reads schemas 1 to {SCHEMA})")
    while schema < SCHEMA:
        data = _MIGRATIONS[schema](data)
        schema = data["schema"]
    return data


# ----------------------------------------------------------------------------- files


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def replace_atomic(path: Path, write: Callable[[IO[bytes]], object], hook: Callable[[str], None] | None = None) -> None:
    """write(file) into a temporary file beside path, fsync it, rename it over path, fsync the folder.

    A reader (or a process that resumes after a kill at any instruction) sees the old file or the
    new one, never half of one; a temporary file left by a kill is removed by
    :func:`remove_stale_temporaries`. ``hook(point)`` is called at ``"tmp-open"`` (the temporary
    file exists, empty) and ``"tmp-written"`` (written, not yet renamed): the training's test hooks.
    """
    path = Path(path)
    tmp = _temporary(path)
    try:
        with open(tmp, "wb") as f:
            if hook is not None:
                hook("tmp-open")
            write(f)
            f.flush()
            os.fsync(f.fileno())
        if hook is not None:
            hook("tmp-written")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_json_atomic(path: str | Path, data: dict, hook: Callable[[str], None] | None = None) -> None:
    text = json.dumps(data, indent=2, allow_nan=True)
    replace_atomic(Path(path), lambda f: f.write(text.encode()), hook)


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Remove the temporary files that a killed writer left in run_dir (call with the lock held)."""
    removed = []
    for name in (RECORD, CHECKPOINT):
        for tmp in Path(run_dir).glob(f".{name}.tmp*"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def _record_file(path: str | Path) -> Path:
    path = Path(path)
    return path if path.name == RECORD or path.is_file() else path / RECORD


def read_record(path: str | Path) -> RunRecord:
    """The record of a run directory (or of a ``record.json`` path), migrated to today's schema.

    Raises RunError naming the file for a missing file and for every kind of corrupt content.
    """
    file = _record_file(path)
    if not file.exists():
        raise RunError(f"no {RECORD} in {file.parent}: not a mefbench run directory")
    try:
        raw = file.read_bytes()
    except OSError as exc:
        raise RunError(f"cannot read run record {file}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RunError(f"corrupt run record {file}: not UTF-8 text (byte {exc.start}), so not a JSON record") from None
    return RunRecord.from_json(text, file)


def write_record(run_dir: str | Path, record: RunRecord, hook: Callable[[str], None] | None = None) -> None:
    replace_atomic(Path(run_dir) / RECORD, lambda f: f.write(record.to_json().encode()), hook)


def migrate_records(path: str | Path) -> tuple[list[Path], list[Path], list[Path], list[tuple[Path, str]]]:
    """Rewrite every ``record.json`` under path in today's schema (atomically, one by one).

    Returns (migrated, already current, locked, unreadable with the reason). A record whose run
    directory is locked (a run in progress) is left alone: its trainer writes today's schema.
    """
    root = Path(path)
    if not root.exists():
        raise FileNotFoundError(f"runs directory {root} does not exist")
    migrated, current, locked, unreadable = [], [], [], []
    for file in [root] if root.is_file() else sorted(root.rglob(RECORD)):
        try:
            record = read_record(file)
        except RunError as exc:
            unreadable.append((file, str(exc)))
            continue
        if json.loads(file.read_bytes().decode("utf-8")).get("schema") == SCHEMA:
            current.append(file)
            continue
        # a directory without a lock file was never trained by a process that locks (and is not now)
        lock = RunLock(file.parent) if (file.parent / LOCK).exists() else None
        try:
            if lock is not None:
                lock.acquire()
        except RunLockedError:
            locked.append(file)
            continue
        try:
            write_json_atomic(file, record.to_dict())
        finally:
            if lock is not None:
                lock.release()
        migrated.append(file)
    return migrated, current, locked, unreadable


# ----------------------------------------------------------------------------- the lock


class RunLock:
    """An exclusive ``fcntl.flock`` on ``<run dir>/.lock`` while a process trains in the directory.

    The kernel releases it when the process ends, however it ends (kill -9 included), so a lock
    left by a dead process never blocks a resume; the file itself stays (deleting a lock file is
    racy) and holds the pid, host and start time of its last holder, for the error message of
    the next process that finds it held. POSIX only.

    Runs of one sweep on several machines need a filesystem whose flock excludes across them:
    NFS (the Linux client sends flock to the server as a lock on the whole file, unless mounted
    with ``local_lock=flock``/``all`` or ``nolock``) or Lustre mounted with ``-o flock``. A
    filesystem without flock gets a RunError saying so.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        import fcntl

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            pid = holder.get("pid")
            who = f"process {pid}" if pid else "another process"
            if holder.get("host") and holder["host"] != socket.gethostname():
                who += f" on {holder['host']}"
            since = f" (training there since {holder['since']})" if holder.get("since") else ""
            raise RunLockedError(
                f"{self.run_dir} is locked by {who}{since}: a run is in progress there; "
                "wait for it to finish or stop it, then --resume",
                pid if isinstance(pid, int) else None,
            ) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOLCK, errno.EINVAL):
                raise RunError(
                    f"cannot lock {self.path}: its filesystem does not support flock ({exc.strerror}); Lustre needs "
                    "the flock mount option, NFS a mount without nolock (README: 'Sweeps on a cluster')"
                ) from None
            raise
        except BaseException:
            os.close(fd)
            raise
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": now()}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        self._fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> dict:
        try:
            data = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
            return data if isinstance(data, dict) else {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return {}

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()

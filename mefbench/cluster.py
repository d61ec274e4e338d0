"""Sweeps on a scheduler: one job per planned run, through submitit (SLURM, or processes on this machine).

``mefbench sweep --executor slurm`` submits every planned run that is not finished, diverged,
running or already queued as one SLURM job array (``sbatch``), prints the job ids and returns
(``--wait`` waits and reports). ``--executor local`` runs the same jobs as processes on this
machine, at most ``--max-parallel`` at once, each with its own GPUs (``CUDA_VISIBLE_DEVICES``),
and waits for them. ``--executor inline`` (the default) is :func:`mefbench.sweep.run_sweep`'s loop.

Each job is a :class:`RunJob`: it trains its run with the sweep's resume semantics (a finished
or diverged run is kept, an interrupted one continues from its last committed epoch, a run that
another process holds locked is left to it), so a job that runs twice, or a sweep submitted
twice, never trains an epoch twice into a record.

Preemption and time limits: submitit asks SLURM to send ``SIGUSR2`` (submitit's
``SUBMITIT_PREEMPT_SIGNAL``) ``signal_delay_s`` seconds before a job's time limit, and a cluster
with ``SlurmctldParameters=preempt_send_user_signal`` sends it when it preempts a job. The job
turns that signal into the training loop's interrupt (:func:`mefbench.training.train`'s
``interrupt_signals``): the epoch in flight is discarded, one being committed is kept, the
record says ``interrupted`` and the lock is released; then submitit calls
:meth:`RunJob.checkpoint` and requeues the job (``scontrol requeue``), and the requeued job
resumes from the last committed epoch. A run that has finished or diverged is not requeued, nor
one that reached its time limit without committing an epoch (its epochs are longer than
``--time``). A plain ``scancel`` (SIGTERM) marks the run interrupted and ends the job; the next
sweep resumes it.

Files: ``RUNS/.submitit/`` holds submitit's pickles and the jobs' logs
(``<job id>_<task>_log.out`` and ``.err``) and ``jobs.json``, the jobs submitted for each run
(``mefbench status`` reads it to show their states).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from submitit.helpers import Checkpointable, DelayedSubmission

from .record import ENDED, RECORD, RunError, RunLockedError, RunRecord, now, read_record, write_json_atomic
from .status import pid_alive
from .sweep import RunSpec
from .training import Interrupted

if TYPE_CHECKING:
    from submitit import Job, LocalExecutor, SlurmExecutor

__all__ = [
    "EXECUTORS",
    "JOBS",
    "SUBMITIT_DIR",
    "ClusterOptions",
    "JobEntry",
    "RunJob",
    "job_states",
    "latest_jobs",
    "parse_sbatch",
    "parse_time",
    "submit_sweep",
]

EXECUTORS = ("inline", "local", "slurm")
SUBMITIT_DIR = ".submitit"  # under the runs directory: submitit's pickles, the jobs' logs, JOBS
JOBS = "jobs.json"
# scheduler states of a job that has not ended (SLURM's names; submitit's local jobs say RUNNING)
ACTIVE_STATES = frozenset(
    {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING", "SUSPENDED",
     "RESIZING", "SIGNALING", "STAGE_OUT", "STOPPED", "PREEMPTED", "RESV_DEL_HOLD", "SPECIAL_EXIT"}
)  # fmt: skip
# ended states that mean the job failed (CANCELLED is a person's decision: the run is interrupted)
FAILED_STATES = frozenset({"FAILED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "TIMEOUT", "DEADLINE", "ERROR"})
_LOCAL_TIME_MIN = 7 * 24 * 60  # a local job's time limit when --time is not given: a week


# ----------------------------------------------------------------------------- options


@dataclass(frozen=True)
class ClusterOptions:
    """What every job of a sweep asks the scheduler for (the ``mefbench sweep`` options).

    ``time_min``: each job's time limit in minutes (``--time``; required for SLURM, where a run
    that reaches it is requeued and resumes). ``mem``: sbatch's ``--mem`` syntax (``16G``).
    ``gpus_per_run`` > 1 runs one task per GPU, data-parallel (as torchrun does).
    ``max_parallel``: SLURM's array throttle (``--array=0-N%K``); for the local executor, how
    many runs at once (default: one per ``gpus_per_run`` GPUs, or per ``cpus_per_run`` cores).
    ``sbatch``: more sbatch options, passed through (``{"qos": "high", "exclusive": True}``).
    """

    partition: str | None = None
    time_min: int | None = None
    gpus_per_run: int | None = None
    cpus_per_run: int | None = None
    mem: str | None = None
    max_parallel: int | None = None
    sbatch: dict[str, str | bool] = field(default_factory=dict)
    signal_delay_s: int = 90  # the warning signal comes this long before the time limit

    def __post_init__(self) -> None:
        for name in ("time_min", "gpus_per_run", "cpus_per_run", "max_parallel"):
            value = getattr(self, name)
            if value is not None and value < (0 if name == "gpus_per_run" else 1):
                flag = "--" + name.replace("_min", "").replace("_", "-")
                raise ValueError(f"{flag} must be at least {0 if name == 'gpus_per_run' else 1}, got {value}")


_TIME = re.compile(r"^(?:(?P<d>\d+)-)?(?P<a>\d+)(?::(?P<b>\d+))?(?::(?P<c>\d+))?$")


def parse_time(text: str) -> int:
    """A time limit in sbatch's formats, in whole minutes (seconds round up): ``90`` (minutes),
    ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM``, ``D-HH:MM:SS``."""
    found = _TIME.match(text.strip())
    if not found:
        raise ValueError(f"--time takes minutes or sbatch's [D-]HH:MM:SS (e.g. 90, 4:00:00, 2-00:00:00), got {text!r}")
    d, a, b, c = (int(v) if v is not None else None for v in found.group("d", "a", "b", "c"))
    assert a is not None  # the pattern's first number is not optional
    if d is None:  # MM, MM:SS, HH:MM:SS
        seconds = a * 60 if b is None else (a * 60 + b if c is None else a * 3600 + b * 60 + c)
    else:  # D-HH, D-HH:MM, D-HH:MM:SS
        seconds = d * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    if seconds <= 0:
        raise ValueError(f"--time must be more than zero, got {text!r}")
    return -(-seconds // 60)


def parse_sbatch(values: Sequence[str] | None) -> dict[str, str | bool]:
    """``--sbatch KEY=VALUE`` (repeatable; ``KEY`` alone is a flag such as ``exclusive``) ->
    submitit's ``additional_parameters``; a leading ``--`` is dropped."""
    out: dict[str, str | bool] = {}
    for value in values or []:
        key, sep, text = value.partition("=")
        key = key.strip().removeprefix("--")
        if not key or not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", key):
            raise ValueError(f"--sbatch takes KEY=VALUE or KEY (an sbatch option without its --), got {value!r}")
        out[key.replace("-", "_")] = text if sep else True
    return out


# ----------------------------------------------------------------------------- one run as a job


def _preempt_signal() -> int:
    """The signal submitit has SLURM send before a time limit or a preemption (SIGUSR2 unless
    SUBMITIT_PREEMPT_SIGNAL says otherwise)."""
    from submitit.core.job_environment import JobEnvironment

    return int(JobEnvironment._usr_sig())


def train_run(
    spec: RunSpec,
    run_dir: str | Path,
    *,
    device: str = "auto",
    amp: str | None = None,
    channels_last: bool = False,
    progress: bool = False,
    interrupt_signals: tuple[int, ...] = (),
) -> RunRecord:
    """Train one planned run with a sweep's semantics: kept if finished or diverged, resumed if
    it has a record, started otherwise (RunError if its record is unreadable or it is locked)."""
    from .sweep import planned_train_config, train_planned

    run_dir = Path(run_dir)
    existing = read_record(run_dir) if (run_dir / RECORD).exists() else None
    if existing is not None and existing.status in ENDED:
        return existing
    return train_planned(
        spec,
        run_dir,
        planned_train_config(spec, amp, channels_last),
        resume=existing is not None,
        device=device,
        progress=progress,
        interrupt_signals=interrupt_signals,
    )


def _epochs_of(run_dir: Path) -> int:
    try:
        return len(read_record(run_dir).epochs)
    except (RunError, OSError):
        return 0


class RunJob(Checkpointable):
    """One planned run as a submitit job (checkpointable: requeued on preemption): trains it
    with :func:`train_run` and returns ``{"run", "status", "epochs", "test_bpd"}``; status
    ``locked`` when another process holds the run.

    On the preemption signal the run is interrupted like a SIGTERM (the epoch in flight is
    discarded) and submitit requeues the job through :meth:`checkpoint`. ``time_min`` is the
    job's time limit, for telling a time limit from a preemption; ``threads`` sets torch's CPU
    threads (the CPUs the job was given).
    """

    def __init__(
        self,
        spec: RunSpec,
        run_dir: str | Path,
        *,
        device: str = "auto",
        amp: str | None = None,
        channels_last: bool = False,
        threads: int | None = None,
        time_min: int | None = None,
    ) -> None:
        self.spec = spec
        self.run_dir = str(run_dir)
        self.device, self.amp, self.channels_last = device, amp, channels_last
        self.threads, self.time_min = threads, time_min
        self._started = 0.0  # when this attempt began (monotonic), and its run's epochs then
        self._epochs_at_start = 0

    def __call__(self) -> dict:
        import torch

        run_dir = Path(self.run_dir)
        self._started, self._epochs_at_start = time.monotonic(), _epochs_of(run_dir)
        if self.threads:
            torch.set_num_threads(self.threads)
        self._join_tasks()
        usr = _preempt_signal()
        submitit_handler = signal.getsignal(usr)  # submitit's: checkpoint, requeue, exit

        def preempted_in_setup(signum: int, frame: object) -> None:
            raise Interrupted(signum)

        signal.signal(usr, preempted_in_setup)  # while epochs run, training's own handler takes over
        try:
            return self._train(run_dir, usr, submitit_handler)
        finally:
            signal.signal(usr, submitit_handler)

    def _train(self, run_dir: Path, usr: int, submitit_handler: object) -> dict:
        try:
            record = train_run(
                self.spec,
                run_dir,
                device=self.device,
                amp=self.amp,
                channels_last=self.channels_last,
                interrupt_signals=(usr,),
            )
        except RunLockedError as exc:  # a duplicate job, or someone training it by hand: theirs
            return {"run": self.spec.name, "status": "locked", "message": str(exc)}
        except KeyboardInterrupt as exc:
            if getattr(exc, "signum", None) != usr or not callable(submitit_handler):
                raise  # Ctrl-C or SIGTERM (scancel): the job ends, the record says interrupted
            print(f"{self.spec.name}: interrupted by the scheduler's signal; asking submitit to requeue", flush=True)
            signal.signal(usr, signal.SIG_IGN)  # a second warning changes nothing now
            submitit_handler(usr, None)  # calls self.checkpoint(), requeues and exits (on the first task)
            raise
        final = record.final
        return {
            "run": self.spec.name,
            "status": record.status,
            "epochs": len(record.epochs),
            "test_bpd": final.test_bpd if final is not None else None,
        }

    def checkpoint(self, *args: object, **kwargs: object) -> DelayedSubmission | None:  # type: ignore[override]  # submitit's stub says DelayedSubmission, but its caller takes None as 'do not requeue'
        """The submission that resumes this run (submitit requeues it), or None to end the job:
        when the run has ended, or when this attempt ran into its time limit without committing
        an epoch (requeueing it would only repeat that)."""
        run_dir = Path(self.run_dir)
        try:
            record = read_record(run_dir) if (run_dir / RECORD).exists() else None
        except RunError:
            record = None
        if record is not None and record.status in ENDED:
            print(f"{self.spec.name}: {record.status}; not requeued", flush=True)
            return None
        if self.time_min is not None:
            ran_min = (time.monotonic() - self._started) / 60
            timed_out = ran_min >= min(0.8 * self.time_min, self.time_min - 10)  # submitit's own rule
            if timed_out and _epochs_of(run_dir) <= self._epochs_at_start:
                print(
                    f"{self.spec.name}: not requeued: no epoch was committed in this job's {ran_min:.0f} minutes; "
                    "give the jobs a longer --time",
                    flush=True,
                )
                return None
        return DelayedSubmission(self, *args, **kwargs)

    @staticmethod
    def _join_tasks() -> None:
        """With several tasks (``--gpus-per-run`` > 1), export torch.distributed's environment
        (MASTER_ADDR, RANK, WORLD_SIZE, LOCAL_RANK) so that the run is data-parallel over them."""
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment

        try:
            tasks = JobEnvironment().num_tasks
        except RuntimeError:  # not inside a submitit job (called directly)
            return
        if tasks > 1:
            TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


# ----------------------------------------------------------------------------- the jobs file


@dataclass(frozen=True)
class JobEntry:
    """One job submitted for a run: its id (``123_4`` in an array; a process id for local jobs)."""

    run: str
    job_id: str
    executor: str
    submitted_at: str


@contextmanager
def _jobs_file_locked(folder: Path) -> Iterator[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / f"{JOBS}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield folder / JOBS
    finally:
        os.close(fd)


def _read_jobs(path: Path) -> dict[str, list[dict]]:
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunError(f"unreadable jobs file {path}: {exc}; move it away (only job states are lost)") from None
    if not isinstance(data, dict) or not all(isinstance(v, list) for v in data.values()):
        raise RunError(f"unreadable jobs file {path}: not an object of lists; move it away")
    return data


def _add_jobs(runs_dir: Path, entries: list[JobEntry]) -> None:
    with _jobs_file_locked(runs_dir / SUBMITIT_DIR) as path:
        data = _read_jobs(path)
        for e in entries:
            data.setdefault(e.run, []).append(dataclasses.asdict(e))
        write_json_atomic(path, data)


def latest_jobs(runs_dir: str | Path) -> dict[str, JobEntry]:
    """The last job submitted for each run (read without a lock; {} without a jobs file)."""
    data = _read_jobs(Path(runs_dir) / SUBMITIT_DIR / JOBS)
    out = {}
    for run, entries in data.items():
        if entries and isinstance(entries[-1], dict):
            try:
                out[run] = JobEntry(**entries[-1])
            except TypeError:
                continue
    return out


# ----------------------------------------------------------------------------- job states


def _query(command: list[str]) -> subprocess.CompletedProcess | None:
    """A scheduler command, run (None when it is not installed or does not answer within a minute)."""
    if shutil.which(command[0]) is None:
        return None
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None


def _slurm_states(job_ids: list[str]) -> dict[str, str]:
    """SLURM states by job id: squeue (every state it still knows), then sacct (where accounting
    is on) for the rest. UNREACHABLE for all when squeue is there but the controller does not
    answer; {} without squeue (then submitit's own files tell)."""
    squeue = ["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j"]
    done = _query([*squeue, ",".join(job_ids)])
    if done is None:
        return {} if shutil.which("squeue") is None else dict.fromkeys(job_ids, "UNREACHABLE")
    if done.returncode != 0 and "invalid job id" not in done.stderr.lower():
        return dict.fromkeys(job_ids, "UNREACHABLE")
    states: dict[str, str] = {}
    for line in done.stdout.splitlines() if done.returncode == 0 else []:  # one unknown id alone fails
        job_id, _, state = line.strip().partition("|")
        states[job_id] = state.split()[0] if state else "UNKNOWN"
    rest = [j for j in job_ids if j not in states]
    if rest:
        done = _query(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(rest)])
        for line in done.stdout.splitlines() if done is not None and done.returncode == 0 else []:
            job_id, _, state = line.strip().partition("|")
            if job_id in rest and state:
                states[job_id] = state.split()[0]  # "CANCELLED by 0" -> CANCELLED
    return states


class _PlainUnpickler(pickle.Unpickler):
    """Reads pickles of plain data only (tuples, dicts, strings, numbers): any class or function
    in the file is refused, so reading a runs directory never runs code that came with it."""

    def find_class(self, module: str, name: str) -> Any:
        raise pickle.UnpicklingError(f"refused {module}.{name}: only plain data is read from job results")


def _job_result(folder: Path, job_id: str | None) -> tuple[str, object] | None:
    """submitit's result file of a job, ``(outcome, value)``: ("success", what RunJob returned, a
    dict of plain values) or ("error", the traceback's text); None when there is none, it is being
    written, or it holds anything but plain data."""
    from submitit.core.utils import JobPaths

    if job_id is None:
        return None
    path = JobPaths(folder, job_id=job_id, task_id=0).result_pickle
    try:
        with open(path, "rb") as f:
            found = _PlainUnpickler(f).load()
    except Exception:  # missing, cut off, or not plain data
        return None
    if not (isinstance(found, tuple) and len(found) == 2 and isinstance(found[0], str)):
        return None
    return found[0], found[1]


def _submitit_outcome(folder: Path, job_id: str) -> str | None:
    """What submitit's result file says: COMPLETED, FAILED (the job raised), or None (no result)."""
    found = _job_result(folder, job_id)
    if found is None:
        return None
    return "COMPLETED" if found[0] == "success" else "FAILED"


def job_failure(runs_dir: str | Path, job_id: str | None) -> str | None:
    """The last line of the error a job raised (from submitit's result file), or None."""
    found = _job_result(Path(runs_dir) / SUBMITIT_DIR, job_id)
    if found is None or found[0] != "error":
        return None
    lines = [line for line in str(found[1]).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "the job raised an error"


def job_states(runs_dir: str | Path, jobs: Sequence[JobEntry]) -> dict[str, str]:
    """Each job's state by job id: SLURM's (squeue, else sacct), or for local jobs RUNNING while
    the process lives; a job the scheduler no longer knows gets submitit's own outcome
    (COMPLETED or FAILED from its result file) or ENDED. When the controller does not answer, a
    job that left a result file has ended, and says how; the others stay UNREACHABLE."""
    folder = Path(runs_dir) / SUBMITIT_DIR
    slurm = [j.job_id for j in jobs if j.executor == "slurm"]
    states = _slurm_states(slurm) if slurm else {}
    for j in jobs:
        if states.get(j.job_id) == "UNREACHABLE":
            states[j.job_id] = _submitit_outcome(folder, j.job_id) or "UNREACHABLE"
        if j.job_id in states:
            continue
        outcome = _submitit_outcome(folder, j.job_id)  # a result file outranks a pid (pids are reused)
        if outcome is None and j.executor == "local" and j.job_id.isdigit() and pid_alive(int(j.job_id)):
            outcome = "RUNNING"
        states[j.job_id] = outcome or "ENDED"
    return states


# ----------------------------------------------------------------------------- submitting


def _slurm_executor(folder: Path, options: ClusterOptions) -> SlurmExecutor:
    import submitit

    if options.time_min is None:
        raise ValueError(
            "--executor slurm needs --time, each job's time limit (e.g. --time 4:00:00): a run that reaches it "
            "is requeued and resumes from its last epoch"
        )
    try:
        # requeues at the time limit are bounded by RunJob.checkpoint (no progress, no requeue)
        executor = submitit.SlurmExecutor(folder=folder, max_num_timeout=1000)
    except RuntimeError as exc:  # no srun here
        raise RunError(
            f"--executor slurm: {exc} (run the sweep on a machine that submits to SLURM, or use --executor local)"
        ) from None
    gpus = options.gpus_per_run or 0
    params = {
        "job_name": "mefbench",
        "time": options.time_min,
        "partition": options.partition,
        "cpus_per_task": options.cpus_per_run,
        "gpus_per_node": gpus or None,
        "ntasks_per_node": gpus if gpus > 1 else None,  # one task per GPU: data-parallel
        "mem": options.mem,
        "signal_delay_s": options.signal_delay_s,
        "additional_parameters": dict(options.sbatch) or None,
    }
    if options.max_parallel is not None:
        params["array_parallelism"] = options.max_parallel
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def _visible_gpus() -> list[int]:
    """This machine's GPUs as CUDA numbers it can hand out (respecting CUDA_VISIBLE_DEVICES)."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip():
        ids = [v.strip() for v in visible.split(",") if v.strip()]
        if not all(v.isdigit() for v in ids):
            raise ValueError(
                f"--executor local assigns GPUs by number, and CUDA_VISIBLE_DEVICES={visible!r} names them "
                "otherwise; set it to numbers (e.g. 0,1,2,3)"
            )
        return [int(v) for v in ids]
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def local_slots(options: ClusterOptions, gpus: list[int] | None = None) -> list[tuple[int, ...]]:
    """The GPUs of each local slot (one run at a time per slot): ``gpus_per_run`` consecutive
    GPUs each (default 1 where there are GPUs, else 0), as many slots as ``max_parallel`` asks
    (default: as many as the GPUs allow; on a CPU machine, cores // ``cpus_per_run``)."""
    gpus = _visible_gpus() if gpus is None else gpus
    per_run = options.gpus_per_run if options.gpus_per_run is not None else (1 if gpus else 0)
    if per_run > len(gpus):
        raise ValueError(f"--gpus-per-run {per_run}: this machine has {len(gpus)} GPU(s) to hand out")
    if per_run:
        n = options.max_parallel or len(gpus) // per_run
        if n * per_run > len(gpus):
            raise ValueError(
                f"--max-parallel {n} × --gpus-per-run {per_run} needs {n * per_run} GPUs; this machine has {len(gpus)}"
            )
        return [tuple(gpus[i * per_run : (i + 1) * per_run]) for i in range(n)]
    n = options.max_parallel or max(1, (os.cpu_count() or 1) // (options.cpus_per_run or 1))
    return [()] * n


def _local_executor(folder: Path, options: ClusterOptions) -> LocalExecutor:
    import submitit

    executor = submitit.LocalExecutor(folder=folder, max_num_timeout=1000)
    executor.update_parameters(timeout_min=options.time_min or _LOCAL_TIME_MIN, signal_delay_s=options.signal_delay_s)
    return executor


def _to_submit(
    specs: list[RunSpec], runs_dir: Path, amp: str | None = None, channels_last: bool = False
) -> tuple[list[RunSpec], dict[str, str]]:
    """The runs that need a job, printing why each other one does not; and the runs refused, by
    name with the reason: unreadable, or holding another configuration than planned (a run
    trained by hand under the planned name is left as it is, as the inline sweep does)."""
    from .status import run_statuses
    from .sweep import config_differences, planned_train_config

    rows = {r.name: r for r in run_statuses(runs_dir, specs, others=False)}
    todo: list[RunSpec] = []
    refused: dict[str, str] = {}
    for spec in specs:
        row = rows[spec.name]
        if row.state == "corrupt":
            refused[spec.name] = f"skipped: {row.note}; move it away to rerun that run"
            print(f"{spec.name}: {refused[spec.name]}", flush=True)
            continue
        run_dir = runs_dir / spec.name
        if (run_dir / RECORD).exists():
            train_cfg = planned_train_config(spec, amp, channels_last)
            try:
                differences = config_differences(read_record(run_dir), spec.model, train_cfg)
            except RunError as exc:  # written to since status read it
                differences = [str(exc)]
            if differences:
                refused[spec.name] = (
                    f"refused: {run_dir} holds a run of another configuration than planned "
                    f"({'; '.join(differences)}); it is left as it is: move it away (or use another --runs)"
                )
                print(f"{spec.name}: {refused[spec.name]}", flush=True)
                continue
        if row.state in ENDED:
            print(f"{spec.name}: {row.summary()} (kept)", flush=True)
        elif row.state == "running" or (row.job_state in ACTIVE_STATES):
            print(f"{spec.name}: already {row.summary()} (not submitted again)", flush=True)
        else:
            todo.append(spec)
    return todo, refused


def submit_sweep(
    specs: list[RunSpec],
    runs_dir: str | Path,
    executor: str,
    options: ClusterOptions,
    *,
    device: str = "auto",
    amp: str | None = None,
    channels_last: bool = False,
    wait: bool = False,
) -> int:
    """Submit (slurm) or run (local) one job per planned run that needs one; the exit code.

    SLURM: one job array, its ids printed, and 0 once submitted; with ``wait``, waits for every
    planned run's job and reports: 0 when every planned run has finished or diverged, 1
    otherwise (naming the others). Local: runs the jobs, at most ``len(local_slots(options))``
    at once, always waiting, and reports the same way.
    """
    if executor not in ("local", "slurm"):
        raise ValueError(f"--executor must be one of {EXECUTORS}, got {executor!r}")
    runs_dir = Path(runs_dir)
    runs_dir.mkdir(parents=True, exist_ok=True)
    folder = (runs_dir / SUBMITIT_DIR).absolute()
    todo, refused = _to_submit(specs, runs_dir, amp, channels_last)
    slots = local_slots(options) if executor == "local" else []
    kwargs: dict[str, Any] = dict(device=device, amp=amp, channels_last=channels_last, time_min=options.time_min)
    if executor == "slurm":
        if todo:
            ex = _slurm_executor(folder, options)
            fns = [RunJob(s, (runs_dir / s.name).absolute(), threads=options.cpus_per_run, **kwargs) for s in todo]
            try:
                jobs = ex.submit_array(fns)
            except Exception as exc:  # sbatch refused: the options, the partition, the account...
                raise RunError(f"sbatch refused the jobs: {str(exc).strip()}") from None
            _add_jobs(runs_dir, [JobEntry(s.name, j.job_id, "slurm", now()) for s, j in zip(todo, jobs, strict=True)])
            for spec, job in zip(todo, jobs, strict=True):
                print(f"{spec.name}: submitted as SLURM job {job.job_id}", flush=True)
            first = jobs[0].job_id
            if "_" in first:  # a job array: <array id>_<index>
                array = first.split("_")[0]
                what, logs = f"SLURM job array {array}", f"{folder}/{array}_<index>_0_log.out"
            else:
                what, logs = f"SLURM job {first}", f"{folder}/{first}_0_log.out"
            print(
                f"submitted {len(jobs)} of {len(specs)} runs as {what} (logs: {logs}); "
                f"watch with: mefbench status --runs {runs_dir}",
                flush=True,
            )
        else:
            print(f"nothing to submit: none of the {len(specs)} planned runs needs a job", flush=True)
        if not wait:
            return _refusals(refused)
        _wait_slurm(runs_dir, specs)
    else:
        _run_local(todo, runs_dir, folder, options, slots, kwargs)
    return max(_report(runs_dir, [s for s in specs if s.name not in refused]), _refusals(refused))


def _refusals(refused: dict[str, str]) -> int:
    """Name the planned runs that were refused (on stderr); the exit code: 1 if any."""
    if refused:
        print(f"{len(refused)} planned runs were refused:", file=sys.stderr, flush=True)
        for name, reason in refused.items():
            print(f"  {name}: {reason}", file=sys.stderr, flush=True)
    return 1 if refused else 0


def _wait_slurm(runs_dir: Path, specs: list[RunSpec]) -> None:
    """Until no planned run has a job the scheduler still runs or holds (squeue every 2 s at
    first, less often the longer the wait, at most every minute)."""
    names = {s.name for s in specs}
    start = time.monotonic()
    while True:
        jobs = [j for run, j in latest_jobs(runs_dir).items() if run in names and j.executor == "slurm"]
        states = job_states(runs_dir, jobs)
        # UNREACHABLE: the controller did not answer this time; keep waiting for it
        if not any(states.get(j.job_id) in ACTIVE_STATES | {"UNREACHABLE"} for j in jobs):
            return
        time.sleep(min(60.0, max(2.0, (time.monotonic() - start) / 4)))  # 2 s at first, at most a minute


def _run_local(
    todo: list[RunSpec], runs_dir: Path, folder: Path, options: ClusterOptions, slots: list[tuple[int, ...]],
    kwargs: dict,
) -> None:  # fmt: skip
    """Run the jobs on this machine, one per free slot, each slot with its own GPUs."""
    from .status import run_statuses

    if not todo:
        print("nothing to run: none of the planned runs needs a job", flush=True)
        return
    ex = _local_executor(folder, options)
    threads = options.cpus_per_run or max(1, (os.cpu_count() or 1) // len(slots))
    queue = list(todo)
    free = list(range(len(slots)))
    running: dict[int, tuple[RunSpec, Job]] = {}
    print(
        f"running {len(todo)} runs on this machine, at most {len(slots)} at once"
        + (f", GPUs {', '.join(','.join(map(str, s)) for s in slots)}" if any(slots) else "")
        + f" (logs: {folder})",
        flush=True,
    )
    try:
        while queue or running:
            while queue and free:
                slot, spec = free.pop(0), queue.pop(0)
                gpus = slots[slot]
                ex.update_parameters(visible_gpus=gpus, gpus_per_node=len(gpus), tasks_per_node=max(1, len(gpus)))
                job = ex.submit(RunJob(spec, (runs_dir / spec.name).absolute(), threads=threads, **kwargs))
                _add_jobs(runs_dir, [JobEntry(spec.name, job.job_id, "local", now())])
                where = f" on GPU {','.join(map(str, gpus))}" if gpus else ""
                print(f"{spec.name}: started as local job {job.job_id}{where}", flush=True)
                running[slot] = (spec, job)
            time.sleep(0.5)
            for slot, (spec, job) in list(running.items()):
                if job.done():  # the run's record (and the job's outcome) say how it ended
                    del running[slot]
                    free.append(slot)
                    print(f"{spec.name}: {run_statuses(runs_dir, [spec], others=False)[0].summary()}", flush=True)
    finally:
        for _, job in running.values():  # interrupted: the runs say so, and a rerun resumes them
            job.cancel(check=False)


def _report(runs_dir: Path, specs: list[RunSpec]) -> int:
    from .status import run_statuses

    rows = run_statuses(runs_dir, specs, others=False)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.state] = counts.get(r.state, 0) + 1
    print(f"{len(rows)} runs under {runs_dir}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())), flush=True)
    unfinished = [r for r in rows if r.state not in ENDED]
    for r in unfinished:
        print(f"not finished: {r.name}: {r.summary()}", file=sys.stderr, flush=True)
    return 1 if unfinished else 0

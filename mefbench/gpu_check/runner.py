"""The device check's parent process: each part in a child process under its time cap, the whole
check within its budget, the JSON rewritten after every part, a log, and the command line.

:class:`Check` takes its clock and the function that runs one part as arguments (by default
:func:`time.perf_counter` and :func:`run_part_process`), so that the budget and cap logic can be
tested with a fake clock and fake parts.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..env import environment
from ..interrupts import sigterm_as_interrupt
from ..record import now, write_json_atomic
from .parts import PARTS, check_row, error_row

__all__ = [
    "BUDGET_S",
    "CAPS",
    "JSON_NAME",
    "LOG_NAME",
    "SCHEMA",
    "Check",
    "Log",
    "Options",
    "main",
    "parser",
    "part_caps",
    "run_check",
    "run_part_process",
]

SCHEMA = 1
# Seconds per part at the paper's sizes, each about 2-3× the estimate on one H200 (how they were
# estimated: benchmarks/README.md, "On a GPU: the device check"); the whole check never runs
# past BUDGET_S, whatever the parts do.
CAPS = {"bench": 110.0, "train_step": 90.0, "epoch_check": 200.0, "ddp": 90.0}
BUDGET_S = 420.0
TINY_CAPS = {"bench": 60.0, "train_step": 60.0, "epoch_check": 90.0, "ddp": 90.0}
TINY_BUDGET_S = 300.0
RESERVE_S = 5.0  # kept back from the budget for the last write
KILL_GRACE_S = 10.0  # between SIGTERM and SIGKILL of a part that ran out of time
JSON_NAME, LOG_NAME = "gpu_check.json", "gpu_check.log"
_ROOT = Path(__file__).resolve().parents[2]  # the checkout the check runs from (PYTHONPATH=.)


@dataclass
class Options:
    """What to check, and how (the command line's options)."""

    device: str = "cuda"
    tiny: bool = False
    out: Path = Path("reports/gpu")
    parts: tuple[str, ...] = PARTS
    budget: float | None = None  # None: BUDGET_S, or TINY_BUDGET_S with tiny
    caps: dict[str, float] = field(default_factory=dict)  # overrides of CAPS / TINY_CAPS
    ddp_on_cpu: bool = False
    raise_in: str | None = None  # a part that fails at once (tests the error path)
    hang_in: str | None = None  # a part that hangs until its cap stops it (tests the caps)
    argv: tuple[str, ...] = ()  # the command line, for the JSON


# ----------------------------------------------------------------------------- one part's process


def part_caps(caps: dict[str, float], budget: float, elapsed: float, part: str) -> float:
    """A part's time: its own cap, or what is left of the budget (less a reserve), if smaller."""
    return max(0.0, min(caps[part], budget - elapsed - RESERVE_S))


class Log:
    """Lines to stdout and to the log file, each stamped with the seconds since the check began."""

    def __init__(self, path: Path, clock: Callable[[], float] = time.perf_counter) -> None:
        self.file = path.open("w", encoding="utf-8")
        self.clock = clock
        self.t0 = clock()
        self.lock = threading.Lock()

    def __call__(self, line: str, prefix: str | None = None) -> None:
        stamp = f"[gpu_check {self.clock() - self.t0:6.1f} s]"
        text = f"{stamp} {prefix + ': ' if prefix else ''}{line}"
        with self.lock:
            print(text, flush=True)
            self.file.write(text + "\n")
            self.file.flush()

    def close(self) -> None:
        self.file.close()


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the part's process group (train() then marks its run interrupted), SIGKILL
    after KILL_GRACE_S."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


PartOutcome = tuple[str, dict | None, str]  # (status, what the part recorded, a note)
RunPart = Callable[[str, float, list[str], Log, Path], PartOutcome]


def run_part_process(part: str, cap: float, argv: list[str], log: Log, workdir: Path) -> PartOutcome:
    """Run one part in a child process for at most cap seconds: (status, its results, note)."""
    result = workdir / f"part-{part}.json"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")])),
    }
    cmd = [sys.executable, "-m", "mefbench.gpu_check", *argv, "--child", part, "--result", str(result),
           "--workdir", str(workdir)]  # fmt: skip
    # its own process group, so that a time-out ends the DDP workers it spawned too; but not a new
    # session, which would outlive this process if it were killed from outside
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                            errors="replace", **group)  # fmt: skip
    tail: collections.deque[str] = collections.deque(maxlen=15)

    def relay() -> None:
        assert proc.stdout is not None  # stdout=PIPE
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log(line, prefix=part)

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    status, note = "ok", ""
    try:
        rc = proc.wait(timeout=cap)
        if rc != 0:
            status, note = "error", f"exit status {rc}"
    except subprocess.TimeoutExpired:
        status, note = "timeout", f"stopped after its cap of {cap:.1f} s"
        _stop(proc)
    except KeyboardInterrupt:  # this process is being stopped (SIGTERM, Ctrl-C): stop the part too
        status, note = "interrupted", "the check was stopped from outside"
        _stop(proc)
    reader.join(timeout=5)
    data = None
    with contextlib.suppress(OSError, ValueError):
        data = json.loads(result.read_text())
    if status != "ok" and not (data and (data.get("errors") or data.get("section"))):
        note += "; last output: " + " | ".join(tail)  # nothing recorded: say what it printed
    return status, data, note


# ----------------------------------------------------------------------------- the parent


class Check:
    """The parent: runs each part under its cap, merges what it recorded, and rewrites the JSON
    after every part."""

    def __init__(
        self, options: Options, clock: Callable[[], float] = time.perf_counter, run_part: RunPart = run_part_process
    ) -> None:
        self.options, self.clock, self.run_part = options, clock, run_part
        self.out = Path(options.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = Log(self.out / LOG_NAME, clock)
        self.caps = {**(TINY_CAPS if options.tiny else CAPS), **options.caps}
        default_budget = TINY_BUDGET_S if options.tiny else BUDGET_S
        self.budget = options.budget if options.budget is not None else default_budget
        self.t0 = clock()
        self.result: dict = {
            "schema": SCHEMA, "command": " ".join(["python3 -m mefbench.gpu_check", *options.argv]),
            "tiny": options.tiny, "date": now(), "updated_at": now(), "wall_s": 0.0, "exit_status": None,
            "environment": {}, "budget": {"total_s": self.budget, "parts": []}, "bench": None, "train_step": [],
            "epoch_check": [], "ddp": [], "errors": [],
        }  # fmt: skip
        self.child_argv = ["--device", options.device, "--out", str(self.out)] + (["--tiny"] if options.tiny else [])
        for flag, part in (("--raise-in", options.raise_in), ("--hang-in", options.hang_in)):
            if part:
                self.child_argv += [flag, part]

    def save(self) -> None:
        self.result.update(updated_at=now(), wall_s=round(self.clock() - self.t0, 1))
        write_json_atomic(self.out / JSON_NAME, self.result)

    def error(self, part: str | None, message: str) -> None:
        self.result["errors"].append({"part": part, "item": None, "error": message, "traceback": ""})

    def run(self) -> dict:
        options, result, log = self.options, self.result, self.log
        parts = options.parts
        log(f"device check: {', '.join(parts)} on {options.device}{' (tiny)' if options.tiny else ''}; budget "
            f"{self.budget:.0f} s; writing {self.out / JSON_NAME} and {self.out / LOG_NAME}")  # fmt: skip
        try:
            result["environment"] = environment(options.device)
            log(json.dumps(result["environment"]))
        except Exception as exc:
            result["errors"].append(error_row("environment", None, exc))
            log(f"environment FAILED: {type(exc).__name__}: {exc}")
        if options.device.startswith("cuda") and not torch.cuda.is_available():
            self.error(
                "environment",
                f"--device {options.device}: torch {torch.__version__} sees no CUDA device; no part was run",
            )
            log(result["errors"][-1]["error"])
            parts = ()
        self.save()
        try:
            with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
                for part in parts:
                    if self.part(part, Path(tmp)) == "interrupted":
                        log("interrupted from outside")
                        break
        except KeyboardInterrupt:  # SIGTERM or Ctrl-C: keep what is done, say where it stopped
            rows = result["budget"]["parts"]
            if rows:
                rows[-1]["status"] = "interrupted"
            self.error(rows[-1]["part"] if rows else None, "interrupted: the check was stopped from outside")
            log("interrupted from outside")
        result["exit_status"] = 1 if result["errors"] else 0
        self.save()
        _summary(result, log)
        log.close()
        return result

    def part(self, part: str, tmp: Path) -> str:
        """Run one part; its status."""
        result, log = self.result, self.log
        row: dict[str, Any] = {"part": part, "cap_s": None, "wall_s": 0.0, "status": "not run"}
        result["budget"]["parts"].append(row)
        skip = _ddp_skip(self.options, result["environment"]) if part == "ddp" else None
        if skip:
            row["status"] = "skipped"
            result["ddp"] = [
                check_row("2-process DDP", result["environment"].get("device_count"), None, f"skipped: {skip}")
            ]
            log(f"ddp: skipped ({skip})")
            self.save()
            return row["status"]
        cap = part_caps(self.caps, self.budget, self.clock() - self.t0, part)
        row["cap_s"] = round(cap, 1)
        if cap < min(1.0, self.caps[part]):
            row["status"] = "skipped"
            self.error(part, f"not run: the check's budget of {self.budget:.0f} s is spent")
            log(f"{part}: not run, the budget is spent")
            self.save()
            return row["status"]
        log(f"{part}: starting (cap {cap:.1f} s)")
        started = self.clock()
        workdir = tmp / part
        workdir.mkdir()
        try:
            status, data, note = self.run_part(part, cap, self.child_argv, log, workdir)
        except Exception as exc:
            status, data, note = "error", {"section": None, "errors": [error_row(part, None, exc)]}, ""
        row.update(wall_s=round(self.clock() - started, 1), status=status)
        if data is not None:
            if data.get("section") is not None:
                result[part] = data["section"]
            result["errors"] += data.get("errors", [])
        if status in ("timeout", "interrupted") or (status != "ok" and not (data or {}).get("errors")):
            self.error(part, f"{status}: {note}")
        log(f"{part}: {status} in {row['wall_s']:.1f} s" + (f" ({note})" if note else ""))
        self.save()
        return status


def run_check(options: Options) -> dict:
    """Every selected part, each in its own process and time cap; the JSON after every part."""
    return Check(options).run()


def _ddp_skip(options: Options, env: dict) -> str | None:
    if options.device.startswith("cuda"):
        count = env.get("device_count") or 0
        return None if count >= 2 else f"needs 2 CUDA devices, this machine has {count}"
    return None if options.ddp_on_cpu else "the device is the CPU (--ddp-on-cpu runs it with gloo)"


def _summary(result: dict, log: Log) -> None:
    log("summary:")
    for row in result["budget"]["parts"]:
        cap = f"{row['cap_s']:.0f} s" if row["cap_s"] is not None else "-"
        log(f"  {row['part']:12} {row['status']:8} {row['wall_s']:6.1f} s of {cap}")
    for row in result["train_step"]:
        peak = f", peak {row['peak_memory_mb']:.0f} MB" if row.get("peak_memory_mb") is not None else ""
        rate = f"{row['images_per_s']:.1f} images/s" if row.get("images_per_s") is not None else row.get("note")
        log(f"  train step {row['model']}, {row['precision']}: {rate}{peak}")
    failed = [r["check"] for r in [*result["epoch_check"], *result["ddp"]] if r["ok"] is False]
    log(f"  checks not ok: {failed or 'none'}; errors: {len(result['errors'])}; wall {result['wall_s']:.0f} s")
    for e in result["errors"]:
        log(f"  error in {e['part']}{' / ' + e['item'] if e['item'] else ''}: {e['error']}")


# ----------------------------------------------------------------------------- the command line


def _cap(text: str) -> tuple[str, float]:
    name, _, seconds = text.partition("=")
    if name not in PARTS or not seconds:
        raise argparse.ArgumentTypeError(f"--cap takes PART=SECONDS with PART one of {', '.join(PARTS)}, got {text!r}")
    return name, float(seconds)


def _parts(text: str) -> tuple[str, ...]:
    parts = tuple(p for p in text.split(",") if p)
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    return tuple(p for p in PARTS if p in parts)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python3 -m mefbench.gpu_check", description="The prepared device check for a machine with a GPU."
    )
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny models, few steps, bench --quick (CPU tests)")
    p.add_argument(
        "--out",
        default=os.environ.get("OUT") or "reports/gpu",
        help="folder for gpu_check.json and .log ($OUT, else reports/gpu)",
    )
    p.add_argument("--parts", type=_parts, default=PARTS, help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"seconds for the whole check (default {BUDGET_S:.0f}; tiny {TINY_BUDGET_S:.0f})",
    )
    p.add_argument("--cap", type=_cap, action="append", default=[], metavar="PART=SECONDS", help="one part's time cap")
    p.add_argument("--ddp-on-cpu", action="store_true", help="with --device cpu, run the DDP part with gloo")
    p.add_argument("--raise-in", choices=PARTS, default=None, help="make a part fail at once (tests the error path)")
    p.add_argument("--hang-in", choices=PARTS, default=None, help="make a part hang until its cap (tests the caps)")
    p.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    from .parts import run_child

    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.child:
        fail = "raise" if args.raise_in == args.child else "hang" if args.hang_in == args.child else None
        return run_child(
            args.child, Path(args.result), args.device, args.tiny, Path(args.workdir), Path(args.out), fail
        )
    options = Options(
        device=args.device, tiny=args.tiny, out=Path(args.out), parts=args.parts, budget=args.budget,
        caps=dict(args.cap), ddp_on_cpu=args.ddp_on_cpu, raise_in=args.raise_in, hang_in=args.hang_in, argv=tuple(argv),
    )  # fmt: skip
    with sigterm_as_interrupt():  # a kill from outside still leaves the JSON and the log
        return run_check(options)["exit_status"]

"""`python3 -m mefbench.gpu_check`: the prepared device check for a machine with a GPU (issue 15).

Run from the repository root with ``PYTHONPATH=.`` (``benchmarks/gpu_check.sh`` does that); the
project need not be installed. It writes ``gpu_check.json`` and ``gpu_check.log`` to ``--out``
(default ``$OUT`` if set, else ``reports/gpu``). The parts, in order:

``bench``        ``mefbench bench --device cuda``, every part, each row synchronised.
``train_step``   one training step of the paper's model (``paper-t2-mef-cifar10``: 3×32×32,
                 batch 64, hidden 128, 8 blocks, steps (8, 4, 2)) and of the Glow-like model
                 (:data:`mefbench.presets.GLOW_LIKE` applied to it), each in float32 and under
                 ``set_amp("bf16")``: images/s over timed steps after warm-up, peak memory.
``epoch_check``  the paper preset's model on ``patches32`` at batch 64 through
                 :func:`mefbench.training.train` for 2 short epochs, and again stopped after one
                 epoch and resumed: expm statistics, EMA bits/dim, checkpoint, resume.
``ddp``          a 2-process DistributedDataParallel step (NCCL) and a short ``train`` under it,
                 only where ``torch.cuda.device_count() >= 2``; recorded as skipped otherwise.

Each part runs in its own process under its own time cap (:data:`CAPS`), and the whole check
within :data:`BUDGET_S`: a part that raises, hangs or kills its CUDA context is recorded in
``errors`` and the next part starts in a fresh process. Inside a part every item (a bench part, a
model × precision, a run) has its own try/except, and the part's results are saved after each
item, so what finished before a time-out is kept. The JSON is rewritten after every part.

JSON layout (``SCHEMA`` 1)::

    schema, command, tiny, date (UTC, the start), updated_at, wall_s, exit_status
    environment   {device, device_type, device_count, torch, cuda, cudnn, nccl, driver,
                   gpu_memory_gb, capability, tf32_matmul, tf32_cudnn, python, platform, numpy,
                   scipy, mefbench, git_commit, cpu_count}
    budget        {total_s, parts: [{part, cap_s, wall_s, status}]}   status: ok, error,
                   timeout, skipped, not run, interrupted
    bench         as ``mefbench bench --json`` writes it ({rows: [...], quick, threads, device,
                   machine, versions, command}) plus parts: [{part, rows, wall_s}]
    train_step    [{model, conv, coupling, precision, batch, image_shape, hidden, blocks, steps,
                    params, warmup_steps, timed_steps, step_ms, images_per_s, peak_memory_mb,
                    memory_source, expm_m_mean, expm_m_max, first_bpd, last_bpd, note}]
    epoch_check   [{check, value, ok, note}]
    ddp           [{check, value, ok, note}]   (one "skipped" row where it did not run)
    errors        [{part, item, error, traceback}]

``--tiny`` runs the same code on tiny models, few steps and ``bench --quick`` (seconds on a CPU:
what the tests run with ``--device cpu``).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from . import __version__
from .config import FlowConfig, TrainConfig
from .presets import GLOW_LIKE, PRESETS

__all__ = [
    "BUDGET_S",
    "CAPS",
    "PARTS",
    "PRECISIONS",
    "Sizes",
    "away_from_identity",
    "environment",
    "main",
    "measure_train_step",
    "part_caps",
    "run_check",
]

SCHEMA = 1
PRESET = "paper-t2-mef-cifar10"
PARTS = ("bench", "train_step", "epoch_check", "ddp")
# Seconds per part at the paper's sizes, each about 2-3× the estimate on one H200 (how they were
# estimated: benchmarks/README.md, "On a GPU: the device check"); the whole check never runs
# past BUDGET_S, whatever the parts do.
CAPS = {"bench": 110.0, "train_step": 90.0, "epoch_check": 200.0, "ddp": 90.0}
BUDGET_S = 420.0
TINY_CAPS = {"bench": 60.0, "train_step": 60.0, "epoch_check": 90.0, "ddp": 90.0}
TINY_BUDGET_S = 300.0
RESERVE_S = 5.0  # kept back from the budget for the last write
KILL_GRACE_S = 10.0  # between SIGTERM and SIGKILL of a part that ran out of time
PRECISIONS: dict[str, str | None] = {"float32": None, "bf16": "bf16"}
RESUME_TOL = {"cpu": 0.0, "cuda": 1e-3}  # bits/dim; CUDA kernels need not be bitwise deterministic
DDP_GRAD_TOL = 1e-3  # relative difference of DDP's averaged gradient from one process's
ROUND_TRIP_TOL = 1e-3
JSON_NAME, LOG_NAME = "gpu_check.json", "gpu_check.log"


# ----------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Sizes:
    """How much work each part does: the paper's sizes, or ``tiny`` ones for CPU tests."""

    step_model: FlowConfig  # train_step's MEF (the Glow-like model is derived from it)
    step_batch: int
    warmup_steps: int
    timed_steps: int
    epoch_model: FlowConfig
    epoch_train: TrainConfig  # 2 epochs: run through, and stopped after one then resumed
    bench_quick: bool
    bench_parts: tuple[str, ...]
    bench_threads: int
    ddp_batch: int  # the global batch, split over the 2 processes
    ddp_steps: int
    ddp_train: TrainConfig  # one short epoch of train() under the process group

    @classmethod
    def paper(cls) -> Sizes:
        from .bench import PARTS as BENCH_PARTS

        model, recipe = PRESETS[PRESET].configs()
        # 50 steps per epoch (of patches32's 60 at batch 64), every test image (342)
        epoch = dataclasses.replace(recipe, dataset="patches32", epochs=2, max_train_batches=50, max_test=None)
        return cls(
            step_model=model, step_batch=recipe.batch_size, warmup_steps=3, timed_steps=10,
            epoch_model=model, epoch_train=epoch,
            bench_quick=False, bench_parts=tuple(BENCH_PARTS), bench_threads=2,
            ddp_batch=recipe.batch_size, ddp_steps=10,
            ddp_train=dataclasses.replace(epoch, epochs=1, max_train_batches=20, max_test=256),
        )  # fmt: skip

    @classmethod
    def tiny(cls) -> Sizes:
        model, recipe = PRESETS[PRESET].configs()
        small = {"hidden_channels": 8, "num_blocks": 1}
        epoch = dataclasses.replace(
            recipe, dataset="patches32", epochs=2, batch_size=8, init_batch=16, max_train_batches=2,
            max_test=16, eval_batch_size=16,
        )  # fmt: skip
        return cls(
            step_model=dataclasses.replace(model, image_shape=(3, 16, 16), steps=(1, 1), **small),
            step_batch=4, warmup_steps=1, timed_steps=2,
            epoch_model=dataclasses.replace(model, steps=(1, 1, 1), **small), epoch_train=epoch,
            bench_quick=True, bench_parts=("accuracy", "coupling"), bench_threads=1,
            ddp_batch=4, ddp_steps=2, ddp_train=dataclasses.replace(epoch, epochs=1, max_train_batches=1),
        )  # fmt: skip


def step_models(mef: FlowConfig) -> dict[str, FlowConfig]:
    """train_step's models: MEF and the Glow-like model at the same width."""
    glow = dataclasses.replace(mef, **GLOW_LIKE)
    return {"MEF": mef, f"Glow-like ({glow.conv} conv + {glow.coupling})": glow}


# ----------------------------------------------------------------------------- small helpers


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _write_json(path: Path, data: dict) -> None:
    """Atomically: a reader (or a kill) never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)


def _error(part: str, item: str | None, exc: BaseException) -> dict:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {"part": part, "item": item, "error": f"{type(exc).__name__}: {exc}", "traceback": tb[-2000:]}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _mb(n_bytes: float) -> float:
    return round(n_bytes / 2**20, 1)


def _sig(x: float, digits: int = 4) -> float:
    """A timing to the digits it is worth (bits/dim and differences keep every digit)."""
    return float(f"{x:.{digits}g}")


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape))


# ----------------------------------------------------------------------------- environment


def _git_commit(root: Path) -> str | None:
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], check=False, cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def _driver() -> str | None:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            check=False, capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def environment(device: str) -> dict:
    """Where the check ran: device, versions, commit (None for what cannot be read)."""
    import numpy
    import scipy

    dev = torch.device(device)
    env: dict = {
        "device": f"CPU ({platform.processor() or platform.machine()})",
        "device_type": dev.type,
        "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nccl": None,
        "driver": None,
        "gpu_memory_gb": None,
        "capability": None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "mefbench": __version__,
        "git_commit": _git_commit(Path(__file__).resolve().parents[1]),
        "cpu_count": os.cpu_count(),
    }
    if dev.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(dev)
        env.update(
            device=torch.cuda.get_device_name(dev),
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            capability=".".join(map(str, torch.cuda.get_device_capability(dev))),
            driver=_driver(),
        )
        with contextlib.suppress(Exception):
            version = torch.cuda.nccl.version()
            env["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    return env


# ----------------------------------------------------------------------------- inside a part's process


class Part:
    """What one part's process records: its section and its errors, saved after every item."""

    def __init__(self, name: str, result: Path, device: torch.device, sizes: Sizes, workdir: Path, out: Path) -> None:
        self.name, self.result, self.device, self.sizes = name, result, device, sizes
        self.workdir, self.out = workdir, out
        self.section: object = [] if name != "bench" else None
        self.errors: list[dict] = []
        self.save()

    def save(self) -> None:
        _write_json(self.result, {"section": self.section, "errors": self.errors})

    def put(self, section: object) -> None:
        self.section = section
        self.save()

    def add(self, row: dict) -> None:
        self.section.append(row)
        self.save()
        print("  " + json.dumps(row, ensure_ascii=False, default=str), flush=True)

    @contextlib.contextmanager
    def item(self, name: str) -> Iterator[None]:
        """Run one item: an exception is recorded (and printed) and the part goes on."""
        print(name, flush=True)
        try:
            yield
        except Exception as exc:
            self.errors.append(_error(self.name, name, exc))
            self.save()
            print(f"{name} FAILED: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()


def _bench(part: Part) -> None:
    """``mefbench bench`` one part at a time (each row synchronised on CUDA), as ``--json`` writes it."""
    from . import bench

    sizes, section = part.sizes, None
    for name in sizes.bench_parts:
        with part.item(name):
            path = part.workdir / f"bench-{name}.json"
            t0 = time.perf_counter()
            args = argparse.Namespace(
                quick=sizes.bench_quick, threads=sizes.bench_threads, only=name, device=str(part.device), json=str(path)
            )
            bench.main(args)
            data = json.loads(path.read_text())
            if section is None:
                section = {**data, "rows": [], "parts": []}
            section["rows"] += data["rows"]
            section["parts"].append(
                {"part": name, "rows": len(data["rows"]), "wall_s": round(time.perf_counter() - t0, 1)}
            )
            done = [p["part"] for p in section["parts"]]
            section["command"] = (
                "mefbench bench" + (" --quick" if sizes.bench_quick else "") + f" --threads {sizes.bench_threads}"
                + (f" --only {','.join(done)}" if len(done) < len(bench.PARTS) else "") + f" --device {part.device}"
            )  # fmt: skip
            part.put(section)


# The coupling nets' zero-initialised output conv is redrawn from N(0, HEAD_STD²). On the paper's
# model and 8 patches32 images: 0 gives 4.8 bits/dim and m = 1 in every coupling; 3e-3 gives 6.7
# bits/dim and m 5-9 (mean 6.8); 1e-2 (mefbench bench's value for one layer) gives 38 bits/dim
# through the 14 couplings, a state no training run is in.
HEAD_STD = 3e-3
STEP_LR = 1e-6  # Adamax moves every weight by about lr a step: the timed steps leave the model as it is


def away_from_identity(model: torch.nn.Module, seed: int = 0) -> int:
    """Redraw every coupling net's zero-initialised output conv from N(0, HEAD_STD²), so that the
    couplings are not the identity (at init S = 0 and the matrix exponential costs nothing); the
    same draw on every device and process. Returns how many were redrawn."""
    g = torch.Generator().manual_seed(seed)
    count = 0
    for m in model.modules():
        head = getattr(getattr(m, "net", None), "head", None)
        if isinstance(head, torch.nn.Conv2d):
            with torch.no_grad():
                head.weight.copy_(torch.randn(head.weight.shape, generator=g) * HEAD_STD)
            count += 1
    return count


def measure_train_step(
    config: FlowConfig, amp: str | None, batch: int, warmup: int, timed: int, device: torch.device
) -> dict:
    """Images/s of Adamax training steps on one batch (timed after warm-up, synchronised), the peak
    memory allocated during the steps (CUDA only: None on the CPU) and the series lengths of the
    matrix exponentials in the timed steps.

    The model is initialised on the batch and moved away from the identity (:func:`away_from_identity`);
    the learning rate is tiny (:data:`STEP_LR`) so that every step costs what a step of that model
    costs (the same work at any rate) without the model drifting or diverging on the one batch. A
    non-finite loss skips the backward pass, so a row with one gets no images/s.
    """
    from .linalg import ExpmRecorder, record_expm
    from .models import MultiScaleFlow, count_parameters
    from .training import train_step

    torch.manual_seed(0)
    model = MultiScaleFlow(config).to(device).set_amp(amp)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, *config.image_shape, generator=g) * 2 - 1).to(device)
    model.initialize(x)
    away_from_identity(model)
    optimizer = torch.optim.Adamax(model.parameters(), lr=STEP_LR)
    cuda = device.type == "cuda"
    if cuda:
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
    losses = [train_step(model, optimizer, x) for _ in range(warmup)]
    recorder = ExpmRecorder()
    _sync(device)
    t0 = time.perf_counter()
    with record_expm(recorder):
        losses += [train_step(model, optimizer, x) for _ in range(timed)]
    _sync(device)
    elapsed = time.perf_counter() - t0
    peak = _mb(torch.cuda.max_memory_allocated(device)) if cuda else None
    finite = all(math.isfinite(v) for v in losses)
    m = recorder.summary().get("m", {})
    row = {
        "conv": config.conv, "coupling": config.coupling, "precision": amp or "float32", "batch": batch,
        "image_shape": _shape(config.image_shape), "hidden": config.hidden_channels, "blocks": config.num_blocks,
        "steps": ",".join(map(str, config.steps)), "params": count_parameters(model), "warmup_steps": warmup,
        "timed_steps": timed, "step_ms": _sig(1e3 * elapsed / timed) if finite else None,
        "images_per_s": _sig(timed * batch / elapsed) if finite else None,
        "peak_memory_mb": peak, "memory_source": "torch.cuda.max_memory_allocated" if cuda else None,
        "expm_m_mean": m.get("mean"), "expm_m_max": m.get("max"), "first_bpd": losses[0], "last_bpd": losses[-1],
        "note": "" if finite else "a non-finite loss skipped backward passes: no images/s",
    }  # fmt: skip
    del model, optimizer, x
    if cuda:
        torch.cuda.empty_cache()
    return row


def _train_step(part: Part) -> None:
    s = part.sizes
    for label, config in step_models(s.step_model).items():
        for precision, amp in PRECISIONS.items():
            with part.item(f"{label}, {precision}"):
                row = measure_train_step(config, amp, s.step_batch, s.warmup_steps, s.timed_steps, part.device)
                part.add({"model": label, **row})


def _read_record(run_dir: Path) -> dict:
    from .training import RECORD

    return json.loads((run_dir / RECORD).read_text())


def _check(check: str, value: object, ok: bool | None, note: str = "") -> dict:
    return {"check": check, "value": value, "ok": ok, "note": note}


def _epoch_rows(label: str, record: dict) -> list[dict]:
    rows = []
    batch = record["train"]["batch_size"]
    steps_before = 0
    for e in record["epochs"]:
        n = e["epoch"]
        for key, what in (("train_bpd", "train bits/dim"), ("train_bpd_ema", "EMA train bits/dim"),
                          ("test_bpd", "EMA test bits/dim"), ("test_bpd_raw", "raw test bits/dim")):  # fmt: skip
            rows.append(_check(f"{label}, epoch {n}: {what}", e[key], _finite(e[key])))
        m, s = e.get("expm", {}).get("m", {}), e.get("expm", {}).get("s", {})
        rows.append(_check(
            f"{label}, epoch {n}: expm series length m (mean)", m.get("mean"),
            bool(m.get("count")) and _finite(m.get("mean")),
            (f"{m.get('count')} calls; m std {m.get('std', math.nan):.2f}, max {m.get('max')}, min {m.get('min')}; "
             f"squarings s mean {s.get('mean', math.nan):.2f}, max {s.get('max')}") if m else "no expm call recorded",
        ))  # fmt: skip
        steps = e["step"] - steps_before
        steps_before = e["step"]
        rate = _sig(steps * batch / e["train_time_s"]) if e["train_time_s"] > 0 else math.nan
        rows.append(_check(f"{label}, epoch {n}: train() images/s", rate, _finite(rate),
                           f"{steps} steps of batch {batch} in {e['train_time_s']:.2f} s (evaluation {e['eval_time_s']:.2f} s)"))  # fmt: skip
    return rows


def _compare_epochs(a: dict, b: dict, tol: float) -> list[dict]:
    """Resumed against uninterrupted, epoch by epoch: the largest difference of the recorded
    bits/dim (and of the mean series length)."""
    rows = []
    for ea, eb in zip(a["epochs"], b["epochs"], strict=True):
        diffs = {k: abs(ea[k] - eb[k]) for k in ("train_bpd", "train_bpd_ema", "test_bpd", "test_bpd_raw")}
        dm = abs(ea.get("expm", {}).get("m", {}).get("mean", 0.0) - eb.get("expm", {}).get("m", {}).get("mean", 0.0))
        worst = max(diffs.values())
        kind = "both fresh: differences are the device's nondeterminism" if ea["epoch"] == 1 else "after the resume"
        rows.append(_check(
            f"resume: epoch {ea['epoch']} max |Δ bits/dim| vs uninterrupted", worst, worst <= tol,
            f"{kind}; " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()) + f", expm m mean {dm:.3g}; "
            + ("exact" if worst == 0 and dm == 0 else f"tolerance {tol:g}") + f"; step {ea['step']} vs {eb['step']}",
        ))  # fmt: skip
    return rows


def _epoch_check(part: Part) -> None:
    """The paper preset's model through train() on patches32: run through, then stop + resume."""
    from .data import load_dataset
    from .models import bits_per_dim
    from .training import CHECKPOINT, evaluate, fixed_subset, load_checkpoint, load_model, train

    model_cfg, train_cfg, dev = part.sizes.epoch_model, part.sizes.epoch_train, part.device
    runs = part.workdir / "epoch_check"
    through, resumed = runs / "uninterrupted", runs / "resumed"
    cuda = dev.type == "cuda"
    records: dict[str, dict] = {}

    def run(run_dir: Path, **kwargs) -> tuple[dict, float, float | None]:
        if cuda:
            torch.cuda.reset_peak_memory_stats(dev)
        t0 = time.perf_counter()
        train(model_cfg, train_cfg, run_dir, device=str(dev), progress=False, **kwargs)
        wall = time.perf_counter() - t0
        peak = _mb(torch.cuda.max_memory_allocated(dev)) if cuda else None
        return _read_record(run_dir), wall, peak

    with part.item("uninterrupted run"):
        rec, wall, peak = run(through)
        records["uninterrupted"] = rec
        done = len(rec["epochs"])
        part.add(_check("uninterrupted run: epochs finished", done, rec["status"] == "finished" and done == train_cfg.epochs,
                        f"status {rec['status']}, device {rec.get('device')}, {rec.get('num_params')} parameters, "
                        f"{rec['epochs'][-1]['step'] if done else 0} steps of batch {train_cfg.batch_size} on "
                        f"{train_cfg.dataset}, {wall:.1f} s in train()"))  # fmt: skip
        if peak is not None:
            part.add(
                _check(
                    "uninterrupted run: peak memory in train() (MB)",
                    peak,
                    _finite(peak),
                    "torch.cuda.max_memory_allocated",
                )
            )
        for row in _epoch_rows("uninterrupted", rec):
            part.add(row)

    with part.item("checkpoint"):
        path = through / CHECKPOINT
        state = load_checkpoint(path, map_location="cpu")
        part.add(_check("checkpoint: load_checkpoint (MB on disk)", _mb(path.stat().st_size), "model" in state,
                        "keys " + ", ".join(sorted(state)) + f"; epoch {state.get('epoch')}"))  # fmt: skip
        del state
        model = load_model(through, device=dev)
        g = torch.Generator().manual_seed(0)
        x = (torch.rand(16, *model_cfg.image_shape, generator=g) * 2 - 1).to(dev)
        with torch.no_grad():
            zs, logdet, logp = model(x)
            bpd = float(bits_per_dim(logp + logdet, model_cfg.dims).mean())
            err = float((model.inverse(zs) - x).abs().max())
        part.add(_check("checkpoint: load_model (EMA) bits/dim of 16 uniform images", bpd, _finite(bpd),
                        f"eval mode on {dev}"))  # fmt: skip
        part.add(_check("checkpoint: round trip max |x − f⁻¹(f(x))|", err, err <= ROUND_TRIP_TOL,
                        f"float32, tolerance {ROUND_TRIP_TOL:g}"))  # fmt: skip
        del model

    with part.item("checkpoint against the record"):
        # the EMA weights evaluated as train() evaluates them (same images, batch, seed) repeat the
        # recorded EMA test bits/dim
        model = load_model(through, device=dev)
        images = fixed_subset(load_dataset(train_cfg.dataset, "test", train_cfg.data_dir), train_cfg.max_test)
        again = evaluate(model, images, train_cfg.eval_batch_size, train_cfg.seed, dev)
        recorded = records["uninterrupted"]["epochs"][-1]["test_bpd"]
        diff = abs(again - recorded)
        part.add(_check("checkpoint: EMA test bits/dim again vs recorded (|Δ|)", diff, diff <= RESUME_TOL[dev.type] + 1e-6,
                        f"{again:.6f} now, {recorded:.6f} recorded, {len(images)} test images"))  # fmt: skip
        del model

    with part.item("stopped after one epoch"):
        rec, wall, _ = run(resumed, stop_after_epochs=1)
        part.add(_check("stop_after_epochs=1: epochs finished", len(rec["epochs"]),
                        rec["status"] == "interrupted" and len(rec["epochs"]) == 1, f"status {rec['status']}, {wall:.1f} s"))  # fmt: skip

    with part.item("resumed"):
        rec, wall, _ = run(resumed, resume=True)
        records["resumed"] = rec
        resumes = rec.get("resumes") or []
        part.add(_check("resume=True: epochs finished", len(rec["epochs"]),
                        rec["status"] == "finished" and len(rec["epochs"]) == train_cfg.epochs and len(resumes) == 1,
                        f"status {rec['status']}, resumes {resumes}, {wall:.1f} s"))  # fmt: skip
        if "uninterrupted" in records:
            for row in _compare_epochs(records["uninterrupted"], rec, RESUME_TOL[dev.type]):
                part.add(row)

    # the two records come back with the JSON (small; the checkpoints stay behind)
    with part.item("copy the records"):
        (part.out / "records").mkdir(parents=True, exist_ok=True)
        for name, rec in records.items():
            _write_json(part.out / "records" / f"{name}.json", rec)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, device_type: str, sizes: Sizes, result: str, run_dir: str) -> None:
    """One process of the DDP part (started by torch.multiprocessing.spawn); rank 0 writes the rows.

    DDP's averaged gradient against one process's on the whole batch (the coupling nets' norms
    use no batch statistics, so the two agree to rounding), images/s of DDP steps, parameters
    equal on every rank afterwards, then train() under the process group (as under torchrun).
    """
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from .models import MultiScaleFlow, bits_per_dim
    from .training import RECORD, train, train_step

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    cuda = device_type == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world, timeout=_dt.timedelta(seconds=120))
    dev = torch.device("cuda", rank) if cuda else torch.device("cpu")
    rows: list[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        if rank == 0:
            _write_json(Path(result), {"rows": rows})

    try:
        cfg, batch = sizes.step_model, sizes.ddp_batch
        torch.manual_seed(0)
        model = MultiScaleFlow(cfg).to(dev)
        g = torch.Generator().manual_seed(1)
        x = (torch.rand(batch, *cfg.image_shape, generator=g) * 2 - 1).to(dev)  # the same on every rank
        model.initialize(x)
        away_from_identity(model)
        reference = copy.deepcopy(model)
        ddp = DistributedDataParallel(model, device_ids=[rank] if cuda else None)
        local = x.chunk(world)[rank]
        for net, data in ((ddp, local), (reference, x)):
            _, logdet, logp = net(data)
            bits_per_dim(logp + logdet, cfg.dims).mean().backward()
        pairs = [
            (p.grad, q.grad)
            for p, q in zip(model.parameters(), reference.parameters(), strict=True)
            if q.grad is not None
        ]
        num = sum(float(((a - b).double() ** 2).sum()) for a, b in pairs)
        den = sum(float((b.double() ** 2).sum()) for _, b in pairs)
        rel = math.sqrt(num / den) if den > 0 else math.nan
        add(_check(f"DDP gradient (batch {batch} over {world} processes) vs one process on the whole batch", rel,
                   rel <= DDP_GRAD_TOL, f"relative L2 difference over {len(pairs)} tensors; tolerance {DDP_GRAD_TOL:g}"))  # fmt: skip
        del reference
        optimizer = torch.optim.Adamax(model.parameters(), lr=STEP_LR)  # as measure_train_step
        for _ in range(2):
            train_step(ddp, optimizer, local)
        _sync(dev)
        t0 = time.perf_counter()
        for _ in range(sizes.ddp_steps):
            train_step(ddp, optimizer, local)
        _sync(dev)
        rate = _sig(sizes.ddp_steps * batch / (time.perf_counter() - t0))
        add(_check(f"DDP training step: images/s over {world} processes", rate, _finite(rate),
                   f"{sizes.ddp_steps} timed steps after 2, global batch {batch}, {_shape(cfg.image_shape)}, "
                   f"hidden {cfg.hidden_channels}, {cfg.num_blocks} blocks, {'NCCL' if cuda else 'gloo'}"))  # fmt: skip
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        spread = max(float((t - flat).abs().max()) for t in gathered)
        add(_check("DDP: parameters identical on every rank after the steps (max |Δ|)", spread, spread == 0.0))
        del ddp, model, optimizer
        t0 = time.perf_counter()
        train(sizes.epoch_model, sizes.ddp_train, run_dir, device=device_type, progress=False)
        dist.barrier()
        if rank == 0:
            rec = json.loads((Path(run_dir) / RECORD).read_text())
            test = rec["epochs"][-1]["test_bpd"] if rec["epochs"] else math.nan
            add(_check(f"train() under {world} processes: EMA test bits/dim", test,
                       rec["status"] == "finished" and rec.get("world_size") == world and _finite(test),
                       f"status {rec['status']}, world_size {rec.get('world_size')}, device {rec.get('device')}, "
                       f"{time.perf_counter() - t0:.1f} s"))  # fmt: skip
    finally:  # an exception reaches the part through mp.spawn, with its traceback
        dist.destroy_process_group()


def _ddp(part: Part) -> None:
    import torch.multiprocessing as mp

    result = part.workdir / "ddp-rank0.json"
    with part.item("2 processes"):
        try:
            mp.spawn(_ddp_worker, nprocs=2, join=True,
                     args=(2, _free_port(), part.device.type, part.sizes, str(result), str(part.workdir / "ddp-run")))  # fmt: skip
        finally:  # what rank 0 recorded before any failure
            if result.exists():
                for row in json.loads(result.read_text())["rows"]:
                    part.add(row)


PART_FUNCTIONS: dict[str, Callable[[Part], None]] = {
    "bench": _bench,
    "train_step": _train_step,
    "epoch_check": _epoch_check,
    "ddp": _ddp,
}


def _child(args: argparse.Namespace) -> int:
    """One part, in its own process: results to args.result after every item."""
    sizes = Sizes.tiny() if args.tiny else Sizes.paper()
    if args.tiny:
        # tiny ops on a shared CPU: with several threads each op waits on descheduled workers
        # (seen here: 60× slower steps while other processes kept the 2 cores busy)
        torch.set_num_threads(1)
    part = Part(args.child, Path(args.result), torch.device(args.device), sizes, Path(args.workdir), Path(args.out))
    try:
        if args.raise_in == args.child:
            raise RuntimeError(f"deliberate failure in part {args.child!r} (--raise-in, to test the error path)")
        PART_FUNCTIONS[args.child](part)
    except Exception as exc:
        part.errors.append(_error(args.child, None, exc))
        part.save()
        traceback.print_exc()
        return 1
    return 1 if part.errors else 0


# ----------------------------------------------------------------------------- the parent


def part_caps(caps: dict[str, float], budget: float, elapsed: float, part: str) -> float:
    """A part's time: its own cap, or what is left of the budget (less a reserve), if smaller."""
    return max(0.0, min(caps[part], budget - elapsed - RESERVE_S))


class _Log:
    def __init__(self, path: Path) -> None:
        self.file = path.open("w", encoding="utf-8")
        self.t0 = time.perf_counter()
        self.lock = threading.Lock()

    def __call__(self, line: str, prefix: str | None = None) -> None:
        stamp = f"[gpu_check {time.perf_counter() - self.t0:6.1f} s]"
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


def _run_part(part: str, cap: float, argv: list[str], log: _Log, workdir: Path) -> tuple[str, dict | None, str]:
    """Run one part in a child process for at most cap seconds: (status, its results, note)."""
    result = workdir / f"part-{part}.json"
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])),
    }
    cmd = [
        sys.executable,
        "-m",
        "mefbench.gpu_check",
        *argv,
        "--child",
        part,
        "--result",
        str(result),
        "--workdir",
        str(workdir),
    ]
    # its own process group, so that a time-out ends the DDP workers it spawned too; but not a new
    # session, which would outlive this process if it were killed from outside
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True,
                            errors="replace", **group)  # fmt: skip
    tail: collections.deque[str] = collections.deque(maxlen=15)

    def relay() -> None:
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


class _Check:
    """The parent: runs each part in a child process under its cap, merges what it recorded, and
    rewrites the JSON after every part."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.log = _Log(self.out / LOG_NAME)
        self.caps = {**(TINY_CAPS if args.tiny else CAPS), **args.cap}
        self.budget = args.budget if args.budget is not None else TINY_BUDGET_S if args.tiny else BUDGET_S
        self.t0 = time.perf_counter()
        self.result: dict = {
            "schema": SCHEMA, "command": " ".join(["python3 -m mefbench.gpu_check", *args.argv]), "tiny": args.tiny,
            "date": _now(), "updated_at": _now(), "wall_s": 0.0, "exit_status": None, "environment": {},
            "budget": {"total_s": self.budget, "parts": []}, "bench": None, "train_step": [], "epoch_check": [],
            "ddp": [], "errors": [],
        }  # fmt: skip
        self.child_argv = ["--device", args.device, "--out", str(self.out)] + (["--tiny"] if args.tiny else [])
        if args.raise_in:
            self.child_argv += ["--raise-in", args.raise_in]

    def save(self) -> None:
        self.result.update(updated_at=_now(), wall_s=round(time.perf_counter() - self.t0, 1))
        _write_json(self.out / JSON_NAME, self.result)

    def error(self, part: str | None, message: str) -> None:
        self.result["errors"].append({"part": part, "item": None, "error": message, "traceback": ""})

    def run(self) -> dict:
        args, result, log = self.args, self.result, self.log
        log(f"device check: {', '.join(args.parts)} on {args.device}{' (tiny)' if args.tiny else ''}; budget "
            f"{self.budget:.0f} s; writing {self.out / JSON_NAME} and {self.out / LOG_NAME}")  # fmt: skip
        try:
            result["environment"] = environment(args.device)
            log(json.dumps(result["environment"]))
        except Exception as exc:
            result["errors"].append(_error("environment", None, exc))
            log(f"environment FAILED: {type(exc).__name__}: {exc}")
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            self.error(
                "environment", f"--device {args.device}: torch {torch.__version__} sees no CUDA device; no part was run"
            )
            log(result["errors"][-1]["error"])
            args.parts = ()
        self.save()
        try:
            with tempfile.TemporaryDirectory(prefix="gpu_check-") as tmp:
                for part in args.parts:
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
        row = {"part": part, "cap_s": None, "wall_s": 0.0, "status": "not run"}
        result["budget"]["parts"].append(row)
        skip = _ddp_skip(self.args, result["environment"]) if part == "ddp" else None
        if skip:
            row["status"] = "skipped"
            result["ddp"] = [
                _check("2-process DDP", result["environment"].get("device_count"), None, f"skipped: {skip}")
            ]
            log(f"ddp: skipped ({skip})")
            self.save()
            return row["status"]
        cap = part_caps(self.caps, self.budget, time.perf_counter() - self.t0, part)
        row["cap_s"] = round(cap, 1)
        if cap < min(1.0, self.caps[part]):
            row["status"] = "skipped"
            self.error(part, f"not run: the check's budget of {self.budget:.0f} s is spent")
            log(f"{part}: not run, the budget is spent")
            self.save()
            return row["status"]
        log(f"{part}: starting (cap {cap:.1f} s)")
        started = time.perf_counter()
        workdir = tmp / part
        workdir.mkdir()
        try:
            status, data, note = _run_part(part, cap, self.child_argv, log, workdir)
        except Exception as exc:
            status, data, note = "error", {"section": None, "errors": [_error(part, None, exc)]}, ""
        row.update(wall_s=round(time.perf_counter() - started, 1), status=status)
        if data is not None:
            if data.get("section") is not None:
                result[part] = data["section"]
            result["errors"] += data.get("errors", [])
        if status in ("timeout", "interrupted") or (status != "ok" and not (data or {}).get("errors")):
            self.error(part, f"{status}: {note}")
        log(f"{part}: {status} in {row['wall_s']:.1f} s" + (f" ({note})" if note else ""))
        self.save()
        return status


def run_check(args: argparse.Namespace) -> dict:
    """Every selected part, each in its own process and time cap; the JSON after every part."""
    return _Check(args).run()


def _ddp_skip(args: argparse.Namespace, env: dict) -> str | None:
    if args.device.startswith("cuda"):
        count = env.get("device_count") or 0
        return None if count >= 2 else f"needs 2 CUDA devices, this machine has {count}"
    return None if args.ddp_on_cpu else "the device is the CPU (--ddp-on-cpu runs it with gloo)"


def _summary(result: dict, log: _Log) -> None:
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
    p = argparse.ArgumentParser(prog="python3 -m mefbench.gpu_check", description=__doc__.split("\n\n")[0])
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
    p.add_argument("--child", choices=PARTS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    p.add_argument("--workdir", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parser().parse_args(argv)
    if args.child:
        return _child(args)
    args.cap = dict(args.cap)
    args.argv = argv

    def stop(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, stop)  # a kill from outside still leaves the JSON and the log
    return run_check(args)["exit_status"]


if __name__ == "__main__":
    sys.exit(main())

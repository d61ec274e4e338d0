"""Training and evaluation with the paper's recipe (DESIGN.md §3); runs that are never lost.

A run lives in one directory (:mod:`mefbench.record`): ``record.json`` (the typed
:class:`~mefbench.record.RunRecord`), ``checkpoint.pt`` and the ``.lock`` that the training
process holds. :func:`train` is a short sequence of named steps: claim the run directory, load
the data, build the model, open the run (create it, or recover it to resume), then per epoch
train, evaluate and commit, and finally measure the trained model and finish.

Crash consistency: one atomic commit point per epoch. The checkpoint of epoch E carries the
record as of epoch E inside it, and is written (temporary file, fsync, rename) before
``record.json``. So whatever instruction a kill lands on, the directory holds either

* a record and a checkpoint of the same epoch (``record.json`` possibly with a later status:
  finished, diverged, interrupted, or a resume entry; those are written to it alone), or
* a checkpoint one epoch ahead of ``record.json`` (killed between the two writes): resuming
  takes the record from the checkpoint, so no epoch is ever lost;

plus, at most, a temporary file of the write in progress, which the next process removes. A
record is never ahead of its checkpoint; if it is (the checkpoint was deleted or replaced by
hand), resuming refuses instead of dropping the recorded epochs. Shuffling, flips,
dequantisation noise and the init batch come from generators seeded by (seed, epoch), so a
resumed run records the same numbers as an uninterrupted one, bit for bit on the CPU.

Test hooks: ``MEFBENCH_TEST_KILL_AT=POINT[:EPOCH]`` makes the process SIGKILL itself at a named
point (``MEFBENCH_TEST_PAUSE_AT`` sleeps there instead), for the tests that kill real training
processes. Points: ``locked``, ``started``, ``mid-epoch``, ``evaluated``,
``checkpoint-tmp-open``, ``checkpoint-tmp-written``, ``after-checkpoint``, ``record-tmp-open``,
``record-tmp-written``, ``after-record``, ``finishing``; EPOCH is the 1-based epoch in progress
(0 outside epochs).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from . import __version__
from .config import FlowConfig, TrainConfig
from .data import DATASETS, dequantize, load_dataset, random_hflip
from .distributed import (
    all_ranks_ok,
    all_reduce_mean,
    broadcast_object,
    check_same_on_all_ranks,
    init_distributed,
    rank_world,
    resolve_device,
    synchronize,
)
from .layers.nets import sync_init_flags
from .linalg import ExpmRecorder, NonFiniteError, record_expm
from .models import MODEL_REVISION, MultiScaleFlow, bits_per_dim, count_parameters
from .record import (
    CHECKPOINT,
    ENDED,
    LOCK,
    RECORD,
    Divergence,
    EpochRecord,
    FinalMetrics,
    Resume,
    RunError,
    RunLock,
    RunLockedError,
    RunRecord,
    derive_cells,
    now,
    read_record,
    remove_stale_temporaries,
    replace_atomic,
    write_json_atomic,
    write_record,
)
from .stats import pool_stats

__all__ = [
    "CHECKPOINT",
    "RECORD",
    "RunError",
    "RunLockedError",
    "RunRecord",
    "TrainConfig",
    "compiled_loss",
    "evaluate",
    "load_checkpoint",
    "load_model",
    "pool_stats",
    "read_record",
    "resolve_device",
    "train",
    "train_step",
    "write_json_atomic",
]

_CHECKPOINT_KEYS = ("model", "ema", "optimizer", "scheduler", "epoch", "step")


# ----------------------------------------------------------------------------- test hooks


def _test_point(point: str, epoch: int = 0) -> None:
    """MEFBENCH_TEST_KILL_AT / MEFBENCH_TEST_PAUSE_AT = POINT[:EPOCH]: SIGKILL or pause here (for
    MEFBENCH_TEST_PAUSE_S seconds, 600 by default)."""
    for env in ("MEFBENCH_TEST_KILL_AT", "MEFBENCH_TEST_PAUSE_AT"):
        spec = os.environ.get(env)
        if not spec:
            continue
        name, _, at = spec.partition(":")
        if name == point and (not at or int(at) == epoch):
            if env == "MEFBENCH_TEST_KILL_AT":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(float(os.environ.get("MEFBENCH_TEST_PAUSE_S", "600")))


# ----------------------------------------------------------------------------- small helpers


def _versions() -> dict:
    import pandas
    import scipy

    return {
        "mefbench": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "pandas": pandas.__version__,
    }


def _machine(device: torch.device) -> dict:
    info = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _generator(seed: int, *stream: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, *stream]).generate_state(1)[0]))
    return g


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


# ----------------------------------------------------------------------------- checkpoints


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint, loaded with ``weights_only=True``; RunError naming the file if it cannot be used.

    A file that would import code when unpickled (a pickled ``os.system`` call, say) is refused
    as unsafe: a checkpoint holds tensors, numbers and strings only, and mefbench never unpickles
    anything else.
    """
    path = Path(path)
    if not path.exists():
        raise RunError(f"no checkpoint {path}")
    if path.stat().st_size == 0:
        raise RunError(f"checkpoint {path} is empty (0 bytes): it was cut off while being written, or truncated since")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise RunError(_checkpoint_problem(path, exc)) from None
    if not isinstance(ckpt, dict):
        raise RunError(f"checkpoint {path} is not a mefbench checkpoint: it holds {type(ckpt).__name__}, not a dict")
    missing = [k for k in _CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise RunError(f"checkpoint {path} is not a mefbench checkpoint: it lacks {missing}")
    return ckpt


def _checkpoint_problem(path: Path, exc: Exception) -> str:
    import re

    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return (
            f"refused checkpoint {path} as unsafe: unpickling it would import {found.group(1)}, which no "
            "weights file needs (mefbench checkpoints hold tensors, numbers and strings only); do not load it"
        )
    if "weights_only" in text or "Weights only" in text:  # torch's own reason, without its advice
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)\n", text + "\n", re.DOTALL)
        detail = reason.group(1).strip() if reason and reason.group(1).strip() else "not a weights file"
        return f"corrupt or unreadable checkpoint {path}: {detail}"
    return f"corrupt or unreadable checkpoint {path}: {type(exc).__name__}: {text.strip() or 'no reason given'}"


def _load_into(module: nn.Module | torch.optim.Optimizer, state: object, path: Path, part: str) -> None:
    """module.load_state_dict(state) with a RunError that says what does not fit."""
    if not isinstance(state, dict):
        raise RunError(f"checkpoint {path}: its {part} entry is not a state dict")
    if isinstance(module, nn.Module):
        expected, found = set(module.state_dict()), set(state)
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        if missing or unexpected:
            parts = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})" for what, keys in
                     (("missing keys", missing), ("unexpected keys", unexpected)) if keys]  # fmt: skip
            raise RunError(
                f"checkpoint {path} does not fit this run's model ({part}): {'; '.join(parts)}; "
                "it was written for another model configuration or model revision"
            )
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        first = next((line for line in lines if "size mismatch" in line), lines[0] if lines else type(exc).__name__)
        raise RunError(f"checkpoint {path} does not fit this run's model ({part}): {first}") from None


def _revision_problem(run_dir: Path, record: RunRecord) -> str | None:
    if record.model_revision == MODEL_REVISION:
        return None
    return (
        f"{run_dir} was trained with model revision {record.model_revision}, and this mefbench builds "
        f"revision {MODEL_REVISION}, whose parameters differ (see mefbench.models.MODEL_REVISION): its "
        "checkpoint cannot be loaded; train the run again in another directory"
    )


# ----------------------------------------------------------------------------- steps and evaluation


def _loss(model: nn.Module, x: Tensor, dims: int) -> Tensor:
    """Mean bits/dim of a dequantised batch (the call goes through a DDP wrapper if there is one)."""
    _, logdet, logp = model(x)
    return bits_per_dim(logp + logdet, dims).mean()


def compiled_loss(model: nn.Module, backend: str | None = "inductor") -> Callable[[Tensor], Tensor]:
    """The training step's forward and loss, x -> mean bits/dim, compiled with ``torch.compile``.

    ``backend`` is torch.compile's (``"inductor"``: generated kernels; ``"aot_eager"``: the same
    graph capture without code generation); None gives the eager function. Static shapes
    (``dynamic=False``): a training batch keeps its shape, and the few distinct shapes of a
    model's levels are compiled once each. The matrix exponentials run eagerly inside the compiled
    step (:mod:`mefbench.linalg`: their series length is planned on the host), so Table 6's
    statistics are recorded as without compilation. The model (or its DDP wrapper) must have done
    its data-dependent init: the flags are read back once here, not inside the graph. The
    backward, the optimiser and the EMA stay eager.
    """
    flow = model.module if hasattr(model, "module") else model
    dims = flow.config.dims

    def loss(x: Tensor) -> Tensor:
        return _loss(model, x, dims)

    if backend is None:
        return loss
    sync_init_flags(flow)
    return torch.compile(loss, backend=backend, dynamic=False)


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    grad_clip: float | None = None,
    scaler: torch.amp.GradScaler | None = None,
    loss_fn: Callable[[Tensor], Tensor] | None = None,
) -> float:
    """One optimiser step on a dequantised batch; returns the loss (bits/dim, possibly non-finite).

    A non-finite loss is returned before any parameter is touched. ``scaler`` (fp16 only) scales
    the loss for the backward pass and skips steps whose gradients overflow. ``loss_fn`` computes
    the loss of x in place of the model's own forward (:func:`compiled_loss`).
    """
    flow = model.module if hasattr(model, "module") else model
    optimizer.zero_grad(set_to_none=True)
    loss = loss_fn(x) if loss_fn is not None else _loss(model, x, flow.config.dims)
    value = float(loss.detach())
    if not math.isfinite(value):
        return value
    if scaler is None:
        loss.backward()
        if grad_clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        return value
    scaler.scale(loss).backward()
    if grad_clip is not None:
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)
    scaler.update()
    return value


@torch.no_grad()
def evaluate(
    model: MultiScaleFlow,
    images: Tensor,
    batch_size: int = 256,
    seed: int = 1234,
    device: torch.device | str = "cpu",
    channels_last: bool = False,
) -> float:
    """Mean test bits/dim over uint8 images, one dequantisation sample per image (fixed seed).

    Runs in the model's own precision settings (``model.set_amp``).
    """
    was_training = model.training
    model.eval()
    rank, world = rank_world()
    images = images[rank::world]  # each rank its share; the sums are reduced below
    g = _generator(seed, 7, rank)
    total, count = 0.0, 0
    fmt = _memory_format(channels_last)
    for start in range(0, len(images), batch_size):
        batch = dequantize(images[start : start + batch_size], generator=g).to(device).contiguous(memory_format=fmt)
        total += float(model.bits_per_dim(batch).double().sum())
        count += len(batch)
    model.train(was_training)
    return all_reduce_mean(total, count, device)


class _PeakMemory:
    """Peak memory of one training step.

    CUDA: ``torch.cuda.max_memory_allocated`` during the step (everything resident: model, EMA
    copy, optimiser state, batch, activations). CPU: the bytes of the tensors autograd saves for
    backward in the step (``saved_tensors_hooks``), plus parameters, gradients and optimiser
    state, each storage counted once.
    """

    def __init__(self, device: torch.device, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.device, self.model, self.optimizer = device, model, optimizer
        self.bytes: int | None = None
        self.method = (
            "cuda.max_memory_allocated" if device.type == "cuda" else "cpu.saved_tensors+params+grads+optimizer"
        )

    @contextmanager
    def measure(self) -> Iterator[None]:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        # storages by address; holding them keeps every address unique for the whole step (a freed
        # storage's address could otherwise be reused by another one and counted once for both)
        storages: dict[int, torch.UntypedStorage] = {}

        def add(t: Tensor) -> Tensor:
            try:
                s = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # sparse or opaque tensors
                return t
            if s.nbytes():
                storages[s.data_ptr()] = s
            return t

        with torch.autograd.graph.saved_tensors_hooks(add, lambda t: t):
            yield
        for p in self.model.parameters():
            add(p)
            if p.grad is not None:
                add(p.grad)
        for state in self.optimizer.state.values():
            for value in state.values():
                if isinstance(value, Tensor):
                    add(value)
        self.bytes = sum(s.nbytes() for s in storages.values())
        storages.clear()


# ----------------------------------------------------------------------------- the run's parts


@dataclass
class _Data:
    train_images: Tensor
    test_images: Tensor
    train_eval: Tensor  # a fixed subset of training images, as many as test images, for the EMA train bits/dim
    flip: bool
    steps_per_epoch: int
    per_rank_batch: int


@dataclass
class _State:
    """Everything a checkpoint holds, and the step counter."""

    model: MultiScaleFlow
    ema: AveragedModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    step: int = 0

    def state_dict(self, epoch: int, record: RunRecord) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": epoch,
            "step": self.step,
            "model_revision": MODEL_REVISION,
            "record": record.to_json(),  # the commit point: this epoch's record travels with its weights
        }

    def load(self, ckpt: dict, path: Path) -> int:
        """Load a checkpoint's states; returns its epoch."""
        _load_into(self.model, ckpt["model"], path, "weights")
        _load_into(self.ema, ckpt["ema"], path, "EMA weights")
        _load_into(self.optimizer, ckpt["optimizer"], path, "optimiser state")
        _load_into(self.scheduler, ckpt["scheduler"], path, "learning-rate schedule")
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        return int(ckpt["epoch"])


def _schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int):
    """Linear warm-up over warmup_epochs, then × decay_factor at each decay epoch (stepped per batch)."""
    warmup = max(1, round(cfg.warmup_epochs * steps_per_epoch))
    milestones = [e * steps_per_epoch for e in cfg.decay_epochs]
    return torch.optim.lr_scheduler.ChainedScheduler(
        [
            torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0 / warmup, total_iters=warmup - 1 or 1),
            torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=milestones, gamma=cfg.decay_factor),
        ]
    )


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (schedulers, `kill`) like Ctrl-C, so the record is marked interrupted; both
    wait while an epoch commits (:func:`_interrupts_held`)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        if _HELD.active:  # an epoch is committing: raise once it has
            _HELD.pending = signum
            return
        raise KeyboardInterrupt(f"signal {signum}")

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


class _Held:
    """Whether an epoch's commit is under way, and the interrupt that arrived meanwhile."""

    active = False
    pending: int | None = None


_HELD = _Held()


@contextmanager
def _interrupts_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait until the block (an epoch's commit and the assignment of the record
    it committed) is over, then interrupt: an interrupt never sees the checkpoint ahead of the
    record in hand. (Masking the signals would not do: another thread of the process, e.g. an
    OpenMP worker, would still take them.)"""
    _HELD.active, _HELD.pending = True, None
    try:
        yield
    finally:
        _HELD.active = False
        if _HELD.pending is not None:
            signum, _HELD.pending = _HELD.pending, None
            raise KeyboardInterrupt(f"signal {signum}")


def _comparable(cfg: TrainConfig) -> TrainConfig:
    """Training settings that must match to resume (where the data lives may move)."""
    return dataclasses.replace(cfg, data_dir=None)


def _on_rank0(
    fn: Callable[[], object], rank: int, device: torch.device, share: Callable[[object], object] = lambda r: r
) -> object:
    """fn() on rank 0 (which alone touches the run directory); its failure reaches every rank, and
    the other ranks get share(its result)."""
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except (RunError, ValueError, OSError) as exc:
            error = exc
    ok = all_ranks_ok(error is None, device)
    if error is not None:
        raise error
    if not ok:
        raise RunError("rank 0 could not open the run directory; its message says why")
    shared = broadcast_object(share(result) if rank == 0 else None)
    return result if rank == 0 else shared


# ----------------------------------------------------------------------------- step 1: the run directory


def _claim_run_dir(run_dir: Path, resume: bool, lock: RunLock) -> bool:
    """Refuse early what can be refused without data; lock the directory if it exists.

    Returns whether to resume (a directory holding only a lock file is a run killed before its
    first record: it starts from the beginning).
    """
    has_run = (run_dir / RECORD).exists() or (run_dir / CHECKPOINT).exists()
    if run_dir.is_dir() and (has_run or (run_dir / LOCK).exists()):
        lock.acquire()  # RunLockedError naming the process that trains there
        _test_point("locked")
        remove_stale_temporaries(run_dir)
        if has_run and not resume:
            try:
                status = f"status {read_record(run_dir).status!r}"
            except RunError as exc:
                status = f"unreadable record: {exc}"
            raise RunError(
                f"{run_dir} already holds a run ({status}); pass --resume to continue it or choose another --out"
            )
        return has_run
    if resume:
        where = "does not exist" if not run_dir.exists() else f"holds no run (no {RECORD})"
        raise RunError(f"--resume: {run_dir} {where}; to start a new run there, leave out --resume")
    return False


# ----------------------------------------------------------------------------- step 2: the data


def _load_data(model_config: FlowConfig, cfg: TrainConfig, world: int) -> _Data:
    info = DATASETS[cfg.dataset]
    if tuple(model_config.image_shape) != tuple(info.shape):
        raise ValueError(
            f"model image_shape {model_config.image_shape} does not match dataset {cfg.dataset} {info.shape}"
        )
    train_images = load_dataset(cfg.dataset, "train", cfg.data_dir)
    test_images = load_dataset(cfg.dataset, "test", cfg.data_dir)
    if cfg.max_test is not None:
        test_images = test_images[: cfg.max_test]
    if len(test_images) == 0:
        raise ValueError(f"{cfg.dataset} has no test images")
    steps_per_epoch = len(train_images) // cfg.batch_size
    if cfg.max_train_batches is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.max_train_batches)
    if steps_per_epoch < 1:
        raise ValueError(
            f"{cfg.dataset} has {len(train_images)} train images, fewer than one batch of {cfg.batch_size}"
        )
    train_eval = train_images[torch.randperm(len(train_images), generator=_generator(cfg.seed, 3))[: len(test_images)]]
    return _Data(
        train_images=train_images,
        test_images=test_images,
        train_eval=train_eval,
        flip=info.flip if cfg.flip is None else cfg.flip,
        steps_per_epoch=steps_per_epoch,
        per_rank_batch=max(1, cfg.batch_size // world),
    )


# ----------------------------------------------------------------------------- step 3: the model


def _build_state(model_config: FlowConfig, cfg: TrainConfig, data: _Data, dev: torch.device, world: int) -> _State:
    """The model with its data-dependent init (same images on every rank), EMA, optimiser, schedule."""
    torch.manual_seed(cfg.seed)
    model = MultiScaleFlow(model_config).to(dev, torch.float32)  # the flow's maths is single precision
    model.set_amp(cfg.amp)  # only the coupling nets run under autocast
    fmt = _memory_format(cfg.channels_last)
    if cfg.channels_last:
        model = model.to(memory_format=fmt)
    images = data.train_images
    init_idx = torch.randperm(len(images), generator=_generator(cfg.seed, 1))[: cfg.init_batch]
    init_x = dequantize(images[init_idx], generator=_generator(cfg.seed, 2)).to(dev).contiguous(memory_format=fmt)
    if world > 1:
        check_same_on_all_ranks(init_x, dev)
    try:
        model.initialize(init_x)
    except ValueError as exc:
        raise ValueError(f"the model's data-dependent init on {len(init_x)} training images failed: {exc}") from exc
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))
    optimizer = torch.optim.Adamax(model.parameters(), lr=cfg.lr)
    scheduler = _schedule(optimizer, cfg, data.steps_per_epoch)
    scaler = torch.amp.GradScaler(dev.type) if cfg.amp == "fp16" else None
    return _State(model, ema, optimizer, scheduler, scaler)


# ----------------------------------------------------------------------------- step 4: open the run


def _new_record(model_config, cfg, run_dir, dev, world, model, preset, tables, cells, scale) -> RunRecord:
    model_dict = json.loads(json.dumps(model_config.to_dict()))  # JSON-normal: tuples as lists
    train_dict = json.loads(json.dumps(cfg.to_dict()))
    tables = [str(t) for t in tables]
    if cells is None:
        cells = derive_cells(tables, model_dict, train_dict, scale)
    return RunRecord(
        name=Path(run_dir).name,
        preset=preset,
        tables=tables,
        cells={str(k): dict(v) for k, v in cells.items()},
        scale=scale,
        status="running",
        model=model_dict,
        train=train_dict,
        model_revision=MODEL_REVISION,
        seed=cfg.seed,
        device=str(dev),
        world_size=world,
        versions=_versions(),
        machine=_machine(dev),
        num_params=count_parameters(model),
        epochs=[],
        command=list(sys.argv),
        started_at=now(),
        updated_at=now(),
    )


def _recover(
    run_dir: Path, model_config: FlowConfig, cfg: TrainConfig, dev: torch.device
) -> tuple[RunRecord, dict | None, bool]:
    """The run's last consistent state: its record, the checkpoint to continue from (None: epoch 0)
    and whether the record was rebuilt from the checkpoint.

    ``record.json`` may be one epoch behind the checkpoint (a kill between the two writes): the
    record inside the checkpoint is then the run's record. A record ahead of its checkpoint, or
    recorded epochs without a checkpoint, cannot be continued without losing them: refused.
    """
    record = read_record(run_dir)
    try:
        same = record.model_config() == model_config and _comparable(record.train_config()) == _comparable(cfg)
    except (ValueError, TypeError) as exc:
        raise RunError(f"the run in {run_dir} cannot be rebuilt here: {exc}") from exc
    if not same:
        raise RunError(f"{run_dir} holds a run with a different configuration; choose another --out")
    if record.status in ENDED:
        return record, None, False
    problem = _revision_problem(run_dir, record)
    if problem:
        raise RunError(problem)
    ckpt_path = run_dir / CHECKPOINT
    if not ckpt_path.exists():
        if record.epochs:
            raise RunError(
                f"{run_dir}: its record holds {len(record.epochs)} finished epochs but {CHECKPOINT} is missing, "
                f"so training cannot continue after epoch {len(record.epochs)}; restore the checkpoint, or move "
                "the run away and train it again (a fresh start here would drop the recorded epochs)"
            )
        return record, None, False
    ckpt = load_checkpoint(ckpt_path, map_location=dev)
    epoch = int(ckpt["epoch"])
    if epoch > len(record.epochs):
        if not isinstance(ckpt.get("record"), str):
            raise RunError(
                f"{run_dir}: {CHECKPOINT} is at epoch {epoch} but {RECORD} holds {len(record.epochs)} epochs, and "
                "the checkpoint (written by an older mefbench) carries no record to rebuild the missing epochs from"
            )
        inside = RunRecord.from_json(ckpt["record"], f"the record inside {ckpt_path}")
        if len(inside.epochs) != epoch:
            raise RunError(
                f"{ckpt_path} is at epoch {epoch} but the record inside it holds {len(inside.epochs)} epochs"
            )
        return inside, ckpt, True  # record.json was one commit behind: the checkpoint's record is the run's
    if epoch < len(record.epochs):
        raise RunError(
            f"{run_dir}: {RECORD} holds {len(record.epochs)} epochs but {CHECKPOINT} is at epoch {epoch}, older than "
            "the record (replaced by hand?); resuming would rewrite recorded epochs, so it is refused"
        )
    return record, ckpt, False


def _open_run(
    run_dir: Path, resume: bool, lock: RunLock, model_config: FlowConfig, cfg: TrainConfig, dev: torch.device,
    world: int, state: _State, meta: dict,
) -> tuple[RunRecord, dict | None]:  # fmt: skip
    """Create the run (directory, lock, first record) or recover it; rank 0 only."""
    if not resume:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not lock.held:
            lock.acquire()
            _test_point("locked")
            remove_stale_temporaries(run_dir)
        if (run_dir / RECORD).exists():  # another process created it since step 1
            raise RunError(f"{run_dir} already holds a run; pass --resume to continue it or choose another --out")
        record = _new_record(model_config, cfg, run_dir, dev, world, state.model, **meta)
        write_record(run_dir, record)
        _test_point("started")
        return record, None
    record, ckpt, rebuilt = _recover(run_dir, model_config, cfg, dev)
    if record.status in ENDED:  # nothing to train: a diverged run is data, never retried
        if rebuilt:
            write_record(run_dir, record)
        return record, None
    start = len(record.epochs)
    record = dataclasses.replace(
        record, status="running", resumes=[*record.resumes, Resume(from_epoch=start, at=now())], updated_at=now()
    )
    write_record(run_dir, record)
    _test_point("started")
    return record, ckpt


# ----------------------------------------------------------------------------- step 5: one epoch


@dataclass
class _Step:
    """The loss of a training step: the model's own forward (``loss_fn`` None) or, with
    ``TrainConfig.compile``, that forward and loss compiled (:func:`compiled_loss`). The first call
    of a compiled one compiles: it is timed apart, once per process."""

    loss_fn: Callable[[Tensor], Tensor] | None = None
    compile_time_s: float | None = None

    @classmethod
    def build(cls, ddp_model: nn.Module, cfg: TrainConfig) -> _Step:
        return cls(compiled_loss(ddp_model, cfg.compile) if cfg.compile else None)

    @property
    def compiles_next(self) -> bool:
        return self.loss_fn is not None and self.compile_time_s is None


def _run_epoch(
    epoch: int,
    state: _State,
    data: _Data,
    cfg: TrainConfig,
    dev: torch.device,
    rank: int,
    progress: bool,
    ddp_model: nn.Module,
    step: _Step,
) -> EpochRecord | Divergence:
    """Train one epoch (0-based index) and evaluate; a non-finite loss ends it as a Divergence.

    The step that compiles the training step (the first of a compiled run in this process) is left
    out of the epoch's training time and recorded as its ``compile_time_s``.
    """
    g = _generator(cfg.seed, 100, epoch)
    n, b = data.steps_per_epoch, cfg.batch_size
    order = torch.randperm(len(data.train_images), generator=g)[: n * b].reshape(n, b)
    order = order[:, rank * data.per_rank_batch : (rank + 1) * data.per_rank_batch]
    fmt = _memory_format(cfg.channels_last)
    memory = _PeakMemory(dev, state.model, state.optimizer)
    recorder, losses = ExpmRecorder(), []
    state.model.train()
    bar = tqdm(order, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress or rank != 0, leave=False)
    compile_time = None
    t0 = time.perf_counter()
    with record_expm(recorder):
        for i, idx in enumerate(bar):
            batch = data.train_images[idx]
            if data.flip:
                batch = random_hflip(batch, generator=g)
            x = dequantize(batch, generator=g).to(dev, non_blocking=True).contiguous(memory_format=fmt)
            compiling, t_step = step.compiles_next, time.perf_counter()
            with memory.measure() if i == 0 else nullcontext():
                try:
                    loss = train_step(ddp_model, state.optimizer, x, cfg.grad_clip, state.scaler, step.loss_fn)
                except NonFiniteError:
                    loss = float("nan")
            if compiling:
                synchronize(dev)
                compile_time = step.compile_time_s = time.perf_counter() - t_step
            state.step += 1
            if not math.isfinite(loss):
                return Divergence(epoch=epoch + 1, step=state.step, loss=loss)
            state.scheduler.step()
            state.ema.update_parameters(state.model)
            losses.append(loss)
            bar.set_postfix(bpd=f"{loss:.3f}")
            if i + 1 == (n + 1) // 2:
                _test_point("mid-epoch", epoch + 1)
    synchronize(dev)
    train_time = time.perf_counter() - t0 - (compile_time or 0.0)
    t1 = time.perf_counter()
    ev = {"batch_size": cfg.eval_batch_size, "device": dev, "channels_last": cfg.channels_last}
    entry = EpochRecord(
        epoch=epoch + 1,
        step=state.step,
        lr=state.optimizer.param_groups[0]["lr"],
        train_bpd=all_reduce_mean(sum(losses), len(losses), dev),
        train_bpd_ema=evaluate(state.ema.module, data.train_eval, seed=cfg.seed + 1, **ev),
        test_bpd=evaluate(state.ema.module, data.test_images, seed=cfg.seed, **ev),
        test_bpd_raw=evaluate(state.model, data.test_images, seed=cfg.seed, **ev),
        train_time_s=train_time,
        eval_time_s=time.perf_counter() - t1,
        expm=recorder.summary(),
        peak_memory_bytes=memory.bytes,
        peak_memory_method=memory.method,
        compile_time_s=compile_time,
    )
    _test_point("evaluated", epoch + 1)
    return entry


# ----------------------------------------------------------------------------- step 6: the commit


def _commit(run_dir: Path, record: RunRecord, state: _State) -> RunRecord:
    """The epoch's commit point: the checkpoint with the record inside, then record.json (rank 0)."""
    epoch = len(record.epochs)
    record = dataclasses.replace(record, updated_at=now())
    state_dict = state.state_dict(epoch, record)
    replace_atomic(
        run_dir / CHECKPOINT, lambda f: torch.save(state_dict, f), hook=lambda p: _test_point(f"checkpoint-{p}", epoch)
    )
    _test_point("after-checkpoint", epoch)
    write_record(run_dir, record, hook=lambda p: _test_point(f"record-{p}", epoch))
    _test_point("after-record", epoch)
    return record


# ----------------------------------------------------------------------------- step 7: finish


@torch.no_grad()
def _measure_trained(state: _State, data: _Data, cfg: TrainConfig, dev: torch.device) -> dict:
    """Sampling time per image and the round-trip error of the trained EMA model (float32).

    A trained model whose inverse fails (a layer that raises, e.g. an iterative inverse that does
    not converge) is data, not a crash: its round-trip error is recorded as inf, the sampling time
    as None, and the reason in ``measure_error``.
    """
    model = state.ema.module
    was_training = model.training
    model.eval()
    fmt = _memory_format(cfg.channels_last)
    x = dequantize(data.test_images[:64], generator=_generator(cfg.seed, 5)).to(dev).contiguous(memory_format=fmt)
    n = min(64, 4 * cfg.batch_size)
    out: dict = {"sample_time_per_image_s": None, "sample_images": None, "roundtrip_error": math.inf}
    try:
        zs, _, _ = model(x)
        out["roundtrip_error"] = float((model.inverse(zs) - x).abs().max())
        model.sample(2, generator=_generator(cfg.seed, 6))  # warm-up: eval caches, kernels
        synchronize(dev)
        t0 = time.perf_counter()
        model.sample(n, generator=_generator(cfg.seed, 6))
        synchronize(dev)
        out.update(sample_time_per_image_s=(time.perf_counter() - t0) / n, sample_images=n)
    except (RuntimeError, ValueError) as exc:
        out["measure_error"] = f"{type(exc).__name__}: {exc}"
    finally:
        model.train(was_training)
    return out


def _finish(
    run_dir: Path, record: RunRecord, state: _State, data: _Data, cfg: TrainConfig, dev: torch.device
) -> RunRecord:
    """Measure the trained model, mark the run finished and write the record (rank 0)."""
    _test_point("finishing", len(record.epochs))
    final = FinalMetrics.from_epochs(record.epochs, **_measure_trained(state, data, cfg, dev))
    record = dataclasses.replace(record, status="finished", final=final, updated_at=now())
    write_record(run_dir, record)
    return record


# ----------------------------------------------------------------------------- the run


def train(
    model_config: FlowConfig,
    train_config: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    device: str = "auto",
    preset: str | None = None,
    tables: tuple[str | int, ...] | list[str | int] = (),
    cells: dict[str, dict] | None = None,
    scale: str | None = None,
    progress: bool = True,
    stop_after_epochs: int | None = None,
) -> RunRecord:
    """Train (or resume) one run in run_dir and return its record.

    ``tables`` are the ids of the tables the run fills and ``cells`` the cell it fills in each
    (derived from the presets when None). The run directory is created only once the data and
    the model are ready, so a data or model error leaves nothing behind; it is locked while the
    run trains (a second process gets a :class:`RunLockedError` naming the first). Under
    torchrun the run is data-parallel (DistributedDataParallel); only rank 0 writes.
    ``stop_after_epochs`` ends the call early with status "interrupted" (as a kill would), for
    tests and time-sliced sweeps; ``resume=True`` continues from the last committed epoch.
    """
    run_dir = Path(run_dir)
    cfg = train_config
    rank, world, local_rank = init_distributed(device)
    dev = resolve_device(device, local_rank)
    lock = RunLock(run_dir)
    try:
        resume = bool(_on_rank0(lambda: _claim_run_dir(run_dir, resume, lock), rank, dev))
        data = _load_data(model_config, cfg, world)
        state = _build_state(model_config, cfg, data, dev, world)
        meta = {"preset": preset, "tables": tuple(tables), "cells": cells, "scale": scale}
        opened = _on_rank0(
            lambda: _open_run(run_dir, resume, lock, model_config, cfg, dev, world, state, meta),
            rank,
            dev,
            share=lambda found: found[0],  # the record; the other ranks read the checkpoint themselves
        )
        if rank == 0:
            record, ckpt = opened
        else:
            record, ckpt = opened, None
            if record.epochs and record.status not in ENDED:
                ckpt = load_checkpoint(run_dir / CHECKPOINT, map_location=dev)
        if record.status in ENDED:
            return record
        if ckpt is not None:
            state.load(ckpt, run_dir / CHECKPOINT)
            del ckpt
        return _train_epochs(run_dir, record, state, data, cfg, dev, rank, world, progress, stop_after_epochs)
    finally:
        lock.release()


def _train_epochs(
    run_dir: Path, record: RunRecord, state: _State, data: _Data, cfg: TrainConfig, dev: torch.device,
    rank: int, world: int, progress: bool, stop_after_epochs: int | None,
) -> RunRecord:  # fmt: skip
    """Epochs from the last committed one to the end (or to stop_after_epochs), then finish."""

    def save(changed: RunRecord) -> RunRecord:
        changed = dataclasses.replace(changed, updated_at=now())
        if rank == 0:
            write_record(run_dir, changed)
        return changed

    ddp_model: nn.Module = state.model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            state.model, device_ids=[dev.index] if dev.type == "cuda" else None
        )
    step = _Step.build(ddp_model, cfg)
    start = len(record.epochs)
    end = cfg.epochs if stop_after_epochs is None else min(cfg.epochs, start + stop_after_epochs)
    with _sigterm_as_interrupt():
        try:
            for epoch in range(start, end):
                result = _run_epoch(epoch, state, data, cfg, dev, rank, progress, ddp_model, step)
                if isinstance(result, Divergence):
                    if progress and rank == 0:
                        print(
                            f"run diverged at step {result.step} (epoch {result.epoch}): loss {result.loss}",
                            file=sys.stderr,
                        )
                    return save(dataclasses.replace(record, status="diverged", diverged=result))
                epochs = [*record.epochs, result]
                changed = dataclasses.replace(record, epochs=epochs, final=FinalMetrics.from_epochs(epochs))
                if not math.isfinite(result.test_bpd):
                    diverged = Divergence(epoch=result.epoch, step=result.step, loss=result.test_bpd)
                    changed = dataclasses.replace(changed, status="diverged", diverged=diverged)
                # only the committed record is ever written again (an interrupt writes `record`)
                with _interrupts_held():
                    record = _commit(run_dir, changed, state) if rank == 0 else changed
                if record.status == "diverged":
                    return record
            if len(record.epochs) >= cfg.epochs:
                if rank == 0:
                    record = _finish(run_dir, record, state, data, cfg, dev)
                all_ranks_ok(True, dev)  # the other ranks wait for rank 0's measurements
                return record
            return save(dataclasses.replace(record, status="interrupted"))
        except KeyboardInterrupt:
            save(dataclasses.replace(record, status="interrupted"))
            raise


# ----------------------------------------------------------------------------- loading a run


def load_model(run_dir: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> MultiScaleFlow:
    """The trained model of a run (EMA weights by default), in eval mode, in the run's precision
    settings (``set_amp`` with its ``amp``)."""
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    problem = _revision_problem(run_dir, record)
    if problem:
        raise RunError(problem)
    ckpt_path = run_dir / CHECKPOINT
    if not ckpt_path.exists():
        raise RunError(f"{run_dir} has no {CHECKPOINT}: the run finished no epoch")
    try:
        config = record.model_config()
    except (ValueError, TypeError) as exc:
        raise RunError(f"the model of {run_dir} cannot be built here: {exc}") from exc
    model = MultiScaleFlow(config).float()
    ckpt = load_checkpoint(ckpt_path)
    if ema:
        if not isinstance(ckpt["ema"], dict):
            raise RunError(f"checkpoint {ckpt_path}: its EMA entry is not a state dict")
        state = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    else:
        state = ckpt["model"]
    _load_into(model, state, ckpt_path, "EMA weights" if ema else "weights")
    model.set_amp(record.train.get("amp"))
    return model.to(device).eval()

"""Training and evaluation with the paper's recipe (docs/design.md §3); runs that are never lost.

A run lives in one directory (:mod:`mefbench.record`): ``record.json`` (the typed
:class:`~mefbench.record.RunRecord`), ``checkpoint.pt`` (:mod:`mefbench.checkpoint`, which also
loads a finished run's model) and the ``.lock`` that the training process holds. :func:`train`
is a short sequence of named steps: claim the run directory, load the data, build the model, open
the run (create it, or recover it to resume), then per epoch train, evaluate and commit, and
finally measure the trained model and finish. The versions and machine a record names come from
:mod:`mefbench.env`, the peak memory of a step from :mod:`mefbench.memory`, and SIGTERM is taken
like Ctrl-C, held back while an epoch commits (:mod:`mefbench.interrupts`).

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
point (``MEFBENCH_TEST_PAUSE_AT`` sleeps there instead: ``MEFBENCH_TEST_PAUSE_S`` seconds, or
while the file ``MEFBENCH_TEST_PAUSE_WHILE`` exists), for the tests that kill or signal real
training processes. Points: ``locked``, ``started``, ``mid-epoch``, ``evaluated``,
``checkpoint-tmp-open``, ``checkpoint-tmp-written``, ``after-checkpoint``, ``record-tmp-open``,
``record-tmp-written``, ``after-record``, ``finishing``; EPOCH is the 1-based epoch in progress
(0 outside epochs).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from .checkpoint import TrainingState, load_checkpoint, revision_problem, save_checkpoint
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
from .env import machine, versions
from .interrupts import Interrupted, interrupts_held, sigterm_as_interrupt
from .layers.nets import sync_init_flags
from .linalg import ExpmRecorder, NonFiniteError, record_expm
from .memory import PeakMemory
from .models import MODEL_REVISION, MultiScaleFlow, bits_per_dim, count_parameters
from .outcomes import summarise_losses
from .plateau import PlateauState, plateau_state
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
    RunRecord,
    Stop,
    derive_cells,
    now,
    read_record,
    remove_stale_temporaries,
    write_record,
)

__all__ = ["Interrupted", "batch_order", "compiled_loss", "evaluate", "fixed_subset", "train", "train_step"]


# ----------------------------------------------------------------------------- test hooks


def _test_point(point: str, epoch: int = 0) -> None:
    """MEFBENCH_TEST_KILL_AT / MEFBENCH_TEST_PAUSE_AT = POINT[:EPOCH]: SIGKILL or pause here (for
    MEFBENCH_TEST_PAUSE_S seconds, 600 by default; with MEFBENCH_TEST_PAUSE_WHILE=PATH, until that
    file is removed or those seconds have passed, whichever comes first)."""
    for env in ("MEFBENCH_TEST_KILL_AT", "MEFBENCH_TEST_PAUSE_AT"):
        spec = os.environ.get(env)
        if not spec:
            continue
        name, _, at = spec.partition(":")
        if name == point and (not at or int(at) == epoch):
            if env == "MEFBENCH_TEST_KILL_AT":
                os.kill(os.getpid(), signal.SIGKILL)
            end = time.monotonic() + float(os.environ.get("MEFBENCH_TEST_PAUSE_S", "600"))
            flag = os.environ.get("MEFBENCH_TEST_PAUSE_WHILE")
            while (left := end - time.monotonic()) > 0 and (flag is None or os.path.exists(flag)):
                time.sleep(min(left, 0.1) if flag else left)


# ----------------------------------------------------------------------------- small helpers


def _generator(seed: int, *stream: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, *stream]).generate_state(1)[0]))
    return g


def _memory_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


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
    flow = cast(MultiScaleFlow, model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model)
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
    flow = cast(MultiScaleFlow, model.module if hasattr(model, "module") else model)  # a DDP wrapper's module
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


# ----------------------------------------------------------------------------- the run's parts


@dataclass
class _Data:
    train_images: Tensor
    test_images: Tensor  # what each epoch evaluates: the test split, or a fixed subset of max_test of it
    train_eval: Tensor  # a fixed subset of training images, as many as test images, for the EMA train bits/dim
    flip: bool
    steps_per_epoch: int
    per_rank_batch: int
    test_full: Tensor | None = None  # the whole test split, when test_images is a subset of it
    valid_images: Tensor | None = None  # runs that validate: the validation split (or a fixed subset)


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


def _comparable(cfg: TrainConfig) -> TrainConfig:
    """Training settings that must match to resume (where the data lives may move)."""
    return dataclasses.replace(cfg, data_dir=None)


def _on_rank0(fn: Callable[[], Any], rank: int, device: torch.device, share: Callable[[Any], Any] = lambda r: r) -> Any:
    """fn() on rank 0 (which alone touches the run directory); its failure reaches every rank, and
    the other ranks get share(its result) (so the result's type depends on the rank)."""
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


TEST_SUBSET, VALIDATION_SUBSET = 8, 9  # the generator streams of the two fixed subsets


def fixed_subset(images: Tensor, n: int | None, stream: int = TEST_SUBSET) -> Tensor:
    """The fixed subset of n images that every epoch evaluates: the same for every run and seed (so
    rows and seeds are compared on the same images), drawn at random so that it mixes the
    photographs of its split; all of them when n is None. ``stream``: :data:`TEST_SUBSET` or
    :data:`VALIDATION_SUBSET`."""
    if n is None or n >= len(images):
        return images
    return images[torch.randperm(len(images), generator=_generator(0, stream))[:n]]


def _load_data(model_config: FlowConfig, cfg: TrainConfig, world: int) -> _Data:
    info = DATASETS[cfg.dataset]
    if tuple(model_config.image_shape) != tuple(info.shape):
        raise ValueError(
            f"model image_shape {model_config.image_shape} does not match dataset {cfg.dataset} {info.shape}"
        )
    train_images = load_dataset(cfg.dataset, "train", cfg.data_dir)
    test_full = load_dataset(cfg.dataset, "test", cfg.data_dir)
    test_images = fixed_subset(test_full, cfg.max_test, TEST_SUBSET)
    if len(test_images) == 0:
        raise ValueError(f"{cfg.dataset} has no test images")
    valid_images = None
    if cfg.validate:
        valid_images = fixed_subset(load_dataset(cfg.dataset, "validation", cfg.data_dir), cfg.max_validation,
                                    VALIDATION_SUBSET)  # fmt: skip
        if info.validation_tail:  # the validation split is the training split's tail: never train on it
            train_images = train_images[: -info.validation_tail]
        if len(valid_images) == 0:
            raise ValueError(f"{cfg.dataset} has no validation images")
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
        test_full=test_full if len(test_full) > len(test_images) else None,
        valid_images=valid_images,
    )


# ----------------------------------------------------------------------------- step 3: the model


def _build_state(
    model_config: FlowConfig, cfg: TrainConfig, data: _Data, dev: torch.device, world: int
) -> TrainingState:
    """The model with its data-dependent init (same images on every rank), EMA, optimiser, schedule."""
    torch.manual_seed(cfg.seed)
    model = MultiScaleFlow(model_config).to(dev, torch.float32)  # the flow's maths is single precision
    model.set_amp(cfg.amp)  # only the coupling nets run under autocast
    fmt = _memory_format(cfg.channels_last)
    if cfg.channels_last:
        model = model.to(memory_format=fmt)  # type: ignore[call-overload]  # Module.to takes it; its stubs omit it
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
    return TrainingState(model, ema, optimizer, scheduler, scaler)


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
        versions=versions(),
        machine=machine(dev),
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
    problem = revision_problem(run_dir, record)
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
    world: int, state: TrainingState, meta: dict,
) -> RunRecord:  # fmt: skip
    """Create the run (directory, lock, first record) or recover it, its checkpoint loaded into
    state before the resume entry is recorded (a checkpoint that does not load leaves the record
    as it was); rank 0 only."""
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
        return record
    record, ckpt, rebuilt = _recover(run_dir, model_config, cfg, dev)
    if record.status in ENDED:  # nothing to train: a diverged run is data, never retried
        if rebuilt:
            write_record(run_dir, record)
        return record
    if ckpt is not None:
        state.load(ckpt, run_dir / CHECKPOINT)
    start = len(record.epochs)
    record = dataclasses.replace(
        record, status="running", resumes=[*record.resumes, Resume(from_epoch=start, at=now())], updated_at=now()
    )
    write_record(run_dir, record)
    _test_point("started")
    return record


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
    state: TrainingState,
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
    order = batch_order(g, len(data.train_images), data.steps_per_epoch, cfg.batch_size)
    order = order[:, rank * data.per_rank_batch : (rank + 1) * data.per_rank_batch]
    n, first_step = data.steps_per_epoch, state.step + 1
    fmt = _memory_format(cfg.channels_last)
    memory = PeakMemory(dev, state.model, state.optimizer)
    recorder, losses = ExpmRecorder(), cast(list[float], [])
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
                seen = summarise_losses(losses, first_step)
                return Divergence(epoch=epoch + 1, step=state.step, loss=loss, loss_first=seen.first,
                                  loss_max=seen.max, loss_max_step=seen.max_step)  # fmt: skip
            state.scheduler.step()
            state.ema.update_parameters(state.model)
            losses.append(loss)
            bar.set_postfix(bpd=f"{loss:.3f}")
            if i + 1 == (n + 1) // 2:
                _test_point("mid-epoch", epoch + 1)
    synchronize(dev)
    train_time = time.perf_counter() - t0 - (compile_time or 0.0)
    t1 = time.perf_counter()
    ev: dict[str, Any] = {"batch_size": cfg.eval_batch_size, "device": dev, "channels_last": cfg.channels_last}
    seen = summarise_losses(losses, first_step)
    entry = EpochRecord(
        epoch=epoch + 1,
        step=state.step,
        lr=state.optimizer.param_groups[0]["lr"],
        train_bpd=all_reduce_mean(sum(losses), len(losses), dev),
        train_bpd_ema=evaluate(state.ema_model, data.train_eval, seed=cfg.seed + 1, **ev),
        test_bpd=evaluate(state.ema_model, data.test_images, seed=cfg.seed, **ev),
        test_bpd_raw=evaluate(state.model, data.test_images, seed=cfg.seed, **ev),
        train_time_s=train_time,
        eval_time_s=time.perf_counter() - t1,
        expm=recorder.summary(),
        peak_memory_bytes=memory.bytes,
        peak_memory_method=memory.method,
        valid_bpd=_validate(state, data, cfg, dev),
        loss_first=seen.first,
        loss_max=seen.max,
        loss_max_step=seen.max_step,
        compile_time_s=compile_time,
    )
    entry.eval_time_s = time.perf_counter() - t1
    _test_point("evaluated", epoch + 1)
    return entry


def batch_order(generator: torch.Generator, images: int, steps: int, batch_size: int) -> Tensor:
    """The image indices of an epoch's batches, (steps, batch_size): the first draw of the epoch's
    generator, seeded by (seed, epoch) alone. So runs of one seed see the same images in the same
    order (and, drawn after it from the same generator, the same flips and dequantisation noise)
    whatever their model: the rows of a table are paired by seed."""
    return torch.randperm(images, generator=generator)[: steps * batch_size].reshape(steps, batch_size)


def _validate(state: TrainingState, data: _Data, cfg: TrainConfig, dev: torch.device) -> float | None:
    """The EMA model's bits/dim on the validation images (None for runs that do not validate)."""
    if data.valid_images is None:
        return None
    model = cast(MultiScaleFlow, state.ema.module)
    return evaluate(model, data.valid_images, cfg.eval_batch_size, cfg.seed + 2, dev, channels_last=cfg.channels_last)


def _reached_plateau(record: RunRecord, cfg: TrainConfig) -> bool:
    state = _plateau(record, cfg)
    return state is not None and state.stop


def _plateau(record: RunRecord, cfg: TrainConfig) -> PlateauState | None:
    """The plateau rule's state after the recorded epochs (None without a rule): a function of the
    record alone, so a resumed run stops where an uninterrupted one stops."""
    if cfg.patience is None:
        return None
    return plateau_state([e.valid_bpd for e in record.epochs], cfg.patience, cfg.min_improvement)


# ----------------------------------------------------------------------------- step 6: the commit


def _commit(run_dir: Path, record: RunRecord, state: TrainingState) -> RunRecord:
    """The epoch's commit point: the checkpoint with the record inside, then record.json (rank 0)."""
    epoch = len(record.epochs)
    record = dataclasses.replace(record, updated_at=now())
    state_dict = state.state_dict(epoch, record)
    try:
        save_checkpoint(run_dir / CHECKPOINT, state_dict, hook=lambda p: _test_point(f"checkpoint-{p}", epoch))
        _test_point("after-checkpoint", epoch)
        write_record(run_dir, record, hook=lambda p: _test_point(f"record-{p}", epoch))
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, RunError):
            raise
        raise _WriteFailed(run_dir, epoch, exc) from exc
    _test_point("after-record", epoch)
    return record


class _WriteFailed(RunError):
    """An epoch's commit could not be written (a full disk, most often). Checkpoint and record are
    each replaced atomically, so they still hold the last commit (or the checkpoint is one epoch
    ahead, if only the record write failed): ``--resume`` continues from there."""

    def __init__(self, run_dir: Path, epoch: int, exc: BaseException) -> None:
        # torch.save reports a short write as "unexpected pos …" (a RuntimeError): say what it means
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc).strip().splitlines()[0]
        super().__init__(
            f"{run_dir}: writing the checkpoint and record of epoch {epoch} failed ({type(exc).__name__}: {reason}); "
            "is the disk full? The checkpoint and record.json still hold the last committed epoch, nothing recorded "
            "was lost: free some space, then continue with --resume"
        )


# ----------------------------------------------------------------------------- step 7: finish


@torch.no_grad()
def _measure_trained(state: TrainingState, data: _Data, cfg: TrainConfig, dev: torch.device) -> dict:
    """Sampling time per image and the round-trip error of the trained EMA model (float32).

    A trained model whose inverse fails (a layer that raises, e.g. an iterative inverse that does
    not converge) is data, not a crash: its round-trip error is recorded as inf, the sampling time
    as None, and the reason in ``measure_error``.
    """
    model = state.ema_model
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


def _full_test(state: TrainingState, data: _Data, cfg: TrainConfig, dev: torch.device, record: RunRecord) -> dict:
    """The trained EMA model's bits/dim on the whole test split, or on ``max_final_test`` of it
    (every rank: evaluate reduces); the last epoch's number when the epochs evaluated exactly that."""
    last = record.epochs[-1]
    images = fixed_subset(data.test_full, cfg.max_final_test) if data.test_full is not None else data.test_images
    if len(images) == len(data.test_images):  # the same images: both are a prefix of one fixed shuffle
        return {"test_bpd_full": last.test_bpd, "test_images_full": len(data.test_images)}
    model = cast(MultiScaleFlow, state.ema.module)
    value = evaluate(model, images, cfg.eval_batch_size, cfg.seed, dev, channels_last=cfg.channels_last)
    return {"test_bpd_full": value, "test_images_full": len(images)}


def _stop(record: RunRecord, cfg: TrainConfig) -> Stop:
    """Why the run stopped where it did (the plateau, the cap, or its configured length), and its
    best validation bits/dim (by the plateau rule's measure of improvement, when it has one)."""
    last = record.epochs[-1]
    values = [e.valid_bpd for e in record.epochs]
    rule = plateau_state(values, cfg.patience or 1, cfg.min_improvement if cfg.patience else 0.0)
    reason = "length" if cfg.patience is None else "plateau" if rule.stop else "cap"
    found = rule.best_epoch > 0
    return Stop(reason=reason, epoch=last.epoch, step=last.step, best_epoch=rule.best_epoch if found else None,
                best_valid_bpd=rule.best if found else None)  # fmt: skip


def _finish(
    run_dir: Path, record: RunRecord, state: TrainingState, data: _Data, cfg: TrainConfig, dev: torch.device, full: dict
) -> RunRecord:
    """Measure the trained model, mark the run finished and write the record (rank 0)."""
    _test_point("finishing", len(record.epochs))
    final = FinalMetrics.from_epochs(record.epochs, **_measure_trained(state, data, cfg, dev), **full)
    record = dataclasses.replace(record, status="finished", final=final, stop=_stop(record, cfg), updated_at=now())
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
    interrupt_signals: tuple[int, ...] = (),
) -> RunRecord:
    """Train (or resume) one run in run_dir and return its record.

    ``tables`` are the ids of the tables the run fills and ``cells`` the cell it fills in each
    (derived from the presets when None). The run directory is created only once the data and
    the model are ready, so a data or model error leaves nothing behind; it is locked while the
    run trains (a second process gets a :class:`RunLockedError` naming the first). Under
    torchrun the run is data-parallel (DistributedDataParallel); only rank 0 writes.
    ``stop_after_epochs`` ends the call early with status "interrupted" (as a kill would), for
    tests and time-sliced sweeps; ``resume=True`` continues from the last committed epoch.

    SIGTERM and Ctrl-C while epochs train mark the run interrupted and raise KeyboardInterrupt
    (:class:`Interrupted` for a signal):
    the epoch in flight is discarded, an epoch being committed is kept (the interrupt waits for
    the commit). ``interrupt_signals`` are more signals that do the same (a scheduler's warning
    signal before a preemption or the time limit: :mod:`mefbench.cluster`).
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
        # rank 0 loads the checkpoint into state while it opens the run; the other ranks read it themselves
        record = _on_rank0(
            lambda: _open_run(run_dir, resume, lock, model_config, cfg, dev, world, state, meta), rank, dev
        )
        if record.status in ENDED:
            return record
        if rank != 0 and record.epochs:
            state.load(load_checkpoint(run_dir / CHECKPOINT, map_location=dev), run_dir / CHECKPOINT)
        if data.valid_images is not None and not record.epochs and record.initial_valid_bpd is None:
            # the untrained model (the EMA copy is the model before any step), recorded at the first commit
            record = dataclasses.replace(record, initial_valid_bpd=_validate(state, data, cfg, dev))
        return _train_epochs(
            run_dir, record, state, data, cfg, dev, rank, world, progress, stop_after_epochs, interrupt_signals
        )
    finally:
        lock.release()


def _train_epochs(
    run_dir: Path, record: RunRecord, state: TrainingState, data: _Data, cfg: TrainConfig, dev: torch.device,
    rank: int, world: int, progress: bool, stop_after_epochs: int | None, interrupt_signals: tuple[int, ...] = (),
) -> RunRecord:  # fmt: skip
    """Epochs from the last committed one to the end, the cap or the plateau (or to
    stop_after_epochs), then finish."""

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
    with sigterm_as_interrupt(interrupt_signals):
        try:
            for epoch in range(start, end):
                if _reached_plateau(record, cfg):
                    break
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
                evaluated = [v for v in (result.test_bpd, result.valid_bpd) if v is not None]
                if not all(math.isfinite(v) for v in evaluated):
                    bad = next(v for v in evaluated if not math.isfinite(v))
                    diverged = Divergence(epoch=result.epoch, step=result.step, loss=bad)
                    changed = dataclasses.replace(changed, status="diverged", diverged=diverged)
                # only the committed record is ever written again (an interrupt writes `record`)
                with interrupts_held():
                    record = _commit(run_dir, changed, state) if rank == 0 else changed
                if record.status == "diverged":
                    return record
            if len(record.epochs) >= cfg.epochs or _reached_plateau(record, cfg):
                full = _full_test(state, data, cfg, dev, record)
                if rank == 0:
                    record = _finish(run_dir, record, state, data, cfg, dev, full)
                all_ranks_ok(True, dev)  # the other ranks wait for rank 0's measurements
                return record
            return save(dataclasses.replace(record, status="interrupted"))
        except KeyboardInterrupt:
            save(dataclasses.replace(record, status="interrupted"))
            raise
        except _WriteFailed:
            try:  # the run is not running any more; on a full disk even this small write may fail
                save(dataclasses.replace(record, status="interrupted"))
            except (OSError, RuntimeError):
                pass
            raise

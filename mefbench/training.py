"""Training and evaluation with the paper's recipe (DESIGN.md §3), runs that are never lost.

A run lives in one directory:
  record.json     the run's record (written atomically after every epoch and at every end)
  checkpoint.pt   model, EMA, optimiser, scheduler and RNG states after the last finished epoch

Record (JSON) fields: ``schema``, ``name``, ``preset``, ``tables``, ``scale``, ``status``
("running", "finished", "diverged", "interrupted"), ``model`` (FlowConfig), ``train``
(TrainConfig), ``seed``, ``device``, ``world_size``, ``versions``, ``machine``, ``num_params``,
``epochs`` (one dict per finished epoch: epoch, step, lr, train_bpd, train_bpd_ema, test_bpd
(EMA weights), test_bpd_raw, train_time_s, eval_time_s, expm: {"m": stats, "s": stats}),
``final`` (the last epoch's numbers, total train time, the run's pooled expm statistics),
``diverged`` (null or {"epoch", "step", "loss"}), ``resumes`` (list of {"from_epoch", "at"}),
``command``, ``started_at``, ``updated_at``.

Determinism: shuffling, flips, dequantisation noise and the init batch come from generators
seeded by (seed, epoch), so ``--resume`` from the last checkpoint gives the same result as an
uninterrupted run.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import signal
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm.auto import tqdm

from . import __version__
from .config import TrainConfig
from .data import DATASETS, dequantize, load_dataset, random_hflip
from .linalg import ExpmRecorder, NonFiniteError, record_expm
from .models import FlowConfig, MultiScaleFlow, bits_per_dim, count_parameters

__all__ = [
    "RECORD",
    "CHECKPOINT",
    "RunError",
    "TrainConfig",
    "evaluate",
    "load_checkpoint",
    "load_model",
    "pool_stats",
    "read_record",
    "train",
    "train_step",
    "write_json_atomic",
]

RECORD = "record.json"
CHECKPOINT = "checkpoint.pt"
SCHEMA = 1


class RunError(RuntimeError):
    """A run directory that cannot be used as asked (exists already, corrupt, mismatched)."""


# ----------------------------------------------------------------------------- small helpers


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _replace_atomic(path: Path, write) -> None:
    """write(tmp) to a temporary file beside path, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def write_json_atomic(path: Path, data: dict) -> None:
    _replace_atomic(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, allow_nan=True)))


def read_record(run_dir: str | Path) -> dict:
    path = Path(run_dir) / RECORD
    if not path.exists():
        raise RunError(f"no {RECORD} in {run_dir}: not a mefbench run directory")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RunError(f"corrupt run record {path}: {exc}") from exc


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load a checkpoint with weights_only=True; a corrupt file gets an error naming it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise RunError(f"corrupt or unreadable checkpoint {path}: {exc}") from exc


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


def pool_stats(parts: list[dict]) -> dict:
    """Pool {count, mean, std, max, min} summaries (population std) into one."""
    parts = [p for p in parts if p and p.get("count")]
    if not parts:
        return {}
    n = sum(p["count"] for p in parts)
    mean = sum(p["count"] * p["mean"] for p in parts) / n
    second = sum(p["count"] * (p["std"] ** 2 + p["mean"] ** 2) for p in parts) / n
    return {
        "count": n,
        "mean": mean,
        "std": math.sqrt(max(second - mean**2, 0.0)),
        "max": max(p["max"] for p in parts),
        "min": min(p["min"] for p in parts),
    }


def _generator(seed: int, *stream: int) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, *stream]).generate_state(1)[0]))
    return g


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RunError("--device cuda was asked for, but torch sees no CUDA device")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


# ----------------------------------------------------------------------------- the steps


def _loss(model: nn.Module, x: Tensor, dims: int) -> Tensor:
    """Mean bits/dim of a dequantised batch (the call goes through a DDP wrapper if there is one)."""
    _, logdet, logp = model(x)
    return bits_per_dim(logp + logdet, dims).mean()


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    x: Tensor,
    grad_clip: float | None = None,
) -> float:
    """One optimiser step on a dequantised batch; returns the loss (bits/dim, possibly non-finite).

    A non-finite loss is returned before any parameter is touched.
    """
    flow = model.module if hasattr(model, "module") else model
    optimizer.zero_grad(set_to_none=True)
    loss = _loss(model, x, flow.config.dims)
    value = float(loss.detach())
    if not math.isfinite(value):
        return value
    loss.backward()
    if grad_clip is not None:
        nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    return value


@torch.no_grad()
def evaluate(
    model: MultiScaleFlow,
    images: Tensor,
    batch_size: int = 256,
    seed: int = 1234,
    device: torch.device | str = "cpu",
) -> float:
    """Mean test bits/dim over uint8 images, one dequantisation sample per image (fixed seed)."""
    was_training = model.training
    model.eval()
    rank, world = _rank_world()
    images = images[rank::world]  # each rank its share; the sums are reduced below
    g = _generator(seed, 7, rank)
    total, count = 0.0, 0
    for start in range(0, len(images), batch_size):
        batch = dequantize(images[start : start + batch_size], generator=g).to(device)
        total += float(model.bits_per_dim(batch).double().sum())
        count += len(batch)
    model.train(was_training)
    return _all_reduce_mean(total, count, device)


def _all_reduce_mean(total: float, count: int, device: torch.device | str) -> float:
    if dist.is_available() and dist.is_initialized():
        t = torch.tensor([total, float(count)], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, count = float(t[0]), int(t[1])
    return total / max(count, 1)


# ----------------------------------------------------------------------------- the run


@contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Treat SIGTERM (schedulers, `kill`) like Ctrl-C, so the record is marked interrupted."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _init_distributed(device_name: str) -> tuple[int, int, int]:
    """Join the process group that torchrun describes in the environment (if any)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or dist.is_initialized():
        rank, world = _rank_world()
        return rank, world, int(os.environ.get("LOCAL_RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = device_name != "cpu" and torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), local_rank


def train(
    model_config: FlowConfig,
    train_config: TrainConfig,
    run_dir: str | Path,
    *,
    resume: bool = False,
    device: str = "auto",
    preset: str | None = None,
    tables: tuple[int, ...] = (),
    scale: str | None = None,
    progress: bool = True,
    stop_after_epochs: int | None = None,
) -> dict:
    """Train (or resume) one run in run_dir and return its record.

    Under torchrun the run is data-parallel (DistributedDataParallel); only rank 0 writes.
    ``stop_after_epochs`` ends the call early with status "interrupted" (as a kill would), for
    tests and time-sliced sweeps; ``resume=True`` continues from the last checkpoint.
    """
    run_dir = Path(run_dir)
    rank, world, local_rank = _init_distributed(device)
    dev = resolve_device(device, local_rank)
    cfg = train_config
    record_path, ckpt_path = run_dir / RECORD, run_dir / CHECKPOINT

    # ----- the run directory: never overwrite what is recorded
    previous: dict | None = None
    if record_path.exists():
        previous = read_record(run_dir)
        if not resume:
            raise RunError(
                f"{run_dir} already holds a run (status {previous.get('status')!r}); "
                "pass --resume to continue it or choose another --out"
            )
        try:
            same = FlowConfig.from_dict(previous["model"]) == model_config and _comparable(
                TrainConfig.from_dict(previous["train"])
            ) == _comparable(cfg)
        except (KeyError, TypeError, ValueError) as exc:
            raise RunError(f"corrupt run record {record_path}: {exc}") from exc
        if not same:
            raise RunError(f"{run_dir} holds a run with a different configuration; choose another --out")
        if previous.get("status") in ("finished", "diverged"):
            return previous
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)

    # ----- data
    info = DATASETS[cfg.dataset]
    if tuple(model_config.image_shape) != tuple(info.shape):
        raise ValueError(f"model image_shape {model_config.image_shape} does not match dataset {cfg.dataset} {info.shape}")
    train_images = load_dataset(cfg.dataset, "train", cfg.data_dir)
    test_images = load_dataset(cfg.dataset, "test", cfg.data_dir)
    if cfg.max_test is not None:
        test_images = test_images[: cfg.max_test]
    flip = info.flip if cfg.flip is None else cfg.flip
    per_rank_batch = max(1, cfg.batch_size // world)
    steps_per_epoch = len(train_images) // cfg.batch_size
    if cfg.max_train_batches is not None:
        steps_per_epoch = min(steps_per_epoch, cfg.max_train_batches)
    if steps_per_epoch < 1:
        raise ValueError(f"{cfg.dataset} has {len(train_images)} train images, fewer than one batch of {cfg.batch_size}")
    # a fixed subset of training images, as many as test images, for the EMA train bits/dim
    train_eval = train_images[torch.randperm(len(train_images), generator=_generator(cfg.seed, 3))[: len(test_images)]]

    # ----- model, data-dependent init on the same images on every rank
    torch.manual_seed(cfg.seed)
    model = MultiScaleFlow(model_config).to(dev, torch.float32)  # training is single precision
    init_idx = torch.randperm(len(train_images), generator=_generator(cfg.seed, 1))[: cfg.init_batch]
    init_x = dequantize(train_images[init_idx], generator=_generator(cfg.seed, 2)).to(dev)
    if world > 1:
        _check_same_on_all_ranks(init_x, dev)
    model.initialize(init_x)
    del init_x
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay))
    optimizer = torch.optim.Adamax(model.parameters(), lr=cfg.lr)
    scheduler = _schedule(optimizer, cfg, steps_per_epoch)

    start_epoch, step = 0, 0
    record = _new_record(model_config, cfg, run_dir, dev, world, model, preset, tables, scale)
    if previous is not None:
        record = previous
        record["status"] = "running"
        if ckpt_path.exists():
            ckpt = load_checkpoint(ckpt_path, map_location=dev)
            model.load_state_dict(ckpt["model"])
            ema.load_state_dict(ckpt["ema"])
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            start_epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
            record["epochs"] = record["epochs"][:start_epoch]
        else:
            record["epochs"] = []
        record.setdefault("resumes", []).append({"from_epoch": start_epoch, "at": _now()})

    def save_record(**changes) -> None:
        """Update the record, stamp it and (on rank 0) write it atomically."""
        record.update(changes, updated_at=_now())
        if rank == 0:
            write_json_atomic(record_path, record)

    save_record()

    ddp_model: nn.Module = model
    if world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)

    end_epoch = cfg.epochs if stop_after_epochs is None else min(cfg.epochs, start_epoch + stop_after_epochs)
    with _sigterm_as_interrupt():
        try:
            for epoch in range(start_epoch, end_epoch):
                g = _generator(cfg.seed, 100, epoch)
                order = torch.randperm(len(train_images), generator=g)[: steps_per_epoch * cfg.batch_size]
                order = order.reshape(steps_per_epoch, cfg.batch_size)[:, rank * per_rank_batch : (rank + 1) * per_rank_batch]
                recorder = ExpmRecorder()
                losses = []
                model.train()
                bar = tqdm(order, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not progress or rank != 0, leave=False)
                t0 = time.perf_counter()
                with record_expm(recorder):
                    for idx in bar:
                        batch = train_images[idx]
                        if flip:
                            batch = random_hflip(batch, generator=g)
                        x = dequantize(batch, generator=g).to(dev, non_blocking=True)
                        try:
                            loss = train_step(ddp_model, optimizer, x, cfg.grad_clip)
                        except NonFiniteError:
                            loss = float("nan")
                        step += 1
                        if not math.isfinite(loss):
                            save_record(status="diverged", diverged={"epoch": epoch + 1, "step": step, "loss": loss})
                            if progress and rank == 0:
                                print(f"run diverged at step {step} (epoch {epoch + 1}): loss {loss}", file=sys.stderr)
                            return record
                        scheduler.step()
                        ema.update_parameters(model)
                        losses.append(loss)
                        bar.set_postfix(bpd=f"{loss:.3f}")
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                train_time = time.perf_counter() - t0
                t1 = time.perf_counter()
                entry = {
                    "epoch": epoch + 1,
                    "step": step,
                    "lr": optimizer.param_groups[0]["lr"],
                    "train_bpd": _all_reduce_mean(sum(losses), len(losses), dev),
                    "train_bpd_ema": evaluate(ema.module, train_eval, cfg.eval_batch_size, cfg.seed + 1, dev),
                    "test_bpd": evaluate(ema.module, test_images, cfg.eval_batch_size, cfg.seed, dev),
                    "test_bpd_raw": evaluate(model, test_images, cfg.eval_batch_size, cfg.seed, dev),
                    "train_time_s": train_time,
                    "eval_time_s": time.perf_counter() - t1,
                    "expm": recorder.summary(),
                }
                if not math.isfinite(entry["test_bpd"]):
                    record["status"] = "diverged"
                    record["diverged"] = {"epoch": epoch + 1, "step": step, "loss": entry["test_bpd"]}
                record["epochs"].append(entry)
                if rank == 0:
                    state = {
                        "model": model.state_dict(),
                        "ema": ema.state_dict(),
                        "optimizer": optimizer.state_dict(),
                        "scheduler": scheduler.state_dict(),
                        "epoch": epoch + 1,
                        "step": step,
                    }
                    _replace_atomic(ckpt_path, lambda tmp: torch.save(state, tmp))
                save_record(final=_final(record))
                if record["status"] == "diverged":
                    return record
        except KeyboardInterrupt:
            save_record(status="interrupted")
            raise
    save_record(status="finished" if len(record["epochs"]) >= cfg.epochs else "interrupted")
    return record


def _comparable(cfg: TrainConfig) -> TrainConfig:
    """Training settings that must match to resume (where the data lives may move)."""
    return dataclasses.replace(cfg, data_dir=None)


def _check_same_on_all_ranks(x: Tensor, device: torch.device) -> None:
    digest = torch.tensor([float(x.double().sum()), float((x.double() ** 2).sum())], dtype=torch.float64, device=device)
    gathered = [torch.empty_like(digest) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, digest)
    if any(not torch.equal(g, digest) for g in gathered):
        raise RunError("the data-dependent init batch differs between ranks; check that every rank sees the same data")


def _new_record(model_config, cfg, run_dir, dev, world, model, preset, tables, scale) -> dict:
    return {
        "schema": SCHEMA,
        "name": Path(run_dir).name,
        "preset": preset,
        "tables": list(tables),
        "scale": scale,
        "status": "running",
        "model": model_config.to_dict(),
        "train": cfg.to_dict(),
        "seed": cfg.seed,
        "device": str(dev),
        "world_size": world,
        "versions": _versions(),
        "machine": _machine(dev),
        "num_params": count_parameters(model),
        "epochs": [],
        "final": {},
        "diverged": None,
        "resumes": [],
        "command": sys.argv,
        "started_at": _now(),
        "updated_at": _now(),
    }


def _final(record: dict) -> dict:
    epochs = record["epochs"]
    last = epochs[-1]
    return {
        "epochs_done": len(epochs),
        "step": last["step"],
        "test_bpd": last["test_bpd"],
        "test_bpd_raw": last["test_bpd_raw"],
        "train_bpd": last["train_bpd"],
        "train_bpd_ema": last["train_bpd_ema"],
        "train_time_s": sum(e["train_time_s"] for e in epochs),
        "mean_epoch_time_s": sum(e["train_time_s"] for e in epochs) / len(epochs),
        "expm": {k: pool_stats([e["expm"].get(k, {}) for e in epochs]) for k in ("m", "s")},
    }


# ----------------------------------------------------------------------------- loading a run


def load_model(run_dir: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> MultiScaleFlow:
    """The trained model of a run (EMA weights by default), in eval mode."""
    record = read_record(run_dir)
    ckpt_path = Path(run_dir) / CHECKPOINT
    if not ckpt_path.exists():
        raise RunError(f"{run_dir} has no {CHECKPOINT}: the run finished no epoch")
    model = MultiScaleFlow(FlowConfig.from_dict(record["model"])).float()
    ckpt = load_checkpoint(ckpt_path)
    if ema:
        state = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    else:
        state = ckpt["model"]
    model.load_state_dict(state)
    return model.to(device).eval()

"""The device check's parts: what each one measures, run inside the part's own process.

The runner (:mod:`mefbench.gpu_check.runner`) starts ``python3 -m mefbench.gpu_check --child PART``
for each part; that process calls :func:`run_child`, which runs the part's function from
:data:`PART_FUNCTIONS` with a :class:`Part` that writes the part's results to a JSON file after
every item, so that whatever finished before a time-out is kept. A new part is one function
``fn(part: Part) -> None`` and one line in :data:`PART_FUNCTIONS`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import FlowConfig, TrainConfig
from ..distributed import synchronize
from ..layers import perturb_output
from ..presets import GLOW_LIKE, PAPER_MEF, PRESETS
from ..record import EpochRecord, RunRecord, read_record, write_json_atomic
from ..stats import as_float

__all__ = [
    "HEAD_STD",
    "PARTS",
    "PART_FUNCTIONS",
    "PRECISIONS",
    "Part",
    "Sizes",
    "away_from_identity",
    "check_row",
    "error_row",
    "measure_train_step",
    "run_child",
    "step_models",
]

PRECISIONS: dict[str, str | None] = {"float32": None, "bf16": "bf16"}
RESUME_TOL = {"cpu": 0.0, "cuda": 1e-3}  # bits/dim; CUDA kernels need not be bitwise deterministic
DDP_GRAD_TOL = 1e-3  # relative difference of DDP's averaged gradient from one process's
ROUND_TRIP_TOL = 1e-3


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
        from ..bench import PARTS as BENCH_PARTS

        model, recipe = PRESETS[PAPER_MEF].configs()
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
        model, recipe = PRESETS[PAPER_MEF].configs()
        small: dict[str, Any] = {"hidden_channels": 8, "num_blocks": 1}
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
    return {"MEF": mef, f"Glow-like ({glow.mixing} conv + {glow.coupling})": glow}


# ----------------------------------------------------------------------------- rows


def error_row(part: str | None, item: str | None, exc: BaseException) -> dict:
    """An entry of the JSON's ``errors``: where, what, and the end of the traceback."""
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return {"part": part, "item": item, "error": f"{type(exc).__name__}: {exc}", "traceback": tb[-2000:]}


def check_row(check: str, value: object, ok: bool | None, note: str = "") -> dict:
    """A row of the ``epoch_check`` and ``ddp`` sections."""
    return {"check": check, "value": value, "ok": ok, "note": note}


def _finite(value: object) -> bool:
    return math.isfinite(as_float(value))


def _mb(n_bytes: float) -> float:
    return round(n_bytes / 2**20, 1)


def _sig(x: float, digits: int = 4) -> float:
    """A timing to the digits it is worth (bits/dim and differences keep every digit)."""
    return float(f"{x:.{digits}g}")


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape))


# ----------------------------------------------------------------------------- inside a part's process


class Part:
    """What one part's process records: its section and its errors, saved after every item."""

    def __init__(self, name: str, result: Path, device: torch.device, sizes: Sizes, workdir: Path, out: Path) -> None:
        self.name, self.result, self.device, self.sizes = name, result, device, sizes
        self.workdir, self.out = workdir, out
        self.section: list[dict] | dict | None = [] if name != "bench" else None
        self.errors: list[dict] = []
        self.save()

    def save(self) -> None:
        write_json_atomic(self.result, {"section": self.section, "errors": self.errors})

    def put(self, section: dict) -> None:
        self.section = section
        self.save()

    def add(self, row: dict) -> None:
        if not isinstance(self.section, list):
            raise TypeError(f"part {self.name!r} records one section, not rows")
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
            self.errors.append(error_row(self.name, name, exc))
            self.save()
            print(f"{name} FAILED: {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc()


def _bench(part: Part) -> None:
    """``mefbench bench`` one part at a time (each row synchronised on CUDA), as ``--json`` writes it."""
    from ..bench import bench_json, run_bench

    sizes, device = part.sizes, str(part.device)
    rows: list = []
    done: list[dict] = []
    for name in sizes.bench_parts:
        with part.item(name):
            t0 = time.perf_counter()
            found = run_bench(quick=sizes.bench_quick, threads=sizes.bench_threads, only=(name,), device=device)
            rows += found
            done.append({"part": name, "rows": len(found), "wall_s": round(time.perf_counter() - t0, 1)})
            only = tuple(p["part"] for p in done)
            part.put({**bench_json(rows, sizes.bench_quick, sizes.bench_threads, only, device), "parts": done})


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
    return perturb_output(model, HEAD_STD, torch.Generator().manual_seed(seed))


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
    from ..linalg import ExpmRecorder, record_expm
    from ..memory import PeakMemory
    from ..models import MultiScaleFlow, count_parameters
    from ..training import train_step

    torch.manual_seed(0)
    model = MultiScaleFlow(config).to(device).set_amp(amp)
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(batch, *config.image_shape, generator=g) * 2 - 1).to(device)
    model.initialize(x)
    away_from_identity(model)
    optimizer = torch.optim.Adamax(model.parameters(), lr=STEP_LR)
    cuda = device.type == "cuda"
    memory = PeakMemory(device, model, optimizer)
    recorder = ExpmRecorder()
    with memory.measure() if cuda else nullcontext():  # on the CPU it would slow the timed steps
        losses = [train_step(model, optimizer, x) for _ in range(warmup)]
        synchronize(device)
        t0 = time.perf_counter()
        with record_expm(recorder):
            losses += [train_step(model, optimizer, x) for _ in range(timed)]
        synchronize(device)
        elapsed = time.perf_counter() - t0
    peak = _mb(memory.bytes) if memory.bytes is not None else None
    finite = all(math.isfinite(v) for v in losses)
    m = recorder.summary().get("m", {})
    row = {
        "mixing": config.mixing, "coupling": config.coupling, "precision": amp or "float32", "batch": batch,
        "image_shape": _shape(config.image_shape), "hidden": config.hidden_channels, "blocks": config.num_blocks,
        "steps": ",".join(map(str, config.steps)), "params": count_parameters(model), "warmup_steps": warmup,
        "timed_steps": timed, "step_ms": _sig(1e3 * elapsed / timed) if finite else None,
        "images_per_s": _sig(timed * batch / elapsed) if finite else None,
        "peak_memory_mb": peak, "memory_source": memory.method if peak is not None else None,
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


def _epoch_rows(label: str, record: RunRecord) -> list[dict]:
    rows = []
    batch = record.train["batch_size"]
    steps_before = 0
    for e in record.epochs:
        n = e.epoch
        for key, what in (("train_bpd", "train bits/dim"), ("train_bpd_ema", "EMA train bits/dim"),
                          ("test_bpd", "EMA test bits/dim"), ("test_bpd_raw", "raw test bits/dim")):  # fmt: skip
            value = getattr(e, key)
            rows.append(check_row(f"{label}, epoch {n}: {what}", value, _finite(value)))
        m, s = e.expm.get("m", {}), e.expm.get("s", {})
        rows.append(check_row(
            f"{label}, epoch {n}: expm series length m (mean)", m.get("mean"),
            bool(m.get("count")) and _finite(m.get("mean")),
            (f"{m.get('count')} calls; m std {m.get('std', math.nan):.2f}, max {m.get('max')}, min {m.get('min')}; "
             f"squarings s mean {s.get('mean', math.nan):.2f}, max {s.get('max')}") if m else "no expm call recorded",
        ))  # fmt: skip
        steps = e.step - steps_before
        steps_before = e.step
        rate = _sig(steps * batch / e.train_time_s) if e.train_time_s > 0 else math.nan
        rows.append(check_row(f"{label}, epoch {n}: train() images/s", rate, _finite(rate),
                              f"{steps} steps of batch {batch} in {e.train_time_s:.2f} s (evaluation {e.eval_time_s:.2f} s)"))  # fmt: skip
    return rows


def _compare_epochs(a: RunRecord, b: RunRecord, tol: float) -> list[dict]:
    """Resumed against uninterrupted, epoch by epoch: the largest difference of the recorded
    bits/dim (and of the mean series length)."""

    def m_mean(e: EpochRecord) -> float:
        return e.expm.get("m", {}).get("mean", 0.0)

    rows = []
    for ea, eb in zip(a.epochs, b.epochs, strict=True):
        diffs = {
            k: abs(getattr(ea, k) - getattr(eb, k)) for k in ("train_bpd", "train_bpd_ema", "test_bpd", "test_bpd_raw")
        }
        dm = abs(m_mean(ea) - m_mean(eb))
        worst = max(diffs.values())
        kind = "both fresh: differences are the device's nondeterminism" if ea.epoch == 1 else "after the resume"
        rows.append(check_row(
            f"resume: epoch {ea.epoch} max |Δ bits/dim| vs uninterrupted", worst, worst <= tol,
            f"{kind}; " + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items()) + f", expm m mean {dm:.3g}; "
            + ("exact" if worst == 0 and dm == 0 else f"tolerance {tol:g}") + f"; step {ea.step} vs {eb.step}",
        ))  # fmt: skip
    return rows


def _epoch_check(part: Part) -> None:
    """The paper preset's model through train() on patches32: run through, then stop + resume."""
    from ..checkpoint import load_checkpoint, load_model
    from ..data import load_dataset
    from ..memory import PeakMemory
    from ..models import bits_per_dim
    from ..record import CHECKPOINT
    from ..training import evaluate, fixed_subset, train

    model_cfg, train_cfg, dev = part.sizes.epoch_model, part.sizes.epoch_train, part.device
    runs = part.workdir / "epoch_check"
    through, resumed = runs / "uninterrupted", runs / "resumed"
    cuda = dev.type == "cuda"
    records: dict[str, RunRecord] = {}

    def run(run_dir: Path, **kwargs) -> tuple[RunRecord, float, float | None]:
        memory = PeakMemory(dev)
        t0 = time.perf_counter()
        with memory.measure() if cuda else nullcontext():
            train(model_cfg, train_cfg, run_dir, device=str(dev), progress=False, **kwargs)
        wall = time.perf_counter() - t0
        return read_record(run_dir), wall, _mb(memory.bytes) if memory.bytes is not None else None

    with part.item("uninterrupted run"):
        rec, wall, peak = run(through)
        records["uninterrupted"] = rec
        done = len(rec.epochs)
        part.add(check_row("uninterrupted run: epochs finished", done, rec.status == "finished" and done == train_cfg.epochs,
                           f"status {rec.status}, device {rec.device}, {rec.num_params} parameters, "
                           f"{rec.epochs[-1].step if done else 0} steps of batch {train_cfg.batch_size} on "
                           f"{train_cfg.dataset}, {wall:.1f} s in train()"))  # fmt: skip
        if peak is not None:
            part.add(check_row("uninterrupted run: peak memory in train() (MB)", peak, _finite(peak),
                               "torch.cuda.max_memory_allocated"))  # fmt: skip
        for row in _epoch_rows("uninterrupted", rec):
            part.add(row)

    with part.item("checkpoint"):
        path = through / CHECKPOINT
        state = load_checkpoint(path, map_location="cpu")
        part.add(check_row("checkpoint: load_checkpoint (MB on disk)", _mb(path.stat().st_size), "model" in state,
                           "keys " + ", ".join(sorted(state)) + f"; epoch {state.get('epoch')}"))  # fmt: skip
        del state
        model = load_model(through, device=dev)
        g = torch.Generator().manual_seed(0)
        x = (torch.rand(16, *model_cfg.image_shape, generator=g) * 2 - 1).to(dev)
        with torch.no_grad():
            zs, logdet, logp = model(x)
            bpd = float(bits_per_dim(logp + logdet, model_cfg.dims).mean())
            err = float((model.inverse(zs) - x).abs().max())
        part.add(check_row("checkpoint: load_model (EMA) bits/dim of 16 uniform images", bpd, _finite(bpd),
                           f"eval mode on {dev}"))  # fmt: skip
        part.add(check_row("checkpoint: round trip max |x − f⁻¹(f(x))|", err, err <= ROUND_TRIP_TOL,
                           f"float32, tolerance {ROUND_TRIP_TOL:g}"))  # fmt: skip
        del model

    with part.item("checkpoint against the record"):
        # the EMA weights evaluated as train() evaluates them (same images, batch, seed) repeat the
        # recorded EMA test bits/dim
        model = load_model(through, device=dev)
        images = fixed_subset(load_dataset(train_cfg.dataset, "test", train_cfg.data_dir), train_cfg.max_test)
        again = evaluate(model, images, train_cfg.eval_batch_size, train_cfg.seed, dev)
        recorded = records["uninterrupted"].epochs[-1].test_bpd
        diff = abs(again - recorded)
        part.add(check_row("checkpoint: EMA test bits/dim again vs recorded (|Δ|)", diff, diff <= RESUME_TOL[dev.type] + 1e-6,
                           f"{again:.6f} now, {recorded:.6f} recorded, {len(images)} test images"))  # fmt: skip
        del model

    with part.item("stopped after one epoch"):
        rec, wall, _ = run(resumed, stop_after_epochs=1)
        part.add(check_row("stop_after_epochs=1: epochs finished", len(rec.epochs),
                           rec.status == "interrupted" and len(rec.epochs) == 1, f"status {rec.status}, {wall:.1f} s"))  # fmt: skip

    with part.item("resumed"):
        rec, wall, _ = run(resumed, resume=True)
        records["resumed"] = rec
        resumes = [r.from_epoch for r in rec.resumes]
        part.add(check_row("resume=True: epochs finished", len(rec.epochs),
                           rec.status == "finished" and len(rec.epochs) == train_cfg.epochs and len(resumes) == 1,
                           f"status {rec.status}, resumed from epoch {resumes}, {wall:.1f} s"))  # fmt: skip
        if "uninterrupted" in records:
            for row in _compare_epochs(records["uninterrupted"], rec, RESUME_TOL[dev.type]):
                part.add(row)

    # the two records come back with the JSON (small; the checkpoints stay behind)
    with part.item("copy the records"):
        (part.out / "records").mkdir(parents=True, exist_ok=True)
        for name, rec in records.items():
            write_json_atomic(part.out / "records" / f"{name}.json", rec.to_dict())


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

    from ..distributed import init_distributed, resolve_device
    from ..models import MultiScaleFlow, bits_per_dim
    from ..training import train, train_step

    # the environment torchrun would set; init_distributed joins the group it describes
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    cuda = device_type == "cuda"
    if not cuda:
        torch.set_num_threads(1)
    init_distributed(device_type)
    dev = resolve_device(device_type, rank)
    rows: list[dict] = []

    def add(row: dict) -> None:
        rows.append(row)
        if rank == 0:
            write_json_atomic(Path(result), {"rows": rows})

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
            if p.grad is not None and q.grad is not None
        ]
        num = sum(float(((a - b).double() ** 2).sum()) for a, b in pairs)
        den = sum(float((b.double() ** 2).sum()) for _, b in pairs)
        rel = math.sqrt(num / den) if den > 0 else math.nan
        add(check_row(f"DDP gradient (batch {batch} over {world} processes) vs one process on the whole batch", rel,
                      rel <= DDP_GRAD_TOL, f"relative L2 difference over {len(pairs)} tensors; tolerance {DDP_GRAD_TOL:g}"))  # fmt: skip
        del reference
        optimizer = torch.optim.Adamax(model.parameters(), lr=STEP_LR)  # as measure_train_step
        for _ in range(2):
            train_step(ddp, optimizer, local)
        synchronize(dev)
        t0 = time.perf_counter()
        for _ in range(sizes.ddp_steps):
            train_step(ddp, optimizer, local)
        synchronize(dev)
        rate = _sig(sizes.ddp_steps * batch / (time.perf_counter() - t0))
        add(check_row(f"DDP training step: images/s over {world} processes", rate, _finite(rate),
                      f"{sizes.ddp_steps} timed steps after 2, global batch {batch}, {_shape(cfg.image_shape)}, "
                      f"hidden {cfg.hidden_channels}, {cfg.num_blocks} blocks, {'NCCL' if cuda else 'gloo'}"))  # fmt: skip
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        spread = max(float((t - flat).abs().max()) for t in gathered)
        add(check_row("DDP: parameters identical on every rank after the steps (max |Δ|)", spread, spread == 0.0))
        del ddp, model, optimizer
        t0 = time.perf_counter()
        train(sizes.epoch_model, sizes.ddp_train, run_dir, device=device_type, progress=False)
        dist.barrier()
        if rank == 0:
            rec = read_record(run_dir)
            test = rec.epochs[-1].test_bpd if rec.epochs else math.nan
            add(check_row(f"train() under {world} processes: EMA test bits/dim", test,
                          rec.status == "finished" and rec.world_size == world and _finite(test),
                          f"status {rec.status}, world_size {rec.world_size}, device {rec.device}, "
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


# The parts in the order the check runs them; a new part is one line here.
PART_FUNCTIONS: dict[str, Callable[[Part], None]] = {
    "bench": _bench,
    "train_step": _train_step,
    "epoch_check": _epoch_check,
    "ddp": _ddp,
}
PARTS = tuple(PART_FUNCTIONS)


def run_child(
    name: str, result: Path, device: str, tiny: bool, workdir: Path, out: Path, fail: str | None = None
) -> int:
    """One part, in its own process: results to ``result`` after every item; the exit status (1 if
    anything failed). ``fail="raise"`` makes the part fail at once and ``fail="hang"`` makes it
    hang until it is stopped: stand-ins for a broken part, to test the runner."""
    sizes = Sizes.tiny() if tiny else Sizes.paper()
    if tiny:
        # tiny ops on a shared CPU: with several threads each op waits on descheduled workers
        # (seen here: 60× slower steps while other processes kept the 2 cores busy)
        torch.set_num_threads(1)
    part = Part(name, result, torch.device(device), sizes, workdir, out)
    try:
        if fail == "raise":
            raise RuntimeError(f"deliberate failure in part {name!r} (--raise-in, to test the error path)")
        if fail == "hang":
            print(f"part {name!r} hangs until it is stopped (--hang-in, to test the time caps)", flush=True)
            while True:
                time.sleep(60)
        PART_FUNCTIONS[name](part)
    except Exception as exc:
        part.errors.append(error_row(name, None, exc))
        part.save()
        traceback.print_exc()
        return 1
    return 1 if part.errors else 0

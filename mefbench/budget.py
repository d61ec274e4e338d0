"""What a sweep will cost, before it runs: measured step times × planned steps.

:func:`measure` times a training step (forward, backward, Adamax) and an evaluation image of
each distinct model in one process, the models interleaved round by round so that a machine
shared with other work slows all of them alike, and reports each as a ratio to a reference
model too. :func:`estimate` multiplies each planned run's steps (its cap: a run that reaches
its plateau earlier costs less) and evaluations by those times. ``mefbench sweep --dry-run``
prints both. The estimate is an upper bound for runs that train to a plateau, and only as good
as the machine is quiet while it measures.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

from .config import FlowConfig, TrainConfig

__all__ = ["Cost", "RunCost", "cost_key", "dry_run", "estimate", "measure", "planned_steps"]


@dataclass(frozen=True)
class Cost:
    """Measured seconds per training step and per evaluated image of one model, and the step time
    over the reference model's."""

    step_s: float
    eval_image_s: float
    setup_s: float
    ratio: float


@dataclass(frozen=True)
class RunCost:
    name: str
    tables: tuple[str, ...]
    steps: int  # the cap: epochs × steps per epoch
    eval_images: int  # images evaluated over the whole run, at the cap
    seconds: float


def _cost_key(model: FlowConfig, batch_size: int) -> str:
    return json.dumps([model.to_dict(), batch_size], sort_keys=True)


def planned_steps(train: TrainConfig, train_images: int) -> tuple[int, int]:
    """(steps per epoch, epochs) a run of this recipe trains at most."""
    per_epoch = train_images // train.batch_size
    if train.max_train_batches is not None:
        per_epoch = min(per_epoch, train.max_train_batches)
    return per_epoch, train.epochs


def _eval_images(train: TrainConfig, sizes: dict[str, int]) -> int:
    """Images evaluated per epoch: the EMA and raw model on the test images, the EMA model on as
    many training images, and on the validation images when the run validates."""
    test = min(sizes["test"], train.max_test or sizes["test"])
    valid = min(sizes["validation"], train.max_validation or sizes["validation"]) if train.validate else 0
    return 3 * test + valid


def measure(
    models: dict[str, tuple[FlowConfig, int]],
    reference: str,
    *,
    repeats: int = 5,
    steps: int = 2,
    eval_batch: int = 256,
    seed: int = 0,
) -> dict[str, Cost]:
    """Median seconds per training step of each (model, batch size), measured interleaved.

    Each model is built, initialised on random data and warmed up by one step; then, ``repeats``
    rounds over all models, each times ``steps`` steps and an evaluation batch. ``reference``
    is a key of models: every ``ratio`` is a step time over its.
    """
    from .models import MultiScaleFlow
    from .training import train_step

    if reference not in models:
        raise ValueError(f"the reference {reference!r} is not one of the models measured")
    built, setup = {}, {}
    gen = torch.Generator().manual_seed(seed)
    for name, (config, batch) in models.items():
        t0 = time.perf_counter()
        torch.manual_seed(seed)
        model = MultiScaleFlow(config).float()
        f32: dict[str, Any] = {
            "generator": gen,
            "dtype": torch.float32,
        }  # the flow's maths is single precision, as in training
        model.initialize(torch.rand(max(batch, 16), *config.image_shape, **f32) * 2 - 1)
        optimizer = torch.optim.Adamax(model.parameters(), lr=1e-3)
        x = torch.rand(batch, *config.image_shape, **f32) * 2 - 1
        train_step(model, optimizer, x)
        built[name] = (model, optimizer, x, torch.rand(eval_batch, *config.image_shape, **f32) * 2 - 1)
        setup[name] = time.perf_counter() - t0
    step_times: dict[str, list[float]] = {name: [] for name in models}
    eval_times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(repeats):
        for name, (model, optimizer, x, xe) in built.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                train_step(model, optimizer, x)
            step_times[name].append((time.perf_counter() - t0) / steps)
            model.eval()
            t0 = time.perf_counter()
            with torch.no_grad():
                model.bits_per_dim(xe)
            eval_times[name].append((time.perf_counter() - t0) / len(xe))
            model.train()
    ref = statistics.median(step_times[reference])
    return {
        name: Cost(
            step_s=statistics.median(step_times[name]),
            eval_image_s=statistics.median(eval_times[name]),
            setup_s=setup[name],
            ratio=statistics.median(step_times[name]) / ref,
        )
        for name in models
    }


def estimate(specs: Iterable, costs: dict[str, Cost], sizes: dict[str, dict[str, int]]) -> list[RunCost]:
    """Seconds for each planned run (a :class:`~mefbench.sweep.RunSpec`) at its cap.

    ``costs`` is keyed by :func:`cost_key` of the run's model and batch size (see
    :func:`measure`); ``sizes`` maps a dataset to its split sizes ({"train", "validation",
    "test"}: images). Per run: setup (build and data-dependent init), cap × step time, every
    epoch's evaluations and, at the end, the whole test split once more.
    """
    out = []
    for spec in specs:
        train = spec.train
        size = sizes[train.dataset]
        train_images = size["train"]
        per_epoch, epochs = planned_steps(train, train_images)
        cost = costs[cost_key(spec.model, train.batch_size)]
        evaluated = epochs * _eval_images(train, size) + size["test"] + (size["validation"] if train.validate else 0)
        seconds = cost.setup_s + per_epoch * epochs * cost.step_s + evaluated * cost.eval_image_s
        out.append(RunCost(spec.name, tuple(spec.tables), per_epoch * epochs, evaluated, seconds))
    return out


def cost_key(model: FlowConfig, batch_size: int) -> str:
    """The key of :func:`estimate`'s ``costs``: one per distinct model and batch size."""
    return _cost_key(model, batch_size)


def dry_run(specs: list, *, measure_costs: bool = True, repeats: int = 3) -> list[str]:
    """The lines ``mefbench sweep --dry-run`` prints: every planned run's step cap, and (measured
    here, on this machine's CPU) the estimated time per table and in all."""
    from .data import split_sizes

    out = [f"{len(specs)} runs planned"]
    if not specs:
        return out
    datasets = sorted({s.train.dataset for s in specs})
    try:
        sizes: dict[str, dict[str, int]] | None = {
            d: {k: int(v["images"] or 0) for k, v in split_sizes(d).items()} for d in datasets
        }
    except (ValueError, OSError) as exc:
        sizes = None
        out.append(f"no time estimate: the data cannot be loaded here ({exc})")
    models: dict[str, tuple[FlowConfig, int]] = {}
    for s in specs:
        models.setdefault(cost_key(s.model, s.train.batch_size), (s.model, s.train.batch_size))
    costs = None
    if sizes is not None and measure_costs and specs[0].scale != "paper":
        reference = cost_key(specs[0].model, specs[0].train.batch_size)
        out.append(f"measuring a training step of {len(models)} models here (interleaved, {repeats} rounds)...")
        costs = measure(models, reference, repeats=repeats)
    per_table: dict[str, list] = {}
    rows = estimate(specs, costs, sizes) if costs is not None and sizes is not None else None
    for i, spec in enumerate(specs):
        steps = planned_steps(spec.train, sizes[spec.train.dataset]["train"]) if sizes else None
        cap = steps[0] * steps[1] if steps else None
        line = f"  {spec.name}: tables {','.join(spec.tables)}; at most {cap if cap is not None else '?'} steps"
        if rows is not None:
            line += f", ~{rows[i].seconds:.0f} s"
            per_table.setdefault(spec.tables[0], []).append(rows[i])
        out.append(line)
    if rows is not None:
        out.append("estimated time at the step caps (runs that reach their plateau earlier cost less):")
        for table, runs in per_table.items():
            out.append(f"  table {table} (and the tables it shares runs with): {len(runs)} runs, "
                       f"{sum(r.steps for r in runs):,} steps, {hours(sum(r.seconds for r in runs))}")  # fmt: skip
        out.append(f"  in all: {hours(sum(r.seconds for r in rows))} on this machine as it is now")
        out.append("step times measured (ms per training step, ratio to the first run's model):")
        assert costs is not None  # rows come from measured costs
        for key, (config, batch) in models.items():
            c = costs[key]
            out.append(f"  {config.mixing}/{config.coupling} steps {list(config.steps)} hidden {config.hidden_channels} "
                       f"batch {batch}: {c.step_s * 1e3:.1f} ms ({c.ratio:.2f}×)")  # fmt: skip
    return out


def hours(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "–"
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"

"""The ``mefbench`` command: layers, presets, train, sample, sweep, status, report, reproduce, bench."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
from pathlib import Path

__all__ = ["main"]


def _add_common_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _data_dirs(values: list[str] | None) -> dict[str, str]:
    """--data-dir PATH (every dataset) or --data-dir DATASET=PATH, repeatable."""
    out: dict[str, str] = {}
    for value in values or []:
        name, sep, path = value.partition("=")
        if sep and not Path(value).exists():
            out[name] = path
        else:
            out["*"] = value
    return out


def _options(values: list[str] | None, flag: str) -> dict:
    """--mixing-option KEY=VALUE (repeatable) -> {KEY: VALUE}, VALUE read as JSON when it parses
    (numbers, true/false, null, lists), else kept as a string."""
    out: dict = {}
    for value in values or []:
        key, sep, text = value.partition("=")
        if not sep or not key:
            raise ValueError(f"{flag} takes KEY=VALUE, got {value!r}")
        try:
            out[key] = json.loads(text)
        except json.JSONDecodeError:
            out[key] = text
    return out


def _path(value: str, flag: str) -> Path:
    """A path argument, refused when empty (``Path("")`` is the current directory)."""
    if not value.strip():
        raise ValueError(f"{flag} is empty: give a path, or leave {flag} out for its default")
    return Path(value)


def _option_slug(options: dict) -> list[str]:
    return [f"{k}-{v}" for k, v in sorted(options.items())]


def _step(text: str) -> list:
    """--step: a comma list of layer specs (``coupling,actnorm,mixing``; ``mixing:NAME`` or
    ``coupling:NAME`` for a layer of its own) or a JSON list (``'["actnorm", {"mixing":
    "householder", "options": {"reflections": 2}}, "coupling"]'``)."""
    if text.lstrip().startswith("["):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--step: not a valid JSON list ({exc.msg} at column {exc.colno}): {text!r}") from None
    step: list = []
    for item in (t.strip() for t in text.split(",")):
        kind, sep, name = item.partition(":")
        step.append({kind: name} if sep else item)
    return step


def _step_slug(step: tuple) -> str:
    parts = []
    for spec in step:
        if isinstance(spec, str):
            parts.append(spec)
        else:
            kind = next(k for k in spec if k != "options")
            parts.append(".".join([kind, spec[kind], *_option_slug(spec.get("options", {}))]))
    return "step-" + "-".join(parts)


# deprecated flags -> what replaces them (read, with a message on stderr)
_RENAMED_FLAGS = {"conv": "mixing", "conv_option": "mixing_option"}


def _renamed_flags(args: argparse.Namespace) -> None:
    for old, new in _RENAMED_FLAGS.items():
        value = getattr(args, old, None)
        if value is None:
            continue
        old_flag, new_flag = "--" + old.replace("_", "-"), "--" + new.replace("_", "-")
        print(f"mefbench {args.command}: {old_flag} is deprecated, use {new_flag} (same values)", file=sys.stderr)
        if getattr(args, new) is not None:
            raise ValueError(f"{old_flag} and {new_flag} are the same setting: give only {new_flag}")
        setattr(args, new, value)


def _cmd_layers(args: argparse.Namespace) -> int:
    from .layers import NETS, REGISTRIES, option_names, summary

    for kind, registry in REGISTRIES.items():
        print(f"{kind} layers ({len(registry)})")
        for name, cls in registry.items():
            info = cls.info
            print(f"  {name:12} {info.family:10} log-det {info.logdet:9} inverse {info.inverse:11} {summary(cls)}")
            print(
                f"  {'':12} cost: forward {info.cost.forward}; log-det {info.cost.logdet}; inverse {info.cost.inverse}"
            )
            options = [o for o in option_names(cls) if o != "net"]
            print(f"  {'':12} options: {', '.join(options) or 'none'}; reference: {info.reference}")
        print()
    print(f"conditioner nets ({len(NETS)}), every coupling's net: --net NAME, --net-option KEY=VALUE")
    for name, cls in NETS.items():
        print(f"  {name:12} {summary(cls)}")
        print(f"  {'':12} options: {', '.join(option_names(cls))}")
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from .presets import PRESETS, SCALES

    rows = [
        (p.name, p.scale, ",".join(map(str, p.tables)) or "-", p.train.dataset, p.description)
        for p in sorted(PRESETS.values(), key=lambda p: (SCALES.index(p.scale), p.name))
    ]
    widths = [max(len(r[i]) for r in rows + [("preset", "scale", "tables", "dataset", "")]) for i in range(4)]
    print(
        "  ".join(h.ljust(w) for h, w in zip(("preset", "scale", "tables", "dataset"), widths, strict=True))
        + "  description"
    )
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r[:4], widths, strict=True)) + "  " + r[4])
    return 0


def _replace(config, flag: str, **changes):
    """dataclasses.replace(config, **changes) with the config's validation error named by the CLI flag."""
    try:
        return dataclasses.replace(config, **changes)
    except ValueError as exc:
        raise ValueError(f"{flag}: {exc}") from None


def _cmd_train(args: argparse.Namespace) -> int:
    from .data import DATASETS
    from .presets import get_preset
    from .training import train

    _renamed_flags(args)
    preset = get_preset(args.preset)
    model, cfg = preset.configs()
    changed = []
    # a new layer (or net) starts from its own defaults: the preset's options belong to the preset's choice
    for axis in ("mixing", "coupling", "net"):
        name, given = getattr(args, axis), _options(getattr(args, f"{axis}_option"), f"--{axis}-option")
        if name or given:
            choice = name or getattr(model, axis)
            options = given if name else {**getattr(model, f"{axis}_options"), **given}
            flag = f"--{axis}-option" if given else f"--{axis}"
            model = _replace(model, flag, **{axis: choice, f"{axis}_options": options})
            changed += [f"{axis}-{choice}", *_option_slug(given)]
    if args.step is not None:
        model = _replace(model, "--step", step=_step(args.step))
        changed.append(_step_slug(model.step))
    if args.dataset:
        if args.dataset not in DATASETS:
            raise ValueError(f"--dataset: unknown dataset {args.dataset!r}; choose one of {sorted(DATASETS)}")
        model = _replace(model, "--dataset", image_shape=DATASETS[args.dataset].shape)
        cfg = _replace(cfg, "--dataset", dataset=args.dataset)
        changed.append(args.dataset)
    if args.lr is not None:
        cfg = _replace(cfg, "--lr", lr=args.lr)
        changed.append(f"lr{args.lr}")
    if args.epochs is not None:
        cfg = _replace(cfg, "--epochs", epochs=args.epochs)
        changed.append(f"ep{args.epochs}")
    if args.seed is not None:
        cfg = _replace(cfg, "--seed", seed=args.seed)
    if args.amp is not None:
        cfg = _replace(cfg, "--amp", amp=args.amp)
        changed.append(f"amp-{args.amp}")  # another precision is another run, in its own directory
    if args.channels_last:
        cfg = _replace(cfg, "--channels-last", channels_last=True)
        changed.append("channels-last")
    if args.compile is not None:
        cfg = _replace(cfg, "--compile", compile=args.compile)
        changed.append("compile" if args.compile == "inductor" else f"compile-{args.compile}")
    if args.data_dir:
        cfg = _replace(cfg, "--data-dir", data_dir=args.data_dir)
    out = (
        _path(args.out, "--out")
        if args.out is not None
        else Path("runs") / "-".join([preset.name, *changed, f"seed{cfg.seed}"])
    )
    # a run with changed settings no longer fills the preset's table cells; amp/channels-last change
    # only the arithmetic, but a table compares like with like, so they count as changes too
    tables = () if changed else preset.tables
    record = train(
        model,
        cfg,
        out,
        resume=args.resume,
        device=args.device,
        preset=preset.name,
        tables=tables,
        cells={str(t): dict(preset.cell) for t in tables},
        scale=preset.scale,
        progress=not args.no_progress,
    )
    if os.environ.get("RANK", "0") != "0":
        return 0  # under torchrun, rank 0 reports
    final = record.final
    print(f"{out}: {record.status}", end="")
    if final is not None:
        print(f", epoch {final.epochs_done}, test bits/dim {final.test_bpd:.4f} (EMA), {final.test_bpd_raw:.4f} (raw)")
    else:
        print()
    if record.diverged is not None:
        d = record.diverged
        print(f"diverged at step {d.step} (epoch {d.epoch}): loss {d.loss}")
    return 0


MAX_SAMPLES = 1024  # a 32 × 32 grid; more samples: several calls with other --seed values
MAX_PNG_SIDE = 16384  # pixels a side of the grid PNG


def _sample_out(out: str | None, run: Path, temperature: float) -> Path:
    """--out: a .png path, or a directory (existing, or written with a trailing slash) for the
    default name in it; default <run>/samples-t<T>.png."""
    name = f"samples-t{temperature:g}.png"
    if out is None:
        return run / name
    path = _path(out, "--out")
    if path.is_dir() or out.endswith(("/", os.sep)):
        return path / name
    if path.suffix.lower() != ".png":
        raise ValueError(
            f"--out {out!r} must name a .png file (e.g. {path.with_suffix('.png')}), or a directory to write {name} in"
        )
    return path


def _cmd_sample(args: argparse.Namespace) -> int:
    import math

    import torch

    from .checkpoint import load_model
    from .config import SEED_MAX
    from .images import save_grid
    from .record import RECORD, read_record

    if not 1 <= args.n <= MAX_SAMPLES:
        raise ValueError(
            f"--n must be from 1 to {MAX_SAMPLES} (the samples of one PNG grid), got {args.n}; "
            "for more, run sample again with another --seed"
        )
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.zoom < 1:
        raise ValueError(f"--zoom must be at least 1, got {args.zoom}")
    if not 0 <= args.seed <= SEED_MAX:
        raise ValueError(f"--seed must be an integer from 0 to {SEED_MAX} (2**63 - 1), got {args.seed}")
    run = _path(args.run, "--run")
    if run.name == RECORD and run.is_file():  # the run's record.json names its run
        run = run.parent
    out = _sample_out(args.out, run, args.temperature)
    record = read_record(run)
    if record.diverged is not None and not args.allow_diverged:
        d = record.diverged
        raise ValueError(
            f"--run {run} diverged at step {d.step} (epoch {d.epoch}, loss {d.loss}): its checkpoint holds the "
            f"weights of epoch {len(record.epochs)}, which may be unusable; pass --allow-diverged to sample them anyway"
        )
    _, h, w = record.model["image_shape"]
    per_row = math.ceil(math.sqrt(args.n))
    side = (per_row * (max(h, w) + 1) + 1) * args.zoom  # save_grid: 1-pixel padding
    if side > MAX_PNG_SIDE:
        most = MAX_PNG_SIDE // (per_row * (max(h, w) + 1) + 1)
        fix = f"use --zoom {most} or less" if most >= 1 else "lower --n"
        raise ValueError(
            f"--zoom {args.zoom} with --n {args.n} makes a PNG {side} pixels a side (at most {MAX_PNG_SIDE}): {fix}"
        )
    model = load_model(run, ema=not args.raw)
    g = torch.Generator().manual_seed(args.seed)
    x = model.sample(args.n, temperature=args.temperature, generator=g)
    save_grid(x, out, scale=args.zoom)
    print(out)
    return 0


def _cmd_migrate_records(args: argparse.Namespace) -> int:
    from .record import SCHEMA, migrate_records

    migrated, current, locked, unreadable = migrate_records(args.runs)
    for path in migrated:
        print(f"migrated {path}")
    for path in locked:
        print(f"locked (a run in progress writes today's schema), left as it is: {path}")
    for _, error in unreadable:  # the error names the file
        print(f"unreadable, left as it is: {error}", file=sys.stderr)
    print(
        f"{len(migrated)} records migrated to schema {SCHEMA}, {len(current)} already current, "
        f"{len(locked)} locked, {len(unreadable)} unreadable"
    )
    return 1 if unreadable else 0


def _cluster_options(args: argparse.Namespace):
    """The job options of `sweep --executor local|slurm` (refused with the inline executor)."""
    from .cluster import ClusterOptions, parse_sbatch, parse_time

    given = {
        "--partition": args.partition,
        "--time": args.time,
        "--gpus-per-run": args.gpus_per_run,
        "--cpus-per-run": args.cpus_per_run,
        "--mem": args.mem,
        "--max-parallel": args.max_parallel,
        "--sbatch": args.sbatch,
        "--wait": args.wait or None,
    }
    if args.executor == "inline":
        used = [flag for flag, value in given.items() if value is not None]
        if used:
            raise ValueError(
                f"{', '.join(used)} apply to --executor local or slurm; the inline sweep runs here, one run at a time"
            )
        return None
    if args.executor == "local" and (args.partition or args.sbatch):
        raise ValueError("--partition and --sbatch are SLURM's; --executor local runs on this machine")
    return ClusterOptions(
        partition=args.partition,
        time_min=parse_time(args.time) if args.time is not None else None,
        gpus_per_run=args.gpus_per_run,
        cpus_per_run=args.cpus_per_run,
        mem=args.mem,
        max_parallel=args.max_parallel,
        sbatch=parse_sbatch(args.sbatch),
    )


def _runs(n: int) -> str:
    return f"{n} run was" if n == 1 else f"{n} runs were"


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .status import save_plan
    from .sweep import SweepError, parse_tables, plan, run_sweep

    if getattr(args, "dry_run", False):
        from .budget import dry_run

        specs = plan(parse_tables(args.table), args.scale, args.seeds, _data_dirs(args.data_dir))
        for line in dry_run(specs, measure_costs=not args.no_measure):
            print(line, flush=True)
        return 0
    runs = _path(args.runs, "--runs")
    if runs.exists() and not runs.is_dir():
        raise ValueError(f"--runs {runs} is a file, not a folder: give the folder that holds (or will hold) the runs")
    tables, data_dirs = parse_tables(args.table), _data_dirs(args.data_dir)
    executor = getattr(args, "executor", "inline")  # `reproduce` sweeps inline
    options = _cluster_options(args) if hasattr(args, "executor") else None  # None: inline
    specs = plan(tables, args.scale, args.seeds, data_dirs)
    save_plan(runs, specs)  # what `mefbench status` shows as pending
    if options is not None:
        from .cluster import submit_sweep

        return submit_sweep(
            specs,
            runs,
            executor,
            options,
            device=args.device,
            amp=args.amp,
            channels_last=args.channels_last,
            wait=args.wait,
        )
    failures: dict[str, str] = {}
    try:
        records = run_sweep(
            tables,
            args.scale,
            runs,
            seeds=args.seeds,
            device=args.device,
            data_dirs=data_dirs,
            progress=not args.no_progress,
            amp=args.amp,
            channels_last=args.channels_last,
        )
    except SweepError as exc:
        records, failures = exc.records, exc.failures
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    if failures:
        counts["not done"] = len(failures)
    print(
        f"{len(records) + len(failures)} runs under {runs}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    )
    if failures:
        print(f"mefbench {args.command}: {_runs(len(failures))} not done:", file=sys.stderr)
        for name, reason in failures.items():
            print(f"  {name}: {reason}", file=sys.stderr)
        return 1
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from .status import format_status, load_plan, run_statuses
    from .sweep import parse_tables, plan

    runs = Path(args.runs)
    if not runs.is_dir():
        raise ValueError(f"--runs {runs}: no such directory")
    if args.table is not None and args.scale is None:
        raise ValueError(
            "--table and --seeds need --scale (the plan they pick); or leave all three out to use the sweep's own plan"
        )
    specs = plan(parse_tables(args.table or "all"), args.scale, args.seeds) if args.scale else None
    rows = run_statuses(runs, specs)
    print(format_status(rows, runs, planned=specs is not None or load_plan(runs) is not None))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    path = write_report(
        _path(args.runs, "--runs"),
        _path(args.out, "--out"),
        asv_dir=args.asv,
        bench_file=args.bench,
        gpu_dir=args.gpu,
        command=_command_line(),
        samples=not args.no_samples,
    )
    print(path)
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    from .report import check_out_dir

    # before hours of training, not after them
    check_out_dir(_path(args.out, "--out"), [args.runs, args.asv, args.bench, args.gpu])
    swept = _cmd_sweep(args)
    return _cmd_report(args) or swept  # the report of what was done; 1 if some runs were not


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args)


def _command_line() -> str:
    return "mefbench " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def build_parser() -> argparse.ArgumentParser:
    from .config import AMP_CHOICES, COMPILE_CHOICES

    # read when the parser is built: layers and nets registered at run time are choices
    from .layers import COUPLING, MIXING, NETS

    parser = argparse.ArgumentParser(prog="mefbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list every preset")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("layers", help="list the layer zoo: family, log-det, inverse, costs, options, reference")
    p.set_defaults(func=_cmd_layers)

    p = sub.add_parser("train", help="train one run from a preset")
    p.add_argument("--preset", required=True, help="a name from `mefbench presets`")
    p.add_argument("--mixing", choices=list(MIXING), help="the mixing layer (`mefbench layers` lists them)")
    p.add_argument(
        "--mixing-option", action="append", metavar="KEY=VALUE", help="an option of the mixing layer (repeatable)"
    )
    p.add_argument("--coupling", choices=list(COUPLING), help="the coupling layer")
    p.add_argument(
        "--coupling-option", action="append", metavar="KEY=VALUE", help="an option of the coupling (repeatable)"
    )
    p.add_argument("--net", choices=list(NETS), help="every coupling's conditioner net (resnet: the paper's)")
    p.add_argument("--net-option", action="append", metavar="KEY=VALUE", help="an option of the net (repeatable)")
    p.add_argument(
        "--step",
        metavar="SPECS",
        help="the flow step, layers in order: a comma list of actnorm, mixing, coupling (the run's choices) "
        "and mixing:NAME / coupling:NAME (a layer of its own), or a JSON list of those with "
        '{"mixing": NAME, "options": {...}}; default actnorm,mixing,coupling',
    )
    # renamed: still read, with a message saying what replaces them
    p.add_argument("--conv", choices=list(MIXING), help=argparse.SUPPRESS)
    p.add_argument("--conv-option", action="append", help=argparse.SUPPRESS)
    p.add_argument("--lr", type=float)
    p.add_argument("--epochs", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--dataset")
    p.add_argument("--data-dir", help="where cifar10 / imagenet32 / imagenet64 files are")
    p.add_argument("--out", help="the run directory (default runs/<preset>[-overrides]-seed<N>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument(
        "--amp",
        choices=list(AMP_CHOICES),
        help="mixed precision for the coupling nets (the flow's maths stays float32)",
    )
    p.add_argument(
        "--channels-last", action="store_true", help="model and batches in torch.channels_last memory format"
    )
    p.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        choices=list(COMPILE_CHOICES),
        help="torch.compile the training step's forward and loss (backend: inductor, or aot_eager without "
        "code generation); the optimiser and EMA stay eager, the first step compiles (minutes on a CPU)",
    )
    _add_common_train(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("sample", help="write a PNG grid of samples from a trained run")
    p.add_argument("--run", required=True, help="a run directory (or its record.json)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--n", type=int, default=64, help=f"samples in the grid (1 to {MAX_SAMPLES})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zoom", type=int, default=2, help="pixel scale of the PNG")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--out", help="PNG path, or a directory for the default name (default <run>/samples-t<T>.png)")
    p.add_argument(
        "--allow-diverged",
        action="store_true",
        help="sample a run that diverged (refused otherwise: its weights may be unusable)",
    )
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("migrate-records", help="rewrite every record.json under a folder in today's schema")
    p.add_argument("runs", help="a runs folder (searched recursively) or one record.json")
    p.set_defaults(func=_cmd_migrate_records)

    from .presets import SCALES
    from .report.tables import TABLES

    tables_help = "a comma list of table ids, or all: " + "; ".join(f"{t}: {spec.what}" for t, spec in TABLES.items())

    def sweep_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--table", default="all", help=tables_help)
        p.add_argument("--scale", choices=list(SCALES), required=True)
        p.add_argument(
            "--seeds",
            type=int,
            default=None,
            help="seeds per configuration (default: the tables' own, 3; 5 for stability)",
        )
        p.add_argument("--runs", required=True, help="where run directories go")
        p.add_argument("--data-dir", action="append", help="PATH, or DATASET=PATH (repeatable)")
        p.add_argument("--amp", choices=list(AMP_CHOICES), help="mixed precision for the coupling nets in every run")
        p.add_argument("--channels-last", action="store_true", help="channels_last memory format in every run")
        _add_common_train(p)

    def report_args(p: argparse.ArgumentParser, runs: bool) -> None:
        if runs:
            p.add_argument("--runs", required=True, help="the runs directory to read (refused if missing or empty)")
        p.add_argument("--out", required=True, help="the report folder: README.md and figures/ are (re)written there")
        p.add_argument("--asv", default=".asv", help="asv folder whose results/ to include, if present")
        p.add_argument("--bench", default=None, help="JSON from `mefbench bench --json` to include")
        p.add_argument("--gpu", default=None, help="folder of JSON results of benchmarks/gpu_check.sh to include")
        p.add_argument("--no-samples", action="store_true", help="skip sample grids")

    p = sub.add_parser("sweep", help="run every run the report's tables need")
    sweep_args(p)
    from .cluster import EXECUTORS

    p.add_argument(
        "--executor",
        choices=list(EXECUTORS),
        default="inline",
        help="inline: one run after another in this process (default); local: processes on this machine, several "
        "at once, each with its own GPUs, waiting for them; slurm: one SLURM job per run (a job array), printing the "
        "job ids and returning",
    )
    jobs = p.add_argument_group("jobs (--executor local or slurm)")
    jobs.add_argument("--partition", help="SLURM partition")
    jobs.add_argument(
        "--time", help="each job's time limit, minutes or [D-]HH:MM:SS (required for slurm); a run that reaches it "
        "is requeued and resumes from its last epoch",
    )  # fmt: skip
    jobs.add_argument("--gpus-per-run", type=int, help="GPUs per run (several: data-parallel, one task per GPU)")
    jobs.add_argument("--cpus-per-run", type=int, help="CPU cores per run (torch's threads)")
    jobs.add_argument("--mem", help="memory per run, in sbatch's --mem syntax (e.g. 16G)")
    jobs.add_argument(
        "--max-parallel", type=int, help="most runs at once (slurm: the array's throttle; local: default one per GPU)"
    )
    jobs.add_argument(
        "--sbatch", action="append", metavar="KEY=VALUE", help="another sbatch option, e.g. qos=high (repeatable)"
    )
    jobs.add_argument(
        "--wait", action="store_true", help="slurm: wait for the jobs and report (exit 1 if a run did not end)"
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="train nothing: list the planned runs and their step caps, and estimate the time from step times "
        "measured here",
    )
    p.add_argument("--no-measure", action="store_true", help="with --dry-run: list the runs only, measure nothing")
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser(
        "status", help="each run of a sweep: finished, running (host, pid), interrupted, diverged, failed, pending"
    )
    p.add_argument("--runs", required=True, help="the runs directory of a sweep")
    p.add_argument("--table", default=None, help="the plan to compare with (with --scale); default: the sweep's own")
    p.add_argument("--scale", choices=["smoke", "cpu", "paper"], default=None)
    p.add_argument("--seeds", type=int, default=None)
    p.set_defaults(func=_cmd_status)

    p = sub.add_parser("report", help="write the comparison report from recorded runs")
    report_args(p, runs=True)
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser("reproduce", help="sweep the tables (all by default), then report")
    sweep_args(p)
    report_args(p, runs=False)
    p.set_defaults(func=_cmd_reproduce)

    p = sub.add_parser("bench", help="speed and accuracy of the matrix-exponential layers vs their targets")
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke check)")
    p.add_argument("--json", help="also write the rows as JSON here (the report reads it)")
    p.add_argument(
        "--device", default="cpu", help="cpu or cuda[:index]; on a GPU the layer and model rows use batch 64"
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", help="comma list of parts: accuracy, action, coupling, model, layers, couplings, scaling")
    p.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        choices=list(COMPILE_CHOICES),
        help="model rows also time the training step compiled (torch.compile; default backend inductor) against eager",
    )
    p.add_argument(
        "--scaling",
        action="store_true",
        help="add the scaling part: time of every mixing layer and coupling over C and H = W, fitted exponents "
        "against each layer's stated cost (10-25 minutes on 2 cores, --quick about one; alone: --only scaling)",
    )
    p.set_defaults(func=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .record import RunError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # the reader went away (`mefbench layers | head`): nothing left to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (RunError, ValueError, OSError) as exc:  # OSError: FileNotFoundError, PermissionError, a full disk
        print(f"mefbench {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"mefbench {args.command}: interrupted; the record says so, and --resume continues", file=sys.stderr)
        return 130
    finally:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The ``mefbench`` command: layers, presets, train, sample, sweep, report, reproduce, bench."""

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
    """--conv-option KEY=VALUE (repeatable) -> {KEY: VALUE}, VALUE read as JSON when it parses
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


def _option_slug(options: dict) -> list[str]:
    return [f"{k}-{v}" for k, v in sorted(options.items())]


def _cmd_layers(args: argparse.Namespace) -> int:
    from .layers import REGISTRIES, option_names, summary

    for kind, registry in REGISTRIES.items():
        print(f"{kind} layers ({len(registry)})")
        for name, cls in registry.items():
            info = cls.info
            print(f"  {name:12} {info.family:10} log-det {info.logdet:9} inverse {info.inverse:11} {summary(cls)}")
            print(
                f"  {'':12} cost: forward {info.cost.forward}; log-det {info.cost.logdet}; inverse {info.cost.inverse}"
            )
            options = [o for o in option_names(cls) if o not in ("hidden_channels", "num_blocks", "net")]
            print(f"  {'':12} options: {', '.join(options) or 'none'}; reference: {info.reference}")
        print()
    return 0


def _cmd_presets(args: argparse.Namespace) -> int:
    from .presets import PRESETS

    rows = [
        (p.name, p.scale, ",".join(map(str, p.tables)) or "-", p.train.dataset, p.description)
        for p in sorted(PRESETS.values(), key=lambda p: (("smoke", "cpu", "paper").index(p.scale), p.name))
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

    preset = get_preset(args.preset)
    model, cfg = preset.configs()
    changed = []
    conv_options = _options(args.conv_option, "--conv-option")
    coupling_options = _options(args.coupling_option, "--coupling-option")
    if args.conv or conv_options:
        # a new conv starts from its own defaults: the preset's options belong to the preset's conv
        conv = args.conv or model.conv
        options = conv_options if args.conv else {**model.conv_options, **conv_options}
        model = _replace(model, "--conv-option" if conv_options else "--conv", conv=conv, conv_options=options)
        changed += [f"conv-{conv}", *_option_slug(conv_options)]
    if args.coupling or coupling_options:
        coupling = args.coupling or model.coupling
        options = coupling_options if args.coupling else {**model.coupling_options, **coupling_options}
        flag = "--coupling-option" if coupling_options else "--coupling"
        model = _replace(model, flag, coupling=coupling, coupling_options=options)
        changed += [f"coupling-{coupling}", *_option_slug(coupling_options)]
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
    out = Path(args.out) if args.out else Path("runs") / "-".join([preset.name, *changed, f"seed{cfg.seed}"])
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


def _cmd_sample(args: argparse.Namespace) -> int:
    import math

    import torch

    from .images import save_grid
    from .training import load_model

    if args.n < 1:
        raise ValueError(f"--n must be at least 1 (the number of samples), got {args.n}")
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        raise ValueError(f"--temperature must be a finite number >= 0, got {args.temperature}")
    if args.zoom < 1:
        raise ValueError(f"--zoom must be at least 1, got {args.zoom}")
    model = load_model(args.run, ema=not args.raw)
    g = torch.Generator().manual_seed(args.seed)
    x = model.sample(args.n, temperature=args.temperature, generator=g)
    out = Path(args.out) if args.out else Path(args.run) / f"samples-t{args.temperature:g}.png"
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


def _cmd_sweep(args: argparse.Namespace) -> int:
    from .sweep import parse_tables, run_sweep

    records = run_sweep(
        parse_tables(args.table),
        args.scale,
        args.runs,
        seeds=args.seeds,
        device=args.device,
        data_dirs=_data_dirs(args.data_dir),
        progress=not args.no_progress,
        amp=args.amp,
        channels_last=args.channels_last,
    )
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    print(f"{len(records)} runs under {args.runs}: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from .report import write_report

    path = write_report(
        args.runs,
        args.out,
        asv_dir=args.asv,
        bench_file=args.bench,
        gpu_dir=args.gpu,
        command=_command_line(),
        samples=not args.no_samples,
    )
    print(path)
    return 0


def _cmd_reproduce(args: argparse.Namespace) -> int:
    _cmd_sweep(args)
    return _cmd_report(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args)


def _command_line() -> str:
    return "mefbench " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def build_parser() -> argparse.ArgumentParser:
    from .config import AMP_CHOICES, COMPILE_CHOICES
    from .layers import COUPLING, MIXING  # read when the parser is built: layers registered at run time are choices

    parser = argparse.ArgumentParser(prog="mefbench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("presets", help="list every preset")
    p.set_defaults(func=_cmd_presets)

    p = sub.add_parser("layers", help="list the layer zoo: family, log-det, inverse, costs, options, reference")
    p.set_defaults(func=_cmd_layers)

    p = sub.add_parser("train", help="train one run from a preset")
    p.add_argument("--preset", required=True, help="a name from `mefbench presets`")
    p.add_argument("--conv", choices=list(MIXING), help="the mixing layer (`mefbench layers` lists them)")
    p.add_argument(
        "--conv-option", action="append", metavar="KEY=VALUE", help="an option of the mixing layer (repeatable)"
    )
    p.add_argument("--coupling", choices=list(COUPLING), help="the coupling layer")
    p.add_argument(
        "--coupling-option", action="append", metavar="KEY=VALUE", help="an option of the coupling (repeatable)"
    )
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
    p.add_argument("--run", required=True, help="a run directory")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--zoom", type=int, default=2, help="pixel scale of the PNG")
    p.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA weights")
    p.add_argument("--out", help="PNG path (default <run>/samples-t<T>.png)")
    p.set_defaults(func=_cmd_sample)

    p = sub.add_parser("migrate-records", help="rewrite every record.json under a folder in today's schema")
    p.add_argument("runs", help="a runs folder (searched recursively) or one record.json")
    p.set_defaults(func=_cmd_migrate_records)

    from .report.tables import TABLES

    tables_help = "a comma list of table ids, or all: " + "; ".join(f"{t}: {spec.what}" for t, spec in TABLES.items())

    def sweep_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--table", default="all", help=tables_help)
        p.add_argument("--scale", choices=["smoke", "cpu", "paper"], required=True)
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
    p.set_defaults(func=_cmd_sweep)

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

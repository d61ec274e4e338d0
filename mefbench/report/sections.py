"""The report's sections other than the tables: header, environment, samples, asv, bench, all runs."""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..checkpoint import load_model
from ..env import versions
from ..images import save_grid
from ..models import MODEL_REVISION
from ..record import CHECKPOINT, RunError
from .aggregate import finished, in_table
from .format import DASH, markdown_table

__all__ = [
    "SAMPLE_TEMPERATURES",
    "all_runs",
    "asv_section",
    "bench_section",
    "gpu_section",
    "header",
    "published_source",
    "samples",
]

SAMPLE_TEMPERATURES = (0.5, 0.7, 1.0)


def header(
    runs: pd.DataFrame, corrupt: list[dict], duplicates: list[dict], runs_dir: Path, command: str | None
) -> list[str]:
    import matplotlib
    import seaborn

    now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    seaborn_version = seaborn.__version__  # type: ignore[attr-defined]  # seaborn has it; its stubs do not
    software = {**versions(), "matplotlib": matplotlib.__version__, "seaborn": seaborn_version}
    how = (
        f"`{command}`" if command else f"`mefbench.report.write_report({str(runs_dir)!r}, ...)` (no command line given)"
    )
    statuses = runs["status"].value_counts()
    out = [
        "# mefbench report: Generative Flows with Matrix Exponential (Xiao & Liu, ICML 2020, arXiv 2007.09651)",
        "",
        f"- Produced by: {how}",
        f"- Date: {now}",
        f"- Runs directory: `{runs_dir}`",
        f"- Runs: {len(runs)}" + (f" ({', '.join(f'{n} {s}' for s, n in statuses.items())})" if len(runs) else ""),
        *_time_line(runs),
        *_data_lines(runs),
        f"- Model revision: {MODEL_REVISION} (the official MEF code's model, and every zoo layer as its own paper's code builds it; see `mefbench.models.MODEL_REVISION`)",
        "- Report written with " + ", ".join(f"{k} {v}" for k, v in software.items() if k != "git_commit")
        + (f" (commit {software['git_commit']})" if software["git_commit"] else ""),
        "",
    ]  # fmt: skip
    not_done = runs[runs["status"] != "finished"]
    if len(runs):
        if not_done.empty:
            out += ["**Status:** all runs finished.", ""]
        else:
            items = []
            for r in not_done.itertuples():
                if r.status == "diverged":
                    where = (
                        f"epoch {r.diverged_epoch:g}, step {r.diverged_step:g}"
                        if np.isfinite(r.diverged_step)
                        else "unknown step"
                    )
                    items.append(
                        f"`{r.run}` diverged at {where} (loss {r.diverged_loss:g}) after {r.epochs_done}/{r.epochs} epochs"
                    )
                elif r.status == "running":
                    items.append(
                        f"`{r.run}` still marked running ({r.epochs_done}/{r.epochs} epochs; running now, or killed before it could record it)"
                    )
                else:
                    items.append(f"`{r.run}` {r.status} after {r.epochs_done}/{r.epochs} epochs")
            out += [f"**Status:** {len(not_done)} of {len(runs)} runs not finished: " + "; ".join(items) + ".", ""]
    if duplicates:
        out += ["**Duplicates (the same configuration and seed recorded twice; counted once):**", ""]
        out += [f"- `{d['dropped']}` repeats `{d['kept']}` (preset `{d['preset']}`, seed {d['seed']}); the tables use "
                f"`{d['kept']}` ({d['kept_status']})" for d in duplicates] + [""]  # fmt: skip
    if corrupt:
        out += ["**Unreadable run records (skipped, in no table):**", ""]
        out += [f"- `{c['path']}`: {c['error']}" for c in corrupt] + [""]
    old = runs[pd.to_numeric(runs.get("model_revision", MODEL_REVISION), errors="coerce") != MODEL_REVISION]
    if len(old):
        out += [f"**Older model revisions:** {len(old)} runs were made with an earlier model revision; they are "
                "grouped apart (their group says which revision) and never averaged with today's.", ""]  # fmt: skip
    no_table = runs[runs["tables"].map(len) == 0]
    if len(no_table):
        out += [
            f"Runs that feed no table (listed under All runs only): {', '.join(f'`{r}`' for r in no_table['run'])}.",
            "",
        ]
    scales = sorted({s if isinstance(s, str) and s else "unlabelled" for s in runs["scale"]} - {"paper"})
    if scales:
        out += [
            "**Scale:** runs at " + ", ".join(f"`{s}`" for s in scales) + " scale train small models on "
            "other data (e.g. 16×16 `patches16`) for minutes; their bits/dim and times are NOT comparable with "
            "the published CIFAR-10 / ImageNet numbers, which are shown only as reference. Every table says which "
            "dataset and scale its runs come from.",
            "",
        ]
    return out + environment(runs)


def _time_line(runs: pd.DataFrame) -> list[str]:
    """How long the runs took: the span from the first run's start to the last record's update (a
    sweep that stopped and resumed includes the pause), and the training time summed over runs."""
    if runs.empty or "started_at" not in runs:
        return []
    start = pd.to_datetime(runs["started_at"], errors="coerce", utc=True).min()
    end = pd.to_datetime(runs["updated_at"], errors="coerce", utc=True).max()
    train = pd.to_numeric(runs["train_time_s"], errors="coerce").sum()
    if pd.isna(start) or pd.isna(end):
        return []
    span = (end - start).total_seconds() / 3600
    return [f"- Time: runs recorded from {start.isoformat(timespec='minutes')} to {end.isoformat(timespec='minutes')} "
            f"({span:.2f} h, pauses included), {train / 3600:.2f} h of it training (evaluation excluded)"]  # fmt: skip


def _data_lines(runs: pd.DataFrame) -> list[str]:
    """The splits of every bundled dataset the runs used, counted from the loaders."""
    from ..data import DATASETS, PATCH_PHOTOGRAPHS, split_sizes

    out = []
    for name in sorted(set(runs.get("dataset", []))):
        info = DATASETS.get(name)
        if info is None or info.needs_data_dir:
            continue
        try:
            sizes = split_sizes(name)
        except (RuntimeError, ValueError, OSError) as exc:
            out.append(f"- Data `{name}`: its splits cannot be counted here ({exc})")
            continue
        parts = []
        for split, n in sizes.items():
            if n["photographs"] is None:
                parts.append(f"{split} {n['images']:,} images")
            else:
                photos = ", ".join(PATCH_PHOTOGRAPHS[split])
                parts.append(f"{split} {n['images']:,} tiles of {n['photographs']} photographs ({photos})")
        out.append(f"- Data `{name}`: " + "; ".join(parts) + " (`mefbench.data.split_sizes`)")
    return out


def environment(runs: pd.DataFrame) -> list[str]:
    if runs.empty:
        return []
    out = ["### Versions and machines (from the run records)", ""]
    packages: dict[str, set] = {}
    for v in runs["versions"]:
        for k, val in (v or {}).items():
            packages.setdefault(k, set()).add(str(val))
    if packages:
        out += [
            markdown_table(
                pd.DataFrame([{"package": k, "versions": ", ".join(sorted(v))} for k, v in packages.items()])
            ),
            "",
        ]
    machines: dict[tuple, int] = {}
    for dev, world, m in zip(runs["device"], runs["world_size"], runs["machine"], strict=True):
        m = m or {}
        key = (str(dev), str(world), str(m.get("gpu", DASH)), str(m.get("processor", DASH)),
               str(m.get("cpu_count", DASH)), str(m.get("torch_threads", DASH)), str(m.get("platform", DASH)))  # fmt: skip
        machines[key] = machines.get(key, 0) + 1
    cols = ["device", "world size", "gpu", "processor", "cpus", "torch threads", "platform"]
    table = pd.DataFrame([dict(zip(cols, k, strict=True)) | {"runs": n} for k, n in machines.items()])
    return out + [markdown_table(table), ""]


def samples(runs: pd.DataFrame, figdir: Path, n: int = 16) -> tuple[list[str], list[str]]:
    """Sample grids of the best finished Table 2 run: (markdown lines, files written)."""
    out = ["### Samples", ""]
    t2 = in_table(runs, "2")
    fin = t2[finished(t2)].sort_values("test_bpd")
    fin = fin[[(Path(p) / CHECKPOINT).exists() for p in fin["path"]]]
    if fin.empty:
        return out + [f"No finished Table 2 run with a `{CHECKPOINT}` to sample from.", ""], []
    best = fin.iloc[0]
    written = []
    try:
        model = load_model(best["path"])
        dtype = next(model.parameters()).dtype
        paths = []
        for t in SAMPLE_TEMPERATURES:
            g = torch.Generator().manual_seed(0)
            x = model.sample(n, temperature=t, generator=g)
            name = f"samples_t{t:g}.png"
            save_grid(x, figdir / name, scale=max(1, math.ceil(64 / x.shape[-1])))
            written.append(name)
            paths.append((t, f"figures/{name}"))
    except (RunError, RuntimeError, ValueError, OSError) as exc:
        return out + [f"Sampling from run `{best['run']}` failed: {type(exc).__name__}: {exc}", ""], written
    out += [
        (f"{n} samples from the best finished Table 2 run, `{best['run']}` ({best['group']}, test "
         f"{best['test_bpd']:.3f} bits/dim), EMA weights, generator seed 0, {dtype}."),
        "",
        "| " + " | ".join(f"temperature {t:g}" for t, _ in paths) + " |",
        "|" + "|".join("---" for _ in paths) + "|",
        "| " + " | ".join(f"![samples at temperature {t:g}]({p})" for t, p in paths) + " |",
        "",
    ]  # fmt: skip
    return out, written


def all_runs(runs: pd.DataFrame) -> list[str]:
    if runs.empty:
        return []
    df = runs.sort_values(["preset", "seed", "run"], key=lambda s: s.astype(str))
    table = pd.DataFrame({
        "run": df["run"], "preset": df["preset"].fillna(DASH), "tables": df["tables"].map(lambda t: ",".join(map(str, t)) or DASH),
        "scale": df["scale"].fillna(DASH), "status": df["status"], "dataset": df["dataset"], "mixing": df["mixing"],
        "coupling": df["coupling"], "hidden": df["hidden_channels"], "blocks": df["num_blocks"],
        "lr": df["lr"].map(lambda v: f"{v:g}"), "seed": df["seed"],
        "epochs": [f"{a}/{b}" for a, b in zip(df["epochs_done"], df["epochs"], strict=True)],
        "stopped": [f"{r} at step {s:g}" if isinstance(r, str) else DASH
                    for r, s in zip(df.get("stop_reason", [None] * len(df)), df.get("stop_step", [np.nan] * len(df)),
                                    strict=True)],
        "test bpd": df["test_bpd"].map(lambda v: f"{v:.4f}" if np.isfinite(v) else DASH),
        "s/epoch": df["mean_epoch_time_s"].map(lambda v: f"{v:.2f}" if np.isfinite(v) else DASH),
        "params": df["num_params"], "device": df["device"],
    })  # fmt: skip
    return ["## All runs", "", markdown_table(table), ""]


def asv_section(asv_dir: str | Path | None, figdir: Path) -> tuple[list[str], list[str]]:
    out = ["## Layer speed (asv)", ""]
    if asv_dir is None:
        return out + ["Not included: no asv results directory was given.", ""], []
    asv_dir = Path(asv_dir)
    if not asv_dir.exists():
        return out + [f"Not included: the asv results directory `{asv_dir}` does not exist.", ""], []
    try:
        asv = importlib.import_module("mefbench.asv_results")
    except ImportError as exc:
        return out + [f"Not included: `mefbench.asv_results` cannot be imported ({exc}).", ""], []
    try:
        df = asv.load_asv_results(asv_dir)
        if df is None or len(df) == 0:
            return out + [f"Not included: no asv results in `{asv_dir}`.", ""], []
        table = asv.asv_speed_table(df)
    except Exception as exc:
        return out + [f"Not included: reading the asv results failed: {type(exc).__name__}: {exc}", ""], []
    commits = dict(getattr(table, "attrs", {}).get("commits") or {})
    table = pd.DataFrame(table)
    if not isinstance(table.index, pd.RangeIndex):
        table = table.reset_index()
    numeric = [c for c in table.columns if pd.api.types.is_float_dtype(table[c])]
    table[numeric] = table[numeric].map(lambda v: f"{v:.4g}" if np.isfinite(v) else DASH)
    out += [
        f"From `{asv_dir}`: times in ms of each machine's latest commit"
        + (" (" + ", ".join(f"{m}: `{str(c)[:10]}`" for m, c in commits.items()) + ")" if commits else "")
        + ".",
        "",
        f"<details><summary>{len(table)} timings (every benchmark and parameter point)</summary>",
        "",
        markdown_table(table),
        "",
        "</details>",
        "",
    ]
    try:
        asv.plot_asv_history(df, figdir / "asv_history.png")
        return out + ["![asv history](figures/asv_history.png)", ""], ["asv_history.png"]
    except Exception as exc:
        return out + [f"History figure not drawn: {type(exc).__name__}: {exc}", ""], []


def _is_scaling(row: dict) -> bool:
    return isinstance(row.get("data"), dict) and "scaling" in row["data"]


def _bench_table(data: dict) -> pd.DataFrame:
    """The bench rows as a table; the scaling part's rows have their own table (the report's
    scaling section) and are left out here."""
    rows = pd.DataFrame([r for r in data["rows"] if not _is_scaling(r)])
    if rows.empty:
        return rows
    cols = [c for c in ("what", "shape", "measured", "unit", "target", "ok", "note") if c in rows.columns]
    rows = rows[cols].copy()
    if "measured" in rows:
        rows["measured"] = rows["measured"].map(lambda v: f"{v:.4g}" if isinstance(v, (int, float)) else v)
    if "ok" in rows:
        rows["ok"] = rows["ok"].map(lambda v: "yes" if v is True else "NO" if v is False else "–" if v is None else v)
    return rows


def bench_section(bench_file: str | Path | None) -> list[str]:
    out = ["## Performance (`mefbench bench`)", ""]
    if bench_file is None:
        return out + ["Not included: no bench results file was given.", ""]
    path = Path(bench_file)
    if not path.exists():
        return out + [f"Not included: the bench results file `{path}` does not exist.", ""]
    try:
        data = json.loads(path.read_text())
        rows = _bench_table(data)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return out + [f"Not included: `{path}` cannot be read ({type(exc).__name__}: {exc}).", ""]
    out += [f"From `{path}`" + (f", produced by `{data['command']}`" if data.get("command") else "") + ".", ""]
    out += [markdown_table(rows), ""] if len(rows) else ["No rows but the scaling part's (its own table, above).", ""]
    for key in ("machine", "versions"):
        if isinstance(data.get(key), dict) and data[key]:
            out += [f"{key.capitalize()}: " + ", ".join(f"{k} {v}" for k, v in data[key].items()), ""]
    return out


def gpu_section(gpu_dir: str | Path | None) -> list[str]:
    """The GPU device check's results (``benchmarks/gpu_check.sh`` JSON files), if any."""
    out = ["## On a GPU (`benchmarks/gpu_check.sh`)", ""]
    if gpu_dir is None:
        return out + ["Not included: no GPU results folder was given.", ""]
    files = sorted(Path(gpu_dir).glob("*.json")) if Path(gpu_dir).is_dir() else []
    if not files:
        return out + [f"No GPU results in `{gpu_dir}` yet: no session with a GPU has run the device check.", ""]
    for file in files:
        try:
            data = json.loads(file.read_text())
        except (OSError, ValueError) as exc:
            out += [f"`{file}` cannot be read ({type(exc).__name__}: {exc}).", ""]
            continue
        env = data.get("environment", {})
        out += [f"### `{file.name}`: {env.get('device', 'unknown device')}, torch {env.get('torch', '?')}, "
                f"CUDA {env.get('cuda', '?')}, {data.get('date', 'undated')}", ""]  # fmt: skip
        parts = (data.get("budget") or {}).get("parts") if isinstance(data.get("budget"), dict) else None
        if parts:
            out += ["Parts (each under its own time cap):", "", markdown_table(_rounded(pd.DataFrame(parts))), ""]
        if isinstance(data.get("bench"), dict) and data["bench"].get("rows"):
            out += ["`mefbench bench --device cuda`:", "", markdown_table(_bench_table(data["bench"])), ""]
        for key, title in (("train_step", "training step"), ("epoch_check", "epoch check"), ("ddp", "DDP")):
            if isinstance(data.get(key), list) and data[key]:
                out += [f"{title}:", "", markdown_table(_rounded(pd.DataFrame(data[key]))), ""]
        errors = [e for e in data.get("errors") or [] if isinstance(e, dict)]
        if errors:
            out += ["Errors recorded by the check:", ""]
            out += [
                f"- {e.get('part')}{'/' + str(e['item']) if e.get('item') else ''}: {e.get('error')}" for e in errors
            ] + [""]
    return out


def _rounded(df: pd.DataFrame) -> pd.DataFrame:
    """Floats to 4 significant digits for display."""
    return df.map(lambda v: f"{v:.4g}" if isinstance(v, float) else v)


def published_source(published: dict) -> list[str]:
    src = published["source"]
    return [
        "## Published numbers",
        "",
        (f"From \"{src['title']}\" ({src['authors']}, {src['venue']}, arXiv {src['arxiv']}), Tables 2–6, "
         f"as stored in `mefbench/published.json`. {published['note']}"),
        "",
    ]  # fmt: skip

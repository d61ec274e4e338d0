"""The comparison report: ``README.md`` and PNG figures from run records (docs/design.md §4).

``write_report(runs_dir, out_dir)`` reads every run under runs_dir (:mod:`mefbench.results`),
counts each preset and seed once, renders every table of :data:`~mefbench.report.tables.TABLES`
per data group (dataset, scale, model revision) and writes ``out_dir/README.md`` and
``out_dir/figures/*.png``. Every number comes from the records, except Table 3's paper-scale
parameter counts (computed from the models) and the published values, which live only in
``mefbench/published.json`` with their source.

The report never destroys: a missing runs directory or one without a readable record is refused
before anything is written; only the files this function generates are written, and the only
files it removes are those a previous report listed in its manifest (``.mefbench-report.json``)
and this one no longer makes. It writes only into a folder it owns (one holding that manifest) or
a new one, empty apart from the report's own inputs (:func:`check_out_dir`): never over a
``README.md`` it did not write. Figures are drawn into a temporary folder and moved into
``figures/`` only once every figure and the README are written, so a failure half-way (a full
disk) leaves the previous report whole, README and figures.

Modules: :mod:`.format` (markdown and numbers), :mod:`.aggregate` (pure pandas per table),
:mod:`.figures` (seaborn), :mod:`.tables` (the specs and the renderer), :mod:`.sections`
(header, samples, asv, bench, GPU, all runs).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from ..record import _fsync_dir, replace_atomic
from ..results import epochs_frame, runs_frame, scan_records
from .aggregate import dedupe, group_label, normalise
from .format import markdown_table
from .sections import SAMPLE_TEMPERATURES, all_runs, asv_section, bench_section, gpu_section, header, published_source
from .sections import samples as sample_grids
from .tables import TABLES, TableSpec, paper_parameter_counts, render_table

__all__ = [
    "MANIFEST",
    "SAMPLE_TEMPERATURES",
    "TABLES",
    "TableSpec",
    "check_out_dir",
    "load_published",
    "markdown_table",
    "paper_parameter_counts",
    "write_report",
]

MANIFEST = ".mefbench-report.json"
_STAGING = ".figures.tmp"  # + the pid: the folder a report draws its figures in before moving them


def load_published() -> dict:
    """The published numbers (``mefbench/published.json``) with their source."""
    return json.loads(resources.files("mefbench").joinpath("published.json").read_text())


def check_out_dir(out_dir: str | Path, inputs: Iterable[str | Path | None] = ()) -> None:
    """Refuse (ValueError) a report folder this report may not write into.

    A folder is the report's when it holds the manifest a previous report wrote (:data:`MANIFEST`);
    otherwise it must not exist yet, or hold nothing but the report's inputs (``inputs``: the runs
    folder, bench file, GPU and asv folders, which a report may keep beside its README, as
    ``reports/`` keeps ``reports/runs``). Anything else (a project's own README.md, say) would be
    overwritten or mixed with the report: refused, naming the folder and what is in the way.
    """
    out_dir = Path(out_dir)
    if not out_dir.exists() or (out_dir / MANIFEST).is_file():
        return
    if not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file, not a folder: pick another --out (a new or empty folder)")
    kept = [Path(p).resolve() for p in inputs if p is not None and str(p)]
    others = sorted(
        p.name
        for p in out_dir.iterdir()
        if not p.name.startswith(_STAGING)  # a killed first report's figures: its own
        and not any(k == p.resolve() or p.resolve() in k.parents for k in kept)
    )
    if not others:
        return
    if "README.md" in others:
        what = f"writing there would replace {out_dir / 'README.md'}, which no mefbench report wrote"
    else:
        shown = ", ".join(others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
        what = f"it already holds {shown}"
    raise ValueError(
        f"refused --out {out_dir}: it is not a report folder (no {MANIFEST} from an earlier report) and {what}; "
        "pick another --out (a new or empty folder), or remove what is there; nothing was written"
    )


def write_report(
    runs_dir: str | Path,
    out_dir: str | Path,
    *,
    asv_dir: str | Path | None = None,
    bench_file: str | Path | None = None,
    gpu_dir: str | Path | None = None,
    command: str | None = None,
    samples: bool = True,
) -> Path:
    """Aggregate the runs under runs_dir into ``out_dir/README.md`` and ``out_dir/figures/*.png``.

    Sections: header (command, date, versions, machines, every unfinished run, duplicates,
    unreadable records), every table of :data:`TABLES` with its figures, samples under Table 2
    (``samples=False`` skips them), GPU results, layer speed (asv), performance (``mefbench
    bench``), all runs. Returns the README path. Raises ValueError, writing nothing, if runs_dir
    does not exist or holds no readable run record, or if out_dir is not the report's to write
    (:func:`check_out_dir`). An OSError while writing (a full disk) leaves the previous report
    as it was.
    """
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    if not runs_dir.exists():
        raise ValueError(f"runs directory {runs_dir} does not exist; nothing was written to {out_dir}")
    records, corrupt = scan_records(runs_dir)
    if not records:
        what = f" ({len(corrupt)} unreadable: {', '.join(c['path'] for c in corrupt)})" if corrupt else ""
        raise ValueError(f"no readable run record under {runs_dir}{what}; nothing was written to {out_dir}")
    check_out_dir(out_dir, [runs_dir, asv_dir, bench_file, gpu_dir])
    runs, epochs = runs_frame(records, corrupt), epochs_frame(records, corrupt)
    runs, duplicates = dedupe(normalise(runs))
    epochs = epochs[epochs["path"].isin(runs["path"])]
    labels = [
        group_label(d, s, r) for d, s, r in zip(runs["dataset"], runs["scale"], runs["model_revision"], strict=True)
    ]
    runs = runs.assign(group=labels)
    published = load_published()
    figdir = out_dir / "figures"
    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_staging(out_dir)
    staging = out_dir / f"{_STAGING}{os.getpid()}"  # every figure is drawn here first
    staging.mkdir()
    try:
        lines = header(runs, corrupt, duplicates, runs_dir, command)
        no_samples = ["### Samples", "", "Not drawn (`samples=False`).", ""]
        sample_lines = sample_grids(runs, staging)[0] if samples else no_samples
        bench = _read_bench(bench_file)
        for spec in TABLES.values():
            lines += render_table(spec, runs, epochs, published, staging, bench)
            if spec.id == "2":
                lines += sample_lines
        lines += gpu_section(gpu_dir)
        lines += asv_section(asv_dir, staging)[0] + bench_section(bench_file) + all_runs(runs)
        lines += published_source(published)
        readme = out_dir / "README.md"
        text = "\n".join(lines).rstrip() + "\n"

        def publish(point: str) -> None:  # the README is written, not yet renamed: now the figures
            if point == "tmp-written":
                _publish_figures(staging, figdir)

        replace_atomic(readme, lambda f: f.write(text.encode()), hook=publish)
    except OSError as exc:
        message = (
            f"writing the report in {out_dir} failed ({exc.strerror or exc}); the previous report there, "
            "README and figures, is left as it was"
        )
        raise (OSError(exc.errno, message) if exc.errno else OSError(message)) from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _update_manifest(out_dir, sorted(_referenced(lines)))  # every figure made is shown
    return readme


def _remove_stale_staging(out_dir: Path) -> None:
    """Remove the figure folders that killed reports left (those of live processes are theirs)."""
    for stale in out_dir.glob(f"{_STAGING}*"):
        pid = stale.name.removeprefix(_STAGING)
        try:
            os.kill(int(pid), 0)  # raises if no such process
            continue
        except ProcessLookupError:
            pass
        except (ValueError, OSError):  # not our name, or a process of another user
            continue
        shutil.rmtree(stale, ignore_errors=True)


def _publish_figures(staging: Path, figdir: Path) -> None:
    """Move every figure drawn in staging into figdir (renames: no new data is written)."""
    figdir.mkdir(exist_ok=True)
    for path in sorted(staging.iterdir()):
        os.replace(path, figdir / path.name)
    _fsync_dir(figdir)


def _read_bench(bench_file: str | Path | None) -> dict | None:
    """The data of a ``mefbench bench --json`` file, or None (the bench section says why)."""
    if bench_file is None or not Path(bench_file).is_file():
        return None
    try:
        data = json.loads(Path(bench_file).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _referenced(lines: list[str]) -> set[str]:
    names = set()
    for line in lines:
        start = 0
        while (i := line.find("(figures/", start)) >= 0:
            end = line.find(")", i)
            names.add(line[i + len("(figures/") : end])
            start = end
    return names


def _update_manifest(out_dir: Path, figures: list[str]) -> None:
    """Remove the figures the previous report made and this one did not; record this one's."""
    path = out_dir / MANIFEST
    try:
        old = json.loads(path.read_text()).get("figures", []) if path.exists() else []
    except (OSError, ValueError, AttributeError):
        old = []
    for name in set(old) - set(figures):
        stale = out_dir / "figures" / Path(name).name
        if stale.is_file():
            stale.unlink()
    manifest = json.dumps({"files": ["README.md"], "figures": figures}, indent=2)
    replace_atomic(path, lambda f: f.write(manifest.encode()))

"""The comparison report: ``README.md`` and PNG figures from run records (DESIGN.md §4).

``write_report(runs_dir, out_dir)`` reads every run under runs_dir (:mod:`mefbench.results`),
counts each preset and seed once, renders every table of :data:`~mefbench.report.tables.TABLES`
per data group (dataset, scale, model revision) and writes ``out_dir/README.md`` and
``out_dir/figures/*.png``. Every number comes from the records, except Table 3's paper-scale
parameter counts (computed from the models) and the published values, which live only in
``mefbench/published.json`` with their source.

The report never destroys: a missing runs directory or one without a readable record is refused
before anything is written; only the files this function generates are written, and the only
files it removes are those a previous report listed in its manifest (``.mefbench-report.json``)
and this one no longer makes.

Modules: :mod:`.format` (markdown and numbers), :mod:`.aggregate` (pure pandas per table),
:mod:`.figures` (seaborn), :mod:`.tables` (the specs and the renderer), :mod:`.sections`
(header, samples, asv, bench, GPU, all runs).
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path

from ..record import replace_atomic
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
    "load_published",
    "markdown_table",
    "paper_parameter_counts",
    "write_report",
]

MANIFEST = ".mefbench-report.json"


def load_published() -> dict:
    """The published numbers (``mefbench/published.json``) with their source."""
    return json.loads(resources.files("mefbench").joinpath("published.json").read_text())


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
    does not exist or holds no readable run record.
    """
    runs_dir, out_dir = Path(runs_dir), Path(out_dir)
    if not runs_dir.exists():
        raise ValueError(f"runs directory {runs_dir} does not exist; nothing was written to {out_dir}")
    records, corrupt = scan_records(runs_dir)
    if not records:
        what = f" ({len(corrupt)} unreadable: {', '.join(c['path'] for c in corrupt)})" if corrupt else ""
        raise ValueError(f"no readable run record under {runs_dir}{what}; nothing was written to {out_dir}")
    runs, epochs = runs_frame(records, corrupt), epochs_frame(records, corrupt)
    runs, duplicates = dedupe(normalise(runs))
    epochs = epochs[epochs["path"].isin(runs["path"])]
    labels = [
        group_label(d, s, r) for d, s, r in zip(runs["dataset"], runs["scale"], runs["model_revision"], strict=True)
    ]
    runs = runs.assign(group=labels)
    published = load_published()
    figdir = out_dir / "figures"
    figdir.mkdir(parents=True, exist_ok=True)

    lines = header(runs, corrupt, duplicates, runs_dir, command)
    no_samples = ["### Samples", "", "Not drawn (`samples=False`).", ""]
    sample_lines = sample_grids(runs, figdir)[0] if samples else no_samples
    bench = _read_bench(bench_file)
    for spec in TABLES.values():
        lines += render_table(spec, runs, epochs, published, figdir, bench)
        if spec.id == "2":
            lines += sample_lines
    lines += gpu_section(gpu_dir)
    lines += asv_section(asv_dir, figdir)[0] + bench_section(bench_file) + all_runs(runs) + published_source(published)
    readme = out_dir / "README.md"
    text = "\n".join(lines).rstrip() + "\n"
    replace_atomic(readme, lambda f: f.write(text.encode()))
    _update_manifest(out_dir, sorted(_referenced(lines)))  # every figure made is shown
    return readme


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


def __getattr__(name: str):
    if name == "PAPER_COUNT_PRESETS":
        import warnings

        from .tables import paper_count_presets

        warnings.warn(
            "mefbench.report.PAPER_COUNT_PRESETS is deprecated: use mefbench.report.tables.paper_count_presets()",
            DeprecationWarning,
            stacklevel=2,
        )
        return tuple(paper_count_presets())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

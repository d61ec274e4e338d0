import os
import shutil

import pytest

from mefbench.cli import main
from mefbench.layers import MIXING, registry_variants
from mefbench.presets import MATCH_TOLERANCE, PRESETS, STABILITY_COUPLINGS
from mefbench.record import RunLock, read_record
from mefbench.report.tables import TABLES
from mefbench.sweep import _key, parse_tables, plan
from mefbench.training import train


def test_plan_shares_runs_between_tables():
    tables = ("2", "4", "5", "6", "mixing")
    specs = plan(tables, "cpu", seeds=3)
    presets = [p for p in PRESETS.values() if p.scale == "cpu" and set(p.tables) & set(tables)]
    configs = {_key(p.model, p.train) for p in presets}
    assert len(specs) == 3 * len(configs) < 3 * len(presets)  # one run per distinct configuration and seed
    # MEF at lr 0.01 is one run for Tables 2, 4, 5, 6 and its mixing row, with its cell in each
    mef = [s for s in specs if {"2", "4", "5", "6", "mixing"} <= set(s.tables)]
    assert sorted(s.train.seed for s in mef) == [0, 1, 2]
    assert {s.name for s in mef} == {f"cpu-t2-mef-seed{i}" for i in range(3)}  # named after the earliest table
    assert mef[0].cells["4"] == {"coupling": "matexp", "lr": 0.01} and mef[0].cells["5"] == {"mixing": "matexp"}
    assert mef[0].cells["mixing"] == {"mixing": "matexp", "variant": "default"}
    # every mixing layer and variant has its row, the paper's PLU (free diagonal) shared with Table 5
    rows = {(s.cells["mixing"]["mixing"], s.cells["mixing"]["variant"]) for s in specs if "mixing" in s.cells}
    assert rows == {(name, label) for name, label, _ in registry_variants(MIXING)}
    plu = [s for s in specs if s.cells.get("mixing") == {"mixing": "plu", "variant": "free"}]
    assert plu and all("5" in s.tables for s in plu)
    assert plan(("3",), "cpu") == []  # parameter counts need no runs
    assert parse_tables("all") == tuple(TABLES) and parse_tables("4,2") == ("2", "4")


def test_seeds_default_to_the_tables_own():
    stability = plan(("stability",), "smoke")
    presets = [p for p in PRESETS.values() if p.scale == "smoke" and "stability" in p.tables]
    assert len(stability) == TABLES["stability"].seeds * len(presets)
    # the tables that decide something run at least 5 seeds
    assert min(TABLES[t].seeds for t in ("4", "5", "mixing", "stability")) >= 5
    assert len(plan(("4",), "smoke")) == TABLES["4"].seeds * 4
    # planned together, each run keeps its own tables' seeds
    both = plan(("4", "stability"), "smoke")
    assert len(both) == len(stability) + len(plan(("4",), "smoke"))


def test_paper_plan_takes_data_dirs():
    specs = plan((2,), "paper", seeds=1, data_dirs={"cifar10": "/data/c", "*": "/data/any"})
    dirs = {s.train.dataset: s.train.data_dir for s in specs}
    assert dirs == {"cifar10": "/data/c", "imagenet32": "/data/any", "imagenet64": "/data/any"}


def test_sweep_runs_keeps_resumes_and_skips(tmp_path, capsys):
    """A rerun keeps finished runs, resumes interrupted ones, and skips (with a message, going on)
    a run another process has locked and a run whose record is corrupt; one line per run even
    with --no-progress."""
    args = ["sweep", "--table", "5", "--scale", "smoke", "--seeds", "1", "--runs", str(tmp_path), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    records = {p.parent.name: read_record(p.parent) for p in tmp_path.glob("*/record.json")}
    assert len(records) == 3 and all(r.status == "finished" for r in records.values())
    assert {r.model["mixing"] for r in records.values()} == {"standard", "plu", "matexp"}
    for name, r in records.items():  # one line per finished run: name, status, test bits/dim
        assert f"{name}: finished, test bits/dim {r.final.test_bpd:.4f}" in out
        assert r.tables and all(isinstance(t, str) for t in r.tables) and "5" in r.cells
    assert records["smoke-t5-plu-seed0"].cells["5"] == {"mixing": "plu"}
    # one run interrupted after its first epoch and locked by another process, one corrupt
    names = sorted(records)
    interrupted, corrupt, kept = names
    spec = next(s for s in plan(parse_tables("5"), "smoke", seeds=1) if s.name == interrupted)
    shutil.rmtree(tmp_path / interrupted)
    train(spec.model, spec.train, tmp_path / interrupted, progress=False, stop_after_epochs=1, tables=spec.tables)
    (tmp_path / corrupt / "record.json").write_bytes(b"\x00\xff garbage")
    with RunLock(tmp_path / interrupted):
        assert main(args) == 1  # not every run was done: the exit status says so
    out, err = capsys.readouterr()
    assert f"{interrupted}: skipped: " in out and f"locked by process {os.getpid()}" in out
    assert f"{corrupt}: skipped: corrupt run record" in out and "not UTF-8" in out
    assert f"{kept}: finished, test bits/dim" in out and "(kept)" in out
    assert "2 of 3 runs not done" in out and "3 runs under" in out and "2 not done" in out
    assert "2 runs were not done" in err and f"  {corrupt}: skipped: corrupt run record" in err
    assert read_record(tmp_path / interrupted).status == "interrupted"  # not touched while locked
    # the lock released, a rerun resumes only that one and keeps the others (the corrupt one is
    # still not done)
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "1 of 3 runs not done: " + corrupt in out
    assert f"{interrupted}: resuming" in out and f"{interrupted}: finished, test bits/dim" in out
    resumed = read_record(tmp_path / interrupted)
    assert resumed.status == "finished" and resumed.resumes[0].from_epoch == 1
    assert read_record(tmp_path / kept) == records[kept]


def test_a_sweep_whose_runs_fail_exits_non_zero_naming_them(tmp_path, capsys):
    """Paper scale without --data-dir: every run fails before it records anything; the sweep says
    which and why, says no record exists, and exits 1. --runs naming a file is refused at once."""
    args = ["sweep", "--table", "2", "--scale", "paper", "--seeds", "1", "--runs", str(tmp_path / "runs")]
    assert main([*args, "--no-progress"]) == 1
    out, err = capsys.readouterr()
    names = [s.name for s in plan(("2",), "paper", seeds=1)]
    assert f"{len(names)} runs were not done:" in err
    for name in names:
        assert f"  {name}: FAILED (ValueError: dataset " in err and "--data-dir" in err
        assert f"{name}: FAILED" in out
    assert "nothing was recorded" in out and "its record says how far it got" not in out
    (tmp_path / "a-file").write_text("")
    assert main(["sweep", "--table", "2", "--scale", "smoke", "--runs", str(tmp_path / "a-file")]) == 2
    assert "--runs " in (err := capsys.readouterr().err) and "is a file, not a folder" in err


def test_a_finished_run_of_another_configuration_is_refused(tmp_path, capsys):
    """A run trained by hand with --lr 0.05 under the planned name used to be kept, and the planned
    cell was never trained: now it is refused, left as it is, with the fields that differ."""
    (spec,) = plan(("2",), "smoke", seeds=1)
    run = tmp_path / spec.name
    assert main(["train", "--preset", spec.presets[0], "--lr", "0.05", "--out", str(run), "--no-progress"]) == 0
    before = (run / "record.json").read_bytes()
    assert main(["sweep", "--table", "2", "--scale", "smoke", "--seeds", "1", "--runs", str(tmp_path)]) == 1
    out, err = capsys.readouterr()
    assert f"{spec.name}: refused: {run} holds a run of another configuration than planned" in out
    assert f"train.lr: 0.05 recorded, {spec.train.lr!r} planned" in err and "move it away" in out
    assert (run / "record.json").read_bytes() == before


@pytest.mark.slow
def test_the_stability_grid_end_to_end_at_smoke_scale(tmp_path, capsys):
    """The stability benchmark's smoke grid: its couplings at the grid's two rates, one seed, swept
    and reported (CI runs it; the cpu grid is the committed report's)."""
    from mefbench.report import write_report

    runs = tmp_path / "runs"
    assert (
        main(
            ["sweep", "--table", "stability", "--scale", "smoke", "--seeds", "1", "--runs", str(runs), "--no-progress"]
        )
        == 0
    )
    planned = plan(("stability",), "smoke", seeds=1)
    out = capsys.readouterr().out
    assert f"{len(planned)} runs under" in out
    text = write_report(runs, tmp_path / "report", samples=False).read_text()
    section = text[text.index("## Stability") :].split("\n## ")[0]
    for coupling, label in STABILITY_COUPLINGS:
        assert f"| {coupling} | {label} | 0.001 |" in section and f"| {coupling} | {label} | 0.1 |" in section
    assert "- **lr 0.001:**" in section and "- **lr 0.1:**" in section and "Sensitivity of blow-up" in section
    assert "(figures/stability_outcomes_vs_lr_patches16-smoke-scale.png)" in section
    # the couplings of a row are parameter-matched to the matrix-exp model (within the smoke tolerance)
    records = [read_record(p.parent) for p in runs.glob("*/record.json")]
    reference = next(r.num_params for r in records if r.model["coupling"] == "matexp")
    assert all(abs(r.num_params / reference - 1) <= MATCH_TOLERANCE["smoke"] for r in records)


def test_dry_run_lists_the_runs_and_estimates_without_training(tmp_path, capsys):
    runs = tmp_path / "runs"
    args = ["sweep", "--table", "4", "--scale", "smoke", "--seeds", "1", "--runs", str(runs), "--dry-run"]
    assert main([*args, "--no-measure"]) == 0
    out = capsys.readouterr().out
    planned = plan(("4",), "smoke", seeds=1)
    assert f"{len(planned)} runs planned" in out and not runs.exists()
    for spec in planned:
        steps = spec.train.epochs * spec.train.max_train_batches
        assert f"  {spec.name}: tables 4; at most {steps} steps" in out
    assert "in all:" not in out  # nothing measured
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "in all:" in out and "ms per training step" in out and not runs.exists()
    models = {(s.model.to_json(), s.train.batch_size) for s in planned}
    assert out.count("×)") == len(models) == 2  # each distinct model timed once: matrix-exp and affine

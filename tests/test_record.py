"""mefbench.record: the typed run record, its schema migration, errors naming the file, the lock;
mefbench.stats."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest

from mefbench.cli import main
from mefbench.config import PAPER_STEP
from mefbench.record import (
    SCHEMA,
    EpochRecord,
    RunError,
    RunLock,
    RunLockedError,
    RunRecord,
    migrate_records,
    read_record,
    remove_stale_temporaries,
    write_record,
)
from mefbench.stats import pool_stats, wilson_interval

# records of the first committed cpu reproduction (schema 1, model revision 1), kept as test data
COMMITTED = Path(__file__).resolve().parent / "data" / "schema1_runs"
# records of the committed cpu reproduction before the mixing layer was renamed (schema 2), as test data
SCHEMA2 = Path(__file__).resolve().parent / "data" / "schema2_runs"


def _record(**changes) -> RunRecord:
    epoch = EpochRecord(epoch=1, step=30, lr=0.01, train_bpd=5.0, train_bpd_ema=4.9, test_bpd=4.8,
                        test_bpd_raw=4.85, train_time_s=1.5, eval_time_s=0.2,
                        expm={"m": {"mean": 6.0, "std": 1.0, "max": 8.0, "min": 4.0, "count": 10}})  # fmt: skip
    base = {
        "name": "r", "preset": "cpu-t4-affine-lr0.01", "tables": ["4"], "cells": {"4": {"coupling": "affine", "lr": 0.01}},
        "scale": "cpu", "status": "interrupted", "model_revision": 2, "seed": 0,
        "model": {"image_shape": [3, 16, 16], "steps": [4, 2], "mixing": "matexp", "coupling": "affine",
                  "hidden_channels": 32, "num_blocks": 1, "mixing_options": {}, "coupling_options": {}},
        "train": {"dataset": "patches16", "lr": 0.01, "epochs": 4}, "epochs": [epoch],
    }  # fmt: skip
    return RunRecord(**{**base, **changes})


def test_record_round_trips_through_json(tmp_path):
    record = _record()
    write_record(tmp_path, record)
    assert read_record(tmp_path) == record == RunRecord.from_json(record.to_json())
    assert read_record(tmp_path / "record.json") == record
    assert record["status"] == "interrupted" and record["epochs"][0]["test_bpd"] == 4.8  # dict-style reads
    with pytest.raises(KeyError):
        record["nope"]
    assert json.loads((tmp_path / "record.json").read_text())["schema"] == SCHEMA == 4


def _bad(data: dict, **changes) -> str:
    return json.dumps({**data, **changes})


GOOD = _record().to_dict()


@pytest.mark.parametrize(
    "content,problem",
    [
        (bytes(range(256)), "not UTF-8 text"),
        (b"", "the file is empty"),
        (b"{ half a rec", "not valid JSON"),
        (b"[1, 2]", "the record must be a JSON object, got a list"),
        (b"42", "the record must be a JSON object, got the number 42"),
        (json.dumps({k: v for k, v in GOOD.items() if k != "epochs"}).encode(), "missing fields ['epochs']"),
        (_bad(GOOD, model={"mixing": "matexp"}).encode(), "missing fields ['model.image_shape'"),
        (_bad(GOOD, epochs="many").encode(), "field 'epochs' must be a list, got a string"),
        (_bad(GOOD, epochs=[{"epoch": 1}]).encode(), "missing fields ['epochs[0].step'"),
        (_bad(GOOD, epochs=[{**GOOD["epochs"][0], "test_bpd": "4.8"}]).encode(),
         "field 'epochs[0].test_bpd' must be a number, got a string"),
        (_bad(GOOD, tables=[4]).encode(), "field 'tables[0]' must be a string, got the number 4"),
        (_bad(GOOD, status="done").encode(), "field 'status' must be one of"),
        (_bad(GOOD, surprise=1).encode(), "unknown fields ['surprise']"),
        (_bad(GOOD, schema=SCHEMA + 1).encode(), f"schema {SCHEMA + 1}, written by a newer mefbench"),
        (_bad(GOOD, epochs=[GOOD["epochs"][0], {**GOOD["epochs"][0], "epoch": 3}]).encode(),
         "epochs are numbered [1, 3], not 1..2"),
    ],
)  # fmt: skip
def test_read_record_names_the_file_and_the_problem(tmp_path, content, problem):
    (tmp_path / "record.json").write_bytes(content)
    with pytest.raises(RunError) as err:
        read_record(tmp_path)
    message = str(err.value)
    assert message.startswith(f"corrupt run record {tmp_path / 'record.json'}: ") and problem in message
    for raw in ("codec can't decode", "list indices", "KeyError", "Expecting value"):
        assert raw not in message


def test_missing_record_is_named(tmp_path):
    with pytest.raises(RunError, match=f"no record.json in {tmp_path}"):
        read_record(tmp_path)


@pytest.mark.parametrize("run", sorted(p.name for p in COMMITTED.iterdir()) if COMMITTED.exists() else [])
def test_committed_schema1_records_load(run):
    """Records of the first committed cpu reproduction (schema 1) load, migrated: string table ids, cells derived
    from the presets, model revision 1, the model's flat options moved into coupling_options."""
    raw = json.loads((COMMITTED / run / "record.json").read_text())
    assert raw["schema"] == 1
    record = read_record(COMMITTED / run)
    assert record.schema == SCHEMA and record.model_revision == 1
    assert record.tables == [str(t) for t in raw["tables"]]
    assert "scale" not in record.model and record.model["coupling_options"] == {}
    assert record.model_config().coupling == raw["model"]["coupling"]
    assert len(record.epochs) == len(raw["epochs"]) and record.final.test_bpd == raw["final"]["test_bpd"]
    assert record.final.sample_time_per_image_s is None  # not measured before schema 2
    for table in record.tables:  # every table of these runs has a cell with the run's own values
        cell = record.cells[table]
        assert cell and all(record.model.get(k, record.train.get(k)) == v for k, v in cell.items())
    if raw["preset"] == "cpu-t4-affine-lr0.01":
        assert record.cells == {"4": {"coupling": "affine", "lr": 0.01}}
    if raw["preset"] == "cpu-t2-mef":  # shared: Table 2, the matexp cells of Tables 4 and 5, Table 6
        assert record.cells == {"2": {"dataset": "patches16"}, "4": {"coupling": "matexp", "lr": 0.01},
                                "5": {"mixing": "matexp"}, "6": {"dataset": "patches16"}}  # fmt: skip


def test_schema1_flat_model_options_migrate():
    raw = json.loads((COMMITTED / "cpu-t5-plu-seed0" / "record.json").read_text())
    raw["model"] = {**raw["model"], "coupling": "affine", "scale": "sigmoid"}
    record = RunRecord.from_dict(raw)
    assert record.model["coupling_options"] == {"scale": "sigmoid"} and record.model_config().coupling_options == {
        "scale": "sigmoid"
    }


@pytest.mark.parametrize("run", sorted(p.name for p in SCHEMA2.iterdir()))
def test_schema2_records_load_with_the_mixing_layer_renamed(run):
    """Schema 2 called the mixing layer ``conv``: in the model dict, its options and the table cells."""
    raw = json.loads((SCHEMA2 / run / "record.json").read_text())
    assert raw["schema"] == 2 and "conv" in raw["model"]
    record = read_record(SCHEMA2 / run)
    assert record.schema == SCHEMA and "conv" not in record.model and "conv_options" not in record.model
    assert record.model["mixing"] == raw["model"]["conv"]
    assert record.model["mixing_options"] == raw["model"]["conv_options"]
    assert (record.model["net"], record.model["net_options"], record.model["step"]) == (
        "resnet",
        {},
        ["actnorm", "mixing", "coupling"],
    )  # the model every record before them built
    for table, cell in raw["cells"].items():
        assert record.cells[table] == {("mixing" if k == "conv" else k): v for k, v in cell.items()}
    config = record.model_config()
    assert config.mixing == raw["model"]["conv"] and config.step == PAPER_STEP
    assert record.tables == raw["tables"] and record.final.test_bpd == raw["final"]["test_bpd"]


def test_migrate_records_command(tmp_path, capsys):
    runs = tmp_path / "runs"
    for name in ("cpu-t2-mef-seed0", "cpu-t5-plu-seed1"):
        shutil.copytree(COMMITTED / name, runs / name)
    (runs / "broken").mkdir()
    (runs / "broken" / "record.json").write_text("[1, 2]")
    before = {name: read_record(runs / name) for name in ("cpu-t2-mef-seed0", "cpu-t5-plu-seed1")}
    assert main(["migrate-records", str(runs)]) == 1  # one record is unreadable: said, and left alone
    captured = capsys.readouterr()
    assert f"2 records migrated to schema {SCHEMA}, 0 already current, 0 locked, 1 unreadable" in captured.out
    assert "broken" in captured.err and (runs / "broken" / "record.json").read_text() == "[1, 2]"
    for name, record in before.items():
        assert json.loads((runs / name / "record.json").read_text())["schema"] == SCHEMA
        assert read_record(runs / name) == record  # the same record, now in today's schema on disk
        assert not (runs / name / ".lock").exists()  # no lock file is left in directories that had none
    migrated, current, locked, unreadable = migrate_records(runs)
    assert migrated == [] and len(current) == 2 and locked == [] and len(unreadable) == 1
    # a run in progress (its directory locked) is left to its trainer
    shutil.copytree(COMMITTED / "cpu-t4-affine-lr0.01-seed0", runs / "busy")
    with RunLock(runs / "busy"):
        migrated, current, locked, unreadable = migrate_records(runs)
    assert locked == [runs / "busy" / "record.json"] and migrated == []
    assert json.loads((runs / "busy" / "record.json").read_text())["schema"] == 1


def test_remove_stale_temporaries(tmp_path):
    for name in (".record.json.tmp123", ".checkpoint.pt.tmp9", "keep.txt", ".lock"):
        (tmp_path / name).write_bytes(b"")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == [".checkpoint.pt.tmp9", ".record.json.tmp123"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "keep.txt"]


def test_run_lock_is_exclusive_and_names_its_holder(tmp_path):
    with RunLock(tmp_path) as held:
        assert held.held
        with pytest.raises(RunLockedError, match=f"locked by process {os.getpid()}") as err:
            RunLock(tmp_path).acquire()  # another open file description: refused, even in one process
        assert err.value.pid == os.getpid()
    with RunLock(tmp_path):  # released on exit
        pass


def test_pool_stats():
    parts = [{"count": 2, "mean": 1.0, "std": 0.0, "max": 1.0, "min": 1.0},
             {"count": 2, "mean": 3.0, "std": 0.0, "max": 3.0, "min": 3.0}, {}]  # fmt: skip
    assert pool_stats(parts) == {"count": 4, "mean": 2.0, "std": 1.0, "max": 3.0, "min": 1.0}
    assert pool_stats([{}]) == {}


def test_wilson_interval():
    """The Wilson interval is the set of p with (p̂ − p)² ≤ z² p(1 − p)/n: its ends are the roots of
    that quadratic in p, solved here independently with numpy; at k = 0 the upper end is z²/(n + z²)."""
    import numpy as np

    for k, n, z in ((0, 3, 1.96), (3, 3, 1.96), (5, 10, 1.96), (1, 20, 2.576), (7, 9, 1.0)):
        p = k / n
        # (1 + z²/n) p² − (2p̂ + z²/n) p + p̂² = 0
        roots = sorted(np.roots([1 + z * z / n, -(2 * p + z * z / n), p * p]).real)
        assert wilson_interval(k, n, z) == pytest.approx(tuple(roots), abs=1e-12)
    assert wilson_interval(0, 3)[1] == pytest.approx(1.96**2 / (3 + 1.96**2))
    assert wilson_interval(0, 3)[0] == 0.0 and wilson_interval(3, 3)[1] == 1.0
    assert wilson_interval(0, 0) == (0.0, 1.0)
    for k in range(8):
        low, high = wilson_interval(k, 7)
        assert 0 <= low <= k / 7 <= high <= 1 and not math.isnan(low)
    for bad in ((4, 3), (-1, 3), (1, 3, 0.0)):
        with pytest.raises(ValueError, match="wilson_interval"):
            wilson_interval(*bad)


def test_one_number_coercer():
    import math

    import numpy as np

    from mefbench.stats import as_float

    assert as_float(3) == 3.0 and as_float(np.int64(2)) == 2.0 and as_float(np.float32(0.5)) == 0.5
    assert as_float(math.inf) == math.inf
    for missing in (None, True, "4.2", [1.0], {"a": 1}):
        assert math.isnan(as_float(missing)), missing


def test_a_schema_3_record_reads_as_today_s_without_the_new_fields(tmp_path):
    """Schema 4 only added optional fields (validation, loss summaries, stop): a schema-3 record
    reads unchanged, with them empty."""
    new = {"valid_bpd", "loss_first", "loss_max", "loss_max_step"}
    data = {k: v for k, v in GOOD.items() if k not in ("stop", "initial_valid_bpd")} | {"schema": 3}
    data["epochs"] = [{k: v for k, v in e.items() if k not in new} for e in data["epochs"]]
    data["final"] = None
    (tmp_path / "record.json").write_text(json.dumps(data))
    record = read_record(tmp_path)
    assert record.schema == SCHEMA and record.stop is None and record.initial_valid_bpd is None
    assert all(e.valid_bpd is None and e.loss_max is None for e in record.epochs)

"""mefbench.results: run records -> tidy DataFrames, corrupt records warned about and listed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mefbench.presets import PRESETS
from mefbench.results import (
    EPOCH_COLUMNS,
    RUN_COLUMNS,
    CorruptRecordWarning,
    load_epochs,
    load_runs,
)
from mefbench.stats import pool_stats


def _final(record: dict) -> dict:
    """The ``final`` dict of a schema-1 record, as mefbench wrote it before the typed record."""
    epochs = record["epochs"]
    times = [e["train_time_s"] for e in epochs]
    last = epochs[-1]
    return {
        "epochs_done": len(epochs), "step": last["step"], "test_bpd": last["test_bpd"],
        "test_bpd_raw": last["test_bpd_raw"], "train_bpd": last["train_bpd"], "train_bpd_ema": last["train_bpd_ema"],
        "train_time_s": sum(times), "mean_epoch_time_s": sum(times) / len(times),
        "expm": {k: pool_stats([e["expm"].get(k, {}) for e in epochs]) for k in ("m", "s")},
    }  # fmt: skip


def make_record(
    preset: str,
    seed: int,
    final_bpd: float,
    *,
    epochs_done: int | None = None,
    status: str = "finished",
    epoch_time: float = 10.0,
    m: tuple[float, float, float, float, int] = (6.0, 1.0, 8.0, 4.0, 100),
    diverged: dict | None = None,
) -> dict:
    """A schema-1 record (as mefbench wrote before the typed record) for the preset's configs.

    A finished run has 4 epochs (or stopped there: the presets' epochs are caps), others
    ``epochs_done``; test bits/dim falls by 0.1 per epoch to ``final_bpd``; every epoch has the
    same time and expm statistics ``m``.
    """
    p = PRESETS[preset]
    n = min(4, p.train.epochs) if epochs_done is None else epochs_done
    mean, std, mx, mn, count = m
    epochs = []
    for i in range(n):
        bpd = final_bpd + 0.1 * (n - 1 - i)
        epochs.append({
            "epoch": i + 1, "step": 30 * (i + 1), "lr": p.train.lr, "train_bpd": bpd + 0.05,
            "train_bpd_ema": bpd + 0.02, "test_bpd": bpd, "test_bpd_raw": bpd + 0.01,
            "train_time_s": epoch_time, "eval_time_s": 1.0,
            "expm": {"m": {"mean": mean, "std": std, "max": mx, "min": mn, "count": count},
                     "s": {"mean": 2.0, "std": 0.5, "max": 3.0, "min": 1.0, "count": count}},
        })  # fmt: skip
    record = {
        "schema": 1, "name": f"{preset}-s{seed}", "preset": preset, "tables": list(p.tables), "scale": p.scale,
        "status": status, "seed": seed,
        # schema 1: the model's flat scale/coupling_rank, "conv" for the mixing layer, no amp/channels_last in train
        "model": {**{k: v for k, v in p.model.to_dict().items() if not k.endswith("_options")
                     and k not in ("mixing", "net", "step")},
                  "conv": p.model.mixing, "scale": "tanh", "coupling_rank": None},
        "train": {**{k: v for k, v in p.train.to_dict().items() if k not in ("amp", "channels_last")}, "seed": seed},
        "device": "cpu", "world_size": 1,
        "versions": {"mefbench": "0.1.0", "torch": "2.13.0", "python": "3.12.0"},
        "machine": {"platform": "Linux-test", "processor": "x86_64", "cpu_count": 2, "torch_threads": 2},
        "num_params": 12345, "epochs": epochs, "final": {}, "diverged": diverged, "resumes": [],
        "command": ["mefbench", "train", "--preset", preset], "started_at": "2026-01-01T00:00:00+00:00",
        "updated_at": "2026-01-01T01:00:00+00:00",
    }  # fmt: skip
    if epochs:
        record["final"] = _final(record)
    return record


def write_record(root: Path, name: str, record: dict) -> Path:
    run_dir = root / name
    run_dir.mkdir(parents=True)
    # as record.write_json_atomic writes it (NaN allowed)
    (run_dir / "record.json").write_text(json.dumps(record, indent=2, allow_nan=True))
    return run_dir


def test_load_runs_columns_and_values(tmp_path):
    write_record(tmp_path, "a", make_record("cpu-t5-plu", 0, 4.25, epoch_time=12.0))
    write_record(tmp_path / "nested", "b", make_record("cpu-t5-plu", 1, 4.4, epochs_done=1, status="interrupted"))
    df = load_runs(tmp_path)
    assert set(RUN_COLUMNS) <= set(df.columns)
    assert len(df) == 2 and df.attrs["corrupt"] == []
    a = df.set_index("run").loc["a"]
    assert a["preset"] == "cpu-t5-plu" and a["tables"] == ("5",) and a["scale"] == "cpu"
    # schema-1 records: model revision 1, cells derived from the presets, options migrated
    assert a["model_revision"] == 1 and a["cells"] == {"5": {"mixing": "plu"}}
    assert a["mixing_options"] == {} and a["coupling_options"] == {} and a["amp"] is None
    assert math.isnan(a["sample_time_per_image_s"]) and math.isnan(a["roundtrip_error"])
    assert a["mixing"] == "plu" and a["coupling"] == "matexp" and a["dataset"] == "patches16"
    n = 4
    assert a["epochs"] == PRESETS["cpu-t5-plu"].train.epochs and a["epochs_done"] == n
    assert a["test_bpd"] == 4.25 and a["test_bpd_raw"] == 4.26 and a["train_bpd"] == pytest.approx(4.30)
    # no whole-test-split number before schema 3: the tables' number is the last epoch's
    assert math.isnan(a["test_bpd_full"]) and a["final_bpd"] == 4.25 and a["stop_reason"] is None
    assert a["mean_epoch_time_s"] == 12.0 and a["median_epoch_time_s"] == 12.0 and a["train_time_s"] == 12.0 * n
    assert a["m_mean"] == 6.0 and a["m_count"] == 100 * n and a["m_max"] == 8.0 and a["s_mean"] == 2.0
    assert math.isnan(a["diverged_step"])
    assert df.set_index("run").loc["b", "status"] == "interrupted"
    assert Path(a["path"]).name == "a"


def test_load_runs_diverged_run(tmp_path):
    rec = make_record("cpu-t4-matexp-lr0.01", 0, 4.6, epochs_done=1, status="diverged",
                      diverged={"epoch": 2, "step": 47, "loss": float("nan")})  # fmt: skip
    write_record(tmp_path, "d", rec)
    row = load_runs(tmp_path).iloc[0]
    assert row["status"] == "diverged" and row["diverged_step"] == 47 and row["diverged_epoch"] == 2
    assert row["epochs_done"] == 1 and row["lr"] == 0.01


@pytest.mark.parametrize(
    "content",
    [
        "{not json",
        "",
        "[1, 2]",
        json.dumps({"status": "finished"}),  # missing fields
        json.dumps({**make_record("smoke", 0, 5.0), "model": {"mixing": "matexp"}}),
        json.dumps({**make_record("smoke", 0, 5.0), "epochs": [{"epoch": 1}]}),
        bytes(range(256)) * 4,  # random bytes: not UTF-8
        json.dumps({**make_record("smoke", 0, 5.0), "epochs": "many"}),  # wrong type
        json.dumps({**make_record("smoke", 0, 5.0), "status": "done"}),  # unknown status
        json.dumps({**make_record("smoke", 0, 5.0), "schema": 9}),  # a newer mefbench's
    ],
)
def test_load_runs_survives_corrupt_record(tmp_path, content):
    write_record(tmp_path, "good", make_record("smoke", 0, 5.0))
    bad = tmp_path / "bad" / "record.json"
    bad.parent.mkdir()
    bad.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.warns(CorruptRecordWarning, match=str(bad)):
        df = load_runs(tmp_path)
    assert list(df["run"]) == ["good"]
    assert [c["path"] for c in df.attrs["corrupt"]] == [str(bad)]
    assert str(bad) in df.attrs["corrupt"][0]["error"]  # the reason names the file
    with pytest.warns(CorruptRecordWarning):
        ep = load_epochs(tmp_path)
    assert set(ep["run"]) == {"good"} and len(ep.attrs["corrupt"]) == 1


def test_load_runs_empty_and_missing(tmp_path):
    df = load_runs(tmp_path)
    assert df.empty and set(RUN_COLUMNS) <= set(df.columns) and df.attrs["corrupt"] == []
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_runs(tmp_path / "nope")


def test_load_epochs_one_row_per_epoch(tmp_path):
    write_record(tmp_path, "a", make_record("cpu-t2-mef", 0, 4.2))
    write_record(tmp_path, "b", make_record("cpu-t2-mef", 1, 4.6, epochs_done=1, status="interrupted"))
    ep = load_epochs(tmp_path)
    assert len(ep) == 5
    a = ep[ep["run"] == "a"].sort_values("epoch")
    assert list(a["epoch"]) == [1, 2, 3, 4] and list(a["test_bpd"]) == pytest.approx([4.5, 4.4, 4.3, 4.2])
    assert set(EPOCH_COLUMNS) <= set(ep.columns)
    assert (a["tables"] == ("2", "6")).all() and (a["m_count"] == 100).all() and (a["epoch_lr"] == 0.01).all()


def test_run_expm_stats_match_pooled_epochs(tmp_path):
    rec = make_record("cpu-t2-mef", 0, 4.4)
    rec["epochs"][1]["expm"]["m"] = {"mean": 8.0, "std": 2.0, "max": 12.0, "min": 5.0, "count": 300}
    rec["final"] = _final(rec)
    del rec["final"]["expm"]  # loading pools the epochs itself when final has no expm
    write_record(tmp_path, "a", rec)
    row = load_runs(tmp_path).iloc[0]
    expect = pool_stats([e["expm"]["m"] for e in rec["epochs"]])
    assert row["m_mean"] == pytest.approx(expect["mean"]) and row["m_std"] == pytest.approx(expect["std"])
    assert row["m_count"] == 600 and row["m_max"] == 12.0 and row["m_min"] == 4.0

"""mefbench.asv_results on a small results folder written in asv 0.6's format, plus malformed files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from mefbench.asv_results import COLUMNS, asv_speed_table, load_asv_results, plot_asv_history

RESULT_COLUMNS = [
    "result", "params", "version", "started_at", "duration", "stats_ci_99_a", "stats_ci_99_b",
    "stats_q_25", "stats_q_75", "stats_number", "stats_repeat", "samples", "profile",
]  # fmt: skip

BENCHMARKS = {
    "linalg.Expm.time_forward": {
        "name": "linalg.Expm.time_forward",
        "param_names": ["method", "n"],
        "params": [["'mefbench'", "'torch'"], ["6", "48"]],
        "type": "time",
        "unit": "seconds",
        "version": "aaaa",
    },
    "model.Reference.peakmem_torch_only": {
        "name": "model.Reference.peakmem_torch_only",
        "param_names": [],
        "params": [],
        "type": "peakmemory",
        "unit": "bytes",
        "version": "bbbb",
    },
    "model.ShortTraining.track_bits_per_dim": {
        "name": "model.ShortTraining.track_bits_per_dim",
        "param_names": [],
        "params": [],
        "type": "track",
        "unit": "bits/dim",
        "version": "cccc",
    },
    "version": 2,
}


def _row(values: list | None, params: list) -> list:
    n = len(values) if values else 1
    return [
        values,
        params,
        "aaaa",
        1795858669720,
        1.5,
        [None] * n,
        [None] * n,
        values,
        values,
        [1] * n,
        [1] * n,
    ]


def _result_file(commit: str, date_ms: int, scale: float, failed: bool = False) -> dict:
    expm = [1e-3 * scale, 2e-3 * scale, None if failed else 3e-3 * scale, 4e-3 * scale]
    return {
        "commit_hash": commit,
        "env_name": "virtualenv-py3.11-torch2.13.0",
        "date": date_ms,
        "params": {"machine": "box", "python": "3.11", "torch": "2.13.0"},
        "python": "3.11",
        "requirements": {"torch": "2.13.0"},
        "env_vars": {},
        "result_columns": RESULT_COLUMNS,
        "results": {
            "linalg.Expm.time_forward": _row(expm, [["'mefbench'", "'torch'"], ["6", "48"]]),
            "model.Reference.peakmem_torch_only": _row([300 * 2**20], []),
            "model.ShortTraining.track_bits_per_dim": _row([6.25 / scale], []),
        },
        "durations": {"<build>": 3.0, "<setup_cache x>": 0.1},
        "version": 2,
    }


@pytest.fixture
def asv_dir(tmp_path: Path) -> Path:
    results = tmp_path / ".asv" / "results"
    box = results / "box"
    box.mkdir(parents=True)
    (results / "benchmarks.json").write_text(json.dumps(BENCHMARKS))
    (box / "machine.json").write_text(json.dumps({"machine": "box", "num_cpu": "2", "version": 1}))
    old, new = "1" * 40, "2" * 40
    (box / f"{old[:8]}-virtualenv-py3.11-torch2.13.0.json").write_text(
        json.dumps(_result_file(old, 1_700_000_000_000, 1.0, failed=True))
    )
    (box / f"{new[:8]}-virtualenv-py3.11-torch2.13.0.json").write_text(
        json.dumps(_result_file(new, 1_700_086_400_000, 2.0))
    )
    (box / "deadbeef-broken.json").write_text('{"commit_hash": "dead", "results": {')
    (box / "cafebabe-wrong.json").write_text(json.dumps({"commit_hash": "cafe", "results": []}))
    return tmp_path / ".asv"


def _load(asv_dir: Path) -> pd.DataFrame:
    with pytest.warns(UserWarning) as caught:
        df = load_asv_results(asv_dir)
    messages = " ".join(str(w.message) for w in caught)
    assert "deadbeef-broken.json" in messages and "cafebabe-wrong.json" in messages
    return df


def test_load_tidy_frame(asv_dir: Path):
    df = _load(asv_dir)
    assert list(df.columns) == COLUMNS
    assert len(df) == 2 * (4 + 1 + 1)
    assert set(df["machine"]) == {"box"}
    assert set(df["env"]) == {"virtualenv-py3.11-torch2.13.0"}
    assert df["date"].min() == pd.Timestamp(1_700_000_000_000, unit="ms", tz="UTC")
    expm = df[(df["benchmark"] == "linalg.Expm.time_forward") & (df["commit"] == "1" * 40)]
    assert list(expm["params"]) == [
        "method=mefbench, n=6",
        "method=mefbench, n=48",
        "method=torch, n=6",
        "method=torch, n=48",
    ]
    assert expm["value"].iloc[0] == pytest.approx(1e-3)
    assert math.isnan(expm["value"].iloc[2])  # the failed point
    units = df.groupby("benchmark")["unit"].first().to_dict()
    assert units == {
        "linalg.Expm.time_forward": "seconds",
        "model.Reference.peakmem_torch_only": "bytes",
        "model.ShortTraining.track_bits_per_dim": "bits/dim",
    }
    assert set(df.loc[df["benchmark"] == "model.Reference.peakmem_torch_only", "params"]) == {""}


def test_names_and_units_without_benchmarks_json(asv_dir: Path):
    (asv_dir / "results" / "benchmarks.json").unlink()
    df = _load(asv_dir)
    assert "p0=torch, p1=48" in set(df["params"])
    units = df.groupby("benchmark")["unit"].first().to_dict()
    assert units["linalg.Expm.time_forward"] == "seconds"
    assert units["model.Reference.peakmem_torch_only"] == "bytes"


def test_results_folder_given_directly(asv_dir: Path):
    assert len(_load(asv_dir / "results")) == len(_load(asv_dir))


def test_missing_results_dir(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="asv run"):
        load_asv_results(tmp_path / "nowhere")


def test_speed_table_takes_the_latest_commit(asv_dir: Path):
    table = asv_speed_table(_load(asv_dir))
    assert list(table.columns) == ["box"]
    assert table.attrs["commits"] == {"box": "2" * 40}
    assert len(table) == 4  # time_ benchmarks only
    assert table.loc[("linalg.Expm.time_forward", "method=torch, n=6"), "box"] == pytest.approx(6.0)


def test_plot_history(asv_dir: Path, tmp_path: Path):
    out = plot_asv_history(
        _load(asv_dir),
        tmp_path / "fig" / "asv.png",
        benchmarks={
            "linalg.Expm.time_forward": {"n": "6"},
            "model.ShortTraining.track_bits_per_dim": {},
        },
    )
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="none of the benchmarks"):
        plot_asv_history(_load(asv_dir), tmp_path / "x.png", benchmarks={"nope.time_x": {}})

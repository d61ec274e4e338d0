import json
import os

import pytest
from PIL import Image

from mefbench.cli import main
from mefbench.config import FlowConfig, TrainConfig
from mefbench.presets import PRESETS
from mefbench.record import SCHEMA


def test_presets_lists_every_preset(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in PRESETS:
        assert f"\n{name} " in out


def test_train_then_sample(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--out", str(run), "--no-progress"]) == 0
    assert "finished" in capsys.readouterr().out
    record = json.loads((run / "record.json").read_text())
    # the preset the CLI names is the one that ran
    assert FlowConfig.from_dict(record["model"]) == PRESETS["smoke"].model
    assert TrainConfig.from_dict(record["train"]) == PRESETS["smoke"].train
    assert record["schema"] == SCHEMA and record["final"]["sample_time_per_image_s"] > 0
    png = tmp_path / "s.png"
    assert main(["sample", "--run", str(run), "--temperature", "0.7", "--n", "4", "--out", str(png)]) == 0
    with Image.open(png) as im:
        assert im.size[0] > 16 and im.mode == "RGB"
    # --run may name the run's record.json; --out a directory gets the default name in it
    (tmp_path / "grids").mkdir()
    assert main(["sample", "--run", str(run / "record.json"), "--n", "4", "--out", str(tmp_path / "grids")]) == 0
    assert (tmp_path / "grids" / "samples-t1.png").is_file()
    capsys.readouterr()
    for bad, message in (
        (["--out", str(tmp_path / "noext")], "must name a .png file (e.g. "),
        (["--zoom", "100000"], "--zoom 100000 with --n 4 makes a PNG 3500000 pixels a side (at most 16384): use"),
    ):
        assert main(["sample", "--run", str(run), "--n", "4", *bad]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    assert not (tmp_path / "noext").exists()
    # a diverged run is sampled only when asked to
    diverged = json.loads((run / "record.json").read_text())
    diverged.update(status="diverged", diverged={"epoch": 2, "step": 7, "loss": float("nan")})
    (run / "record.json").write_text(json.dumps(diverged))
    assert main(["sample", "--run", str(run), "--n", "4", "--out", str(png)]) == 2
    err = capsys.readouterr().err
    assert "diverged at step 7 (epoch 2, loss nan)" in err and "--allow-diverged" in err
    assert main(["sample", "--run", str(run), "--n", "4", "--out", str(png), "--allow-diverged"]) == 0
    (run / "record.json").write_text(json.dumps(record))
    # a second train into the same directory is refused, nothing is lost
    assert main(["train", "--preset", "smoke", "--out", str(run), "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert json.loads((run / "record.json").read_text()) == record


def test_train_overrides_are_applied_and_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--preset", "smoke", "--mixing", "plu", "--coupling", "affine", "--lr", "0.002", "--seed", "3"]
    assert main([*args, "--epochs", "1", "--no-progress"]) == 0
    run = tmp_path / "runs" / "smoke-mixing-plu-coupling-affine-lr0.002-ep1-seed3"
    record = json.loads((run / "record.json").read_text())
    assert record["model"]["mixing"] == "plu" and record["model"]["coupling"] == "affine"
    assert record["train"]["lr"] == 0.002 and record["seed"] == 3
    assert record["tables"] == [] and record["cells"] == {}  # an overridden run does not count for the preset's table


def test_train_dataset_override_adapts_the_image_shape(tmp_path):
    run = tmp_path / "digits"
    assert main(["train", "--preset", "smoke", "--dataset", "digits", "--out", str(run), "--no-progress"]) == 0
    assert json.loads((run / "record.json").read_text())["model"]["image_shape"] == [1, 8, 8]


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--preset", "nope"], "unknown preset 'nope'"),
        (["train", "--preset", "paper-t2-mef-cifar10", "--out", "x"], "--data-dir"),
        (["sample", "--run", "missing-run"], "no record.json"),
        (["sweep", "--table", "7", "--scale", "smoke", "--runs", "r"], "--table takes"),
        (
            ["train", "--preset", "smoke", "--seed", "-5"],
            "--seed: TrainConfig.seed must be an integer from 0 to 9223372036854775807 (2**63 - 1), got -5",
        ),
        (
            ["train", "--preset", "smoke", "--lr", "inf"],
            "--lr: TrainConfig.lr must be a finite number in (0, 1], got inf",
        ),
        (["train", "--preset", "smoke", "--lr", "1e6"], "--lr: TrainConfig.lr must be a finite number in (0, 1]"),
        (
            ["train", "--preset", "smoke", "--epochs", "0"],
            "--epochs: TrainConfig.epochs must be an integer of at least 1",
        ),
        (["train", "--preset", "smoke", "--coupling-option", "nope=1"], "--coupling-option: "),
        (["train", "--preset", "smoke", "--out", "gone", "--resume"], "--resume: gone does not exist"),
        (["sample", "--run", "missing-run", "--n", "0"], "--n must be from 1 to 1024"),
        # issue 24: raw tracebacks and unclear messages before
        (
            ["train", "--preset", "smoke", "--coupling-option", "rank=2.5"],
            "--coupling-option: FlowConfig.coupling_options: MatrixExpCoupling option rank must be an integer or None",
        ),
        (["train", "--preset", "smoke", "--seed", str(2**64)], "--seed: TrainConfig.seed must be an integer from 0 to"),
        (["train", "--preset", "smoke", "--out", ""], "--out is empty"),
        (["bench", "--quick", "--threads", "0"], "--threads must be an integer of at least 1"),
        (["sample", "--run", "missing-run", "--n", "100000000"], "--n must be from 1 to 1024"),
        (["sample", "--run", "missing-run", "--seed", str(2**70)], "--seed must be an integer from 0 to"),
        (["sweep", "--table", "2", "--scale", "smoke", "--runs", " "], "--runs is empty"),
        (["report", "--runs", "", "--out", "x"], "--runs is empty"),
    ],
)
def test_errors_are_clear(args, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []  # no error leaves a run directory behind


def test_train_into_a_locked_directory_exits_at_once_naming_the_holder(tmp_path, capsys):
    from mefbench.record import RunLock

    run = tmp_path / "run"
    run.mkdir()
    with RunLock(run):
        assert main(["train", "--preset", "smoke", "--out", str(run), "--no-progress"]) == 2
    assert f"locked by process {os.getpid()}" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == [".lock"]

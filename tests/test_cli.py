import json
import os

import pytest
from PIL import Image

from mefbench.cli import main
from mefbench.models import FlowConfig
from mefbench.presets import PRESETS
from mefbench.record import SCHEMA
from mefbench.training import TrainConfig


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
    # a second train into the same directory is refused, nothing is lost
    assert main(["train", "--preset", "smoke", "--out", str(run), "--no-progress"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert json.loads((run / "record.json").read_text()) == record


def test_train_overrides_are_applied_and_named(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["train", "--preset", "smoke", "--conv", "plu", "--coupling", "affine", "--lr", "0.002", "--seed", "3"]
    assert main([*args, "--epochs", "1", "--no-progress"]) == 0
    run = tmp_path / "runs" / "smoke-conv-plu-coupling-affine-lr0.002-ep1-seed3"
    record = json.loads((run / "record.json").read_text())
    assert record["model"]["conv"] == "plu" and record["model"]["coupling"] == "affine"
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
            "--seed: TrainConfig.seed must be a non-negative integer, got -5",
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
        (["sample", "--run", "missing-run", "--n", "0"], "--n must be at least 1"),
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

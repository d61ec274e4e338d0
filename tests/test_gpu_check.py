"""The device check (`benchmarks/gpu_check.sh`, `mefbench.gpu_check`) end to end on the CPU, at
--tiny sizes: what a session with a GPU runs, minus the GPU."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mefbench import gpu_check
from mefbench.bench import PARTS as BENCH_PARTS
from mefbench.gpu_check import JSON_NAME, LOG_NAME, PARTS, PRECISIONS, Sizes, part_caps, step_models

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def _run_script(out: Path, *args: str) -> subprocess.CompletedProcess:
    """bash benchmarks/gpu_check.sh from the repository root, with this interpreter as python3."""
    env = {
        **os.environ,
        "OUT": str(out),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    }
    env.pop("PYTHONPATH", None)  # the script itself must make mefbench importable
    return subprocess.run(
        ["bash", str(SCRIPT), *args], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )


def _numbers(rows: list[dict], *keys: str) -> list[float]:
    return [
        row[k] for row in rows for k in keys if isinstance(row.get(k), (int, float)) and not isinstance(row[k], bool)
    ]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[dict, Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu")
    done = _run_script(out, "--tiny", "--device", "cpu", "--ddp-on-cpu")
    assert (out / JSON_NAME).exists(), done.stdout + done.stderr
    return json.loads((out / JSON_NAME).read_text()), out, done


def test_tiny_check_writes_every_section_with_finite_numbers(tiny):
    data, out, done = tiny
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert data["errors"] == [] and data["exit_status"] == 0
    assert {"environment", "date", "bench", "train_step", "epoch_check", "ddp", "errors", "budget"} <= set(data)
    env = data["environment"]
    assert {"device", "torch", "cuda", "cudnn", "python", "git_commit"} <= set(env) and env["device_type"] == "cpu"
    assert [p["part"] for p in data["budget"]["parts"]] == list(PARTS)
    assert all(p["status"] == "ok" and p["wall_s"] <= p["cap_s"] for p in data["budget"]["parts"])

    sizes = Sizes.tiny()
    bench = data["bench"]
    assert [p["part"] for p in bench["parts"]] == list(sizes.bench_parts)
    assert len(bench["rows"]) == sum(p["rows"] for p in bench["parts"]) > 0
    assert {"what", "shape", "measured", "target", "unit", "ok", "note"} <= set(bench["rows"][0])
    assert all(math.isfinite(r["measured"]) for r in bench["rows"])

    rows = data["train_step"]
    assert len(rows) == len(step_models(sizes.step_model)) * len(PRECISIONS)
    assert {(r["model"], r["precision"]) for r in rows} == {
        (m, p) for m in step_models(sizes.step_model) for p in PRECISIONS
    }
    assert all(
        r["batch"] == sizes.step_batch and r["peak_memory_mb"] is None for r in rows
    )  # no CUDA memory on the CPU
    assert all(math.isfinite(v) and v > 0 for v in _numbers(rows, "images_per_s", "step_ms", "params"))
    assert all(math.isfinite(v) for v in _numbers(rows, "first_bpd", "last_bpd"))

    for section in ("epoch_check", "ddp"):
        checks = data[section]
        assert checks and all(set(r) == {"check", "value", "ok", "note"} for r in checks)
        assert all(r["ok"] is True for r in checks), [r for r in checks if not r["ok"]]
        assert all(math.isfinite(v) for v in _numbers(checks, "value"))
    names = " ".join(r["check"] for r in data["epoch_check"])
    for what in ("expm series length", "EMA test bits/dim", "load_checkpoint", "load_model", "round trip", "again vs recorded",
                 "stop_after_epochs=1", "resume=True", "resume: epoch 2"):  # fmt: skip
        assert what in names
    # on the CPU the resumed run repeats the uninterrupted one exactly
    assert [r["value"] for r in data["epoch_check"] if r["check"].startswith("resume: epoch")] == [0.0, 0.0]
    assert sorted(p.name for p in (out / "records").iterdir()) == ["resumed.json", "uninterrupted.json"]

    log = (out / LOG_NAME).read_text()
    assert all(f"{part}: ok in" in log for part in PARTS) and "summary:" in log


def test_the_report_shows_the_check(tiny):
    from mefbench.report.sections import gpu_section

    data, out, _ = tiny
    text = "\n".join(gpu_section(out))
    assert data["environment"]["device"] in text and data["date"] in text
    assert "mefbench bench --device cuda" in text and "training step" in text and "epoch check" in text


def test_a_failing_part_is_recorded_and_the_others_still_run(tmp_path):
    done = _run_script(tmp_path, "--tiny", "--device", "cpu", "--parts", "bench,train_step,epoch_check",
                       "--raise-in", "bench", "--cap", "epoch_check=0.5")  # fmt: skip
    assert done.returncode == 1
    data = json.loads((tmp_path / JSON_NAME).read_text())
    status = {p["part"]: p["status"] for p in data["budget"]["parts"]}
    assert status == {"bench": "error", "train_step": "ok", "epoch_check": "timeout"}
    errors = {e["part"]: e["error"] for e in data["errors"]}
    assert set(errors) == {"bench", "epoch_check"}
    assert "deliberate failure" in errors["bench"]
    assert "stopped after its cap of 0.5 s" in errors["epoch_check"]
    assert data["bench"] is None and len(data["train_step"]) == len(step_models(Sizes.tiny().step_model)) * len(
        PRECISIONS
    )
    assert data["epoch_check"] == [] and data["ddp"] == []  # killed before its first row; ddp not asked for


def test_the_script_is_valid_bash_and_runs_the_module_with_python3_from_the_checkout():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False, capture_output=True).returncode == 0
    text = SCRIPT.read_text()
    assert re.search(r'PYTHONPATH="?\.', text)
    assert "python3 -m mefbench.gpu_check" in text and 'cd "$(dirname "$0")/.."' in text


def test_the_paper_sizes_are_the_presets():
    s = Sizes.paper()
    assert s.step_model == s.epoch_model == gpu_check.PRESETS[gpu_check.PRESET].model
    assert (s.step_model.image_shape, s.step_model.steps, s.step_model.hidden_channels, s.step_model.num_blocks) == (
        (3, 32, 32),
        (8, 4, 2),
        128,
        8,
    )
    assert s.step_batch == s.epoch_train.batch_size == 64 and s.epoch_train.dataset == "patches32"
    assert not s.bench_quick and s.bench_parts == tuple(BENCH_PARTS)
    assert sum(gpu_check.CAPS[p] for p in PARTS if p != "ddp") <= gpu_check.BUDGET_S


def test_a_part_gets_its_cap_or_what_is_left_of_the_budget():
    caps = {"bench": 100.0}
    assert part_caps(caps, budget=400, elapsed=0, part="bench") == 100
    assert part_caps(caps, budget=400, elapsed=350, part="bench") == 400 - 350 - gpu_check.RESERVE_S
    assert part_caps(caps, budget=400, elapsed=399, part="bench") == 0


def test_without_a_cuda_device_the_check_says_so_and_runs_nothing(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    done = _run_script(tmp_path)  # the default: --device cuda, the paper's sizes
    assert done.returncode == 1
    data = json.loads((tmp_path / JSON_NAME).read_text())
    assert [e["error"] for e in data["errors"]] == [
        f"--device cuda: torch {torch.__version__} sees no CUDA device; no part was run"
    ]
    assert data["budget"]["parts"] == [] and data["environment"]["torch"] == torch.__version__

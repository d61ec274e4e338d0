"""The device check (`benchmarks/gpu_check.sh`, `mefbench.gpu_check`).

The runner's budget and caps are tested with a fake clock and fake parts (no test depends on how
fast this machine is); a part's process is stopped by its cap when it hangs (`--hang-in`), and
the whole check runs end to end on the CPU at --tiny sizes (what a session with a GPU runs,
minus the GPU) under caps far above what it needs.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mefbench import gpu_check
from mefbench.bench import PARTS as BENCH_PARTS
from mefbench.gpu_check import JSON_NAME, LOG_NAME, PARTS, PRECISIONS, Check, Options, Sizes, part_caps, step_models
from mefbench.gpu_check import parts as parts_module
from mefbench.gpu_check.runner import RESERVE_S, Log, run_part_process
from mefbench.presets import PAPER_MEF, PRESETS
from mefbench.record import EpochRecord, RunRecord

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
NO_CAPS = ["--budget", "100000", *[a for p in PARTS for a in ("--cap", f"{p}=100000")]]


def _run_script(out: Path, *args: str) -> subprocess.CompletedProcess:
    """bash benchmarks/gpu_check.sh from the repository root, with this interpreter as python3."""
    env = {
        **os.environ,
        "OUT": str(out),
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ["PATH"]]),
    }
    env.pop("PYTHONPATH", None)  # the script itself must make mefbench importable
    return subprocess.run(["bash", str(SCRIPT), *args], check=False, cwd=ROOT, env=env, capture_output=True, text=True)


def _numbers(rows: list[dict], *keys: str) -> list[float]:
    return [
        row[k] for row in rows for k in keys if isinstance(row.get(k), (int, float)) and not isinstance(row[k], bool)
    ]


# ----------------------------------------------------------------------------- the runner, with a fake clock


class _Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class _FakeParts:
    """run_part stand-in: each part takes a scripted time on the fake clock and ends as scripted;
    it records the caps it was given and what the JSON said when it started."""

    def __init__(self, clock: _Clock, script: dict[str, tuple[float, str, dict | None]]) -> None:
        self.clock, self.script = clock, script
        self.calls: list[tuple[str, float]] = []
        self.seen: list[list[str]] = []

    def __call__(self, part: str, cap: float, argv: list[str], log: Log, workdir: Path):
        assert workdir.is_dir() and "--child" not in argv
        out = Path(argv[argv.index("--out") + 1])
        self.seen.append([p["part"] for p in json.loads((out / JSON_NAME).read_text())["budget"]["parts"]])
        self.calls.append((part, cap))
        seconds, status, data = self.script[part]
        if status == "raise":
            raise KeyboardInterrupt
        self.clock.t += min(seconds, cap)
        note = f"stopped after its cap of {cap:.1f} s" if status == "timeout" else ""
        return status, data, note


def _check(tmp_path: Path, script: dict, **options) -> tuple[dict, _FakeParts]:
    clock = _Clock()
    fake = _FakeParts(clock, script)
    opts = Options(device="cpu", out=tmp_path, **options)
    return Check(opts, clock=clock, run_part=fake).run(), fake


def _rows(name: str, n: int = 1) -> dict:
    return {"section": [{"check": f"{name} {i}", "value": 1.0, "ok": True, "note": ""} for i in range(n)], "errors": []}


def test_each_part_gets_its_cap_or_what_is_left_of_the_budget(tmp_path):
    step = {"section": [{"model": "MEF", "precision": "float32", "images_per_s": 10.0}], "errors": []}
    script = {
        "train_step": (30.0, "ok", step),
        "epoch_check": (500.0, "timeout", _rows("e", 2)),
        "ddp": (1, "ok", None),
    }
    caps = {"train_step": 40.0, "epoch_check": 100.0, "ddp": 50.0}
    result, fake = _check(
        tmp_path, script, parts=("train_step", "epoch_check", "ddp"), budget=120.0, caps=caps, ddp_on_cpu=True
    )
    # train_step: its own cap; epoch_check: the 120 s budget less the 30 s spent less the reserve;
    # ddp: nothing left, not started
    assert fake.calls == [("train_step", 40.0), ("epoch_check", 120.0 - 30.0 - RESERVE_S)]
    rows = {r["part"]: r for r in result["budget"]["parts"]}
    assert [r["status"] for r in rows.values()] == ["ok", "timeout", "skipped"]
    assert rows["train_step"]["wall_s"] == 30.0 and rows["epoch_check"]["wall_s"] == rows["epoch_check"]["cap_s"]
    assert rows["ddp"]["cap_s"] == 0.0
    # what the timed-out part recorded is kept; each problem is one error
    assert len(result["epoch_check"]) == 2 and result["train_step"] == step["section"]
    assert [(e["part"], e["error"]) for e in result["errors"]] == [
        ("epoch_check", f"timeout: stopped after its cap of {120.0 - 30.0 - RESERVE_S:.1f} s"),
        ("ddp", "not run: the check's budget of 120 s is spent"),
    ]
    assert result["exit_status"] == 1 and result["wall_s"] == 30.0 + 85.0
    # the JSON on disk is the result, and was rewritten before each part started
    assert json.loads((tmp_path / JSON_NAME).read_text()) == json.loads(json.dumps(result))
    assert fake.seen == [[], ["train_step"]]
    log = (tmp_path / LOG_NAME).read_text()
    assert "epoch_check: timeout" in log and "ddp: not run, the budget is spent" in log and "summary:" in log


def test_a_failed_part_is_recorded_once_and_the_next_one_runs(tmp_path):
    failed = {"section": None, "errors": [{"part": "bench", "item": "accuracy", "error": "E: x", "traceback": ""}]}
    script = {
        "bench": (5.0, "error", failed),
        "train_step": (5.0, "error", None),
        "epoch_check": (5.0, "ok", _rows("e")),
    }
    result, _ = _check(tmp_path, script, parts=("bench", "train_step", "epoch_check"), tiny=True)
    assert [r["status"] for r in result["budget"]["parts"]] == ["error", "error", "ok"]
    assert result["bench"] is None and result["epoch_check"] == _rows("e")["section"]
    # the part's own error, and for a part that recorded nothing, what the runner saw
    assert [(e["part"], e["item"]) for e in result["errors"]] == [("bench", "accuracy"), ("train_step", None)]
    assert result["errors"][1]["error"].startswith("error")


def test_an_interrupt_keeps_what_is_done_and_says_where_it_stopped(tmp_path):
    script = {"bench": (5.0, "ok", {"section": {"rows": []}, "errors": []}), "train_step": (0.0, "raise", None)}
    result, fake = _check(tmp_path, script, parts=("bench", "train_step", "epoch_check"))
    assert [c[0] for c in fake.calls] == ["bench", "train_step"]
    assert [(r["part"], r["status"]) for r in result["budget"]["parts"]] == [
        ("bench", "ok"),
        ("train_step", "interrupted"),
    ]
    assert result["errors"][-1]["error"].startswith("interrupted") and result["exit_status"] == 1
    assert json.loads((tmp_path / JSON_NAME).read_text())["bench"] == {"rows": []}


def test_ddp_on_the_cpu_is_skipped_unless_asked_for(tmp_path):
    result, fake = _check(tmp_path, {}, parts=("ddp",))
    assert fake.calls == [] and result["budget"]["parts"][0]["status"] == "skipped"
    assert result["ddp"][0]["ok"] is None and "--ddp-on-cpu" in result["ddp"][0]["note"]
    assert result["errors"] == [] and result["exit_status"] == 0


def test_without_a_cuda_device_the_check_says_so_and_runs_nothing(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    assert gpu_check.main(["--out", str(tmp_path)]) == 1  # the default: --device cuda, the paper's sizes
    data = json.loads((tmp_path / JSON_NAME).read_text())
    assert [e["error"] for e in data["errors"]] == [
        f"--device cuda: torch {torch.__version__} sees no CUDA device; no part was run"
    ]
    assert data["budget"]["parts"] == [] and data["environment"]["torch"] == torch.__version__
    assert {"device", "cuda", "cudnn", "python", "git_commit", "cpu_count"} <= set(data["environment"])


def test_a_part_gets_its_cap_or_what_is_left_of_the_budget():
    caps = {"bench": 100.0}
    assert part_caps(caps, budget=400, elapsed=0, part="bench") == 100
    assert part_caps(caps, budget=400, elapsed=350, part="bench") == 400 - 350 - RESERVE_S
    assert part_caps(caps, budget=400, elapsed=399, part="bench") == 0


# ----------------------------------------------------------------------------- a part's process


def test_a_hanging_part_is_stopped_at_its_cap(tmp_path):
    argv = ["--device", "cpu", "--out", str(tmp_path), "--tiny", "--hang-in", "bench"]
    status, _, note = run_part_process("bench", 1.0, argv, Log(tmp_path / "log"), tmp_path)  # hangs, on any machine
    assert (status, note.split(";")[0]) == ("timeout", "stopped after its cap of 1.0 s")


@pytest.mark.slow
def test_a_raising_part_is_recorded_by_its_process(tmp_path):
    argv = ["--device", "cpu", "--out", str(tmp_path), "--tiny", "--raise-in", "train_step"]
    status, data, note = run_part_process("train_step", 600.0, argv, Log(tmp_path / "log"), tmp_path)
    assert status == "error" and note == "exit status 1"
    assert data["section"] == [] and "deliberate failure" in data["errors"][0]["error"]


# ----------------------------------------------------------------------------- the parts


def test_the_paper_sizes_are_the_presets():
    s = Sizes.paper()
    assert s.step_model == s.epoch_model == PRESETS[PAPER_MEF].model
    assert (s.step_model.image_shape, s.step_model.steps, s.step_model.hidden_channels, s.step_model.num_blocks) == (
        (3, 32, 32),
        (8, 4, 2),
        128,
        8,
    )
    assert s.step_batch == s.epoch_train.batch_size == 64 and s.epoch_train.dataset == "patches32"
    assert not s.bench_quick and s.bench_parts == tuple(BENCH_PARTS)
    assert sum(gpu_check.CAPS[p] for p in PARTS if p != "ddp") <= gpu_check.BUDGET_S


def test_the_train_step_part_measures_every_model_and_precision(tmp_path):
    assert parts_module.run_child("train_step", tmp_path / "r.json", "cpu", True, tmp_path, tmp_path) == 0
    rows = json.loads((tmp_path / "r.json").read_text())["section"]
    sizes = Sizes.tiny()
    assert {(r["model"], r["precision"]) for r in rows} == {
        (m, p) for m in step_models(sizes.step_model) for p in PRECISIONS
    }
    assert all(r["batch"] == sizes.step_batch and r["peak_memory_mb"] is None for r in rows)  # CUDA only
    assert all(math.isfinite(v) and v > 0 for v in _numbers(rows, "images_per_s", "step_ms", "params"))
    assert all(r["expm_m_mean"] > 1 for r in rows if r["coupling"] == "matexp")  # series lengths recorded


def _record(bpds: list[float], m: float = 4.0) -> RunRecord:
    epochs = [
        EpochRecord(epoch=i + 1, step=2 * (i + 1), lr=0.01, train_bpd=b, train_bpd_ema=b, test_bpd=b, test_bpd_raw=b,
                    train_time_s=0.5, eval_time_s=0.1, expm={"m": {"count": 3, "mean": m, "std": 0.0, "max": m, "min": m}})
        for i, b in enumerate(bpds)
    ]  # fmt: skip
    return RunRecord(status="finished", model={}, train={"batch_size": 8}, epochs=epochs)


def test_the_epoch_rows_check_every_recorded_number():
    rows = parts_module._epoch_rows("run", _record([5.0, math.nan]))
    failed = [r["check"] for r in rows if not r["ok"]]
    assert failed == [
        f"run, epoch 2: {what}"
        for what in ("train bits/dim", "EMA train bits/dim", "EMA test bits/dim", "raw test bits/dim")
    ]
    rate = next(r for r in rows if r["check"] == "run, epoch 1: train() images/s")
    assert rate["value"] == 2 * 8 / 0.5
    same = parts_module._compare_epochs(_record([5.0, 4.0]), _record([5.0, 4.0]), tol=0.0)
    assert [r["value"] for r in same] == [0.0, 0.0] and all(r["ok"] and "exact" in r["note"] for r in same)
    off = parts_module._compare_epochs(_record([5.0, 4.0]), _record([5.0, 4.1]), tol=1e-3)
    assert [r["ok"] for r in off] == [True, False] and abs(off[1]["value"] - 0.1) < 1e-12


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[dict, Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("gpu")
    done = _run_script(out, "--tiny", "--device", "cpu", "--ddp-on-cpu", *NO_CAPS)
    assert (out / JSON_NAME).exists(), done.stdout + done.stderr
    return json.loads((out / JSON_NAME).read_text()), out, done


@pytest.mark.slow
def test_tiny_check_writes_every_section_with_finite_numbers(tiny):
    data, out, done = tiny
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert data["errors"] == [] and data["exit_status"] == 0
    assert {"environment", "date", "bench", "train_step", "epoch_check", "ddp", "errors", "budget"} <= set(data)
    env = data["environment"]
    assert {"device", "torch", "cuda", "cudnn", "python", "git_commit"} <= set(env) and env["device_type"] == "cpu"
    assert [p["part"] for p in data["budget"]["parts"]] == list(PARTS)
    assert all(p["status"] == "ok" for p in data["budget"]["parts"])

    sizes = Sizes.tiny()
    bench = data["bench"]
    assert [p["part"] for p in bench["parts"]] == list(sizes.bench_parts)
    assert len(bench["rows"]) == sum(p["rows"] for p in bench["parts"]) > 0
    assert {"what", "shape", "measured", "target", "unit", "ok", "note"} <= set(bench["rows"][0])
    assert all(math.isfinite(r["measured"]) for r in bench["rows"])
    assert bench["command"] == f"mefbench bench --quick --threads 1 --only {','.join(sizes.bench_parts)}"

    rows = data["train_step"]
    assert len(rows) == len(step_models(sizes.step_model)) * len(PRECISIONS)
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
    assert RunRecord.from_json((out / "records" / "resumed.json").read_text()).status == "finished"

    log = (out / LOG_NAME).read_text()
    assert all(f"{part}: ok in" in log for part in PARTS) and "summary:" in log


@pytest.mark.slow
def test_the_report_shows_the_check(tiny):
    from mefbench.report.sections import gpu_section

    data, out, _ = tiny
    text = "\n".join(gpu_section(out))
    assert data["environment"]["device"] in text and data["date"] in text
    assert "mefbench bench --device cuda" in text and "training step" in text and "epoch check" in text


def test_the_script_is_valid_bash_and_runs_the_module_with_python3_from_the_checkout():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], check=False, capture_output=True).returncode == 0
    text = SCRIPT.read_text()
    assert re.search(r'PYTHONPATH="?\.', text)
    assert "python3 -m mefbench.gpu_check" in text and 'cd "$(dirname "$0")/.."' in text

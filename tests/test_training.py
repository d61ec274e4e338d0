import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from mefbench.models import MultiScaleFlow
from mefbench.presets import PRESETS
from mefbench.training import CHECKPOINT, RECORD, RunError, load_checkpoint, load_model, train


def _tiny(epochs=2, **train_changes):
    model, cfg = PRESETS["smoke"].configs()
    cfg = dataclasses.replace(cfg, epochs=epochs, max_train_batches=3, max_test=32, init_batch=32, **train_changes)
    return model, cfg


def test_run_writes_record_and_checkpoint(tmp_path):
    model, cfg = _tiny()
    record = train(model, cfg, tmp_path / "run", progress=False, tables=(2,), scale="smoke", preset="smoke")
    assert record["status"] == "finished"
    on_disk = json.loads((tmp_path / "run" / RECORD).read_text())
    assert on_disk == json.loads(json.dumps(record))
    assert [e["epoch"] for e in on_disk["epochs"]] == [1, 2]
    for e in on_disk["epochs"]:
        for key in ("train_bpd", "train_bpd_ema", "test_bpd", "test_bpd_raw", "train_time_s"):
            assert math.isfinite(e[key]), key
        assert e["expm"]["m"]["count"] > 0 and e["expm"]["s"]["min"] >= 0
    assert on_disk["final"]["test_bpd"] == on_disk["epochs"][-1]["test_bpd"]
    assert on_disk["num_params"] == sum(p.numel() for p in MultiScaleFlow(model).parameters())
    ckpt = load_checkpoint(tmp_path / "run" / CHECKPOINT)  # weights_only=True
    assert ckpt["epoch"] == 2
    assert load_model(tmp_path / "run").bits_per_dim(torch.zeros(1, 3, 16, 16, dtype=torch.float32)).isfinite().all()


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path):
    model, cfg = _tiny(epochs=3)
    full = train(model, cfg, tmp_path / "full", progress=False)
    part = train(model, cfg, tmp_path / "part", progress=False, stop_after_epochs=1)
    assert part["status"] == "interrupted" and len(part["epochs"]) == 1
    with pytest.raises(RunError, match="already holds a run"):
        train(model, cfg, tmp_path / "part", progress=False)  # never overwrite a recorded run
    resumed = train(model, cfg, tmp_path / "part", resume=True, progress=False)
    assert resumed["status"] == "finished"
    assert resumed["resumes"][0]["from_epoch"] == 1
    for a, b in zip(full["epochs"], resumed["epochs"]):
        assert a["test_bpd"] == b["test_bpd"] and a["train_bpd"] == b["train_bpd"]


def test_resume_refuses_a_different_configuration(tmp_path):
    model, cfg = _tiny(epochs=1)
    train(model, cfg, tmp_path / "run", progress=False, stop_after_epochs=0)
    with pytest.raises(RunError, match="different configuration"):
        train(model, dataclasses.replace(cfg, lr=0.5), tmp_path / "run", resume=True, progress=False)


def test_divergence_is_recorded_with_its_step(tmp_path, monkeypatch):
    model, cfg = _tiny(epochs=2)
    calls = {"n": 0}
    original = MultiScaleFlow.forward

    def poisoned(self, x):
        zs, logdet, logp = original(self, x)
        if self.training and torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == 5:  # the 5th training step
                logdet = logdet + float("nan")
        return zs, logdet, logp

    monkeypatch.setattr(MultiScaleFlow, "forward", poisoned)
    record = train(model, cfg, tmp_path / "run", progress=False)
    assert record["status"] == "diverged"
    assert record["diverged"]["step"] == 5 and record["diverged"]["epoch"] == 2
    on_disk = json.loads((tmp_path / "run" / RECORD).read_text())
    assert on_disk["status"] == "diverged" and len(on_disk["epochs"]) == 1  # epoch 1 kept


def test_a_real_blow_up_diverges_cleanly(tmp_path):
    model, cfg = _tiny(epochs=3, lr=1e4)
    model = dataclasses.replace(model, scale="exp")
    record = train(model, cfg, tmp_path / "run", progress=False)
    assert record["status"] == "diverged", record["epochs"]
    assert record["diverged"]["step"] >= 1


def test_corrupt_checkpoint_and_record_are_named(tmp_path):
    model, cfg = _tiny(epochs=1)
    train(model, cfg, tmp_path / "run", progress=False)
    (tmp_path / "run" / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(RunError, match="corrupt or unreadable checkpoint .*checkpoint.pt"):
        load_model(tmp_path / "run")
    (tmp_path / "run" / RECORD).write_text("{ half a rec")
    with pytest.raises(RunError, match="corrupt run record .*record.json"):
        train(model, cfg, tmp_path / "run", resume=True, progress=False)


def test_checkpoints_refuse_pickled_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(RunError, match="corrupt or unreadable checkpoint"):
        load_checkpoint(path)


def _cli(*args, cwd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "mefbench", *args], cwd=cwd, env=env, **kw)


def _start_until_first_checkpoint(args: list[str], cwd) -> subprocess.Popen:
    """Start `mefbench ARGS` and return once the run's first checkpoint is on disk."""
    proc = _cli(*args, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.time() + 120
    while not (cwd / "run" / CHECKPOINT).exists():
        assert proc.poll() is None, proc.stdout.read().decode()
        assert time.time() < deadline
        time.sleep(0.05)
    return proc


@pytest.mark.slow
def test_kill_then_resume_from_the_cli(tmp_path):
    """A CPU run killed halfway (SIGKILL after its first checkpoint) finishes with --resume."""
    args = ["train", "--preset", "smoke-t2-mef", "--epochs", "4", "--out", "run", "--no-progress"]
    proc = _start_until_first_checkpoint(args, tmp_path)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = json.loads((tmp_path / "run" / RECORD).read_text())
    assert killed["status"] == "running" and 1 <= len(killed["epochs"]) < 4
    done = _cli(*args, "--resume", cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out = done.communicate(timeout=300)[0].decode()
    assert done.returncode == 0, out
    record = json.loads((tmp_path / "run" / RECORD).read_text())
    assert record["status"] == "finished" and len(record["epochs"]) == 4
    assert record["resumes"] and record["resumes"][0]["from_epoch"] == len(killed["epochs"])


@pytest.mark.slow
def test_sigterm_marks_the_run_interrupted(tmp_path):
    """A scheduler's SIGTERM ends the run cleanly: status interrupted, exit 130 (resuming: test above)."""
    args = ["train", "--preset", "smoke-t2-mef", "--epochs", "30", "--out", "run", "--no-progress"]
    proc = _start_until_first_checkpoint(args, tmp_path)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 130, out
    assert "interrupted" in out
    record = json.loads((tmp_path / "run" / RECORD).read_text())
    assert record["status"] == "interrupted" and 1 <= len(record["epochs"]) < 30

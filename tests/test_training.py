import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mefbench
from mefbench.checkpoint import load_checkpoint, load_model
from mefbench.models import MODEL_REVISION, MultiScaleFlow
from mefbench.presets import PRESETS
from mefbench.record import CHECKPOINT, LOCK, RECORD, SCHEMA, RunError, RunLock, RunRecord, read_record
from mefbench.training import train

# what may differ between two runs of the same configuration: times, dates, the command, resumes
_UNCOMPARED = {"train_time_s", "eval_time_s", "mean_epoch_time_s", "sample_time_per_image_s",
               "started_at", "updated_at", "command", "resumes", "machine", "name"}  # fmt: skip


def _numbers(data: object, path: str = "") -> dict:
    """Every recorded value of a record's JSON form by its path, without _UNCOMPARED (NaN as a string)."""
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            if k not in _UNCOMPARED:
                out.update(_numbers(v, f"{path}.{k}"))
        return out
    if isinstance(data, list):
        out = {}
        for i, v in enumerate(data):
            out.update(_numbers(v, f"{path}[{i}]"))
        return out
    return {path: "nan" if isinstance(data, float) and math.isnan(data) else data}


def _tiny(epochs=2, **train_changes):
    model, cfg = PRESETS["smoke"].configs()
    cfg = dataclasses.replace(cfg, epochs=epochs, max_train_batches=3, max_test=32, init_batch=32, **train_changes)
    return model, cfg


def test_run_writes_record_and_checkpoint(tmp_path):
    model, cfg = _tiny()
    record = train(model, cfg, tmp_path / "run", progress=False, tables=(2,), scale="smoke", preset="smoke")
    assert record.status == "finished"
    assert read_record(tmp_path / "run") == record
    on_disk = json.loads((tmp_path / "run" / RECORD).read_text())
    assert on_disk["schema"] == SCHEMA and on_disk == json.loads(record.to_json())
    assert on_disk["tables"] == ["2"] and on_disk["cells"] == {"2": {"dataset": "patches16"}}
    assert on_disk["model_revision"] == MODEL_REVISION
    assert [e["epoch"] for e in on_disk["epochs"]] == [1, 2]
    for e in on_disk["epochs"]:
        for key in ("train_bpd", "train_bpd_ema", "test_bpd", "test_bpd_raw", "train_time_s"):
            assert math.isfinite(e[key]), key
        assert e["expm"]["m"]["count"] > 0 and e["expm"]["s"]["min"] >= 0
    final = record.final
    assert final.test_bpd == on_disk["epochs"][-1]["test_bpd"]
    num_params = sum(p.numel() for p in MultiScaleFlow(model).parameters())
    assert on_disk["num_params"] == num_params
    # the measurements of the trained model (the "every mixing layer" table)
    assert 0 < final.sample_time_per_image_s < 1 and final.sample_images == 64
    assert 0 <= final.roundtrip_error < 1e-4  # float32, the EMA model: exact up to rounding
    assert final.peak_memory_method == "cpu.saved_tensors+params+grads+optimizer"
    # at least parameters, gradients and Adamax's two states, 4 bytes each, plus saved activations
    assert final.peak_memory_bytes > 4 * 4 * num_params
    ckpt = load_checkpoint(tmp_path / "run" / CHECKPOINT)  # weights_only=True
    assert ckpt["epoch"] == 2 and ckpt["model_revision"] == MODEL_REVISION
    assert RunRecord.from_json(ckpt["record"]).epochs == record.epochs  # the commit point holds the record
    assert load_model(tmp_path / "run").bits_per_dim(torch.zeros(1, 3, 16, 16, dtype=torch.float32)).isfinite().all()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock", CHECKPOINT, RECORD]


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path):
    model, cfg = _tiny(epochs=3)
    full = train(model, cfg, tmp_path / "full", progress=False)
    part = train(model, cfg, tmp_path / "part", progress=False, stop_after_epochs=1)
    assert part.status == "interrupted" and len(part.epochs) == 1
    with pytest.raises(RunError, match="already holds a run"):
        train(model, cfg, tmp_path / "part", progress=False)  # never overwrite a recorded run
    resumed = train(model, cfg, tmp_path / "part", resume=True, progress=False)
    assert resumed.status == "finished"
    assert resumed.resumes[0].from_epoch == 1
    assert _numbers(resumed.to_dict()) == _numbers(full.to_dict())


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
    assert record.status == "diverged"
    assert record.diverged.step == 5 and record.diverged.epoch == 2
    on_disk = json.loads((tmp_path / "run" / RECORD).read_text())
    assert on_disk["status"] == "diverged" and len(on_disk["epochs"]) == 1  # epoch 1 kept


def test_a_real_blow_up_diverges_cleanly(tmp_path):
    model, cfg = _tiny(epochs=3, lr=1.0)
    model = dataclasses.replace(model, coupling_options={"scale": "exp"})  # the unbounded scale map
    record = train(model, cfg, tmp_path / "run", progress=False)
    assert record.status == "diverged", record.epochs
    assert record.diverged.step >= 1
    # a diverged run is data: resuming it returns it as it is, it is never retried
    assert train(model, cfg, tmp_path / "run", resume=True, progress=False).to_json() == record.to_json()


def test_corrupt_checkpoint_and_record_are_named(tmp_path):
    model, cfg = _tiny(epochs=1)
    train(model, cfg, tmp_path / "run", progress=False)
    (tmp_path / "run" / CHECKPOINT).write_bytes(b"not a checkpoint")
    with pytest.raises(RunError, match=r"corrupt or unreadable checkpoint .*checkpoint\.pt"):
        load_model(tmp_path / "run")
    (tmp_path / "run" / RECORD).write_text("{ half a rec")
    with pytest.raises(RunError, match=r"corrupt run record .*record\.json"):
        train(model, cfg, tmp_path / "run", resume=True, progress=False)


def test_checkpoints_refuse_pickled_code(tmp_path):
    """A pickled os.system call is refused as unsafe, and no message suggests unpickling it."""

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pt"
    torch.save({"model": Evil()}, path)
    with pytest.raises(RunError, match=r"refused checkpoint .*evil.pt as unsafe: .*system") as err:
        load_checkpoint(path)
    assert "weights_only" not in str(err.value) and "will likely succeed" not in str(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__  # torch's advice is not chained in
    # a plain pickle (not written by torch.save) is unsafe too, not "corrupt"
    import pickle
    import warnings

    path.write_bytes(pickle.dumps({"model": {}}, protocol=4))
    with warnings.catch_warnings(), pytest.raises(RunError, match=r"evil.pt as unsafe: it is a plain Python pickle"):
        warnings.simplefilter("error")  # nor does torch's warning about the pickle protocol reach the user
        load_checkpoint(path)


def test_checkpoint_problems_are_clear(tmp_path):
    model, cfg = _tiny(epochs=1)
    run = tmp_path / "run"
    train(model, cfg, run, progress=False)
    ckpt_path = run / CHECKPOINT
    good = ckpt_path.read_bytes()
    ckpt_path.write_bytes(b"")
    with pytest.raises(RunError, match=r"checkpoint .*checkpoint.pt is empty \(0 bytes\)"):
        load_model(run)
    # the right file format, the wrong model: what does not fit is said, not load_state_dict's traceback
    ckpt_path.write_bytes(good)
    ckpt = load_checkpoint(ckpt_path)
    ckpt["ema"] = {k.replace("levels.0", "levels.9"): v for k, v in ckpt["ema"].items()}
    torch.save(ckpt, ckpt_path)
    with pytest.raises(
        RunError, match=r"does not fit this run's model \(EMA weights\): \d+ missing keys .*unexpected keys"
    ):
        load_model(run)
    torch.save({"model": {}}, ckpt_path)
    with pytest.raises(RunError, match=r"not a mefbench checkpoint: it lacks \['ema'"):
        load_model(run)


class _FullDisk:
    """A file that takes `room` bytes, then fails as a full disk does (ENOSPC)."""

    def __init__(self, f, room: int) -> None:
        self.f, self.room = f, room

    def write(self, data) -> int:
        import errno

        if len(data) > self.room:
            self.f.write(bytes(data[: self.room]))
            self.room = 0
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    """A tiny two-epoch run, trained without interruption: what a resumed run must record."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # as the tests run (conftest), which a module fixture precedes
    try:
        model, cfg = _tiny(epochs=2)
        return model, cfg, train(model, cfg, tmp_path_factory.mktemp("full") / "run", progress=False)
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.parametrize("fails", ["checkpoint", "record"])
def test_a_full_disk_during_a_commit_is_a_clear_error_and_loses_nothing(tmp_path, monkeypatch, fails, two_epochs):
    """The disk fills while epoch 2 commits: a RunError that says so (not torch's "unexpected pos"
    traceback); checkpoint and record still hold epoch 1 (or the checkpoint epoch 2, if only the
    record write failed), no temporary file is left, and --resume ends where an uninterrupted
    run ends."""
    import mefbench.training as training

    model, cfg, full = two_epochs
    run = tmp_path / "run"
    commits = []
    if fails == "checkpoint":
        save = torch.save

        def failing(obj, f, *args, **kwargs):
            commits.append(obj["epoch"])
            return save(obj, _FullDisk(f, 500) if obj["epoch"] == 2 else f, *args, **kwargs)

        monkeypatch.setattr(torch, "save", failing)
        reason = r"RuntimeError: .*unexpected pos"
    else:
        write = training.write_record

        def failing(run_dir, record, hook=None):
            commits.append(len(record.epochs))
            if hook is not None and len(record.epochs) == 2:  # the commit's write (the others pass no hook)
                raise OSError(28, "No space left on device")
            return write(run_dir, record, hook)

        monkeypatch.setattr(training, "write_record", failing)
        reason = "OSError: No space left on device"
    with pytest.raises(
        RunError, match=rf"writing the checkpoint and record of epoch 2 failed \({reason}.*\); is the disk full"
    ):
        train(model, cfg, run, progress=False)
    monkeypatch.undo()
    assert 2 in commits
    assert sorted(p.name for p in run.iterdir()) == [".lock", CHECKPOINT, RECORD]  # no temporary left
    record, ckpt = read_record(run), load_checkpoint(run / CHECKPOINT)
    assert len(record.epochs) == 1 and ckpt["epoch"] == (1 if fails == "checkpoint" else 2)
    if fails == "checkpoint":
        assert record.status == "interrupted"  # not left "running"
    resumed = train(model, cfg, run, resume=True, progress=False)
    assert resumed.status == "finished" and resumed.resumes[-1].from_epoch == ckpt["epoch"]
    assert _numbers(resumed.to_dict()) == _numbers(full.to_dict())


def test_a_resume_that_fails_adds_no_resume_entry(tmp_path):
    """A checkpoint that does not fit the model: the resume is refused and record.json is left
    byte for byte (no resume entry, status not turned to running)."""
    model, cfg = _tiny(epochs=2)
    run = tmp_path / "run"
    train(model, cfg, run, progress=False, stop_after_epochs=1)
    ckpt = load_checkpoint(run / CHECKPOINT)
    ckpt["model"] = {k.replace("levels.0", "levels.9"): v for k, v in ckpt["model"].items()}
    torch.save(ckpt, run / CHECKPOINT)
    before = (run / RECORD).read_bytes()
    with pytest.raises(RunError, match=r"does not fit this run's model \(weights\)"):
        train(model, cfg, run, resume=True, progress=False)
    assert (run / RECORD).read_bytes() == before


def test_a_run_of_another_model_revision_is_refused(tmp_path):
    model, cfg = _tiny(epochs=2)
    run = tmp_path / "run"
    train(model, cfg, run, progress=False, stop_after_epochs=1)
    data = json.loads((run / RECORD).read_text())
    data["model_revision"] = MODEL_REVISION - 1
    (run / RECORD).write_text(json.dumps(data))
    for attempt in (lambda: load_model(run), lambda: train(model, cfg, run, resume=True, progress=False)):
        with pytest.raises(RunError, match=f"model revision {MODEL_REVISION - 1}.*builds revision {MODEL_REVISION}"):
            attempt()


def test_resume_never_drops_recorded_epochs(tmp_path):
    """A deleted checkpoint of a run with recorded epochs is refused (a restart would drop them);
    a record without epochs and without checkpoint resumes from the start."""
    model, cfg = _tiny(epochs=2)
    run = tmp_path / "run"
    train(model, cfg, run, progress=False, stop_after_epochs=1)
    (run / CHECKPOINT).unlink()
    before = (run / RECORD).read_text()
    with pytest.raises(RunError, match=r"holds 1 finished epochs but checkpoint.pt is missing"):
        train(model, cfg, run, resume=True, progress=False)
    assert (run / RECORD).read_text() == before
    train(model, cfg, tmp_path / "empty", progress=False, stop_after_epochs=0)
    assert train(model, cfg, tmp_path / "empty", resume=True, progress=False).status == "finished"


def test_resume_needs_a_run(tmp_path):
    model, cfg = _tiny(epochs=1)
    with pytest.raises(RunError, match=r"--resume: .*nowhere does not exist"):
        train(model, cfg, tmp_path / "nowhere", resume=True, progress=False)
    (tmp_path / "other").mkdir()
    with pytest.raises(RunError, match=r"--resume: .*other holds no run \(no record.json\)"):
        train(model, cfg, tmp_path / "other", resume=True, progress=False)
    assert list((tmp_path / "other").iterdir()) == []  # nothing was written there


def test_model_and_data_errors_leave_no_run_directory(tmp_path, monkeypatch):
    """NaN in the init batch or an empty first batch: a clear error, and no directory is created."""
    model, cfg = _tiny(epochs=1)
    original = MultiScaleFlow.initialize
    for poison, message in ((lambda x: x * float("nan"), "non-finite"), (lambda x: x[:0], "")):
        monkeypatch.setattr(MultiScaleFlow, "initialize", lambda self, x, p=poison: original(self, p(x)))
        with pytest.raises(ValueError, match="data-dependent init on 32 training images failed") as err:
            train(model, cfg, tmp_path / "run", progress=False)
        assert message in str(err.value)
        assert not (tmp_path / "run").exists()
    monkeypatch.undo()
    cifar = dataclasses.replace(cfg, dataset="cifar10", data_dir=str(tmp_path / "no-cifar"))
    with pytest.raises((ValueError, FileNotFoundError)):
        train(dataclasses.replace(model, image_shape=(3, 32, 32)), cifar, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_a_locked_run_directory_is_refused_in_process(tmp_path):
    model, cfg = _tiny(epochs=2)
    run = tmp_path / "run"
    train(model, cfg, run, progress=False, stop_after_epochs=1)
    with RunLock(run), pytest.raises(RunError, match=f"locked by process {os.getpid()}"):
        train(model, cfg, run, resume=True, progress=False)
    assert train(model, cfg, run, resume=True, progress=False).status == "finished"


# ----------------------------------------------------------------------------- real processes


def _cli(*args, cwd, env=None, **kw):
    """`python -m mefbench ARGS` with this checkout's mefbench (not whatever is installed)."""
    root = str(Path(mefbench.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(env or {})}
    for key in ("MEFBENCH_TEST_KILL_AT", "MEFBENCH_TEST_PAUSE_AT"):
        if key not in (env or {}) or not env[key]:
            env.pop(key, None)
    return subprocess.Popen([sys.executable, "-m", "mefbench", *args], cwd=cwd, env=env, **kw)


def _run(*args, cwd, env=None, timeout=300) -> subprocess.CompletedProcess:
    proc = _cli(*args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, f"{path} did not appear"
        time.sleep(0.05)


# (point, epoch) in the order a run reaches them, so that each resume gets further than the last
KILL_POINTS = [
    ("locked", 0),  # a new run: its directory and lock, nothing written yet
    ("started", 0),  # its first record, no checkpoint
    ("mid-epoch", 1),
    ("checkpoint-tmp-open", 1),  # a 0-byte temporary checkpoint
    ("checkpoint-tmp-written", 1),  # a whole temporary checkpoint, not yet renamed
    ("after-checkpoint", 1),  # between the two writes: checkpoint at epoch 1, record.json at 0
    ("record-tmp-open", 2),  # checkpoint at 2, a 0-byte temporary record, record.json at 1
    ("evaluated", 3),
    ("after-checkpoint", 3),  # the last epoch committed in the checkpoint only
    ("finishing", 3),  # every epoch recorded, the trained model not yet measured
]


@pytest.mark.slow
def test_sigkill_at_any_point_then_resume_records_what_an_uninterrupted_run_records(tmp_path):
    """SIGKILL a real `mefbench train` at each named point, including between the checkpoint and
    the record; resuming each time ends with the record (and weights) of an uninterrupted run."""
    args = ["train", "--preset", "smoke", "--epochs", "3", "--no-progress"]
    reference = _cli(*args, "--out", "ref", cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    run = tmp_path / "run"
    for i, (point, epoch) in enumerate(KILL_POINTS):
        resume = ["--resume"] if i else []
        done = _run(*args, "--out", "run", *resume, cwd=tmp_path, env={"MEFBENCH_TEST_KILL_AT": f"{point}:{epoch}"})
        assert done.returncode == -signal.SIGKILL, (point, done.stdout, done.stderr)
        temporaries = sorted(p.name for p in run.glob(".*.tmp*"))
        if point.endswith(("tmp-open", "tmp-written")):
            assert temporaries, point  # the kill left a temporary file for the next process to remove
        if point == "after-checkpoint":  # the inconsistency a kill can leave: checkpoint ahead of record
            assert len(read_record(run).epochs) == epoch - 1 and load_checkpoint(run / CHECKPOINT)["epoch"] == epoch
    done = _run(*args, "--out", "run", "--resume", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert reference.wait(timeout=300) == 0, reference.stdout.read()
    assert sorted(p.name for p in run.iterdir()) == [LOCK, CHECKPOINT, RECORD]  # no stale temporaries
    got, want = read_record(run), read_record(tmp_path / "ref")
    assert got.status == "finished" and [e.epoch for e in got.epochs] == [1, 2, 3]
    assert len(got.resumes) == len(KILL_POINTS) - 1  # the first resume found only a lock: a fresh start
    assert _numbers(got.to_dict()) == _numbers(want.to_dict())
    a, b = load_checkpoint(run / CHECKPOINT), load_checkpoint(tmp_path / "ref" / CHECKPOINT)
    for part in ("model", "ema"):
        assert a[part].keys() == b[part].keys()
        assert all(torch.equal(a[part][k], b[part][k]) for k in a[part]), part


@pytest.mark.slow
def test_a_second_process_is_refused_while_the_first_trains(tmp_path):
    """Two real processes on one run directory: the second exits at once (code 2) naming the
    first's pid; after the first is killed (-9), its stale lock does not block the resume."""
    args = ["train", "--preset", "smoke", "--epochs", "2", "--out", "run", "--no-progress"]
    first = _cli(*args, cwd=tmp_path, env={"MEFBENCH_TEST_PAUSE_AT": "started"}, stdout=subprocess.DEVNULL)
    try:
        _wait_for(tmp_path / "run" / RECORD, first)
        before = (tmp_path / "run" / RECORD).read_text()
        for extra in (["--resume"], []):
            t0 = time.time()
            second = _run(*args, *extra, cwd=tmp_path, timeout=120)
            assert second.returncode == 2, second.stdout + second.stderr
            assert f"locked by process {first.pid}" in second.stderr
            assert time.time() - t0 < 60  # at once: refused before any data is loaded
        assert (tmp_path / "run" / RECORD).read_text() == before
    finally:
        first.kill()
        first.wait()
    done = _run(*args, "--resume", cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert read_record(tmp_path / "run").status == "finished"


@pytest.mark.slow
def test_an_interrupt_during_an_epochs_commit_keeps_that_epoch(tmp_path):
    """SIGTERM while the epoch commits (its checkpoint written, record.json not yet): the interrupt
    waits for the commit, so the interrupted record holds the epoch its checkpoint holds."""
    args = ["train", "--preset", "smoke-t2-mef", "--epochs", "30", "--out", "run", "--no-progress"]
    pause = {"MEFBENCH_TEST_PAUSE_AT": "after-checkpoint:1", "MEFBENCH_TEST_PAUSE_S": "2"}
    proc = _cli(*args, cwd=tmp_path, env=pause, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _wait_for(tmp_path / "run" / CHECKPOINT, proc)  # written just before the pause
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 130, out
    record = read_record(tmp_path / "run")
    assert record.status == "interrupted" and len(record.epochs) == 1
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT)["epoch"] == 1


@pytest.mark.slow
def test_sigterm_marks_the_run_interrupted(tmp_path):
    """A scheduler's SIGTERM ends the run cleanly: status interrupted, exit 130 (resuming: test above)."""
    args = ["train", "--preset", "smoke-t2-mef", "--epochs", "30", "--out", "run", "--no-progress"]
    proc = _cli(*args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    _wait_for(tmp_path / "run" / CHECKPOINT, proc)
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=60)[0].decode()
    assert proc.returncode == 130, out
    assert "interrupted" in out
    record = read_record(tmp_path / "run")
    assert record.status == "interrupted" and 1 <= len(record.epochs) < 30
    assert load_checkpoint(tmp_path / "run" / CHECKPOINT)["epoch"] == len(record.epochs)


# ----------------------------------------------------------------------------- plateau, validation, losses


def _plateau_cfg(**changes):
    # min_improvement 50 bits/dim: epoch 1 sets the best and no later epoch can beat it by that much,
    # so patience 1 stops the run after epoch 2, far below its cap of 4
    return _tiny(epochs=4, validate=True, max_validation=32, patience=1, min_improvement=50.0, **changes)


def test_a_run_stops_at_its_plateau_and_says_so(tmp_path):
    model, cfg = _plateau_cfg()
    record = train(model, cfg, tmp_path / "run", progress=False)
    assert record.status == "finished" and len(record.epochs) == 2
    assert record.stop.reason == "plateau" and record.stop.epoch == 2 and record.stop.step == record.epochs[-1].step
    assert record.stop.best_epoch == 1 and record.stop.best_valid_bpd == record.epochs[0].valid_bpd
    assert all(math.isfinite(e.valid_bpd) for e in record.epochs)
    assert math.isfinite(record.initial_valid_bpd) and record.initial_valid_bpd > record.epochs[0].valid_bpd
    # the whole test split is evaluated once at the end; the epochs saw a fixed subset of it
    assert record.final.test_images_full > cfg.max_test and math.isfinite(record.final.test_bpd_full)
    # without a plateau rule the same run trains to its length; with a patience it cannot reach, to its cap
    length = train(model, dataclasses.replace(cfg, patience=None, epochs=2), tmp_path / "length", progress=False)
    assert length.stop.reason == "length" and len(length.epochs) == 2
    assert _numbers([e.__dict__ for e in length.epochs]) == _numbers([e.__dict__ for e in record.epochs])
    capped = train(model, dataclasses.replace(cfg, min_improvement=0.0, patience=3, epochs=2), tmp_path / "cap",
                   progress=False)  # fmt: skip
    assert capped.stop.reason == "cap" and capped.stop.epoch == 2


@pytest.mark.parametrize("cut", ["after epoch 1", "before finishing"])
def test_a_resumed_run_stops_where_an_uninterrupted_one_stops(tmp_path, monkeypatch, cut):
    """Interrupted after epoch 1 (before its plateau) or once epoch 2 is committed (the plateau
    reached, the run not yet finished): the resumed run records what the uninterrupted one does."""
    model, cfg = _plateau_cfg()
    full = train(model, cfg, tmp_path / "full", progress=False)
    if cut == "after epoch 1":
        part = train(model, cfg, tmp_path / "part", progress=False, stop_after_epochs=1)
    else:
        with monkeypatch.context() as m:
            m.setattr(mefbench.training, "_finish", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
            with pytest.raises(KeyboardInterrupt):
                train(model, cfg, tmp_path / "part", progress=False)
        part = read_record(tmp_path / "part")
    assert part.status == "interrupted" and len(part.epochs) == (1 if cut == "after epoch 1" else 2)
    resumed = train(model, cfg, tmp_path / "part", resume=True, progress=False)
    assert resumed.stop == full.stop and len(resumed.epochs) == 2
    assert _numbers(resumed.to_dict()) == _numbers(full.to_dict())


def test_each_epoch_records_its_first_and_largest_loss(tmp_path, monkeypatch):
    model, cfg = _tiny(epochs=2)
    seen = []
    original = mefbench.training.train_step

    def recording(*args, **kwargs):
        seen.append(original(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(mefbench.training, "train_step", recording)
    record = train(model, cfg, tmp_path / "run", progress=False)
    steps = cfg.max_train_batches
    for e in record.epochs:
        mine = seen[(e.epoch - 1) * steps : e.epoch * steps]
        assert e.loss_first == mine[0] and e.loss_max == max(mine)
        assert e.loss_max_step == (e.epoch - 1) * steps + mine.index(max(mine)) + 1
        assert e.train_bpd == pytest.approx(sum(mine) / len(mine))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)` before")
def test_a_divergence_keeps_the_losses_before_it(tmp_path, monkeypatch):
    model, cfg = _tiny(epochs=2)
    losses = iter([7.0, 9.5, 8.0, 6.0, float("nan")])  # epoch 1: steps 1-3; epoch 2 diverges at step 5
    monkeypatch.setattr(mefbench.training, "train_step", lambda *a, **k: next(losses))
    record = train(model, cfg, tmp_path / "run", progress=False)
    assert record.status == "diverged" and record.diverged.step == 5
    assert (record.epochs[0].loss_first, record.epochs[0].loss_max, record.epochs[0].loss_max_step) == (7.0, 9.5, 2)
    d = record.diverged
    assert (d.loss_first, d.loss_max, d.loss_max_step) == (6.0, 6.0, 4)


def test_runs_of_one_seed_see_the_same_data_whatever_their_model(tmp_path, monkeypatch):
    """The rows of a table are paired: the same seed gives the same batches in the same order (and
    the same flips and noise, drawn after them from the same generator) for every model."""
    orders: dict[str, list] = {}
    original = mefbench.training.batch_order

    def recording(generator, *args):
        order = original(generator, *args)
        orders.setdefault(current, []).append((order.clone(), generator.get_state().clone()))
        return order

    monkeypatch.setattr(mefbench.training, "batch_order", recording)
    model, cfg = _tiny(epochs=2)
    for current, changes in (("matexp", {}), ("affine", {"coupling": "affine", "hidden_channels": 5}),
                             ("standard", {"mixing": "standard"})):  # fmt: skip
        train(dataclasses.replace(model, **changes), cfg, tmp_path / current, progress=False)
    current = "seed1"
    train(model, dataclasses.replace(cfg, seed=1), tmp_path / current, progress=False)
    for other in ("affine", "standard"):
        for (a, ga), (b, gb) in zip(orders["matexp"], orders[other], strict=True):
            assert torch.equal(a, b) and torch.equal(ga, gb)
    assert not torch.equal(orders["matexp"][0][0], orders["seed1"][0][0])


def test_a_validating_run_never_trains_on_its_validation_images():
    from mefbench.config import FlowConfig, TrainConfig
    from mefbench.data import DATASETS, load_dataset
    from mefbench.training import _load_data

    model = FlowConfig(image_shape=(1, 8, 8), steps=(1,), hidden_channels=4, num_blocks=0)
    tail = DATASETS["digits"].validation_tail
    data = _load_data(model, TrainConfig(dataset="digits", validate=True, batch_size=32), 1)
    assert torch.equal(data.train_images, load_dataset("digits", "train")[:-tail])
    assert torch.equal(data.valid_images, load_dataset("digits", "validation"))
    plain = _load_data(model, TrainConfig(dataset="digits", batch_size=32), 1)  # the paper's protocol: all of it
    assert len(plain.train_images) == len(load_dataset("digits", "train")) and plain.valid_images is None
    with pytest.raises(ValueError, match="patience needs validate=True"):
        TrainConfig(dataset="digits", patience=3)

"""Sweeps through submitit: options, the sbatch script, `mefbench status`, and the local executor
end to end with a preempted and a cancelled run (tests/test_slurm.py does the same on SLURM)."""

import dataclasses
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import mefbench
from mefbench.cli import main
from mefbench.cluster import (
    SUBMITIT_DIR,
    ClusterOptions,
    JobEntry,
    RunJob,
    latest_jobs,
    local_slots,
    parse_sbatch,
    parse_time,
)
from mefbench.record import LOCK, RECORD, Divergence, RunError, read_record, write_record
from mefbench.status import format_status, lock_holder, run_statuses
from mefbench.sweep import plan
from mefbench.training import train

# ----------------------------------------------------------------------------- helpers (also used by test_slurm)


def cli(*args, cwd, env=None, **kw) -> subprocess.Popen:
    """`python -m mefbench ARGS` with this checkout's mefbench, one thread, no test hooks unless given."""
    root = str(Path(mefbench.__file__).resolve().parent.parent)
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    base = {k: v for k, v in os.environ.items() if not k.startswith("MEFBENCH_TEST_")}
    env = {**base, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(env or {})}
    return subprocess.Popen([sys.executable, "-m", "mefbench", *args], cwd=cwd, env=env, text=True, **kw)


def run(*args, cwd, env=None, timeout=600) -> subprocess.CompletedProcess:
    proc = cli(*args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    out, _ = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out)


def wait_until(condition, what: str, timeout: float = 600, procs=(), diagnose=lambda: "") -> None:
    """Poll condition() until true; fail naming `what` when a watched process ends first or time runs out."""
    deadline = time.monotonic() + timeout
    while not condition():
        for p in procs:
            if p.poll() is not None:
                pytest.fail(f"waiting for {what}: {p.args} ended ({p.returncode}):\n{p.stdout.read()}\n{diagnose()}")
        if time.monotonic() > deadline:
            pytest.fail(f"waiting for {what}: not after {timeout} s\n{diagnose()}")
        time.sleep(0.2)


def record_or_none(run_dir: Path):
    try:
        return read_record(run_dir) if (run_dir / RECORD).exists() else None
    except RunError:
        return None


def epochs(run_dir: Path) -> int:
    record = record_or_none(run_dir)
    return len(record.epochs) if record is not None else 0


def resumes(run_dir: Path) -> int:
    record = record_or_none(run_dir)
    return len(record.resumes) if record is not None else 0


def numbers(record) -> list:
    """What a resumed run must record exactly as an uninterrupted one (not times, dates, resumes)."""
    keep = ("epoch", "step", "lr", "train_bpd", "train_bpd_ema", "test_bpd", "test_bpd_raw", "expm")
    return [{k: getattr(e, k) for k in keep} for e in record.epochs]


def pause_env(flag: Path) -> dict:
    """Every run pauses in the middle of its second epoch while `flag` exists."""
    return {
        "MEFBENCH_TEST_PAUSE_AT": "mid-epoch:2",
        "MEFBENCH_TEST_PAUSE_WHILE": str(flag),
        "MEFBENCH_TEST_PAUSE_S": "900",
    }


# ----------------------------------------------------------------------------- options


def test_time_limits_in_sbatchs_formats():
    assert parse_time("90") == 90 and parse_time("4:00:00") == 240 and parse_time("2-00:00:00") == 2880
    assert parse_time("1:30") == 2 and parse_time("1-12") == 2160 and parse_time("0-0:05") == 5  # seconds round up
    for bad in ("", "abc", "1:2:3:4", "0", "-5"):
        with pytest.raises(ValueError, match="--time"):
            parse_time(bad)


def test_sbatch_passthrough_and_option_checks():
    assert parse_sbatch(["qos=high", "--account=lab", "exclusive", "mail-type=END"]) == {
        "qos": "high", "account": "lab", "exclusive": True, "mail_type": "END"
    }  # fmt: skip
    with pytest.raises(ValueError, match="--sbatch takes KEY=VALUE"):
        parse_sbatch(["=x"])
    with pytest.raises(ValueError, match="--cpus-per-run must be at least 1"):
        ClusterOptions(cpus_per_run=0)


def test_the_sbatch_script_asks_for_what_the_options_say(tmp_path, monkeypatch):
    """The options reach sbatch: partition, time, one task per GPU, CPUs, memory, passthrough, the
    warning signal before the time limit, and the array's throttle."""
    from submitit.slurm import slurm as submitit_slurm

    from mefbench.cluster import _slurm_executor

    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/srun" if name == "srun" else real_which(name))
    options = ClusterOptions(
        partition="gpu", time_min=240, gpus_per_run=2, cpus_per_run=8, mem="16G", max_parallel=3,
        sbatch=parse_sbatch(["qos=high", "exclusive"]),
    )  # fmt: skip
    ex = _slurm_executor(tmp_path, options)
    script = submitit_slurm._make_sbatch_string(command="run", folder=tmp_path, map_count=5, **ex.parameters)
    for line in ("--partition=gpu", "--time=240", "--gpus-per-node=2", "--ntasks-per-node=2", "--cpus-per-task=8",
                 "--mem=16G", "--qos=high", "--signal=USR2@90", "--array=0-4%3"):  # fmt: skip
        assert f"#SBATCH {line}\n" in script, line
    assert "#SBATCH --exclusive\n" in script
    with pytest.raises(ValueError, match="needs --time"):
        _slurm_executor(tmp_path, dataclasses.replace(options, time_min=None))
    monkeypatch.setattr(shutil, "which", lambda name: None if name == "srun" else real_which(name))
    with pytest.raises(RunError, match="use --executor local"):
        _slurm_executor(tmp_path, options)


def test_local_slots_hand_out_gpus():
    assert local_slots(ClusterOptions(), gpus=[0, 1, 2, 3]) == [(0,), (1,), (2,), (3,)]
    assert local_slots(ClusterOptions(gpus_per_run=2), gpus=[4, 5, 6, 7]) == [(4, 5), (6, 7)]
    assert local_slots(ClusterOptions(max_parallel=2), gpus=[0, 1, 2]) == [(0,), (1,)]
    assert local_slots(ClusterOptions(max_parallel=3, cpus_per_run=4), gpus=[]) == [(), (), ()]
    assert len(local_slots(ClusterOptions(cpus_per_run=1), gpus=[])) == os.cpu_count()
    with pytest.raises(ValueError, match="needs 6 GPUs; this machine has 4"):
        local_slots(ClusterOptions(max_parallel=3, gpus_per_run=2), gpus=[0, 1, 2, 3])
    with pytest.raises(ValueError, match="has 0 GPU"):
        local_slots(ClusterOptions(gpus_per_run=1), gpus=[])


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--partition", "gpu"], "--partition apply to --executor local or slurm"),
        (["--executor", "slurm"], "--executor slurm needs --time"),
        (["--executor", "slurm", "--time", "1:00:00:00"], "--time takes minutes"),
        (["--executor", "local", "--sbatch", "qos=high"], "--executor local runs on this machine"),
        (["--executor", "local", "--max-parallel", "0"], "--max-parallel must be at least 1"),
    ],
)
def test_sweep_option_errors_are_clear(extra, message, tmp_path, capsys):
    args = ["sweep", "--table", "2", "--scale", "smoke", "--seeds", "1", "--runs", str(tmp_path / "r"), *extra]
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not any((tmp_path / "r").glob("*/record.json"))  # nothing ran


def test_status_needs_a_runs_directory_and_a_scale_for_a_table(tmp_path, capsys):
    assert main(["status", "--runs", str(tmp_path / "nope")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert main(["status", "--runs", str(tmp_path), "--table", "2"]) == 2
    assert "need --scale" in capsys.readouterr().err


# ----------------------------------------------------------------------------- status


def _hold_lock(run_dir: Path) -> subprocess.Popen:
    """Another process that holds the run's lock (as a training process does) until killed."""
    code = (
        "import sys, time; from mefbench.record import RunLock; RunLock(sys.argv[1]).acquire(); "
        "print('held', flush=True); time.sleep(600)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_status_tells_every_state_without_taking_a_lock(tmp_path, capsys, monkeypatch):
    """finished, running (a live process holds the lock: host and pid), interrupted, killed while
    running (a stale lock is not running), diverged, failed (its job raised), corrupt, pending,
    running on another host; per table and preset, with the last epoch's bits/dim."""
    runs = tmp_path / "runs"
    specs = plan(("2",), "smoke", seeds=9)
    names = [s.name for s in specs]
    finished, running, interrupted, killed, diverged, failed, corrupt, remote, pending = names
    spec = specs[0]
    base = train(spec.model, spec.train, runs / finished, progress=False, tables=spec.tables, preset=spec.presets[0])
    for name, change in [
        (running, {"status": "running"}),
        (interrupted, {"status": "interrupted"}),
        (killed, {"status": "running"}),
        (diverged, {"status": "diverged", "diverged": Divergence(epoch=2, step=9, loss=float("nan"))}),
        (failed, {"status": "interrupted"}),
        (remote, {"status": "running"}),
    ]:
        (runs / name).mkdir()
        write_record(runs / name, dataclasses.replace(base, name=name, epochs=base.epochs[:1], **change))
    (runs / corrupt).mkdir()
    (runs / corrupt / RECORD).write_text("{not json")
    (runs / killed / LOCK).write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))
    (runs / remote / LOCK).write_text(json.dumps({"pid": 77, "host": "node-elsewhere"}))
    # the failed run's job raised: submitit's result file says so
    from submitit.core.utils import JobPaths, cloudpickle_dump

    folder = runs / SUBMITIT_DIR
    folder.mkdir()
    (folder / "jobs.json").write_text(
        json.dumps({failed: [dataclasses.asdict(JobEntry(failed, "999999", "slurm", "t"))]})
    )
    cloudpickle_dump(("error", "Traceback ...\nRunError: out of disk"), JobPaths(folder, "999999", 0).result_pickle)

    holder = _hold_lock(runs / running)
    try:
        with monkeypatch.context() as m:  # status never takes a lock, not even for an instant
            m.setattr(fcntl, "flock", lambda *a: pytest.fail("status took a lock"))
            m.setattr(fcntl, "lockf", lambda *a: pytest.fail("status took a lock"))
            assert lock_holder(runs / running)[1] is True
            rows = {r.name: r for r in run_statuses(runs, specs)}
            assert main(["status", "--runs", str(runs), "--table", "2", "--scale", "smoke", "--seeds", "9"]) == 0
        out = capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()
    assert {n: rows[n].state for n in names} == {
        finished: "finished", running: "running", interrupted: "interrupted", killed: "interrupted",
        diverged: "diverged", failed: "failed", corrupt: "corrupt", remote: "running", pending: "pending",
    }  # fmt: skip
    assert rows[running].holder["pid"] == holder.pid and rows[killed].holder["pid"] == 2**22 + 12345
    assert rows[failed].note == "RunError: out of disk" and rows[failed].job_state == "FAILED"
    assert "not JSON" in rows[corrupt].note or "corrupt run record" in rows[corrupt].note
    first = base.epochs[0].test_bpd
    assert (
        f"{specs[0].presets[0]}  seed 1   running on {socket.gethostname()} (pid {holder.pid}), epoch 1/{spec.train.epochs}, "
        in out
    )
    assert f"test bits/dim {first:.4f}" in out and f"test bits/dim {base.epochs[-1].test_bpd:.4f}" in out
    assert "ended without marking it" in out and "locked on node-elsewhere, per its record" in out
    assert "pending" in out and "corrupt run record" in out and "job 999999 FAILED (RunError: out of disk)" in out
    assert out.index("table 2:") < out.index("table 6:")  # every table the runs fill, in the report's order
    assert out.splitlines()[0].startswith(f"{runs}: 9 runs: 1 finished, 2 running, 2 interrupted, 1 diverged")
    # without a plan only the recorded runs are shown, and the text says how to see the pending ones
    text = format_status(run_statuses(runs), runs, planned=False)
    assert pending not in text and "no plan" in text


def test_a_sweep_writes_its_plan_for_status(tmp_path, capsys):
    """status without --table/--scale shows the runs a sweep planned there, those not started as pending."""
    runs = tmp_path / "runs"
    assert (
        main(["sweep", "--table", "2", "--scale", "smoke", "--seeds", "1", "--runs", str(runs), "--no-progress"]) == 0
    )
    capsys.readouterr()
    shutil.rmtree(runs / "smoke-t2-mef-seed0")
    assert main(["status", "--runs", str(runs)]) == 0
    out = capsys.readouterr().out
    assert "smoke-t2-mef  seed 0   pending" in out and "1 runs: 1 pending" in out


# ----------------------------------------------------------------------------- a job, directly


def test_a_job_keeps_an_ended_run_and_leaves_a_locked_one(tmp_path):
    spec = plan(("2",), "smoke", seeds=1)[0]
    job = RunJob(spec, tmp_path / spec.name)
    first = job()
    assert first["status"] == "finished" and first["epochs"] == spec.train.epochs
    record = read_record(tmp_path / spec.name)
    assert job() == first and read_record(tmp_path / spec.name) == record  # kept, not trained again
    assert job.checkpoint() is None  # an ended run is never requeued: finished...
    diverged = Divergence(epoch=1, step=3, loss=float("nan"))
    write_record(tmp_path / spec.name, dataclasses.replace(record, status="diverged", diverged=diverged))
    assert job.checkpoint() is None and job()["status"] == "diverged"  # ... or diverged (data, never retried)
    other = plan(("2",), "smoke", seeds=2)[1]
    (tmp_path / other.name).mkdir()
    holder = _hold_lock(tmp_path / other.name)
    try:
        out = RunJob(other, tmp_path / other.name)()
    finally:
        holder.kill()
        holder.wait()
    assert out["status"] == "locked" and f"process {holder.pid}" in out["message"]
    assert RunJob(other, tmp_path / other.name).checkpoint() is not None  # not ended: would be requeued
    # a job that reached its time limit without committing an epoch is not requeued (it would loop)
    stuck = RunJob(other, tmp_path / other.name, time_min=20)
    stuck._started = time.monotonic() - 17 * 60  # past 0.8 × 20 minutes: a time limit, not a preemption
    assert stuck.checkpoint() is None
    stuck._started = time.monotonic() - 5 * 60  # early: a preemption, requeued whatever the progress
    assert stuck.checkpoint() is not None


# ----------------------------------------------------------------------------- the local executor, end to end


@pytest.mark.slow
def test_local_executor_requeues_a_preempted_run_and_a_rerun_resumes_a_cancelled_one(tmp_path):
    """Two runs as local submitit jobs, both paused in their second epoch: one gets the scheduler's
    warning signal (SIGUSR2: a time limit or a preemption) and is requeued by submitit and resumes
    from its committed epoch; the other gets SIGTERM (a cancel), so the sweep reports it and exits
    1, and the next sweep resumes it and keeps the other. Both end with the record of an
    uninterrupted run, each epoch trained once into it."""
    sweep = ["sweep", "--table", "2", "--scale", "smoke", "--seeds", "2", "--no-progress"]
    reference = cli(*sweep, "--runs", "ref", cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    runs, flag = tmp_path / "runs", tmp_path / "pause"
    flag.touch()
    local = [*sweep, "--runs", "runs", "--executor", "local", "--max-parallel", "2", "--cpus-per-run", "1"]
    first = cli(*local, cwd=tmp_path, env=pause_env(flag), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    preempted, cancelled = names = [s.name for s in plan(("2",), "smoke", seeds=2)]
    cap = plan(("2",), "smoke", seeds=2)[0].train.epochs
    try:
        wait_until(
            lambda: all(epochs(runs / n) == 1 and lock_holder(runs / n)[1] for n in names), "epoch 1", procs=[first]
        )
        pids = {n: lock_holder(runs / n)[0]["pid"] for n in names}
        status = run("status", "--runs", "runs", cwd=tmp_path)
        for n in names:
            assert f"running on {socket.gethostname()} (pid {pids[n]}), epoch 1/{cap}" in status.stdout, status.stdout
        os.kill(pids[preempted], signal.SIGUSR2)
        os.kill(pids[cancelled], signal.SIGTERM)
        wait_until(lambda: resumes(runs / preempted) == 1, "the requeued job to resume", procs=[first])
        wait_until(lambda: record_or_none(runs / cancelled).status == "interrupted", "the cancel", procs=[first])
    finally:
        flag.unlink()
    out = first.communicate(timeout=600)[0]
    assert first.returncode == 1, out
    assert f"not finished: {cancelled}: interrupted, epoch 1/{cap}" in out and f"{preempted}: finished" in out
    job = latest_jobs(runs)[preempted].job_id
    assert "Requeued job" in (runs / SUBMITIT_DIR / f"{job}_0_log.out").read_text()  # submitit's requeue
    kept = (runs / preempted / RECORD).read_text()
    again = run(*local, cwd=tmp_path)
    assert again.returncode == 0, again.stdout
    assert f"{preempted}: finished" in again.stdout and "(kept)" in again.stdout
    assert f"{cancelled}: started as local job" in again.stdout and "2 runs under runs: 2 finished" in again.stdout
    assert (runs / preempted / RECORD).read_text() == kept  # not trained again
    assert reference.wait(timeout=600) == 0, reference.stdout.read()
    for name in names:
        got, want = read_record(runs / name), read_record(tmp_path / "ref" / name)
        assert got.status == "finished" and [e.epoch for e in got.epochs] == [e.epoch for e in want.epochs]
        assert len(got.epochs) >= 2 and [r.from_epoch for r in got.resumes] == [1]  # epoch 2 trained once
        assert numbers(got) == numbers(want), name


def test_a_filesystem_without_flock_is_named(tmp_path, monkeypatch):
    """Lustre without -o flock answers flock with ENOSYS: the lock says what the filesystem lacks."""
    import errno

    from mefbench.record import RunLock

    def no_flock(fd, op):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.raises(RunError, match=r"does not support flock .*Lustre needs the flock mount option"):
        RunLock(tmp_path).acquire()


def test_scheduler_states_say_when_the_controller_does_not_answer(monkeypatch):
    """squeue's states by job id; UNREACHABLE (so --wait keeps waiting) when squeue is there but
    the controller does not answer; nothing without squeue (submitit's own files tell then)."""
    from mefbench import cluster

    answers = {}
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}" if name in ("squeue", "sacct") else None)
    monkeypatch.setattr(cluster, "_query", lambda cmd: answers[cmd[0]])
    answers["squeue"] = subprocess.CompletedProcess([], 0, "12_0|RUNNING\n12_1|PENDING\n", "")
    answers["sacct"] = subprocess.CompletedProcess([], 0, "11|CANCELLED by 0\n", "")
    assert cluster._slurm_states(["12_0", "12_1", "11"]) == {"12_0": "RUNNING", "12_1": "PENDING", "11": "CANCELLED"}
    answers["squeue"] = subprocess.CompletedProcess([], 1, "", "slurm_load_jobs error: Invalid job id specified")
    answers["sacct"] = subprocess.CompletedProcess([], 1, "", "Slurm accounting storage is disabled")
    assert cluster._slurm_states(["11"]) == {}  # gone from the queue, no accounting: submitit's files tell
    answers["squeue"] = subprocess.CompletedProcess([], 1, "", "Unable to contact slurm controller (connect failure)")
    assert cluster._slurm_states(["12_0", "11"]) == {"12_0": "UNREACHABLE", "11": "UNREACHABLE"}
    monkeypatch.setattr(shutil, "which", lambda name: None)
    answers["squeue"] = None
    assert cluster._slurm_states(["12_0"]) == {}


def test_a_finished_run_of_another_configuration_is_refused_not_kept(tmp_path, capsys):
    """As the inline sweep does: a run trained by hand under a planned name with another lr is
    left as it is, named with the differing field, and makes the sweep's exit code 1."""
    from mefbench.cluster import _refusals, _to_submit

    (spec,) = plan(("2",), "smoke", seeds=1)
    run_dir = tmp_path / spec.name
    assert main(["train", "--preset", spec.presets[0], "--lr", "0.05", "--out", str(run_dir), "--no-progress"]) == 0
    before = (run_dir / RECORD).read_bytes()
    todo, refused = _to_submit([spec], tmp_path)
    assert todo == [] and list(refused) == [spec.name]
    assert f"train.lr: 0.05 recorded, {spec.train.lr!r} planned" in refused[spec.name]
    assert _refusals(refused) == 1 and "1 planned runs were refused" in capsys.readouterr().err
    assert (run_dir / RECORD).read_bytes() == before
    # the same run, planned as it was trained, is kept and needs no job
    (kept,) = plan(("2",), "smoke", seeds=1)
    kept = dataclasses.replace(kept, train=dataclasses.replace(kept.train, lr=0.05))
    assert _to_submit([kept], tmp_path) == ([], {})

"""A sweep through a real SLURM scheduler (sbatch, squeue, scancel, scontrol requeue).

These tests need a reachable cluster: `bash scripts/slurm-local.sh start` starts a single-node
one on this machine (root, Debian); `bash .ci/run` does so before the tests. Without one they
are skipped, saying so.
"""

import shutil
import socket
import subprocess

import pytest
from test_cluster import cli, epochs, numbers, pause_env, resumes, run, wait_until

from mefbench.cluster import SUBMITIT_DIR
from mefbench.record import RECORD, read_record
from mefbench.status import lock_holder, run_statuses
from mefbench.sweep import plan


def _reachable() -> bool:
    if shutil.which("sinfo") is None or shutil.which("sbatch") is None:
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(
        not _reachable(),
        reason="no SLURM cluster reachable (sinfo missing or failing); `bash scripts/slurm-local.sh start` starts one",
    ),
]


def _queue() -> str:
    done = subprocess.run(["squeue", "-a", "-t", "all"], capture_output=True, text=True, timeout=60)
    return done.stdout + done.stderr


def _logs(runs) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-3000:]}" for p in sorted((runs / SUBMITIT_DIR).glob("*_log.*")))


def test_a_slurm_sweep_survives_a_preemption_and_a_cancel(tmp_path):
    """Two smoke runs as a SLURM job array, both paused in their second epoch. One gets the
    preemption signal (`scancel --signal=USR2`, what SLURM sends before a time limit and, with
    preempt_send_user_signal, at a preemption): submitit requeues it (`scontrol requeue`) and it
    resumes from its committed epoch. The other is cancelled (`scancel`): the next sweep, with
    --wait, submits only that run (the requeued one is still queued or running: not submitted
    again), resumes it and reports every run finished. Both records equal an uninterrupted run's,
    each epoch trained once into them."""
    sweep = ["sweep", "--table", "2", "--scale", "smoke", "--seeds", "2", "--no-progress"]
    reference = cli(*sweep, "--runs", "ref", cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    runs, flag = tmp_path / "runs", tmp_path / "pause"
    jobs = [*sweep, "--runs", "runs", "--executor", "slurm", "--time", "30", "--cpus-per-run", "1", "--mem", "2G"]
    flag.touch()
    submitted = run(*jobs, cwd=tmp_path, env=pause_env(flag), timeout=300)
    assert submitted.returncode == 0, submitted.stdout
    preempted, cancelled = names = [s.name for s in plan(("2",), "smoke", seeds=2)]
    cap = plan(("2",), "smoke", seeds=2)[0].train.epochs
    ids = {}
    for name in names:
        line = next(ln for ln in submitted.stdout.splitlines() if ln.startswith(f"{name}: submitted as SLURM job "))
        ids[name] = line.rsplit(" ", 1)[1]
    assert ids[preempted].split("_")[0] == ids[cancelled].split("_")[0]  # one job array
    diagnose = lambda: _queue() + _logs(runs)  # noqa: E731
    try:
        wait_until(
            lambda: all(epochs(runs / n) == 1 and lock_holder(runs / n)[1] for n in names), "epoch 1", diagnose=diagnose
        )
        status = run("status", "--runs", "runs", cwd=tmp_path)
        for name in names:
            pid = lock_holder(runs / name)[0]["pid"]
            assert (
                f"running on {socket.gethostname()} (pid {pid}), epoch 1/{cap}, test bits/dim" in status.stdout
                and f"job {ids[name]} RUNNING" in status.stdout
            ), status.stdout
        subprocess.run(["scancel", "--signal=USR2", ids[preempted]], check=True, timeout=60)
        subprocess.run(["scancel", ids[cancelled]], check=True, timeout=60)
        wait_until(lambda: resumes(runs / preempted) == 1, "the requeued job to resume", diagnose=diagnose)

        def cancel_ended() -> bool:  # interrupted (or, killed before it could say so, running with a stale lock)
            row = next(r for r in run_statuses(runs) if r.name == cancelled)
            return row.state == "interrupted" and row.job_state == "CANCELLED"

        wait_until(cancel_ended, "the cancelled job to end", diagnose=diagnose)
    finally:
        flag.unlink()
    again = run(*jobs, "--wait", cwd=tmp_path, timeout=900)
    assert again.returncode == 0, again.stdout + diagnose()
    assert f"{preempted}: already " in again.stdout or f"{preempted}: finished" in again.stdout, again.stdout
    assert f"{cancelled}: submitted as SLURM job " in again.stdout and f"{preempted}: submitted" not in again.stdout
    assert "2 runs under runs: 2 finished" in again.stdout
    log = (runs / SUBMITIT_DIR / f"{ids[preempted]}_0_log.out").read_text()
    assert "Requeued job" in log  # submitit's requeue, after the training loop's interrupt
    assert reference.wait(timeout=600) == 0, reference.stdout.read()
    for name in names:
        got, want = read_record(runs / name), read_record(tmp_path / "ref" / name)
        assert got.status == "finished" and [e.epoch for e in got.epochs] == [e.epoch for e in want.epochs]
        assert len(got.epochs) >= 2 and [r.from_epoch for r in got.resumes] == [1]  # epoch 2 trained once
        assert numbers(got) == numbers(want), name
    # a third sweep has nothing to do and changes nothing
    kept = {n: (runs / n / RECORD).read_text() for n in names}
    third = run(*jobs, "--wait", cwd=tmp_path, timeout=300)
    assert third.returncode == 0 and "nothing to submit" in third.stdout, third.stdout
    assert {n: (runs / n / RECORD).read_text() for n in names} == kept


def test_sbatch_refusing_the_jobs_is_a_clear_error(tmp_path):
    done = run(
        "sweep", "--table", "2", "--scale", "smoke", "--seeds", "1", "--runs", "runs", "--executor", "slurm",
        "--time", "5", "--partition", "no-such-partition", cwd=tmp_path, timeout=300,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout
    assert "sbatch refused the jobs" in done.stdout and "partition" in done.stdout.lower(), done.stdout
    assert not list((tmp_path / "runs").glob("*/record.json"))

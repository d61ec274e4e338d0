import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import mefbench
from mefbench.record import CHECKPOINT, LOCK, RECORD


@pytest.mark.slow
def test_two_processes_with_gloo(tmp_path):
    """torchrun --nproc_per_node=2 -m mefbench train: DDP on CPU (gloo), only rank 0 writes."""
    root = str(Path(mefbench.__file__).resolve().parent.parent)  # this checkout's mefbench, not an installed one
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH")))),
    }
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "mefbench", "train", "--preset", "smoke", "--device", "cpu", "--out", "run", "--no-progress",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((tmp_path / "run" / RECORD).read_text())
    assert record["status"] == "finished"
    assert record["world_size"] == 2
    assert record["final"]["test_bpd"] > 0
    assert done.stdout.count("run: finished") == 1  # rank 0 reports
    assert record["final"]["roundtrip_error"] < 1e-4 and record["final"]["sample_time_per_image_s"] > 0
    # only rank 0 wrote: its lock, one record, one checkpoint, no stray temporary files
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [LOCK, CHECKPOINT, RECORD]

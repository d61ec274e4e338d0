import json
import os
import subprocess
import sys

import pytest

from mefbench.training import RECORD


@pytest.mark.slow
def test_two_processes_with_gloo(tmp_path):
    """torchrun --nproc_per_node=2 -m mefbench train: DDP on CPU (gloo), only rank 0 writes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "mefbench", "train", "--preset", "smoke", "--device", "cpu", "--out", "run", "--no-progress",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((tmp_path / "run" / RECORD).read_text())
    assert record["status"] == "finished"
    assert record["world_size"] == 2
    assert record["final"]["test_bpd"] > 0
    assert done.stdout.count("run: finished") == 1  # rank 0 reports
    # only rank 0 wrote: one record, one checkpoint, no stray temporary files
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["checkpoint.pt", "record.json"]

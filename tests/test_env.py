"""mefbench.env: the one description of versions, commit and machine that records, bench JSON and
the device check share."""

from __future__ import annotations

import platform

import torch

from mefbench import __version__, env


def test_versions_name_the_packages_and_the_commit(monkeypatch):
    monkeypatch.setenv("GIT_COMMIT", "0123abcd")
    v = env.versions()
    assert v["mefbench"] == __version__ and v["torch"] == torch.__version__
    assert v["python"] == platform.python_version() and v["git_commit"] == "0123abcd"
    assert {"numpy", "scipy", "pandas"} <= set(v)


def test_the_commit_is_read_only_from_a_checkout(monkeypatch, tmp_path):
    monkeypatch.delenv("GIT_COMMIT", raising=False)
    assert env.git_commit(tmp_path) is None  # no .git here: never an enclosing repository's commit
    here = env.git_commit()
    assert here is None or (len(here) == 40 and all(c in "0123456789abcdef" for c in here))


def test_machine_and_environment_on_the_cpu():
    m = env.machine("cpu")
    assert set(m) == {"platform", "processor", "cpu_count", "torch_threads"}
    assert m["torch_threads"] == torch.get_num_threads()
    e = env.environment("cpu")
    assert e["device_type"] == "cpu" and e["device"].startswith("CPU (")
    assert {**env.versions(), **m}.keys() <= e.keys()
    assert {"cuda", "cudnn", "nccl", "driver", "gpu_memory_gb", "capability", "device_count"} <= set(e)

"""Where a measurement was made: package versions, the source commit and the machine, in one place.

Run records (``versions``, ``machine``), ``mefbench bench --json`` and the GPU device check
(``environment``) all describe their environment with these functions, so the same fact is read
the same way and carries the same key everywhere. Whatever cannot be read is ``None``.
"""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
from pathlib import Path

import torch

from . import __version__

__all__ = ["device_name", "driver_version", "environment", "git_commit", "machine", "versions"]

_ROOT = Path(__file__).resolve().parents[1]  # the checkout, when mefbench runs from one


def git_commit(root: str | Path | None = None) -> str | None:
    """The commit of the source tree: ``$GIT_COMMIT`` if set (a copy without ``.git``, e.g. on a
    device machine), else ``git rev-parse HEAD`` in the checkout mefbench runs from, else None
    (an installed package, or no git)."""
    if os.environ.get("GIT_COMMIT"):
        return os.environ["GIT_COMMIT"]
    root = Path(root) if root is not None else _ROOT
    if not (root / ".git").exists():  # not a checkout: never report an enclosing repository's commit
        return None
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], check=False, cwd=root, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None


def versions() -> dict[str, str | None]:
    """mefbench, Python, torch, numpy, scipy and pandas versions, and the source commit."""
    import numpy
    import pandas
    import scipy

    return {
        "mefbench": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "scipy": scipy.__version__,
        "pandas": pandas.__version__,
        "git_commit": git_commit(),
    }


def device_name(device: torch.device | str) -> str:
    """The GPU's name for a CUDA device, else ``CPU (<processor>)``."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def machine(device: torch.device | str = "cpu") -> dict[str, object]:
    """Host platform, processor, CPU count, torch's intra-op threads, and the GPU's name on CUDA."""
    device = torch.device(device)
    info: dict[str, object] = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        info["gpu"] = device_name(device)
    return info


def driver_version() -> str | None:
    """The NVIDIA driver's version from ``nvidia-smi`` (None without one)."""
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            check=False, capture_output=True, text=True, timeout=20,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else None


def environment(device: torch.device | str) -> dict[str, object]:
    """Everything above in one flat dict, plus what a device check needs: the device, how many CUDA
    devices there are, the CUDA, cuDNN and NCCL versions, the driver, GPU memory and compute
    capability, and whether TF32 is on."""
    device = torch.device(device)
    env: dict[str, object] = {
        "device": device_name(device),
        "device_type": device.type,
        "device_count": torch.cuda.device_count() if torch.cuda.is_available() else 0,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "nccl": None,
        "driver": None,
        "gpu_memory_gb": None,
        "capability": None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "tf32_cudnn": torch.backends.cudnn.allow_tf32,
        **versions(),
        **machine("cpu"),
    }
    if device.type == "cuda" and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(device)
        env.update(
            gpu_memory_gb=round(props.total_memory / 2**30, 1),
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            driver=driver_version(),
        )
        with contextlib.suppress(Exception):  # an NCCL-less build: the version stays None
            version = torch.cuda.nccl.version()
            env["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    return env

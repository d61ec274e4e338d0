"""A run's checkpoint: written atomically, loaded safely, loaded into a model with errors that say
what does not fit.

``checkpoint.pt`` holds the training state after the run's last committed epoch (the keys of
:data:`CHECKPOINT_KEYS`: model, EMA model, optimiser and schedule states, epoch and step; also the
gradient scaler's state, the model revision and the record of that epoch, the commit point of the
epoch, see :mod:`mefbench.training`). It is written with :func:`save_checkpoint` (temporary file,
fsync, rename) and read with ``torch.load(..., weights_only=True)`` only: a file that would import
code when unpickled is refused as unsafe.
"""

from __future__ import annotations

import pickle
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from .models import MODEL_REVISION, MultiScaleFlow
from .record import CHECKPOINT, RunError, RunRecord, read_record, replace_atomic

__all__ = [
    "CHECKPOINT",
    "CHECKPOINT_KEYS",
    "TrainingState",
    "load_checkpoint",
    "load_model",
    "load_state",
    "revision_problem",
    "save_checkpoint",
]

CHECKPOINT_KEYS = ("model", "ema", "optimizer", "scheduler", "epoch", "step")


def save_checkpoint(path: str | Path, state: dict, hook: Callable[[str], None] | None = None) -> None:
    """``torch.save(state)`` to path atomically: a reader (or a kill) finds the old file or the new
    one, never half of one. ``hook`` is called at the write's named points (for crash tests)."""
    replace_atomic(Path(path), lambda f: torch.save(state, f), hook=hook)


@dataclass
class TrainingState:
    """Everything a checkpoint holds, and the step counter: what :func:`mefbench.training.train` trains."""

    model: MultiScaleFlow
    ema: AveragedModel
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler | None
    step: int = 0

    @property
    def ema_model(self) -> MultiScaleFlow:
        """The model with the EMA weights (what evaluation and the trained run's measurements use)."""
        return cast(MultiScaleFlow, self.ema.module)

    def state_dict(self, epoch: int, record: RunRecord) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "epoch": epoch,
            "step": self.step,
            "model_revision": MODEL_REVISION,
            "record": record.to_json(),  # the commit point: this epoch's record travels with its weights
        }

    def load(self, ckpt: dict, path: Path) -> int:
        """Load a checkpoint's states; returns its epoch."""
        load_state(self.model, ckpt["model"], path, "weights")
        load_state(self.ema, ckpt["ema"], path, "EMA weights")
        load_state(self.optimizer, ckpt["optimizer"], path, "optimiser state")
        load_state(self.scheduler, ckpt["scheduler"], path, "learning-rate schedule")
        if self.scaler is not None and ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step = int(ckpt["step"])
        return int(ckpt["epoch"])


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A checkpoint, loaded with ``weights_only=True``; RunError naming the file if it cannot be used.

    A file that would import code when unpickled (a pickled ``os.system`` call, say) is refused
    as unsafe: a checkpoint holds tensors, numbers and strings only, and mefbench never unpickles
    anything else.
    """
    path = Path(path)
    if not path.exists():
        raise RunError(f"no checkpoint {path}")
    if path.stat().st_size == 0:
        raise RunError(f"checkpoint {path} is empty (0 bytes): it was cut off while being written, or truncated since")
    try:
        with warnings.catch_warnings():  # a plain pickle makes torch warn about its protocol: we say what it is
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise RunError(_checkpoint_problem(path, exc)) from None
    if not isinstance(ckpt, dict):
        raise RunError(f"checkpoint {path} is not a mefbench checkpoint: it holds {type(ckpt).__name__}, not a dict")
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise RunError(f"checkpoint {path} is not a mefbench checkpoint: it lacks {missing}")
    return ckpt


def _checkpoint_problem(path: Path, exc: Exception) -> str:
    text = str(exc)
    found = re.search(r"GLOBAL ([\w.]+)", text)
    if found:
        return (
            f"refused checkpoint {path} as unsafe: unpickling it would import {found.group(1)}, which no "
            "weights file needs (mefbench checkpoints hold tensors, numbers and strings only); do not load it"
        )
    if _is_plain_pickle(path):
        return (
            f"refused checkpoint {path} as unsafe: it is a plain Python pickle, not a file torch.save wrote, and "
            "unpickling it could run any code (mefbench checkpoints are torch.save files of tensors, numbers and "
            "strings); do not load it"
        )
    if "weights_only" in text or "Weights only" in text:  # torch's own reason, without its advice
        reason = re.search(r"WeightsUnpickler error:\s*(.+?)\n", text + "\n", re.DOTALL)
        detail = reason.group(1).strip() if reason and reason.group(1).strip() else "not a weights file"
        return f"corrupt or unreadable checkpoint {path}: {detail}"
    return f"corrupt or unreadable checkpoint {path}: {type(exc).__name__}: {text.strip() or 'no reason given'}"


# torch.save's legacy (non-zip) format opens with this pickled magic number; its zip format with "PK"
_LEGACY_TORCH_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)[:-1]


def _is_plain_pickle(path: Path) -> bool:
    """Whether the file is a pickle that torch.save did not write (pickle protocol 2 or later)."""
    try:
        with open(path, "rb") as f:
            head = f.read(len(_LEGACY_TORCH_MAGIC))
    except OSError:
        return False
    return head.startswith(b"\x80") and head != _LEGACY_TORCH_MAGIC


def load_state(
    module: nn.Module | torch.optim.Optimizer | torch.optim.lr_scheduler.LRScheduler,
    state: object,
    path: Path,
    part: str,
) -> None:
    """module.load_state_dict(state) with a RunError that says what does not fit."""
    if not isinstance(state, dict):
        raise RunError(f"checkpoint {path}: its {part} entry is not a state dict")
    if isinstance(module, nn.Module):
        expected, found = set(module.state_dict()), set(state)
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        if missing or unexpected:
            parts = [f"{len(keys)} {what} (e.g. {', '.join(keys[:3])})" for what, keys in
                     (("missing keys", missing), ("unexpected keys", unexpected)) if keys]  # fmt: skip
            raise RunError(
                f"checkpoint {path} does not fit this run's model ({part}): {'; '.join(parts)}; "
                "it was written for another model configuration or model revision"
            )
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        first = next((line for line in lines if "size mismatch" in line), lines[0] if lines else type(exc).__name__)
        raise RunError(f"checkpoint {path} does not fit this run's model ({part}): {first}") from None


def revision_problem(run_dir: Path, record: RunRecord) -> str | None:
    if record.model_revision == MODEL_REVISION:
        return None
    return (
        f"{run_dir} was trained with model revision {record.model_revision}, and this mefbench builds "
        f"revision {MODEL_REVISION}, whose parameters differ (see mefbench.models.MODEL_REVISION): its "
        "checkpoint cannot be loaded; train the run again in another directory"
    )


def load_model(run_dir: str | Path, ema: bool = True, device: str | torch.device = "cpu") -> MultiScaleFlow:
    """The trained model of a run (EMA weights by default), in eval mode, in the run's precision
    settings (``set_amp`` with its ``amp``)."""
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    problem = revision_problem(run_dir, record)
    if problem:
        raise RunError(problem)
    ckpt_path = run_dir / CHECKPOINT
    if not ckpt_path.exists():
        raise RunError(f"{run_dir} has no {CHECKPOINT}: the run finished no epoch")
    try:
        config = record.model_config()
    except (ValueError, TypeError) as exc:
        raise RunError(f"the model of {run_dir} cannot be built here: {exc}") from exc
    model = MultiScaleFlow(config).float()
    ckpt = load_checkpoint(ckpt_path)
    if ema:
        if not isinstance(ckpt["ema"], dict):
            raise RunError(f"checkpoint {ckpt_path}: its EMA entry is not a state dict")
        state = {k.removeprefix("module."): v for k, v in ckpt["ema"].items() if k.startswith("module.")}
    else:
        state = ckpt["model"]
    load_state(model, state, ckpt_path, "EMA weights" if ema else "weights")
    model.set_amp(record.train.get("amp"))
    return model.to(device).eval()

"""Peak memory of a training step (or of any block of work), measured one way per kind of device."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from .distributed import synchronize

__all__ = ["PeakMemory"]


class PeakMemory:
    """Peak memory of the work inside :meth:`measure` (a training step), in ``.bytes``.

    CUDA: ``torch.cuda.max_memory_allocated`` during the block (everything resident: model, EMA
    copy, optimiser state, batch, activations). CPU: the bytes of the tensors autograd saves for
    backward in the block (``saved_tensors_hooks``), plus the parameters and gradients of
    ``model`` and the state of ``optimizer`` (those given), each storage counted once.
    """

    def __init__(
        self, device: torch.device, model: nn.Module | None = None, optimizer: torch.optim.Optimizer | None = None
    ) -> None:
        self.device, self.model, self.optimizer = device, model, optimizer
        self.bytes: int | None = None
        self.method = (
            "cuda.max_memory_allocated" if device.type == "cuda" else "cpu.saved_tensors+params+grads+optimizer"
        )

    @contextmanager
    def measure(self) -> Iterator[None]:
        if self.device.type == "cuda":
            synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            yield
            synchronize(self.device)
            self.bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        # storages by address; holding them keeps every address unique for the whole step (a freed
        # storage's address could otherwise be reused by another one and counted once for both)
        storages: dict[int, torch.UntypedStorage] = {}

        def add(t: Tensor) -> Tensor:
            try:
                s = t.untyped_storage()
            except (RuntimeError, NotImplementedError):  # sparse or opaque tensors
                return t
            if s.nbytes():
                storages[s.data_ptr()] = s
            return t

        with torch.autograd.graph.saved_tensors_hooks(add, lambda t: t):
            yield
        for p in self.model.parameters() if self.model is not None else ():
            add(p)
            if p.grad is not None:
                add(p.grad)
        for state in self.optimizer.state.values() if self.optimizer is not None else ():
            for value in state.values():
                if isinstance(value, Tensor):
                    add(value)
        self.bytes = sum(s.nbytes() for s in storages.values())
        storages.clear()

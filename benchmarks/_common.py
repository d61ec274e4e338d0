"""Shared pieces of the asv suite: one thread, float32, fixed seeds, the paper's three levels.

Not a benchmark module (asv only collects names that start with time_, peakmem_, track_, …).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["BATCH", "LEVELS", "_LayerTimings", "backward", "set_up_torch"]

# The paper's three levels of a CIFAR-10 model: channels and spatial size after each squeeze.
LEVELS: dict[str, tuple[int, int, int]] = {
    "C12@16x16": (12, 16, 16),
    "C24@8x8": (24, 8, 8),
    "C48@4x4": (48, 4, 4),
}

# Batch of the layer and model benchmarks (the paper trains with 64; 16 keeps the suite quick).
BATCH = 16


def set_up_torch(seed: int = 0) -> None:
    """One intra-op thread, float32 and a fixed seed, so that timings compare across machines."""
    torch.set_num_threads(1)
    torch.set_default_dtype(torch.float32)
    torch.manual_seed(seed)


def backward(loss: Tensor, *modules: nn.Module) -> None:
    """loss.backward() after clearing the gradients, so that repeated calls do not accumulate."""
    for module in modules:
        module.zero_grad(set_to_none=True)
    loss.backward()


class _LayerTimings:
    """forward, inverse and forward+backward of ``self.layer`` on ``self.x``, for any grid.

    A subclass's setup builds the layer and calls ``self._prepare(x)``. The leading underscore
    keeps asv from collecting this base itself; its subclasses inherit the benchmarks.
    """

    def _prepare(self, x: Tensor) -> None:
        self.x = x
        self.x_grad = x.clone().requires_grad_(True)
        with torch.no_grad():
            self.y = self.layer(x)[0]

    def time_forward(self, *params: object) -> None:
        with torch.no_grad():
            self.layer(self.x)

    def time_inverse(self, *params: object) -> None:
        with torch.no_grad():
            self.layer.inverse(self.y)

    def time_forward_backward(self, *params: object) -> None:
        self.x_grad.grad = None
        y, logdet = self.layer(self.x_grad)
        backward(0.5 * y.square().sum() - logdet.sum(), self.layer)

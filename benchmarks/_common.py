"""Shared pieces of the asv suite: one thread, float32, fixed seeds, the paper's three levels.

Not a benchmark module (asv only collects names that start with time_, peakmem_, track_, …).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mefbench.layers import FlowLayer
from mefbench.presets import LEVELS as _PAPER_LEVELS

__all__ = ["BATCH", "LEVELS", "_LayerTimings", "backward", "set_up_torch"]

# The paper's three levels of a CIFAR-10 model (channels, H, W), by the label asv shows: "C12@16x16".
LEVELS: dict[str, tuple[int, int, int]] = {f"C{c}@{h}x{w}": (c, h, w) for c, h, w in _PAPER_LEVELS}

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

    layer: FlowLayer

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

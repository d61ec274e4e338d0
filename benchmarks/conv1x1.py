"""Invertible 1×1 convolutions: standard (Glow), PLU (Glow) and matrix-exp (MEF).

One layer at each of the paper's three levels (C=12 at 16×16, C=24 at 8×8, C=48 at 4×4),
batch 16, float32. The layer stays in training mode, so every call builds its matrix (W, the
LU product, or e^W) and, for inverse, its inverse matrix (W⁻¹, two triangular solves, e^{−W}):
the cost of a training step or of sampling without the eval-mode cache. forward and inverse
run without autograd; forward_backward differentiates ½∥y∥² − log|det| with respect to the
parameters and the input.
"""

from __future__ import annotations

import torch

from mefbench.layers import CONV1X1

from ._common import BATCH, LEVELS, backward, set_up_torch

__all__ = ["Conv1x1"]


class Conv1x1:
    params = [list(CONV1X1), list(LEVELS)]
    param_names = ["conv", "level"]

    def setup(self, conv: str, level: str) -> None:
        set_up_torch()
        c, h, w = LEVELS[level]
        self.layer = CONV1X1[conv](c)
        self.x = torch.randn(BATCH, c, h, w)
        self.x_grad = self.x.clone().requires_grad_(True)
        with torch.no_grad():
            self.y = self.layer(self.x)[0]

    def time_forward(self, conv: str, level: str) -> None:
        with torch.no_grad():
            self.layer(self.x)

    def time_inverse(self, conv: str, level: str) -> None:
        with torch.no_grad():
            self.layer.inverse(self.y)

    def time_forward_backward(self, conv: str, level: str) -> None:
        self.x_grad.grad = None
        y, logdet = self.layer(self.x_grad)
        backward(0.5 * y.square().sum() - logdet.sum(), self.layer)

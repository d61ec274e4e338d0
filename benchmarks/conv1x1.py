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

from ._common import BATCH, LEVELS, _LayerTimings, set_up_torch

__all__ = ["Conv1x1"]


class Conv1x1(_LayerTimings):
    params = [list(CONV1X1), list(LEVELS)]
    param_names = ["conv", "level"]

    def setup(self, conv: str, level: str) -> None:
        set_up_torch()
        c, h, w = LEVELS[level]
        self.layer = CONV1X1[conv](c)
        self._prepare(torch.randn(BATCH, c, h, w))

"""Coupling layers: additive, affine, matrix-exp (full c×c) and matrix-exp low-rank (rank 3).

One layer at each of the paper's three levels (C=12 at 16×16, C=24 at 8×8, C=48 at 4×4), the
coupling net with hidden 32 and 1 residual block, batch 16, float32. After the data-dependent
init the zero-initialised output conv of the net is redrawn (N(0, (4/√fan_in)²)), so that the
coupling is not the identity and the matrices S use a good part of their bound (∥S∥∞ ≲ 1), as
they do during training; a fresh layer would exponentiate zero matrices. forward and inverse run
without autograd; forward_backward differentiates ½∥y∥² − log|det| with respect to the
parameters and the input.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from mefbench.layers import COUPLING, Coupling, MatrixExpCoupling

from ._common import BATCH, LEVELS, _LayerTimings, set_up_torch

__all__ = ["HIDDEN", "KINDS", "NUM_BLOCKS", "CouplingLayer", "make_coupling"]

HIDDEN = 32
NUM_BLOCKS = 1
KINDS = ["additive", "affine", "matexp", "matexp_lowrank"]


def make_coupling(
    kind: str, channels: int, hidden: int = HIDDEN, num_blocks: int = NUM_BLOCKS
) -> Coupling:
    """A coupling by benchmark name: the registry's, with matexp forced full and a rank-3 variant."""
    if kind == "matexp":
        return MatrixExpCoupling(channels, hidden, num_blocks, rank=0)
    if kind == "matexp_lowrank":
        return MatrixExpCoupling(channels, hidden, num_blocks, rank=3)
    return COUPLING[kind](channels, hidden, num_blocks)


class CouplingLayer(_LayerTimings):
    params = [KINDS, list(LEVELS)]
    param_names = ["coupling", "level"]

    def setup(self, coupling: str, level: str) -> None:
        set_up_torch()
        c, h, w = LEVELS[level]
        self.layer = make_coupling(coupling, c)
        x = torch.randn(BATCH, c, h, w)
        head = self.layer.net.head
        with torch.no_grad():
            self.layer(x)  # data-dependent init of the net's norms
            fan_in = head.weight[0].numel()
            nn.init.normal_(head.weight, std=4 / math.sqrt(fan_in))
        self._prepare(x)

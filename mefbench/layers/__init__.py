"""The layer zoo: every layer maps (B, C, H, W) -> (y, logdet) and back, registries by name."""

from __future__ import annotations

from .actnorm import ActNorm, DataInitAffine
from .base import FlowLayer, FlowSequential, check_input
from .conv1x1 import Conv1x1, MatrixExpConv1x1, PLUConv1x1, StandardConv1x1
from .coupling import (
    SCALE_MAPS,
    AdditiveCoupling,
    AffineCoupling,
    BoundedTanh,
    Coupling,
    CouplingNet,
    ExpScale,
    MatrixExpCoupling,
    SigmoidScale,
)
from .reshape import SQUEEZE_ORDERS, Squeeze

__all__ = [
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "BoundedTanh",
    "CONV1X1",
    "COUPLING",
    "Conv1x1",
    "Coupling",
    "CouplingNet",
    "DataInitAffine",
    "ExpScale",
    "FlowLayer",
    "FlowSequential",
    "MatrixExpConv1x1",
    "MatrixExpCoupling",
    "PLUConv1x1",
    "SCALE_MAPS",
    "SQUEEZE_ORDERS",
    "SigmoidScale",
    "Squeeze",
    "StandardConv1x1",
    "check_input",
]

CONV1X1: dict[str, type[Conv1x1]] = {
    "standard": StandardConv1x1,
    "plu": PLUConv1x1,
    "matexp": MatrixExpConv1x1,
}

COUPLING: dict[str, type[Coupling]] = {
    "additive": AdditiveCoupling,
    "affine": AffineCoupling,
    "matexp": MatrixExpCoupling,
}

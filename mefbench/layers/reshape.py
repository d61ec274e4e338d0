"""Squeeze (space-to-depth ×2) in the paper's and Glow's channel orders."""

from __future__ import annotations

from torch import Tensor

from .base import Cost, FlowLayer, LayerInfo
from .checks import check_input

__all__ = ["SQUEEZE_ORDERS", "Squeeze"]

SQUEEZE_ORDERS = ("subpixel", "channel")


class Squeeze(FlowLayer):
    """(B, C, H, W) -> (B, 4C, H/2, W/2); volume preserving, log|det| = 0.

    order="subpixel" (the paper): output channel (2·dy + dx)·C + c.
    order="channel" (Glow): output channel c·4 + 2·dy + dx.
    """

    info = LayerInfo(family="reshape", reference="Dinh et al. 2017 (RealNVP)", cost=Cost("O(C·n)", "O(1)", "O(C·n)"))

    def __init__(self, order: str = "subpixel") -> None:
        super().__init__()
        if order not in SQUEEZE_ORDERS:
            raise ValueError(f"Squeeze order must be one of {SQUEEZE_ORDERS}, got {order!r}")
        self.order = order

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_input(x, None, "Squeeze")
        b, c, h, w = x.shape
        if h % 2 or w % 2:
            raise ValueError(f"Squeeze needs even height and width, got H×W = {h}×{w}")
        x = x.reshape(b, c, h // 2, 2, w // 2, 2)  # b, c, i, dy, j, dx
        perm = (0, 3, 5, 1, 2, 4) if self.order == "subpixel" else (0, 1, 3, 5, 2, 4)
        y = x.permute(*perm).reshape(b, 4 * c, h // 2, w // 2)
        return y, x.new_zeros(b)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        check_input(y, None, "Squeeze.inverse")
        b, c4, h, w = y.shape
        if c4 % 4:
            raise ValueError(f"Squeeze.inverse needs a channel count divisible by 4, got {c4}")
        c = c4 // 4
        if self.order == "subpixel":
            x = y.reshape(b, 2, 2, c, h, w).permute(0, 3, 4, 1, 5, 2)  # b, c, i, dy, j, dx
        else:
            x = y.reshape(b, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3)
        return x.reshape(b, c, 2 * h, 2 * w), y.new_zeros(b)

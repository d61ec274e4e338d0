"""Butterfly layers: products of sparse levels that each mix pairs of entries with 2×2 blocks."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import Cost, FlowLayer, LayerInfo
from .checks import EvalCache, check_channels, check_input, check_int, check_size

__all__ = ["ButterflyConv", "butterfly_levels"]


def butterfly_levels(dim: int) -> int:
    """How many butterfly levels a vector of ``dim`` entries takes: the power of 2 in dim."""
    return (dim & -dim).bit_length() - 1


def _determinants(blocks: Tensor) -> Tensor:
    """ad − bc of each block [[a, b], [c, d]] of blocks (…, 2, 2, m)."""
    return blocks[..., 0, 0, :] * blocks[..., 1, 1, :] - blocks[..., 0, 1, :] * blocks[..., 1, 0, :]


def _block_inverse(blocks: Tensor) -> Tensor:
    """[[a, b], [c, d]]⁻¹ = [[d, −b], [−c, a]] / (ad − bc) for blocks (…, 2, 2, m)."""
    a, b, c, d = blocks[..., 0, 0, :], blocks[..., 0, 1, :], blocks[..., 1, 0, :], blocks[..., 1, 1, :]
    adjugate = torch.stack([torch.stack([d, -b], -2), torch.stack([-c, a], -2)], -3)
    return adjugate / _determinants(blocks)[..., None, None, :]


class ButterflyConv(FlowLayer):
    """y = B_{L−1} ⋯ B₁ B₀ x on the flattened sample, B_ℓ mixing pairs (i, i + D/2^{ℓ+1}) with 2×2 blocks; log|det| = Σ log|ad − bc|.

    Args:
        channels: C.
        size: (H, W), required: the levels act on the D = C·H·W entries of a sample, in (c, h, w)
            order.
        levels: L, at most (and by default) the power of 2 in D (log₂ D when D is one).

    Level ℓ cuts the flattened sample into 2^ℓ segments; in each, entry j of the first half and
    entry j of the second half go through their own 2×2 block [[a, b], [c, d]] (D/2 blocks, 2D
    parameters per level). In (c, h, w) order the first levels mix channels, the next rows, the
    last columns. Inverse: each level's blocks inverted in closed form, levels in reverse order.
    Init: every block a rotation by a uniform random angle (the map starts orthogonal, log-det
    0). The blocks' inverses and log-dets are cached in eval. A block whose determinant reaches 0
    makes the layer singular (as in the paper; no parametrisation prevents it).

    Cost per sample: O(L·D) forward, log-det and inverse.
    """

    info = LayerInfo(
        family="spatial",
        reference="Meng, Zhou, Choi, Dao & Ermon 2022 (ButterflyFlow)",
        cost=Cost("O(L·D), D = C·n", "O(L·D)", "O(L·D)"),
        inverse="closed form",
    )

    def __init__(self, channels: int, *, size: tuple[int, int] | None = None, levels: int | None = None) -> None:
        super().__init__()
        self.channels = check_channels("ButterflyConv", channels)
        self.size = check_size("ButterflyConv", size, required=True, why=": its levels act on the C·H·W entries")
        dim = channels * self.size[0] * self.size[1]
        most = butterfly_levels(dim)
        if most == 0:
            raise ValueError(
                f"ButterflyConv needs an even number of entries C·H·W, got {channels}·{self.size[0]}·{self.size[1]} = {dim}"
            )
        if levels is None:
            levels = most
        check_int("ButterflyConv", "levels", levels)
        if levels > most:
            raise ValueError(
                f"ButterflyConv option levels must be at most {most} (the power of 2 in C·H·W = {dim}), got {levels}"
            )
        self.levels = levels
        angle = 2 * math.pi * torch.rand(levels, dim // 2)
        cos, sin = torch.cos(angle), torch.sin(angle)
        self.blocks = nn.Parameter(torch.stack([torch.stack([cos, -sin], 1), torch.stack([sin, cos], 1)], 1))
        self._cache = EvalCache()

    def _check(self, x: Tensor) -> None:
        check_input(x, self.channels, "ButterflyConv", self)
        if tuple(x.shape[2:]) != self.size:
            h, w = self.size
            raise ValueError(
                f"ButterflyConv was built for {h}×{w} images, got {x.shape[2]}×{x.shape[3]} (shape {tuple(x.shape)})"
            )

    def logdet(self, size: tuple[int, int]) -> Tensor:
        """log|det| of the map (it does not depend on the input): Σ log|ad − bc| over all blocks."""
        if tuple(size) != self.size:
            raise ValueError(
                f"ButterflyConv was built for {self.size[0]}×{self.size[1]} images, got size {tuple(size)}"
            )
        return self._logdet(1)[0]

    def _logdet(self, batch: int) -> Tensor:
        logdet = self._cache.get(self, "logdet", lambda: torch.log(torch.abs(_determinants(self.blocks))).sum())
        return logdet.expand(batch)

    @staticmethod
    def _level(x: Tensor, blocks: Tensor, level: int) -> Tensor:
        """One level: blocks (2, 2, D/2) applied to the pairs of each of the 2^level segments."""
        segments, half = 2**level, blocks.shape[-1] >> level
        v = x.reshape(x.shape[0], segments, 2, half)
        W = blocks.reshape(2, 2, segments, half)
        first, second = v[:, :, 0], v[:, :, 1]
        return torch.stack([W[0, 0] * first + W[0, 1] * second, W[1, 0] * first + W[1, 1] * second], 2).reshape(x.shape)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x)
        y = x
        for level in range(self.levels):
            y = self._level(y, self.blocks[level], level)
        return y, self._logdet(x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        self._check(y)
        inverse = self._cache.get(self, "inverse", lambda: _block_inverse(self.blocks))
        x = y
        for level in reversed(range(self.levels)):
            x = self._level(x, inverse[level], level)
        return x, -self._logdet(y.shape[0])

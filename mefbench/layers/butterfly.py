"""Butterfly layers: products of sparse levels that each mix pairs of entries with 2×2 blocks."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import Cost, FlowLayer, LayerInfo
from .checks import EvalCache, check_channels, check_input, check_int, check_size
from .conv1x1 import StandardConv1x1

__all__ = ["ButterflyConv", "butterfly_levels"]


def butterfly_levels(dim: int) -> int:
    """How many butterfly levels a vector of ``dim`` entries takes: the power of 2 in dim."""
    return (dim & -dim).bit_length() - 1


def _determinants(blocks: Tensor) -> Tensor:
    """ad − bc of each block [[a, b], [c, d]] of blocks (…, 2, 2, m)."""
    return blocks[..., 0, 0, :] * blocks[..., 1, 1, :] - blocks[..., 0, 1, :] * blocks[..., 1, 0, :]


def _block_inverse(blocks: Tensor, determinants: Tensor | None = None) -> Tensor:
    """[[a, b], [c, d]]⁻¹ = [[d, −b], [−c, a]] / (ad − bc) for blocks (…, 2, 2, m) (their
    determinants ad − bc, if already computed)."""
    a, b, c, d = blocks[..., 0, 0, :], blocks[..., 0, 1, :], blocks[..., 1, 0, :], blocks[..., 1, 1, :]
    adjugate = torch.stack([torch.stack([d, -b], -2), torch.stack([-c, a], -2)], -3)
    if determinants is None:
        determinants = _determinants(blocks)
    return adjugate / determinants[..., None, None, :]


class ButterflyConv(FlowLayer):
    """y = B_{L−1} ⋯ B₁ B₀ W x on the flattened sample, B_ℓ mixing pairs (i, i + D/2^{ℓ+1}) with 2×2 blocks; log|det| = Σ log|ad − bc| + n·log|det W|.

    Args:
        channels: C.
        size: (H, W), required: the levels act on the D = C·H·W entries of a sample, in (c, h, w)
            order.
        levels: L ≥ 1 (default 1, ButterflyFlow's CIFAR-10 configuration), at most the power of 2
            in D (log₂ D when D is one); None takes them all.
        init: the blocks' init: ``"identity"`` (the default, ButterflyFlow's CIFAR-10
            configuration) or ``"rotation"`` (each block a rotation by a uniform random angle).
        conv1x1: Glow's 1×1 conv W first (default True, as ButterflyFlow's flow step).

    Level ℓ cuts the flattened sample into 2^ℓ segments; in each, entry j of the first half and
    entry j of the second half go through their own 2×2 block [[a, b], [c, d]] (D/2 blocks, 2D
    parameters per level). In (c, h, w) order the first levels mix channels, the next rows, the
    last columns. Inverse: each level's blocks inverted in closed form (from the determinants
    the log-det uses), levels in reverse order, then W⁻¹. The blocks' inverses and log-dets are
    cached in eval. A block whose determinant reaches 0 makes the layer singular (as in the
    paper; no parametrisation prevents it).

    The 1×1 conv is what mixes every channel: the levels alone only pair entries whose indices
    differ by multiples of D/2^L, so with all L levels the entries fall into the odd part of D
    (D/2^L) classes that never mix, e.g. with C·H·W = 12·16·16 = 3·2^10 the 12 channels of a
    pixel in three classes of 4 (channel c of pixel p in class (c + p) mod 3). With the default
    one level, only channels c and c + C/2 of each pixel mix. ``conv1x1=False`` keeps these
    classes (tests/test_references.py measures them); ButterflyFlow never runs without the conv.

    Cost per sample: O(L·D) forward, log-det and inverse, plus O(C²·n) (and O(C³) for the log-det)
    with the 1×1 conv.
    """

    info = LayerInfo(
        family="spatial",
        reference="Meng, Zhou, Choi, Dao & Ermon 2022 (ButterflyFlow; code: alexzhou907/butterflyflow, CIFAR-10 config)",
        cost=Cost("O(L·D + C²·n), D = C·n", "O(L·D + C³)", "O(L·D + C³ + C²·n)"),
        inverse="closed form",
    )

    INITS = ("identity", "rotation")

    def __init__(
        self,
        channels: int,
        *,
        size: tuple[int, int] | None = None,
        levels: int | None = 1,
        init: str = "identity",
        conv1x1: bool = True,
    ) -> None:
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
        if init not in self.INITS:
            raise ValueError(f"ButterflyConv option init must be one of {self.INITS}, got {init!r}")
        if not isinstance(conv1x1, bool):
            raise ValueError(f"ButterflyConv option conv1x1 must be True or False, got {conv1x1!r}")
        self.levels = levels
        self.conv1x1 = StandardConv1x1(channels) if conv1x1 else None
        if init == "rotation":
            angle = 2 * math.pi * torch.rand(levels, dim // 2)
        else:
            angle = torch.zeros(levels, dim // 2)
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
        """log|det| of the map (it does not depend on the input): Σ log|ad − bc| over all blocks, plus the 1×1 conv's."""
        if tuple(size) != self.size:
            raise ValueError(
                f"ButterflyConv was built for {self.size[0]}×{self.size[1]} images, got size {tuple(size)}"
            )
        logdet = self._blocks_logdet()
        if self.conv1x1 is not None:
            logdet = logdet + self.conv1x1.logdet(size)
        return logdet

    def _blocks_logdet(self) -> Tensor:
        return self._cache.get(self, "logdet", lambda: torch.log(torch.abs(_determinants(self.blocks))).sum())

    def inverse_blocks(self) -> tuple[Tensor, Tensor]:
        """(the blocks' inverses, Σ log|ad − bc|): what the inverse uses, from one pass over the
        determinants; cached in eval."""

        def build() -> tuple[Tensor, Tensor]:
            det = _determinants(self.blocks)
            return _block_inverse(self.blocks, det), torch.log(torch.abs(det)).sum()

        return self._cache.get(self, "inverse", build)

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
        logdet = self._blocks_logdet()
        if self.conv1x1 is not None:
            x, ld = self.conv1x1(x)
            logdet = logdet + ld
        y = x
        for level in range(self.levels):
            y = self._level(y, self.blocks[level], level)
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        self._check(y)

        inverse, logdet = self.inverse_blocks()
        logdet = -logdet
        x = y
        for level in reversed(range(self.levels)):
            x = self._level(x, inverse[level], level)
        if self.conv1x1 is not None:
            x, ld = self.conv1x1.inverse(x)
            logdet = logdet + ld
        return x, logdet.expand(y.shape[0])

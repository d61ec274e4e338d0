"""Woodbury transformations: identity-plus-low-rank maps I + U V along the axes of a (C, H, W) sample.

Along an axis of size D with rank d (U: D×d, V: d×D), the Woodbury identity and the matrix
determinant lemma give the inverse and the log-det from one d×d matrix M = I_d + V U::

    (I_D + U V)⁻¹ = I_D − U M⁻¹ V,        det(I_D + U V) = det M.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from .base import Cost, FlowLayer, LayerInfo
from .checks import EvalCache, check_channels, check_input, check_int, check_size

__all__ = ["MEWoodburyConv", "WoodburyConv", "along", "woodbury_factors"]

DEFAULT_RANK = 16  # the paper's d
INIT_STD = 0.01  # U, V ~ N(0, 0.01²) as in the public code: the map starts close to the identity
# the default ranks min(16, size of the axis), for the costs' scaling with C and n (H = W = √n)
_DEFAULT_RANKS = {"d_c": "Min(16, C)", "d_s": "Min(16, n)", "d_h": "Min(16, sqrt(n))", "d_w": "Min(16, sqrt(n))"}


def along(M: Tensor, x: Tensor, dim: int) -> Tensor:
    """M (p×q) applied to axis ``dim`` of x (size q there, p after)."""
    return torch.movedim(torch.tensordot(M, x, dims=([1], [dim])), 0, dim)


def woodbury_factors(U: Tensor, V: Tensor) -> tuple[Tensor, Tensor]:
    """(M⁻¹V, log|det M|) for M = I_d + V U: (I + U V)⁻¹ = I − U (M⁻¹V), log|det(I + U V)| = log|det M|."""
    M = torch.eye(U.shape[1], dtype=U.dtype, device=U.device) + V @ U
    return torch.linalg.solve(M, V), torch.linalg.slogdet(M).logabsdet


class _Woodbury(FlowLayer):
    """(I + U_a V_a) applied along each axis a of ``AXES`` in turn; the log-det of axis a counts
    once per position of the other axes (numel / D_a times)."""

    # (axis name, rank option, what the axis is): the subclass views x so that axis i is dim i + 1
    AXES: ClassVar[tuple[tuple[str, str, str], ...]] = ()

    def __init__(self, channels: int, size: tuple[int, int] | None, ranks: dict[str, int | None]) -> None:
        super().__init__()
        name = type(self).__name__
        self.channels = check_channels(name, channels)
        self.size = check_size(name, size, required=True, why=": the spatial parts act on the pixels")
        self.ranks = {}
        for (axis, option, what), dim in zip(self.AXES, self.axis_sizes(), strict=True):
            rank = ranks[option]
            rank = min(DEFAULT_RANK, dim) if rank is None else check_int(name, option, rank)
            if rank > dim:
                raise ValueError(f"{name} option {option} must be at most {dim} ({what}), got {rank}")
            self.ranks[option] = rank
            self.register_parameter(f"U_{axis}", nn.Parameter(INIT_STD * torch.randn(dim, rank)))
            self.register_parameter(f"V_{axis}", nn.Parameter(INIT_STD * torch.randn(rank, dim)))
        self._cache = EvalCache()

    def axis_sizes(self) -> tuple[int, ...]:  # pragma: no cover - interface
        raise NotImplementedError

    def _view(self, x: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def _check(self, x: Tensor) -> None:
        name = type(self).__name__
        check_input(x, self.channels, name, self)
        if tuple(x.shape[2:]) != self.size:
            h, w = self.size
            raise ValueError(
                f"{name} was built for {h}×{w} images, got {x.shape[2]}×{x.shape[3]} (shape {tuple(x.shape)})"
            )

    def _factors(self) -> list[tuple[Tensor, Tensor, Tensor, Tensor]]:
        """Per axis: U, V, M⁻¹V and log|det M|."""

        def build():
            out = []
            for axis, _, _ in self.AXES:
                U, V = getattr(self, f"U_{axis}"), getattr(self, f"V_{axis}")
                out.append((U, V, *woodbury_factors(U, V)))
            return out

        return self._cache.get(self, "factors", build)

    def _logdet(self, factors, batch: int) -> Tensor:
        numel = self.channels * self.size[0] * self.size[1]
        total = sum(
            logabsdet * (numel // dim) for (_, _, _, logabsdet), dim in zip(factors, self.axis_sizes(), strict=True)
        )
        return total.expand(batch)

    def logdet(self, size: tuple[int, int]) -> Tensor:
        """log|det| of the map (it does not depend on the input): the d×d determinants only."""
        if tuple(size) != self.size:
            raise ValueError(
                f"{type(self).__name__} was built for {self.size[0]}×{self.size[1]} images, got size {tuple(size)}"
            )
        return self._logdet(self._factors(), 1)[0]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x)
        factors = self._factors()
        h = self._view(x)
        for i, (U, V, _, _) in enumerate(factors):
            h = h + along(U, along(V, h, i + 1), i + 1)
        return h.reshape(x.shape), self._logdet(factors, x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        self._check(y)
        factors = self._factors()
        h = self._view(y)
        for i in reversed(range(len(factors))):
            U, _, MinvV, _ = factors[i]
            h = h - along(U, along(MinvV, h, i + 1), i + 1)
        return h.reshape(y.shape), -self._logdet(factors, y.shape[0])


class WoodburyConv(_Woodbury):
    """y = (I_C + U_c V_c) X (I_n + U_s V_s)ᵀ, X the C×n sample; log|det| = n·log|det(I + V_c U_c)| + C·log|det(I + V_s U_s)|.

    Args:
        channels: C.
        size: (H, W), required: the spatial transform acts on the n = H·W flattened pixels.
        rank: d_c ≤ C, rank of the channel transform (default min(16, C)).
        spatial_rank: d_s ≤ n, rank of the spatial transform (default min(16, n)).

    The channel transform acts first. Inverse: (I + U V)⁻¹ = I − U (I_d + V U)⁻¹ V per part, in
    reverse order; log-det from the two d×d determinants (matrix determinant lemma). Init: every
    U, V entry ~ N(0, 0.01²). The d×d solves and determinants are cached in eval. Cost per sample:
    O((d_c + d_s)·C·n) forward and inverse, O(d_c³ + d_s³ + d²·(C + n)) for the factors.
    """

    info = LayerInfo(
        family="spatial",
        reference="Lu & Huang 2020 (Woodbury transformations for deep generative flows)",
        cost=Cost("O((d_c + d_s)·C·n)", "O(d_c³ + d_s³)", "O((d_c + d_s)·C·n)", symbols=_DEFAULT_RANKS),
        inverse="solve",
    )

    AXES = (("c", "rank", "the channels"), ("s", "spatial_rank", "the pixels H·W"))

    def __init__(
        self,
        channels: int,
        *,
        size: tuple[int, int] | None = None,
        rank: int | None = None,
        spatial_rank: int | None = None,
    ) -> None:
        super().__init__(channels, size, {"rank": rank, "spatial_rank": spatial_rank})

    def axis_sizes(self) -> tuple[int, ...]:
        return self.channels, self.size[0] * self.size[1]

    def _view(self, x: Tensor) -> Tensor:
        return x.reshape(x.shape[0], self.channels, self.size[0] * self.size[1])


class MEWoodburyConv(_Woodbury):
    """y = Woodbury along C, then H, then W of the C×H×W sample; log|det| = H·W·ld_c + C·W·ld_h + C·H·ld_w, ld_a = log|det(I + V_a U_a)|.

    Args:
        channels: C.
        size: (H, W), required.
        rank: d_c ≤ C (default min(16, C)).
        height_rank: d_h ≤ H (default min(16, H)).
        width_rank: d_w ≤ W (default min(16, W)).

    The memory-efficient form of :class:`WoodburyConv`: the n×n spatial map is replaced by one
    along the rows and one along the columns, O(d·(C + H + W)) parameters instead of O(d·(C + n)).
    Inverse: the three Woodbury inverses in reverse order. Init as WoodburyConv. Cost per sample:
    O((d_c + d_h + d_w)·C·n) forward and inverse.
    """

    info = LayerInfo(
        family="spatial",
        reference="Lu & Huang 2020 (Woodbury transformations for deep generative flows, ME-Woodbury)",
        cost=Cost(
            "O((d_c + d_h + d_w)·C·n)", "O(d_c³ + d_h³ + d_w³)", "O((d_c + d_h + d_w)·C·n)", symbols=_DEFAULT_RANKS
        ),
        inverse="solve",
    )

    AXES = (("c", "rank", "the channels"), ("h", "height_rank", "the height H"), ("w", "width_rank", "the width W"))

    def __init__(
        self,
        channels: int,
        *,
        size: tuple[int, int] | None = None,
        rank: int | None = None,
        height_rank: int | None = None,
        width_rank: int | None = None,
    ) -> None:
        super().__init__(channels, size, {"rank": rank, "height_rank": height_rank, "width_rank": width_rank})

    def axis_sizes(self) -> tuple[int, ...]:
        return self.channels, self.size[0], self.size[1]

    def _view(self, x: Tensor) -> Tensor:
        return x

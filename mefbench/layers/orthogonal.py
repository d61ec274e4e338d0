"""1×1 convolutions built from Householder reflections: an orthogonal Q alone, or Q times a
triangular R (the QR parametrisation). Both act on the channels at every pixel."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from .base import Cost, LayerInfo
from .checks import check_int
from .conv1x1 import Conv1x1

__all__ = ["HouseholderConv1x1", "QRConv1x1", "householder_product"]


def householder_product(V: Tensor) -> Tensor:
    """Q = H(v_1) H(v_2) ⋯ H(v_K), H(v) = I − 2 v vᵀ/‖v‖², for the K rows of V (K, C).

    Q is orthogonal for any nonzero rows. Cost O(K·C²): each reflection is a rank-one update.
    """
    Q = torch.eye(V.shape[1], dtype=V.dtype, device=V.device)
    for v in V:
        Q = Q - torch.outer(Q @ v, v) * (2 / (v @ v))
    return Q


class HouseholderConv1x1(Conv1x1):
    """y = Q x per pixel, Q = Π_{i≤K} (I − 2 vᵢvᵢᵀ/‖vᵢ‖²) orthogonal; log|det| = 0; inverse Qᵀ.

    Args:
        channels: C.
        reflections: K, the number of reflections (default C). det Q = (−1)^K; K = C reaches every
            orthogonal matrix of that determinant (Cartan–Dieudonné), fewer give a cheaper,
            restricted Q.

    Volume-preserving: a model built on it gets its bits/dim change from the other layers.
    Init: vᵢ ~ N(0, I). Cost: O(K·C²) to build Q (cached in eval), O(C²) per pixel to apply it.
    """

    info = LayerInfo(
        family="per-pixel",
        reference="Tomczak & Welling 2016 (Householder flow); Hoogeboom et al. 2019 (Emerging convolutions)",
        cost=Cost("O(K·C² + C²·n)", "O(1)", "O(K·C² + C²·n)", symbols={"K": "C"}),  # K = C by default
        inverse="closed form",
    )

    def __init__(self, channels: int, *, size: tuple[int, int] | None = None, reflections: int | None = None) -> None:
        super().__init__(channels, size=size)
        if reflections is None:
            reflections = channels
        self.reflections = check_int("HouseholderConv1x1", "reflections", reflections)
        self.v = nn.Parameter(torch.randn(self.reflections, channels))

    def weight(self) -> Tensor:
        return householder_product(self.v)

    def inverse_weight(self) -> Tensor:
        return householder_product(self.v).T

    def matrices(self) -> tuple[Tensor, Tensor]:
        Q = householder_product(self.v)
        return Q, Q.T

    def pixel_logdet(self) -> Tensor:
        return self.v.new_zeros(())


class QRConv1x1(Conv1x1):
    """y = Q R x per pixel, Q = Π_{i≤C} Householder(vᵢ), R = U + diag(s); log|det| = H·W·Σ log|sᵢ|.

    Args:
        channels: C.
        diagonal: R's diagonal: ``"free"`` (the default, as in Hoogeboom et al.: s learned
            directly; W becomes singular if some sᵢ crosses 0) or ``"exp"`` (s = e^{log s} > 0,
            never singular).

    U is strictly upper triangular (its C(C−1)/2 entries are the parameter ``U``). Init: s = 1,
    U = 0 and vᵢ ~ N(0, I), so W starts as a random orthogonal Q with log-det 0. The inverse is
    W⁻¹ = R⁻¹Qᵀ (one triangular solve against Qᵀ; cached in eval with W). Cost: O(C³) to build Q
    and R⁻¹Qᵀ, O(C²) per pixel to apply them.
    """

    info = LayerInfo(
        family="per-pixel",
        reference="Hoogeboom, van den Berg & Welling 2019 (Emerging convolutions, QR 1×1)",
        cost=Cost("O(C³ + C²·n)", "O(C)", "O(C³ + C²·n)"),
        inverse="solve",
    )
    variants: ClassVar[dict[str, dict]] = {"free": {"diagonal": "free"}, "exp": {"diagonal": "exp"}}

    DIAGONALS = ("free", "exp")

    def __init__(self, channels: int, *, size: tuple[int, int] | None = None, diagonal: str = "free") -> None:
        super().__init__(channels, size=size)
        if diagonal not in self.DIAGONALS:
            raise ValueError(f"QRConv1x1 option diagonal must be one of {self.DIAGONALS}, got {diagonal!r}")
        self.diagonal = diagonal
        self.v = nn.Parameter(torch.randn(channels, channels))
        self.U = nn.Parameter(torch.zeros(channels * (channels - 1) // 2))
        if diagonal == "free":
            self.s = nn.Parameter(torch.ones(channels))
        else:
            self.log_s = nn.Parameter(torch.zeros(channels))

    def scales(self) -> Tensor:
        """The diagonal s of R."""
        return self.s if self.diagonal == "free" else torch.exp(self.log_s)

    def factors(self) -> tuple[Tensor, Tensor]:
        """(Q, R) with W = Q R."""
        c = self.channels
        rows, cols = torch.triu_indices(c, c, offset=1, device=self.U.device)
        R = torch.diag(self.scales()).index_put((rows, cols), self.U)
        return householder_product(self.v), R

    def weight(self) -> Tensor:
        Q, R = self.factors()
        return Q @ R

    def inverse_weight(self) -> Tensor:
        Q, R = self.factors()
        return torch.linalg.solve_triangular(R, Q.T, upper=True)

    def matrices(self) -> tuple[Tensor, Tensor]:
        Q, R = self.factors()
        return Q @ R, torch.linalg.solve_triangular(R, Q.T, upper=True)

    def pixel_logdet(self) -> Tensor:
        if self.diagonal == "exp":
            return self.log_s.sum()
        return torch.log(torch.abs(self.s)).sum()

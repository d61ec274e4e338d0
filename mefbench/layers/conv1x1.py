"""Invertible 1×1 convolutions: y_ij = W x_ij at every pixel, with several parametrisations of W.

Every class is built as ``cls(channels, size=None, **options)`` (the size is not needed: the same
matrix acts at every pixel) and caches W and W⁻¹ in eval mode.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.stats
import torch
from torch import Tensor, nn

from ..linalg import expm
from .base import Cost, FlowLayer, LayerInfo
from .checks import EvalCache, check_input

__all__ = [
    "Conv1x1",
    "MatrixExpConv1x1",
    "PLUConv1x1",
    "StandardConv1x1",
    "random_orthogonal",
    "random_rotation",
]


def _seed(generator: torch.Generator | None) -> int:
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


def random_rotation(n: int, generator: torch.Generator | None = None) -> np.ndarray:
    """A random rotation (orthogonal, det +1, Haar) drawn with torch's RNG so that seeds reproduce."""
    seed = _seed(generator)
    if n == 1:
        return np.ones((1, 1))
    return scipy.stats.special_ortho_group.rvs(n, random_state=seed)


def random_orthogonal(n: int, generator: torch.Generator | None = None) -> np.ndarray:
    """A random orthogonal matrix (det ±1, Haar), drawn with torch's RNG so that seeds reproduce."""
    seed = _seed(generator)
    if n == 1:
        return np.ones((1, 1))
    return scipy.stats.ortho_group.rvs(n, random_state=seed)


def _as_param(a: np.ndarray) -> nn.Parameter:
    return nn.Parameter(torch.as_tensor(a, dtype=torch.get_default_dtype()))


def _apply(W: Tensor, x: Tensor) -> Tensor:
    return torch.einsum("ij,bjhw->bihw", W, x)


class Conv1x1(FlowLayer):
    """Shared bookkeeping: a per-pixel matrix, its inverse and log|det| per pixel.

    Subclasses define ``weight()``, ``inverse_weight()`` and ``pixel_logdet()``. Outside eval mode
    each call builds only the matrix it applies (the forward W, the inverse W⁻¹); in eval mode both
    are cached and rebuilt only when a parameter changes (its version counter moves).
    """

    def __init__(self, channels: int, *, size: tuple[int, int] | None = None) -> None:
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"{type(self).__name__} needs at least 1 channel, got {channels}")
        self.channels = channels
        self._cache = EvalCache()

    def weight(self) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def inverse_weight(self) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def pixel_logdet(self) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def matrices(self) -> tuple[Tensor, Tensor]:
        """(W, W⁻¹) together, for the eval cache; a subclass whose two share a factor overrides it."""
        return self.weight(), self.inverse_weight()

    def _matrix(self, inverse: bool) -> Tensor:
        """W (or W⁻¹): built alone on each call outside eval, both from the cache in eval."""
        if self.training or torch.is_grad_enabled():
            return self.inverse_weight() if inverse else self.weight()
        return self._cache.get(self, "matrices", self.matrices)[int(inverse)]

    def logdet(self, size: tuple[int, int]) -> Tensor:
        """log|det| of the map on an input of spatial size (H, W): H·W·log|det W| (no input needed)."""
        return self.pixel_logdet() * (size[0] * size[1])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_input(x, self.channels, type(self).__name__, self)
        W = self._matrix(inverse=False)
        logdet = self.pixel_logdet() * (x.shape[2] * x.shape[3])
        return _apply(W, x), logdet.expand(x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        check_input(y, self.channels, type(self).__name__, self)
        W_inv = self._matrix(inverse=True)
        logdet = -self.pixel_logdet() * (y.shape[2] * y.shape[3])
        return _apply(W_inv, y), logdet.expand(y.shape[0])


class StandardConv1x1(Conv1x1):
    """y = W x per pixel; log|det| = H·W·log|det W| (slogdet). Init: random orthogonal (Haar).

    W can become singular during training; the inverse then fails (the paper's "collapse").
    """

    info = LayerInfo(
        family="per-pixel",
        reference="Kingma & Dhariwal 2018 (Glow)",
        cost=Cost("O(C²·n)", "O(C³)", "O(C³ + C²·n)"),
        inverse="solve",
    )

    def __init__(self, channels: int, *, size: tuple[int, int] | None = None) -> None:
        super().__init__(channels, size=size)
        self.W = _as_param(random_orthogonal(channels))

    def weight(self) -> Tensor:
        return self.W

    def inverse_weight(self) -> Tensor:
        return torch.linalg.inv(self.W)

    def pixel_logdet(self) -> Tensor:
        return torch.linalg.slogdet(self.W).logabsdet


class PLUConv1x1(Conv1x1):
    """y = P L U x per pixel; log|det| = H·W·Σ log|u_ii|; inverse by two triangular solves.

    P is a fixed permutation, L unit lower triangular. Init: the LU factors of a random orthogonal
    matrix (Haar). Two forms of U's diagonal (option ``diagonal``):

    - ``"exp"`` (Glow, the default): U = strictly-upper + diag(sign·e^{log_s}), sign fixed; W can
      never become singular. 2C² + C parameters (L, U and log_s as parameters).
    - ``"free"`` (the official MEF code, the paper's Table 5): U's diagonal is learned directly, can
      cross 0, and W can then become singular ("collapse"). 2C² parameters (L and U as full C×C
      parameters, masked), as in the official code.
    """

    info = LayerInfo(
        family="per-pixel",
        reference="Kingma & Dhariwal 2018 (Glow); diagonal='free': Xiao & Liu 2020 (MEF code)",
        cost=Cost("O(C²·n)", "O(C)", "O(C³ + C²·n)"),
        inverse="solve",
    )

    DIAGONALS = ("exp", "free")
    variants = {d: {"diagonal": d} for d in DIAGONALS}  # what the zoo tables compare

    P: Tensor  # buffers
    lower_mask: Tensor
    sign: Tensor

    def __init__(self, channels: int, *, size: tuple[int, int] | None = None, diagonal: str = "exp") -> None:
        super().__init__(channels, size=size)
        if diagonal not in self.DIAGONALS:
            raise ValueError(f"PLUConv1x1 option diagonal must be one of {self.DIAGONALS}, got {diagonal!r}")
        self.diagonal = diagonal
        P, L, U = scipy.linalg.lu(random_orthogonal(channels))
        dtype = torch.get_default_dtype()
        self.register_buffer("P", torch.as_tensor(P, dtype=dtype))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.L = _as_param(L)
        if diagonal == "exp":
            diag = np.diag(U)
            self.register_buffer("sign", torch.as_tensor(np.sign(diag), dtype=dtype))
            self.U = _as_param(np.triu(U, 1))
            self.log_s = _as_param(np.log(np.abs(diag)))
        else:
            self.U = _as_param(np.triu(U))

    def _factors(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.channels, dtype=self.L.dtype, device=self.L.device)
        L = self.L * self.lower_mask + eye
        if self.diagonal == "exp":
            U = self.U * self.lower_mask.T + torch.diag(self.sign * torch.exp(self.log_s))
        else:
            U = self.U * (self.lower_mask.T + eye)
        return L, U

    def weight(self) -> Tensor:
        L, U = self._factors()
        return self.P @ L @ U

    def inverse_weight(self) -> Tensor:
        L, U = self._factors()
        eye = torch.eye(self.channels, dtype=L.dtype, device=L.device)
        L_inv = torch.linalg.solve_triangular(L, eye, upper=False, unitriangular=True)
        U_inv = torch.linalg.solve_triangular(U, eye, upper=True)
        return U_inv @ L_inv @ self.P.T

    def pixel_logdet(self) -> Tensor:
        if self.diagonal == "exp":
            return self.log_s.sum()
        return torch.diagonal(self.U).abs().log().sum()


class MatrixExpConv1x1(Conv1x1):
    """y = e^W x per pixel; log|det| = H·W·tr W; inverse e^{−W} (the paper's 1×1 conv).

    det e^W = e^{tr W} > 0, so the map can never become singular. Init: W = real(logm(Q)) for a
    random rotation Q (W skew-symmetric, e^W orthogonal, initial log-det 0). e^W and e^{−W} are
    cached in eval mode.
    """

    info = LayerInfo(
        family="per-pixel",
        reference="Xiao & Liu 2020 (MEF)",
        cost=Cost("O(C²·n + m·C³)", "O(C)", "O(C²·n + m·C³)"),
        inverse="series",
    )

    def __init__(self, channels: int, *, size: tuple[int, int] | None = None) -> None:
        super().__init__(channels, size=size)
        W = np.real(scipy.linalg.logm(random_rotation(channels)))
        W = (W - W.T) / 2  # exactly skew-symmetric: logm of a rotation is, up to rounding
        self.W = _as_param(W)

    def weight(self) -> Tensor:
        return expm(self.W)

    def inverse_weight(self) -> Tensor:
        return expm(-self.W)

    def pixel_logdet(self) -> Tensor:
        return torch.diagonal(self.W).sum()

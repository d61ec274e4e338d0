"""Invertible 1×1 convolutions: y_ij = W x_ij at every pixel, with three parametrisations of W."""

from __future__ import annotations

import numpy as np
import scipy.linalg
import scipy.stats
import torch
from torch import Tensor, nn

from ..linalg import expm
from .base import FlowLayer, check_input

__all__ = ["Conv1x1", "MatrixExpConv1x1", "PLUConv1x1", "StandardConv1x1", "random_rotation"]


def random_rotation(n: int, generator: torch.Generator | None = None) -> np.ndarray:
    """A random rotation (orthogonal, det +1) drawn with torch's RNG so that seeds reproduce."""
    seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
    if n == 1:
        return np.ones((1, 1))
    return scipy.stats.special_ortho_group.rvs(n, random_state=seed)


def _apply(W: Tensor, x: Tensor) -> Tensor:
    return torch.einsum("ij,bjhw->bihw", W, x)


class Conv1x1(FlowLayer):
    """Shared bookkeeping: a per-pixel matrix, its inverse and log|det| per pixel.

    Subclasses define ``weight()``, ``inverse_weight()`` and ``pixel_logdet()``. In eval mode both
    matrices are cached and rebuilt only when a parameter changes (its version counter moves).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"{type(self).__name__} needs at least 1 channel, got {channels}")
        self.channels = channels
        self._cache: tuple[tuple, Tensor, Tensor] | None = None

    def weight(self) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def inverse_weight(self) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def pixel_logdet(self) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def _matrices(self, need_inverse: bool) -> tuple[Tensor, Tensor | None]:
        if self.training or torch.is_grad_enabled():
            self._cache = None
            return self.weight(), (self.inverse_weight() if need_inverse else None)
        key = tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in self.parameters())
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.weight(), self.inverse_weight())
        return self._cache[1], self._cache[2]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_input(x, self.channels, type(self).__name__)
        W, _ = self._matrices(need_inverse=False)
        logdet = self.pixel_logdet() * (x.shape[2] * x.shape[3])
        return _apply(W, x), logdet.expand(x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        check_input(y, self.channels, type(self).__name__)
        _, W_inv = self._matrices(need_inverse=True)
        logdet = -self.pixel_logdet() * (y.shape[2] * y.shape[3])
        return _apply(W_inv, y), logdet.expand(y.shape[0])


class StandardConv1x1(Conv1x1):
    """Glow's 1×1 conv: y = W x per pixel; log|det| = H·W·log|det W| (slogdet). Init: random orthogonal.

    W can become singular during training; inverse then fails (the paper's "collapse").
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.W = nn.Parameter(torch.as_tensor(random_rotation(channels), dtype=torch.get_default_dtype()))

    def weight(self) -> Tensor:
        return self.W

    def inverse_weight(self) -> Tensor:
        return torch.linalg.inv(self.W)

    def pixel_logdet(self) -> Tensor:
        return torch.linalg.slogdet(self.W).logabsdet


class PLUConv1x1(Conv1x1):
    """Glow's LU 1×1 conv: W = P L (U + diag(sign·e^{log_s})); log|det| = H·W·Σ log_s.

    P (a permutation) and sign are fixed buffers; L is unit lower and U strictly upper triangular.
    Init: the LU factors of a random rotation. Inverse by two triangular solves.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        P, L, U = scipy.linalg.lu(random_rotation(channels))
        diag = np.diag(U)
        self.register_buffer("P", torch.as_tensor(P, dtype=torch.get_default_dtype()))
        self.register_buffer("sign", torch.as_tensor(np.sign(diag), dtype=torch.get_default_dtype()))
        self.register_buffer("lower_mask", torch.tril(torch.ones(channels, channels), -1))
        self.L = nn.Parameter(torch.as_tensor(L, dtype=torch.get_default_dtype()))
        self.U = nn.Parameter(torch.as_tensor(np.triu(U, 1), dtype=torch.get_default_dtype()))
        self.log_s = nn.Parameter(torch.as_tensor(np.log(np.abs(diag)), dtype=torch.get_default_dtype()))

    def _factors(self) -> tuple[Tensor, Tensor]:
        eye = torch.eye(self.channels, dtype=self.L.dtype, device=self.L.device)
        L = self.L * self.lower_mask + eye
        U = self.U * self.lower_mask.T + torch.diag(self.sign * torch.exp(self.log_s))
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
        return self.log_s.sum()


class MatrixExpConv1x1(Conv1x1):
    """The paper's 1×1 conv: y = e^W x per pixel; log|det| = H·W·tr W; inverse e^{−W}.

    det e^W = e^{tr W} > 0, so the map can never become singular. Init: W = real(logm(Q)) for a
    random rotation Q (W skew-symmetric, e^W orthogonal, initial log-det 0). e^W and e^{−W} are
    cached in eval mode.
    """

    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        W = np.real(scipy.linalg.logm(random_rotation(channels)))
        W = (W - W.T) / 2  # exactly skew-symmetric: logm of a rotation is, up to rounding
        self.W = nn.Parameter(torch.as_tensor(W, dtype=torch.get_default_dtype()))

    def weight(self) -> Tensor:
        return expm(self.W)

    def inverse_weight(self) -> Tensor:
        return expm(-self.W)

    def pixel_logdet(self) -> Tensor:
        return torch.diagonal(self.W).sum()

"""Periodic (Fourier) convolutions: a circular k×k convolution, diagonal in Fourier space."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .base import Cost, FlowLayer, LayerInfo
from .checks import EvalCache, check_channels, check_fits, check_input, check_kernel_size, check_size
from .conv1x1 import random_orthogonal

__all__ = ["PeriodicConv", "kernel_spectrum"]

INIT_STD = 0.01  # the taps off the centre start small


def kernel_spectrum(K: Tensor, h: int, w: int, onesided: bool = True) -> Tensor:
    """K̂(u, v) of the circular cross-correlation y_p = Σ_a K[a] x_{(p + a − r) mod (h, w)}, as a
    (h, w//2 + 1, C, C) complex tensor (all w columns if not ``onesided``): ŷ(u, v) = K̂(u, v) x̂(u, v).

    The correlation is the circular convolution with G[q] = K[r − q]: the taps are placed on an
    h×w grid at (r − a) mod h, (r − b) mod w (taps that wrap onto one place add up).
    """
    c_out, c_in, kh, kw = K.shape
    rows = (kh // 2 - torch.arange(kh, device=K.device)) % h
    cols = (kw // 2 - torch.arange(kw, device=K.device)) % w
    index = (rows[:, None] * w + cols[None, :]).reshape(-1)
    G = K.new_zeros(c_out, c_in, h * w).index_add(2, index, K.reshape(c_out, c_in, kh * kw))
    G = G.reshape(c_out, c_in, h, w)
    spectrum = torch.fft.rfft2(G) if onesided else torch.fft.fft2(G)
    return spectrum.permute(2, 3, 0, 1)


def _column_weights(w: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """How often each column of a one-sided spectrum stands in the full w columns: 1 for column 0
    (and w/2 for even w), 2 for the others (their conjugate twins are left out)."""
    weights = torch.full((w // 2 + 1,), 2.0, dtype=dtype, device=device)
    weights[0] = 1
    if w % 2 == 0:
        weights[-1] = 1
    return weights


class PeriodicConv(FlowLayer):
    """y = K ⊛ x circular (periodic) k×k conv, ŷ(u,v) = K̂(u,v) x̂(u,v); log|det| = Σ_{u,v} log|det K̂(u,v)|.

    Args:
        channels: C.
        size: (H, W), optional; checked against the kernel when given (and at every call).
        kernel_size: k, odd (default 3); the image must have min(H, W) > (k − 1)/2.

    The sum runs over the full H×W frequency grid: the one-sided rfft2 spectrum holds each
    conjugate pair once and counts it twice. Forward and inverse both run in Fourier space: rfft2,
    one C×C complex matrix per frequency (K̂ forward, K̂⁻¹ for the inverse), irfft2. K̂, K̂⁻¹ and
    the log-det are cached in eval per image size. Init: the centre tap a random orthogonal
    matrix (Haar), the other taps ~ N(0, 0.01²).

    Cost per sample: O(C²·n + C·n·log n) forward and inverse, n C×C determinants and inverses
    (O(C³·n)) per parameter change.
    """

    info = LayerInfo(
        family="spatial",
        reference="Hoogeboom, van den Berg & Welling 2019 (Emerging convolutions, periodic convolutions)",
        cost=Cost("O(C²·n + C·n·log n)", "O(C³·n)", "O(C³·n + C²·n + C·n·log n)"),
        inverse="solve",
    )

    def __init__(self, channels: int, *, size: tuple[int, int] | None = None, kernel_size: int = 3) -> None:
        super().__init__()
        self.channels = check_channels("PeriodicConv", channels)
        self.kernel_size = check_kernel_size("PeriodicConv", kernel_size)
        self.size = check_size("PeriodicConv", size)
        if self.size is not None:
            check_fits("PeriodicConv", self.size, kernel_size)
        k, r = kernel_size, kernel_size // 2
        weight = INIT_STD * torch.randn(channels, channels, k, k)
        weight[:, :, r, r] = torch.as_tensor(random_orthogonal(channels), dtype=weight.dtype)
        self.weight = nn.Parameter(weight)
        self._cache = EvalCache()

    def _check(self, x: Tensor) -> None:
        check_input(x, self.channels, "PeriodicConv", self)
        check_fits("PeriodicConv", tuple(x.shape[2:]), self.kernel_size)

    def spectrum(self, h: int, w: int) -> tuple[Tensor, Tensor]:
        """(K̂, log|det|) for h×w images: K̂ one-sided (h, w//2 + 1, C, C)."""

        def build():
            K_hat = kernel_spectrum(self.weight, h, w)
            weights = _column_weights(w, self.weight.dtype, self.weight.device)
            return K_hat, (torch.linalg.slogdet(K_hat).logabsdet * weights).sum()

        return self._cache.get(self, "spectrum", build, h, w)

    def logdet(self, size: tuple[int, int]) -> Tensor:
        """log|det| of the map on h×w images: Σ over the frequency grid of log|det K̂(u, v)|."""
        return self.spectrum(*size)[1]

    def inverse_spectrum(self, h: int, w: int) -> Tensor:
        return self._cache.get(self, "inverse", lambda: torch.linalg.inv(self.spectrum(h, w)[0]), h, w)

    @staticmethod
    def _per_frequency(M: Tensor, x: Tensor) -> Tensor:
        h, w = x.shape[2:]
        if x.shape[0] == 0:  # MKL's FFT refuses an empty batch
            return x.clone()
        x_hat = torch.fft.rfft2(x)
        return torch.fft.irfft2(torch.einsum("uvoc,bcuv->bouv", M, x_hat), s=(h, w))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x)
        K_hat, logdet = self.spectrum(*x.shape[2:])
        return self._per_frequency(K_hat, x), logdet.expand(x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        self._check(y)
        _, logdet = self.spectrum(*y.shape[2:])
        return self._per_frequency(self.inverse_spectrum(*y.shape[2:]), y), -logdet.expand(y.shape[0])

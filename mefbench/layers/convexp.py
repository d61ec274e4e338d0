"""The convolution exponential: e^M x for a k×k convolution M, by its power series."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..linalg import series_terms, taylor_tolerance
from .base import Cost, FlowLayer, LayerInfo
from .checks import EvalCache, check_channels, check_fits, check_input, check_kernel_size, check_size
from .periodic import kernel_spectrum

__all__ = ["ConvExp", "conv_exp", "conv_norm_bound"]

DEFAULT_MAX_NORM = 0.5
# the largest bound whose series still reaches float64's tolerance within linalg.MAX_TERMS terms
# (tests/test_mixing.py checks it)
NORM_LIMIT = 4.0


def conv_norm_bound(K: Tensor, h: int, w: int) -> Tensor:
    """An upper bound on ‖M‖₂ for M the zero-padded ("same") k×k convolution with kernel K on h×w images.

    M is the circular convolution on an (h + r)×(w + r) grid (r = k // 2) restricted to the
    image: embed x with zeros, convolve, crop; r extra rows and columns keep the wrap-around
    off the image. Cropping and embedding do not increase norms, and the DFT block-
    diagonalises the circular convolution, so ‖M‖₂ ≤ max over that grid's frequencies of
    σ_max(K̂(u, v)). Differentiable; O(C³·(h + r)(w + r)).
    """
    r = K.shape[-1] // 2
    spectrum = kernel_spectrum(K, h + r, w + r)
    return torch.linalg.matrix_norm(spectrum, ord=2).amax()


def conv_exp(x: Tensor, K: Tensor, terms: int) -> Tensor:
    """Σ_{i<terms} M^i x / i! for M the zero-padded k×k convolution with kernel K (terms − 1 convs)."""
    r = K.shape[-1] // 2
    out = term = x
    for i in range(1, terms):
        term = F.conv2d(term, K, padding=r) / i
        out = out + term
    return out


class ConvExp(FlowLayer):
    """y = e^M x = Σ_i M^i x / i!, M a k×k conv (same zero padding), ‖M‖₂ ≤ max_norm; log|det| = tr M = n·Σ_c K[c, c, centre].

    Args:
        channels: C.
        size: (H, W), optional; checked against the kernel when given (and at every call).
        kernel_size: k, odd (default 3); the image must have min(H, W) > (k − 1)/2.
        max_norm: β in (0, 4], the bound on ‖M‖₂ (default 0.5).

    Spectral normalisation: K = W · min(1, β / b(W)) for the learned kernel W, b(W) an upper
    bound on the operator norm of W's convolution on the image (:func:`conv_norm_bound`: the
    largest singular value of the kernel's spectrum on a grid padded by k//2, a guaranteed
    bound, not a power-iteration estimate). The series then has T = ``series_terms(β, tol)``
    terms (tol = 1e-8 in float32, 1e-16 in float64), so that its tail Σ_{i≥T} ‖M‖^i/i! ≤ tol:
    the truncation is the layer's only inexactness, at most tol·‖x‖₂ per sample. With rounding
    (unit round-off u) a round trip stays within e^{2β}·(T·u·‖x‖∞ + 2·tol·‖x‖₂) per entry
    (tests/test_mixing.py checks these at ‖M‖ = β). The log-det is that of e^M exactly
    (det e^M = e^{tr M}). Inverse: e^{−M} y,
    the same series with −K. Init: W ~ N(0, 1/(C·k²)²) (the public code's scale). K is cached in
    eval per image size.

    Cost per sample: T − 1 convs (O(T·k²·C²·n)) forward and inverse; O(C³·n) for the bound per
    parameter change.
    """

    info = LayerInfo(
        family="spatial",
        reference="Hoogeboom, Garcia Satorras, Tomczak & Welling 2020 (The convolution exponential)",
        cost=Cost("O(T·k²·C²·n)", "O(C)", "O(T·k²·C²·n)"),
        inverse="series",
    )

    def __init__(
        self,
        channels: int,
        *,
        size: tuple[int, int] | None = None,
        kernel_size: int = 3,
        max_norm: float = DEFAULT_MAX_NORM,
    ) -> None:
        super().__init__()
        self.channels = check_channels("ConvExp", channels)
        self.kernel_size = check_kernel_size("ConvExp", kernel_size)
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not 0 < max_norm <= NORM_LIMIT:
            raise ValueError(f"ConvExp option max_norm must be a number in (0, {NORM_LIMIT:g}], got {max_norm!r}")
        self.max_norm = float(max_norm)
        self.size = check_size("ConvExp", size)
        if self.size is not None:
            check_fits("ConvExp", self.size, kernel_size)
        k = kernel_size
        self.weight = nn.Parameter(torch.randn(channels, channels, k, k) / (channels * k * k))
        self._cache = EvalCache()

    def terms(self, dtype: torch.dtype) -> int:
        """T: the number of series terms that brings the tail under dtype's tolerance at ‖M‖ = max_norm."""
        return series_terms(self.max_norm, taylor_tolerance(dtype))

    def kernel(self, h: int, w: int) -> Tensor:
        """K, the spectrally normalised kernel for h×w images: ‖M‖₂ ≤ max_norm."""

        def build():
            bound = conv_norm_bound(self.weight, h, w)
            # = min(1, β / bound), with no 0/0 for a zero kernel
            return self.weight * (self.max_norm / torch.clamp(bound, min=self.max_norm))

        return self._cache.get(self, "kernel", build, h, w)

    def _check(self, x: Tensor) -> None:
        check_input(x, self.channels, "ConvExp", self)
        check_fits("ConvExp", tuple(x.shape[2:]), self.kernel_size)

    def logdet(self, size: tuple[int, int]) -> Tensor:
        """log|det| of the map on h×w images: tr M = n·Σ_c K[c, c, centre] (exact)."""
        r = self.kernel_size // 2
        return size[0] * size[1] * torch.diagonal(self.kernel(*size)[:, :, r, r]).sum()

    def _map(self, x: Tensor, sign: float) -> tuple[Tensor, Tensor]:
        self._check(x)
        K = self.kernel(*x.shape[2:])
        logdet = sign * self.logdet((x.shape[2], x.shape[3]))
        return conv_exp(x, sign * K, self.terms(x.dtype)), logdet.expand(x.shape[0])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self._map(x, 1.0)

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        return self._map(y, -1.0)

"""Emerging convolutions: two autoregressive convolutions with square-quadrant kernels, composed
into exactly a k×k convolution, with an exact log-det and an exact, batched inverse."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Cost, FlowLayer, LayerInfo, flip
from .checks import EvalCache, check_channels, check_fits, check_input, check_int, check_kernel_size, check_size
from .conv1x1 import StandardConv1x1

__all__ = ["DIAGONALS", "EmergingConv", "quadrant_mask", "quadrant_wavefronts", "solve_quadrant_conv"]

INIT_STD = 0.02  # the reference's init: every tap ~ N(0, 0.02²), plus the identity at the centre
DIAGONALS = ("free", "exp")


def quadrant_mask(channels: int, kernel_size: int, diagonal: bool = True) -> Tensor:
    """The (C, C, q, q) mask of the first conv's quadrant kernel, q = (k + 1)/2: tap [a, b] reads
    the pixel (a, b) rows and columns below and right of the output's (a, b ≥ 0, the centre at
    [0, 0]). Every tap off the centre is free; at the centre output channel c sees the inputs
    ≤ c (lower triangular), its diagonal included if ``diagonal``.

    The second conv's mask is this one flipped in all four dimensions (its taps above and left,
    its centre upper triangular at [q − 1, q − 1]).
    """
    q = kernel_size // 2 + 1
    mask = torch.ones(channels, channels, q, q)
    mask[:, :, 0, 0] = torch.tril(torch.ones(channels, channels), 0 if diagonal else -1)
    return mask


def quadrant_wavefronts(h: int, w: int, r: int, dilation: int, device: torch.device) -> list[tuple[Tensor, Tensor]]:
    """The dependency of an upper-left quadrant kernel (taps at rows and columns (a − r)·d,
    (b − r)·d, a, b ∈ [0, r]) in wavefronts: pixel (i, j) is solved at step ⌊i/d⌋ + ⌊j/d⌋ and
    needs only pixels of earlier steps (every tap off the centre moves at least one step back).
    Per step: the flat indices of its pixels and of their (r + 1)² − 1 neighbours, in the order of
    :func:`_off_centre_taps` (index h·w, a zero row, where off the image)."""
    q = r + 1
    offsets = [((a - r) * dilation, (b - r) * dilation) for a in range(q) for b in range(q) if (a, b) != (r, r)]
    steps: dict[int, tuple[list[int], list[list[int]]]] = {}
    for i in range(h):
        for j in range(w):
            pixels, neighbours = steps.setdefault(i // dilation + j // dilation, ([], []))
            pixels.append(i * w + j)
            neighbours.append(
                [(i + di) * w + j + dj if 0 <= i + di < h and 0 <= j + dj < w else h * w for di, dj in offsets]
            )
    out = []
    for t in sorted(steps):
        pixels, neighbours = steps[t]
        nb = torch.tensor(neighbours, dtype=torch.long, device=device).reshape(len(pixels), len(offsets))
        out.append((torch.tensor(pixels, dtype=torch.long, device=device), nb))
    return out


def _off_centre_taps(K: Tensor) -> Tensor:
    """The taps of an upper-left quadrant kernel K (C, C, q, q) but its centre [q − 1, q − 1], in
    the order of :func:`quadrant_wavefronts`: (q² − 1, C, C)."""
    q = K.shape[-1]
    taps = K.permute(2, 3, 0, 1).reshape(q * q, K.shape[0], K.shape[1])
    return taps[:-1]  # the centre is the last tap in row-major order


def solve_quadrant_conv(y: Tensor, K: Tensor, dilation: int, schedule: list[tuple[Tensor, Tensor]]) -> Tensor:
    """x with conv2d(pad(x), K, dilation=d) = y for an upper-left quadrant kernel K (C, C, q, q)
    (x padded by (q − 1)·d rows above and columns left) whose centre K[:, :, q − 1, q − 1] is an
    invertible upper-triangular matrix: back-substitution by wavefronts (``schedule`` from
    :func:`quadrant_wavefronts`).

    Each step solves all its pixels at once: gather their neighbours, subtract the taps, one
    triangular solve with the centre. ⌊(H − 1)/d⌋ + ⌊(W − 1)/d⌋ + 1 steps, O(q²·C²·n) flops per
    sample in all, batched; differentiable by autograd.
    """
    b, c, h, w = y.shape
    centre = K[:, :, -1, -1]
    taps = _off_centre_taps(K)
    y_flat = y.permute(0, 2, 3, 1).reshape(b, h * w, c)
    x_flat = y.new_zeros(b, h * w + 1, c)  # the last row stays 0: the neighbour off the image
    for pixels, neighbours in schedule:
        rhs = y_flat[:, pixels]
        if taps.shape[0]:
            rhs = rhs - torch.einsum("bspc,pdc->bsd", x_flat[:, neighbours], taps)
        # x Uᵀ = rhs row by row: the centre's channel dependency at each pixel
        x_flat.index_copy_(1, pixels, torch.linalg.solve_triangular(centre.T, rhs, upper=False, left=False))
    return x_flat[:, : h * w].reshape(b, h, w, c).permute(0, 3, 1, 2)


class EmergingConv(FlowLayer):
    """y = K₂ ⋆ (K₁ ⋆ W x) + b, K₁ and K₂ autoregressive square-quadrant convs; log|det| = n·Σ_c (log|d₁,c| + log|d₂,c|) + n·log|det W|.

    Args:
        channels: C.
        size: (H, W), optional; checked against the kernel when given (and at every call).
        kernel_size: k, odd (default 3); the image must have min(H, W) > (k − 1)/2·dilation.
        dilation: d ≥ 1 (default 1): the taps are d pixels apart.
        diagonal: the centres' diagonals d₁, d₂: ``"free"`` (the default, as the reference: learned
            directly, log|d| in the log-det; the map becomes singular if one crosses 0) or
            ``"exp"`` (d = e^{log d} > 0, never singular).
        bias: b, a learned per-channel bias after the two convs (default True, as the reference).
        conv1x1: Glow's 1×1 conv W x first (default True: the reference's flow step puts one
            before the emerging conv).

    K₁ (the first conv) reads the (k + 1)/2 × (k + 1)/2 quadrant at and below-right of each
    pixel, zero padded; at the centre, output channel c sees the inputs ≤ c (lower triangular,
    diagonal d₁). K₂ reads the quadrant at and above-left, its centre upper triangular (diagonal
    d₂). Each is triangular in some order of pixels × channels, so its log-det is n·Σ log|d|, and
    their composition is exactly a k×k convolution (the receptive field measured from the Jacobian
    is k×k; tests/test_references.py). As the reference (Hoogeboom et al.'s emerging code), the
    forward convolves only the quadrants: two convs of (k + 1)/2 × (k + 1)/2 taps.

    Init (the reference's): every tap ~ N(0, 0.02²) plus the identity at the centre (with
    ``diagonal="exp"``: log d = 0), b = 0, W a random orthogonal matrix.

    Inverse: exact back-substitution, K₂ then K₁ (:func:`solve_quadrant_conv`), in wavefronts over
    the pixels: ⌊(H − 1)/d⌋ + ⌊(W − 1)/d⌋ + 1 batched steps per conv (32 at 16×16), O(k²C²n)
    flops per sample as the forward, in torch on the layer's device, differentiable, no host
    round trip (the reference solves pixel by pixel in Cython on the host). Kernels are cached
    in eval.

    Cost per sample: O(k²·C²·n) forward and inverse, O(C) log-det (O(C³) with the 1×1 conv).
    """

    info = LayerInfo(
        family="spatial",
        reference="Hoogeboom, van den Berg & Welling 2019 (Emerging convolutions; code: ehoogeboom/emerging)",
        cost=Cost(
            "O(k²·C²·n)",
            "O(C³) (the 1×1 conv's slogdet; O(C) without)",
            "O(k²·C²·n + C³) in H + W − 1 sequential steps",
        ),
        inverse="sequential",
    )

    mask1: Tensor  # buffers
    mask2: Tensor

    def __init__(
        self,
        channels: int,
        *,
        size: tuple[int, int] | None = None,
        kernel_size: int = 3,
        dilation: int = 1,
        diagonal: str = "free",
        bias: bool = True,
        conv1x1: bool = True,
    ) -> None:
        super().__init__()
        self.channels = check_channels("EmergingConv", channels)
        self.kernel_size = check_kernel_size("EmergingConv", kernel_size)
        self.dilation = check_int("EmergingConv", "dilation", dilation)
        if diagonal not in DIAGONALS:
            raise ValueError(f"EmergingConv option diagonal must be one of {DIAGONALS}, got {diagonal!r}")
        for option, value in (("bias", bias), ("conv1x1", conv1x1)):
            if not isinstance(value, bool):
                raise ValueError(f"EmergingConv option {option} must be True or False, got {value!r}")
        self.diagonal = diagonal
        self.size = check_size("EmergingConv", size)
        if self.size is not None:
            self._check_fits(self.size)
        self.conv1x1 = StandardConv1x1(channels) if conv1x1 else None
        k, q = kernel_size, kernel_size // 2 + 1
        mask = quadrant_mask(channels, k, diagonal=diagonal == "free")
        self.register_buffer("mask1", mask, persistent=False)
        self.register_buffer("mask2", mask.flip(0, 1, 2, 3), persistent=False)
        weights = []
        for _ in range(2):
            weight = INIT_STD * torch.randn(channels, channels, q, q)
            if diagonal == "free":
                weight[:, :, 0, 0] += torch.eye(channels)
            weights.append(weight)
        self.weight1 = nn.Parameter(weights[0] * self.mask1)
        self.weight2 = nn.Parameter(weights[1].flip(0, 1, 2, 3) * self.mask2)
        if diagonal == "exp":
            self.log_diag1 = nn.Parameter(torch.zeros(channels))
            self.log_diag2 = nn.Parameter(torch.zeros(channels))
        self.bias = nn.Parameter(torch.zeros(channels)) if bias else None
        self._cache = EvalCache()
        self._schedules: dict[tuple, list[tuple[Tensor, Tensor]]] = {}

    def _check_fits(self, size: tuple[int, int]) -> None:
        if self.dilation == 1:
            check_fits("EmergingConv", size, self.kernel_size)
        elif (self.kernel_size // 2) * self.dilation >= min(size):
            h, w = size
            raise ValueError(
                f"EmergingConv: image {h}×{w} is too small for kernel_size {self.kernel_size} with dilation "
                f"{self.dilation}: its outermost taps are {(self.kernel_size // 2) * self.dilation} pixels from the "
                "centre, at most min(H, W) − 1 allowed"
            )

    def kernels(self) -> tuple[Tensor, Tensor]:
        """(K₁, K₂): the masked quadrant kernels (C, C, q, q); K₁'s centre is tap [0, 0], K₂'s [q − 1, q − 1]."""

        def build() -> tuple[Tensor, Tensor]:
            K1, K2 = self.weight1 * self.mask1, self.weight2 * self.mask2
            if self.diagonal == "exp":  # the diagonals at the centres: [0, 0] and [q − 1, q − 1]
                p = self.kernel_size // 2
                K1 = K1 + F.pad(torch.diag(torch.exp(self.log_diag1))[:, :, None, None], (0, p, 0, p))
                K2 = K2 + F.pad(torch.diag(torch.exp(self.log_diag2))[:, :, None, None], (p, 0, p, 0))
            return K1, K2

        return self._cache.get(self, "kernels", build)

    def _check(self, x: Tensor) -> None:
        check_input(x, self.channels, "EmergingConv", self)
        self._check_fits((x.shape[2], x.shape[3]))

    def _log_diagonals(self) -> Tensor:
        """Σ_c (log|d₁,c| + log|d₂,c|)."""
        if self.diagonal == "exp":
            return self.log_diag1.sum() + self.log_diag2.sum()
        q = self.kernel_size // 2
        d1 = torch.diagonal(self.weight1[:, :, 0, 0])
        d2 = torch.diagonal(self.weight2[:, :, q, q])
        return torch.log(torch.abs(d1)).sum() + torch.log(torch.abs(d2)).sum()

    def logdet(self, size: tuple[int, int]) -> Tensor:
        """log|det| of the map on h×w images: n·Σ_c (log|d₁,c| + log|d₂,c|) (+ the 1×1 conv's)."""
        logdet = size[0] * size[1] * self._log_diagonals()
        if self.conv1x1 is not None:
            logdet = logdet + self.conv1x1.logdet(size)
        return logdet

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x)
        logdet = x.shape[2] * x.shape[3] * self._log_diagonals()
        if self.conv1x1 is not None:
            x, ld = self.conv1x1(x)
            logdet = logdet + ld
        K1, K2 = self.kernels()
        pad, d = (self.kernel_size // 2) * self.dilation, self.dilation
        h = F.conv2d(F.pad(x, (0, pad, 0, pad)), K1, dilation=d)
        y = F.conv2d(F.pad(h, (pad, 0, pad, 0)), K2, self.bias, dilation=d)
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        self._check(y)
        K1, K2 = self.kernels()
        key = (y.shape[2], y.shape[3], y.device)
        if key not in self._schedules:
            r = self.kernel_size // 2
            self._schedules[key] = quadrant_wavefronts(y.shape[2], y.shape[3], r, self.dilation, y.device)
        schedule = self._schedules[key]
        if self.bias is not None:
            y = y - self.bias[:, None, None]
        h = solve_quadrant_conv(y, K2, self.dilation, schedule)
        # K₁ flipped in rows, columns and both channel axes is an upper-left quadrant kernel with an
        # upper-triangular centre, acting on the flipped image
        x = flip(solve_quadrant_conv(flip(h), K1.flip(0, 1, 2, 3), self.dilation, schedule))
        logdet = -y.shape[2] * y.shape[3] * self._log_diagonals()
        if self.conv1x1 is not None:
            x, ld = self.conv1x1.inverse(x)
            logdet = logdet + ld
        return x, logdet.expand(y.shape[0])

"""The convolution exponential: e^M x for a k×k convolution M, by its power series."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..linalg import series_terms, taylor_tolerance
from .base import Cost, FlowLayer, LayerInfo
from .checks import EvalCache, check_channels, check_fits, check_input, check_kernel_size, check_size
from .conv1x1 import Conv1x1, StandardConv1x1
from .orthogonal import HouseholderConv1x1
from .periodic import kernel_spectrum

__all__ = ["NORMALISERS", "ConvExp", "conv_exp", "conv_norm_bound", "power_step", "reference_conv1x1"]

DEFAULT_MAX_NORM = 0.9  # the reference's coefficient (its experiment scripts; its command line defaults to 0.95)
# the largest bound whose series still reaches float64's tolerance within linalg.MAX_TERMS terms
# (tests/test_mixing.py checks it)
NORM_LIMIT = 4.0
NORMALISERS = ("bound", "power")
# the power normaliser's series covers operator norms up to this factor times max_norm
POWER_MARGIN = 2.0
# the reference's 1×1 conv: a full matrix up to this many channels, a product of as many
# Householder reflections above
REFERENCE_CONV1X1_MAX = 64


def _spectrum_at(K: Tensor, h: int, w: int, u: int, v: int) -> Tensor:
    """K̂(u, v) of :func:`~mefbench.layers.periodic.kernel_spectrum` on an h×w grid at one
    frequency, straight from the taps: Σ_{a,b} K[:, :, a, b]·e^{−2πi(u(r−a)/h + v(r−b)/w)}. O(k²·C²)."""
    kh, kw = K.shape[-2:]
    rows = (kh // 2 - torch.arange(kh, device=K.device, dtype=K.dtype)) * (u / h)
    cols = (kw // 2 - torch.arange(kw, device=K.device, dtype=K.dtype)) * (v / w)
    phase = torch.polar(torch.ones(kh, kw, dtype=K.dtype, device=K.device), -2 * math.pi * (rows[:, None] + cols))
    return torch.einsum("ocab,ab->oc", K.to(phase.dtype), phase)


def conv_norm_bound(K: Tensor, h: int, w: int) -> Tensor:
    """An upper bound on ‖M‖₂ for M the zero-padded ("same") k×k convolution with kernel K on h×w images.

    M is the circular convolution on an (h + r)×(w + r) grid (r = k // 2) restricted to the
    image: embed x with zeros, convolve, crop; r extra rows and columns keep the wrap-around
    off the image. Cropping and embedding do not increase norms, and the DFT block-
    diagonalises the circular convolution, so ‖M‖₂ ≤ max over that grid's frequencies of
    σ_max(K̂(u, v)). O(C³·(h + r)(w + r)).

    The search runs without autograd (singular values only, no singular vectors: their backward
    would cost ten times the search); the result carries the gradient of σ_max at the maximising
    frequency f, as ``Re(u₁ᴴ K̂(f) v₁)`` with K̂(f) rebuilt from the taps and u₁, v₁ the top
    singular vectors of that one matrix: the same value, and the gradient that autograd through
    the SVD of K̂(f) gives.
    """
    r = K.shape[-1] // 2
    gh, gw = h + r, w + r
    with torch.no_grad():
        spectrum = kernel_spectrum(K.detach(), gh, gw)
        if not bool(torch.isfinite(spectrum).all()):  # a diverged kernel: a NaN bound, not an SVD error
            return K.sum() * math.nan
        top = torch.linalg.svdvals(spectrum)[..., 0]
        index = int(torch.argmax(top))
    if not (K.requires_grad and torch.is_grad_enabled()):
        return top.reshape(-1)[index]
    u, v = divmod(index, top.shape[1])
    with torch.no_grad():
        U, _, Vh = torch.linalg.svd(spectrum[u, v])
    K_hat = _spectrum_at(K, gh, gw, u, v)
    return torch.real(U[:, 0].conj() @ K_hat @ Vh[0].conj())


def power_step(K: Tensor, u: Tensor, v: Tensor) -> None:
    """One power-iteration step for the top singular vectors of the "same" conv M with kernel K,
    in place and without autograd: v ← Mᵀu/‖Mᵀu‖, u ← Mv/‖Mv‖ (u, v of the image's shape (C, H, W))."""
    r = K.shape[-1] // 2
    with torch.no_grad():
        v.copy_(F.normalize(F.conv_transpose2d(u[None], K, padding=r).reshape(-1), dim=0, eps=1e-12).reshape(v.shape))
        u.copy_(F.normalize(F.conv2d(v[None], K, padding=r).reshape(-1), dim=0, eps=1e-12).reshape(u.shape))


def conv_exp(x: Tensor, K: Tensor, terms: int) -> Tensor:
    """Σ_{i<terms} M^i x / i! for M the zero-padded k×k convolution with kernel K (terms − 1 convs,
    the 1/i folded into the kernel)."""
    r = K.shape[-1] // 2
    out = term = x
    for i in range(1, terms):
        term = F.conv2d(term, K / i, padding=r)
        out = out + term
    return out


def reference_conv1x1(channels: int) -> Conv1x1:
    """The reference module's 1×1 conv: a full matrix (Glow's, slogdet) up to 64 channels, a
    product of 64 Householder reflections above."""
    if channels <= REFERENCE_CONV1X1_MAX:
        return StandardConv1x1(channels)
    return HouseholderConv1x1(channels, reflections=REFERENCE_CONV1X1_MAX)


class ConvExp(FlowLayer):
    """y = e^M (W x + b₁) + b₂ = Σ_i M^i (W x + b₁)/i!, M a k×k conv (same zero padding), ‖M‖₂ ≤ max_norm; log|det| = tr M + n·log|det W| = n·Σ_c K[c, c, centre] + n·log|det W|.

    Args:
        channels: C.
        size: (H, W), optional; checked against the kernel when given (and at every call);
            required by ``normaliser="power"`` and ``bias=True``, whose buffers and parameters have
            the image's shape.
        kernel_size: k, odd (default 3); the image must have min(H, W) > (k − 1)/2.
        max_norm: β in (0, 4], the bound on ‖M‖₂ (default 0.9, the reference's).
        normaliser: how ‖M‖₂ is kept below β: ``"bound"`` (the default: a guaranteed bound) or
            ``"power"`` (the reference's: a power-iteration estimate, not a bound; see below).
        conv1x1: a 1×1 conv W before the exponential (default True, as the reference module: a
            full matrix up to 64 channels, 64 Householder reflections above).
        bias: b₁ and b₂, learned (C, H, W) biases before and after (default False: the reference
            module has them, its own comments call them "probably not useful"; they add 2·C·H·W
            parameters, and in a flow step the ActNorm before and the coupling's shift after do
            their work).

    Spectral normalisation: K = W_M · min(1, β / b(W_M)) for the learned kernel W_M.

    - ``"bound"``: b(W_M) an upper bound on the operator norm of W_M's convolution on the image
      (:func:`conv_norm_bound`: the largest singular value of the kernel's spectrum on a grid
      padded by k//2), computed once per call (and once per parameter change in eval). Then
      ‖M‖₂ ≤ n = min(b, β) is guaranteed, and the series has T = ``series_terms(n, tol)`` terms
      (tol = 1e-8 in float32, 1e-16 in float64), so that its tail Σ_{i≥T} ‖M‖^i/i! ≤ tol: the
      truncation is the layer's only inexactness, at most tol·‖x‖₂ per sample. T follows the
      kernel: 6 or 7 terms in float32 at the init (n ≈ 0.1–0.2), 11 at the bound. With rounding
      (unit round-off u) a round trip stays within e^{2β}·(T·u·‖x‖∞ + 2·tol·‖x‖₂) per entry
      (tests/test_mixing.py checks these at ‖M‖ = β).
    - ``"power"``: b(W_M) = σ̂ = uᵀ M v, the reference's estimate from one power-iteration step
      per training forward (u, v persistent buffers of the image's shape; no step in eval or in
      the inverse, so a forward and its inverse use the same K). σ̂ ≤ ‖M‖₂ always: it is an
      estimate from below, never a bound, and ‖M‖₂ can exceed β until u has converged. The
      series therefore takes T = ``series_terms(2·min(σ̂, β), tol)`` terms (at most 15 in float32;
      ``series_terms(2β, tol)`` until the first step, while u and v are random): since K's norm
      is ‖M_W‖·β/max(σ̂, β), its tail stays below tol while ‖M_W‖ ≤ 2σ̂, i.e. while the estimate
      is at least half the true norm; nothing is guaranteed beyond. :meth:`norm_bound` gives the
      guaranteed bound of the current kernel to check it. The reference sums a fixed 6 powers in
      training and 13 in eval, whatever the norm (a tail up to 0.9⁷/7! ≈ 1e-4 in training).

    Speed: the bound's singular values (one C×C SVD per frequency of an (H + r)×(W/2 + 1) grid)
    are what the guarantee costs: with it the layer runs at 0.3–0.5× the reference's speed in
    forward and inverse and 0.65–0.75× in forward+backward (batch 16, C ∈ {12, 48}, 16×16 and
    32×32, ``python -m benchmarks.reference_speed``); with ``normaliser="power"`` it runs at
    0.8–1.1× in every direction (measured at the same shapes; its T is 7–8 after the first step
    at the init, where the reference's is 7).

    The log-det is that of e^M exactly (det e^M = e^{tr M}) plus the 1×1 conv's. Inverse:
    e^{−M} (y − b₂), the same series with −K, then W⁻¹ and − b₁. Init: W_M ~ N(0, 1/(C·k²)²)
    (the reference's scale), W a random orthogonal matrix, b = 0. K is cached in eval per image
    size.

    Cost per sample: T − 1 convs (O(T·k²·C²·n)) forward and inverse, plus O(C³·n) per call for
    the bound (singular values only) or three single-sample convs for the power step, and one
    read of the norm back to the host (T is chosen from it).
    """

    info = LayerInfo(
        family="spatial",
        reference=(
            "Hoogeboom, Garcia Satorras, Tomczak & Welling 2020 (The convolution exponential; "
            "code: ehoogeboom/convolution_exponential_and_sylvester)"
        ),
        cost=Cost("O(T·k²·C²·n + C³·n)", "O(C³·n) (the bound)", "O(T·k²·C²·n + C³·n)"),
        inverse="series",
    )
    conv1x1: Conv1x1 | None
    pre_bias: nn.Parameter | None
    post_bias: nn.Parameter | None
    power_u: Tensor  # buffers of the power normaliser
    power_v: Tensor
    power_steps: Tensor

    def __init__(
        self,
        channels: int,
        *,
        size: tuple[int, int] | None = None,
        kernel_size: int = 3,
        max_norm: float = DEFAULT_MAX_NORM,
        normaliser: str = "bound",
        conv1x1: bool = True,
        bias: bool = False,
    ) -> None:
        super().__init__()
        self.channels = check_channels("ConvExp", channels)
        self.kernel_size = check_kernel_size("ConvExp", kernel_size)
        if normaliser not in NORMALISERS:
            raise ValueError(f"ConvExp option normaliser must be one of {NORMALISERS}, got {normaliser!r}")
        limit = NORM_LIMIT / POWER_MARGIN if normaliser == "power" else NORM_LIMIT
        if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not 0 < max_norm <= limit:
            why = f" (normaliser 'power' sums the terms for {POWER_MARGIN:g}·max_norm)" if normaliser == "power" else ""
            raise ValueError(f"ConvExp option max_norm must be a number in (0, {limit:g}]{why}, got {max_norm!r}")
        for option, value in (("conv1x1", conv1x1), ("bias", bias)):
            if not isinstance(value, bool):
                raise ValueError(f"ConvExp option {option} must be True or False, got {value!r}")
        self.max_norm = float(max_norm)
        self.normaliser = normaliser
        needs = [f"normaliser={normaliser!r}"] * (normaliser == "power") + ["bias=True"] * bias
        self.size = check_size(
            "ConvExp", size, required=bool(needs), why=f" with {' and '.join(needs)}: they have the image's shape"
        )
        if self.size is not None:
            check_fits("ConvExp", self.size, kernel_size)
        k = kernel_size
        self.conv1x1 = reference_conv1x1(channels) if conv1x1 else None
        self.weight = nn.Parameter(torch.randn(channels, channels, k, k) / (channels * k * k))
        shape = (channels, *self.size) if self.size is not None else (channels,)  # the size is there where used
        if bias:
            self.pre_bias = nn.Parameter(torch.zeros(shape))
            self.post_bias = nn.Parameter(torch.zeros(shape))
        else:
            self.pre_bias = self.post_bias = None
        if normaliser == "power":
            n = math.prod(shape)
            self.register_buffer("power_u", F.normalize(torch.randn(n), dim=0).reshape(shape))
            self.register_buffer("power_v", F.normalize(torch.randn(n), dim=0).reshape(shape))
            self.register_buffer("power_steps", torch.zeros((), dtype=torch.long))
        self._cache = EvalCache()

    def terms(self, dtype: torch.dtype, norm: float | None = None) -> int:
        """T: the number of series terms that brings the tail under dtype's tolerance at ‖M‖ = norm
        (default max_norm, the most a call uses; POWER_MARGIN·norm with the power normaliser)."""
        norm = self.max_norm if norm is None or not math.isfinite(norm) else min(norm, self.max_norm)
        return series_terms(norm * (POWER_MARGIN if self.normaliser == "power" else 1.0), taylor_tolerance(dtype))

    def norm_bound(self, h: int, w: int) -> Tensor:
        """A guaranteed upper bound on ‖M‖₂ of the current kernel on h×w images (no autograd)."""
        with torch.no_grad():
            return conv_norm_bound(self._kernel(h, w, step=False)[0], h, w)

    def _kernel(self, h: int, w: int, step: bool) -> tuple[Tensor, float]:
        """(K, n): the normalised kernel and n = min(b, β), the bound on its ‖M‖₂ that the series
        length follows (with the power normaliser min(σ̂, β), the estimate, once a step was taken)."""
        if self.normaliser == "bound":
            norm = conv_norm_bound(self.weight, h, w)
        else:
            if (h, w) != self.size:
                built = "×".join(map(str, self.size or ()))
                raise ValueError(f"ConvExp with normaliser='power' was built for {built} images, got {h}×{w}")
            if step:
                power_step(self.weight, self.power_u, self.power_v)
                self.power_steps += 1
            r = self.kernel_size // 2
            norm = torch.sum(self.power_u * F.conv2d(self.power_v[None], self.weight, padding=r)[0])
        # = min(1, β / norm), with no 0/0 for a zero kernel
        K = self.weight * (self.max_norm / torch.clamp(norm, min=self.max_norm))
        estimate = float(norm.detach())
        if self.normaliser == "power" and not (int(self.power_steps) > 0 and estimate > 0):
            return K, self.max_norm  # u and v still random: the estimate says nothing, T at β
        return K, min(estimate, self.max_norm)

    def _normalised(self, h: int, w: int) -> tuple[Tensor, float]:
        return self._cache.get(self, "kernel", lambda: self._kernel(h, w, step=False), h, w)

    def kernel(self, h: int, w: int) -> Tensor:
        """K, the spectrally normalised kernel for h×w images (‖M‖₂ ≤ max_norm with the bound);
        no power step."""
        return self._normalised(h, w)[0]

    def _check(self, x: Tensor) -> None:
        check_input(x, self.channels, "ConvExp", self)
        check_fits("ConvExp", tuple(x.shape[2:]), self.kernel_size)
        if self.pre_bias is not None and tuple(x.shape[2:]) != self.size:
            built = "×".join(map(str, self.size or ()))
            raise ValueError(f"ConvExp with bias=True was built for {built} images, got {x.shape[2]}×{x.shape[3]}")

    def _trace(self, K: Tensor, size: tuple[int, int]) -> Tensor:
        r = self.kernel_size // 2
        return size[0] * size[1] * torch.diagonal(K[:, :, r, r]).sum()

    def logdet(self, size: tuple[int, int]) -> Tensor:
        """log|det| of the map on h×w images: tr M = n·Σ_c K[c, c, centre] (exact), plus the 1×1 conv's."""
        logdet = self._trace(self.kernel(*size), size)
        if self.conv1x1 is not None:
            logdet = logdet + self.conv1x1.logdet(size)
        return logdet

    def _for_call(self, x: Tensor, step: bool) -> tuple[Tensor, int]:
        """K for this call and the series length its norm needs: built once (the log-det and the
        series share it), cached in eval; a training forward takes the power step."""
        if self.training and step and self.normaliser == "power":
            K, norm = self._kernel(x.shape[2], x.shape[3], step=True)
        else:
            K, norm = self._normalised(x.shape[2], x.shape[3])
        return K, self.terms(x.dtype, norm)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x)
        K, terms = self._for_call(x, step=True)
        logdet = self._trace(K, (x.shape[2], x.shape[3]))
        if self.pre_bias is not None:
            x = x + self.pre_bias
        if self.conv1x1 is not None:
            x, ld = self.conv1x1(x)
            logdet = logdet + ld
        y = conv_exp(x, K, terms)
        if self.post_bias is not None:
            y = y + self.post_bias
        return y, logdet.expand(x.shape[0])

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        self._check(y)
        K, terms = self._for_call(y, step=False)
        logdet = -self._trace(K, (y.shape[2], y.shape[3]))
        if self.post_bias is not None:
            y = y - self.post_bias
        x = conv_exp(y, -K, terms)
        if self.conv1x1 is not None:
            x, ld = self.conv1x1.inverse(x)
            logdet = logdet + ld
        if self.pre_bias is not None:
            x = x - self.pre_bias
        return x, logdet.expand(y.shape[0])

"""Logistic-mixture CDF coupling (Flow++, Ho et al. 2019).

Per element of x2, with K logistic components (weights π = softmax(logits), means μ_k, log-scales s_k),

    F(x) = Σ_k π_k σ((x − μ_k)·e^{−s_k}),   y = e^{a}·σ⁻¹(F(x)) + b,
    log|y′| = a + log F′(x) − log F(x) − log(1 − F(x)),
    F′(x) = Σ_k π_k e^{−s_k} σ(z_k)(1 − σ(z_k)),   z_k = (x − μ_k)·e^{−s_k}.

Everything is computed in log space: log F = logsumexp_k(log π_k + log σ(z_k)),
log(1 − F) = logsumexp_k(log π_k + log σ(−z_k)), σ⁻¹(F) = log F − log(1 − F). The CDF itself is
never formed, so σ⁻¹(F) stays exact where F rounds to 0 or 1 (|x| beyond ~17 in float32, ~37 in float64)
and no clamp of F to [ε, 1 − ε] is needed, in either direction: the map is exactly invertible on
every finite input.

The inverse solves σ⁻¹(F(x)) = t, t = (y − b)·e^{−a}, by bisection, vectorised over all elements.
σ⁻¹(F) is increasing and, F being a convex combination of the σ(z_k), lies between min_k z_k and
max_k z_k; so the root lies in the bracket [min_k r_k, max_k r_k], r_k = μ_k + t·e^{s_k} (where
z_k = t). The bisection halves the number of floating-point numbers in the bracket (it bisects
the floats' bit patterns, read as ordered integers), so ⌈log2 of that number⌉ steps, at most 32
in float32 and 64 in float64, leave two adjacent floats around the sign change of the computed
σ⁻¹(F(x)) − t, for any bracket: the solve adds no error of its own beyond the rounding of σ⁻¹(F),
wherever x is and however wide the components are (a tolerance relative to the bracket would
lose digits of x near 0 inside a wide bracket). The count is
read once before the loop, nothing is read back per step, and one check at the end raises a
RuntimeError if a bracket did not close (only possible with a smaller forced count).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Cost, LayerInfo
from .coupling import Coupling
from .scale_maps import SCALE_MAPS, TanhScale, make_scale_map

__all__ = [
    "MIXTURE_SCALES",
    "LogisticMixtureCoupling",
    "float_to_key",
    "key_to_float",
    "mixture_logit_cdf",
    "mixture_logit_cdf_inverse",
]

# components' log-scales are clamped below, as in Flow++: no component narrower than e^{-7}
LOG_SCALE_MIN = -7.0
# the scale maps of a: Flow++'s tanh(o), or any of the affine coupling's
MIXTURE_SCALES = ("flowpp", *SCALE_MAPS)


def mixture_logit_cdf(x: Tensor, logits: Tensor, means: Tensor, log_scales: Tensor) -> tuple[Tensor, Tensor]:
    """σ⁻¹(F(x)) and the log of its derivative, log F′ − log F − log(1 − F), elementwise, in log space.

    Args:
        x: (B, c, H, W).
        logits, means, log_scales: (B, K, c, H, W), the mixture of each element along dim 1.
    """
    log_pi = F.log_softmax(logits, dim=1)
    z = (x.unsqueeze(1) - means) * torch.exp(-log_scales)
    log_sig, log_sig_neg = F.logsigmoid(z), F.logsigmoid(-z)
    log_cdf = torch.logsumexp(log_pi + log_sig, dim=1)
    log_sf = torch.logsumexp(log_pi + log_sig_neg, dim=1)
    log_pdf = torch.logsumexp(log_pi - log_scales + log_sig + log_sig_neg, dim=1)
    return log_cdf - log_sf, log_pdf - log_cdf - log_sf


# a float's bit pattern, read as a signed integer of the same width, and the mask of its magnitude bits
_BITS = {torch.float32: (torch.int32, 0x7FFFFFFF), torch.float64: (torch.int64, 0x7FFFFFFFFFFFFFFF)}


def float_to_key(x: Tensor) -> Tensor:
    """An integer per float, in the floats' order: consecutive floats get consecutive integers.

    IEEE floats are sign and magnitude: a non-negative float's bits read as an integer already
    increase with it; a negative one's magnitude bits are flipped so that they decrease with it
    (−0.0 ↦ −1, +0.0 ↦ 0). The map is its own inverse on the bits (:func:`key_to_float`).
    """
    itype, mask = _BITS[x.dtype]
    bits = x.view(itype)
    return torch.where(bits < 0, bits ^ mask, bits)


def key_to_float(key: Tensor, dtype: torch.dtype) -> Tensor:
    """The float whose :func:`float_to_key` is ``key``."""
    _, mask = _BITS[dtype]
    return torch.where(key < 0, key ^ mask, key).view(dtype)


def _logit_cdf(x: Tensor, log_pi: Tensor, means: Tensor, inv_scales: Tensor) -> Tensor:
    z = (x.unsqueeze(1) - means) * inv_scales
    log_cdf = torch.logsumexp(log_pi + F.logsigmoid(z), dim=1)
    return log_cdf - torch.logsumexp(log_pi + F.logsigmoid(-z), dim=1)


def mixture_logit_cdf_inverse(
    t: Tensor,
    logits: Tensor,
    means: Tensor,
    log_scales: Tensor,
    *,
    iterations: int | None = None,
    owner: str = "logistic mixture",
) -> tuple[Tensor, Tensor]:
    """x with σ⁻¹(F(x)) = t elementwise, and −log of the derivative there (the inverse's log|dx/dt|).

    Bisection on the floats themselves: in the bracket of the module docstring, each step halves
    the number of floating-point numbers between lo and hi (:func:`float_to_key`), so
    ⌈log2(that number)⌉ steps, at most 32 in float32 and 64 in float64, end with lo and hi adjacent
    floats, whatever the bracket's size or position; of the two, the one whose σ⁻¹(F) is nearer t
    is returned. The count is read once from the widest bracket (``iterations`` overrides it); the
    loop reads nothing back to the host; one check at the end raises RuntimeError naming ``owner``
    if any bracket has not closed. Non-finite t give non-finite x (±inf ↦ ±inf, NaN ↦ NaN).

    The result is differentiable: x carries the implicit-function gradient ∂x = −∂g / g′ of
    g(x) = σ⁻¹(F(x)) − t, its value the bisection's, untouched.
    """
    if t.numel() == 0:
        return t.clone(), t.clone()
    with torch.no_grad():
        log_pi = F.log_softmax(logits, dim=1)
        inv_scales = torch.exp(-log_scales)
        roots = means + t.unsqueeze(1) * torch.exp(log_scales)  # where each component's z equals t
        # one float of margin for the roots' rounding, within [−inf, inf] (never a NaN's bits)
        infinity = float_to_key(torch.tensor(math.inf, dtype=t.dtype, device=t.device))
        lo = (float_to_key(roots.amin(dim=1)) - 1).clamp(-infinity - 1, infinity)
        hi = (float_to_key(roots.amax(dim=1)) + 1).clamp(-infinity - 1, infinity)
        finite = torch.isfinite(t)  # a non-finite t is passed through below: no bracket to close
        if iterations is None:
            widths = torch.where(finite, hi.double() - lo.double(), 0.0)
            span = widths.amax().item() if widths.numel() else 0.0  # read once, before the loop
            iterations = max(0, math.ceil(math.log2(span))) if span > 1 else 0
        for _ in range(iterations):
            mid = (lo & hi) + ((lo ^ hi) >> 1)  # floor((lo + hi) / 2) without overflow
            above = _logit_cdf(key_to_float(mid, t.dtype), log_pi, means, inv_scales) >= t
            hi = torch.where(above, mid, hi)
            lo = torch.where(above, lo, mid)
        converged = (hi == lo) | (hi == lo + 1) | ~finite
        if not bool(converged.all()):  # the one check read back to the host
            raise RuntimeError(
                f"{owner}: the inverse's bisection did not close its bracket to adjacent floating-point "
                f"numbers in {iterations} steps for {int((~converged).sum())} of {t.numel()} elements"
            )
        x_lo, x_hi = key_to_float(lo, t.dtype), key_to_float(hi, t.dtype)
        nearer_hi = (_logit_cdf(x_hi, log_pi, means, inv_scales) - t).abs() < (
            _logit_cdf(x_lo, log_pi, means, inv_scales) - t
        ).abs()
        # ±inf ↦ ±inf, NaN ↦ NaN
        x = torch.where(finite, torch.where(nearer_hi, x_hi, x_lo), t)

    logit, log_slope = mixture_logit_cdf(x, logits, means, log_scales)
    if logit.requires_grad or t.requires_grad:
        # implicit function theorem at g(x) = σ⁻¹(F(x)) − t = 0: dx = −dg / g′, with x's value kept
        g = logit - t
        x = x - (g - g.detach()) * torch.exp(-log_slope.detach())
        _, log_slope = mixture_logit_cdf(x, logits, means, log_scales)  # its gradient through x too
    return x, -log_slope


class LogisticMixtureCoupling(Coupling):
    """y2 = e^{a}·σ⁻¹(Σ_k π_k σ((x2 − μ_k)·e^{−s_k})) + b, a = tanh(o); log|det| = Σ [a + log F′(x2) − log F(1 − F)].

    Flow++'s elementwise CDF coupling (the module docstring has the maths). With K components the
    net gives each channel of x2 the log-scale a, the shift b and K weight logits, means and
    log-scales (clamped below at −7, as Flow++). The log-scale is Flow++'s a = tanh(o) by default
    (|a| < 1, no learned parameters); ``scale`` picks any scale map of the affine coupling
    instead (``tanh`` is the paper's learned bound α·tanh(β·o + γ) + δ). Zero net output gives K
    identical standard logistics and a = 0, σ⁻¹(σ(x)) = x: the identity. Cost: O(K) per element
    forward; the inverse is a vectorised bisection on the floats
    (:func:`mixture_logit_cdf_inverse`), at most 32 steps in float32 and 64 in float64, of O(K)
    each, that ends on adjacent floats, with two reads back to the host per call (the step count
    before the loop, the convergence check after). Flow++ instead clamps the CDF to
    [1e-5, 1 − 1e-5] before its bisection, so its inverse saturates beyond |σ⁻¹(F)| ≈ 11.5.

    Net output layout, parameter-major: h viewed as (B, 3K + 2, c, H, W) holds a, b, then the K
    logits, the K means and the K log-scales of each channel of x2 (parameter p of channel i at
    h[:, p·c + i]). Flow++ interleaves them channel-major (its own net); with a net of ours the
    layout is a naming of the output channels, not a different map.

    Args:
        components: K ≥ 1 (default 4, where Flow++'s CIFAR-10 model uses 32: the zoo's couplings
            share one small net and compare their maps; K = 4 gives 14 net outputs per channel of
            x2, near the spline's 23, where K = 32 would give 98 and make the mixture's head the
            largest part of a small net. Each component adds 3 outputs and O(1) work per bisection
            step.)
        scale: the map of a: ``"flowpp"`` (the default, tanh(o)) or a name of
            :data:`~mefbench.layers.scale_maps.SCALE_MAPS`.
    """

    info = LayerInfo(
        family="coupling",
        reference="Ho et al. 2019 (Flow++; code: aravindsrinivas/flowpp)",
        cost=Cost("net + O(K·c·n)", "O(K·c·n)", "net + O(b·K·c·n), b ≤ 32 (float32) / 64 (float64) steps"),
        inverse="iterative",
    )

    def __init__(
        self,
        channels: int,
        *,
        components: int = 4,
        scale: str = "flowpp",
        **base: Any,
    ) -> None:
        name = type(self).__name__
        if isinstance(components, bool) or not isinstance(components, int):
            raise ValueError(f"{name} option components must be an integer, got {components!r}")
        if components < 1:
            raise ValueError(f"{name} option components must be at least 1, got {components}")
        if scale not in MIXTURE_SCALES:
            raise ValueError(f"{name}: unknown scale map {scale!r}; choose one of {', '.join(MIXTURE_SCALES)}")
        self.components = components
        super().__init__(channels, **base)
        self.scale = TanhScale() if scale == "flowpp" else make_scale_map(scale, 1.0, name)

    def num_params(self, c: int) -> int:
        return c * (3 * self.components + 2)

    def _unpack(self, h: Tensor) -> tuple[Tensor, ...]:
        """log-scale a and shift b (B, c, H, W); logits, means, log-scales (B, K, c, H, W)."""
        b, _, hh, ww = h.shape
        K = self.components
        parts = h.reshape(b, 3 * K + 2, self.c2, hh, ww).split([1, 1, K, K, K], dim=1)
        a, shift, logits, means, log_scales = parts
        S = self.scale(a.squeeze(1))
        return S, shift.squeeze(1), logits, means, log_scales.clamp_min(LOG_SCALE_MIN)

    def transform(self, x2: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        S, shift, logits, means, log_scales = self._unpack(h)
        u, log_slope = mixture_logit_cdf(x2, logits, means, log_scales)
        return torch.exp(S) * u + shift, (S + log_slope).sum(dim=(1, 2, 3))

    def inverse_transform(self, y2: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        S, shift, logits, means, log_scales = self._unpack(h)
        t = (y2 - shift) * torch.exp(-S)
        name = type(self).__name__
        x2, neg_log_slope = mixture_logit_cdf_inverse(t, logits, means, log_scales, owner=name)
        return x2, (neg_log_slope - S).sum(dim=(1, 2, 3))

"""Rational-quadratic spline coupling (Durkan et al. 2019, "Neural Spline Flows").

Each element of x2 passes through its own monotone rational-quadratic (RQ) spline on [−B, B] with
K bins, and through the identity outside (linear tails of slope 1, so value and derivative are
continuous at ±B). Knots (x_k, y_k), k = 0..K, and derivatives d_k at the knots define it: in bin k,
with w = x_{k+1} − x_k, h = y_{k+1} − y_k, s = h / w and ξ = (x − x_k) / w ∈ [0, 1],

    y = y_k + h·(s ξ² + d_k ξ(1−ξ)) / (s + (d_{k+1} + d_k − 2s) ξ(1−ξ))
    y′ = s²·(d_{k+1} ξ² + 2s ξ(1−ξ) + d_k (1−ξ)²) / (s + (d_{k+1} + d_k − 2s) ξ(1−ξ))²

The inverse in bin k is the root in [0, 1] of a ξ² + b ξ + c = 0 where, for
δ = (y − y_k)(d_{k+1} + d_k − 2s), a = h(s − d_k) + δ, b = h·d_k − δ and c = −s(y − y_k):
ξ = 2c / (−b − √(b² − 4ac)) for b ≥ 0 (the form that stays finite as a → 0), and the same root
written (−b + √(b² − 4ac)) / 2a for b < 0 (then a > h·s > 0), so that neither form subtracts
nearly equal numbers.

:func:`rq_spline` is the maths (a pure function of x and the raw parameters);
:class:`SplineCoupling` is the layer.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .base import Cost, LayerInfo
from .coupling import Coupling

__all__ = ["SplineCoupling", "rq_spline"]


def _knots(raw: Tensor, bound: float, minimum: float) -> Tensor:
    """K+1 knots on [−B, B] along dim 1 from K raw values: bin sizes 2B·(m + (1 − K·m)·softmax(raw)),
    with the end knots set to exactly ∓B."""
    K = raw.shape[1]
    fractions = minimum + (1 - minimum * K) * torch.softmax(raw, dim=1)
    inner = (2 * bound) * torch.cumsum(fractions, dim=1)[:, :-1] - bound
    ends = raw.new_full((raw.shape[0], 1, *raw.shape[2:]), bound)
    return torch.cat([-ends, inner, ends], dim=1)


def derivative_offset(min_derivative: float) -> float:
    """The softplus offset that makes a zero raw derivative give exactly d = 1:
    min_derivative + softplus(offset) = 1, i.e. offset = log(e^{1 − min_derivative} − 1)."""
    return math.log(math.expm1(1.0 - min_derivative))


def rq_spline(
    x: Tensor,
    raw_widths: Tensor,
    raw_heights: Tensor,
    raw_derivatives: Tensor,
    *,
    bound: float = 3.0,
    min_bin_width: float = 1e-3,
    min_bin_height: float = 1e-3,
    min_derivative: float = 1e-3,
    inverse: bool = False,
) -> tuple[Tensor, Tensor]:
    """The RQ spline (or its inverse) elementwise, with identity tails outside [−B, B].

    Args:
        x: (B, c, H, W) inputs (outputs of the spline if ``inverse``).
        raw_widths, raw_heights: (B, K, c, H, W) unnormalised bin widths and heights (softmax over K).
        raw_derivatives: (B, K−1, c, H, W) unnormalised derivatives at the inner knots:
            d = min_derivative + softplus(raw + offset), offset chosen so that raw = 0 gives d = 1;
            the derivative at ±B is 1 (it meets the tails).

    Returns:
        (y, log|y′|) elementwise, both (B, c, H, W); with ``inverse``, (x, −log|y′(x)|).
        All-zero raw parameters give the identity.
    """
    knots_x = _knots(raw_widths, bound, min_bin_width)
    knots_y = _knots(raw_heights, bound, min_bin_height)
    inner = min_derivative + F.softplus(raw_derivatives + derivative_offset(min_derivative))
    one = inner.new_ones((inner.shape[0], 1, *inner.shape[2:]))
    derivs = torch.cat([one, inner, one], dim=1)

    inside = (x >= -bound) & (x <= bound)
    v = x.clamp(-bound, bound).unsqueeze(1)  # the tails' values never enter the spline branch
    K = raw_widths.shape[1]
    search = knots_y if inverse else knots_x
    idx = (v >= search[:, 1:K]).sum(dim=1, keepdim=True)  # bin index in 0..K−1; ±B fall in the end bins

    ends = torch.cat([idx, idx + 1], dim=1)  # the bin's two ends: one gather (and scatter) per array
    x_k, x_k1 = knots_x.gather(1, ends).split(1, dim=1)
    y_k, y_k1 = knots_y.gather(1, ends).split(1, dim=1)
    d0, d1 = derivs.gather(1, ends).split(1, dim=1)
    w, h = x_k1 - x_k, y_k1 - y_k
    s = h / w
    curve = d1 + d0 - 2 * s

    if inverse:
        dy = v - y_k
        a = h * (s - d0) + dy * curve
        b = h * d0 - dy * curve
        c = -s * dy
        root = torch.sqrt((b * b - 4 * a * c).clamp_min(0))  # the discriminant is ≥ 0 but for rounding
        # the root in [0, 1] is 2c / (−b − √disc) = (−b + √disc) / 2a; each form is free of
        # cancellation for one sign of b, and neither divides by zero there (b < 0 implies a > h·s > 0)
        positive = b >= 0
        xi = (torch.where(positive, 2 * c, root - b) / torch.where(positive, -b - root, 2 * a)).clamp(0, 1)
    else:
        xi = ((v - x_k) / w).clamp(0, 1)
    xi1 = xi * (1 - xi)
    denominator = s + curve * xi1
    out = x_k + xi * w if inverse else y_k + h * (s * xi * xi + d0 * xi1) / denominator
    log_deriv = (
        2 * torch.log(s) + torch.log(d1 * xi * xi + 2 * s * xi1 + d0 * (1 - xi) ** 2) - 2 * torch.log(denominator)
    )
    out, log_deriv = out.squeeze(1), log_deriv.squeeze(1)
    if inverse:
        log_deriv = -log_deriv
    return torch.where(inside, out, x), torch.where(inside, log_deriv, torch.zeros_like(log_deriv))


def _positive_float(value: object, owner: str, option: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{owner} option {option} must be a positive finite number, got {value!r}")
    return float(value)


class SplineCoupling(Coupling):
    """y2 = RQ-spline_h(x2) elementwise on [−B, B], identity outside; log|det| = Σ log spline′(x2).

    Per element of x2, a monotone rational-quadratic spline with K bins (module docstring for
    its formula): bin widths and heights from a softmax (each at least ``min_bin_width``,
    ``min_bin_height`` of 2B), K−1 inner derivatives min_derivative + softplus(raw + offset), the
    offset chosen so that a zero net output gives derivative 1 and so the identity; the derivative
    at ±B is 1, where the linear tails start. The inverse is closed form (the root of a quadratic
    per element). Cost: O(K) per element, the net's output conv has c·(3K − 1) channels.

    Net output layout, parameter-major: h viewed as (B, 3K − 1, c, H, W) holds the K raw widths,
    then the K raw heights, then the K − 1 raw inner derivatives of each channel of x2 (parameter p
    of channel i at h[:, p·c + i]).

    Args:
        bins: K ≥ 2 (default 8: the net then outputs 23 values per channel of x2; each bin adds 3).
        bound: B > 0 (default 3.0): the layers' inputs are roughly unit-scale (data in [−1, 1),
            ActNorm standardises), so [−3, 3] holds ~99.7 % of them; the rest passes linearly.
        min_bin_width, min_bin_height, min_derivative: lower bounds that keep the spline strictly
            monotone and its inverse well conditioned (1e-3 each, as nflows); K·min_bin_width and
            K·min_bin_height must be below 1, min_derivative below 1.
    """

    info = LayerInfo(
        family="coupling",
        reference="Durkan et al. 2019 (Neural Spline Flows)",
        cost=Cost("net + O(K·c·n)", "O(c·n)", "net + O(K·c·n)"),
        inverse="closed form",
    )

    def __init__(
        self,
        channels: int,
        *,
        bins: int = 8,
        bound: float = 3.0,
        min_bin_width: float = 1e-3,
        min_bin_height: float = 1e-3,
        min_derivative: float = 1e-3,
        **base: Any,
    ) -> None:
        name = type(self).__name__
        if isinstance(bins, bool) or not isinstance(bins, int):
            raise ValueError(f"{name} option bins must be an integer, got {bins!r}")
        if bins < 2:
            raise ValueError(f"{name} option bins must be at least 2, got {bins}")
        self.bins = bins
        self.bound = _positive_float(bound, name, "bound")
        self.min_bin_width = _positive_float(min_bin_width, name, "min_bin_width")
        self.min_bin_height = _positive_float(min_bin_height, name, "min_bin_height")
        self.min_derivative = _positive_float(min_derivative, name, "min_derivative")
        for option in ("min_bin_width", "min_bin_height"):
            if getattr(self, option) * bins >= 1:
                raise ValueError(
                    f"{name} option {option} must be below 1/bins = {1 / bins:.4g} (the {bins} bins must fit "
                    f"in [−B, B]), got {getattr(self, option)}"
                )
        if self.min_derivative >= 1:
            raise ValueError(f"{name} option min_derivative must be below 1, got {self.min_derivative}")
        super().__init__(channels, **base)

    def num_params(self, c: int) -> int:
        return c * (3 * self.bins - 1)

    def _spline(self, v: Tensor, h: Tensor, inverse: bool) -> tuple[Tensor, Tensor]:
        b, _, hh, ww = h.shape
        K = self.bins
        widths, heights, derivs = h.reshape(b, 3 * K - 1, self.c2, hh, ww).split([K, K, K - 1], dim=1)
        out, log_deriv = rq_spline(
            v,
            widths,
            heights,
            derivs,
            bound=self.bound,
            min_bin_width=self.min_bin_width,
            min_bin_height=self.min_bin_height,
            min_derivative=self.min_derivative,
            inverse=inverse,
        )
        return out, log_deriv.sum(dim=(1, 2, 3))

    def transform(self, x2: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        return self._spline(x2, h, inverse=False)

    def inverse_transform(self, y2: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        return self._spline(y2, h, inverse=True)

"""Scale maps: a coupling net's raw output o -> the log-scale S (affine) or matrix entries (matrix-exp).

Chosen by name (:data:`SCALE_MAPS`), each a small module ``S = map(o)``. The affine coupling's
scale is e^S, so S is a log-scale; the matrix-exponential coupling uses S as matrix entries.

| name | S | bound | used by |
|---|---|---|---|
| ``tanh`` | α·tanh(β·o + γ) + δ, α, β, γ, δ learned | \\|S\\| ≤ \\|α\\| + \\|δ\\| | the paper (MEF) |
| ``sigmoid`` | log σ(o + 2) | S < 0 (contracting only) | Glow |
| ``exp`` | o | none | RealNVP without a bound |
| ``softclamp`` | c·0.636·atan(o / c), c = 2 | \\|S\\| < c·π/2·0.636 ≈ 2 | FrEIA (``clamp``) |
| ``hardclamp`` | clamp(o, −5, 3) | S ∈ [−5, 3] | pyro (``log_scale_min_clip``, ``log_scale_max_clip``) |

:class:`TanhScale` (S = tanh(o), \\|S\\| < 1, Flow++'s) is the logistic-mixture coupling's default and
not in the table: the affine coupling's zoo variants are the table's rows.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SCALE_MAPS",
    "BoundedTanh",
    "ExpScale",
    "HardClamp",
    "SigmoidScale",
    "SoftClamp",
    "TanhScale",
    "bounded_tanh_via_sigmoid",
    "make_scale_map",
]


class _BoundedTanhFn(torch.autograd.Function):
    """S = α·tanh(β·o + γ) + δ with a hand-written backward: one saved tensor, few passes."""

    @staticmethod
    def forward(ctx, o: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor, delta: Tensor) -> Tensor:
        # tanh(z) = 2·sigmoid(2z) − 1: torch's CPU sigmoid is several times faster than its tanh
        t = torch.addcmul(gamma, o, beta).mul_(2).sigmoid_().mul_(2).sub_(1)
        ctx.save_for_backward(o, t, alpha, beta)
        return torch.addcmul(delta, t, alpha)

    @staticmethod
    def backward(ctx, g: Tensor):
        o, t, alpha, beta = ctx.saved_tensors
        g = g.contiguous()
        g_alpha = torch.dot(g.reshape(-1), t.reshape(-1))
        g_delta = g.sum()
        dz = torch.addcmul(g, g * t, t, value=-1).mul_(alpha)  # ∂L/∂(β·o + γ) = g·α·(1 − t²)
        g_beta = torch.sum(dz * o)
        g_gamma = dz.sum()
        return dz.mul_(beta), g_alpha, g_beta, g_gamma, g_delta


def bounded_tanh_via_sigmoid(
    o: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor, delta: Tensor
) -> tuple[Tensor, Tensor]:
    """(σ, S): σ = sigmoid(2β·o + 2γ) and S = α·tanh(β·o + γ) + δ, computed as 2α·σ + (δ − α).

    tanh(z) = 2·sigmoid(2z) − 1, and torch's CPU sigmoid is several times faster than its tanh.
    Plain differentiable ops: the fused matrix-exponential coupling's forward and its inverse both
    build S here, so the inverse undoes exactly the S the forward applied.
    """
    sig = torch.mul(o, 2 * beta).add_(2 * gamma).sigmoid_()
    return sig, torch.mul(sig, 2 * alpha).add_(delta - alpha)


class BoundedTanh(nn.Module):
    """S = α·tanh(β·o + γ) + δ with learnable scalars (the paper); |S| ≤ |α| + |δ|.

    Initialised β = 1/8, γ = δ = 0 and α as given (1 for affine, 1/c for matrix-exp).
    """

    def __init__(self, alpha: float = 1.0, beta: float = 1 / 8) -> None:
        super().__init__()
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        self.beta = nn.Parameter(torch.tensor(float(beta)))
        self.gamma = nn.Parameter(torch.tensor(0.0))
        self.delta = nn.Parameter(torch.tensor(0.0))

    def forward(self, o: Tensor) -> Tensor:
        return _BoundedTanhFn.apply(o, self.alpha, self.beta, self.gamma, self.delta)


class SigmoidScale(nn.Module):
    """Glow's scale sigmoid(o + 2), as a log-scale: S = log sigmoid(o + 2) < 0."""

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()

    def forward(self, o: Tensor) -> Tensor:
        return F.logsigmoid(o + 2.0)


class ExpScale(nn.Module):
    """Unbounded: S = o (scale e^o), as in RealNVP without a bound."""

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()

    def forward(self, o: Tensor) -> Tensor:
        return o


class SoftClamp(nn.Module):
    """FrEIA's soft clamp: S = c·0.636·atan(o / c), c = 2, so |S| < 2 (0.636 ≈ 2/π)."""

    def __init__(self, alpha: float = 1.0, clamp: float = 2.0) -> None:
        super().__init__()
        if not clamp > 0:
            raise ValueError(f"SoftClamp clamp must be positive, got {clamp}")
        self.clamp = float(clamp)

    def forward(self, o: Tensor) -> Tensor:
        return (self.clamp * 0.636) * torch.atan(o / self.clamp)


class HardClamp(nn.Module):
    """pyro's hard clamp of the log-scale: S = clamp(o, −5, 3) (zero gradient outside)."""

    def __init__(self, alpha: float = 1.0, low: float = -5.0, high: float = 3.0) -> None:
        super().__init__()
        if not low < high:
            raise ValueError(f"HardClamp needs low < high, got {low} and {high}")
        self.low, self.high = float(low), float(high)

    def forward(self, o: Tensor) -> Tensor:
        return torch.clamp(o, self.low, self.high)


class TanhScale(nn.Module):
    """Flow++'s scale: S = tanh(o), so |S| < 1; no learned parameters."""

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()

    def forward(self, o: Tensor) -> Tensor:
        return torch.tanh(o)


SCALE_MAPS: dict[str, type[nn.Module]] = {
    "tanh": BoundedTanh,
    "sigmoid": SigmoidScale,
    "exp": ExpScale,
    "softclamp": SoftClamp,
    "hardclamp": HardClamp,
}


def make_scale_map(name: str, alpha: float, owner: str = "coupling") -> nn.Module:
    """The scale map called ``name``, with α (used by the bounded tanh) as given."""
    if name not in SCALE_MAPS:
        raise ValueError(f"{owner}: unknown scale map {name!r}; choose one of {', '.join(SCALE_MAPS)}")
    if not (isinstance(alpha, float) and math.isfinite(alpha)):
        raise ValueError(f"{owner}: scale map α must be a finite float, got {alpha!r}")
    return SCALE_MAPS[name](alpha=alpha)

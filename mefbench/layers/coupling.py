"""Coupling layers: x1 passes unchanged and conditions an invertible map of x2.

x1 = the first ⌈C/2⌉ channels, x2 = the last c = ⌊C/2⌋. A net (the paper's residual ConvNet,
zero-initialised so that every coupling starts as the identity) maps x1 to parameters h, and each
coupling only says how h transforms x2. Raw outputs that become scales or matrix entries pass
through a scale map chosen by name (:data:`SCALE_MAPS`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..linalg import _action_backward, _action_forward, _plan, _workspace, expm_action_trace, phi
from .actnorm import DataInitAffine
from .base import FlowLayer, check_input

__all__ = [
    "AdditiveCoupling",
    "AffineCoupling",
    "BoundedTanh",
    "Coupling",
    "CouplingNet",
    "ExpScale",
    "MatrixExpCoupling",
    "SCALE_MAPS",
    "SigmoidScale",
]


# ----------------------------------------------------------------------------- scale maps


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


def _bounded_tanh_via_sigmoid(o: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor, delta: Tensor) -> tuple[Tensor, Tensor]:
    """(σ, S): σ = sigmoid(2β·o + 2γ) and S = α·tanh(β·o + γ) + δ, computed as 2α·σ + (δ − α).

    tanh(z) = 2·sigmoid(2z) − 1, and torch's CPU sigmoid is several times faster than its tanh.
    Plain differentiable ops: the fused coupling's forward and the coupling's inverse both build S
    here, so the inverse undoes exactly the S the forward applied.
    """
    sig = torch.mul(o, 2 * beta).add_(2 * gamma).sigmoid_()
    return sig, torch.mul(sig, 2 * alpha).add_(delta - alpha)


class _TanhExpmCouplingFn(torch.autograd.Function):
    """(e^S x + t, Σ tr S per sample) from the net output h = [t, o], S = α·tanh(β·o + γ) + δ, in one node.

    The scale map, the action and the log-det of :class:`MatrixExpCoupling` fused: the backward
    goes from the action's ∂L/∂S straight to ∂L/∂h, written into one buffer, with the scale map's
    derivative and its four scalar gradients taken in a few passes over S.
    """

    @staticmethod
    def forward(ctx, h: Tensor, x: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor, delta: Tensor, c: int):
        b, _, hh, ww = h.shape
        t, o = h.split([c, c * c], dim=1)
        sig, S = _bounded_tanh_via_sigmoid(o, alpha, beta, gamma, delta)
        S = S.reshape(b, c, c, hh * ww)
        steps, m = _plan(S)
        y, logdet, A, krylov = _action_forward(S, x.reshape(b, c, -1), steps, m)
        ctx.save_for_backward(h, sig, A, alpha, beta, *krylov)
        ctx.m, ctx.c = m, c
        return y.view(b, c, hh, ww).add_(t), logdet

    @staticmethod
    @once_differentiable  # the backward writes into buffers: no graph of it for a second derivative
    def backward(ctx, g: Tensor, g_logdet: Tensor):
        h, sig, A, alpha, beta, *krylov = ctx.saved_tensors
        c = ctx.c
        b, _, hh, ww = h.shape
        dS_out = _workspace("coupling dS", A.shape, A.dtype, A.device)  # consumed here, never returned
        dS, gx = _action_backward(A, krylov, g.reshape(b, c, -1), g_logdet, ctx.m, need_dS=True, dS_out=dS_out)
        dS = dS.view(b, c * c, hh, ww)
        # S = α(2σ − 1) + δ, σ = sigmoid(z), z = 2β·o + 2γ: ∂S/∂z = 2α·σ(1 − σ). The gradient of o
        # is built in place in its slice of ∂L/∂h, and dS's buffer takes the last product.
        gh = torch.empty_like(h, memory_format=torch.contiguous_format)
        g_t, e = gh.split([c, c * c], dim=1)
        g_t.copy_(g)
        torch.mul(dS, sig, out=e)
        g_delta = dS.sum()
        g_alpha = 2 * e.sum() - g_delta
        e.addcmul_(e, sig, value=-1)  # dS·σ(1 − σ)
        four_alpha = 4 * alpha
        g_gamma = four_alpha * e.sum()
        g_beta = four_alpha * torch.mul(e, h.narrow(1, c, c * c), out=dS).sum()
        e.mul_(four_alpha * beta)
        return gh, gx.view(b, c, hh, ww), g_alpha, g_beta, g_gamma, g_delta, None


class BoundedTanh(nn.Module):
    """S = α·tanh(β·o + γ) + δ with learnable scalars (the paper); |S| ≤ |α| + |δ|."""

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


SCALE_MAPS: dict[str, type[nn.Module]] = {"tanh": BoundedTanh, "sigmoid": SigmoidScale, "exp": ExpScale}


def make_scale_map(name: str, alpha: float) -> nn.Module:
    if name not in SCALE_MAPS:
        raise ValueError(f"unknown scale map {name!r}; choose one of {sorted(SCALE_MAPS)}")
    return SCALE_MAPS[name](alpha=alpha)


# ----------------------------------------------------------------------------- the coupling net


def _conv(cin: int, cout: int, k: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2)


class ResidualBlock(nn.Module):
    """[conv3×3 + Norm + ELU → conv1×1 + Norm + ELU → conv3×3 + Norm(zero)] + skip."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            _conv(hidden, hidden, 3), DataInitAffine(hidden), nn.ELU(),
            _conv(hidden, hidden, 1), DataInitAffine(hidden), nn.ELU(),
            _conv(hidden, hidden, 3), DataInitAffine(hidden, zero=True),
        )  # fmt: skip

    def forward(self, h: Tensor) -> Tensor:
        return h + self.body(h)


class CouplingNet(nn.Module):
    """The paper's coupling net: conv3×3 + Norm + ELU, residual blocks, ELU, zero conv3×3 to outputs."""

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 128, num_blocks: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(_conv(in_channels, hidden_channels, 3), DataInitAffine(hidden_channels), nn.ELU())
        self.blocks = nn.Sequential(*(ResidualBlock(hidden_channels) for _ in range(num_blocks)))
        self.head = _conv(hidden_channels, out_channels, 3)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.elu(self.blocks(self.stem(x))))


# ----------------------------------------------------------------------------- couplings


class Coupling(FlowLayer):
    """Template: split, run the net on x1, transform x2, concatenate.

    Subclasses set ``params_per_channel`` (net outputs per channel of x2, or override
    ``num_params``) and implement ``transform`` and ``inverse_transform``.
    """

    default_alpha = 1.0
    uses_scale = True

    def __init__(self, channels: int, hidden_channels: int = 128, num_blocks: int = 8, scale: str = "tanh") -> None:
        super().__init__()
        if channels < 2:
            raise ValueError(f"{type(self).__name__} needs at least 2 channels, got {channels}")
        self.channels = channels
        self.c1 = (channels + 1) // 2
        self.c2 = channels // 2
        self.net = CouplingNet(self.c1, self.num_params(self.c2), hidden_channels, num_blocks)
        self.scale = make_scale_map(scale, self.alpha(self.c2)) if self.uses_scale else None

    def num_params(self, c: int) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def alpha(self, c: int) -> float:
        return self.default_alpha

    def transform(self, x2: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def inverse_transform(self, y2: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_input(x, self.channels, type(self).__name__)
        x1, x2 = x.split([self.c1, self.c2], dim=1)  # split: its backward is one cat, not zero-fills
        y2, logdet = self.transform(x2, self.net(x1))
        return torch.cat([x1, y2], dim=1), logdet

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        check_input(y, self.channels, type(self).__name__)
        y1, y2 = y.split([self.c1, self.c2], dim=1)
        x2, logdet = self.inverse_transform(y2, self.net(y1))
        return torch.cat([y1, x2], dim=1), logdet


class AdditiveCoupling(Coupling):
    """y2 = x2 + t(x1); log|det| = 0 (NICE). Takes no scale map."""

    uses_scale = False

    def num_params(self, c: int) -> int:
        return c

    def transform(self, x2: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        return x2 + h, x2.new_zeros(x2.shape[0])

    def inverse_transform(self, y2: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        return y2 - h, y2.new_zeros(y2.shape[0])


class AffineCoupling(Coupling):
    """y2 = e^S ⊙ x2 + t, S = scale_map(o); log|det| = Σ S (RealNVP / Glow)."""

    def num_params(self, c: int) -> int:
        return 2 * c

    def _scale_shift(self, h: Tensor) -> tuple[Tensor, Tensor]:
        t, o = h.split(self.c2, dim=1)
        return self.scale(o), t

    def transform(self, x2: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        S, t = self._scale_shift(h)
        return torch.exp(S) * x2 + t, S.sum(dim=(1, 2, 3))

    def inverse_transform(self, y2: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        S, t = self._scale_shift(h)
        return (y2 - t) * torch.exp(-S), -S.sum(dim=(1, 2, 3))


class MatrixExpCoupling(Coupling):
    """The paper's coupling: y2_ij = e^{S_ij} x2_ij + t_ij per pixel; log|det| = Σ_ij tr S_ij.

    S_ij is a full c×c matrix while c ≤ ``full_max`` (24), else of rank k (``rank``, 3):
    S = A B with A c×k, B k×c, and e^{AB} x = x + A φ(BA) B x (only k×k matrices are formed).
    The full form applies e^S to x2 directly (:func:`~mefbench.linalg.expm_action`: matrix-vector
    products only, O(m·c²) per pixel, no c×c exponential is formed). Entries of S (of A and B)
    pass through the scale map, with α initialised to 1/c (1/√(c·k) for the factors), so
    ∥S∥∞ ≤ 1 at init.

    Args:
        rank: None for automatic (full up to full_max), 0 to force full, k > 0 to force rank k.
    """

    def __init__(
        self,
        channels: int,
        hidden_channels: int = 128,
        num_blocks: int = 8,
        scale: str = "tanh",
        rank: int | None = None,
        full_max: int = 24,
        low_rank: int = 3,
    ) -> None:
        c2 = channels // 2
        if rank is None:
            rank = 0 if c2 <= full_max else low_rank
        if rank < 0:
            raise ValueError(f"MatrixExpCoupling rank must be >= 0 (0 = full), got {rank}")
        self.rank = rank
        super().__init__(channels, hidden_channels, num_blocks, scale)

    def num_params(self, c: int) -> int:
        return c * (c + 1) if self.rank == 0 else c * (2 * self.rank + 1)

    def alpha(self, c: int) -> float:
        return 1.0 / c if self.rank == 0 else 1.0 / math.sqrt(c * self.rank)

    def _unpack(self, h: Tensor) -> tuple[Tensor, ...]:
        """Shift t (B, c, H, W) and S (B, c, c, H, W) — a view of the net output — or A, B per pixel."""
        b, _, hh, ww = h.shape
        c, k = self.c2, self.rank
        t, o = h.split([c, h.shape[1] - c], dim=1)
        if self._fused:  # the S the fused forward builds, to the bit
            s = self.scale
            entries = _bounded_tanh_via_sigmoid(o, s.alpha, s.beta, s.gamma, s.delta)[1]
        else:
            entries = self.scale(o)
        if k == 0:
            return t, entries.reshape(b, c, c, hh, ww)
        entries = entries.permute(0, 2, 3, 1)
        A = entries[..., : c * k].reshape(b, hh, ww, c, k)
        B = entries[..., c * k :].reshape(b, hh, ww, k, c)
        return t, A, B

    def _exp_action(self, mats: tuple[Tensor, ...], x: Tensor, sign: float) -> tuple[Tensor, Tensor]:
        """e^{±S} x for x (B, c, H, W), and Σ tr(±S) per sample."""
        if len(mats) == 1:
            (S,) = mats
            return expm_action_trace(S if sign > 0 else -S, x)
        A, B = mats
        v = x.permute(0, 2, 3, 1)
        BA = B @ A
        Bv = B @ v.unsqueeze(-1)
        out = v + (A @ (phi(sign * BA) @ Bv)).squeeze(-1) * sign
        trace = torch.diagonal(BA, dim1=-2, dim2=-1).sum(dim=(1, 2, 3))
        return out.permute(0, 3, 1, 2), sign * trace

    @property
    def _fused(self) -> bool:
        """The paper's layer (full matrices, bounded tanh): its forward is one fused node."""
        return self.rank == 0 and isinstance(self.scale, BoundedTanh)

    def transform(self, x2: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        if self._fused:
            s = self.scale
            return _TanhExpmCouplingFn.apply(h, x2, s.alpha, s.beta, s.gamma, s.delta, self.c2)
        t, *mats = self._unpack(h)
        y, logdet = self._exp_action(tuple(mats), x2, 1.0)
        return y + t, logdet

    def inverse_transform(self, y2: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        t, *mats = self._unpack(h)
        return self._exp_action(tuple(mats), y2 - t, -1.0)

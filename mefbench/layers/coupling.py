"""Coupling layers: x1 passes unchanged and conditions an invertible map of x2.

x1 = the first ⌈C/2⌉ channels, x2 = the last c = ⌊C/2⌋. A net built by a factory
``net(in_channels, out_channels)`` (default: the paper's residual ConvNet,
:class:`~mefbench.layers.nets.CouplingNet`; :data:`~mefbench.layers.nets.NETS` names the others)
maps x1 to parameters h, and each coupling only says how h transforms x2. The net's output layer
starts at zero (the net protocol, checked here), so that every coupling starts at h = 0: the
identity with its default options.
Raw outputs that become scales or matrix entries pass through a scale map chosen by name
(:data:`~mefbench.layers.scale_maps.SCALE_MAPS`).

Every coupling is built as ``cls(channels, *, size=None, net=None, **options)``: a subclass names
its own options and passes ``size`` and ``net`` on to :class:`Coupling` as ``**base``.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ..linalg import action_backward, action_forward, action_plan, expm_action_trace, phi, workspace
from .base import Cost, FlowLayer, LayerInfo
from .checks import check_input
from .nets import NetFactory, net_factory, output_layer
from .scale_maps import SCALE_MAPS, BoundedTanh, bounded_tanh_via_sigmoid, make_scale_map

__all__ = ["AdditiveCoupling", "AffineCoupling", "Coupling", "MatrixExpCoupling"]


class _TanhExpmCouplingFn(torch.autograd.Function):
    """(e^S x + t, Σ tr S per sample) from the net output h = [t, o], S = α·tanh(β·o + γ) + δ, in one node.

    o holds S in the official code's channel order, S[i, j] = o[j·c + i], so o viewed as (c, c)
    per pixel is Sᵀ; the action sums over the matching index and no transposed copy is made.
    The scale map, the action and the log-det of :class:`MatrixExpCoupling` fused: the backward
    goes from the action's ∂L/∂S straight to ∂L/∂h, written into one buffer, with the scale map's
    derivative and its four scalar gradients taken in a few passes over S.
    """

    @staticmethod
    def forward(ctx, h: Tensor, x: Tensor, alpha: Tensor, beta: Tensor, gamma: Tensor, delta: Tensor, c: int):
        b, _, hh, ww = h.shape
        t, o = h.split([c, c * c], dim=1)
        sig, S = bounded_tanh_via_sigmoid(o, alpha, beta, gamma, delta)
        S = S.reshape(b, c, c, hh * ww)  # Sᵀ per pixel
        steps, m = action_plan(S, transposed=True)
        y, logdet, A, krylov = action_forward(S, x.reshape(b, c, -1), steps, m, transposed=True)
        ctx.save_for_backward(h, sig, A, alpha, beta, *krylov)
        ctx.m, ctx.c = m, c
        return y.view(b, c, hh, ww).add_(t), logdet

    @staticmethod
    @once_differentiable  # the backward writes into buffers: no graph of it for a second derivative
    def backward(ctx, g: Tensor, g_logdet: Tensor):
        h, sig, A, alpha, beta, *krylov = ctx.saved_tensors
        c = ctx.c
        b, _, hh, ww = h.shape
        dS_out = workspace("coupling dS", A.shape, A.dtype, A.device)  # consumed here, never returned
        dS, gx = action_backward(
            A, krylov, g.reshape(b, c, -1), g_logdet, ctx.m, need_dS=True, dS_out=dS_out, transposed=True
        )
        assert dS is not None  # need_dS=True
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


@torch.compiler.disable  # plans its series from a norm read back to the host; scratch buffers written with out=
def _fused_tanh_expm(h: Tensor, x: Tensor, scale: BoundedTanh, c: int) -> tuple[Tensor, Tensor]:
    """:class:`_TanhExpmCouplingFn` applied, eagerly also inside ``torch.compile`` (the net around it compiles)."""
    return _TanhExpmCouplingFn.apply(h, x, scale.alpha, scale.beta, scale.gamma, scale.delta, c)


# ----------------------------------------------------------------------------- the template


class Coupling(FlowLayer):
    """Template: split, run the net on x1, transform x2, concatenate.

    Subclasses implement ``num_params(c)`` (net outputs for c channels of x2), ``transform`` and
    ``inverse_transform``, and take their own options as keyword arguments, passing the rest on::

        def __init__(self, channels: int, *, bins: int = 8, **base: Any) -> None:
            self.bins = bins                   # what num_params needs, before the net is built
            super().__init__(channels, **base)

    Args:
        channels: C ≥ 2.
        size: (H, W), unused by the couplings here (part of the construction contract).
        net: a factory ``net(in_channels, out_channels) -> nn.Module`` (:func:`~mefbench.layers.nets.net_factory`
            makes one from :data:`~mefbench.layers.nets.NETS`); default the paper's residual net,
            hidden 128, 8 blocks. The net must keep the net protocol: its last layer ``.head``
            starts at zero, so that the coupling starts at h = 0 (ValueError otherwise).
    """

    def __init__(self, channels: int, *, size: tuple[int, int] | None = None, net: NetFactory | None = None) -> None:
        super().__init__()
        name = type(self).__name__
        if not isinstance(channels, int) or isinstance(channels, bool) or channels < 2:
            raise ValueError(f"{name} needs at least 2 channels, got {channels!r}")
        if isinstance(net, nn.Module) or (net is not None and not callable(net)):
            raise ValueError(
                f"{name} option net must be a factory (in_channels, out_channels) -> nn.Module, such as "
                f"mefbench.layers.net_factory('resnet', hidden_channels=64), got {type(net).__name__}"
            )
        self.channels = channels
        self.c1 = (channels + 1) // 2
        self.c2 = channels // 2
        factory = net if net is not None else net_factory()
        self.net = factory(self.c1, self.num_params(self.c2))
        head = output_layer(self.net)
        params: tuple[Tensor | None, ...] = (cast(Tensor, head.weight), getattr(head, "bias", None))
        if any(p is not None and bool(p.detach().ne(0).any()) for p in params):
            raise ValueError(
                f"{name}: the output layer (.head) of its {type(self.net).__name__} does not start at zero; "
                "zero its weight and bias (nn.init.zeros_) so that the coupling starts as the identity"
            )
        self.amp_dtype: torch.dtype | None = None  # set_amp(): the net under torch.autocast

    def _conditioner(self, x1: Tensor) -> Tensor:
        """h = net(x1), under torch.autocast with ``amp_dtype`` if set, returned in x1's dtype: the
        coupling's own maths (scales, the matrix exponential, the log-det) stays in float32."""
        if self.amp_dtype is None:
            return self.net(x1)
        with torch.autocast(x1.device.type, dtype=self.amp_dtype):
            h = self.net(x1)
        return h.to(x1.dtype)

    def num_params(self, c: int) -> int:  # pragma: no cover - interface
        raise NotImplementedError

    def transform(self, x2: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def inverse_transform(self, y2: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        check_input(x, self.channels, type(self).__name__, self)
        if x.shape[0] == 0:  # an empty batch maps to an empty batch
            return x.clone(), x.new_zeros(0)
        x1, x2 = x.split([self.c1, self.c2], dim=1)  # split: its backward is one cat, not zero-fills
        y2, logdet = self.transform(x2, self._conditioner(x1))
        return torch.cat([x1, y2], dim=1), logdet

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        check_input(y, self.channels, type(self).__name__, self)
        if y.shape[0] == 0:
            return y.clone(), y.new_zeros(0)
        y1, y2 = y.split([self.c1, self.c2], dim=1)
        x2, logdet = self.inverse_transform(y2, self._conditioner(y1))
        return torch.cat([y1, x2], dim=1), logdet


class AdditiveCoupling(Coupling):
    """y2 = x2 + t(x1); log|det| = 0 (NICE). Takes no scale map."""

    info = LayerInfo(
        family="coupling",
        reference="Dinh et al. 2015 (NICE)",
        cost=Cost("net + O(c·n)", "0", "net + O(c·n)"),
    )

    def num_params(self, c: int) -> int:
        return c

    def transform(self, x2: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        return x2 + h, x2.new_zeros(x2.shape[0])

    def inverse_transform(self, y2: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        return y2 - h, y2.new_zeros(y2.shape[0])


class AffineCoupling(Coupling):
    """y2 = e^S ⊙ x2 + t, S = scale_map(o); log|det| = Σ S (RealNVP / Glow).

    Option ``scale``: the scale map's name (``tanh``, the paper's learned bound, by default; see
    :data:`~mefbench.layers.scale_maps.SCALE_MAPS`). The net outputs [t, o] (c channels each).
    """

    info = LayerInfo(
        family="coupling",
        reference="Dinh et al. 2017 (RealNVP); bounded tanh: Xiao & Liu 2020 (MEF)",
        cost=Cost("net + O(c·n)", "O(c·n)", "net + O(c·n)"),
    )
    variants = {name: {"scale": name} for name in SCALE_MAPS}  # what the zoo tables compare

    def __init__(self, channels: int, *, scale: str = "tanh", **base: Any) -> None:
        super().__init__(channels, **base)
        self.scale = make_scale_map(scale, 1.0, type(self).__name__)

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
    """y2_ij = e^{S_ij} x2_ij + t_ij per pixel; log|det| = Σ_ij tr S_ij (the paper's coupling).

    S_ij is a full c×c matrix while c ≤ ``full_max`` (24), else of rank k (``low_rank``, 3):
    S = A B with A c×k, B k×c, and e^{AB} x = x + A φ(BA) B x (only k×k matrices are formed).
    The full form applies e^S to x2 directly (matrix-vector products only, O(m·c²) per pixel, no
    c×c exponential is formed). Entries of S (of A and B) pass through the scale map, with α
    initialised to 1/c, so ∥S∥∞ ≤ 1 at init.

    The net's output channels follow the official code: [t (c), then S column by column,
    S[i, j] at c + j·c + i]; in the low-rank form [t, B (row a of B at c + a·c), A (column a of A at
    c + (k + a)·c)], and 1e-8 is added to every entry of A and B after the scale map.

    Args:
        scale: the scale map (default ``tanh``, the paper's).
        rank: None for automatic (full up to full_max), 0 to force full, k > 0 to force rank k.
    """

    info = LayerInfo(
        family="coupling",
        reference="Xiao & Liu 2020 (MEF)",
        cost=Cost("net + O(m·c²·n)", "O(c·n)", "net + O(m·c²·n)"),
        inverse="series",
    )

    FACTOR_EPS = 1e-8  # the official code adds it to A and B after the scale map

    def __init__(
        self,
        channels: int,
        *,
        scale: str = "tanh",
        rank: int | None = None,
        full_max: int = 24,
        low_rank: int = 3,
        **base: Any,
    ) -> None:
        name = type(self).__name__
        c2 = channels // 2 if isinstance(channels, int) else 0
        if low_rank < 1:
            raise ValueError(f"{name} option low_rank must be at least 1, got {low_rank}")
        if rank is None:
            rank = 0 if c2 <= full_max else min(low_rank, c2)
        if rank < 0:
            raise ValueError(f"{name} option rank must be >= 0 (0 = full), got {rank}")
        if c2 and rank > c2:
            raise ValueError(f"{name} option rank must be at most c = {c2} (half of {channels} channels), got {rank}")
        self.rank = rank
        super().__init__(channels, **base)
        self.scale = make_scale_map(scale, 1.0 / self.c2, name)

    def num_params(self, c: int) -> int:
        return c * (c + 1) if self.rank == 0 else c * (2 * self.rank + 1)

    def _unpack(self, h: Tensor) -> tuple[Tensor, ...]:
        """Shift t (B, c, H, W) and S (B, c, c, H, W), or A (B, H, W, c, k) and B (B, H, W, k, c)."""
        b, _, hh, ww = h.shape
        c, k = self.c2, self.rank
        t, o = h.split([c, h.shape[1] - c], dim=1)
        if self._fused:  # the S the fused forward builds, to the bit
            s = cast(BoundedTanh, self.scale)  # _fused holds only for the bounded tanh
            entries = bounded_tanh_via_sigmoid(o, s.alpha, s.beta, s.gamma, s.delta)[1]
        else:
            entries = self.scale(o)
        if k == 0:
            return t, entries.reshape(b, c, c, hh, ww).transpose(1, 2)
        entries = entries + self.FACTOR_EPS
        B = entries[:, : c * k].reshape(b, k, c, hh, ww).permute(0, 3, 4, 1, 2)
        A = entries[:, c * k :].reshape(b, k, c, hh, ww).permute(0, 3, 4, 2, 1)
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
            return _fused_tanh_expm(h, x2, self.scale, self.c2)
        t, *mats = self._unpack(h)
        y, logdet = self._exp_action(tuple(mats), x2, 1.0)
        return y + t, logdet

    def inverse_transform(self, y2: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        t, *mats = self._unpack(h)
        return self._exp_action(tuple(mats), y2 - t, -1.0)

"""Conditioner networks of the couplings: a registry of nets, the protocol they keep, one helper.

A coupling takes its net from a factory ``net(in_channels, out_channels) -> nn.Module`` (FrEIA's
``subnet_constructor``, nflows' ``transform_net_create_fn``). :data:`NETS` names the nets a
config can choose, each built as ``cls(in_channels, out_channels, hidden_channels=...,
num_blocks=..., **options)``; :func:`net_factory` turns a name and options into a factory:

- ``"resnet"``, :class:`CouplingNet`: the paper's residual ConvNet, exactly as the official code;
- ``"glow"``, :class:`GlowNet`: Glow's plain ConvNet (openai/glow's ``f``).

**The net protocol.** A net maps (B, in, H, W) to (B, out, H, W) and exposes its last layer as
``.head``: a module with a ``weight`` parameter, initialised to zero (with its bias, if any), so
that every coupling starts at h = 0 (the identity, with its default options). It takes its
width and depth as ``hidden_channels`` and ``num_blocks`` (the model passes
``FlowConfig.hidden_channels`` and ``num_blocks`` to every net). ``Coupling`` checks the head
when it builds its net; :func:`perturb_output` redraws the heads of every coupling in a model
(benchmarks time couplings away from the identity, where a matrix exponential of S = 0 would
cost nothing).

The paper's net follows the official code (changyi7231/MEF, ``models/flows.py``: ``ConvBlock``,
``Block``, ``Conv2d``, ``Norm``):

- every conv before a Norm has no bias (the Norm's shift makes it redundant);
- conv weights are drawn with ``kaiming_uniform_`` and, at data-dependent init, divided per output
  channel by the std of what the layer outputs before any init (the conv output, or its ELU for the
  stem), and then the Norm is set to give zero mean and unit variance (the last Norm of a block to
  zero: scale and shift 0, so the block starts as the identity before its ELU);
- a residual block is conv3×3 → Norm → ELU → conv1×1 → Norm → ELU → conv3×3 → Norm, plus the
  skip, then ELU (after every block, not once after all of them);
- stds are torch's default (Bessel-corrected, n − 1) and the scale is 1/(std + 1e-8).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Registry
from .checks import check_int, check_options

__all__ = [
    "NETS",
    "ConvNorm",
    "CouplingNet",
    "DataInitAffine",
    "GlowActNorm",
    "GlowConv",
    "GlowNet",
    "InitFlag",
    "NetFactory",
    "ResidualBlock",
    "ZeroConv2d",
    "edge_pad",
    "init_stats",
    "net_factory",
    "output_layer",
    "perturb_output",
    "sync_init_flags",
]

NetFactory = Callable[[int, int], nn.Module]

INIT_EPS = 1e-8  # the official code's eps in 1/(std + eps)
_CONSTANT = 1e-6  # a channel whose std is below this is treated as constant: scale 1, not 1e8


def init_stats(x: Tensor, dims: tuple[int, ...], name: str) -> tuple[Tensor, Tensor]:
    """(mean, std) over dims for data-dependent init, std Bessel-corrected as torch.std's default.

    Raises ValueError naming the layer if the batch has fewer than 2 values per statistic or any
    non-finite value, instead of leaving the layer producing NaN forever.
    """
    count = 1
    for d in dims:
        count *= x.shape[d]
    if count < 2:
        raise ValueError(
            f"{name}: data-dependent init needs at least 2 values per statistic, got a batch of shape "
            f"{tuple(x.shape)}; initialise on a larger batch"
        )
    if not torch.isfinite(x).all():
        raise ValueError(f"{name}: data-dependent init got non-finite values (NaN or inf) in its batch")
    return x.mean(dim=dims), x.std(dim=dims)


def inverse_std(std: Tensor, init_scale: float = 1.0) -> Tensor:
    """init_scale / (std + 1e-8) as in the official code; a constant channel gets init_scale."""
    return torch.where(std > _CONSTANT, init_scale / (std + INIT_EPS), torch.full_like(std, init_scale))


class InitFlag(nn.Module):
    """Mixin for a module with data-dependent init and an ``initialized`` buffer (saved with it).

    The buffer is read back to the host only until it is seen set: a GPU read-back per norm per
    forward would stall the stream hundreds of times a step. Loading a state dict re-reads it.
    """

    initialized: Tensor  # the buffer each subclass registers
    _init_seen: bool = False

    def _needs_init(self) -> bool:
        if not self.training or self._init_seen:
            return False
        if bool(self.initialized):
            self._init_seen = True
            return False
        return True

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        self._init_seen = False
        super()._load_from_state_dict(*args, **kwargs)


def _check_width_depth(name: str, hidden_channels: object, num_blocks: object) -> None:
    check_int(name, "hidden_channels", hidden_channels, minimum=1)
    check_int(name, "num_blocks", num_blocks, minimum=0)


def sync_init_flags(module: nn.Module) -> None:
    """Read the ``initialized`` buffer of every :class:`InitFlag` in module back once, now.

    Before ``torch.compile``: compiled code then reads a plain Python flag instead of breaking
    its graph at the buffer's read-back (and recompiling when the flag changes on its first read).
    """
    for m in module.modules():
        if isinstance(m, InitFlag):
            m._init_seen = bool(m.initialized)


class DataInitAffine(InitFlag, nn.Module):
    """Per-channel affine z = w ⊙ h + b inside coupling nets (the official ``Norm``; not a flow layer).

    Data-dependent init (:meth:`data_init`) gives zero mean and unit variance per channel on the
    init batch, or w = b = 0 with ``init_scale=0``. Used alone, it initialises itself on its first
    forward in training mode (``zero=True``: it starts at w = b = 0 and skips that init).
    """

    def __init__(self, channels: int, zero: bool = False) -> None:
        super().__init__()
        self.zero = zero
        self.weight = nn.Parameter(torch.zeros(1, channels, 1, 1) if zero else torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(zero))

    @torch.no_grad()
    def data_init(self, h: Tensor, init_scale: float = 1.0) -> None:
        mean, std = init_stats(h, (0, 2, 3), type(self).__name__)
        scale = inverse_std(std, init_scale)
        self.weight.copy_(scale.reshape(self.weight.shape))
        self.bias.copy_((-mean * scale).reshape(self.bias.shape))
        self.initialized.fill_(True)
        self._init_seen = True

    def forward(self, h: Tensor) -> Tensor:
        if self._needs_init():
            self.data_init(h)
        return h * self.weight + self.bias


class ConvNorm(InitFlag, nn.Module):
    """conv k×k (no bias) → per-channel affine → ELU if ``activation``: the official ``Conv2d``.

    Data-dependent init (first forward in training mode): the conv weight is divided per output
    channel by the std of this module's output with the affine still at (1, 0), then the affine
    is set to give zero mean and unit variance (times ``init_scale``; 0 for a block's last norm).
    """

    def __init__(self, cin: int, cout: int, kernel: int, activation: bool = False, init_scale: float = 1.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False)
        nn.init.kaiming_uniform_(self.conv.weight)
        self.norm = DataInitAffine(cout)
        self.norm.initialized.fill_(True)  # initialised here, with this module's init_scale
        self.activation = activation
        self.init_scale = float(init_scale)
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def data_init(self, x: Tensor) -> None:
        name = type(self).__name__
        out = self.conv(x)
        _, std = init_stats(F.elu(out) if self.activation else out, (0, 2, 3), name)
        self.conv.weight.mul_(inverse_std(std).view(-1, 1, 1, 1))
        self.norm.data_init(self.conv(x), self.init_scale)
        self.initialized.fill_(True)
        self._init_seen = True

    def forward(self, x: Tensor) -> Tensor:
        if self._needs_init():
            self.data_init(x)
        h = self.norm(self.conv(x))
        return F.elu(h) if self.activation else h


class ResidualBlock(nn.Module):
    """ELU(h + [conv3×3 + Norm + ELU → conv1×1 + Norm + ELU → conv3×3 + Norm(zero)](h))."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvNorm(hidden, hidden, 3, activation=True),
            ConvNorm(hidden, hidden, 1, activation=True),
            ConvNorm(hidden, hidden, 3, init_scale=0.0),
        )

    def forward(self, h: Tensor) -> Tensor:
        return F.elu(h + self.body(h))


class CouplingNet(nn.Module):
    """The paper's coupling net: conv3×3 + Norm + ELU, residual blocks, zero-initialised conv3×3 out.

    Args:
        in_channels: channels of x1.
        out_channels: what the coupling needs per pixel.
        hidden_channels: width (paper: 128; 132 for the affine model of Table 4).
        num_blocks: residual blocks (paper: 8; 10 for ImageNet 64×64).
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 128, num_blocks: int = 8) -> None:
        super().__init__()
        _check_width_depth(type(self).__name__, hidden_channels, num_blocks)
        self.stem = ConvNorm(in_channels, hidden_channels, 3, activation=True)
        self.blocks = nn.Sequential(*(ResidualBlock(hidden_channels) for _ in range(num_blocks)))
        self.head = nn.Conv2d(hidden_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(cast(Tensor, self.head.bias))  # a Conv2d built with a bias

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


# ----------------------------------------------------------------------------- Glow's net


def edge_pad(x: Tensor, pad: int) -> Tensor:
    """x zero-padded by ``pad`` pixels on each side, with one more channel that is 1 on the padding
    and 0 inside: Glow's ``add_edge_padding``, which lets a conv tell the image's border from a
    dark pixel."""
    if pad == 0:
        return x
    padded = F.pad(x, (pad, pad, pad, pad))
    border = torch.ones_like(padded[:, :1])
    border[:, :, pad:-pad, pad:-pad] = 0
    return torch.cat([padded, border], dim=1)


class GlowActNorm(InitFlag, nn.Module):
    """y = (x + b)·e^{3·logs} per channel: Glow's actnorm inside its net (``actnorm_center`` then
    ``actnorm_scale`` with ``logscale_factor=3``).

    Data-dependent init on the first forward in training mode: b = −mean and
    logs = log(1 / (√mean((x − mean)²) + 1e-6)) / 3 per channel (Glow's biased variance and eps).
    """

    LOGSCALE_FACTOR = 3.0
    EPS = 1e-6

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.logs = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(False))

    @torch.no_grad()
    def data_init(self, x: Tensor) -> None:
        mean, _ = init_stats(x, (0, 2, 3), type(self).__name__)
        centred = x - mean.view(1, -1, 1, 1)
        std = centred.square().mean(dim=(0, 2, 3)).sqrt()
        self.bias.copy_(-mean.view_as(self.bias))
        self.logs.copy_((torch.log(1 / (std + self.EPS)) / self.LOGSCALE_FACTOR).view_as(self.logs))
        self.initialized.fill_(True)
        self._init_seen = True

    def forward(self, x: Tensor) -> Tensor:
        if self._needs_init():
            self.data_init(x)
        return (x + self.bias) * torch.exp(self.logs * self.LOGSCALE_FACTOR)


class GlowConv(nn.Module):
    """ReLU(actnorm(conv k×k(x))): Glow's ``conv2d`` (no bias, weights N(0, 0.05²), edge padding
    for k > 1) followed by the ReLU of its net."""

    INIT_STD = 0.05

    def __init__(self, cin: int, cout: int, kernel: int, edge_bias: bool = True) -> None:
        super().__init__()
        self.pad = kernel // 2
        self.edge_bias = edge_bias and self.pad > 0
        extra = 1 if self.edge_bias else 0
        padding = 0 if self.edge_bias else self.pad
        self.conv = nn.Conv2d(cin + extra, cout, kernel, padding=padding, bias=False)
        nn.init.normal_(self.conv.weight, std=self.INIT_STD)
        self.norm = GlowActNorm(cout)

    def forward(self, x: Tensor) -> Tensor:
        if self.edge_bias:
            x = edge_pad(x, self.pad)
        return F.relu(self.norm(self.conv(x)))


class ZeroConv2d(nn.Conv2d):
    """(conv k×k(x) + b)·e^{3·logs}, weight, bias and logs initialised to zero: Glow's ``conv2d_zeros``
    (with its edge padding), the last layer of :class:`GlowNet`."""

    LOGSCALE_FACTOR = 3.0

    def __init__(self, cin: int, cout: int, kernel: int = 3, edge_bias: bool = True) -> None:
        self.pad = kernel // 2
        self.edge_bias = edge_bias and self.pad > 0
        extra = 1 if self.edge_bias else 0
        super().__init__(cin + extra, cout, kernel, padding=0 if self.edge_bias else self.pad)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(cast(Tensor, self.bias))
        self.logs = nn.Parameter(torch.zeros(1, cout, 1, 1))

    def forward(self, x: Tensor) -> Tensor:
        if self.edge_bias:
            x = edge_pad(x, self.pad)
        return super().forward(x) * torch.exp(self.logs * self.LOGSCALE_FACTOR)


class GlowNet(nn.Module):
    """Glow's coupling net: conv3×3 + actnorm + ReLU → conv1×1 + actnorm + ReLU → zero-init conv3×3.

    openai/glow's ``f``: ``relu(conv2d(h, width))``, ``relu(conv2d(h, width, [1, 1]))``,
    ``conv2d_zeros(h, n_out)``, each conv with Glow's actnorm instead of a bias and its edge
    padding (:func:`edge_pad`).

    Args:
        in_channels: channels of x1.
        out_channels: what the coupling needs per pixel.
        hidden_channels: width (Glow: 512).
        num_blocks: how many conv1×1 + actnorm + ReLU layers follow the first (Glow: 1).
        edge_bias: Glow's edge padding (default True); False pads with zeros only.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_channels: int = 512,
        num_blocks: int = 1,
        edge_bias: bool = True,
    ) -> None:
        super().__init__()
        _check_width_depth(type(self).__name__, hidden_channels, num_blocks)
        self.stem = GlowConv(in_channels, hidden_channels, 3, edge_bias)
        self.blocks = nn.Sequential(*(GlowConv(hidden_channels, hidden_channels, 1) for _ in range(num_blocks)))
        self.head = ZeroConv2d(hidden_channels, out_channels, 3, edge_bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


# ----------------------------------------------------------------------------- registry and protocol

NETS = Registry("conditioner net", {"resnet": CouplingNet, "glow": GlowNet})


def net_factory(name: str = "resnet", **options: Any) -> NetFactory:
    """The factory ``(in, out) -> NETS[name](in, out, **options)``, its options checked now.

    ``options`` are the net's keyword arguments: ``hidden_channels`` and ``num_blocks`` (every net
    takes them) and its own (``edge_bias`` for ``"glow"``). An unknown name, option or a value
    of the wrong type is a ValueError that names it.
    """
    cls = NETS.get_class(name)
    check_options(cls, options)
    return partial(cls, **options)


def output_layer(net: nn.Module) -> nn.Module:
    """The net's zero-initialised last layer, ``net.head`` (the net protocol).

    Raises ValueError naming the net's class when it has none: a net whose output cannot be found
    is an error, never skipped.
    """
    head = getattr(net, "head", None)
    if not isinstance(head, nn.Module) or not isinstance(getattr(head, "weight", None), nn.Parameter):
        raise ValueError(
            f"{type(net).__name__} has no recognisable output layer: a coupling's net must expose its last "
            "layer as `.head`, a module with a `weight` parameter, initialised to zero (e.g. "
            "self.head = nn.Conv2d(hidden, out, 3, padding=1), then nn.init.zeros_ on its weight and bias)"
        )
    return head


def perturb_output(
    module: nn.Module, std: float, generator: torch.Generator | None = None, *, fan_in: bool = False
) -> int:
    """Redraw the output layer's weight of every coupling's net in module from N(0, std²), so that
    the couplings are no longer the identity; returns how many were redrawn.

    With ``fan_in`` the std is std / √fan_in of each output layer (its weight's entries per output
    channel). The values are drawn on the generator's device (the CPU without one) and copied, so a
    seeded generator gives the same weights on every device. A coupling whose net has no
    recognisable output layer is a ValueError (:func:`output_layer`).
    """
    from .coupling import Coupling  # the couplings import this module

    count = 0
    for m in module.modules():
        if not isinstance(m, Coupling):
            continue
        weight = cast(Tensor, output_layer(m.net).weight)
        scale = std / math.sqrt(weight[0].numel()) if fan_in else std
        device = generator.device if generator is not None else torch.device("cpu")
        draw = torch.randn(weight.shape, generator=generator, dtype=weight.dtype, device=device)
        with torch.no_grad():
            weight.copy_(draw * scale)
        count += 1
    return count

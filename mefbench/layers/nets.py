"""Conditioner networks of the couplings: the paper's residual ConvNet, exactly as the official code.

A coupling takes its net from a factory ``net(in_channels, out_channels) -> nn.Module`` (FrEIA's
``subnet_constructor``, nflows' ``transform_net_create_fn``); :func:`coupling_net` makes the
default one, :class:`CouplingNet`. Its output conv is zero-initialised, so that every coupling
starts as the identity.

The official code (changyi7231/MEF, ``models/flows.py``: ``ConvBlock``, ``Block``, ``Conv2d``,
``Norm``), matched here:

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

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ConvNorm",
    "CouplingNet",
    "DataInitAffine",
    "InitFlag",
    "NetFactory",
    "ResidualBlock",
    "coupling_net",
    "init_stats",
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


class InitFlag:
    """Mixin for a module with data-dependent init and an ``initialized`` buffer (saved with it).

    The buffer is read back to the host only until it is seen set: a GPU read-back per norm per
    forward would stall the stream hundreds of times a step. Loading a state dict re-reads it.
    """

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
        if hidden_channels < 1 or num_blocks < 0:
            raise ValueError(
                f"CouplingNet needs hidden_channels >= 1 and num_blocks >= 0, got {hidden_channels} and {num_blocks}"
            )
        self.stem = ConvNorm(in_channels, hidden_channels, 3, activation=True)
        self.blocks = nn.Sequential(*(ResidualBlock(hidden_channels) for _ in range(num_blocks)))
        self.head = nn.Conv2d(hidden_channels, out_channels, 3, padding=1)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.blocks(self.stem(x)))


def coupling_net(hidden_channels: int = 128, num_blocks: int = 8) -> NetFactory:
    """The default conditioner factory: ``(in, out) -> CouplingNet(in, out, hidden_channels, num_blocks)``."""
    return partial(CouplingNet, hidden_channels=hidden_channels, num_blocks=num_blocks)

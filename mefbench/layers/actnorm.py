"""ActNorm: y = s ⊙ x + b with s = softplus(θ) > 0, initialised from the first batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Cost, FlowLayer, LayerInfo
from .checks import check_input
from .nets import InitFlag, init_stats, inverse_std

__all__ = ["ActNorm", "inverse_softplus"]


def inverse_softplus(s: Tensor) -> Tensor:
    """θ with softplus(θ) = s, for s > 0 (stable for small and large s)."""
    return s + torch.log(-torch.expm1(-s))


class ActNorm(InitFlag, FlowLayer):
    """y = s ⊙ x + b, s = softplus(θ); log|det| = Σ log s (× H·W when per channel).

    Args:
        channels: C.
        per: "channel" (Glow: s, b of shape C) or "activation" (the paper: shape C×H×W).
        size: (H, W), required when per="activation".

    The first forward in training mode sets s and b so that the batch has zero mean and unit
    variance per channel (or per activation), as the official code does: s = 1/(std + 1e-8) with
    torch's default (n − 1) std. The ``initialized`` buffer keeps that fact across save/load. A
    constant channel gets s = 1 instead of 1e8; a batch of one sample (per activation), an empty
    batch or non-finite values are a ValueError, and the layer stays uninitialised.
    """

    info = LayerInfo(
        family="elementwise",
        reference="Kingma & Dhariwal 2018 (Glow); per activation: Xiao & Liu 2020 (MEF)",
        cost=Cost("O(C·n)", "O(C) (O(C·n) per activation)", "O(C·n)"),
    )

    def __init__(self, channels: int, per: str = "channel", size: tuple[int, int] | None = None) -> None:
        super().__init__()
        if per not in ("channel", "activation"):
            raise ValueError(f"ActNorm per must be 'channel' or 'activation', got {per!r}")
        if per == "activation" and size is None:
            raise ValueError("ActNorm(per='activation') needs size=(H, W)")
        self.channels = channels
        self.per = per
        self.size = tuple(size) if size is not None else None
        shape = (1, channels, 1, 1) if per == "channel" or size is None else (1, channels, *size)
        self.theta = nn.Parameter(inverse_softplus(torch.ones(shape)))
        self.bias = nn.Parameter(torch.zeros(shape))
        self.register_buffer("initialized", torch.tensor(False))

    def _check(self, x: Tensor) -> None:
        check_input(x, self.channels, "ActNorm", self)
        if self.per == "activation" and tuple(x.shape[2:]) != self.size:
            raise ValueError(f"ActNorm was built for H×W = {self.size}, got {tuple(x.shape[2:])}")

    @torch.no_grad()
    def data_init(self, x: Tensor) -> None:
        dims = (0, 2, 3) if self.per == "channel" else (0,)
        mean, std = init_stats(x, dims, "ActNorm")
        scale = inverse_std(std)
        self.theta.copy_(inverse_softplus(scale).reshape(self.theta.shape))
        self.bias.copy_((-mean * scale).reshape(self.bias.shape))
        self.initialized.fill_(True)
        self._init_seen = True

    def _logdet(self, x: Tensor, log_s: Tensor) -> Tensor:
        per_sample = log_s.sum() * (x.shape[2] * x.shape[3] if self.per == "channel" else 1)
        return per_sample.expand(x.shape[0])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x)
        if self._needs_init():
            self.data_init(x)
        s = F.softplus(self.theta)
        return s * x + self.bias, self._logdet(x, torch.log(s))

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        self._check(y)
        s = F.softplus(self.theta)
        return (y - self.bias) / s, -self._logdet(y, torch.log(s))

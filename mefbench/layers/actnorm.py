"""ActNorm: y = s ⊙ x + b with s = softplus(θ) > 0, initialised from the first batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import FlowLayer, check_input

__all__ = ["ActNorm", "DataInitAffine", "inverse_softplus"]

_EPS = 1e-6


def inverse_softplus(s: Tensor) -> Tensor:
    """θ with softplus(θ) = s, for s > 0 (stable for small and large s)."""
    return s + torch.log(-torch.expm1(-s))


def _init_scale_bias(x: Tensor, dims: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """Scale and bias that give zero mean and unit variance over dims; constant entries get scale 1."""
    mean = x.mean(dim=dims)
    std = x.std(dim=dims, unbiased=False)
    scale = torch.where(std > _EPS, 1.0 / std.clamp_min(_EPS), torch.ones_like(std))
    return scale, -mean * scale


class ActNorm(FlowLayer):
    """y = s ⊙ x + b, s = softplus(θ); log|det| = Σ log s (× H·W when per channel).

    Args:
        channels: C.
        per: "channel" (Glow: s, b of shape C) or "activation" (the paper: shape C×H×W).
        size: (H, W), required when per="activation".

    The first forward in training mode sets s and b so that the batch has zero mean and unit
    variance per channel (or per activation); the ``initialized`` buffer keeps that fact across
    save/load. Constant channels get s = 1 instead of an infinite scale.
    """

    def __init__(self, channels: int, per: str = "channel", size: tuple[int, int] | None = None) -> None:
        super().__init__()
        if per not in ("channel", "activation"):
            raise ValueError(f"ActNorm per must be 'channel' or 'activation', got {per!r}")
        if per == "activation" and size is None:
            raise ValueError("ActNorm(per='activation') needs size=(H, W)")
        self.channels = channels
        self.per = per
        self.size = tuple(size) if size is not None else None
        shape = (1, channels, 1, 1) if per == "channel" else (1, channels, *self.size)
        self.theta = nn.Parameter(inverse_softplus(torch.ones(shape)))
        self.bias = nn.Parameter(torch.zeros(shape))
        self.register_buffer("initialized", torch.tensor(False))

    def _check(self, x: Tensor) -> None:
        check_input(x, self.channels, "ActNorm")
        if self.per == "activation" and tuple(x.shape[2:]) != self.size:
            raise ValueError(f"ActNorm was built for H×W = {self.size}, got {tuple(x.shape[2:])}")

    @torch.no_grad()
    def data_init(self, x: Tensor) -> None:
        dims = (0, 2, 3) if self.per == "channel" else (0,)
        scale, bias = _init_scale_bias(x, dims)
        self.theta.copy_(inverse_softplus(scale).reshape(self.theta.shape))
        self.bias.copy_(bias.reshape(self.bias.shape))
        self.initialized.fill_(True)

    def _logdet(self, x: Tensor, log_s: Tensor) -> Tensor:
        per_sample = log_s.sum() * (x.shape[2] * x.shape[3] if self.per == "channel" else 1)
        return per_sample.expand(x.shape[0])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        self._check(x)
        if not bool(self.initialized) and self.training:
            self.data_init(x)
        s = F.softplus(self.theta)
        return s * x + self.bias, self._logdet(x, torch.log(s))

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        self._check(y)
        s = F.softplus(self.theta)
        return (y - self.bias) / s, -self._logdet(y, torch.log(s))


class DataInitAffine(nn.Module):
    """Per-channel affine z = w ⊙ h + b inside coupling nets (not a flow layer: no log-det).

    Data-dependent init gives zero mean and unit variance on the init batch; with ``zero=True`` it
    starts at w = b = 0 and skips that init, so that a residual block starts as the identity.
    """

    def __init__(self, channels: int, zero: bool = False) -> None:
        super().__init__()
        self.zero = zero
        self.weight = nn.Parameter(torch.zeros(1, channels, 1, 1) if zero else torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))
        self.register_buffer("initialized", torch.tensor(zero))

    def forward(self, h: Tensor) -> Tensor:
        if not bool(self.initialized) and self.training:
            with torch.no_grad():
                scale, bias = _init_scale_bias(h, (0, 2, 3))
                self.weight.copy_(scale.reshape(self.weight.shape))
                self.bias.copy_(bias.reshape(self.bias.shape))
                self.initialized.fill_(True)
        return h * self.weight + self.bias

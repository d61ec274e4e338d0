"""The contract every flow layer keeps, and the checks that give bad input a clear error."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["FlowLayer", "FlowSequential", "check_input"]


def check_input(x: Tensor, channels: int | None, name: str) -> None:
    """Raise ValueError unless x is a 4-D (B, C, H, W) batch with C == channels."""
    if x.dim() != 4:
        raise ValueError(f"{name} expects 4-D input (B, C, H, W), got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(
            f"{name} was built for {channels} channels, got input with {x.shape[1]} (shape {tuple(x.shape)})"
        )


class FlowLayer(nn.Module):
    """An invertible map of a (B, C, H, W) batch.

    forward(x) -> (y, logdet) and inverse(y) -> (x, logdet), logdet of shape (B,): log|det ∂y/∂x|
    per sample for forward, and log|det ∂x/∂y| (the negative, at the matching point) for inverse.
    """

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:  # pragma: no cover - interface
        raise NotImplementedError


class FlowSequential(FlowLayer):
    """Layers applied in order; the log-dets add up. inverse runs them backwards."""

    def __init__(self, *layers: FlowLayer) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def __len__(self) -> int:
        return len(self.layers)

    def __getitem__(self, i: int) -> FlowLayer:
        return self.layers[i]

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        logdet = y.new_zeros(y.shape[0])
        for layer in reversed(self.layers):
            y, ld = layer.inverse(y)
            logdet = logdet + ld
        return y, logdet

"""Bookkeeping shared by the structured mixing layers: option checks with clear errors and the
eval-mode cache of values that only change with the parameters."""

from __future__ import annotations

from typing import Any, Literal, TypeGuard, cast, overload

import torch
from torch import Tensor

from .base import EvalCache

__all__ = [
    "EvalCache",
    "check_channels",
    "check_fits",
    "check_int",
    "check_kernel_size",
    "check_size",
    "flip",
]


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def check_channels(name: str, channels: object) -> int:
    if not _is_int(channels) or channels < 1:
        raise ValueError(f"{name} needs at least 1 channel, got {channels!r}")
    return channels


def check_int(name: str, option: str, value: object, minimum: int = 1) -> int:
    if not _is_int(value) or value < minimum:
        raise ValueError(f"{name} option {option} must be an integer >= {minimum}, got {value!r}")
    return value


def check_kernel_size(name: str, kernel_size: object) -> int:
    if not _is_int(kernel_size) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"{name} option kernel_size must be odd and >= 1, got {kernel_size!r}")
    return kernel_size


@overload
def check_size(name: str, size: object, required: Literal[True], why: str = "") -> tuple[int, int]: ...
@overload
def check_size(name: str, size: object, required: bool = False, why: str = "") -> tuple[int, int] | None: ...
def check_size(name: str, size: object, required: bool = False, why: str = "") -> tuple[int, int] | None:
    """``size`` as an (H, W) tuple of positive ints, or None where it may be left out."""
    if size is None:
        if required:
            raise ValueError(f"{name} needs size=(H, W) at construction{why}")
        return None
    try:
        h, w = cast(Any, size)  # any pair; anything else is reported below
    except (TypeError, ValueError):
        raise ValueError(f"{name} size must be (H, W), got {size!r}") from None
    if not (_is_int(h) and _is_int(w) and h >= 1 and w >= 1):
        raise ValueError(f"{name} size must be two positive integers (H, W), got {size!r}")
    return h, w


def check_fits(name: str, size: tuple[int, ...], kernel_size: int) -> None:
    """A k×k kernel's outermost taps are (k − 1)/2 pixels from its centre: with zero padding a tap
    that never reaches a pixel gets no gradient, and with wrap-around it lands on the centre tap's
    pixel again. Either way the kernel would be larger than the image can use."""
    h, w = size
    if (kernel_size - 1) // 2 >= min(h, w):
        raise ValueError(
            f"{name}: image {h}×{w} is too small for kernel_size {kernel_size}; "
            f"it takes kernel_size <= {2 * min(h, w) - 1} (taps at most min(H, W) − 1 pixels from the centre)"
        )


def flip(x: Tensor) -> Tensor:
    """x with its channels, rows and columns in reverse order (a (B, C, H, W) batch)."""
    return torch.flip(x, dims=(1, 2, 3))

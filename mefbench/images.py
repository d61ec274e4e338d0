"""Image grids for samples: model output in [−1, 1) -> 8-bit PNG."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["save_grid", "to_uint8"]


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Model space [−1, 1) -> 8-bit pixels: k = ⌊(x + 1)/2 · 256⌋, clipped to 0..255."""
    return ((x.detach().float().cpu() + 1) / 2 * 256).floor().clamp(0, 255).to(torch.uint8)


def save_grid(images: torch.Tensor, path: str | Path, nrow: int | None = None, pad: int = 1, scale: int = 1) -> Path:
    """Write (N, C, H, W) uint8 images (C = 1 or 3) as one PNG grid, nrow images per row."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"save_grid needs (N, 1 or 3, H, W) images, got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        images = to_uint8(images)
    n, c, h, w = images.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images.numpy()):
        r, col = divmod(i, nrow)
        y, x = pad + r * (h + pad), pad + col * (w + pad)
        grid[y : y + h, x : x + w] = img.transpose(1, 2, 0)
    picture = Image.fromarray(grid[..., 0] if c == 1 else grid)
    if scale > 1:
        picture = picture.resize((picture.width * scale, picture.height * scale), Image.Resampling.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path

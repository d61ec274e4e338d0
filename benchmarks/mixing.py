"""Every mixing layer of the zoo (``mefbench.layers.MIXING`` and each class's variants).

One layer at each of the paper's three levels (C=12 at 16×16, C=24 at 8×8, C=48 at 4×4),
batch 16, float32. The layer stays in training mode, so every call builds what it caches in eval
mode (W, the LU product or e^W and their inverses, a kernel's FFT, …): the cost of a training
step or of sampling without the eval-mode cache. forward, inverse and log-det run without
autograd; forward_backward differentiates ½∥y∥² − log|det| with respect to the parameters and
the input. ``time_logdet`` times the log-determinant alone where the layer computes it apart from
the map (``layer.logdet(size)``; a mixing layer's log-det does not depend on the input).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mefbench.layers import MIXING, FlowLayer, registry_variants
from mefbench.presets import variant_label

from ._common import BATCH, LEVELS, _LayerTimings, set_up_torch

__all__ = ["LAYERS", "MixingLayer", "MixingLogdet"]

# "name" or "name (variant)" -> (registry name, options)
LAYERS = {variant_label(name, variant): (name, options) for name, variant, options in registry_variants(MIXING)}


def _build(layer: str, level: str) -> tuple[FlowLayer, tuple[int, int, int]]:
    """The benchmark's layer at a level, after one thread, float32 and the seed are set."""
    set_up_torch()
    name, options = LAYERS[layer]
    c, h, w = LEVELS[level]
    return MIXING.build(name, c, size=(h, w), **options), (c, h, w)


class MixingLayer(_LayerTimings):
    params = [list(LAYERS), list(LEVELS)]
    param_names = ["layer", "level"]

    def setup(self, layer: str, level: str) -> None:
        self.layer, (c, h, w) = _build(layer, level)
        x = torch.randn(BATCH, c, h, w)
        with torch.no_grad():
            self.layer(x)  # data-dependent init where the layer has one
        self._prepare(x)

    def peakmem_forward_backward(self, layer: str, level: str) -> None:
        self.time_forward_backward(layer, level)


class MixingLogdet:
    """The log-determinant alone, for the layers that compute it apart from the map
    (``layer.logdet(size)``; skipped for the others)."""

    params = [list(LAYERS), list(LEVELS)]
    param_names = ["layer", "level"]
    logdet: Callable[[tuple[int, int]], torch.Tensor]

    def setup(self, layer: str, level: str) -> None:
        self.layer, (_, h, w) = _build(layer, level)
        logdet = getattr(self.layer, "logdet", None)
        if logdet is None:
            raise NotImplementedError(f"{layer} computes its log-det only together with the map")
        self.logdet, self.size = logdet, (h, w)

    def time_logdet(self, layer: str, level: str) -> None:
        with torch.no_grad():
            self.logdet(self.size)

"""Scaling of every mixing layer and coupling with channels C and pixels n = H·W: the asv twin of
``mefbench bench --scaling`` (:mod:`mefbench.scaling`).

The same calls at the same grid (C ∈ {12, 24, 48, 96, 192}, H = W ∈ {8, 16, 32, 64}, batch 8):
a mixing layer's forward+backward in training mode and its inverse; a coupling's transform given
the net's output and its inverse. One thread (the suite's setting). A point whose stated cost
times the batch exceeds ``mefbench.scaling.WORK_CAP`` is skipped (asv shows it as n/a), as is a
point where the layer cannot be built; ``asv publish`` then plots each layer's time over C and H.
"""

from __future__ import annotations

from mefbench.scaling import GRID, PARTS, WORK_CAP, expected_cost, layers, point_calls, stated_cost

from ._common import set_up_torch

__all__ = ["LAYERS", "Scaling"]

# "kind name" -> (kind, name, class)
LAYERS = {f"{kind} {name}": (kind, name, cls) for kind, name, cls in layers()}


class Scaling:
    params = [list(LAYERS), list(GRID.channels), list(GRID.sizes)]
    param_names = ["layer", "channels", "size"]
    timeout = 300

    def setup(self, layer: str, channels: int, size: int) -> None:
        kind, name, cls = LAYERS[layer]
        for part in PARTS:
            work = float(expected_cost(stated_cost(cls), part)(channels, size * size)) * GRID.batch
            if work > WORK_CAP:
                raise NotImplementedError(
                    f"{layer} {part} at C={channels}, {size}×{size}: stated cost × batch {work:.1e}"
                )
        set_up_torch()
        try:
            self.fwd_bwd, self.inv = point_calls(kind, name, channels, size, GRID.batch)
        except ValueError as exc:  # not buildable at this point
            raise NotImplementedError(str(exc)) from None
        self.fwd_bwd()  # one-time work (allocations, schedules) out of the timings
        self.inv()

    def time_forward_backward(self, layer: str, channels: int, size: int) -> None:
        self.fwd_bwd()

    def time_inverse(self, layer: str, channels: int, size: int) -> None:
        self.inv()

"""Every coupling of the zoo (``mefbench.layers.COUPLING`` and each class's variants), plus the
matrix-exponential coupling's low-rank form (rank 3).

One layer at each of the paper's three levels (C=12 at 16×16, C=24 at 8×8, C=48 at 4×4), the
coupling net with hidden 32 and 1 block (the CPU presets' net), batch 16, float32. After the
data-dependent init the zero-initialised output conv of the net is redrawn (N(0, (4/√fan_in)²)),
so that the coupling is not the identity and the matrices S use a good part of their bound
(∥S∥∞ ≲ 1), as they do during training. forward and inverse run without autograd;
forward_backward differentiates ½∥y∥² − log|det| with respect to the parameters and the input;
``time_net_forward_backward`` is the same for the net alone, so that the history shows the time a
coupling adds beyond its net.
"""

from __future__ import annotations

from typing import cast

import torch

from mefbench.layers import COUPLING, Coupling, MatrixExpCoupling, net_factory, perturb_output, registry_variants
from mefbench.presets import variant_label

from ._common import BATCH, LEVELS, _LayerTimings, backward, set_up_torch

__all__ = ["HIDDEN", "KINDS", "NUM_BLOCKS", "CouplingLayer", "make_coupling"]

HIDDEN = 32
NUM_BLOCKS = 1
LOW_RANK = "matexp (rank 3)"
# "name" or "name (variant)" -> (registry name, options)
_ZOO = {variant_label(name, variant): (name, options) for name, variant, options in registry_variants(COUPLING)}
KINDS = [*_ZOO, LOW_RANK]


def make_coupling(kind: str, channels: int, hidden: int = HIDDEN, num_blocks: int = NUM_BLOCKS) -> Coupling:
    """A coupling by benchmark name: a registry entry and variant, or the rank-3 matrix-exp form."""
    net = net_factory(hidden_channels=hidden, num_blocks=num_blocks)
    if kind == LOW_RANK:
        return MatrixExpCoupling(channels, net=net, rank=3)
    name, options = _ZOO[kind]
    return cast(Coupling, COUPLING.build(name, channels, net=net, **options))


class CouplingLayer(_LayerTimings):
    params = [KINDS, list(LEVELS)]
    param_names = ["coupling", "level"]
    layer: Coupling

    def setup(self, coupling: str, level: str) -> None:
        set_up_torch()
        c, h, w = LEVELS[level]
        self.layer = make_coupling(coupling, c)
        x = torch.randn(BATCH, c, h, w)
        with torch.no_grad():
            self.layer(x)  # data-dependent init of the net's norms
        perturb_output(self.layer, 4.0, fan_in=True)
        self._prepare(x)
        self.x1 = x[:, : self.layer.c1].clone()

    def time_net_forward_backward(self, coupling: str, level: str) -> None:
        h = self.layer.net(self.x1)
        backward(0.5 * h.square().sum(), self.layer)

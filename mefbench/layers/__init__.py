"""The layer zoo: every layer maps (B, C, H, W) -> (y, logdet) and back, registries by name.

Two registries, each name -> class, every class built as ``cls(channels, size=(H, W), **options)``
and carrying its :class:`LayerInfo` (family, log-det exactness, costs, reference):

- :data:`MIXING`: the invertible linear mixing layers, per-pixel (1×1) and spatial;
  :data:`CONV1X1` is the live view of its per-pixel entries.
- :data:`COUPLING`: the coupling layers.

Adding a layer is one class and one line in a registry below; the CLI, the presets that list
every layer, the asv grids, ``mefbench bench``, ``mefbench layers`` and the reports follow.
"""

from __future__ import annotations

from .actnorm import ActNorm, inverse_softplus
from .base import (
    FAMILIES,
    Cost,
    FlowLayer,
    FlowSequential,
    LayerInfo,
    Registry,
    RegistryView,
    canonical_options,
    check_input,
    check_options,
    option_defaults,
    option_names,
    set_amp,
    summary,
)
from .butterfly import ButterflyConv
from .conv1x1 import Conv1x1, MatrixExpConv1x1, PLUConv1x1, StandardConv1x1
from .convexp import ConvExp
from .coupling import AdditiveCoupling, AffineCoupling, Coupling, MatrixExpCoupling
from .emerging import EmergingConv
from .mixture import LogisticMixtureCoupling
from .nets import ConvNorm, CouplingNet, DataInitAffine, NetFactory, ResidualBlock, coupling_net
from .orthogonal import HouseholderConv1x1, QRConv1x1
from .periodic import PeriodicConv
from .reshape import SQUEEZE_ORDERS, Squeeze
from .scale_maps import SCALE_MAPS, BoundedTanh, ExpScale, HardClamp, SigmoidScale, SoftClamp, TanhScale
from .spline import SplineCoupling
from .woodbury import MEWoodburyConv, WoodburyConv

__all__ = [
    "CONV1X1",
    "COUPLING",
    "FAMILIES",
    "MIXING",
    "REGISTRIES",
    "SCALE_MAPS",
    "SQUEEZE_ORDERS",
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "BoundedTanh",
    "ButterflyConv",
    "Conv1x1",
    "ConvExp",
    "ConvNorm",
    "Cost",
    "Coupling",
    "CouplingNet",
    "DataInitAffine",
    "EmergingConv",
    "ExpScale",
    "FlowLayer",
    "FlowSequential",
    "HardClamp",
    "HouseholderConv1x1",
    "LayerInfo",
    "LogisticMixtureCoupling",
    "MEWoodburyConv",
    "MatrixExpConv1x1",
    "MatrixExpCoupling",
    "NetFactory",
    "PLUConv1x1",
    "PeriodicConv",
    "QRConv1x1",
    "Registry",
    "RegistryView",
    "ResidualBlock",
    "SigmoidScale",
    "SoftClamp",
    "SplineCoupling",
    "Squeeze",
    "StandardConv1x1",
    "TanhScale",
    "WoodburyConv",
    "canonical_options",
    "check_input",
    "check_options",
    "coupling_net",
    "inverse_softplus",
    "option_defaults",
    "option_names",
    "set_amp",
    "summary",
]

MIXING = Registry(
    "mixing layer",
    {
        "standard": StandardConv1x1,
        "plu": PLUConv1x1,
        "matexp": MatrixExpConv1x1,
        "qr": QRConv1x1,
        "householder": HouseholderConv1x1,
        "woodbury": WoodburyConv,
        "me-woodbury": MEWoodburyConv,
        "emerging": EmergingConv,
        "periodic": PeriodicConv,
        "convexp": ConvExp,
        "butterfly": ButterflyConv,
    },
)

COUPLING = Registry(
    "coupling",
    {
        "additive": AdditiveCoupling,
        "affine": AffineCoupling,
        "matexp": MatrixExpCoupling,
        "spline": SplineCoupling,
        "mixture": LogisticMixtureCoupling,
    },
)

CONV1X1 = RegistryView(MIXING, "per-pixel")

REGISTRIES: dict[str, Registry] = {"mixing": MIXING, "coupling": COUPLING}

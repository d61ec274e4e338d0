"""The layer zoo: every layer maps (B, C, H, W) -> (y, logdet) and back, registries by name.

Three registries, each name -> class:

- :data:`MIXING`: the invertible linear mixing layers, per-pixel (1×1) and spatial, each built as
  ``cls(channels, size=(H, W), **options)``; :data:`CONV1X1` is the live view of its per-pixel
  entries.
- :data:`COUPLING`: the coupling layers, built the same way; their conditioner comes from the
  ``net`` option, a factory (:func:`net_factory`).
- :data:`NETS`: the couplings' conditioner nets (the paper's residual net, Glow's ConvNet).

Each layer class carries a :class:`LayerInfo` (family, log-det exactness, inverse, costs,
reference) and may name ``variants`` (:func:`layer_variants`). :mod:`mefbench.layers.checks` holds
the checks every layer makes (input, options, values) and the eval cache. Adding a layer is one
class and one line in a registry below; the CLI, the presets that list every layer, the asv grids,
``mefbench bench``, ``mefbench layers`` and the reports follow.
"""

from __future__ import annotations

from . import checks
from .actnorm import ActNorm
from .base import (
    FAMILIES,
    INVERSES,
    LOGDETS,
    Cost,
    FlowLayer,
    FlowSequential,
    LayerInfo,
    Registry,
    RegistryView,
    canonical_options,
    layer_variants,
    registry_variants,
    set_amp,
    summary,
)
from .butterfly import ButterflyConv
from .checks import EvalCache, check_input, check_options, option_defaults, option_names
from .conv1x1 import Conv1x1, MatrixExpConv1x1, PLUConv1x1, StandardConv1x1
from .convexp import ConvExp
from .coupling import AdditiveCoupling, AffineCoupling, Coupling, MatrixExpCoupling
from .emerging import EmergingConv
from .mixture import LogisticMixtureCoupling
from .nets import NETS, CouplingNet, GlowNet, NetFactory, net_factory, output_layer, perturb_output
from .orthogonal import HouseholderConv1x1, QRConv1x1
from .periodic import PeriodicConv
from .reshape import SQUEEZE_ORDERS, Squeeze
from .scale_maps import SCALE_MAPS
from .spline import SplineCoupling
from .woodbury import MEWoodburyConv, WoodburyConv

__all__ = [
    "CONV1X1",
    "COUPLING",
    "FAMILIES",
    "INVERSES",
    "LOGDETS",
    "MIXING",
    "NETS",
    "REGISTRIES",
    "SCALE_MAPS",
    "SQUEEZE_ORDERS",
    "ActNorm",
    "AdditiveCoupling",
    "AffineCoupling",
    "ButterflyConv",
    "Conv1x1",
    "ConvExp",
    "Cost",
    "Coupling",
    "CouplingNet",
    "EmergingConv",
    "EvalCache",
    "FlowLayer",
    "FlowSequential",
    "GlowNet",
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
    "SplineCoupling",
    "Squeeze",
    "StandardConv1x1",
    "WoodburyConv",
    "canonical_options",
    "check_input",
    "check_options",
    "checks",
    "layer_variants",
    "net_factory",
    "option_defaults",
    "option_names",
    "output_layer",
    "perturb_output",
    "registry_variants",
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

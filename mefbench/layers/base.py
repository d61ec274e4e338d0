"""The contract every flow layer keeps, its metadata, and the registries that name the layers.

Construction contract of a registry entry (:data:`mefbench.layers.MIXING`, :data:`COUPLING`)::

    layer = cls(channels, size=(H, W), **options)

``size`` is the spatial size of the input (layers that do not need it ignore it) and ``options``
are the layer's own keyword arguments, validated by the layer (an unknown name or a bad value is a
ValueError that names the layer and the option; :mod:`mefbench.layers.checks` holds the checks).
Every class carries a :class:`LayerInfo` as its ``info`` class attribute: family, log-det
exactness, inverse, costs and reference, for ``mefbench layers`` and the reports; and may name
option sets worth comparing in ``variants`` (:func:`layer_variants` reads them).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import ClassVar, cast

import torch
from torch import Tensor, nn

from .checks import check_options, option_defaults

__all__ = [
    "FAMILIES",
    "INVERSES",
    "LOGDETS",
    "Cost",
    "FlowLayer",
    "FlowSequential",
    "LayerInfo",
    "Registry",
    "RegistryView",
    "canonical_options",
    "flip",
    "layer_variants",
    "registry_variants",
    "set_amp",
    "summary",
]

FAMILIES = ("per-pixel", "spatial", "coupling", "elementwise", "reshape")
LOGDETS = ("exact", "truncated")
INVERSES = ("closed form", "solve", "series", "iterative", "sequential")


@dataclass(frozen=True)
class Cost:
    """Costs in O-notation per sample: C channels, n = H·W pixels, k kernel size, etc.

    Machine-readable for the scaling fit (:mod:`mefbench.scaling`): each cost is read as the
    argument of its first ``O(…)`` (a coupling's ``net + `` and any remark after it are left out;
    a trailing ``, X = …`` defines X), written with ``·``, ``²``, ``³``, ``log n`` and the symbols
    C, n, c = C/2, H = W = √n and the constants of :data:`mefbench.scaling.SYMBOLS`. ``symbols``
    gives the layer's own other symbols as expressions in C and n (``{"K": "C"}``: K grows with C).
    """

    forward: str
    logdet: str
    inverse: str
    symbols: Mapping[str, str] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        for name in ("forward", "logdet", "inverse"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value.strip():
                raise ValueError(f"Cost.{name} must be a non-empty string such as 'O(C·n)', got {value!r}")


@dataclass(frozen=True)
class LayerInfo:
    """What a report and ``mefbench layers`` say about a layer class.

    Args:
        family: one of :data:`FAMILIES` ("per-pixel" mixes channels at each pixel, "spatial" mixes
            pixels too, "coupling" conditions half the channels on the other half).
        reference: the paper the layer comes from ("Kingma & Dhariwal 2018 (Glow)").
        cost: forward, log-det and inverse costs.
        logdet: one of :data:`LOGDETS`: "exact", or "truncated" where the log-det itself is a
            truncated series.
        inverse: one of :data:`INVERSES`, how the inverse is computed: "closed form", "solve",
            "series" (a truncated series whose length follows from a norm bound), "iterative"
            (bisection/Newton with a convergence check) or "sequential" (back-substitution).

    Every field is checked on construction: a wrong value is a ValueError naming the field.
    """

    family: str
    reference: str
    cost: Cost
    logdet: str = "exact"
    inverse: str = "closed form"

    def __post_init__(self) -> None:
        for name, allowed in (("family", FAMILIES), ("logdet", LOGDETS), ("inverse", INVERSES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"LayerInfo.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.reference, str) or not self.reference.strip():
            raise ValueError(f"LayerInfo.reference must name the paper the layer comes from, got {self.reference!r}")
        if not isinstance(self.cost, Cost):
            raise ValueError(f"LayerInfo.cost must be a Cost(forward, logdet, inverse), got {self.cost!r}")


def summary(cls: type) -> str:
    """The first line of a class's docstring: its one-line maths."""
    doc = inspect.getdoc(cls) or ""
    return doc.strip().splitlines()[0] if doc.strip() else cls.__name__


def canonical_options(cls: type, options: Mapping[str, object]) -> dict:
    """options without the entries that equal the class's defaults: one spelling per configuration
    (so that {"scale": "tanh"} and {} are the same run to a sweep)."""
    defaults = option_defaults(cls)
    return {
        k: v for k, v in options.items() if not (k in defaults and defaults[k] == v and type(defaults[k]) is type(v))
    }


def layer_variants(cls: type) -> dict[str, dict]:
    """The option sets of a layer class that the contract tests, the zoo tables and the benchmarks
    run: label -> options.

    The class's ``variants`` in their order, and the defaults as ``"default"`` first unless one of
    the variants already is the defaults (its options equal to the constructor's defaults, as
    AffineCoupling's ``"tanh"``): every class gets its default configuration exactly once.
    """
    variants = getattr(cls, "variants", None) or {}
    if not isinstance(variants, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Mapping) for k, v in variants.items()
    ):
        raise ValueError(f"{cls.__name__}.variants must be a dict of label -> options dict, got {variants!r}")
    rows = {label: dict(options) for label, options in variants.items()}
    if "default" in rows and canonical_options(cls, rows["default"]):
        raise ValueError(
            f"{cls.__name__}.variants: the label 'default' is kept for the defaults, got {rows['default']}"
        )
    if not any(not canonical_options(cls, options) for options in rows.values()):
        rows = {"default": {}, **rows}
    return rows


def registry_variants(registry: Mapping[str, type]) -> list[tuple[str, str, dict]]:
    """(name, variant label, options) for every entry of a registry and each of its
    :func:`layer_variants`: the rows of the zoo tables, presets, sweeps, asv grids and bench."""
    return [(name, label, options) for name, cls in registry.items() for label, options in layer_variants(cls).items()]


def flip(x: Tensor) -> Tensor:
    """x with its channels, rows and columns in reverse order (a (B, C, H, W) batch)."""
    return torch.flip(x, dims=(1, 2, 3))


class FlowLayer(nn.Module):
    """An invertible map of a (B, C, H, W) batch.

    forward(x) -> (y, logdet) and inverse(y) -> (x, logdet), logdet of shape (B,): log|det ∂y/∂x|
    per sample for forward, and log|det ∂x/∂y| (the negative, at the matching point) for inverse.
    """

    info: ClassVar[LayerInfo | None] = None
    # named option sets worth comparing (label -> options): the contract tests run each, and the
    # zoo tables and benchmarks compare them side by side, with the defaults (layer_variants)
    variants: ClassVar[dict[str, dict]] = {}

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
        return cast(FlowLayer, self.layers[i])

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logdet = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, ld = layer(x)
            logdet = logdet + ld
        return x, logdet

    def inverse(self, y: Tensor) -> tuple[Tensor, Tensor]:
        logdet = y.new_zeros(y.shape[0])
        for i in reversed(range(len(self))):
            y, ld = self[i].inverse(y)
            logdet = logdet + ld
        return y, logdet


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def set_amp(module: nn.Module, amp: str | None) -> None:
    """Run the conditioner nets of every coupling in module under torch.autocast (``"bf16"`` or
    ``"fp16"``), or in full precision (None). Only the nets: every flow layer's own maths, its
    log-det and the model's loss stay in the parameters' precision."""
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f"amp must be None or one of {list(AMP_DTYPES)}, got {amp!r}")
    dtype = AMP_DTYPES[amp] if amp is not None else None
    for m in module.modules():
        if hasattr(m, "amp_dtype"):
            m.amp_dtype = dtype  # type: ignore[assignment]  # a Module takes any attribute; its stubs say Tensor | Module


class Registry(dict):
    """Layer name -> class. A plain dict (``REGISTRY["name"] = Class`` adds a layer) whose
    :meth:`build` gives every unknown name, unknown option and bad value a clear error."""

    def __init__(self, kind: str, entries: Mapping[str, type] | Iterable[tuple[str, type]] = ()) -> None:
        super().__init__(entries)
        self.kind = kind

    def get_class(self, name: str) -> type:
        if name not in self:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {', '.join(self)}")
        return self[name]

    def build(self, name: str, channels: int, *, size: tuple[int, int] | None = None, **options) -> FlowLayer:
        """``cls(channels, size=size, **options)`` after checking the name and the option names."""
        cls = self.get_class(name)
        check_options(cls, options)
        return cls(channels, size=size, **options)


class RegistryView(Mapping):
    """A live, read-only view of the entries of a registry whose class info has a given family."""

    def __init__(self, registry: Registry, family: str) -> None:
        self._registry = registry
        self._family = family

    def _names(self) -> list[str]:
        return [n for n, c in self._registry.items() if getattr(c.info, "family", None) == self._family]

    def __getitem__(self, name: str) -> type:
        if name not in self._names():
            raise KeyError(name)
        return self._registry[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self._family!r}: {self._names()})"

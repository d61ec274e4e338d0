"""The contract every flow layer keeps, its metadata, and the checks that give bad input a clear error.

Construction contract of a registry entry (:data:`mefbench.layers.MIXING`, :data:`COUPLING`)::

    layer = cls(channels, size=(H, W), **options)

``size`` is the spatial size of the input (layers that do not need it ignore it) and ``options``
are the layer's own keyword arguments, validated by the layer (an unknown name or a bad value is a
ValueError that names the layer and the option). Every class carries a :class:`LayerInfo` as its
``info`` class attribute: family, log-det exactness, costs and reference, for ``mefbench layers``
and the reports.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

__all__ = [
    "FAMILIES",
    "Cost",
    "EvalCache",
    "FlowLayer",
    "FlowSequential",
    "LayerInfo",
    "Registry",
    "RegistryView",
    "canonical_options",
    "check_input",
    "check_options",
    "option_defaults",
    "option_names",
    "set_amp",
    "summary",
]

FAMILIES = ("per-pixel", "spatial", "coupling", "elementwise", "reshape")

# dtypes a layer can compute in: the log-dets need slogdet / triangular solves / series that torch
# does not offer in half precision, so a half-precision input is refused with a clear message
_FLOAT_DTYPES = (torch.float32, torch.float64)


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


@dataclass(frozen=True)
class LayerInfo:
    """What a report and ``mefbench layers`` say about a layer class.

    Args:
        family: one of :data:`FAMILIES` ("per-pixel" mixes channels at each pixel, "spatial" mixes
            pixels too, "coupling" conditions half the channels on the other half).
        reference: the paper the layer comes from ("Kingma & Dhariwal 2018 (Glow)").
        cost: forward, log-det and inverse costs.
        logdet: "exact", or "truncated" where the log-det itself is a truncated series.
        inverse: how the inverse is computed: "closed form", "solve", "series" (a truncated
            series whose length follows from a norm bound), "iterative" (bisection/Newton with a
            convergence check) or "sequential" (back-substitution).
    """

    family: str
    reference: str
    cost: Cost
    logdet: str = "exact"
    inverse: str = "closed form"

    def __post_init__(self) -> None:
        if self.family not in FAMILIES:
            raise ValueError(f"LayerInfo.family must be one of {FAMILIES}, got {self.family!r}")
        if self.logdet not in ("exact", "truncated"):
            raise ValueError(f"LayerInfo.logdet must be 'exact' or 'truncated', got {self.logdet!r}")


def summary(cls: type) -> str:
    """The first line of a class's docstring: its one-line maths."""
    doc = inspect.getdoc(cls) or ""
    return doc.strip().splitlines()[0] if doc.strip() else cls.__name__


def check_input(x: Tensor, channels: int | None, name: str, module: nn.Module | None = None) -> None:
    """Raise ValueError unless x is a floating (B, C, H, W) batch with C == channels (and, if a
    module is given, of its parameters' dtype: no silent promotion)."""
    if x.dim() != 4:
        raise ValueError(f"{name} expects 4-D input (B, C, H, W), got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(
            f"{name} was built for {channels} channels, got input with {x.shape[1]} (shape {tuple(x.shape)})"
        )
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(
            f"{name} computes in float32 or float64, got {x.dtype} input; for mixed precision use "
            "torch.autocast (the layers keep their log-dets in float32), or convert with .float()"
        )
    if module is not None:
        param = next(module.parameters(), None)
        if param is not None and param.dtype != x.dtype:
            raise ValueError(
                f"{name} has {param.dtype} parameters but got {x.dtype} input; convert one of them "
                f"(layer.to({x.dtype}) or x.to({param.dtype}))"
            )


def option_names(cls: type) -> tuple[str, ...]:
    """The keyword options a layer class takes: its constructor's parameters after ``channels``
    and ``size``, collected along the class hierarchy where a constructor passes ``**kwargs`` on."""
    names: list[str] = []
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]  # drop self
        passes_on = False
        for p in params:
            if p.kind is p.VAR_KEYWORD:
                passes_on = True
            elif p.kind is not p.VAR_POSITIONAL and p.name not in ("channels", "size") and p.name not in names:
                names.append(p.name)
        if not passes_on:
            break
    return tuple(names)


def option_defaults(cls: type) -> dict[str, object]:
    """The default value of each option of a layer class that has one."""
    defaults: dict[str, object] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]
        for p in params:
            if p.default is not p.empty and p.name not in defaults:
                defaults[p.name] = p.default
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return defaults


def canonical_options(cls: type, options: Mapping[str, object]) -> dict:
    """options without the entries that equal the class's defaults: one spelling per configuration
    (so that {"scale": "tanh"} and {} are the same run to a sweep)."""
    defaults = option_defaults(cls)
    return {
        k: v for k, v in options.items() if not (k in defaults and defaults[k] == v and type(defaults[k]) is type(v))
    }


def check_options(cls: type, options: Mapping[str, object]) -> None:
    """Raise ValueError naming the layer and the option if ``options`` has a name ``cls`` does not take."""
    if not isinstance(options, Mapping):
        raise ValueError(f"{cls.__name__} options must be a dict of name -> value, got {type(options).__name__}")
    known = option_names(cls)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"{cls.__name__} has no option {', '.join(map(repr, unknown))}; its options: {', '.join(known) or 'none'}"
        )


class FlowLayer(nn.Module):
    """An invertible map of a (B, C, H, W) batch.

    forward(x) -> (y, logdet) and inverse(y) -> (x, logdet), logdet of shape (B,): log|det ∂y/∂x|
    per sample for forward, and log|det ∂x/∂y| (the negative, at the matching point) for inverse.
    """

    info: ClassVar[LayerInfo | None] = None
    # named option sets worth comparing (label -> options): the contract tests run each, and the
    # zoo tables and benchmarks compare them side by side; empty = the defaults only
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
            m.amp_dtype = dtype


class EvalCache:
    """Values built from the parameters (inverse matrices, a kernel's spectrum), kept in eval mode.

    Nothing is kept in training mode or while autograd records (the values must then carry
    gradients). In eval mode a value is rebuilt when any parameter's storage, version counter
    (moved by every in-place change), dtype or device differs from when it was built, or when the
    extra key (an image size) does. Used by every layer with such values (``Conv1x1``, the spatial layers).
    Inside ``torch.compile`` nothing is kept either: the values are built in the graph, which
    cannot read version counters or storage addresses.
    """

    def __init__(self) -> None:
        self._entries: dict[str, tuple[tuple, Any]] = {}

    def get(self, module: nn.Module, name: str, build: Callable[[], Any], *extra: object) -> Any:
        if module.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            self._entries.clear()
            return build()
        key = (tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in module.parameters()), extra)
        hit = self._entries.get(name)
        if hit is None or hit[0] != key:
            hit = self._entries[name] = (key, build())
        return hit[1]


class Registry(dict):
    """Layer name -> class. A plain dict (``REGISTRY["name"] = Class`` adds a layer) whose
    :meth:`build` gives every unknown name, unknown option and bad value a clear error."""

    def __init__(self, kind: str, entries: Mapping[str, type] = ()) -> None:
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

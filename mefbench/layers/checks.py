"""What a layer checks, in one place: its input, its options and their types, and the eval cache.

Every layer of the zoo uses these, so that bad input and bad options give the same clear errors
everywhere (each names the layer, what it expected and what it got):

- :func:`check_input` at the top of ``forward`` and ``inverse``: a floating (B, C, H, W) batch
  with the layer's C, of its parameters' dtype;
- :func:`check_options` (called by ``Registry.build`` and ``FlowConfig``): every option name is
  one the layer's constructor takes, every value has the type its annotation says
  (:func:`option_types`);
- :func:`check_channels`, :func:`check_int`, :func:`check_kernel_size`, :func:`check_size`,
  :func:`check_fits`: the values a constructor validates most often;
- :class:`EvalCache`: values built from the parameters (an inverse, a spectrum) kept in eval mode,
  rebuilt when a parameter changes.

A layer's options are the keyword parameters of its constructor after ``channels`` and ``size``
(a conditioner net's: after ``in_channels`` and ``out_channels``; :func:`option_names`), collected along the class hierarchy where a constructor passes
``**kwargs`` on to its base (as every coupling passes ``size`` and ``net`` to ``Coupling``).
"""

from __future__ import annotations

import collections.abc
import inspect
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal, TypeGuard, cast, overload

import torch
from torch import Tensor, nn

__all__ = [
    "EvalCache",
    "check_channels",
    "check_fits",
    "check_input",
    "check_int",
    "check_kernel_size",
    "check_options",
    "check_size",
    "check_value",
    "option_defaults",
    "option_names",
    "option_types",
]

# dtypes a layer can compute in: the log-dets need slogdet / triangular solves / series that torch
# does not offer in half precision, so a half-precision input is refused with a clear message
_FLOAT_DTYPES = (torch.float32, torch.float64)
# constructor parameters that are the construction contract, not options: a layer's channels and
# size, a conditioner net's in_channels and out_channels
_CONTRACT = ("channels", "size", "in_channels", "out_channels")


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


# ----------------------------------------------------------------------------- input


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


# ----------------------------------------------------------------------------- options


def _constructors(cls: type) -> Iterator[list[inspect.Parameter]]:
    """The parameters (after self) of each constructor along the MRO that ``cls(...)`` reaches:
    the next one is reached only where a constructor passes ``**kwargs`` on."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]  # drop self
        yield params
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            return


def option_names(cls: type) -> tuple[str, ...]:
    """The keyword options a layer class takes: its constructor's parameters after ``channels``
    and ``size``, collected along the class hierarchy where a constructor passes ``**kwargs`` on."""
    names: list[str] = []
    for params in _constructors(cls):
        for p in params:
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in _CONTRACT and p.name not in names:
                names.append(p.name)
    return tuple(names)


def option_defaults(cls: type) -> dict[str, object]:
    """The default value of each option of a layer class that has one."""
    defaults: dict[str, object] = {}
    for params in _constructors(cls):
        for p in params:
            if p.default is not p.empty and p.name not in defaults and p.name not in _CONTRACT:
                defaults[p.name] = p.default
    return defaults


def option_types(cls: type) -> dict[str, Any]:
    """Option name -> the type its constructor annotates (``Any`` where it has none), read with
    :func:`typing.get_type_hints` along the same constructors as :func:`option_names`."""
    types_: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        hints = typing.get_type_hints(init)
        params = list(inspect.signature(init).parameters.values())[1:]
        for p in params:
            if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL) and p.name not in _CONTRACT:
                types_.setdefault(p.name, hints.get(p.name, Any))
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return types_


_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", type(None): "None"}


def _type_name(tp: Any) -> str:
    """An annotation as an error message says it: "an integer or None", "(an integer, an integer)"."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp in _NAMES:
        return _NAMES[tp]
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return "one of " + ", ".join(map(repr, args))
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a sequence of {_type_name(args[0])}"
        return "(" + ", ".join(_type_name(a) for a in args) + ")"
    if origin in (list, collections.abc.Sequence):
        return f"a list of {_type_name(args[0])}" if args else "a list"
    if origin in (dict, collections.abc.Mapping):
        return "a dict"
    if origin is collections.abc.Callable or tp is collections.abc.Callable:
        return "a callable"
    return getattr(tp, "__name__", repr(tp))


def check_value(tp: Any, value: object) -> bool | None:
    """Whether value has type tp: True or False, or None where tp is not one this check reads.

    Reads what layer options are annotated with: ``int`` (not a bool), ``float`` (an int or a
    float, not a bool), ``bool``, ``str``, ``None``, unions, ``Literal``, ``tuple[...]`` (a tuple or
    a list, as JSON gives it), ``list``, ``dict``, ``Callable`` and plain classes; ``Any`` takes
    anything.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return True
    if tp is type(None) or tp is None:
        return value is None
    if origin in (typing.Union, types.UnionType):
        results = [check_value(a, value) for a in args]
        if any(results):
            return True
        return None if None in results else False
    if origin is typing.Literal:
        return value in args
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return _is_int(value)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin is tuple or tp is tuple:
        if not isinstance(value, (tuple, list)):
            return False
        if not args:
            return True
        if len(args) == 2 and args[1] is Ellipsis:
            results = [check_value(args[0], v) for v in value]
        elif len(args) != len(value):
            return False
        else:
            results = [check_value(a, v) for a, v in zip(args, value, strict=True)]
        return None if None in results else all(results)
    if origin in (list, collections.abc.Sequence) or tp is list:
        return isinstance(value, (list, tuple))
    if origin in (dict, collections.abc.Mapping) or tp is dict:
        return isinstance(value, Mapping)
    if origin is collections.abc.Callable or tp is collections.abc.Callable:
        return callable(value)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return None


def check_options(cls: type, options: Mapping[str, object]) -> None:
    """Raise ValueError naming the layer and the option if ``options`` has a name ``cls`` does not
    take, or a value whose type is not the one the constructor annotates for it."""
    if not isinstance(options, Mapping):
        raise ValueError(f"{cls.__name__} options must be a dict of name -> value, got {type(options).__name__}")
    known = option_names(cls)
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(
            f"{cls.__name__} has no option {', '.join(map(repr, unknown))}; its options: {', '.join(known) or 'none'}"
        )
    annotated = option_types(cls)
    for name, value in options.items():
        if check_value(annotated[name], value) is False:
            raise ValueError(
                f"{cls.__name__} option {name} must be {_type_name(annotated[name])}, "
                f"got {value!r} ({type(value).__name__})"
            )


# ----------------------------------------------------------------------------- values


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


# ----------------------------------------------------------------------------- the eval cache


class EvalCache:
    """Values built from the parameters (inverse matrices, a kernel's spectrum), kept in eval mode.

    Nothing is kept in training mode or while autograd records (the values must then carry
    gradients). In eval mode a value is rebuilt when any parameter's storage, version counter
    (moved by every in-place change), dtype or device differs from when it was built, or when the
    extra key (an image size) does. Inside ``torch.compile`` nothing is kept either: the values
    are built in the graph, which cannot read version counters or storage addresses. Used by
    every layer with such values (``Conv1x1``, the spatial layers)::

        self._cache = EvalCache()                                  # in __init__
        W_inv = self._cache.get(self, "inverse", lambda: torch.linalg.inv(W))   # in forward
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

"""mefbench: a layer zoo, flow harness and benchmark suite for invertible layers in generative flows.

``import mefbench`` gives the layer zoo (:mod:`mefbench.layers`), the matrix exponentials
(:mod:`mefbench.linalg`), the multi-scale model (:class:`MultiScaleFlow`) and its configuration
(:class:`FlowConfig`). They are imported on first use, so that ``import mefbench`` (and the
``mefbench`` command's start) does not pay for torch until something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__all__ = ["FlowConfig", "MultiScaleFlow", "__version__", "layers", "linalg"]

__version__ = "0.1.0"

# public name -> (module, attribute); None: the module itself
_LAZY: dict[str, tuple[str, str | None]] = {
    "layers": ("mefbench.layers", None),
    "linalg": ("mefbench.linalg", None),
    "FlowConfig": ("mefbench.config", "FlowConfig"),
    "MultiScaleFlow": ("mefbench.models", "MultiScaleFlow"),
}

if TYPE_CHECKING:
    from . import layers, linalg
    from .config import FlowConfig
    from .models import MultiScaleFlow


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attribute = _LAZY[name]
    value = importlib.import_module(module)
    if attribute is not None:
        value = getattr(value, attribute)
    globals()[name] = value  # the next access is a plain lookup
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))

"""Parameter matching: the coupling nets' width that gives a model a parameter budget.

Comparing couplings fairly means comparing models of (nearly) the same size: the paper gives its
affine model hidden 132 so that it has MEF's 37.7M parameters at hidden 128. Here the width is
chosen, not typed:

- :func:`parameter_count` counts a :class:`~mefbench.config.FlowConfig`'s parameters at any
  ``hidden_channels`` without building the whole model there: only the couplings' nets depend on
  the width, so the count is the model's at width 1 with its couplings' counts at the width
  asked for. A coupling's count (its registry name and options, the config's conditioner net
  and depth; a step may hold several couplings) is a quadratic in the width for the paper's net
  (convs of width × width); it is read off builds at widths 1–3, checked at width 4, and a net
  whose count is not quadratic is built at every width asked for instead (cached).
- :func:`match_hidden_channels` gives the config the width whose count is nearest a budget
  (the count grows with the width, so a bisection finds it).
- :func:`match_widths` matches several couplings to a reference coupling. Integer widths step
  the count by about 2/width of the nets' share (±3% at width 32), so a budget within 1% of
  every row may not exist at the reference's nominal width; the reference's own width is then
  moved, nearest first, to the closest width at which every row lands within the tolerance (or,
  if none does, to the closest overall: the report shows each row's count and ratio).

Only ``hidden_channels`` is changed: the depth, the levels and every option stay the config's.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass

import torch

from .config import FlowConfig

__all__ = ["Match", "match_hidden_channels", "match_widths", "parameter_count"]


def _key(config: FlowConfig) -> str:
    return json.dumps(dataclasses.replace(config, hidden_channels=1).to_dict(), sort_keys=True)


def _float32_build(make):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float32)  # the count does not depend on it; float64 init is slower
    try:
        return make()
    finally:
        torch.set_default_dtype(previous)


def _coupling_specs(config: FlowConfig) -> list[tuple[str, str]]:
    """(registry name, options as JSON) of each coupling of a flow step, in the step's order."""
    out = []
    for spec in config.step:
        if spec == "coupling":
            out.append((config.coupling, json.dumps(config.coupling_options, sort_keys=True)))
        elif isinstance(spec, dict) and "coupling" in spec:
            out.append((spec["coupling"], json.dumps(spec.get("options", {}), sort_keys=True)))
    return out


@functools.lru_cache(maxsize=256)
def _slots(key: str) -> tuple[int, tuple[tuple[str, str, int, tuple[int, int]], ...]]:
    """(the model's count at width 1, the (coupling, options, channels, (H, W)) of each of its
    couplings, in the order the model builds them)."""
    from .layers import Coupling
    from .models import MultiScaleFlow, count_parameters

    config = FlowConfig.from_dict(json.loads(key))
    specs = _coupling_specs(config)
    model = _float32_build(lambda: MultiScaleFlow(config))
    slots = []
    for level, (_, h, w) in zip(model.levels, model.latent_shapes, strict=True):
        couplings = [layer for layer in level.layers if isinstance(layer, Coupling)]
        slots += [(*specs[i % len(specs)], layer.channels, (h, w)) for i, layer in enumerate(couplings)]
    return count_parameters(model), tuple(slots)


@functools.lru_cache(maxsize=4096)
def _built_count(
    coupling: str, options: str, net: str, net_options: str, blocks: int, channels: int, size: tuple[int, int],
    hidden: int,
) -> int:  # fmt: skip
    from .layers import COUPLING, net_factory
    from .models import count_parameters

    factory = net_factory(net, hidden_channels=hidden, num_blocks=blocks, **json.loads(net_options))
    return count_parameters(
        _float32_build(lambda: COUPLING.build(coupling, channels, size=size, net=factory, **json.loads(options)))
    )


@functools.lru_cache(maxsize=1024)
def _quadratic(*slot) -> tuple[int, int, int] | None:
    """(2a, 2b, 2c) with count(h) = a·h² + b·h + c through widths 1, 2, 3, if width 4 agrees."""
    n1, n2, n3, n4 = (_built_count(*slot, h) for h in (1, 2, 3, 4))
    a2 = n3 - 2 * n2 + n1  # 2a
    b2 = 2 * (n2 - n1) - 3 * a2  # 2b
    c2 = 2 * n1 - a2 - b2  # 2c
    return (a2, b2, c2) if a2 * 16 + b2 * 4 + c2 == 2 * n4 else None


def _coupling_count(
    config: FlowConfig, coupling: str, options: str, channels: int, size: tuple[int, int], hidden: int
) -> int:
    """One coupling's parameters at this width (its slot: the coupling, its options, the config's
    net and depth)."""
    net_options = json.dumps(config.net_options, sort_keys=True)
    slot = (coupling, options, config.net, net_options, config.num_blocks, channels, size)
    poly = _quadratic(*slot) if hidden > 4 else None
    if poly is None:
        return _built_count(*slot, hidden)
    a2, b2, c2 = poly
    return (a2 * hidden * hidden + b2 * hidden + c2) // 2


def parameter_count(config: FlowConfig, hidden_channels: int | None = None) -> int:
    """The number of parameters of ``MultiScaleFlow(config)`` with ``hidden_channels`` (the
    config's own when None), equal to building it and counting."""
    hidden = config.hidden_channels if hidden_channels is None else int(hidden_channels)
    if hidden < 1:
        raise ValueError(f"hidden_channels must be at least 1, got {hidden}")
    base, slots = _slots(_key(config))
    return base + sum(
        _coupling_count(config, name, options, c, size, hidden) - _coupling_count(config, name, options, c, size, 1)
        for name, options, c, size in slots
    )


def match_hidden_channels(config: FlowConfig, budget: int, *, limit: int = 4096) -> FlowConfig:
    """The config with the ``hidden_channels`` whose parameter count is nearest ``budget`` (the
    smaller width on a tie). A budget below the count at width 1 gives width 1."""
    if budget < 1:
        raise ValueError(f"a parameter budget must be at least 1, got {budget}")
    low, high = 1, 1
    while parameter_count(config, high) < budget:
        low, high = high, high * 2
        if high > limit:
            raise ValueError(f"a budget of {budget:,} parameters needs a width above {limit}: not a model to build")
    while high - low > 1:  # count(low) < budget <= count(high), or low == high == 1
        mid = (low + high) // 2
        low, high = (mid, high) if parameter_count(config, mid) < budget else (low, mid)
    best = min((low, high), key=lambda h: (abs(parameter_count(config, h) - budget), h))
    return dataclasses.replace(config, hidden_channels=best)


@dataclass(frozen=True)
class Match:
    """The widths chosen for a comparison: the reference's width and count, and per row its width
    and count; ``worst`` is the largest |count / reference count − 1| of the rows."""

    reference_hidden: int
    reference_params: int
    hidden: dict[str, int]
    params: dict[str, int]
    tolerance: float

    def ratio(self, row: str) -> float:
        return self.params[row] / self.reference_params

    @property
    def worst(self) -> float:
        return max((abs(self.ratio(r) - 1) for r in self.params), default=0.0)

    @property
    def within(self) -> bool:
        return self.worst <= self.tolerance


def match_widths(
    reference: FlowConfig,
    rows: dict[str, FlowConfig],
    *,
    tolerance: float = 0.01,
    search: float = 0.25,
) -> Match:
    """Widths for ``rows`` (name -> config; only their widths are changed) whose parameter counts
    are each within ``tolerance`` of the reference's.

    The reference keeps its ``hidden_channels`` if every row can be matched there; otherwise its
    width moves, nearest first (ties: the wider), within ``search`` × its width, to the first
    width at which all rows can (``search=0`` keeps it fixed). If no width works, the result is
    the closest (``Match.within`` is False): a comparison never fails to build, and its report
    shows every row's count and ratio.
    """
    nominal = reference.hidden_channels
    reach = int(nominal * search)
    candidates = sorted(range(max(1, nominal - reach), nominal + reach + 1), key=lambda h: (abs(h - nominal), -h))
    best: Match | None = None
    for ref_hidden in candidates:
        target = parameter_count(reference, ref_hidden)
        chosen = {name: match_hidden_channels(cfg, target).hidden_channels for name, cfg in rows.items()}
        params = {name: parameter_count(rows[name], h) for name, h in chosen.items()}
        found = Match(ref_hidden, target, chosen, params, tolerance)
        if found.within:
            return found
        if best is None or found.worst < best.worst:
            best = found
    assert best is not None
    return best

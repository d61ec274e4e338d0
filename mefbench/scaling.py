"""How each layer's time grows with its channels C and pixels n = H·W, against the cost it states.

For every mixing layer and coupling of the registries (each in its default form), the time of
forward+backward and of the inverse is measured over a grid of C and H = W, and the exponents a, b
of time ∝ C^a·n^b are fitted by least squares on log time. The same fit of the cost the layer's
:class:`~mefbench.layers.LayerInfo` states (``Cost``, read as a formula in C and n), evaluated on
the same points, gives the exponents the statement expects there: a stated C³ + C²·n on a grid of
C ≤ 192 and n ≤ 4096 expects an exponent between 2 and 3 in C, and the fit says which. A measured
exponent disagrees with the statement when its 95% confidence interval lies wholly outside the
expected exponent ± :data:`TOLERANCE`.

What is timed:

- a mixing layer: ``layer(x)`` and the backward of Σ g·y + Σ log-det to x and the parameters, in
  training mode (so every call builds what eval mode caches: what a training step costs), and
  ``layer.inverse(y)`` without autograd; expected: the stated forward + log-det, and inverse +
  log-det (both calls return the log-det);
- a coupling: its own transform given the net's output h (``transform(x2, h)``, backward to x2 and
  h; ``inverse_transform(y2, h)``), without the net: the net is the same conv stack for every
  coupling and its cost is the net's (the stated ``net + `` is left out).

Time on a CPU is not work: a call has a fixed cost (Python, op dispatch, thread start-up) that
dominates the smallest points and flattens the curve there. The fit uses the points at least
:data:`FLOOR` times slower than the layer's fastest point (its fixed cost and more), and needs
four of them over at least two values of C and of n; the expected exponents are fitted on the same
points.

One thread (``torch.set_num_threads(1)`` while the part runs): the exponents of the work. With
more threads a small call runs on one of them and a large one on all, and the fit would mix the
layer's growth with the machine's parallel efficiency; on a shared machine, threads that wait for
each other at every small operation also multiply the time of operation-heavy layers.

Time and memory: points are visited from small to large; a point whose call exceeds the grid's
time cap, whose stated cost times the batch exceeds :data:`WORK_CAP`, or that runs out of memory
ends the measurements of the layer at every point at least as large in both C and n; once a layer
has been measured for the grid's ``layer_budget`` (90 s; ``--quick`` 8 s) its remaining points are
skipped; the output says which points were not measured and why. Each point's first call is left
out (one-time work: allocations, schedules); then as many calls as fit in three caps, at most the
grid's repeats, and the fastest is kept (on a shared machine other processes only ever add time to
a call). So the full grid takes at most about 16 × 90 s (25 minutes); measured: 15 minutes on a
2-core machine shared with several other jobs; ``--quick`` about a minute.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, cast

import numpy as np
import scipy.stats
import torch

from .layers import COUPLING, MIXING, Cost, Coupling, FlowLayer, net_factory

__all__ = [
    "FLOOR",
    "GRID",
    "PARTS",
    "QUICK_GRID",
    "SYMBOLS",
    "TOLERANCE",
    "WORK_CAP",
    "Exponent",
    "Grid",
    "Point",
    "ScalingFit",
    "cost_expression",
    "expected_cost",
    "fit_exponents",
    "fit_layer",
    "layers",
    "measure_layer",
    "point_calls",
]


@dataclass(frozen=True)
class Grid:
    """The sizes a scaling run visits, its batch, and its per-point limits."""

    channels: tuple[int, ...]
    sizes: tuple[int, ...]  # H = W
    batch: int
    time_cap: float  # seconds per call beyond which larger points are not visited
    repeats: int  # at most this many timed calls per point and part
    layer_budget: float  # seconds of measuring per layer, after which its remaining points are skipped

    def points(self) -> list[tuple[int, int]]:
        """(C, H) from small to large: C outer, H inner."""
        return [(c, h) for c in self.channels for h in self.sizes]


GRID = Grid(channels=(12, 24, 48, 96, 192), sizes=(8, 16, 32, 64), batch=8, time_cap=1.0, repeats=5, layer_budget=90.0)
QUICK_GRID = Grid(channels=(12, 24, 48), sizes=(8, 16, 32), batch=4, time_cap=0.25, repeats=2, layer_budget=8.0)

PARTS = ("fwd+bwd", "inverse")
TOLERANCE = 0.3  # how far a measured exponent may sit from the stated cost's before it disagrees
FLOOR = 4.0  # fit points at least this many times slower than the layer's fastest point
WORK_CAP = 2e10  # points whose stated cost × batch exceeds this are not visited (time and memory)

# What a cost's symbols stand for where the layer's Cost.symbols does not say. Constants are the
# zoo's defaults: they scale the terms of a sum (so they move the exponents a sum expects on a
# finite grid) but never grow with C or n.
SYMBOLS: dict[str, str] = {
    "c": "C/2",  # the channels a coupling transforms
    "H": "sqrt(n)",  # square images
    "W": "sqrt(n)",
    "D": "C*n",  # the entries of a sample
    "k": "3",  # kernel size (the spatial layers' default)
    "m": "8",  # series terms: set by the norm bound, not by the size
    "T": "10",  # the convolution exponential's series terms, likewise
    "K": "8",  # bins or components: an option, constant in C and n
    "b": "32",  # bisection steps (float32)
    "L": "log(C*n)/log(2)",  # butterfly levels: by default log2 of the sample's entries
}


def _big_o(text: str) -> tuple[str, dict[str, str]]:
    """The argument of the first O(…) of a cost (``"0"`` for a cost of 0) and the ``X = …``
    definitions that follow it after commas."""
    text = text.strip()
    if text == "0":
        return "0", {}
    start = text.find("O(")
    if start < 0:
        raise ValueError(f"cost {text!r} has no O(…)")
    depth = 0
    for end in range(start + 1, len(text)):
        depth += {"(": 1, ")": -1}.get(text[end], 0)
        if depth == 0:
            break
    else:
        raise ValueError(f"cost {text!r}: unbalanced parentheses")
    definitions = {}
    for piece in text[end + 1 :].split(","):
        match = re.fullmatch(r"\s*([A-Za-z_]\w*)\s*=\s*(.+?)\s*", piece)
        if match:
            definitions[match[1]] = match[2]
    return text[start + 2 : end], definitions


def _ascii(expr: str) -> str:
    """A cost's maths in sympy's syntax: · → *, ² → **2, ³ → **3, − → -, log n → log(n)."""
    for a, b in (("·", "*"), ("×", "*"), ("²", "**2"), ("³", "**3"), ("−", "-")):
        expr = expr.replace(a, b)
    return re.sub(r"\blog\s+([A-Za-z_]\w*)", r"log(\1)", expr)


def cost_expression(text: str, symbols: Mapping[str, str] | None = None) -> Any:
    """A stated cost as a sympy expression in C and n.

    ``symbols`` (a layer's ``Cost.symbols``) take precedence over the cost's own definitions,
    which take precedence over :data:`SYMBOLS`. Raises ValueError naming any symbol left without
    a value, or a cost that does not parse.
    """
    import sympy
    from sympy.parsing.sympy_parser import parse_expr

    body, definitions = _big_o(text)
    values = {**SYMBOLS, **definitions, **dict(symbols or {})}
    functions = {"log": sympy.log, "sqrt": sympy.sqrt, "Min": sympy.Min, "min": sympy.Min, "Max": sympy.Max}

    def parse(expr: str) -> Any:
        names = set(re.findall(r"[A-Za-z_]\w*", expr)) - set(functions)
        try:
            return parse_expr(_ascii(expr), local_dict={**{n: sympy.Symbol(n) for n in names}, **functions})
        except (SyntaxError, TypeError, ValueError, sympy.SympifyError) as exc:
            raise ValueError(f"cost {text!r}: cannot read {expr!r} ({exc})") from None

    C, n = sympy.Symbol("C"), sympy.Symbol("n")
    expr = parse(body)
    for _ in range(5):  # values may name other symbols (d_s = Min(16, n), L in terms of C and n)
        free = {s for s in expr.free_symbols if s not in (C, n)}
        if not free:
            return expr
        expr = expr.subs({s: parse(values[s.name]) for s in free if s.name in values})
        missing = sorted(s.name for s in free if s.name not in values)
        if missing:
            raise ValueError(
                f"cost {text!r} names {', '.join(missing)} without a value: give it as an expression in C and n "
                "in the layer's Cost(symbols={...})"
            )
    raise ValueError(f"cost {text!r}: its symbols' values refer to each other in a cycle")


def expected_cost(cost: Cost, part: str) -> Callable[[Any, Any], np.ndarray]:
    """The stated cost of a part (``"fwd+bwd"``: forward + log-det; ``"inverse"``: inverse +
    log-det) as a function of arrays C and n."""
    import sympy

    if part not in PARTS:
        raise ValueError(f"scaling part must be one of {PARTS}, got {part!r}")
    main = cost.forward if part == "fwd+bwd" else cost.inverse
    expr = cost_expression(main, cost.symbols) + cost_expression(cost.logdet, cost.symbols)
    f = sympy.lambdify((sympy.Symbol("C"), sympy.Symbol("n")), expr, "numpy")
    return lambda C, n: np.broadcast_to(np.asarray(f(np.asarray(C, float), np.asarray(n, float)), float), np.shape(C))


def stated_cost(cls: type) -> Cost:
    """The cost a registered layer's ``LayerInfo`` states (every registry entry has one)."""
    info = getattr(cls, "info", None)
    if info is None:
        raise ValueError(f"{cls.__name__} has no LayerInfo: its cost is not stated")
    return info.cost


def layers() -> list[tuple[str, str, type[FlowLayer]]]:
    """(kind, name, class) of every mixing layer and coupling, in registry order."""
    entries = [("mixing", n, c) for n, c in MIXING.items()] + [("coupling", n, c) for n, c in COUPLING.items()]
    return cast(list[tuple[str, str, type[FlowLayer]]], entries)


# ----------------------------------------------------------------------------- measuring


@dataclass
class Point:
    """One grid point of one layer and part: its time (the fastest of its repeats: other processes
    only ever add time), or why it was not measured."""

    kind: str
    layer: str
    part: str
    C: int
    H: int
    n: int
    time_s: float | None = None
    repeats: int = 0
    skipped: str | None = None


def point_calls(kind: str, name: str, channels: int, size: int, batch: int, device: torch.device | str = "cpu"):
    """(fwd+bwd, inverse) callables of a layer at one point, in float32, from a fixed seed; raises
    ValueError when the layer cannot be built there (the error says why)."""
    torch.manual_seed(0)
    dev = torch.device(device)
    hw = (size, size)
    if kind == "mixing":
        mixing = MIXING.build(name, channels, size=hw).to(dev, torch.float32).train()
        x = torch.randn(batch, channels, *hw, device=dev, dtype=torch.float32)
        with torch.no_grad():
            mixing(x)  # data-dependent init where the layer has one
            y = mixing(x)[0]
        x.requires_grad_()
        g = torch.randn_like(y)

        def mixing_fwd_bwd() -> None:
            mixing.zero_grad(set_to_none=True)
            x.grad = None
            out, logdet = mixing(x)
            ((out * g).sum() + logdet.sum()).backward()

        def mixing_inverse() -> None:
            with torch.no_grad():
                mixing.inverse(y)

        return mixing_fwd_bwd, mixing_inverse
    net = net_factory(hidden_channels=8, num_blocks=1)
    coupling = cast(Coupling, COUPLING.build(name, channels, size=hw, net=net).to(dev, torch.float32).train())
    c = coupling.c2
    f32: dict[str, Any] = {"device": dev, "dtype": torch.float32, "requires_grad": True}
    x2 = torch.randn(batch, c, *hw, **f32)
    h = torch.randn(batch, coupling.num_params(c), *hw, **f32)  # the net's output
    with torch.no_grad():
        y2 = coupling.transform(x2, h)[0]
    g2 = torch.randn_like(y2)

    def fwd_bwd() -> None:
        coupling.zero_grad(set_to_none=True)
        x2.grad = h.grad = None
        out, logdet = coupling.transform(x2, h)
        ((out * g2).sum() + logdet.sum()).backward()

    def inverse() -> None:
        with torch.no_grad():
            coupling.inverse_transform(y2, h)

    return fwd_bwd, inverse


def _timed(fn: Callable[[], object], sync: Callable[[], object]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


def measure_layer(
    kind: str,
    name: str,
    grid: Grid,
    device: torch.device | str = "cpu",
    sync: Callable[[], object] = lambda: None,
) -> list[Point]:
    """Every point and part of one layer over the grid (module docstring: caps and repeats), in
    the calling thread's torch settings (the bench part sets one thread)."""
    cost = stated_cost((MIXING if kind == "mixing" else COUPLING)[name])
    stated = {part: expected_cost(cost, part) for part in PARTS}
    capped: dict[str, list[tuple[int, int, str]]] = {part: [] for part in PARTS}  # (C, H, why)
    points: list[Point] = []
    start = time.perf_counter()
    for C, H in grid.points():
        todo = []
        over_budget = bool(points) and time.perf_counter() - start > grid.layer_budget  # the first point always runs
        for part in PARTS:
            point = Point(kind, name, part, C, H, H * H)
            points.append(point)
            beyond = next((why for c0, h0, why in capped[part] if c0 <= C and h0 <= H), None)
            if over_budget:
                point.skipped = f"the layer's {grid.layer_budget:g} s budget was spent"
            elif beyond is not None:
                point.skipped = f"beyond {beyond}"
            elif float(stated[part](C, H * H)) * grid.batch > WORK_CAP:
                point.skipped = f"stated cost × batch over the work cap {WORK_CAP:.0e}"
                capped[part].append((C, H, f"the work cap at C={C}, {H}×{H}"))
            else:
                todo.append(point)
        if not todo:
            continue
        try:
            calls = dict(zip(PARTS, point_calls(kind, name, C, H, grid.batch, device), strict=True))
        except ValueError as exc:  # not buildable here (an option's constraint): this point only
            for point in todo:
                point.skipped = f"not built: {exc}"
            continue
        for point in todo:
            _measure_point(point, calls[point.part], grid, sync, capped[point.part])
        del calls
    return points


def _measure_point(point: Point, fn: Callable[[], object], grid: Grid, sync, capped: list) -> None:
    where = f"C={point.C}, {point.H}×{point.H}"
    try:
        fn()  # the first call: one-time work (allocations, a wavefront schedule, lazy kernels)
        warm = _timed(fn, sync)
        if warm > 5 * grid.time_cap:  # once more: a call that another process slowed is not the layer's
            warm = min(warm, _timed(fn, sync))
        if warm > 5 * grid.time_cap:
            point.skipped = f"its second call took {warm:.1f} s, over 5× the {grid.time_cap:g} s cap"
            capped.append((point.C, point.H, f"the {grid.time_cap:g} s time cap at {where}"))
            return
        repeats = max(1, min(grid.repeats, int(3 * grid.time_cap / max(warm, 1e-9))))
        times = [_timed(fn, sync) for _ in range(repeats)]
    except (RuntimeError, MemoryError) as exc:
        if "memory" not in str(exc).lower() and not isinstance(exc, MemoryError):
            raise
        point.skipped = "out of memory"
        capped.append((point.C, point.H, f"out of memory at {where}"))
        return
    point.time_s, point.repeats = min(times), repeats
    if point.time_s > grid.time_cap:
        capped.append((point.C, point.H, f"the {grid.time_cap:g} s time cap at {where}"))


# ----------------------------------------------------------------------------- fitting


@dataclass
class Exponent:
    """A fitted exponent with its 95% interval, the stated cost's exponent on the same points and
    whether the two disagree (the interval wholly outside expected ± TOLERANCE)."""

    value: float
    low: float
    high: float
    expected: float

    @property
    def disagrees(self) -> bool:
        return self.high < self.expected - TOLERANCE or self.low > self.expected + TOLERANCE


@dataclass
class ScalingFit:
    """The fit of one layer and part: exponents in C and n, or why there is none."""

    kind: str
    layer: str
    part: str
    stated: str  # the stated cost the expectation comes from
    C: Exponent | None = None
    n: Exponent | None = None
    points_fitted: int = 0
    points_measured: int = 0
    skipped: list[str] = field(default_factory=list)
    problem: str | None = None

    def to_dict(self) -> dict:
        out = asdict(self)
        for var in ("C", "n"):
            exp = getattr(self, var)
            if exp is not None:
                out[var]["disagrees"] = exp.disagrees
        return out


def fit_exponents(C: np.ndarray, n: np.ndarray, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """Least squares of log t = c + a·log C + b·log n: ((a, b), their standard errors, dof)."""
    X = np.column_stack([np.ones(len(t)), np.log(C), np.log(n)])
    y = np.log(t)
    beta, *_ = np.linalg.lstsq(X, y, rcond=None)
    dof = len(t) - 3
    residual = y - X @ beta
    sigma2 = float(residual @ residual) / dof if dof > 0 else math.inf
    cov = sigma2 * np.linalg.pinv(X.T @ X)
    return beta[1:], np.sqrt(np.clip(np.diag(cov)[1:], 0, None)), dof


def fit_layer(points: list[Point], cost: Cost, stated: str) -> ScalingFit:
    """The fit of one layer and part from its points (all of one kind, layer and part)."""
    first = points[0]
    fit = ScalingFit(first.kind, first.layer, first.part, stated)
    fit.skipped = [f"C={p.C}, {p.H}×{p.H}: {p.skipped}" for p in points if p.skipped]
    measured = [p for p in points if p.time_s is not None and p.time_s > 0]
    fit.points_measured = len(measured)
    if not measured:
        fit.problem = "no point measured"
        return fit
    times = {id(p): cast(float, p.time_s) for p in measured}
    floor = FLOOR * min(times.values())
    used = [p for p in measured if times[id(p)] >= floor]
    C = np.array([p.C for p in used], float)
    n = np.array([p.n for p in used], float)
    if len(used) < 4 or len(set(C)) < 2 or len(set(n)) < 2:
        fit.problem = (
            f"too few points above {FLOOR:g}× the fastest ({len(used)} of {len(measured)}, over "
            f"{len(set(C))} values of C and {len(set(n))} of n; 4 over 2 and 2 needed): the per-call cost dominates"
        )
        return fit
    fit.points_fitted = len(used)
    (a, b), (se_a, se_b), dof = fit_exponents(C, n, np.array([times[id(p)] for p in used]))
    q = float(scipy.stats.t.ppf(0.975, dof))
    (ea, eb), _, _ = fit_exponents(C, n, expected_cost(cost, first.part)(C, n))
    fit.C = Exponent(float(a), float(a - q * se_a), float(a + q * se_a), float(ea))
    fit.n = Exponent(float(b), float(b - q * se_b), float(b + q * se_b), float(eb))
    return fit

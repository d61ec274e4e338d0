"""The layer contract, checked for every registry entry and every named variant of it.

Whatever is in ``mefbench.layers.MIXING`` and ``COUPLING`` when the tests are collected (each
class's :func:`~mefbench.layers.layer_variants`, the default among them, plus a few extra option
sets below) gets: construction by the contract, its metadata and option types, round trips in
float64 and float32, the log-det against the autograd Jacobian of the whole (C, H, W) map, the
inverse log-det, gradients for every parameter, save/load, the eval-mode cache, an empty batch,
clear errors for bad input to ``forward`` and ``inverse``, and, for a coupling, that it starts as
the identity. Every test id names the layer (``coupling-affine-tanh``), so ``pytest -k affine``
runs every check of that layer.
"""

from __future__ import annotations

import io
import re
from typing import Any, ClassVar

import pytest
import torch

import mefbench.layers as L

# Small but not trivial: odd channel counts for couplings (an uneven split), non-square images.
MIXING_SHAPE = (4, 4, 6)
COUPLING_SHAPE = (5, 3, 4)
NET = L.net_factory(hidden_channels=8, num_blocks=1)

# option sets that exercise code paths the default and the classes' variants do not
EXTRA = {
    ("coupling", "matexp"): {"exp-scale": {"scale": "exp"}, "low-rank": {"rank": 2}, "auto-low-rank": {"full_max": 1}},
    ("coupling", "spline"): {"bins-3-bound-1": {"bins": 3, "bound": 1.0}},  # the tails are hit
    ("coupling", "mixture"): {"components-2-exp": {"components": 2, "scale": "exp"}},
    ("mixing", "householder"): {"two-reflections": {"reflections": 2}},
    ("mixing", "woodbury"): {"rank-2": {"rank": 2, "spatial_rank": 3}},
    ("mixing", "me-woodbury"): {"rank-1": {"rank": 1, "height_rank": 1, "width_rank": 2}},
    ("mixing", "emerging"): {"k1": {"kernel_size": 1}, "k5": {"kernel_size": 5}},
    ("mixing", "periodic"): {"k5": {"kernel_size": 5}},
    ("mixing", "convexp"): {"k1-tight": {"kernel_size": 1, "max_norm": 0.1}},
    ("mixing", "butterfly"): {"two-levels": {"levels": 2}},
}


def _cases() -> list[tuple[str, str, str, dict]]:
    cases = []
    for kind, registry in L.REGISTRIES.items():
        for name, label, options in L.registry_variants(registry):
            cases.append((kind, name, label, options))
        for name in registry:
            cases += [(kind, name, label, dict(o)) for label, o in EXTRA.get((kind, name), {}).items()]
    return cases


CASES = _cases()
COUPLING_CASES = [c for c in CASES if c[0] == "coupling"]


def _id(case: tuple) -> str:
    return "-".join(case[:3])


def build(kind: str, name: str, options: dict) -> tuple[L.FlowLayer, tuple[int, int, int]]:
    shape = MIXING_SHAPE if kind == "mixing" else COUPLING_SHAPE
    extra = {"net": NET} if kind == "coupling" else {}
    layer = L.REGISTRIES[kind].build(name, shape[0], size=shape[1:], **extra, **options)
    return layer, shape


def ready(kind: str, name: str, options: dict, scale: float = 0.1) -> tuple[L.FlowLayer, tuple[int, int, int]]:
    """Built, data-initialised (first forward in training mode), every parameter moved away from
    its init, in eval mode."""
    layer, shape = build(kind, name, options)
    layer.train()
    layer(torch.randn(8, *shape))
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn_like(p))
    return layer.eval(), shape


def _tol(layer: L.FlowLayer, dtype: torch.dtype) -> float:
    iterative = layer.info.inverse == "iterative" or layer.info.logdet == "truncated"
    if dtype == torch.float32:
        return 1e-4
    return 1e-8 if iterative else 1e-10


@pytest.fixture(params=CASES, ids=[_id(c) for c in CASES])
def case(request):
    return request.param


@pytest.fixture(params=COUPLING_CASES, ids=[_id(c) for c in COUPLING_CASES])
def coupling_case(request):
    return request.param


def test_metadata(case):
    kind, name, _, options = case
    cls = L.REGISTRIES[kind][name]
    assert isinstance(cls.info, L.LayerInfo)  # LayerInfo checks its own fields when it is made
    families = ("per-pixel", "spatial") if kind == "mixing" else ("coupling",)
    assert cls.info.family in families
    assert L.summary(cls) and L.summary(cls) != cls.__name__  # a docstring with its maths
    assert not (kind == "mixing" and cls.info.family == "per-pixel") or issubclass(cls, L.Conv1x1)
    assert list(L.layer_variants(cls).values()).count({}) <= 1  # the defaults once
    L.check_options(cls, options)
    with pytest.raises(ValueError, match=f"{cls.__name__} has no option 'no_such_option'"):
        L.REGISTRIES[kind].build(name, 4, size=(4, 4), no_such_option=1)


def test_options_are_typed(case):
    """Every option is annotated with a type the checks read; its default has that type, and a value
    of another type is a clear error that names the option."""
    kind, name, _, _ = case
    cls = L.REGISTRIES[kind][name]
    defaults = L.option_defaults(cls)
    for option, tp in L.checks.option_types(cls).items():
        assert tp is not Any, f"{cls.__name__} option {option} has no annotation"
        assert L.checks.check_value(tp, defaults.get(option)) is True, (option, tp)
        with pytest.raises(ValueError, match=f"{cls.__name__} option {option} must be"):
            L.REGISTRIES[kind].build(name, 4, size=(4, 4), **{option: object()})


def test_round_trip_float64(case):
    layer, shape = ready(case[0], case[1], case[3])
    x = torch.randn(3, *shape)
    y, _ = layer(x)
    x_back, _ = layer.inverse(y)
    assert x_back.shape == x.shape
    torch.testing.assert_close(x_back, x, atol=_tol(layer, torch.float64), rtol=0)


def test_round_trip_float32(case):
    layer, shape = ready(case[0], case[1], case[3])
    layer = layer.float()
    x = torch.randn(3, *shape, dtype=torch.float32)
    x_back, _ = layer.inverse(layer(x)[0])
    torch.testing.assert_close(x_back, x, atol=_tol(layer, torch.float32), rtol=0)


def test_logdet_matches_autograd_jacobian(case):
    layer, shape = ready(case[0], case[1], case[3])
    x = torch.randn(2, *shape)
    y, logdet = layer(x)
    assert logdet.shape == (2,)
    for i in range(2):
        J = torch.autograd.functional.jacobian(lambda v: layer(v.reshape(1, *shape))[0].reshape(-1), x[i].reshape(-1))
        torch.testing.assert_close(logdet[i], torch.linalg.slogdet(J).logabsdet, atol=1e-8, rtol=1e-8)
    _, inv_logdet = layer.inverse(y)
    torch.testing.assert_close(inv_logdet, -logdet, atol=1e-8, rtol=1e-8)


def test_separate_logdet_matches_the_forward(case):
    """A mixing layer that computes its log-det apart from the map (``logdet(size)``) agrees."""
    layer, shape = ready(case[0], case[1], case[3])
    if not hasattr(layer, "logdet"):
        pytest.skip("computes its log-det only together with the map")
    _, logdet = layer(torch.randn(2, *shape))
    torch.testing.assert_close(layer.logdet(shape[1:]).expand(2), logdet)


def test_every_parameter_gets_a_gradient(case):
    layer, shape = ready(case[0], case[1], case[3])
    layer.train()
    y, logdet = layer(torch.randn(4, *shape))
    x_back, inv_logdet = layer.inverse(y.detach() + 0.1)
    ((y**2).sum() + logdet.sum() + (x_back**2).sum() + inv_logdet.sum()).backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname


def test_state_dict_round_trip_gives_identical_outputs(case):
    kind, name, _, options = case
    layer, shape = ready(kind, name, options)
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh, _ = build(kind, name, options)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(2, *shape)
    y1, ld1 = layer(x)
    fresh.train()  # an initialised layer must not re-initialise after loading
    y2, ld2 = fresh(x)
    assert torch.equal(y1, y2) and torch.equal(ld1, ld2)


def test_eval_mode_follows_parameter_changes(case):
    """Eval-mode results (cached or not) equal training-mode ones and follow every parameter change."""
    layer, shape = ready(case[0], case[1], case[3])
    x = torch.randn(2, *shape)
    with torch.no_grad():
        y1 = layer(x)[0]
        assert torch.equal(layer(x)[0], y1)
        x1 = layer.inverse(y1)[0]
        for p in layer.parameters():
            p.add_(0.01 * torch.randn_like(p))
        y2, x2 = layer(x)[0], layer.inverse(y1)[0]
    layer.train()
    torch.testing.assert_close(y2, layer(x)[0])
    torch.testing.assert_close(x2, layer.inverse(y1)[0])
    assert not torch.equal(y2, y1) and not torch.equal(x2, x1)


def test_empty_batch(case):
    layer, shape = ready(case[0], case[1], case[3])
    y, logdet = layer(torch.zeros(0, *shape))
    assert y.shape == (0, *shape) and logdet.shape == (0,)
    x, logdet = layer.inverse(y)
    assert x.shape == (0, *shape) and logdet.shape == (0,)


def test_bad_input_is_a_clear_error(case):
    """In forward and in inverse: wrong channels, wrong rank, half precision, a dtype other than
    the parameters'."""
    layer, (c, h, w) = ready(case[0], case[1], case[3])
    cls_name = type(layer).__name__
    for run in (layer, layer.inverse):
        with pytest.raises(ValueError, match=f"{cls_name} was built for {c} channels, got input with {c + 1}"):
            run(torch.zeros(1, c + 1, h, w))
        with pytest.raises(ValueError, match=f"{cls_name} expects 4-D input"):
            run(torch.zeros(c, h, w))
        with pytest.raises(ValueError, match=r"computes in float32 or float64, got torch\.bfloat16"):
            run(torch.zeros(1, c, h, w, dtype=torch.bfloat16))
    layer.float()
    for run in (layer, layer.inverse):
        with pytest.raises(ValueError, match=r"has torch\.float32 parameters but got torch\.float64 input"):
            run(torch.zeros(1, c, h, w, dtype=torch.float64))


def test_coupling_starts_as_the_identity(coupling_case):
    """The net protocol: the net's output starts at zero (after its data-dependent init), so that
    the coupling starts as its map at h = 0: the identity with the layer's default options (not
    for every variant: Glow's sigmoid scale map starts at e^S = σ(2))."""
    kind, name, _, options = coupling_case
    layer, shape = build(kind, name, options)
    x = torch.randn(4, *shape)
    y, logdet = layer.train()(x)  # the first forward in training mode: the net's data-dependent init
    assert torch.equal(layer.net(x[:, : layer.c1]), torch.zeros(4, layer.num_params(layer.c2), *shape[1:]))
    if not L.canonical_options(type(layer), options):
        torch.testing.assert_close(y, x)
        torch.testing.assert_close(logdet, torch.zeros(4))


def test_conv1x1_view_follows_the_mixing_registry():
    assert set(L.CONV1X1) == {n for n, c in L.MIXING.items() if c.info.family == "per-pixel"}
    assert all(L.CONV1X1[n] is L.MIXING[n] for n in L.CONV1X1)


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown mixing layer 'nope'; choose one of"):
        L.MIXING.build("nope", 4)
    with pytest.raises(ValueError, match="unknown coupling 'nope'"):
        L.COUPLING.build("nope", 4)


def test_layer_info_is_validated_field_by_field():
    cost = L.Cost("O(n)", "O(1)", "O(n)")
    assert L.LayerInfo(family="spatial", reference="a paper", cost=cost, inverse="sequential").inverse == "sequential"
    for changes, match in (
        ({"family": "pixel"}, "LayerInfo.family must be one of"),
        ({"logdet": "approximate"}, "LayerInfo.logdet must be one of"),
        ({"inverse": "newton"}, "LayerInfo.inverse must be one of"),
        ({"reference": " "}, "LayerInfo.reference must name the paper"),
        ({"cost": ("O(n)", "O(1)", "O(n)")}, r"LayerInfo.cost must be a Cost\(forward, logdet, inverse\)"),
    ):
        with pytest.raises(ValueError, match=match):
            L.LayerInfo(**{"family": "spatial", "reference": "a paper", "cost": cost, **changes})
    with pytest.raises(ValueError, match=r"Cost\.logdet must be a non-empty string"):
        L.Cost("O(n)", "", "O(n)")


class _Options(L.FlowLayer):
    """y = x (a throwaway class for the option checks)."""

    def __init__(
        self, channels: int, *, size: tuple[int, int] | None = None, k: int = 3, scale: float = 1.0,
        mode: str = "a", rank: int | None = None, pair: tuple[int, int] = (1, 2), flag: bool = False,
    ) -> None:  # fmt: skip
        super().__init__()


@pytest.mark.parametrize(
    "options, match",
    [
        ({"k": 2.0}, "_Options option k must be an integer, got 2.0 (float)"),
        ({"k": True}, "_Options option k must be an integer, got True (bool)"),
        ({"scale": "1"}, "_Options option scale must be a number, got '1' (str)"),
        ({"mode": 1}, "_Options option mode must be a string, got 1 (int)"),
        ({"rank": 1.5}, "_Options option rank must be an integer or None, got 1.5"),
        ({"pair": (1, "2")}, "_Options option pair must be (an integer, an integer), got (1, '2')"),
        ({"pair": [1, 2, 3]}, "_Options option pair must be (an integer, an integer), got [1, 2, 3] (list)"),
        ({"flag": 0}, "_Options option flag must be true or false, got 0 (int)"),
        ({"nope": 1}, "_Options has no option 'nope'; its options: k, scale, mode, rank, pair, flag"),
    ],
)
def test_option_names_and_types_are_checked(options, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        L.check_options(_Options, options)


def test_option_values_of_the_annotated_types_pass():
    L.check_options(_Options, {"k": 5, "scale": 2, "mode": "b", "rank": None, "pair": [3, 4], "flag": True})
    assert L.checks.option_types(_Options)["rank"] == (int | None)


def test_layer_variants_always_include_the_defaults_once():
    class NoVariants(_Options):
        """y = x."""

    class WithoutDefault(_Options):
        """y = x."""

        variants: ClassVar[dict[str, dict]] = {"big": {"k": 7}, "small": {"k": 1}}

    class WithDefault(_Options):
        """y = x."""

        variants: ClassVar[dict[str, dict]] = {"big": {"k": 7}, "three": {"k": 3}}

    assert L.layer_variants(NoVariants) == {"default": {}}
    assert L.layer_variants(WithoutDefault) == {"default": {}, "big": {"k": 7}, "small": {"k": 1}}
    assert L.layer_variants(WithDefault) == {"big": {"k": 7}, "three": {"k": 3}}  # "three" is the defaults

    class Misnamed(_Options):
        """y = x."""

        variants: ClassVar[dict[str, dict]] = {"default": {"k": 7}}

    with pytest.raises(ValueError, match="the label 'default' is kept for the defaults"):
        L.layer_variants(Misnamed)
    registry = L.Registry("test layer", {"a": WithoutDefault, "b": WithDefault})
    assert [(n, label) for n, label, _ in L.registry_variants(registry)] == [
        ("a", "default"), ("a", "big"), ("a", "small"), ("b", "big"), ("b", "three")
    ]  # fmt: skip

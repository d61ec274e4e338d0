"""The layer contract, checked for every registry entry and every named variant of it.

Whatever is in ``mefbench.layers.MIXING`` and ``COUPLING`` when the tests are collected (plus each
class's ``variants`` and a few extra option sets below) gets: construction by the contract, round
trips in float64 and float32, the log-det against the autograd Jacobian of the whole (C, H, W) map,
the inverse log-det, gradients for every parameter, save/load, the eval-mode cache, an empty batch,
clear errors for bad input, and its metadata.
"""

from __future__ import annotations

import io

import pytest
import torch

import mefbench.layers as L

# Small but not trivial: odd channel counts for couplings (an uneven split), non-square images.
MIXING_SHAPE = (4, 4, 6)
COUPLING_SHAPE = (5, 3, 4)
NET = {"hidden_channels": 8, "num_blocks": 1}

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
        for name, cls in registry.items():
            variants = {"default": {}, **getattr(cls, "variants", {}), **EXTRA.get((kind, name), {})}
            for label, options in variants.items():
                cases.append((kind, name, label, dict(options)))
    return cases


CASES = _cases()


def build(kind: str, name: str, options: dict) -> tuple[L.FlowLayer, tuple[int, int, int]]:
    shape = MIXING_SHAPE if kind == "mixing" else COUPLING_SHAPE
    extra = NET if kind == "coupling" else {}
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


@pytest.fixture(params=CASES, ids=[f"{k}-{n}-{v}" for k, n, v, _ in CASES])
def case(request):
    return request.param


def test_metadata(case):
    kind, name, _, options = case
    cls = L.REGISTRIES[kind][name]
    assert isinstance(cls.info, L.LayerInfo)
    families = ("per-pixel", "spatial") if kind == "mixing" else ("coupling",)
    assert cls.info.family in families
    assert cls.info.reference and all((cls.info.cost.forward, cls.info.cost.logdet, cls.info.cost.inverse))
    assert L.summary(cls) and L.summary(cls) != cls.__name__  # a docstring with its maths
    L.check_options(cls, options)
    with pytest.raises(ValueError, match=f"{cls.__name__} has no option 'no_such_option'"):
        L.REGISTRIES[kind].build(name, 4, size=(4, 4), no_such_option=1)


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
    layer, (c, h, w) = ready(case[0], case[1], case[3])
    cls_name = type(layer).__name__
    with pytest.raises(ValueError, match=f"{cls_name} was built for {c} channels, got input with {c + 1}"):
        layer(torch.zeros(1, c + 1, h, w))
    with pytest.raises(ValueError, match=f"{cls_name} expects 4-D input"):
        layer(torch.zeros(c, h, w))
    with pytest.raises(ValueError, match=r"computes in float32 or float64, got torch\.bfloat16"):
        layer(torch.zeros(1, c, h, w, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"has torch\.float32 parameters but got torch\.float64 input"):
        layer.float()(torch.zeros(1, c, h, w, dtype=torch.float64))


def test_couplings_start_as_the_identity():
    for name in L.COUPLING:
        layer, shape = build("coupling", name, {})
        x = torch.randn(4, *shape)
        y, logdet = layer(x)
        torch.testing.assert_close(y, x, msg=name)
        torch.testing.assert_close(logdet, torch.zeros(4), msg=name)


def test_conv1x1_view_follows_the_mixing_registry():
    assert set(L.CONV1X1) == {n for n, c in L.MIXING.items() if c.info.family == "per-pixel"}
    assert all(L.CONV1X1[n] is L.MIXING[n] for n in L.CONV1X1)


def test_unknown_names_are_clear_errors():
    with pytest.raises(ValueError, match="unknown mixing layer 'nope'; choose one of"):
        L.MIXING.build("nope", 4)
    with pytest.raises(ValueError, match="unknown coupling 'nope'"):
        L.COUPLING.build("nope", 4)

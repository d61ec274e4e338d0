"""The spline and logistic-mixture couplings: what the contract tests (test_contract.py) cannot check.

Bad options, float32 inverses on realistic inputs (tails included), the spline's continuity at its
knots and its identity tails, the mixture's bisection (its bracket, its convergence check, its
float ordering, the far tails and non-finite inputs), gradchecks of both directions, and a small
multi-scale model built on each.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mefbench.layers as L
from mefbench.layers.mixture import (
    LOG_SCALE_MIN,
    float_to_key,
    key_to_float,
    mixture_logit_cdf,
    mixture_logit_cdf_inverse,
)
from mefbench.layers.spline import _knots, derivative_offset, rq_spline
from mefbench.models import FlowConfig, MultiScaleFlow

NAMES = {"spline": L.SplineCoupling, "mixture": L.LogisticMixtureCoupling}


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    "cls, options, match",
    [
        (L.SplineCoupling, {"bins": 1}, "SplineCoupling option bins must be at least 2, got 1"),
        (L.SplineCoupling, {"bins": 2.5}, "SplineCoupling option bins must be an integer, got 2.5"),
        (L.SplineCoupling, {"bound": 0.0}, "SplineCoupling option bound must be a positive finite number, got 0.0"),
        (L.SplineCoupling, {"bound": -1}, "SplineCoupling option bound must be a positive finite number, got -1"),
        (L.SplineCoupling, {"bound": math.inf}, "SplineCoupling option bound must be a positive finite number"),
        (L.SplineCoupling, {"min_bin_width": 0}, "SplineCoupling option min_bin_width must be a positive"),
        (L.SplineCoupling, {"min_bin_height": 0.2}, r"SplineCoupling option min_bin_height must be below 1/bins"),
        (L.SplineCoupling, {"min_derivative": 1.0}, "SplineCoupling option min_derivative must be below 1"),
        (L.LogisticMixtureCoupling, {"components": 0}, "LogisticMixtureCoupling option components must be at least 1"),
        (L.LogisticMixtureCoupling, {"components": True}, "LogisticMixtureCoupling option components must be an int"),
        (L.LogisticMixtureCoupling, {"scale": "relu"}, "LogisticMixtureCoupling: unknown scale map 'relu'"),
    ],
)
def test_bad_options_are_clear_errors(cls, options, match):
    with pytest.raises(ValueError, match=match):
        cls(4, net=L.net_factory(hidden_channels=4, num_blocks=1), **options)
    name = next(n for n, c in L.COUPLING.items() if c is cls)
    with pytest.raises(ValueError, match=match):
        L.COUPLING.build(name, 4, net=L.net_factory(hidden_channels=4, num_blocks=1), **options)


def test_net_outputs_per_channel():
    assert L.SplineCoupling(
        6, net=L.net_factory(hidden_channels=4, num_blocks=1), bins=5
    ).net.head.out_channels == 3 * (3 * 5 - 1)
    assert L.LogisticMixtureCoupling(
        6, net=L.net_factory(hidden_channels=4, num_blocks=1), components=3
    ).net.head.out_channels == 3 * (3 * 3 + 2)


# ----------------------------------------------------------------------------- float32 inverses


def _moderate(name: str, head_std: float) -> L.Coupling:
    """C = 6 at 8×8, data-initialised, every parameter moved by 0.1·N(0, 1) but the net's zero
    output conv, which gets N(0, head_std²) instead, in float32 and eval mode."""
    layer = L.COUPLING.build(name, 6, size=(8, 8), net=L.net_factory(hidden_channels=8, num_blocks=1))
    layer.train()
    layer(torch.randn(16, 6, 8, 8))
    with torch.no_grad():
        for pname, p in layer.named_parameters():
            if pname.startswith("net.head."):
                p.normal_(0, head_std)
            else:
                p.add_(0.1 * torch.randn_like(p))
    return layer.float().eval()


@pytest.mark.parametrize("name", NAMES)
def test_float32_inverse_is_exact_on_realistic_inputs(name):
    """x ~ N(0, 2²) (an eighth of x2 beyond the spline's ±3), net outputs of std ≈ 0.3: exact to 1e-5."""
    layer = _moderate(name, head_std=0.025)
    x = 2 * torch.randn(32, 6, 8, 8, dtype=torch.float32)
    with torch.no_grad():
        h = layer.net(x[:, :3])
        y, logdet = layer(x)
        x_back, inv_logdet = layer.inverse(y)
    assert 0.2 < h.std() < 0.5 and h.abs().max() > 1  # moderate, not zero
    assert (x[:, 3:].abs() > 3).float().mean() > 0.1  # the tails are exercised
    assert (y - x).abs().max() > 0.3  # the layer does something
    torch.testing.assert_close(x_back, x, atol=1e-5, rtol=0)
    torch.testing.assert_close(inv_logdet, -logdet, atol=1e-4, rtol=1e-5)


def _raw(n: int, sizes: tuple[int, ...], std: float, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    return tuple(std * torch.randn(n, k, 1, 1, 1, dtype=dtype) for k in sizes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_inverses_are_as_exact_as_the_forward_allows_for_large_parameters(dtype):
    """Raw parameters of std 3 (slopes from 1e-7 to 1e3): the round-trip error stays within 24
    units of what the dtype permits, eps·|x| + eps·|y| / y′(x) (the rounding of x, and of y carried
    back through the slope). The spline's textbook root 2c / (−b − √disc) alone reaches 70–130
    units here (cancellation for b < 0), a bisection to a tolerance relative to its bracket ~10⁴."""
    eps, n = torch.finfo(dtype).eps, 20000
    x = 2 * torch.randn(n, 1, 1, 1, dtype=dtype)

    widths, heights, derivs = _raw(n, (8, 8, 7), 3.0, dtype)
    y, log_d = rq_spline(x, widths, heights, derivs)
    x_back, _ = rq_spline(y, widths, heights, derivs, inverse=True)
    allowed = eps * x.abs().clamp_min(1) + eps * y.abs().clamp_min(1) / log_d.exp()
    assert ((x_back - x).abs() / allowed).max() < 24

    logits, means, log_scales = _raw(n, (4, 4, 4), 3.0, dtype)
    log_scales = log_scales.clamp_min(LOG_SCALE_MIN)
    u, log_d = mixture_logit_cdf(x, logits, means, log_scales)
    x_back, _ = mixture_logit_cdf_inverse(u, logits, means, log_scales)
    allowed = eps * x.abs().clamp_min(1) + eps * u.abs().clamp_min(1) / log_d.exp()
    assert ((x_back - x).abs() / allowed).max() < 24


# ----------------------------------------------------------------------------- the spline


def test_spline_is_c1_at_its_knots_and_interpolates_them():
    """y(x_k) = y_k and y′(x_k) = d_k, and both one-sided limits of y and y′ agree at every knot."""
    K, bound, delta = 6, 2.0, 1e-12
    widths, heights, derivs = _raw(50, (K, K, K - 1), 1.5, torch.float64)
    knots_x = _knots(widths, bound, 1e-3).view(50, K + 1, 1, 1)  # every knot as one "channel"
    knots_y = _knots(heights, bound, 1e-3).view(50, K + 1, 1, 1)
    d_inner = 1e-3 + F.softplus(derivs + derivative_offset(1e-3)).view(50, K - 1, 1, 1)
    d = torch.cat([torch.ones(50, 1, 1, 1), d_inner, torch.ones(50, 1, 1, 1)], dim=1)

    def spline(v):
        return rq_spline(v, *(p.expand(-1, -1, K + 1, -1, -1) for p in (widths, heights, derivs)), bound=bound)

    y, log_d = spline(knots_x)
    torch.testing.assert_close(y, knots_y, atol=1e-12, rtol=0)
    torch.testing.assert_close(log_d, d.log(), atol=1e-9, rtol=0)
    for side in (-delta, delta):  # the ends ±B have the identity tail on one side
        y_side, log_side = spline(knots_x + side)
        assert ((y_side - knots_y).abs() <= 2 * d * delta + 1e-14).all()
        torch.testing.assert_close(log_side, d.log(), atol=1e-5, rtol=0)


def test_spline_log_derivative_matches_autograd_everywhere():
    widths, heights, derivs = _raw(200, (5, 5, 4), 1.5, torch.float64)
    x = (2 * torch.randn(200, 1, 1, 1)).requires_grad_()
    y, log_d = rq_spline(x, widths, heights, derivs, bound=2.5)
    (dy,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(log_d, dy.log(), atol=1e-10, rtol=0)
    assert (dy > 0).all()


def test_spline_tails_are_the_identity_and_meet_it_smoothly():
    bound = 1.5
    widths, heights, derivs = _raw(4, (8, 8, 7), 2.0, torch.float64)
    outside = torch.tensor([-100.0, -1.5000001, 1.5000001, 7.0]).view(4, 1, 1, 1)
    for inverse in (False, True):
        y, log_d = rq_spline(outside, widths, heights, derivs, bound=bound, inverse=inverse)
        assert torch.equal(y, outside) and torch.equal(log_d, torch.zeros_like(log_d))
    edges = torch.tensor([-bound, bound, -bound + 1e-9, bound - 1e-9]).view(4, 1, 1, 1)
    y, log_d = rq_spline(edges, widths, heights, derivs, bound=bound)
    torch.testing.assert_close(y[:2], edges[:2], atol=1e-15, rtol=0)  # continuous at ±B
    torch.testing.assert_close(log_d, torch.zeros_like(log_d), atol=1e-6, rtol=0)  # slope 1 on both sides


def test_spline_with_zero_parameters_is_the_identity():
    x = 4 * torch.randn(100, 2, 1, 1)
    zeros = (torch.zeros(100, k, 2, 1, 1) for k in (8, 8, 7))
    y, log_d = rq_spline(x, *zeros)
    torch.testing.assert_close(y, x, atol=1e-14, rtol=0)
    torch.testing.assert_close(log_d, torch.zeros_like(log_d), atol=1e-14, rtol=0)


# ----------------------------------------------------------------------------- the mixture


def test_float_keys_are_ordered_consecutive_and_invertible():
    for dtype in (torch.float32, torch.float64):
        tiny = torch.finfo(dtype).tiny
        x = torch.tensor(
            [-math.inf, -3.0, -1.0, -tiny, -0.0, 0.0, tiny / 4, tiny, 1e-30, 1.0, 2.5, math.inf], dtype=dtype
        )
        keys = float_to_key(x)
        assert (keys[1:] > keys[:-1]).all()
        assert torch.equal(key_to_float(keys, dtype).view(keys.dtype), x.view(keys.dtype))  # to the bit
        assert keys[5] - keys[4] == 1  # −0.0 and +0.0 are neighbours
        finite = x[[1, 2, 3, 5, 6, 7, 8, 9, 10]]
        up = torch.nextafter(finite, torch.tensor(math.inf, dtype=dtype))
        assert (float_to_key(up) - float_to_key(finite) == 1).all()


def _mixture_params(n: int, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, ...]:
    logits, means, log_scales = _raw(n, (4, 4, 4), 1.0, dtype)
    return logits, means, log_scales


def test_mixture_inverse_convergence_check_raises_a_clear_error():
    logits, means, log_scales = _mixture_params(20)
    t = 3 * torch.randn(20, 1, 1, 1)
    with pytest.raises(
        RuntimeError, match=r"LogisticMixtureCoupling: the inverse's bisection did not close its bracket.* in 3 steps"
    ):
        mixture_logit_cdf_inverse(t, logits, means, log_scales, iterations=3, owner="LogisticMixtureCoupling")
    x, _ = mixture_logit_cdf_inverse(t, logits, means, log_scales)  # the derived count converges
    torch.testing.assert_close(mixture_logit_cdf(x, logits, means, log_scales)[0], t, atol=1e-12, rtol=0)


def test_mixture_inverse_step_count_is_bounded_by_the_dtype_width(monkeypatch):
    """However wide the bracket (component scales up to e^9 here), at most 32 / 64 steps."""
    import mefbench.layers.mixture as M

    calls = []
    original = M._logit_cdf
    monkeypatch.setattr(M, "_logit_cdf", lambda *a: calls.append(1) or original(*a))
    for dtype, bits in ((torch.float32, 32), (torch.float64, 64)):
        logits, means, log_scales = _raw(50, (4, 4, 4), 3.0, dtype)
        calls.clear()
        mixture_logit_cdf_inverse(10 * torch.randn(50, 1, 1, 1, dtype=dtype), logits, means, log_scales)
        assert len(calls) <= bits + 2  # the steps, then the two candidates


def test_mixture_far_tails_and_non_finite_inputs():
    """No clamp of the CDF: x = ±60 (where F rounds to 0 or 1 in float32) round-trips exactly."""
    logits, means, log_scales = _mixture_params(4, torch.float32)
    x = torch.tensor([-60.0, -25.0, 25.0, 60.0]).view(4, 1, 1, 1).float()
    u, log_d = mixture_logit_cdf(x, logits, means, log_scales)
    assert torch.isfinite(u).all() and torch.isfinite(log_d).all()
    x_back, neg = mixture_logit_cdf_inverse(u, logits, means, log_scales)
    torch.testing.assert_close(x_back, x, atol=0, rtol=4e-7)
    torch.testing.assert_close(neg, -log_d, atol=1e-4, rtol=1e-5)
    t = torch.tensor([math.inf, -math.inf, math.nan, 0.0]).view(4, 1, 1, 1).float()
    x_back, _ = mixture_logit_cdf_inverse(t, logits, means, log_scales)
    assert x_back[0] == math.inf and x_back[1] == -math.inf and x_back[2].isnan() and x_back[3].isfinite()


def test_mixture_inverse_gradient_is_the_implicit_one():
    """d x / d t = 1 / (σ⁻¹∘F)′(x), and the gradients of the parameters follow −∂g/∂θ / g′."""
    logits, means, log_scales = (p.requires_grad_() for p in _mixture_params(6))
    t = torch.randn(6, 1, 1, 1, requires_grad=True)
    x, neg_log_d = mixture_logit_cdf_inverse(t, logits, means, log_scales)
    (dx_dt,) = torch.autograd.grad(x.sum(), t, retain_graph=True)
    torch.testing.assert_close(dx_dt.log(), neg_log_d.detach(), atol=1e-12, rtol=0)
    (dx_dmeans,) = torch.autograd.grad(x.sum(), means)
    g_means = torch.autograd.grad(mixture_logit_cdf(x.detach(), logits, means, log_scales)[0].sum(), means)[0]
    torch.testing.assert_close(dx_dmeans, -g_means * neg_log_d.detach().exp().unsqueeze(1), atol=1e-12, rtol=0)


# ----------------------------------------------------------------------------- gradcheck


@pytest.mark.parametrize("name, options", [("spline", {"bins": 3, "bound": 1.0}), ("mixture", {"components": 3})])
@pytest.mark.parametrize("direction", ["transform", "inverse_transform"])
def test_transform_gradcheck(name, options, direction):
    layer = L.COUPLING.build(name, 4, net=L.net_factory(hidden_channels=4, num_blocks=1), **options)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    v = (1.5 * torch.randn(1, 2, 2, 2)).requires_grad_()  # some beyond the spline's ±1
    h = (0.7 * torch.randn(1, layer.num_params(2), 2, 2)).requires_grad_()
    assert torch.autograd.gradcheck(getattr(layer, direction), (v, h), eps=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- in a model


@pytest.mark.parametrize("name", NAMES)
def test_multiscale_flow_inverts_exactly(name):
    model = MultiScaleFlow(
        FlowConfig(image_shape=(3, 8, 8), steps=(1, 1), hidden_channels=8, num_blocks=1, coupling=name)
    )
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    model.initialize(x)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        zs, logdet, _ = model(x)
        x_back = model.inverse(zs)
        bpd = model.bits_per_dim(x)
    torch.testing.assert_close(x_back, x, atol=1e-8, rtol=0)
    assert torch.isfinite(bpd).all() and torch.isfinite(logdet).all()
    couplings = [m for m in model.modules() if isinstance(m, NAMES[name])]
    assert len(couplings) == 2


def test_mixture_inverse_passes_non_finite_targets_through_without_a_false_alarm():
    """NaN or inf targets (from an upstream layer that overflowed) come out as NaN / ±inf; only a
    finite target whose bracket does not close is an error."""
    from mefbench.layers.mixture import mixture_logit_cdf_inverse

    torch.manual_seed(0)
    k, n = 3, 64
    t = torch.randn(n, dtype=torch.float32)
    t[:5] = float("nan")
    t[5] = float("inf")
    logits, means, log_scales = (torch.randn(1, k, n, dtype=torch.float32) for _ in range(3))  # components in dim 1
    x, _ = mixture_logit_cdf_inverse(t.unsqueeze(0), logits, means, log_scales)
    assert torch.isnan(x[0, :5]).all() and x[0, 5] == float("inf") and torch.isfinite(x[0, 6:]).all()

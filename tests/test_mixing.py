"""Layer-specific checks of the mixing layers that the contract tests cannot make.

Every mixing layer is linear, so its dense matrix is built by applying it to the basis vectors of
the flattened (C, H, W) sample; each layer's matrix must have the structure its docstring claims.
Also: the convolution exponential at the largest norm it allows, option errors, the eval caches,
and a tiny multi-scale model per registry entry.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mefbench.layers as L
from mefbench.layers import periodic
from mefbench.layers.checks import EvalCache
from mefbench.layers.convexp import NORM_LIMIT, conv_norm_bound
from mefbench.layers.emerging import quadrant_wavefronts, solve_quadrant_conv
from mefbench.linalg import MAX_TERMS, series_terms, taylor_tolerance
from mefbench.models import FlowConfig, MultiScaleFlow


def perturbed(layer: L.FlowLayer, scale: float = 0.1) -> L.FlowLayer:
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn_like(p))
    return layer.eval()


def dense(fn, shape: tuple[int, int, int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """The D×D matrix A of a linear map of (C, H, W) samples: fn(x).flatten() = A x.flatten()."""
    D = math.prod(shape)
    basis = torch.eye(D, dtype=dtype).reshape(D, *shape)
    with torch.no_grad():
        return fn(basis).reshape(D, D).T


def pixel_major(A: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """A re-indexed from (c, i, j) order to raster order of the pixels with the channels inside."""
    c, h, w = shape
    order = torch.arange(c * h * w).reshape(c, h * w).T.reshape(-1)
    return A[order][:, order]


def _lower(A: torch.Tensor) -> bool:
    return torch.equal(A, torch.tril(A))


# ------------------------------------------------------------------ per-pixel: QR and Householder


def test_qr_is_orthogonal_times_triangular():
    shape = (5, 2, 3)
    n = shape[1] * shape[2]
    layer = L.QRConv1x1(5)
    Q, R = layer.factors()
    assert torch.equal(R, torch.eye(5)) and torch.allclose(Q @ Q.T, torch.eye(5), atol=1e-12)  # init: W = Q
    assert float(layer(torch.randn(1, *shape))[1].detach()) == 0
    layer = perturbed(layer)
    Q, R = layer.factors()
    W = layer.weight()
    torch.testing.assert_close(Q.T @ Q, torch.eye(5), atol=1e-12, rtol=0)
    assert torch.equal(R, torch.triu(R)) and torch.equal(torch.diagonal(R), layer.s)
    torch.testing.assert_close(W, Q @ R)
    torch.testing.assert_close(dense(lambda x: layer(x)[0], shape), torch.kron(W, torch.eye(n)))
    torch.testing.assert_close(layer.inverse_weight(), torch.linalg.inv(W))
    torch.testing.assert_close(layer(torch.randn(1, *shape))[1], n * torch.log(layer.s.abs()).sum().reshape(1))


def test_householder_is_a_product_of_reflections():
    for reflections in (1, 3, 4):
        layer = perturbed(L.HouseholderConv1x1(4, reflections=reflections))
        Q = layer.weight()
        expected = torch.eye(4)
        for v in layer.v:
            expected = expected @ (torch.eye(4) - 2 * torch.outer(v, v) / (v @ v))
        torch.testing.assert_close(Q, expected)
        torch.testing.assert_close(Q.T @ Q, torch.eye(4), atol=1e-12, rtol=0)
        assert round(float(torch.linalg.det(Q.detach()))) == (-1) ** reflections
        torch.testing.assert_close(dense(lambda x, layer=layer: layer(x)[0], (4, 2, 2)), torch.kron(Q, torch.eye(4)))


# ------------------------------------------------------------------ Woodbury


def test_woodbury_is_a_kronecker_product_of_low_rank_updates():
    shape = (4, 3, 5)
    layer = perturbed(L.WoodburyConv(4, size=(3, 5), rank=2, spatial_rank=3))
    A_c = torch.eye(4) + layer.U_c @ layer.V_c
    A_s = torch.eye(15) + layer.U_s @ layer.V_s
    A = dense(lambda x: layer(x)[0], shape)
    torch.testing.assert_close(A, torch.kron(A_c, A_s))
    torch.testing.assert_close(dense(lambda x: layer.inverse(x)[0], shape), torch.linalg.inv(A))
    logdet = 15 * torch.linalg.slogdet(torch.eye(2) + layer.V_c @ layer.U_c).logabsdet
    logdet = logdet + 4 * torch.linalg.slogdet(torch.eye(3) + layer.V_s @ layer.U_s).logabsdet
    torch.testing.assert_close(layer(torch.randn(1, *shape))[1][0], logdet)
    torch.testing.assert_close(logdet, torch.linalg.slogdet(A).logabsdet)


def test_me_woodbury_is_channel_height_width_in_turn():
    shape = (3, 4, 5)
    layer = perturbed(L.MEWoodburyConv(3, size=(4, 5)))
    assert layer.ranks == {"rank": 3, "height_rank": 4, "width_rank": 5}  # min(16, dim)
    factors = [
        torch.eye(d) + getattr(layer, f"U_{a}") @ getattr(layer, f"V_{a}") for a, d in zip("chw", shape, strict=True)
    ]
    A = dense(lambda x: layer(x)[0], shape)
    torch.testing.assert_close(A, torch.kron(factors[0], torch.kron(factors[1], factors[2])))
    torch.testing.assert_close(layer(torch.randn(1, *shape))[1][0], torch.linalg.slogdet(A).logabsdet)
    torch.testing.assert_close(dense(lambda x: layer.inverse(x)[0], shape), torch.linalg.inv(A))


# ------------------------------------------------------------------ emerging


@pytest.mark.parametrize(
    "shape,k,d", [((4, 4, 6), 3, 1), ((3, 5, 7), 5, 1), ((2, 3, 3), 3, 1), ((3, 2, 2), 3, 1), ((2, 5, 6), 3, 2)]
)
def test_emerging_is_two_triangular_convs_and_its_inverse_is_the_dense_solve(shape, k, d):
    layer = perturbed(L.EmergingConv(shape[0], size=shape[1:], kernel_size=k, dilation=d, conv1x1=False), 0.3)
    K1, K2 = layer.kernels()
    p = (k // 2) * d
    A1 = dense(lambda x: F.conv2d(F.pad(x, (0, p, 0, p)), K1, dilation=d), shape)
    A2 = dense(lambda x: F.conv2d(F.pad(x, (p, 0, p, 0)), K2, dilation=d), shape)
    # K₁ reads the pixels below and right and, at the centre, channels ≤ c: lower triangular with
    # the pixels in reverse raster order and the channels ascending; K₂ reads the pixels above and
    # left and channels ≥ c: lower triangular in raster order with the channels descending
    n, c = shape[1] * shape[2], shape[0]
    P1, P2 = pixel_major(A1, shape), pixel_major(A2, shape)
    order1 = (torch.arange(n).flip(0)[:, None] * c + torch.arange(c)).reshape(-1)
    order2 = (torch.arange(n)[:, None] * c + torch.arange(c).flip(0)).reshape(-1)
    assert _lower(P1[order1][:, order1]) and _lower(P2[order2][:, order2])
    q = k // 2
    torch.testing.assert_close(torch.diagonal(P1), torch.diagonal(layer.weight1[:, :, 0, 0]).repeat(n))
    torch.testing.assert_close(torch.diagonal(P2), torch.diagonal(layer.weight2[:, :, q, q]).repeat(n))
    bias = layer.bias.repeat_interleave(n)
    A = dense(lambda x: layer(x)[0] - layer.bias[:, None, None], shape)
    torch.testing.assert_close(A, A2 @ A1)
    y = torch.randn(3, *shape)
    expected = torch.linalg.solve(A, y.reshape(3, -1).T - bias[:, None]).T.reshape(y.shape)
    torch.testing.assert_close(layer.inverse(y)[0], expected, atol=1e-10, rtol=1e-9)
    torch.testing.assert_close(layer(y)[1][0], torch.linalg.slogdet(A).logabsdet)


def test_emerging_inverse_runs_in_wavefronts():
    for h, w, r, d in [
        (4, 6, 1, 1),
        (5, 7, 2, 1),
        (1, 1, 0, 1),
        (3, 1, 0, 1),
        (16, 16, 1, 1),
        (7, 6, 1, 2),
        (8, 8, 1, 3),
    ]:
        steps = quadrant_wavefronts(h, w, r, d, torch.device("cpu"))
        assert len(steps) == (h - 1) // d + (w - 1) // d + 1
        assert sorted(torch.cat([pixels for pixels, _ in steps]).tolist()) == list(range(h * w))
        solved = torch.zeros(h * w + 1, dtype=torch.bool)
        solved[h * w] = True  # the zero row off the image
        for pixels, neighbours in steps:  # every neighbour is solved at an earlier step
            assert solved[neighbours].all()
            solved[pixels] = True


def test_emerging_solve_is_differentiable():
    layer = perturbed(L.EmergingConv(2, size=(3, 3)), 0.3)
    K = layer.kernels()[1].detach().requires_grad_()
    y = torch.randn(1, 2, 3, 3, requires_grad=True)
    schedule = quadrant_wavefronts(3, 3, 1, 1, torch.device("cpu"))
    assert torch.autograd.gradcheck(lambda y, K: solve_quadrant_conv(y, K, 1, schedule), (y, K))


# ------------------------------------------------------------------ periodic


@pytest.mark.parametrize("path", ["direct", "fourier"])
@pytest.mark.parametrize("shape,k", [((3, 4, 5), 3), ((3, 5, 4), 3), ((2, 2, 2), 3), ((2, 3, 6), 5), ((2, 4, 4), 1)])
def test_periodic_is_the_circular_convolution_and_its_logdet_the_full_grid(shape, k, path, monkeypatch):
    """Both forwards (the direct circular conv and the one through Fourier space) are the same map."""
    monkeypatch.setattr(periodic, "DIRECT_MAX_KERNEL", k if path == "direct" else k - 2)
    layer = perturbed(L.PeriodicConv(shape[0], kernel_size=k), 0.3)
    r = k // 2
    A = dense(lambda x: layer(x)[0] - layer.bias[:, None, None], shape)
    circular = dense(lambda x: F.conv2d(F.pad(x, (r, r, r, r), mode="circular"), layer.weight, padding=0), shape)
    torch.testing.assert_close(A, circular)
    torch.testing.assert_close(layer(torch.randn(1, *shape))[1][0], torch.linalg.slogdet(A).logabsdet)
    bias = layer.bias[:, None, None]
    torch.testing.assert_close(dense(lambda x: layer.inverse(x + bias)[0], shape), torch.linalg.inv(A))


# ------------------------------------------------------------------ convolution exponential


def test_convexp_norm_bound_holds_and_the_series_follows_it():
    assert series_terms(NORM_LIMIT, taylor_tolerance(torch.float64)) < MAX_TERMS  # the limit is reachable
    shape = (3, 4, 5)
    for k in (1, 3, 5):
        layer = perturbed(L.ConvExp(3, kernel_size=k), 1.0)
        K = layer.weight.detach()
        M = dense(lambda x, K=K: F.conv2d(x, K, padding=K.shape[-1] // 2), shape)
        assert torch.linalg.matrix_norm(M, 2) <= conv_norm_bound(K, 4, 5) * (1 + 1e-12)
    for dtype in (torch.float32, torch.float64):
        assert layer.terms(dtype) == series_terms(layer.max_norm, taylor_tolerance(dtype))


@pytest.mark.parametrize("max_norm", [0.5, NORM_LIMIT])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_convexp_at_its_norm_bound(max_norm, dtype):
    """The kernel pushed to the bound (W × 1000 is normalised back to ‖M‖ ≤ β). Stated tolerances,
    T terms, u the unit round-off, tol the series tolerance:
    - against the exact e^M x: ‖y − e^M x‖₂ ≤ (tol + T·e^β·u)·‖x‖₂ per sample;
    - round trip: |x − x̂| ≤ e^{2β}·(T·u·‖x‖∞ + 2·tol·‖x‖₂) elementwise;
    - log-det = tr M exactly, and within D·e^β·(tol + T·u)·(1 + |log-det|) of log|det| of the
      truncated map (D = C·H·W)."""
    shape = (3, 5, 6)
    D = math.prod(shape)
    layer = L.ConvExp(3, size=shape[1:], max_norm=max_norm, conv1x1=False)
    with torch.no_grad():
        layer.weight.mul_(1000)
    K = layer.kernel(*shape[1:]).detach()
    M = dense(lambda x: F.conv2d(x, K, padding=1), shape)
    norm = float(torch.linalg.matrix_norm(M, 2))
    assert 0.9 * max_norm < norm <= max_norm * (1 + 1e-12)  # at the bound, not beyond
    layer = layer.to(dtype).eval()
    u, tol, T = torch.finfo(dtype).eps / 2, taylor_tolerance(dtype), layer.terms(dtype)
    x = torch.randn(16, *shape, dtype=dtype)
    with torch.no_grad():
        y, logdet = layer(x)
        x_back, inv_logdet = layer.inverse(y)
    x64, y64 = x.double().reshape(16, -1), y.double().reshape(16, -1)
    exact = x64 @ torch.linalg.matrix_exp(M).T
    assert ((y64 - exact).norm(dim=1) <= (tol + T * math.exp(max_norm) * u) * x64.norm(dim=1)).all()
    bound = math.exp(2 * max_norm) * (T * u * x.abs().amax() + 2 * tol * x64.norm(dim=1).amax())
    assert (x_back - x).abs().amax() <= bound
    torch.testing.assert_close(logdet.double(), torch.trace(M).expand(16), atol=10 * D * u, rtol=10 * u)
    torch.testing.assert_close(inv_logdet, -logdet)
    J = dense(lambda v: layer(v)[0], shape, dtype=dtype).double()
    truncated = float(torch.linalg.slogdet(J).logabsdet)
    assert abs(float(logdet[0]) - truncated) <= D * math.exp(max_norm) * (tol + T * u) * (1 + abs(truncated))


# ------------------------------------------------------------------ butterfly


def test_butterfly_is_a_product_of_pairwise_levels():
    shape = (4, 2, 3)
    D = math.prod(shape)
    layer = L.ButterflyConv(4, size=(2, 3), levels=None, init="rotation", conv1x1=False)
    assert layer.levels == 3  # 24 = 2³·3
    A = dense(lambda x: layer(x)[0], shape)
    torch.testing.assert_close(A @ A.T, torch.eye(D), atol=1e-12, rtol=0)  # rotations at init
    layer = perturbed(layer, 0.3)
    expected = torch.eye(D)
    for level, blocks in enumerate(layer.blocks.detach()):
        stride = D >> (level + 1)
        B = torch.zeros(D, D)
        k = 0
        for start in range(0, D, 2 * stride):  # 2^level segments of 2·stride entries
            for j in range(start, start + stride):
                (a, b), (c, d) = blocks[:, :, k]
                B[j, j], B[j, j + stride], B[j + stride, j], B[j + stride, j + stride] = a, b, c, d
                k += 1
        expected = B @ expected
    A = dense(lambda x: layer(x)[0], shape)
    torch.testing.assert_close(A, expected)
    torch.testing.assert_close(layer(torch.randn(1, *shape))[1][0], torch.linalg.slogdet(A).logabsdet)
    torch.testing.assert_close(dense(lambda x: layer.inverse(x)[0], shape), torch.linalg.inv(A))


# ------------------------------------------------------------------ options, caches, models


def _errors():
    return [
        (lambda: L.EmergingConv(4, kernel_size=4), "EmergingConv option kernel_size must be odd and >= 1, got 4"),
        (lambda: L.EmergingConv(4, kernel_size=0), "EmergingConv option kernel_size must be odd and >= 1, got 0"),
        (lambda: L.PeriodicConv(4, kernel_size=2), "PeriodicConv option kernel_size must be odd and >= 1, got 2"),
        (lambda: L.ConvExp(4, kernel_size=-1), "ConvExp option kernel_size must be odd and >= 1, got -1"),
        (
            lambda: L.EmergingConv(24, size=(2, 2), kernel_size=5),
            "EmergingConv: image 2×2 is too small for kernel_size 5",
        ),
        (
            lambda: L.PeriodicConv(4, size=(6, 2), kernel_size=5),
            "PeriodicConv: image 6×2 is too small for kernel_size 5",
        ),
        (lambda: L.ConvExp(4, size=(1, 5), kernel_size=3), "ConvExp: image 1×5 is too small for kernel_size 3"),
        (lambda: L.ConvExp(4, max_norm=0), r"ConvExp option max_norm must be a number in \(0, 4\], got 0"),
        (lambda: L.ConvExp(4, max_norm=4.5), r"ConvExp option max_norm must be a number in \(0, 4\], got 4.5"),
        (
            lambda: L.ConvExp(4, size=(4, 4), normaliser="power", max_norm=2.5),
            r"ConvExp option max_norm must be a number in \(0, 2\] \(normaliser 'power' sums the terms for 2·max_norm\)",
        ),
        (lambda: L.ConvExp(4, normaliser="exact"), "ConvExp option normaliser must be one of"),
        (
            lambda: L.ConvExp(4, normaliser="power"),
            r"ConvExp needs size=\(H, W\) at construction with normaliser='power'",
        ),
        (lambda: L.ConvExp(4, bias=True), r"ConvExp needs size=\(H, W\) at construction with bias=True"),
        (lambda: L.ConvExp(4, conv1x1=1), "ConvExp option conv1x1 must be True or False, got 1"),
        (
            lambda: L.ConvExp(2, size=(4, 4), bias=True)(torch.zeros(1, 2, 4, 5)),
            "ConvExp with bias=True was built for 4×4 images, got 4×5",
        ),
        (
            lambda: L.ConvExp(2, size=(4, 4), normaliser="power").inverse(torch.zeros(1, 2, 5, 4)),
            "ConvExp with normaliser='power' was built for 4×4 images, got 5×4",
        ),
        (lambda: L.EmergingConv(4, diagonal="log"), "EmergingConv option diagonal must be one of"),
        (lambda: L.EmergingConv(4, dilation=0), "EmergingConv option dilation must be an integer >= 1, got 0"),
        (lambda: L.EmergingConv(4, bias="yes"), "EmergingConv option bias must be True or False"),
        (
            lambda: L.EmergingConv(4, size=(3, 8), dilation=3),
            "EmergingConv: image 3×8 is too small for kernel_size 3 with dilation 3",
        ),
        (lambda: L.PeriodicConv(4, bias=None), "PeriodicConv option bias must be True or False, got None"),
        (lambda: L.ButterflyConv(4, size=(2, 2), init="random"), "ButterflyConv option init must be one of"),
        (lambda: L.ButterflyConv(4, size=(2, 2), conv1x1=0), "ButterflyConv option conv1x1 must be True or False"),
        (
            lambda: L.WoodburyConv(4, size=(2, 3), rank=9),
            r"WoodburyConv option rank must be at most 4 \(the channels\), got 9",
        ),
        (
            lambda: L.WoodburyConv(4, size=(2, 3), spatial_rank=7),
            r"WoodburyConv option spatial_rank must be at most 6 \(the pixels H·W\), got 7",
        ),
        (lambda: L.WoodburyConv(4, size=(2, 3), rank=0), "WoodburyConv option rank must be an integer >= 1, got 0"),
        (lambda: L.WoodburyConv(4), r"WoodburyConv needs size=\(H, W\) at construction"),
        (
            lambda: L.MEWoodburyConv(4, size=(2, 3), height_rank=3),
            r"MEWoodburyConv option height_rank must be at most 2 \(the height H\), got 3",
        ),
        (
            lambda: L.MEWoodburyConv(4, size=(2, 3), width_rank=4),
            r"MEWoodburyConv option width_rank must be at most 3 \(the width W\), got 4",
        ),
        (
            lambda: L.HouseholderConv1x1(4, reflections=0),
            "HouseholderConv1x1 option reflections must be an integer >= 1, got 0",
        ),
        (lambda: L.QRConv1x1(4, diagonal="log"), "QRConv1x1 option diagonal must be one of"),
        (lambda: L.EmergingConv(0), "EmergingConv needs at least 1 channel, got 0"),
        (
            lambda: L.ButterflyConv(4, size=(2, 3), levels=4),
            r"ButterflyConv option levels must be at most 3 \(the power of 2 in C·H·W = 24\), got 4",
        ),
        (lambda: L.ButterflyConv(3, size=(1, 3)), "ButterflyConv needs an even number of entries C·H·W, got 3·1·3 = 9"),
        (lambda: L.ButterflyConv(4), r"ButterflyConv needs size=\(H, W\) at construction"),
        # sizes met only at call time
        (
            lambda: L.EmergingConv(2, kernel_size=5)(torch.zeros(1, 2, 2, 2)),
            "EmergingConv: image 2×2 is too small for kernel_size 5",
        ),
        (
            lambda: L.PeriodicConv(2).inverse(torch.zeros(1, 2, 1, 3)),
            "PeriodicConv: image 1×3 is too small for kernel_size 3",
        ),
        (
            lambda: L.WoodburyConv(2, size=(2, 3))(torch.zeros(1, 2, 3, 3)),
            "WoodburyConv was built for 2×3 images, got 3×3",
        ),
        (
            lambda: MultiScaleFlow(
                FlowConfig(image_shape=(3, 8, 8), steps=(1, 1), mixing="emerging", mixing_options={"kernel_size": 5})
            ),
            "EmergingConv: image 2×2 is too small for kernel_size 5",
        ),
    ]


@pytest.mark.parametrize("make,message", _errors(), ids=[m[:40] for _, m in _errors()])
def test_bad_options_are_clear_errors(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def _cached(layer) -> list[object]:
    """The values a layer keeps in its eval cache (objects, not ids: a freed id can come back)."""
    cache = layer._cache
    if isinstance(cache, EvalCache):
        return [value for _, value in cache._entries.values()]
    # Conv1x1 keeps (key, W, W⁻¹); the standard conv's W is its parameter itself
    return [v for v in cache[1:] if not isinstance(v, torch.nn.Parameter)] if cache is not None else []


@pytest.mark.parametrize("name", list(L.MIXING))
def test_eval_caches_are_reused_until_a_parameter_changes(name):
    layer = perturbed(L.MIXING.build(name, 4, size=(4, 6)))
    x = torch.randn(2, 4, 4, 6)
    with torch.no_grad():
        y = layer(x)[0]
        layer.inverse(y)
        first = _cached(layer)
        layer(x)
        layer.inverse(y)
        assert first and all(a is b for a, b in zip(_cached(layer), first, strict=True))
        next(layer.parameters()).add_(0.01)
        layer(x)
        layer.inverse(y)
        assert not any(a is b for a in _cached(layer) for b in first)


@pytest.mark.parametrize("name", list(L.MIXING))
def test_tiny_model_inverts_exactly(name):
    model = MultiScaleFlow(
        FlowConfig(image_shape=(3, 8, 8), steps=(1, 1), hidden_channels=8, num_blocks=1, mixing=name)
    )
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    model.initialize(x)
    model.eval()
    with torch.no_grad():
        zs, _, _ = model(x)
        torch.testing.assert_close(model.inverse(zs), x, atol=1e-8, rtol=0)
        assert torch.isfinite(model.bits_per_dim(x)).all()

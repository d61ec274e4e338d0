"""Each layer computes its reference's function: the ports of the reference code
(``mefbench.references``) against the layers on the same weights; each changed default against a
small case worked out by hand from its paper's maths; the emerging receptive field; butterfly's
channel classes; the power-iteration normaliser; and every inverse building only what it uses.
The option sets that no registry variant covers get the contract's round trip and log-det here.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import mefbench.layers as L
from mefbench import references
from mefbench.layers import butterfly, convexp, periodic
from mefbench.layers.periodic import kernel_spectrum


def moved(layer: torch.nn.Module, scale: float = 0.1, seed: int = 0) -> torch.nn.Module:
    """Every parameter moved away from its init (a coupling's zero head included)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return layer


def jacobian_logdet(layer: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    shape = x.shape[1:]
    J = torch.autograd.functional.jacobian(lambda v: layer(v.reshape(1, *shape))[0].reshape(-1), x[0].reshape(-1))
    return torch.linalg.slogdet(J).logabsdet


# ----------------------------------------------------------------------------- ports


def _port_cases():
    return [
        ("emerging", {}, (3, 5, 6)),
        ("emerging", {"kernel_size": 5, "dilation": 1}, (2, 5, 6)),
        ("emerging", {"dilation": 2, "conv1x1": False}, (2, 6, 5)),
        ("periodic", {}, (3, 5, 6)),
        ("periodic", {}, (2, 5, 5)),
        ("butterfly", {}, (4, 2, 4)),
        ("butterfly", {"levels": None, "init": "rotation"}, (4, 2, 4)),
        ("qr", {}, (4, 3, 3)),
    ]


@pytest.mark.parametrize("name,options,shape", _port_cases(), ids=lambda v: str(v))
def test_mixing_layers_compute_their_reference(name, options, shape):
    layer = moved(L.MIXING.build(name, shape[0], size=shape[1:], **options), 0.2).eval()
    port = references.port_for(name, layer)
    x = torch.randn(3, *shape)
    with torch.no_grad():
        y, logdet = layer(x)
        y_ref, logdet_ref = port.forward(x)
        torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(logdet, logdet_ref, atol=1e-12, rtol=1e-12)
        x_back, inv_logdet = layer.inverse(y)
        x_ref, inv_logdet_ref = port.inverse(y)
        torch.testing.assert_close(x_back, x_ref, atol=1e-11, rtol=1e-11)
        torch.testing.assert_close(inv_logdet, inv_logdet_ref, atol=1e-12, rtol=1e-12)


def test_emerging_is_the_reference_full_kernel_convolution():
    """The reference's plain forward: W₁·mask and W₂·mask_upsidedown as k×k kernels, "same"
    convs, then the bias (the quadrant form is its forward_fast)."""
    layer = moved(L.EmergingConv(3, size=(5, 6), conv1x1=False), 0.2)
    W1, W2 = references._emerging_full_kernels(layer)
    # the reference's masks: rows and columns ≥ centre, at the centre inputs ≤ output (W₁), and the flip
    mask = torch.zeros(3, 3, 3, 3)
    mask[:, :, 1:, 1:] = 1
    mask[:, :, 1, 1] = torch.tril(torch.ones(3, 3))
    assert torch.equal(W1 != 0, mask.bool()) and torch.equal(W2 != 0, mask.flip(0, 1, 2, 3).bool())
    x = torch.randn(2, 3, 5, 6)
    expected = F.conv2d(F.conv2d(x, W1, padding=1), W2, layer.bias, padding=1)
    torch.testing.assert_close(layer(x)[0], expected)


@pytest.mark.parametrize("train", [True, False])
def test_convexp_is_the_reference_with_its_normaliser_and_our_series_length(train):
    """With the power normaliser, the reference's count of powers set to our T − 1 and its 1e-5
    left out, the reference module computes the layer's map, in training (one power step on both
    sides, from the same u and v) and in eval."""
    layer = moved(L.ConvExp(3, size=(5, 6), normaliser="power", bias=True), 0.3).train(train)
    port = references.convexp(layer, terms=layer.terms(torch.float64) - 1, stabiliser=0.0)
    x = torch.randn(2, 3, 5, 6)
    y_ref, logdet_ref = port.forward(x)
    y, logdet = layer(x)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(logdet, logdet_ref)
    torch.testing.assert_close(layer.inverse(y)[0], port.inverse(y)[0])


def test_convexp_default_is_the_reference_where_no_normalisation_acts():
    """The default layer: the reference module's 1×1 conv and β = 0.9. While ‖M‖₂ < β neither
    normaliser acts, and with the reference's power count set to our T − 1 (and its 1e-5 left out)
    the two compute the same map. Where one acts, ours divides W by a bound b ≥ ‖M‖₂, the
    reference by its estimate σ̂ ≤ ‖M‖₂."""
    layer = L.ConvExp(3, size=(5, 6)).eval()
    assert layer.max_norm == 0.9 and isinstance(layer.conv1x1, L.StandardConv1x1) and layer.pre_bias is None
    assert float(layer.norm_bound(5, 6)) < 0.9
    port = references.convexp(layer, terms=layer.terms(torch.float64) - 1, stabiliser=0.0)
    x = torch.randn(2, 3, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), port.forward(x))
        torch.testing.assert_close(layer.inverse(x), port.inverse(x))


def test_mixture_is_flowpp():
    layer = moved(
        L.LogisticMixtureCoupling(6, net=L.net_factory(hidden_channels=8, num_blocks=1), components=3), 0.05
    ).eval()  # F within (0, 1) in float64
    port = references.port_for("mixture", layer)
    x = torch.randn(4, 6, 3, 4)
    with torch.no_grad():
        y, logdet = layer(x)
        y_ref, logdet_ref = port.forward(x)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(logdet, logdet_ref)
        # Flow++'s inverse: a bisection to 1e-12 on a CDF clamped to [1e-5, 1 − 1e-5] (here inside)
        x_ref, inv_logdet_ref = port.inverse(y)
        torch.testing.assert_close(x_ref, x, atol=1e-9, rtol=0)
        torch.testing.assert_close(layer.inverse(y)[1], inv_logdet_ref, atol=1e-8, rtol=1e-8)


def test_unknown_port_is_a_clear_error():
    with pytest.raises(ValueError, match="no reference port for 'woodbury'; ports exist for"):
        references.port_for("woodbury", L.WoodburyConv(2, size=(2, 2)))


# ----------------------------------------------------------------------------- hand-computed cases


def test_emerging_by_hand():
    """C = 1, k = 3 on a 3×3 image: K₁ reads x at (i, j), (i, j+1), (i+1, j), (i+1, j+1) with taps
    d₁, a, b, c; K₂ reads h at (i−1, j−1), (i−1, j), (i, j−1), (i, j) with e, f, g, d₂; then + β."""
    layer = L.EmergingConv(1, size=(3, 3), conv1x1=False)
    d1, a, b, c, e, f, g, d2, beta = 2.0, 0.5, -1.0, 0.25, 0.1, -0.2, 0.3, -1.5, 0.7
    with torch.no_grad():
        layer.weight1.copy_(torch.tensor([[d1, a], [b, c]]).reshape(1, 1, 2, 2))
        layer.weight2.copy_(torch.tensor([[e, f], [g, d2]]).reshape(1, 1, 2, 2))
        layer.bias.fill_(beta)
    x = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)  # x[i, j] = 3i + j + 1

    def h(i: int, j: int) -> float:
        def xv(i: int, j: int) -> float:
            return 3 * i + j + 1 if 0 <= i < 3 and 0 <= j < 3 else 0.0

        return (
            d1 * xv(i, j) + a * xv(i, j + 1) + b * xv(i + 1, j) + c * xv(i + 1, j + 1)
            if 0 <= i < 3 and 0 <= j < 3
            else 0.0
        )

    with torch.no_grad():
        y, logdet = layer(x)
    for i in range(3):
        for j in range(3):
            expected = e * h(i - 1, j - 1) + f * h(i - 1, j) + g * h(i, j - 1) + d2 * h(i, j) + beta
            assert math.isclose(float(y[0, 0, i, j]), expected, rel_tol=1e-12, abs_tol=1e-12)
    assert math.isclose(float(logdet[0]), 9 * (math.log(2.0) + math.log(1.5)), rel_tol=1e-12)
    torch.testing.assert_close(layer.inverse(y)[0], x)


def test_emerging_default_init_is_the_references():
    """Every tap ~ N(0, 0.02²) plus the identity at the centre (masked), a zero bias, a 1×1 conv first."""
    layer = L.EmergingConv(64, size=(8, 8))
    assert isinstance(layer.conv1x1, L.StandardConv1x1) and torch.equal(layer.bias, torch.zeros(64))
    assert layer.diagonal == "free" and layer.dilation == 1
    for w, centre in ((layer.weight1.detach(), (0, 0)), (layer.weight2.detach(), (1, 1))):
        diag = torch.diagonal(w[:, :, centre[0], centre[1]])
        assert abs(float(diag.mean()) - 1) < 0.01 and 0.015 < float(diag.std()) < 0.025
        off = w[:, :, 1 - centre[0], 1 - centre[1]]  # the tap diagonally away from the centre
        assert abs(float(off.std()) - 0.02) < 0.002


def test_periodic_by_hand():
    """C = 1, k = 3 with a centre c and the tap right of it t on an H×3 image: y = c·x + t·x(j + 1 mod 3)
    + b, a circulant whose eigenvalues c + t·ω^v (ω³ = 1) multiply to c³ + t³ per row."""
    c, t, b = 1.5, -0.5, 0.25
    layer = L.PeriodicConv(1, size=(2, 3))
    with torch.no_grad():
        layer.weight.zero_()
        layer.weight[0, 0, 1, 1], layer.weight[0, 0, 1, 2] = c, t
        layer.bias.fill_(b)
    x = torch.randn(2, 1, 2, 3)
    y, logdet = layer(x)
    torch.testing.assert_close(y, c * x + t * torch.roll(x, -1, dims=3) + b)
    torch.testing.assert_close(logdet, torch.full((2,), 2 * math.log(abs(c**3 + t**3))))
    torch.testing.assert_close(layer.inverse(y)[0], x)


def test_periodic_default_init_is_the_references():
    """N(0, 0.02²) on every tap plus an orthogonal centre, a zero bias."""
    layer = L.PeriodicConv(64)
    off = layer.weight.detach()[:, :, 0, :]
    assert abs(float(off.std()) - 0.02) < 0.002 and torch.equal(layer.bias, torch.zeros(64))
    centre = layer.weight[:, :, 1, 1].detach()
    assert float((centre.T @ centre - torch.eye(64)).abs().amax()) < 0.5  # orthogonal plus small noise


@pytest.mark.parametrize("normaliser", ["bound", "power"])
@pytest.mark.parametrize("w", [2.0, -2.0, 0.5])
def test_convexp_by_hand(normaliser, w):
    """C = 1, k = 1: M = w·I, its norm |w|, normalised to K = w·min(1, 0.9/|w|); y = e^K x, log|det| = n·K."""
    layer = L.ConvExp(1, size=(2, 3), kernel_size=1, normaliser=normaliser, conv1x1=False)
    assert layer.max_norm == 0.9
    with torch.no_grad():
        layer.weight.fill_(w)
    K = w * min(1.0, 0.9 / abs(w))
    x = torch.randn(2, 1, 2, 3)
    y, logdet = layer(x)
    torch.testing.assert_close(y, math.exp(K) * x)
    torch.testing.assert_close(logdet, torch.full((2,), 6 * K))


def test_butterfly_by_hand():
    """C = 2 at 1×1: the 1×1 conv W, then the one level's block [[a, b], [c, d]] on the pair."""
    layer = L.ButterflyConv(2, size=(1, 1))
    assert layer.levels == 1 and isinstance(layer.conv1x1, L.StandardConv1x1)
    assert torch.equal(layer.blocks.detach()[0, :, :, 0], torch.eye(2))  # identity init
    with torch.no_grad():
        layer.blocks.copy_(torch.tensor([[2.0, 1.0], [1.0, 3.0]]).reshape(1, 2, 2, 1))
        layer.conv1x1.W.copy_(torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    x = torch.tensor([[[[1.5]], [[-2.0]]]])
    y, logdet = layer(x)
    w = (-2.0, 1.5)  # W swaps the channels
    torch.testing.assert_close(y.reshape(2), torch.tensor([2 * w[0] + w[1], w[0] + 3 * w[1]]))
    torch.testing.assert_close(logdet, torch.tensor([math.log(5.0)]))  # |det W| = 1, det B = 5
    torch.testing.assert_close(layer.inverse(y)[0], x)


def test_butterfly_starts_as_its_1x1_conv():
    layer = L.ButterflyConv(4, size=(4, 4))
    x = torch.randn(2, 4, 4, 4)
    torch.testing.assert_close(layer(x)[0], layer.conv1x1(x)[0])


def test_mixture_by_hand():
    """K = 1, the net's output a constant: a = o = 0.5, shift b, mean μ, log-scale s. The
    mixture's CDF is one logistic, σ⁻¹(F(x)) = (x − μ)e^{−s}: y = e^{tanh(0.5)}·(x − μ)e^{−s} + b,
    log|dy/dx| = tanh(0.5) − s per element."""
    layer = L.LogisticMixtureCoupling(2, net=L.net_factory(hidden_channels=4, num_blocks=1), components=1)
    o, b, mu, s = 0.5, -0.3, 0.25, 0.1
    with torch.no_grad():
        layer.net.head.bias.copy_(torch.tensor([o, b, 1.7, mu, s]))  # [a, b, logit, mean, log-scale]
    x = torch.randn(3, 2, 2, 2)
    y, logdet = layer(x)
    torch.testing.assert_close(y[:, 1:], math.exp(math.tanh(o)) * (x[:, 1:] - mu) * math.exp(-s) + b)
    torch.testing.assert_close(logdet, torch.full((3,), 4 * (math.tanh(o) - s)))
    # the paper's bounded tanh as the option: α·tanh(β·o) at init (α = 1, β = 1/8)
    bounded = L.LogisticMixtureCoupling(
        2, net=L.net_factory(hidden_channels=4, num_blocks=1), components=1, scale="tanh"
    )
    bounded.net.load_state_dict(layer.net.state_dict())
    torch.testing.assert_close(bounded(x)[1], torch.full((3,), 4 * (math.tanh(o / 8) - s)))


# ----------------------------------------------------------------------------- structure


@pytest.mark.parametrize("k,d", [(3, 1), (5, 1), (3, 2)])
def test_emerging_receptive_field_is_k_by_k(k, d):
    """Measured from the Jacobian: the output at the centre of a 13×13 image depends on exactly the
    k×k window of (dilated) pixels around it (emerging's whole point: the raster half-plane masks
    give k × (2k − 1))."""
    layer = moved(L.EmergingConv(2, size=(13, 13), kernel_size=k, dilation=d), 0.3)
    x = torch.randn(1, 2, 13, 13)
    J = torch.autograd.functional.jacobian(lambda v: layer(v)[0][0, :, 6, 6], x)  # (2, 1, 2, 13, 13)
    seen = J.abs().sum(dim=(0, 1, 2)) > 0
    window = torch.zeros(13, 13, dtype=torch.bool)
    r = k // 2
    window[6 - r * d : 6 + r * d + 1 : d, 6 - r * d : 6 + r * d + 1 : d] = True
    assert torch.equal(seen, window)


def test_butterfly_levels_alone_keep_channel_classes():
    """C·H·W = 12·4·4 = 3·2⁶: every level pairs entries whose indices differ by a multiple of 3, so
    without the 1×1 conv channel c of pixel p only ever meets the channels c' with c' + p ≡ c + p
    (mod 3); the default 1×1 conv mixes every channel of a pixel."""
    c, h, w = 12, 4, 4
    layer = moved(L.ButterflyConv(c, size=(h, w), levels=None, conv1x1=False), 0.3)
    assert layer.levels == 6
    D = c * h * w
    J = torch.autograd.functional.jacobian(lambda v: layer(v.reshape(1, c, h, w))[0].reshape(-1), torch.randn(D))
    index = torch.arange(D)
    assert torch.equal(J != 0, (J != 0) & (index[:, None] % 3 == index[None, :] % 3))
    pixel_channels = J.reshape(c, h * w, c, h * w)[:, 5, :, 5] != 0  # pixel 5: channels c ≡ 1 − 5 (mod 3) meet
    assert torch.equal(pixel_channels, (torch.arange(c)[:, None] - torch.arange(c)[None, :]) % 3 == 0)
    full = moved(L.ButterflyConv(c, size=(h, w)), 0.3)
    J = torch.autograd.functional.jacobian(lambda v: full(v.reshape(1, c, h, w))[0].reshape(-1), torch.randn(D))
    assert (J.reshape(c, h * w, c, h * w)[:, 5, :, 5] != 0).all()


# ----------------------------------------------------------------------------- convexp's normalisers


def test_convexp_bound_and_its_gradient_are_the_svd_ones():
    """The bound's value and gradient equal autograd through the spectrum's matrix 2-norms."""
    K = torch.randn(4, 4, 3, 3, requires_grad=True)
    bound = convexp.conv_norm_bound(K, 5, 6)
    (grad,) = torch.autograd.grad(bound, K)
    reference = torch.linalg.matrix_norm(kernel_spectrum(K, 6, 7), ord=2).amax()
    (expected,) = torch.autograd.grad(reference, K)
    torch.testing.assert_close(bound, reference)
    torch.testing.assert_close(grad, expected)


def test_convexp_builds_its_bound_once_per_call(monkeypatch):
    calls = []
    real = convexp.conv_norm_bound
    monkeypatch.setattr(convexp, "conv_norm_bound", lambda *a: calls.append(1) or real(*a))
    layer = moved(L.ConvExp(3, size=(4, 5))).train()
    y, logdet = layer(torch.randn(2, 3, 4, 5))
    (y.sum() + logdet.sum()).backward()
    assert len(calls) == 1
    layer.inverse(y.detach())
    assert len(calls) == 2


def _operator_norm(K: torch.Tensor, h: int, w: int) -> float:
    """‖M‖₂ of the zero-padded conv with kernel K on h×w images, from its dense matrix."""
    c = K.shape[0]
    basis = torch.eye(c * h * w).reshape(-1, c, h, w)
    M = F.conv2d(basis, K, padding=K.shape[-1] // 2).reshape(c * h * w, -1)
    return float(torch.linalg.matrix_norm(M, 2))


def test_convexp_series_follows_the_kernels_bound(monkeypatch):
    """T = series_terms(min(b, β)): fewer terms while the kernel is below β, β's at the bound; a
    non-finite kernel gives a non-finite output (the training loop records it), not an error."""
    used = []
    real = convexp.conv_exp
    monkeypatch.setattr(convexp, "conv_exp", lambda x, K, terms: used.append(terms) or real(x, K, terms))
    layer = L.ConvExp(4, size=(6, 6)).float()
    x = torch.randn(2, 4, 6, 6, dtype=torch.float32)
    layer(x)
    bound = float(layer.norm_bound(6, 6))
    assert bound < 0.9 and used[-1] == convexp.series_terms(bound, 1e-8) < layer.terms(torch.float32) == 11
    with torch.no_grad():
        layer.weight.mul_(1000)
    layer(x)
    assert used[-1] == 11
    with torch.no_grad():
        layer.weight.fill_(float("nan"))
    assert torch.isnan(layer(x)[0]).all()


def test_convexp_power_normaliser_estimates_from_below_and_converges():
    """σ̂ = uᵀMv ≤ ‖M‖₂ after every step; with fixed weights it converges to ‖M‖₂; u and v are
    buffers saved with the layer; a training forward and its inverse use the same kernel."""
    layer = moved(L.ConvExp(3, size=(5, 6), normaliser="power"), 1.0).train()
    x = torch.randn(2, 3, 5, 6)
    tol = 1e-16  # float64
    assert layer._for_call(x, step=False)[1] == convexp.series_terms(2 * 0.9, tol)  # no step yet: T at β
    true = _operator_norm(layer.weight.detach(), 5, 6)
    with torch.no_grad():
        for _ in range(60):
            y, _ = layer(x)
            torch.testing.assert_close(layer.inverse(y)[0], x)  # no step in the inverse
            sigma = torch.sum(layer.power_u * F.conv2d(layer.power_v[None], layer.weight, padding=1)[0])
            assert float(sigma) <= true * (1 + 1e-9)
    assert abs(float(sigma) - true) < 0.01 * true
    # after a step, T follows the estimate: 2·min(σ̂, β) (here the kernel is normalised to β)
    assert int(layer.power_steps) == 60
    assert layer._for_call(x, step=False)[1] == convexp.series_terms(2 * min(float(sigma), 0.9), tol)
    small = L.ConvExp(3, size=(5, 6), normaliser="power").train()  # the init: ‖M‖ well below β
    small(x)
    assert small._for_call(x, step=False)[1] < convexp.series_terms(2 * 0.9, tol)
    assert _operator_norm(layer.kernel(5, 6).detach(), 5, 6) <= 0.9 * 1.01
    assert float(layer.norm_bound(5, 6)) <= 2 * layer.max_norm  # within the series' margin
    assert {"power_u", "power_v"} <= set(layer.state_dict())
    assert layer.terms(torch.float32) == convexp.series_terms(2 * 0.9, 1e-8)


# ----------------------------------------------------------------------------- inverses build what they use


@pytest.mark.parametrize("name", ["standard", "plu", "matexp", "qr", "householder"])
def test_per_pixel_inverse_builds_only_the_inverse(name, monkeypatch):
    layer = moved(L.MIXING.build(name, 4)).train()
    monkeypatch.setattr(type(layer), "weight", lambda self: pytest.fail("the inverse built W"))
    x, _ = layer.inverse(torch.randn(2, 4, 3, 3))
    assert x.shape == (2, 4, 3, 3)


def test_periodic_inverse_builds_its_spectrum_once(monkeypatch):
    calls = []
    real = periodic.kernel_spectrum
    monkeypatch.setattr(periodic, "kernel_spectrum", lambda *a: calls.append(1) or real(*a))
    layer = moved(L.PeriodicConv(3)).train()
    layer.inverse(torch.randn(2, 3, 4, 5))
    assert len(calls) == 1


def test_butterfly_inverse_takes_its_determinants_once(monkeypatch):
    calls = []
    real = butterfly._determinants
    monkeypatch.setattr(butterfly, "_determinants", lambda *a: calls.append(1) or real(*a))
    layer = moved(L.ButterflyConv(4, size=(2, 4), levels=None)).train()
    layer.inverse(torch.randn(2, 4, 2, 4))
    assert len(calls) == 1


# ----------------------------------------------------------------------------- options no variant covers


OPTIONS = [
    ("mixing", "emerging", {"diagonal": "exp"}),
    ("mixing", "emerging", {"dilation": 2, "bias": False}),
    ("mixing", "emerging", {"conv1x1": False, "kernel_size": 5}),
    ("mixing", "periodic", {"bias": False}),
    ("mixing", "periodic", {"kernel_size": 11}),  # the forward through Fourier space
    ("mixing", "convexp", {"conv1x1": False, "bias": True}),
    ("mixing", "convexp", {"normaliser": "power"}),
    ("mixing", "butterfly", {"levels": None, "init": "rotation", "conv1x1": False}),
    ("coupling", "mixture", {"scale": "tanh"}),
]


@pytest.mark.parametrize("kind,name,options", OPTIONS, ids=lambda v: str(v))
def test_options_keep_the_contract(kind, name, options):
    """Round trip, the log-det against the Jacobian, the inverse's log-det, gradients (eval mode:
    the power normaliser's estimate moves with every training forward)."""
    shape = (3, 6, 6) if kind == "mixing" else (5, 3, 4)
    extra = {"net": L.net_factory(hidden_channels=8, num_blocks=1)} if kind == "coupling" else {}
    layer = moved(L.REGISTRIES[kind].build(name, shape[0], size=shape[1:], **extra, **options)).eval()
    x = torch.randn(2, *shape)
    y, logdet = layer(x)
    x_back, inv_logdet = layer.inverse(y)
    torch.testing.assert_close(x_back, x, atol=1e-8, rtol=0)
    torch.testing.assert_close(inv_logdet, -logdet)
    torch.testing.assert_close(logdet[0], jacobian_logdet(layer, x), atol=1e-8, rtol=1e-8)
    layer.train()
    y, logdet = layer(x)
    (y.square().sum() + logdet.sum()).backward()
    for pname, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname


# ----------------------------------------------------------------------------- the speed comparisons


def test_reference_rows_of_the_bench(monkeypatch):
    """The bench part: a row per port and direction, the convexp row against the code it replaced,
    a factor-build row per layer whose inverse builds something else than its forward (timings
    faked: the rows' arithmetic and count, not the machine)."""
    import mefbench.bench as bench

    def fake_times(self, fns, repeats):
        slow = {"ref", "before", "inverse"}
        return {k: [2e-3 if k in slow else 1e-3] * repeats for k in fns}

    monkeypatch.setattr(bench.Setting, "times", fake_times)
    rows = bench._reference_rows(bench.Setting(torch.device("cpu"), quick=True))
    assert len(rows) == bench.row_count("references", quick=True)
    assert [r.measured for r in rows] == [2.0] * len(rows)
    assert sum("reference code / ours" in r.what for r in rows) == 3 * len(references.PORTS)
    (convexp_row,) = [r for r in rows if "convexp forward+backward: before / now" in r.what]
    assert convexp_row.target == "≥ 1.3×" and convexp_row.ok is None  # --quick: not judged
    assert any(r.what.startswith("periodic: inverse's factor build") for r in rows)


def test_reference_speed_script(tmp_path):
    import json
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks import reference_speed

    threads = torch.get_num_threads()
    dtype = torch.get_default_dtype()
    try:
        out = tmp_path / "ratios.json"
        assert reference_speed.main(["--quick", "--only", "qr,butterfly", "--json", str(out)]) == 0
        with pytest.raises(SystemExit):
            reference_speed.main(["--only", "woodbury"])
    finally:
        torch.set_num_threads(threads)
        torch.set_default_dtype(dtype)
    records = json.loads(out.read_text())["records"]
    assert [r["layer"] for r in records] == ["qr", "butterfly"]
    assert all(r[m] > 0 and math.isfinite(r[m]) for r in records for m in ("forward", "forward+backward", "inverse"))


def test_spline_against_nflows_computes_the_same_spline():
    """The asv comparison is fair: both sides compute the same spline from the same raw
    parameters (where nflows is installed; otherwise the benchmark is skipped with a clear reason)."""
    import sys
    from pathlib import Path

    root = str(Path(__file__).resolve().parents[1])
    if root not in sys.path:
        sys.path.insert(0, root)
    from benchmarks.reference_speed import SplineVsNflows

    dtype = torch.get_default_dtype()
    try:
        ours = SplineVsNflows()
        try:
            theirs = SplineVsNflows()
            theirs.setup("nflows")
        except NotImplementedError as err:
            assert "nflows is not installed" in str(err)
            return
        ours.setup("mefbench")
        theirs.widths, theirs.heights, theirs.derivatives = ours.widths, ours.heights, ours.derivatives
        y, logdet = ours.transform(ours.x)
        y_ref, logdet_ref = theirs.transform(ours.x)
        torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(logdet, logdet_ref, atol=1e-3, rtol=1e-3)
    finally:
        torch.set_default_dtype(dtype)

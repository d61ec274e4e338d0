import io

import pytest
import torch

import mefbench.layers as L
from mefbench.layers.scale_maps import BoundedTanh, _BoundedTanhFn
from mefbench.linalg import expm_action_trace, record_expm


def _ready(layer: torch.nn.Module, shape: tuple[int, ...]) -> torch.nn.Module:
    """Data-initialised (first forward in training mode), parameters moved off their init, eval mode."""
    layer.train()
    layer(torch.randn(8, *shape))
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer.eval()


# Layers outside the registries (the registries' entries are covered by test_contract.py)
LAYERS = {
    "actnorm-channel": (lambda: L.ActNorm(3), (3, 2, 3)),
    "actnorm-activation": (lambda: L.ActNorm(3, per="activation", size=(2, 3)), (3, 2, 3)),
    "squeeze-subpixel": (lambda: L.Squeeze("subpixel"), (2, 4, 2)),
    "squeeze-channel": (lambda: L.Squeeze("channel"), (2, 4, 2)),
    "sequential": (
        lambda: L.FlowSequential(
            L.ActNorm(4),
            L.MatrixExpConv1x1(4),
            L.MatrixExpCoupling(4, net=L.net_factory(hidden_channels=8, num_blocks=1)),
        ),
        (4, 2, 2),
    ),
}


@pytest.fixture(params=sorted(LAYERS))
def named_layer(request):
    factory, shape = LAYERS[request.param]
    return _ready(factory(), shape), shape, factory


def test_round_trip_and_logdet(named_layer):
    layer, shape, _ = named_layer
    x = torch.randn(2, *shape)
    y, logdet = layer(x)
    torch.testing.assert_close(layer.inverse(y)[0], x, atol=1e-10, rtol=0)
    for i in range(2):
        J = torch.autograd.functional.jacobian(lambda v: layer(v.reshape(1, *shape))[0].reshape(-1), x[i].reshape(-1))
        torch.testing.assert_close(logdet[i], torch.linalg.slogdet(J).logabsdet, atol=1e-9, rtol=0)
    torch.testing.assert_close(layer.inverse(y)[1], -logdet)


def test_state_dict_round_trip_gives_identical_outputs(named_layer):
    layer, shape, factory = named_layer
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = factory()
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(2, *shape)
    y1, ld1 = layer(x)
    fresh.train()  # an initialised ActNorm must not re-initialise after loading
    y2, ld2 = fresh(x)
    assert torch.equal(y1, y2) and torch.equal(ld1, ld2)


def test_matexp_conv_init_is_orthogonal_and_cached_in_eval():
    layer = L.MatrixExpConv1x1(5).eval()
    W = layer.W.detach()
    assert torch.allclose(W, -W.T, atol=1e-7)
    _, logdet = layer(torch.randn(1, 5, 2, 2))
    assert abs(float(logdet.detach())) < 1e-6
    built = []
    weight = layer.weight
    layer.weight = lambda: built.append(1) or weight()  # counts how often e^W is formed
    with torch.no_grad():
        layer(torch.randn(1, 5, 2, 2))
        layer(torch.randn(1, 5, 2, 2))
        assert len(built) == 1  # reused
        layer.W.add_(0.1)
        layer(torch.randn(1, 5, 2, 2))
        assert len(built) == 2  # rebuilt after the parameter changed


def test_matexp_coupling_rank_selection():
    assert L.MatrixExpCoupling(48, net=L.net_factory(hidden_channels=4, num_blocks=1)).rank == 0  # c = 24: full
    assert L.MatrixExpCoupling(50, net=L.net_factory(hidden_channels=4, num_blocks=1)).rank == 3  # c = 25: rank 3
    assert (
        L.MatrixExpCoupling(8, net=L.net_factory(hidden_channels=4, num_blocks=1), rank=2).net.head.out_channels
        == 4 * 5
    )
    assert L.MatrixExpCoupling(8, net=L.net_factory(hidden_channels=4, num_blocks=1)).net.head.out_channels == 4 * 5


def test_matexp_coupling_bounded_at_init():
    layer = L.MatrixExpCoupling(12, net=L.net_factory(hidden_channels=8, num_blocks=1))
    with torch.no_grad():
        layer.net.head.weight.normal_(0, 100.0)
    _, S = layer._unpack(layer.net(torch.randn(2, 6, 3, 3)))
    assert S.abs().sum(2).amax() <= 1.0 + 1e-12  # ∥S∥∞ per pixel; S is (B, c, c, H, W)


def test_actnorm_data_init_and_constant_channels():
    x = torch.randn(16, 3, 4, 4) * torch.tensor([2.0, 0.5, 0.0]).reshape(1, 3, 1, 1) + 3.0
    for per, size, dims in (("channel", None, (0, 2, 3)), ("activation", (4, 4), (0,))):
        layer = L.ActNorm(3, per=per, size=size)
        y, logdet = layer(x)
        assert torch.isfinite(y).all() and torch.isfinite(logdet).all()
        mean, std = y[:, :2].mean(dim=dims), y[:, :2].std(dim=dims)
        torch.testing.assert_close(mean, torch.zeros_like(mean), atol=1e-9, rtol=0)
        # unit variance with torch's default (n − 1) std, 1/(std + 1e-8) as in the official code
        torch.testing.assert_close(std, torch.ones_like(std), atol=1e-6, rtol=0)
        assert torch.equal(y[:, 2], torch.zeros_like(y[:, 2]))  # constant channel: scale 1, shifted to 0
        assert bool(layer.initialized)
        assert "initialized" in layer.state_dict()


@pytest.mark.parametrize(
    "bad,match",
    [
        ((4, float("nan")), "non-finite"),
        ((0, 0.0), "at least 2 values"),
        ((1, 0.0), "at least 2 values"),  # one sample: no std per activation
    ],
)
def test_actnorm_init_on_a_bad_batch_is_a_clear_error_and_leaves_it_uninitialised(bad, match):
    layer = L.ActNorm(3, per="activation", size=(2, 2))
    batch, value = bad
    with pytest.raises(ValueError, match=f"ActNorm: data-dependent init .*{match}"):
        layer(torch.full((batch, 3, 2, 2), value))
    assert not bool(layer.initialized)
    y, _ = layer(torch.randn(8, 3, 2, 2))  # a good batch afterwards initialises it
    assert bool(layer.initialized) and torch.isfinite(y).all()


def test_squeeze_channel_orders():
    x = torch.arange(2 * 4 * 4, dtype=torch.float64).reshape(1, 2, 4, 4)
    sub, _ = L.Squeeze("subpixel")(x)
    glow, _ = L.Squeeze("channel")(x)
    C = 2
    for dy in range(2):
        for dx in range(2):
            for c in range(C):
                assert torch.equal(sub[0, (2 * dy + dx) * C + c], x[0, c, dy::2, dx::2])
                assert torch.equal(glow[0, c * 4 + 2 * dy + dx], x[0, c, dy::2, dx::2])


@pytest.mark.parametrize(
    "make,bad,match",
    [
        (lambda: L.StandardConv1x1(4), torch.zeros(1, 3, 2, 2), "built for 4 channels, got input with 3"),
        (lambda: L.MatrixExpConv1x1(4), torch.zeros(4, 2, 2), "4-D input"),
        (lambda: L.PLUConv1x1(4), torch.zeros(1, 5, 2, 2), "built for 4 channels"),
        (
            lambda: L.AffineCoupling(4, net=L.net_factory(hidden_channels=4, num_blocks=1)),
            torch.zeros(1, 6, 2, 2),
            "built for 4 channels",
        ),
        (
            lambda: L.MatrixExpCoupling(4, net=L.net_factory(hidden_channels=4, num_blocks=1)),
            torch.zeros(2, 4, 2),
            "4-D input",
        ),
        (lambda: L.ActNorm(3), torch.zeros(1, 2, 2, 2), "built for 3 channels"),
        (lambda: L.ActNorm(3, per="activation", size=(2, 2)), torch.zeros(1, 3, 4, 4), r"H×W = \(2, 2\)"),
        (lambda: L.Squeeze(), torch.zeros(1, 3, 3, 4), "even height and width"),
        (lambda: L.Squeeze(), torch.zeros(3, 4, 4), "4-D input"),
    ],
)
def test_bad_input_errors(make, bad, match):
    with pytest.raises(ValueError, match=match):
        make()(bad.to(torch.get_default_dtype()))  # made at collection time, in float32


@pytest.mark.parametrize("name", sorted(L.COUPLING))
def test_coupling_needs_two_channels(name):
    with pytest.raises(ValueError, match="needs at least 2 channels, got 1"):
        L.COUPLING[name](1, net=L.net_factory(hidden_channels=4, num_blocks=1))


def test_bad_options():
    with pytest.raises(ValueError, match="scale map"):
        L.AffineCoupling(4, net=L.net_factory(hidden_channels=4, num_blocks=1), scale="relu")
    with pytest.raises(ValueError, match="order"):
        L.Squeeze("zigzag")
    with pytest.raises(ValueError, match="size"):
        L.ActNorm(3, per="activation")


def test_bounded_tanh_gradients():
    scale = BoundedTanh(alpha=0.7, beta=0.3)
    with torch.no_grad():
        scale.gamma.fill_(0.2)
        scale.delta.fill_(-0.1)
    o = torch.randn(2, 3, 2, 2, requires_grad=True)
    params = (o, scale.alpha, scale.beta, scale.gamma, scale.delta)

    assert torch.autograd.gradcheck(_BoundedTanhFn.apply, params)
    expected = 0.7 * torch.tanh(0.3 * o + 0.2) - 0.1
    assert torch.allclose(scale(o), expected)


def _generic_matexp_transform(layer: L.MatrixExpCoupling, x2: torch.Tensor, h: torch.Tensor):
    """The unfused path: the BoundedTanh module (torch.tanh), then expm_action_trace."""
    c = layer.c2
    t, o = h.split([c, c * c], dim=1)
    S = layer.scale(o).reshape(h.shape[0], c, c, *h.shape[2:]).transpose(1, 2)  # S[i, j] = o[j·c + i]
    y, logdet = expm_action_trace(S, x2)
    return y + t, logdet


@pytest.mark.parametrize("size", [0.0, 0.3, 6.0])  # m = 1; one step; several steps
def test_fused_matexp_coupling_matches_unfused_path(size):
    torch.manual_seed(0)
    layer = L.MatrixExpCoupling(7, net=L.net_factory(hidden_channels=4, num_blocks=1))
    with torch.no_grad():
        layer.scale.alpha.fill_(0.9 if size > 1 else 0.2)
        layer.scale.beta.fill_(0.7)
        layer.scale.gamma.fill_(0.1 if size else 0.0)
        layer.scale.delta.fill_(size / 3 if size > 1 else 0.0)
    c = layer.c2
    h = (size * torch.randn(2, c + c * c, 2, 3)).requires_grad_()
    x2 = torch.randn(2, c, 2, 3, requires_grad=True)
    g_y, g_ld = torch.randn(2, c, 2, 3), torch.randn(2)
    results = []
    for fn in (layer.transform, lambda x2, h: _generic_matexp_transform(layer, x2, h)):
        y, logdet = fn(x2, h)
        params = [h, x2, *layer.scale.parameters()]
        grads = torch.autograd.grad((y * g_y).sum() + (logdet * g_ld).sum(), params)
        results.append((y, logdet, *grads))
    for fused, generic in zip(*results, strict=True):
        torch.testing.assert_close(fused, generic, rtol=1e-10, atol=1e-11)
    if size > 1:
        with record_expm() as rec:
            layer.transform(x2, h)
        assert rec.s[0] > 1


def test_fused_matexp_coupling_gradcheck():
    from mefbench.layers.coupling import _TanhExpmCouplingFn

    torch.manual_seed(1)
    c = 3
    h = (2.0 * torch.randn(2, c + c * c, 1, 2)).requires_grad_()
    x = torch.randn(2, c, 1, 2, requires_grad=True)
    scalars = [torch.tensor(v, requires_grad=True) for v in (1.5, 0.6, 0.2, -0.3)]  # ∥S∥ > 1: two steps
    assert torch.autograd.gradcheck(lambda *a: _TanhExpmCouplingFn.apply(*a, c), (h, x, *scalars))


def test_matexp_coupling_accumulates_gradients_over_several_forwards():
    """Two forwards before one backward (gradient accumulation) give the sum of both gradients."""
    torch.manual_seed(2)
    layer = _ready(L.MatrixExpCoupling(6, net=L.net_factory(hidden_channels=4, num_blocks=1)), (6, 3, 3)).train()
    xs = [torch.randn(3, 6, 3, 3) for _ in range(2)]

    def loss(x):
        y, logdet = layer(x)
        return (y**2).sum() + logdet.sum()

    separate = [torch.autograd.grad(loss(x), list(layer.parameters())) for x in xs]
    together = torch.autograd.grad(loss(xs[0]) + loss(xs[1]), list(layer.parameters()))
    for a, b, both in zip(*separate, together, strict=True):
        torch.testing.assert_close(a + b, both)


def test_matexp_coupling_inverse_uses_the_forwards_matrices():
    """The inverse builds S exactly as the fused forward does: e^{-S} e^{S} x = x to rounding."""
    torch.manual_seed(3)
    layer = _ready(L.MatrixExpCoupling(8, net=L.net_factory(hidden_channels=4, num_blocks=1)), (8, 3, 3))
    c = layer.c2
    h = torch.randn(2, c + c * c, 3, 3)
    _, o = h.split([c, c * c], dim=1)
    s = layer.scale
    from mefbench.layers.scale_maps import bounded_tanh_via_sigmoid

    _, S = bounded_tanh_via_sigmoid(o, s.alpha, s.beta, s.gamma, s.delta)
    assert torch.equal(layer._unpack(h)[1], S.reshape(2, c, c, 3, 3).transpose(1, 2))
    torch.testing.assert_close(S, s.alpha * torch.tanh(s.beta * o + s.gamma) + s.delta, rtol=1e-12, atol=1e-13)
    x2 = torch.randn(2, c, 3, 3)
    y2, logdet = layer.transform(x2, h)
    back, inv_logdet = layer.inverse_transform(y2, h)
    torch.testing.assert_close(back, x2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(inv_logdet, -logdet)


def test_initialised_layers_do_not_read_their_init_flag_back():
    """After data-dependent init no forward reads the ``initialized`` buffer (a host sync per norm
    on a GPU): a meta tensor there, whose value cannot be read, does not stop a training step."""
    layer = L.FlowSequential(L.ActNorm(4), L.MatrixExpCoupling(4, net=L.net_factory(hidden_channels=8, num_blocks=2)))
    x = torch.randn(8, 4, 3, 3)
    layer.train()
    layer(x)
    flags = [m for m in layer.modules() if hasattr(m, "_needs_init")]
    assert len(flags) == 1 + 2 + 2 * 6  # ActNorm; the stem and its norm; per block three ConvNorms and their norms
    for m in flags:
        m.initialized = torch.empty((), dtype=torch.bool, device="meta")
    layer(x)[1].sum().backward()
    state = L.ActNorm(4).state_dict()
    fresh = L.ActNorm(4)
    fresh.load_state_dict(state)  # loading re-reads the flag: an uninitialised state initialises again
    fresh.train()
    fresh(x)
    assert bool(fresh.initialized)


def test_actnorm_never_changes_the_dtype_silently():
    layer = L.ActNorm(3).float()
    with pytest.raises(ValueError, match=r"ActNorm has torch\.float32 parameters but got torch\.float64 input"):
        layer(torch.zeros(2, 3, 2, 2, dtype=torch.float64))

import math

import numpy as np
import pytest
import scipy.linalg
import torch

from mefbench import linalg
from mefbench.linalg import expm, expm_action, inf_norm, phi, record_expm, series_terms


def _matrices(n: int, norm: float, kind: str, batch: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(int(norm * 1000) + n)
    X = torch.randn(batch, n, n, generator=g, dtype=torch.float64)
    if kind == "nonnormal":  # strongly non-normal: upper triangular with a large off-diagonal part
        X = torch.triu(X) + 3 * torch.triu(X, 1)
    return X / inf_norm(X)[:, None, None] * norm


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


NORMS = [1e-3, 0.1, 1.0, 5.0, 20.0, 50.0]


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("kind", ["random", "nonnormal"])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-11), (torch.float32, 2e-5)])
def test_expm_and_action_match_scipy(norm, kind, dtype, tol):
    X = _matrices(6, norm, kind)
    ref = np.stack([scipy.linalg.expm(x) for x in X.numpy()])
    E = expm(X.to(dtype)).double().numpy()
    assert np.isfinite(E).all()
    for r, e in zip(ref, E, strict=True):
        assert _rel(e, r) < tol
    v = torch.randn(8, 6, dtype=torch.float64)
    y = expm_action(X.to(dtype), v.to(dtype)).double().numpy()
    y_ref = np.einsum("bij,bj->bi", ref, v.numpy())
    err = np.linalg.norm(y - y_ref, axis=-1) / np.linalg.norm(y_ref, axis=-1)
    # relative to the size of e^S times x, the scale at which rounding happens
    scale = (
        np.linalg.norm(ref, ord=2, axis=(1, 2)) * np.linalg.norm(v.numpy(), axis=-1) / np.linalg.norm(y_ref, axis=-1)
    )
    assert (err < tol * np.maximum(scale, 1)).all()


def test_expm_batch_shapes_and_mixed_norms():
    X = torch.cat([_matrices(4, 1e-3, "random", 3), _matrices(4, 40.0, "random", 3)]).reshape(2, 3, 4, 4)
    E = expm(X)
    assert E.shape == (2, 3, 4, 4)
    ref = np.stack([scipy.linalg.expm(x) for x in X.reshape(-1, 4, 4).numpy()]).reshape(2, 3, 4, 4)
    for r, e in zip(ref.reshape(-1, 4, 4), E.reshape(-1, 4, 4).numpy(), strict=True):
        assert _rel(e, r) < 1e-11


def test_gradcheck_expm_and_action():
    X = (_matrices(4, 3.0, "random", 2)).requires_grad_()
    assert torch.autograd.gradcheck(expm, (X,))
    v = torch.randn(2, 4, requires_grad=True)
    assert torch.autograd.gradcheck(expm_action, (X, v))
    Y = _matrices(3, 2.0, "random", 2).requires_grad_()
    assert torch.autograd.gradcheck(phi, (Y,))


@pytest.mark.parametrize("norm", [1e-3, 0.7, 8.0, 40.0])
def test_low_rank_identity_and_logdet(norm):
    A = torch.randn(5, 6, 2)
    B = torch.randn(5, 2, 6)
    scale = (norm / inf_norm(B @ A)).sqrt()[:, None, None]
    A, B = A * scale, B * scale
    full = torch.from_numpy(np.stack([scipy.linalg.expm(m) for m in (A @ B).numpy()]))
    low = torch.eye(6) + A @ phi(B @ A) @ B
    assert torch.allclose(low, full, rtol=1e-10, atol=1e-10 * full.abs().max())
    tr = torch.diagonal(B @ A, dim1=-2, dim2=-1).sum(-1)
    if norm < 10:  # at large norms e^{AB} is too ill-conditioned for a reliable slogdet
        assert torch.allclose(tr, torch.linalg.slogdet(full).logabsdet, atol=1e-8)
    assert torch.allclose(tr, torch.diagonal(A @ B, dim1=-2, dim2=-1).sum(-1))


def test_phi_matches_definition():
    X = _matrices(5, 0.9, "random", 4)
    ref = sum(torch.linalg.matrix_power(X, k) / float(math.factorial(k + 1)) for k in range(30))
    assert torch.allclose(phi(X), ref, atol=1e-13)


def test_recording_is_off_by_default_and_records_when_on():
    X = _matrices(4, 5.0, "random", 3)
    with record_expm() as rec:
        expm(X)
        expm_action(X, torch.randn(3, 4))
    assert rec.kinds == ["expm", "expm_action"]
    assert rec.s[0] == 4  # ⌈log2 5⌉ + 1
    assert rec.m[0] == series_terms(5.0 / 16, 1e-16)
    summary = rec.summary()
    assert summary["m"]["count"] == 2 and summary["m"]["max"] >= summary["m"]["min"]
    expm(X)
    assert len(rec) == 2  # the block has ended


def test_series_terms_bound():
    for norm in [1e-6, 0.1, 0.5, 1.0, 3.0]:
        m = series_terms(norm, 1e-8)
        tail = sum(norm**k / math.factorial(k) for k in range(m, m + 60))
        assert tail <= 1e-8
        if m > 1:
            tail_shorter = sum(norm**k / math.factorial(k) for k in range(m - 1, m + 60))
            assert tail_shorter > 1e-8 / 10 or norm ** (m - 1) < 1e-8


def test_errors():
    with pytest.raises(ValueError, match="square"):
        expm(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="non-finite"):
        expm(torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="to match S"):
        expm_action(torch.zeros(3, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="layout='channels'"):
        expm_action(torch.zeros(2, 3, 3, 4), torch.zeros(2, 4, 4), layout="channels")


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex128])
def test_non_real_floating_input_is_refused_not_truncated(dtype):
    """e^[[0,1],[-1,0]] on an integer matrix used to come back as integer zeros."""
    X = torch.tensor([[0, 1], [-1, 0]]).to(dtype)
    for f in (expm, phi):
        with pytest.raises(TypeError, match=rf"{f.__name__} needs a real floating-point X .*got {dtype}"):
            f(X)
    with pytest.raises(TypeError, match=rf"expm_action needs a real floating-point S .*got {dtype}"):
        expm_action(X, torch.ones(2))
    with pytest.raises(TypeError, match=rf"real floating-point x .*got {dtype}"):
        expm_action(torch.zeros(2, 2), torch.ones(2).to(dtype))
    with pytest.raises(TypeError, match="real floating-point S"):
        expm_action(X[None, :, :, None], torch.ones(1, 2, 1), layout="channels")


def test_mixed_dtypes_are_refused():
    S, x = torch.zeros(2, 2, dtype=torch.float64), torch.ones(2, dtype=torch.float32)
    with pytest.raises(TypeError, match=r"S and x of one dtype .* got S torch.float64 on cpu and x torch.float32"):
        expm_action(S, x)
    with pytest.raises(TypeError, match="one dtype"):
        expm_action(S[None, :, :, None], x[None, :, None], layout="channels")


@pytest.mark.parametrize("s_shape,x_shape", [((0, 3, 3, 4, 4), (0, 3, 4, 4)), ((2, 3, 3, 0, 4), (2, 3, 0, 4))])
def test_empty_channels_batches(s_shape, x_shape):
    S, x = torch.zeros(s_shape, requires_grad=True), torch.ones(x_shape, requires_grad=True)
    y, trace = linalg.expm_action_trace(S, x)
    assert y.shape == x.shape and trace.shape == (s_shape[0],) and not trace.any()
    (y.sum() + trace.sum()).backward()
    assert S.grad.shape == S.shape and x.grad.shape == x.shape
    assert expm_action(S, x, layout="channels").shape == x.shape


def test_channels_layout_matches_last_layout():
    S = torch.randn(3, 5, 5, 2, 2) / 3
    x = torch.randn(3, 5, 2, 2)
    y = expm_action(S, x, layout="channels")
    last = expm_action(S.permute(0, 3, 4, 1, 2), x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
    assert torch.allclose(y, last, atol=1e-13)
    S.requires_grad_()
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda S, x: expm_action(S, x, layout="channels"), (S, x))


def test_large_batch_products_match_the_broadcast_path(monkeypatch):
    """Beyond _BROADCAST_MAX the products loop over columns; the results and gradients agree."""
    S = (torch.randn(2, 4, 4, 3) / 2).requires_grad_()
    x = torch.randn(2, 4, 3, requires_grad=True)
    g = torch.randn(2, 4, 3)
    broadcast = torch.autograd.grad((expm_action(S, x, layout="channels") * g).sum(), (S, x))
    monkeypatch.setattr(linalg, "_BROADCAST_MAX", 0)
    looped = torch.autograd.grad((expm_action(S, x, layout="channels") * g).sum(), (S, x))
    for a, b in zip(broadcast, looped, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert torch.autograd.gradcheck(lambda S, x: expm_action(S, x, layout="channels"), (S, x))


@pytest.mark.parametrize("tol", [1e-8, 1e-16])
def test_action_plan_minimises_products(tol):
    """The plan is the fewest products s·(m − 1) over every step count (the fewest steps among
    equals; m = 1, no product, only in one step), also where a search from ∥S∥∞/20 gave up."""

    def terms(norm: float) -> int:
        try:
            return series_terms(norm, tol)
        except ValueError:
            return linalg.MAX_TERMS

    for norm in [0.0, 1e-12, 5e-9, 1e-8, 0.05, 0.5, 1.0, 3.0, 17.0, 60.0, 300.0, 1e3, 1e4]:
        plans = [(s * (m - 1), s, m) for s in range(1, int(norm) + 3)
                 if (m := terms(norm / s)) < linalg.MAX_TERMS and (m > 1 or s == 1)]  # fmt: skip
        _, s, m = min(plans)
        assert linalg._action_plan(norm, tol) == (s, m)


def test_series_terms_refuses_a_tolerance_it_cannot_meet():
    assert series_terms(3.0, 1e-16) < linalg.MAX_TERMS
    with pytest.raises(ValueError, match="cannot bring the tail"):
        series_terms(30.0, 1e-16)


# Plans at the norms training sees: (steps, terms) as the planner gave them before it searched for the
# fewest products at any norm (the θ_m table), for float32 (tolerance 1e-8) and float64 (1e-16). Pinned: the common case must not move.
TRAINING_NORMS = [0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0,
                  10.0, 12.0, 15.0, 18.0, 20.0, 22.0, 25.0, 28.0, 30.0]  # fmt: skip
TRAINING_PLANS = {
    torch.float32: [(1, 4), (1, 4), (1, 5), (1, 6), (1, 7), (1, 8), (1, 9), (1, 10), (1, 12), (1, 14), (1, 16),
                    (1, 20), (1, 23), (1, 26), (1, 29), (1, 32), (1, 35), (2, 26), (2, 29), (2, 34), (2, 38),
                    (3, 31), (3, 33), (3, 36), (3, 39), (4, 34)],
    torch.float64: [(1, 7), (1, 8), (1, 9), (1, 10), (1, 12), (1, 13), (1, 15), (1, 17), (1, 19), (1, 22), (1, 24),
                    (1, 28), (1, 32), (1, 36), (2, 28), (2, 30), (2, 32), (2, 36), (3, 32), (3, 36), (4, 34),
                    (4, 36), (4, 38), (5, 36), (5, 38), (6, 36)],
}  # fmt: skip


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_plans_at_training_norms_are_unchanged(dtype):
    tol = linalg.taylor_tolerance(dtype)
    assert [linalg._action_plan(norm, tol) for norm in TRAINING_NORMS] == TRAINING_PLANS[dtype]
    # through action_plan, from a batch whose largest ∞-norm is 30, in both storage orders
    S = torch.zeros(2, 3, 3, 4, dtype=dtype)
    S[1, 0, :, 2] = torch.tensor([10.0, -12.0, 8.0], dtype=dtype)
    assert (
        linalg.action_plan(S)
        == linalg.action_plan(S.transpose(1, 2).contiguous(), transposed=True)
        == TRAINING_PLANS[dtype][-1]
    )


# ----------------------------------------------------------------------------- large norms

LARGE_NORMS = [1e3, 1e4, 1e5]
DTYPES = [torch.float32, torch.float64]


def _large(kind: str, norm: float, n: int = 6, batch: int = 4) -> torch.Tensor:
    """float64 matrices with ∥X∥∞ = norm (about, for "negdef") whose exponential is representable.

    skew: e^X orthogonal. negdef: symmetric, eigenvalues −0.5 and down to −norm (∥e^X∥ = e^−0.5).
    shifted: skew − 5·I (e^X = e^−5 times an orthogonal matrix).
    """
    g = torch.Generator().manual_seed(int(norm) + n)
    if kind == "negdef":
        Q = torch.linalg.qr(torch.randn(batch, n, n, generator=g, dtype=torch.float64))[0]
        lam = torch.cat([torch.full((batch, 1), 0.5, dtype=torch.float64),
                         torch.rand(batch, n - 1, generator=g, dtype=torch.float64) * norm], 1)  # fmt: skip
        X = -(Q * lam[:, None, :]) @ Q.mT
        return (X + X.mT) / 2
    K = torch.randn(batch, n, n, generator=g, dtype=torch.float64)
    K = K - K.mT
    if kind == "skew":
        return K / inf_norm(K)[:, None, None] * norm
    return K / inf_norm(K)[:, None, None] * (norm - 5) - 5 * torch.eye(n, dtype=torch.float64)


def _large_tol(norm: float, dtype: torch.dtype) -> float:
    """float32: its own rounding (computed in float64 above LARGE_NORM); float64: ∥X∥∞·u, the
    conditioning of e^X for large imaginary eigenvalues, with a margin of 45."""
    return 1e-6 if dtype == torch.float32 else 5e-15 * norm


@pytest.mark.parametrize("norm", LARGE_NORMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_skew_symmetric_keeps_the_norm_at_large_norms(norm, dtype):
    """e^S is orthogonal for skew-symmetric S: |e^S x| = |x| and (e^S)ᵀe^S = I, and both match scipy."""
    S = _large("skew", norm).to(dtype)
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    tol = _large_tol(norm, dtype)
    y, logdet = linalg.expm_action_trace(S.permute(1, 2, 0).unsqueeze(0), x.T.unsqueeze(0))
    y = y.squeeze(0).T.double()
    assert logdet.item() == torch.diagonal(S, dim1=1, dim2=2).sum().item()  # the log-det is still Σ tr S
    x, S64 = x.double(), S.double()
    assert ((y.norm(dim=1) / x.norm(dim=1) - 1).abs() < tol).all()
    ref = torch.from_numpy(np.stack([scipy.linalg.expm(m) for m in S64.numpy()]))
    assert ((y - (ref @ x.unsqueeze(-1)).squeeze(-1)).norm(dim=1) / x.norm(dim=1) < tol).all()
    E = expm(S).double()
    assert (E.mT @ E - torch.eye(6, dtype=torch.float64)).abs().max() < tol
    assert (E - ref).abs().max() < tol


@pytest.mark.parametrize("norm", LARGE_NORMS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["negdef", "shifted"])
def test_representable_exponentials_match_scipy_at_large_norms(kind, norm, dtype):
    X = _large(kind, norm).to(dtype)
    X64 = X.double().numpy()
    x = torch.randn(4, 6, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    ref = np.stack([scipy.linalg.expm(m) for m in X64])
    tol = _large_tol(norm, dtype)
    y = expm_action(X, x).double().numpy()
    y_ref = np.einsum("bij,bj->bi", ref, x.double().numpy())
    assert (np.linalg.norm(y - y_ref, axis=1) / np.linalg.norm(x.double().numpy(), axis=1) < tol).all()
    assert _rel(expm(X).double().numpy(), ref) < tol
    phi_ref = np.stack([np.linalg.solve(m, e - np.eye(6)) for m, e in zip(X64, ref, strict=True)])  # X⁻¹(e^X − I)
    assert _rel(phi(X).double().numpy(), phi_ref) < tol


@pytest.mark.parametrize("norm", LARGE_NORMS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_overflow_raises_a_clear_error(norm, dtype):
    """e^X = e^norm·(orthogonal) overflows float32 and float64: an error, not inf or NaN."""
    X = (_large("skew", norm, n=4, batch=2) + norm * torch.eye(4, dtype=torch.float64)).to(dtype)
    x = torch.ones(2, 4, dtype=dtype)
    for name, f in [("expm", expm), ("phi", phi), ("expm_action", lambda X: expm_action(X, x))]:
        with pytest.raises(ValueError, match=f"{name}: the result overflows {dtype}") as error:
            f(X)
        assert isinstance(error.value, linalg.ExpmOverflowError)  # a NonFiniteError: training counts it


def test_overflow_depends_on_the_dtype():
    """e^100 ≈ 2.7e43 overflows float32 (largest 3.4e38), not float64; a non-finite x is named."""
    S = _large("skew", 50.0, n=4, batch=2) + 100 * torch.eye(4, dtype=torch.float64)  # e^S = e^100·(orthogonal)
    x = torch.randn(2, 4, dtype=torch.float64)
    y = expm_action(S, x)
    torch.testing.assert_close(y.norm(dim=1), math.exp(100) * x.norm(dim=1), rtol=1e-13, atol=0)
    with pytest.raises(ValueError, match=r"overflows torch\.float32"):
        expm_action(S.float(), x.float())
    x[0, 1] = float("nan")
    with pytest.raises(linalg.NonFiniteError, match="x has inf or NaN"):
        expm_action(S, x)


@pytest.mark.parametrize("transposed", [False, True])
def test_fused_coupling_functions_at_large_norms(transposed):
    """action_plan, action_forward and action_backward as the fused coupling calls them, at ∥S∥∞ = 1e4:
    value, log-det and gradients against torch.linalg.matrix_exp through autograd."""
    b, n, p = 2, 4, 3
    M = _large("shifted", 1e4, n=n, batch=b * p).reshape(b, p, n, n)  # S per (sample, pixel)
    store = (M.permute(0, 3, 2, 1) if transposed else M.permute(0, 2, 3, 1)).contiguous()  # (b, n, n, p)
    g = torch.Generator().manual_seed(3)
    x, gy = torch.randn(2, b, n, p, generator=g, dtype=torch.float64)
    g_trace = torch.randn(b, generator=g, dtype=torch.float64)
    with record_expm() as rec:
        steps, m = linalg.action_plan(store, transposed=transposed)
    assert m == 0 and steps == linalg._squarings(1e4) and rec.kinds == ["expm_action"]
    y, trace, A, krylov = linalg.action_forward(store, x, steps, m, transposed=transposed)
    dS_out = torch.empty_like(store)
    dS, gx = linalg.action_backward(A, krylov, gy, g_trace, m, True, dS_out=dS_out, transposed=transposed)
    assert dS is dS_out
    M_ = M.clone().requires_grad_()
    x_ = x.clone().requires_grad_()
    y_ref = (torch.linalg.matrix_exp(M_) @ x_.permute(0, 2, 1).unsqueeze(-1)).squeeze(-1).permute(0, 2, 1)
    trace_ref = torch.diagonal(M_, dim1=2, dim2=3).sum(dim=(1, 2))
    dM_ref, gx_ref = torch.autograd.grad((y_ref * gy).sum() + (trace_ref * g_trace).sum(), (M_, x_))
    dS_ref = dM_ref.permute(0, 3, 2, 1) if transposed else dM_ref.permute(0, 2, 3, 1)
    torch.testing.assert_close(trace, trace_ref.detach(), rtol=1e-15, atol=0)
    for ours, theirs in [(y, y_ref), (gx, gx_ref), (dS, dS_ref)]:
        torch.testing.assert_close(ours, theirs.detach(), rtol=0, atol=1e-10 * theirs.abs().max().item())


def test_large_norm_gradients_match_autograd():
    S = _large("shifted", 1e3, n=3, batch=2).requires_grad_()
    x = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    ours = torch.autograd.grad(expm_action(S, x).sum(), (S, x))
    ref = torch.autograd.grad((torch.linalg.matrix_exp(S) @ x.unsqueeze(-1)).sum(), (S, x))
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-11 * b.abs().max().item())


def test_scratch_buffers_survive_inference_mode_and_threads():
    """Reused scratch buffers: a call under inference_mode, then one with autograd, then one in a thread."""
    import threading

    S = torch.randn(2, 3, 3) / 4
    x = torch.randn(2, 3)
    expected = torch.from_numpy(np.stack([scipy.linalg.expm(m) @ v for m, v in zip(S.numpy(), x.numpy(), strict=True)]))
    with torch.inference_mode():
        torch.testing.assert_close(expm_action(S, x), expected)
    S.requires_grad_()
    expm_action(S, x).sum().backward()
    assert S.grad is not None and torch.isfinite(S.grad).all()
    results = []
    thread = threading.Thread(target=lambda: results.append(expm_action(S.detach(), x)))
    thread.start()
    thread.join()
    torch.testing.assert_close(results[0], expected)


def test_second_derivatives_are_refused_clearly():
    S = (torch.randn(2, 3, 3) / 4).requires_grad_()
    x = torch.randn(2, 3)
    (g,) = torch.autograd.grad(expm_action(S, x).sum(), S, create_graph=True)
    with pytest.raises(RuntimeError, match=r"once_differentiable|does not require grad"):
        g.sum().backward()

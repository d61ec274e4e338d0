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
    for r, e in zip(ref, E):
        assert _rel(e, r) < tol
    v = torch.randn(8, 6, dtype=torch.float64)
    y = expm_action(X.to(dtype), v.to(dtype)).double().numpy()
    y_ref = np.einsum("bij,bj->bi", ref, v.numpy())
    err = np.linalg.norm(y - y_ref, axis=-1) / np.linalg.norm(y_ref, axis=-1)
    # relative to the size of e^S times x, the scale at which rounding happens
    scale = np.linalg.norm(ref, ord=2, axis=(1, 2)) * np.linalg.norm(v.numpy(), axis=-1) / np.linalg.norm(y_ref, axis=-1)
    assert (err < tol * np.maximum(scale, 1)).all()


def test_expm_batch_shapes_and_mixed_norms():
    X = torch.cat([_matrices(4, 1e-3, "random", 3), _matrices(4, 40.0, "random", 3)]).reshape(2, 3, 4, 4)
    E = expm(X)
    assert E.shape == (2, 3, 4, 4)
    ref = np.stack([scipy.linalg.expm(x) for x in X.reshape(-1, 4, 4).numpy()]).reshape(2, 3, 4, 4)
    for r, e in zip(ref.reshape(-1, 4, 4), E.reshape(-1, 4, 4).numpy()):
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
            assert tail_shorter > 1e-8 / 10 or norm**(m - 1) < 1e-8


def test_errors():
    with pytest.raises(ValueError, match="square"):
        expm(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="non-finite"):
        expm(torch.full((2, 2), float("nan")))
    with pytest.raises(ValueError, match="to match S"):
        expm_action(torch.zeros(3, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="layout='channels'"):
        expm_action(torch.zeros(2, 3, 3, 4), torch.zeros(2, 4, 4), layout="channels")


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
    for a, b in zip(broadcast, looped):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-13)
    assert torch.autograd.gradcheck(lambda S, x: expm_action(S, x, layout="channels"), (S, x))


@pytest.mark.parametrize("tol", [1e-8, 1e-16])
def test_action_plan_minimises_products(tol):
    """The early stop of the plan search finds the same plan as trying every step count."""
    for norm in [0.0, 1e-12, 5e-9, 1e-8, 0.05, 0.5, 1.0, 3.0, 17.0, 60.0, 300.0]:
        s_min = max(1, math.ceil(norm / (linalg.MAX_TERMS / 2)))
        plans = [(s * (series_terms(norm / s, tol) - 1), s) for s in range(s_min, s_min + 64)
                 if series_terms(norm / s, tol) < linalg.MAX_TERMS]  # fmt: skip
        _, s = min(plans)
        assert linalg._action_plan(norm, tol) == (s, series_terms(norm / s, tol))


def test_scratch_buffers_survive_inference_mode_and_threads():
    """Reused scratch buffers: a call under inference_mode, then one with autograd, then one in a thread."""
    import threading

    S = torch.randn(2, 3, 3) / 4
    x = torch.randn(2, 3)
    expected = torch.from_numpy(np.stack([scipy.linalg.expm(m) @ v for m, v in zip(S.numpy(), x.numpy())]))
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
    with pytest.raises(RuntimeError, match="once_differentiable|does not require grad"):
        g.sum().backward()

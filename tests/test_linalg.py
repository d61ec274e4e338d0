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


# Plans at the norms training sees: (steps, terms) as the planner gave them before issue 11, item 3,
# for float32 (tolerance 1e-8) and float64 (1e-16). Pinned: the common case must not move.
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
    # through _plan, from a batch whose largest ∞-norm is 30, in both storage orders
    S = torch.zeros(2, 3, 3, 4, dtype=dtype)
    S[1, 0, :, 2] = torch.tensor([10.0, -12.0, 8.0], dtype=dtype)
    assert linalg._plan(S) == linalg._plan(S.transpose(1, 2).contiguous(), transposed=True) == TRAINING_PLANS[dtype][-1]


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

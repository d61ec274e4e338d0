"""Matrix exponentials for flows: e^X, e^S x and φ(X) = Σ X^k/(k+1)!, batched and differentiable.

All three use scaling and a Taylor series whose length is chosen from norm bounds (docs/design.md §2):
the ∞-norm of every matrix in the batch is computed on the device, its maximum is read back to the
host once per call, and the number of squarings s and of series terms m follow from that bound. No
value is read back once per series term, and no count is capped: every finite norm gets as many
squarings or steps as it needs.

Two regimes, split at ∥X∥∞ = :data:`LARGE_NORM` (32):

- At and below it (what training sees, ∥S∥∞ ≲ 30): e^S x is applied as (e^{S/s})^s x with the
  fewest matrix-vector products; e^X and φ(X) square in the input's dtype. Nothing is checked:
  ∥e^X∥∞ ≤ e^32 ≈ 8e13 cannot overflow float32 (nor can e^S x unless |x| > 1e24).
- Above it: e^S x forms e^S (scaling and squaring, O((m + s)·n³) per matrix, s ≈ log2 ∥S∥∞) and
  multiplies, instead of taking ∥S∥∞/10 (float32) to ∥S∥∞/6 (float64) steps of 38 products each;
  e^X, φ(X) and e^S x are computed in float64, because the s squarings multiply rounding errors by
  about 2^s ≈ 2∥X∥∞; the result is read back once more, and one that overflows its dtype raises
  :class:`ExpmOverflowError` instead of coming back as inf or NaN.

The relative error is then about ∥X∥∞ times float64's unit roundoff, the conditioning of e^X when
X has large imaginary eigenvalues: below float32's rounding up to ∥X∥∞ ≈ 1e8 for float32 inputs.

The number of terms and squarings of every call can be recorded for the paper's Table 6 with
:func:`record_expm`; recording is off by default and costs nothing when off.

The pieces of :func:`expm_action` are public for layers that fuse it with their own maths into one
autograd node (the matrix-exponential coupling does, with its scale map): :func:`action_plan`
(steps and terms from the norm bound, recorded), :func:`action_forward` (e^S x and Σ tr S, keeping
what the backward needs), :func:`action_backward` (the hand-written gradients) and
:func:`workspace` (per-thread scratch buffers for values that die inside one pass). They use the
channels layout, S (B, n, n, P) and x (B, n, P).
Under ``torch.compile`` the three entry points (:func:`expm`, :func:`expm_action_trace` and so
:func:`expm_action`, :func:`phi`) run eagerly (``torch.compiler.disable``): the series length
follows from a norm read back to the host, which a compiled graph would either break at or
specialise on (a recompilation per new length), and the hand-written backward writes into
per-thread scratch buffers with ``out=``, which inductor cannot trace once shapes are dynamic
(fake-tensor ``set_`` on a symbolic storage size). The code around them compiles.
"""

from __future__ import annotations

import bisect
import functools
import math
import threading
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "LARGE_NORM",
    "ExpmOverflowError",
    "ExpmRecorder",
    "NonFiniteError",
    "action_backward",
    "action_forward",
    "action_plan",
    "expm",
    "expm_action",
    "expm_action_trace",
    "inf_norm",
    "phi",
    "record_expm",
    "series_terms",
    "taylor_tolerance",
    "workspace",
]


class NonFiniteError(ValueError):
    """A matrix exponential met inf or NaN: in its input, or (:class:`ExpmOverflowError`) in its result."""


class ExpmOverflowError(NonFiniteError):
    """The result of a matrix exponential is too large for its dtype."""


# ∥X / 2^s∥∞ ≤ THETA after scaling (the paper's choice: s = ⌈log2 max(n, 1/2)⌉ + 1).
THETA = 0.5
MAX_TERMS = 40
# Above this ∥X∥∞ (beyond the ∥S∥∞ ≲ 30 that training sees) the exponentials take the large-norm
# route of the module docstring: e^S formed, float64, the result checked for overflow.
LARGE_NORM = 32.0


@dataclass
class ExpmRecorder:
    """Collects (kind, m, s, batch) of every expm / expm_action / phi call while active."""

    kinds: list[str] = field(default_factory=list)
    m: list[int] = field(default_factory=list)
    s: list[int] = field(default_factory=list)
    batch: list[int] = field(default_factory=list)

    def add(self, kind: str, m: int, s: int, batch: int) -> None:
        self.kinds.append(kind)
        self.m.append(m)
        self.s.append(s)
        self.batch.append(batch)

    def __len__(self) -> int:
        return len(self.m)

    def clear(self) -> None:
        for values in (self.kinds, self.m, self.s, self.batch):
            values.clear()

    def summary(self) -> dict[str, dict[str, float]]:
        """Mean, std, max and min of m and of s over the recorded calls (empty dict if none)."""
        if not self.m:
            return {}
        out = {}
        for name, values in (("m", self.m), ("s", self.s)):
            t = torch.tensor(values, dtype=torch.float64)
            out[name] = {
                "mean": t.mean().item(),
                "std": t.std(unbiased=False).item(),
                "max": t.max().item(),
                "min": t.min().item(),
                "count": len(values),
            }
        return out


_RECORDERS: list[ExpmRecorder] = []


@contextmanager
def record_expm(recorder: ExpmRecorder | None = None) -> Iterator[ExpmRecorder]:
    """Record m (series terms) and s (squarings or steps) of every call made inside the block."""
    recorder = recorder if recorder is not None else ExpmRecorder()
    _RECORDERS.append(recorder)
    try:
        yield recorder
    finally:
        _RECORDERS.remove(recorder)


def _record(kind: str, m: int, s: int, batch: int) -> None:
    for recorder in _RECORDERS:
        recorder.add(kind, m, s, batch)


def taylor_tolerance(dtype: torch.dtype) -> float:
    """Truncation tolerance of the series: the paper's 1e-8 in single precision, 1e-16 in double."""
    return 1e-16 if dtype == torch.float64 else 1e-8


def series_terms(norm: float, tol: float) -> int:
    """Smallest m such that the Taylor tail Σ_{k≥m} ∥A∥^k/k! is at most tol, for ∥A∥ = norm < m.

    The tail is bounded by ∥A∥^m/m! · (m+1)/(m+1-∥A∥); terms 0..m-1 are summed. Raises ValueError
    when more than MAX_TERMS (40) terms would be needed: scale A down first.
    """
    m = _terms(norm, tol)
    if m is None:
        raise ValueError(
            f"series_terms: {MAX_TERMS} Taylor terms cannot bring the tail for ∥A∥ = {norm:g} below {tol:g} "
            f"(they reach it up to ∥A∥ = {_theta_table(tol)[-1]:.4g}); scale A down first"
        )
    return m


def _terms(norm: float, tol: float) -> int | None:
    """:func:`series_terms`, or None where MAX_TERMS terms are not enough. Nondecreasing in norm,
    also in floating point (every operation in it is monotone)."""
    term = 1.0  # ∥A∥^k / k!
    for m in range(1, MAX_TERMS + 1):
        term *= norm / m
        if m > norm and term * (m + 1) / (m + 1 - norm) <= tol:
            return m
    return None


@functools.lru_cache(maxsize=8)
def _theta_table(tol: float) -> tuple[float, ...]:
    """θ_m for m = 1..MAX_TERMS: the largest float ∥A∥ for which m terms meet tol.

    So m terms are enough for ∥A∥ = θ exactly when θ ≤ θ_m. Found once per tolerance by bisection
    down to adjacent floats (a few ms).
    """
    table = []
    for m in range(1, MAX_TERMS + 1):
        lo, hi = 0.0, float(m)  # m terms are enough at lo, never at hi (they need m > ∥A∥)
        while lo < (mid := (lo + hi) / 2) < hi:
            terms = _terms(mid, tol)
            if terms is not None and terms <= m:
                lo = mid
            else:
                hi = mid
        table.append(lo)
    return tuple(table)


def inf_norm(X: Tensor) -> Tensor:
    """∥X∥∞ (maximum absolute row sum) of each matrix in a (..., n, n) batch."""
    return X.abs().sum(-1).amax(-1)


_WORKSPACE = threading.local()
_WORKSPACE_SLOTS = 16


def workspace(slot: str, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    """A scratch buffer kept per thread and reused from call to call.

    A fresh large CPU buffer page-faults on first touch, which costs about as much as the work
    done in it. Only for values that die inside one forward or one backward: never saved for
    backward, never returned.
    """
    cache = getattr(_WORKSPACE, "buffers", None)
    if cache is None:
        cache = _WORKSPACE.buffers = OrderedDict()
    # a buffer made under torch.inference_mode() cannot be written outside it, nor the other way round
    key = (slot, tuple(shape), dtype, device, torch.is_inference_mode_enabled())
    buffer = cache.pop(key, None)
    if buffer is None:
        buffer = torch.empty(shape, dtype=dtype, device=device)
    cache[key] = buffer
    while len(cache) > _WORKSPACE_SLOTS:
        cache.popitem(last=False)
    return buffer


def _max_norm(X: Tensor, row_dim: int = -1) -> float:
    """The largest ∞-norm in the batch, read back to the host once.

    row_dim is the dimension summed within a row: −1 for (..., n, n), 2 for the channels layout.
    """
    if X.numel() == 0:
        return 0.0
    absolute = torch.abs(X.detach(), out=workspace("scratch", X.shape, X.dtype, X.device))
    value = float(absolute.sum(row_dim).amax())
    if not math.isfinite(value):
        raise NonFiniteError(f"matrix exponential of a non-finite matrix (∞-norm {value})")
    return value


def _squarings(norm: float) -> int:
    """s = ⌈log2 max(n, 1/2)⌉ + 1 (docs/design.md §2), so that ∥X/2^s∥∞ ≤ 1/2."""
    return max(0, math.ceil(math.log2(max(norm, THETA))) + 1)


def _expm_plan(norm: float, dtype: torch.dtype) -> tuple[int, int]:
    """Terms m and squarings s of scaling and squaring for ∥X∥∞ = norm, computing in dtype."""
    s = _squarings(norm)
    return series_terms(math.ldexp(norm, -s), taylor_tolerance(dtype)), s


def _work_dtype(dtype: torch.dtype, norm: float) -> torch.dtype:
    """float64 above LARGE_NORM: the squarings multiply rounding errors by up to 2^s ≈ 2∥X∥∞."""
    return torch.float64 if norm > LARGE_NORM else dtype


def _check_result(result: Tensor, name: str, norm: float, symbol: str = "X") -> None:
    """Raise ExpmOverflowError if a large-norm result is not finite (one read-back)."""
    if not bool(torch.isfinite(result).all()):
        fix = f"scale {symbol} down"
        if result.dtype != torch.float64 and norm < math.log(torch.finfo(torch.float64).max):
            fix += " or compute in float64"
        raise ExpmOverflowError(
            f"{name}: the result overflows {result.dtype} (largest {torch.finfo(result.dtype).max:.3g}) at "
            f"∥{symbol}∥∞ = {norm:.6g}, where e^{symbol} can reach e^{norm:.6g} ≈ 10^{norm / math.log(10):.0f}; {fix}"
        )


def _check_square(X: Tensor, name: str) -> None:
    if X.dim() < 2 or X.shape[-1] != X.shape[-2]:
        raise ValueError(f"{name} needs a batch of square matrices (..., n, n), got shape {tuple(X.shape)}")


def _check_floating(X: Tensor, name: str, what: str) -> None:
    """Integer, bool and complex tensors are refused, not promoted: every function here returns
    the input's dtype, and an integer result would be truncated (e^[[0,1],[-1,0]] would be zeros)."""
    if not X.dtype.is_floating_point:
        raise TypeError(
            f"{name} needs a real floating-point {what} (float16, bfloat16, float32 or float64), got {X.dtype}; "
            f"convert it first, e.g. {what}.to(torch.get_default_dtype())"
        )


def _check_pair(S: Tensor, x: Tensor, name: str) -> None:
    """S and x of one dtype and one device, both real floating point."""
    _check_floating(S, name, "S")
    _check_floating(x, name, "x")
    if S.dtype != x.dtype or S.device != x.device:
        raise TypeError(
            f"{name} needs S and x of one dtype on one device, got S {S.dtype} on {S.device} and x {x.dtype} "
            f"on {x.device}; convert one, e.g. x.to(S)"
        )


def _taylor(A: Tensor, m: int) -> Tensor:
    """Σ_{k<m} A^k/k! by Horner's rule: I + A(I + A/2(I + A/3(…)))."""
    eye = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    out = eye + A / max(m - 1, 1)
    for k in range(m - 2, 0, -1):
        out = eye + (A @ out) / k
    return out if m > 1 else eye.expand_as(A)


def _scaled_and_squared(X: Tensor, m: int, s: int) -> Tensor:
    """(Σ_{k<m} (X/2^s)^k/k!)^(2^s): m terms, then s squarings."""
    # × 2^−s is exact, and 0.5**s stays a float where 2**s would not (s > 1023)
    E = _taylor(X * 0.5**s, m)
    for _ in range(s):
        E = E @ E
    return E


@torch.compiler.disable  # plans the series from a norm read back to the host (module docstring)
def expm(X: Tensor) -> Tensor:
    """e^X for a batch of square matrices (..., n, n): scaling and squaring with a Taylor series.

    s squarings bring every ∥X/2^s∥∞ to at most 1/2; m terms make the truncated tail smaller than
    1e-8 (float32) or 1e-16 (float64). Above ∥X∥∞ = LARGE_NORM it computes in float64 and raises
    :class:`ExpmOverflowError` if e^X overflows the dtype. Differentiable through autograd.
    Returns X's dtype; integer, bool and complex X are refused with TypeError, not promoted.
    """
    _check_floating(X, "expm", "X")
    _check_square(X, "expm")
    norm = _max_norm(X)
    work = _work_dtype(X.dtype, norm)
    m, s = _expm_plan(norm, work)
    _record("expm", m, s, X[..., 0, 0].numel())
    E = _scaled_and_squared(X.to(work), m, s).to(X.dtype)
    if norm > LARGE_NORM:
        _check_result(E, "expm", norm)
    return E


def _action_plan(norm: float, tol: float) -> tuple[int, int]:
    """Steps s and terms m < MAX_TERMS for e^S x = (e^{S/s})^s x with the fewest matrix-vector
    products s·(m − 1) (the fewest steps among equals), at any norm: s grows linearly with it.
    m = 1 (no product: e^S x ≈ x) only in one step, where ∥S∥∞ itself is within the tolerance.

    The best plan is among the fewest steps s_j = ⌈norm/θ_j⌉ that allow j terms, j = 2, 3, …: for
    the best s with its m terms, s_m ≤ s costs no more. O(j) float operations, no series evaluated.
    """
    theta = _theta_table(tol)[: MAX_TERMS - 1]
    if norm <= theta[0]:
        return 1, 1
    best = (math.inf, 0)  # (products, steps)
    for j, bound in enumerate(theta[1:], start=2):
        if j - 1 > best[0]:
            break  # every later plan costs at least j − 1 products
        ratio = norm / bound
        if not math.isfinite(ratio):
            continue
        s = max(1, math.ceil(ratio))
        if s < 2**52:  # undo the rounding of norm / bound (beyond, s is never the best plan)
            while s > 1 and norm / (s - 1) <= bound:
                s -= 1
            while norm / s > bound:
                s += 1
        best = min(best, (s * (j - 1), s))
    s = best[1]
    return s, bisect.bisect_left(theta, norm / s) + 1


# Matrix-vector products in the "channels" layout: A (B, n, n, P), v (B, n, P), one matrix per
# (b, p). A broadcast product is fastest while its (B, n, n, P) temporary stays in cache; a loop
# of fused multiply-adds over columns avoids the temporary for large batches.
_BROADCAST_MAX = 1 << 20


def _mv_loop(A: Tensor, v: Tensor, out: Tensor, row: int) -> Tensor:
    """out = Σ_c A.select(row, c) v_c per (b, p), without the broadcast temporary (for large batches)."""
    torch.mul(A.select(row, 0), v[:, 0:1], out=out)
    for c in range(1, A.shape[row]):
        out.addcmul_(A.select(row, c), v[:, c : c + 1])
    return out


def _series(A: Tensor, v: Tensor, m: int, transpose: bool = False, scratch: Tensor | None = None) -> Tensor:
    """The m Krylov vectors v, Av, …, A^{m−1}v (or of Aᵀ), stacked: (m, B, n, P).

    Aᵀ v is the same product summed over A's other index, so no transposed copy of A is made.
    scratch (A's shape) holds the broadcast products; by default a reused workspace.
    """
    V = v.new_empty((m, *v.shape))
    out = V.unbind(0)  # views made once: each indexing op costs as much as a small product
    out[0].copy_(v)
    row = 1 if transpose else 2  # the dimension of A that the product sums over
    if m == 1:
        return V
    if A.numel() > _BROADCAST_MAX:
        for k in range(1, m):
            _mv_loop(A, out[k - 1], out[k], row)
        return V
    if scratch is None:
        scratch = workspace("scratch", A.shape, A.dtype, A.device)
    broadcast = V.unsqueeze(1 + (3 - row)).unbind(0)  # v as (B, 1, n, P), or (B, n, 1, P) for Aᵀ
    for k in range(1, m):
        torch.sum(torch.mul(A, broadcast[k - 1], out=scratch), row, out=out[k])
    return V


def _combine(weights: Tensor, V: Tensor) -> Tensor:
    """Σ_k weights_k V_k for V stacked (m, …): one matrix-vector product."""
    return torch.mv(V.flatten(1).t(), weights).view(V.shape[1:])


@functools.lru_cache(maxsize=256)
def _taylor_weights(m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """1/k! for k < m (cached: building small tensors costs more than using them)."""
    return torch.tensor([1.0 / math.factorial(k) for k in range(m)], dtype=dtype, device=device)


@functools.lru_cache(maxsize=256)
def _hankel(m: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """C[j, i] = 1/(i+j+1)! for i + j ≤ m − 2, else 0: dA = Σ_j w_j (Σ_i C[j, i] v_i)ᵀ (symmetric)."""
    C = [[1.0 / math.factorial(i + j + 1) if i + j <= m - 2 else 0.0 for i in range(m - 1)] for j in range(m - 1)]
    return torch.tensor(C, dtype=dtype, device=device)


def action_forward(
    S: Tensor, x: Tensor, steps: int, m: int, transposed: bool = False
) -> tuple[Tensor, Tensor, Tensor, list[Tensor]]:
    """e^S x = (Σ_{k<m} A^k/k!)^steps x with A = S/steps, channels layout (B, n, n, P), (B, n, P).

    ``transposed``: the array holds Sᵀ (S[i, j] stored at [j, i], the official MEF code's channel
    order); the products then sum over the other index, so no transposed copy is made.
    Returns the result, Σ tr S per sample (a coupling's log-det), and A and the Krylov vectors of
    every step: what the backward needs.

    m = 0 is :func:`action_plan`'s large-norm route: e^S is formed (:func:`_expm_times`) and multiplies
    x; then A is S and the "Krylov vectors" are [x], and the result is checked for overflow.
    """
    trace = torch.diagonal(S, dim1=1, dim2=2).sum(dim=(1, 2))
    if m == 0:
        y = _expm_times(S, x, transposed)
        if not bool(torch.isfinite(y).all()):
            if not bool(torch.isfinite(x).all()):
                raise NonFiniteError("expm_action: x has inf or NaN entries")
            _check_result(y, "expm_action", _max_norm(S, row_dim=1 if transposed else 2), "S")
        return y, trace, S, [x]
    A = S / steps if steps > 1 else S
    coeff = _taylor_weights(m, S.dtype, S.device)
    krylov = []
    y = x
    for _ in range(steps):
        V = _series(A, y, m, transpose=transposed)
        krylov.append(V)
        y = _combine(coeff, V)
    return y, trace, A, krylov


def _expm_times(S: Tensor, x: Tensor, transposed: bool = False) -> Tensor:
    """e^S x in the channels layout, S (B, n, n, P) and x (B, n, P), by forming e^S: scaling and
    squaring in float64, O((m + s)·n³) per matrix. Differentiable through autograd.

    The large-norm route of :func:`action_plan`; the forward and the backward's recomputation both take
    the plan from the same norm, so they compute the same function.
    """
    norm = _max_norm(S, row_dim=1 if transposed else 2)
    m, s = _expm_plan(norm, torch.float64)
    M = S.permute(0, 3, 2, 1) if transposed else S.permute(0, 3, 1, 2)  # S per (b, p): (B, P, n, n)
    E = _scaled_and_squared(M.to(torch.float64, memory_format=torch.contiguous_format), m, s)
    y = E @ x.to(torch.float64).permute(0, 2, 1).unsqueeze(-1)  # (B, P, n, 1)
    return y.squeeze(-1).permute(0, 2, 1).to(S.dtype).contiguous()


def action_backward(
    A: Tensor,
    krylov: list[Tensor],
    g: Tensor,
    g_trace: Tensor,
    m: int,
    need_dS: bool,
    dS_out: Tensor | None = None,
    transposed: bool = False,
) -> tuple[Tensor | None, Tensor]:
    """(∂L/∂S, ∂L/∂x) of :func:`action_forward` for the gradients g of the result and g_trace of
    the trace; ∂L/∂S into dS_out if given. The trace's gradient is one in-place add to the diagonal.

    For one factor y = Σ_k A^k x/k! with Krylov vectors v_i = A^i x and w_j = (Aᵀ)^j g:
    ∂L/∂x = Σ_k (Aᵀ)^k g/k! and ∂L/∂A = Σ_{i+j≤m−2} w_j v_iᵀ/(i+j+1)! (exact for the truncated
    series), so the backward costs about two forward passes and keeps no autograd graph.

    m = 0 (the large-norm route, krylov = [x]): e^S x is recomputed with autograd and differentiated.
    """
    if m == 0:
        return _expm_times_backward(A, krylov[0], g, g_trace, need_dS, dS_out, transposed)
    steps = len(krylov)
    coeff = _taylor_weights(m, A.dtype, A.device)
    dA = (torch.empty_like(A) if dS_out is None else dS_out) if need_dS else None
    # with one step, dA is not yet written while the first series runs: it can hold the products
    scratch = dA if steps == 1 else None
    empty = True
    for V in reversed(krylov):
        W = _series(A, g, m, transpose=not transposed, scratch=scratch)
        if dA is not None and m > 1:
            U = torch.mm(_hankel(m, A.dtype, A.device), V[:-1].flatten(1)).view(m - 1, *V.shape[1:])
            # w_j as columns (B, n, 1, P), u_j as rows (B, 1, n, P); the other way round for Aᵀ
            w = W.unsqueeze(2 if transposed else 3).unbind(0)
            u = U.unsqueeze(3 if transposed else 2).unbind(0)
            for j in range(m - 1):
                if empty:
                    torch.mul(w[j], u[j], out=dA)
                    empty = False
                else:
                    dA.addcmul_(w[j], u[j])
        g = _combine(coeff, W)
    if dA is not None:
        if empty:  # m = 1: the series is the identity
            dA.zero_()
        elif steps > 1:
            dA.div_(steps)
        torch.diagonal(dA, dim1=1, dim2=2).add_(g_trace.view(-1, 1, 1))
    return dA, g


def _expm_times_backward(
    S: Tensor, x: Tensor, g: Tensor, g_trace: Tensor, need_dS: bool, dS_out: Tensor | None, transposed: bool
) -> tuple[Tensor | None, Tensor]:
    """:func:`action_backward` of the large-norm route: recompute :func:`_expm_times`, differentiate."""
    with torch.enable_grad():
        S = S.detach().requires_grad_(need_dS)
        x = x.detach().requires_grad_()
        inputs = (S, x) if need_dS else (x,)
        grads = torch.autograd.grad(_expm_times(S, x, transposed), inputs, g)
    if not need_dS:
        return None, grads[0]
    dS = grads[0] if dS_out is None else dS_out.copy_(grads[0])
    torch.diagonal(dS, dim1=1, dim2=2).add_(g_trace.view(-1, 1, 1))
    return dS, grads[1]


class _ExpmActionCF(torch.autograd.Function):
    """(e^S x, Σ tr S per sample) in the channels layout, with a hand-written backward."""

    @staticmethod
    def forward(ctx, S: Tensor, x: Tensor, steps: int, m: int) -> tuple[Tensor, Tensor]:
        y, trace, A, krylov = action_forward(S, x, steps, m)
        ctx.save_for_backward(A, *krylov)
        ctx.m = m
        return y, trace

    @staticmethod
    @once_differentiable  # the backward writes into buffers: no graph of it for a second derivative
    def backward(ctx, g: Tensor, g_trace: Tensor):
        A, *krylov = ctx.saved_tensors
        dS, gx = action_backward(A, krylov, g, g_trace, ctx.m, ctx.needs_input_grad[0])
        return dS, gx, None, None


def action_plan(S3: Tensor, transposed: bool = False) -> tuple[int, int]:
    """Steps and terms for e^S x from the largest ∞-norm of S (B, n, n, P), recorded for Table 6.

    ``transposed``: S3 holds Sᵀ, so a row of S is summed over dimension 1.
    Above LARGE_NORM the plan is (s, 0): no series is applied to x; e^S is formed by scaling and
    squaring with s squarings (:func:`action_forward` with m = 0). Recorded then: the m and s of
    that e^S, as for :func:`expm`.
    """
    norm = _max_norm(S3, row_dim=1 if transposed else 2)
    batch = S3.shape[0] * S3.shape[3]
    if norm > LARGE_NORM:
        m, s = _expm_plan(norm, torch.float64)
        _record("expm_action", m, s, batch)
        return s, 0
    steps, m = _action_plan(norm, taylor_tolerance(S3.dtype))
    _record("expm_action", m, steps, batch)
    return steps, m


def expm_action(S: Tensor, x: Tensor, layout: str = "last") -> Tensor:
    """e^S x for batches of small matrices and vectors, without forming e^S.

    layout="last": S (..., n, n), x (..., n) — the usual batched-matrix layout.
    layout="channels": S (B, n, n, *spatial), x (B, n, *spatial) — a coupling net's output viewed
    per pixel, with no copy.

    e^S x = (e^{S/s})^s x, each factor applied as Σ_{k<m} (S/s)^k x / k!: only matrix-vector
    products, O(s·m·n²) per vector against O(n³) for forming e^S. s and m come from the largest
    ∞-norm in the batch (one read-back per call). The backward is hand-written (two forward
    passes' worth of matrix-vector products, no autograd graph of the series).

    Above ∥S∥∞ = LARGE_NORM, where s would grow linearly with the norm, e^S is formed instead
    (scaling and squaring in float64, O((m + log2 ∥S∥∞)·n³) per matrix) and multiplies x; its
    backward recomputes it through autograd. A result that overflows the dtype raises
    :class:`ExpmOverflowError`.

    S and x must share one real floating-point dtype and one device: integer, bool and complex
    input, or mixed dtypes, are refused with TypeError (nothing is promoted). An empty batch gives
    an empty result.
    """
    if layout == "last":
        _check_pair(S, x, "expm_action")
        _check_square(S, "expm_action")
        if x.shape[-1] != S.shape[-1] or x.shape[:-1] != S.shape[:-2]:
            raise ValueError(
                f"expm_action: x must be {tuple(S.shape[:-1])} to match S {tuple(S.shape)}, got {tuple(x.shape)}"
            )
        n = S.shape[-1]
        batch = S.shape[:-2]
        A = S.reshape(-1, n, n).permute(1, 2, 0).unsqueeze(0)  # (1, n, n, N)
        v = x.reshape(-1, n).T.unsqueeze(0)  # (1, n, N)
        y, _ = expm_action_trace(A.contiguous(), v.contiguous())
        return y.squeeze(0).T.reshape(*batch, n)
    if layout == "channels":
        return expm_action_trace(S, x)[0]
    raise ValueError(f"expm_action layout must be 'last' or 'channels', got {layout!r}")


@torch.compiler.disable  # host-planned series, scratch buffers written with out= (module docstring)
def expm_action_trace(S: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """(e^S x, Σ tr S per sample) in the channels layout: S (B, n, n, *spatial), x (B, n, *spatial).

    What a matrix-exponential coupling needs: the action and its log-determinant, in one call
    whose backward is hand-written. Inputs as for :func:`expm_action`; B = 0 or an empty image is allowed.
    """
    _check_pair(S, x, "expm_action")
    if S.dim() < 3 or S.shape[1] != S.shape[2] or x.shape[0] != S.shape[0] or x.shape[1:] != (S.shape[1], *S.shape[3:]):
        raise ValueError(
            f"expm_action(layout='channels') needs S (B, n, n, *spatial) and x (B, n, *spatial), "
            f"got {tuple(S.shape)} and {tuple(x.shape)}"
        )
    b, n = S.shape[:2]
    pixels = math.prod(S.shape[3:])  # not -1: an empty batch (B = 0 or a 0-sized image) is allowed
    S3 = S.reshape(b, n, n, pixels)
    steps, m = action_plan(S3)
    y, trace = _ExpmActionCF.apply(S3, x.reshape(b, n, pixels), steps, m)
    return y.reshape(x.shape), trace


@torch.compiler.disable  # plans the series from a norm read back to the host (module docstring)
def phi(X: Tensor) -> Tensor:
    """φ(X) = Σ_k X^k/(k+1)! = X⁻¹(e^X − I), for the low-rank form e^{AB} = I + A φ(BA) B.

    Scaling and squaring with φ(2X) = φ(X)(e^X + I)/2 and e^{2X} = (e^X)², so any norm is accurate;
    above ∥X∥∞ = LARGE_NORM in float64, and a result that overflows the dtype raises
    :class:`ExpmOverflowError`. Integer, bool and complex X are refused with TypeError.
    """
    _check_floating(X, "phi", "X")
    _check_square(X, "phi")
    norm = _max_norm(X)
    work = _work_dtype(X.dtype, norm)
    m, s = _expm_plan(norm, work)
    m += 1
    _record("phi", m, s, X[..., 0, 0].numel())
    A = X.to(work) * 0.5**s
    eye = torch.eye(X.shape[-1], dtype=work, device=X.device)
    # Horner: Σ_{k<m} A^k/(k+1)! = I + A/2 (I + A/3 (… (I + A/m)))
    P = eye + A / m if m > 1 else eye.expand_as(A)
    for k in range(m - 1, 1, -1):
        P = eye + (A @ P) / k
    E = eye + A @ P
    for _ in range(s):
        P = P @ (E + eye) / 2
        E = E @ E
    P = P.to(X.dtype)
    if norm > LARGE_NORM:
        _check_result(P, "phi", norm)
    return P

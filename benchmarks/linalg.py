"""Matrix exponentials: e^S and e^S x for batches of small matrices (docs/design.md §2).

Methods compared (parameter ``method``):
  mefbench       mefbench.linalg.expm / expm_action (norm bound read back once per call)
  torch          torch.linalg.matrix_exp (and matrix_exp(S) @ x for the action)
  global_series  the paper's official code: one ∞-norm for the whole batch, Taylor terms added
                 until a term's max-abs is ≤ 1e-8, reading that value back after every term
                 (and global_series(S) @ x for the action)

Matrices are float32 with entries N(0, 1/n²), so ∥S∥∞ ≈ 0.8 (about the bound the paper's
matrix-exp coupling has at init). ``batch`` is the number of n×n matrices: 16,384 is one
level-1 coupling of a CIFAR-10 model at batch 64 (64·16·16 pixels).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mefbench.linalg import expm, expm_action

from ._common import set_up_torch

__all__ = ["Expm", "ExpmAction", "ExpmActionGrad", "ExpmGrad", "global_series_expm"]

METHODS = ["mefbench", "torch", "global_series"]
SIZES = [6, 12, 24, 48]
BATCHES = [1, 256, 16384]

# forward+backward cases that take over a minute on one core (torch's backward forms a 2n×2n
# block exponential per matrix); skipped to keep `asv run --quick` of the suite short.
SLOW_GRAD = {("torch", 48, 16384)}


def global_series_expm(X: Tensor, tol: float = 1e-8, max_terms: int = 100) -> Tensor:
    """e^X as the paper's official code computes it: the baseline, not a library function.

    n = the largest ∞-norm in the whole batch (one value for all matrices), s = ⌈log2 max(n, ½)⌉ + 1,
    then Taylor terms of X/2^s are added until a term's largest absolute entry is ≤ tol, that
    entry being read back to the host after every term; then s squarings.
    """
    norm = float(X.detach().abs().sum(-1).max()) if X.numel() else 0.0
    s = max(0, math.ceil(math.log2(max(norm, 0.5))) + 1)
    A = X / 2**s
    eye = torch.eye(X.shape[-1], dtype=X.dtype, device=X.device)
    term = A
    E = eye + A
    k = 1
    while float(term.detach().abs().max()) > tol and k < max_terms:
        k += 1
        term = term @ A / k
        E = E + term
    for _ in range(s):
        E = E @ E
    return E


def _matrices(n: int, batch: int) -> Tensor:
    g = torch.Generator().manual_seed(n * 100_003 + batch)
    return torch.randn(batch, n, n, generator=g) / n


def _vectors(n: int, batch: int) -> Tensor:
    g = torch.Generator().manual_seed(n * 100_003 + batch + 1)
    return torch.randn(batch, n, generator=g)


_EXPM = {"mefbench": expm, "torch": torch.linalg.matrix_exp, "global_series": global_series_expm}


def _action(method: str, S: Tensor, x: Tensor) -> Tensor:
    if method == "mefbench":
        return expm_action(S, x)
    return (_EXPM[method](S) @ x.unsqueeze(-1)).squeeze(-1)


class _Base:
    params = [METHODS, SIZES, BATCHES]
    param_names = ["method", "n", "batch"]
    timeout = 300.0
    grad = False

    def setup(self, method: str, n: int, batch: int) -> None:
        if self.grad and (method, n, batch) in SLOW_GRAD:
            raise NotImplementedError(f"{method} forward+backward at n={n}, batch={batch} is skipped (> 1 min)")
        set_up_torch()
        self.S = _matrices(n, batch).requires_grad_(self.grad)
        self.x = _vectors(n, batch)


class Expm(_Base):
    """e^S of a batch of n×n matrices."""

    def time_forward(self, method: str, n: int, batch: int) -> None:
        with torch.no_grad():
            _EXPM[method](self.S)


class ExpmGrad(_Base):
    """e^S and the gradient of Σ e^S with respect to S."""

    grad = True

    def time_forward_backward(self, method: str, n: int, batch: int) -> None:
        self.S.grad = None
        _EXPM[method](self.S).sum().backward()


class ExpmAction(_Base):
    """e^S x for a batch of matrices and vectors (torch and global_series form e^S first)."""

    def time_forward(self, method: str, n: int, batch: int) -> None:
        with torch.no_grad():
            _action(method, self.S, self.x)


class ExpmActionGrad(_Base):
    """e^S x and the gradient of Σ e^S x with respect to S."""

    grad = True

    def time_forward_backward(self, method: str, n: int, batch: int) -> None:
        self.S.grad = None
        _action(method, self.S, self.x).sum().backward()

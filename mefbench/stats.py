"""Small statistics shared by training, results and the report: pooled summaries, Wilson
intervals for rates, paired t intervals for differences over seeds, ratios and an exact test, and
the one way a recorded value becomes a number.

Pure functions on plain numbers and dicts, each testable on its own (and tested against scipy).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "Interval",
    "as_float",
    "fisher_exact",
    "paired_t_interval",
    "pool_stats",
    "ratio_interval",
    "wilson_interval",
]


def as_float(value: object) -> float:
    """A real number as a float (inf and NaN included); NaN for None, a bool, a string or anything
    else that is not a real number. How results, asv results and the device check read values
    that may be missing or of the wrong type."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return math.nan
    return float(value)


def pool_stats(parts: list[dict]) -> dict:
    """Pool ``{count, mean, std, max, min}`` summaries (population std) into one.

    Parts with no ``count`` are ignored; no part left gives ``{}``. The pooled std is
    √(Σ nᵢ(σᵢ² + μᵢ²)/n − μ²), exact for population stds.
    """
    parts = [p for p in parts if p and p.get("count")]
    if not parts:
        return {}
    n = sum(p["count"] for p in parts)
    mean = sum(p["count"] * p["mean"] for p in parts) / n
    second = sum(p["count"] * (p["std"] ** 2 + p["mean"] ** 2) for p in parts) / n
    return {
        "count": n,
        "mean": mean,
        "std": math.sqrt(max(second - mean**2, 0.0)),
        "max": max(p["max"] for p in parts),
        "min": min(p["min"] for p in parts),
    }


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion k/n: (p̂ + z²/2n ± z√(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n).

    Unlike p̂ ± z√(p̂(1−p̂)/n) it stays inside [0, 1] and is not empty at k = 0 or k = n, which
    matters for the stability table (e.g. 0 divergences in 3 runs gives (0, 0.56) at z = 1.96).
    ``n = 0`` gives the uninformative (0, 1).
    """
    if isinstance(successes, bool) or isinstance(n, bool) or not (0 <= successes <= n):
        raise ValueError(f"wilson_interval needs 0 <= successes <= n, got successes={successes!r}, n={n!r}")
    if not (math.isfinite(z) and z > 0):
        raise ValueError(f"wilson_interval needs a finite z > 0, got {z!r}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    z2 = z * z
    centre = p + z2 / (2 * n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    denom = 1 + z2 / n
    low, high = (centre - half) / denom, (centre + half) / denom
    # exact ends: k = 0 gives low 0 and k = n high 1 (rounding can leave ±1e-17)
    return (0.0 if successes == 0 else max(low, 0.0)), (1.0 if successes == n else min(high, 1.0))


@dataclass(frozen=True)
class Interval:
    """An estimate with its two-sided confidence interval (NaN ends when it cannot be computed)."""

    estimate: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return bool(self.low > 0 or self.high < 0)


def paired_t_interval(differences: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean of paired differences with its Student-t interval, x̄ ± t_{n−1}·s/√n (what
    ``scipy.stats.ttest_rel(a, b).confidence_interval()`` gives for a − b). Non-finite
    differences are left out; fewer than 2 give NaN ends."""
    from scipy import stats

    d = np.asarray([v for v in differences if np.isfinite(v)], dtype=float)
    n = len(d)
    if n == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(d.mean())
    if n < 2:
        return Interval(mean, math.nan, math.nan, n)
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * d.std(ddof=1) / math.sqrt(n))
    return Interval(mean, mean - half, mean + half, n)


def ratio_interval(ratios: Sequence[float], confidence: float = 0.95) -> Interval:
    """Geometric mean of positive ratios with the t interval of their logs, mapped back
    (exp of :func:`paired_t_interval` of the log ratios)."""
    logs = [math.log(r) for r in ratios if np.isfinite(r) and r > 0]
    i = paired_t_interval(logs, confidence)
    estimate, low, high = (math.exp(v) if np.isfinite(v) else math.nan for v in (i.estimate, i.low, i.high))
    return Interval(estimate, low, high, i.n)


def fisher_exact(k1: int, n1: int, k2: int, n2: int) -> float:
    """Two-sided p-value of Fisher's exact test that k1/n1 and k2/n2 come from one rate
    (``scipy.stats.fisher_exact`` on the 2×2 table); 1.0 when either group is empty."""
    from scipy import stats

    if n1 == 0 or n2 == 0:
        return 1.0
    return float(stats.fisher_exact(np.array([[k1, n1 - k1], [k2, n2 - k2]])).pvalue)

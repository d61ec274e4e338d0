"""Small statistics shared by training, results and the report: pooled summaries, Wilson intervals,
and the one way a recorded value becomes a number.

Pure functions on plain numbers and dicts, each testable on its own.
"""

from __future__ import annotations

import math
import numbers

__all__ = ["as_float", "pool_stats", "wilson_interval"]


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

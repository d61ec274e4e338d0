"""Small statistics shared by training and the reports: pooled summaries and binomial intervals."""

from __future__ import annotations

import math

__all__ = ["pool_stats", "wilson_interval"]


def pool_stats(parts: list[dict]) -> dict:
    """Pool {count, mean, std, max, min} summaries (population std) into one."""
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


def wilson_interval(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion (95% by default): better than the normal
    approximation for few trials and rates near 0 or 1 (it never leaves [0, 1])."""
    if n <= 0:
        raise ValueError(f"wilson_interval needs at least one trial, got n = {n}")
    if not 0 <= successes <= n:
        raise ValueError(f"wilson_interval needs 0 <= successes <= n, got {successes} of {n}")
    p = successes / n
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)

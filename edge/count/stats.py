"""Binomial statistics for a differential count."""

from __future__ import annotations

import math

Z95 = 1.959963984540054


def wilson_interval(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval of a binomial proportion, in percent.

    Wilson rather than the normal ("Wald") interval because a differential
    count has small ``n`` (100-200 cells) and proportions near 0 (basophils,
    blasts), where Wald collapses to ``[0, 0]`` and undercovers badly.

    Args:
        k: Cells of the class.
        n: Cells counted (the denominator).
        z: Standard-normal quantile (1.96 for a 95 % interval).

    Returns:
        ``(low, high)`` in percent; ``(0.0, 100.0)`` when ``n == 0``.
    """
    if n <= 0:
        return 0.0, 100.0
    if not 0 <= k <= n:
        raise ValueError(f"k={k} must lie in 0..n={n}")
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / denom
    low, high = max(0.0, centre - half), min(1.0, centre + half)
    if k == 0:
        low = 0.0
    if k == n:
        high = 1.0
    return 100.0 * low, 100.0 * high

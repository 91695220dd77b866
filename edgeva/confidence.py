"""Confidence bounds on an agreement measured as a mean over frames (the filter's audits and the
merger's checks both judge a target by them)."""
from __future__ import annotations

import math

Z_95 = 1.96


def wilson_lower_bound(mean: float, n: int, z: float = Z_95) -> float:
    """Wilson score lower bound of a mean over n frames (exact for 0/1 agreements; for fractional
    ones their variance is at most mean * (1 - mean), so it is safe)."""
    if n <= 0:
        return 0.0
    denom = 1.0 + z * z / n
    centre = mean + z * z / (2 * n)
    margin = z * math.sqrt(max(0.0, mean * (1 - mean)) / n + z * z / (4 * n * n))
    return max(0.0, (centre - margin) / denom)

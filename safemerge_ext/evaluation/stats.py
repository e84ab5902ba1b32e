"""Wilson score intervals: honest error bars for rates measured on 20-500 prompts.

Why Wilson and not the normal approximation: with few prompts and rates near 0 or 1 (a well aligned
model refusing everything) the normal interval collapses to zero width or leaves [0, 1].
"""

from __future__ import annotations

import math


def wilson(successes: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% (by default) Wilson score interval of ``successes / n``; (0, 1) when n is 0."""
    if n < 0 or not 0 <= successes <= n:
        raise ValueError(f"wilson: need 0 <= successes <= n, got {successes} of {n}")
    if n == 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # clamp: rounding can put an end a hair past p when p is 0 or 1
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))

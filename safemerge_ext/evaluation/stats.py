"""Wilson score intervals: honest error bars for rates measured on 20-500 prompts; and the exact McNemar
test that compares two models answering the same prompts.

Why Wilson and not the normal approximation: with few prompts and rates near 0 or 1 (a well aligned
model refusing everything) the normal interval collapses to zero width or leaves [0, 1].
"""

from __future__ import annotations

import math
from typing import Sequence


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


def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value of ``b`` and ``c`` discordant pairs: the binomial test of
    b against Binomial(b + c, 1/2), ``min(1, 2 * sum_{i <= min(b, c)} C(b + c, i) / 2^(b + c))``; 1 when
    b + c is 0.

    Why paired: every model answers the same prompts, so the prompts both models got right (or wrong)
    say nothing about which is better, and intervals that overlap hide differences that the pairs show.
    Integers throughout, and one correctly rounded division: exact at any n."""
    if b < 0 or c < 0:
        raise ValueError(f"mcnemar_exact: need discordant counts >= 0, got b={b}, c={c}")
    n = b + c
    if b == c:  # (the tail holds half the mass or more: p = 1; also b = c = 0)
        return 1.0
    term = tail = 1  # C(n, 0); each next term from the last, not a fresh math.comb: linear in min(b, c)
    for i in range(min(b, c)):
        term = term * (n - i) // (i + 1)
        tail += term
    return min(1.0, 2 * tail / (1 << n))


def discordant(first: Sequence[bool | None], second: Sequence[bool | None]) -> tuple[int, int, int]:
    """(n, b, c) of two models' per-prompt yes/no verdicts on the same prompts, in the same order: n
    prompts with a verdict from both (None, an unreadable verdict, leaves its prompt out), b where the
    first says yes and the second no, c the reverse."""
    if len(first) != len(second):
        raise ValueError(f"discordant: the verdict lists differ in length ({len(first)} and {len(second)}); "
                         "paired verdicts must come from the same prompts")
    pairs = [(bool(x), bool(y)) for x, y in zip(first, second) if x is not None and y is not None]
    return len(pairs), sum(x and not y for x, y in pairs), sum(y and not x for x, y in pairs)

"""Which layers are flagged: by threshold, by count (the k lowest) or by fraction of layers.

SafeMERGE flags ``rho < tau`` (the official code's strict test); Safe LoRA flags ``rho <= tau``.
Undefined scores (nan) are never flagged. Ties in the k-lowest modes keep model order.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence


def _as_float(value: numbers.Real) -> float:
    """A Python float of any real (beyond float's range: infinite, for the range checks to refuse)."""
    try:
        return float(value)
    except OverflowError:
        return math.inf if value > 0 else -math.inf


@dataclass(frozen=True)
class Selection:
    """A validated selection rule; exactly one of threshold, num_layers or fraction is set."""

    threshold: float | None = None
    num_layers: int | None = None
    fraction: float | None = None
    inclusive: bool = False  # True for Safe LoRA (<=), False for SafeMERGE (<)

    def __post_init__(self) -> None:
        given = [v is not None for v in (self.threshold, self.num_layers, self.fraction)]
        if sum(given) != 1:
            raise ValueError("choose exactly one of a threshold, a number of layers or a fraction of layers")
        for name, value, kinds in (("threshold", self.threshold, numbers.Real), ("num_layers", self.num_layers,
                                   numbers.Integral), ("fraction", self.fraction, numbers.Real)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, kinds)):
                what = "a whole number" if kinds is numbers.Integral else "a number"
                raise ValueError(f"{name} must be {what}; got {value!r}")
            if value is not None:  # (a NumPy scalar, e.g. a tau from np.quantile, becomes a Python number:
                # compared in float64 and written to the report's JSON as any other)
                object.__setattr__(self, name, int(value) if kinds is numbers.Integral else _as_float(value))
        if self.threshold is not None and not (-1.0 <= self.threshold <= 1.0 and math.isfinite(self.threshold)):
            raise ValueError(f"threshold must lie in [-1, 1] (it is compared with a cosine); got {self.threshold}")
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError(f"the number of layers to flag must be at least 1; got {self.num_layers}")
        if self.fraction is not None and not (0.0 < self.fraction <= 1.0):
            raise ValueError(f"fraction must lie in (0, 1]; got {self.fraction}")

    @property
    def mode(self) -> str:
        return "threshold" if self.threshold is not None else "num_layers" if self.num_layers is not None else "fraction"

    def describe(self) -> dict[str, object]:
        return {
            "selection": self.mode,
            "threshold": self.threshold,
            "num_layers": self.num_layers,
            "fraction": self.fraction,
            "comparison": ("<=" if self.inclusive else "<") if self.threshold is not None else None,
        }

    def tie_cut(self, scores: Sequence[float], flags: Sequence[bool]) -> str | None:
        """In the k-lowest modes, a warning when the cut falls between layers of one cosine (the
        earlier in model order is flagged), else None."""
        if self.threshold is not None:
            return None
        flagged = [s for s, f in zip(scores, flags) if f]
        if not flagged:
            return None
        last = max(flagged)
        left = [i for i, (s, f) in enumerate(zip(scores, flags)) if not f and s == last]
        if not left:
            return None
        rule = f"--num-layers {self.num_layers}" if self.num_layers is not None else f"--fraction {self.fraction:g}"
        return (f"{rule}: the cut falls between layers of equal cosine {last!r}: {len(left)} later one(s) in model "
                "order left unflagged (ties go to the earlier layer); to treat them alike, flag one layer more or "
                "fewer per tied layer, or flag by --threshold")

    @property
    def never_flags(self) -> str | None:
        """Why this rule can flag no layer (a threshold the score never falls below), else None."""
        return unreachable_threshold(self.threshold, self.inclusive) if self.threshold is not None else None

    def count(self, n: int) -> int | None:
        """How many of ``n`` scored layers a count or a fraction flags (None for a threshold)."""
        if self.threshold is not None:
            return None
        # ceil(F x n) of the decimal F as written: 0.3 x 10 is 3 (not ceil(3.0000000000000004) = 4),
        # and any F > 0 flags at least one layer
        return self.num_layers if self.num_layers is not None else math.ceil(Fraction(repr(float(self.fraction))) * n)

    def flag(self, scores: Sequence[float]) -> list[bool]:
        """One flag per score, in the given (model) order."""
        valid = [i for i, s in enumerate(scores) if not math.isnan(s)]
        if self.threshold is not None:
            tau = self.threshold
            return [(not math.isnan(s)) and bool(s <= tau if self.inclusive else s < tau) for s in scores]
        k = self.count(len(valid))
        lowest = set(sorted(valid, key=lambda i: (scores[i], i))[:k])
        return [i in lowest for i in range(len(scores))]


def unreachable_threshold(threshold: float, inclusive: bool) -> str | None:
    """A warning when ``threshold`` can flag no layer: the score, ``<C dW, dW> = ||V^T dW||^2 / ||V||``
    over two norms, is never negative, so ``rho < tau`` never holds for tau <= 0 (nor ``rho <= tau``
    for tau < 0). A recipe may mean it (a filter list's "never flag" value), so not an error."""
    if threshold > 0 or (inclusive and threshold == 0):
        return None
    return (f"threshold {threshold:g} flags no layer: the score, cos(C dW, dW), is never negative "
            f"(flagged when it is {'<=' if inclusive else '<'} the threshold); "
            "give a threshold in (0, 1] to flag layers")

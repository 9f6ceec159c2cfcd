"""Proportions with their uncertainty: an accuracy on n images is an estimate, not a fact."""

from __future__ import annotations

import math
from dataclasses import dataclass

Z95 = 1.959963984540054  # the standard normal's 97.5th percentile: two-sided 95 %


def wilson(successes: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The Wilson score interval of ``successes / n`` (95 % by default).

    Unlike the normal approximation it stays inside [0, 1] and keeps its coverage near 0 % and
    100 %, where small validation subsets of a good model live.
    """
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    # at 0 and n the bounds are exactly 0 and 1 (rounding would otherwise leave 1e-16 gaps)
    return (max(0.0, centre - half) if successes > 0 else 0.0,
            min(1.0, centre + half) if successes < n else 1.0)


@dataclass(frozen=True)
class Proportion:
    """``successes`` of ``n``, with its Wilson interval."""

    successes: int
    n: int

    @property
    def value(self) -> float:
        return self.successes / self.n if self.n else 0.0

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.successes, self.n)


def half_width(p: float, n: int) -> float:
    """Half the width of the 95 % Wilson interval of a proportion ``p`` measured on ``n`` items:
    differences smaller than this are within what ``n`` can tell apart."""
    low, high = wilson(round(p * n), n)
    return (high - low) / 2

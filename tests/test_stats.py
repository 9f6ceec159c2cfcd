"""Intervals against hand computations and published values."""

import math

import pytest

from leanvgg.evaluate import Counts, accuracy_of
from leanvgg.stats import half_width, wilson


def test_wilson_matches_the_formula_worked_by_hand():
    # 6 of 7, z = 1.96: centre (p + z²/2n) / (1 + z²/n), half z √(p(1-p)/n + z²/4n²) / (1 + z²/n)
    z, n, p = 1.959963984540054, 7, 6 / 7
    centre = (p + z * z / 14) / (1 + z * z / 7)
    half = z * math.sqrt(p * (1 - p) / 7 + z * z / 196) / (1 + z * z / 7)
    assert wilson(6, n) == pytest.approx((centre - half, centre + half), abs=1e-12)
    assert wilson(6, n) == pytest.approx((0.48687, 0.97432), abs=1e-5)


def test_wilson_closed_forms_and_edges():
    assert wilson(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)  # z²/(n + z²): never below 0
    assert wilson(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)  # n/(n + z²): never above 1
    assert wilson(0, 0) == (0.0, 1.0)  # no data: no knowledge


def test_half_width_shrinks_with_the_sample():
    assert half_width(0.9, 200) == pytest.approx(0.0419, abs=1e-4)  # ±4.2 points at 200
    assert half_width(0.9, 50_000) < 0.003  # ImageNet's validation set resolves 0.3 points


def test_accuracy_carries_counts_and_intervals():
    accuracy = accuracy_of(Counts(images=7, top1=6, top3=7, agree=3), artifact="a", dataset="d")
    assert (accuracy.top1, accuracy.top3, accuracy.agreement) == (6 / 7, 1.0, 3 / 7)
    assert accuracy.top1_ci == wilson(6, 7) and accuracy.agreement_ci == wilson(3, 7)
    assert accuracy.images == 7

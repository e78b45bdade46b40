"""Accuracy metrics and their 95% intervals.

- top-1 accuracy, and mean per-class accuracy (the average of the per-class recalls over the
  classes the test split holds: the standard for FGVC-Aircraft, Oxford Pets, Flowers102 and
  Caltech101, whose test classes are unequal or whose papers report it);
- a single run's interval is Wilson's score interval for a binomial proportion (top-1: k
  correct of n test images), which stays inside [0, 1] and is accurate near 0 and 1;
- rows averaged over shot draws get Student's t interval of the mean over the draws (the
  draws differ in their shots, which dominate the variance at few shots).
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054
# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (then the normal's).
_T95 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def top1(pred: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of ``pred == labels`` (NaN when empty)."""
    labels = np.asarray(labels)
    return float(np.mean(np.asarray(pred) == labels)) if len(labels) else float("nan")


def mean_per_class(pred: np.ndarray, labels: np.ndarray) -> float:
    """Mean over the classes present in ``labels`` of each class's accuracy (NaN when empty)."""
    labels = np.asarray(labels, np.int64)
    if len(labels) == 0:
        return float("nan")
    hit = (np.asarray(pred) == labels).astype(np.float64)
    n = np.bincount(labels)
    present = n > 0
    return float(np.mean(np.bincount(labels, weights=hit)[present] / n[present]))


def wilson(p: float, n: int) -> tuple[float, float]:
    """95% Wilson score interval of a proportion ``p`` observed over ``n`` trials."""
    if n <= 0 or not math.isfinite(p):
        return float("nan"), float("nan")
    denom = 1 + Z95**2 / n
    centre = (p + Z95**2 / (2 * n)) / denom
    half = Z95 * math.sqrt(p * (1 - p) / n + Z95**2 / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def t_interval(values: list[float] | np.ndarray) -> tuple[float, float]:
    """95% Student's t interval of the mean of ``values`` (at least 2; NaN otherwise)."""
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return float("nan"), float("nan")
    df = len(v) - 1
    t = _T95[df - 1] if df <= len(_T95) else Z95
    half = t * v.std(ddof=1) / math.sqrt(len(v))
    return float(v.mean() - half), float(v.mean() + half)


def interval(accuracies: list[float], n_test: int) -> tuple[float, float, str]:
    """The interval of a table row: ``(low, high, kind)``, kind ``binomial`` for one run (Wilson
    over ``n_test`` images) or ``seeds`` for several draws (t over the draws, cut to [0, 1]:
    with two or three draws it can reach past either end)."""
    if len(accuracies) == 1:
        return (*wilson(accuracies[0], n_test), "binomial")
    lo, hi = t_interval(accuracies)
    return max(0.0, lo), min(1.0, hi), "seeds"

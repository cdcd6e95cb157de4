"""Uncertainty of a reported accuracy: bootstrap intervals over the evaluated images, and the
paired comparison of two classifiers on the same images.

An accuracy on n images moves by 100/n points per image; two heads scored on the same images are
compared on their per-image differences (paired), which is far tighter than two separate
intervals. scipy's `bootstrap` does the resampling (percentile method: it stays defined when
every image agrees, where BCa is not).

    acc = accuracy_interval(pred == y)                     # Interval(estimate=54.7, low=49.9, high=59.5, rows=393)
    diff = paired_difference(pred_a == y, pred_b == y)     # points, A minus B
    compare("MLP head", "linear head", diff)              # "MLP head beats linear head by 2.3 points [0.5, 4.1] ..."
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from ..errors import DiffprobeError

LEVEL = 0.95
RESAMPLES = 2000


@dataclass(frozen=True)
class Interval:
    """A percentage (or a difference in points) with its bootstrap confidence interval."""

    estimate: float
    low: float
    high: float
    rows: int  # images the figure is computed on
    level: float = LEVEL

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def to_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _as_hits(correct: Any, what: str) -> np.ndarray:
    hits = np.asarray(correct)
    if hits.ndim != 1 or len(hits) == 0:
        raise DiffprobeError(f"{what}: expected one correct/incorrect flag per image, got shape {list(hits.shape)}")
    return hits.astype(np.float64)


def _interval(data: tuple[np.ndarray, ...], statistic, estimate: float, level: float, resamples: int, seed: int) -> Interval:
    rows = len(data[0])
    if rows < 2 or all(np.ptp(d) == 0 for d in data):  # nothing to resample: the figure is exact on these rows
        return Interval(estimate, estimate, estimate, rows, level)
    result = stats.bootstrap(data, statistic, paired=len(data) > 1, vectorized=True, confidence_level=level,
                             n_resamples=resamples, method="percentile", random_state=np.random.default_rng(seed))  # fmt: skip
    ci = result.confidence_interval
    return Interval(estimate, float(ci.low), float(ci.high), rows, level)


def accuracy_interval(correct: Any, level: float = LEVEL, resamples: int = RESAMPLES, seed: int = 0) -> Interval:
    """Top-1 in percent over these images, with a bootstrap interval (fixed by the seed)."""
    hits = _as_hits(correct, "accuracy_interval")
    return _interval((hits,), lambda h, axis=-1: 100.0 * h.mean(axis=axis), 100.0 * hits.mean(), level, resamples, seed)


def paired_difference(correct_a: Any, correct_b: Any, level: float = LEVEL, resamples: int = RESAMPLES,
                      seed: int = 0) -> Interval:  # fmt: skip
    """A's top-1 minus B's, in points, on the same images, resampled in pairs."""
    a, b = _as_hits(correct_a, "paired_difference"), _as_hits(correct_b, "paired_difference")
    if len(a) != len(b):
        raise DiffprobeError(f"paired_difference needs the same images for both: {len(a)} vs {len(b)} flags")
    return _interval((a, b), lambda x, y, axis=-1: 100.0 * (x.mean(axis=axis) - y.mean(axis=axis)),
                     100.0 * (a.mean() - b.mean()), level, resamples, seed)  # fmt: skip


def compare(name_a: str, name_b: str, diff: Interval) -> str:
    """The verdict a report may state: a win only when the paired interval excludes zero."""
    where = f"{diff.rows} images, {100 * diff.level:.0f}% paired bootstrap interval"
    if not diff.excludes_zero():
        return f"{name_a} vs {name_b}: not separable at this size ({diff.estimate:+.2f} points [{diff.low:+.2f}, {diff.high:+.2f}], {where})"
    winner, loser, sign = (name_a, name_b, 1) if diff.estimate > 0 else (name_b, name_a, -1)
    low, high = sorted((sign * diff.low, sign * diff.high))
    return f"{winner} beats {loser} by {sign * diff.estimate:.2f} points [{low:.2f}, {high:.2f}] ({where})"

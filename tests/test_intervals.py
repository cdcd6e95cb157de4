"""Bootstrap intervals and paired comparisons: the uncertainty every reported accuracy carries."""

from __future__ import annotations

import numpy as np
import pytest

from diffprobe import DiffprobeError
from diffprobe.probing.intervals import accuracy_interval, compare, paired_difference


def test_accuracy_interval_matches_the_binomial_width_and_is_reproducible():
    rng = np.random.default_rng(0)
    hits = rng.random(400) < 0.6
    ci = accuracy_interval(hits, seed=3)
    assert ci.estimate == pytest.approx(100 * hits.mean()) and ci.rows == 400
    assert ci.low < ci.estimate < ci.high
    normal = 1.96 * np.sqrt(hits.mean() * (1 - hits.mean()) / 400) * 100  # the textbook half-width
    assert (ci.high - ci.low) / 2 == pytest.approx(normal, rel=0.15)
    assert accuracy_interval(hits, seed=3) == ci  # fixed by its seed


def test_identical_or_unanimous_images_give_an_exact_figure():
    assert (accuracy_interval(np.ones(50)).low, accuracy_interval(np.ones(50)).high) == (100.0, 100.0)
    same = np.arange(30) % 2 == 0
    diff = paired_difference(same, same)
    assert (diff.estimate, diff.low, diff.high) == (0.0, 0.0, 0.0)
    assert "not separable at this size" in compare("A", "B", diff)


def test_a_win_is_claimed_only_when_the_paired_interval_excludes_zero():
    rng = np.random.default_rng(1)
    base = rng.random(300) < 0.5
    a = base.copy()
    a[np.flatnonzero(~base)[:3]] = True  # A gets 3 more images right of 300: +1 point, within noise
    small = paired_difference(a, base)
    assert small.estimate == pytest.approx(1.0) and small.low <= 0 < small.high
    verdict = compare("A", "B", small)
    assert verdict.startswith("A vs B: not separable at this size") and "300 images" in verdict
    b = base.copy()
    b[np.flatnonzero(base)[:40]] = False  # B loses 40 images: a real gap
    big = paired_difference(base, b)
    assert big.excludes_zero()
    assert compare("A", "B", big).startswith("A beats B by 13.33 points [")
    assert compare("B", "A", paired_difference(b, base)).startswith("A beats B by 13.33 points [")


def test_pairing_is_tighter_than_two_separate_intervals():
    rng = np.random.default_rng(2)
    a = rng.random(500) < 0.6
    b = a.copy()
    flip = rng.choice(500, 25, replace=False)
    b[flip] = ~b[flip]  # two heads that agree on 95% of images
    paired = paired_difference(a, b)
    separate = accuracy_interval(a)
    assert paired.high - paired.low < 0.5 * (separate.high - separate.low)


def test_bad_inputs_are_one_clear_error():
    with pytest.raises(DiffprobeError, match="one correct/incorrect flag per image"):
        accuracy_interval(np.zeros((3, 2)))
    with pytest.raises(DiffprobeError, match="same images for both: 3 vs 4"):
        paired_difference(np.ones(3), np.ones(4))

"""Schedules and deterministic per-image noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffprobe import DiffprobeError
from diffprobe.features.noise import NoiseSchedule, image_noise


def test_linear_schedule_values_quoted_by_the_paper():
    abar = NoiseSchedule.named("linear").alphas_cumprod
    assert abar[90] == pytest.approx(0.913, abs=1e-3)
    assert abar[150] == pytest.approx(0.786, abs=1e-3)
    assert np.all(np.diff(abar) < 0)


def test_cosine_schedule_follows_its_formula():
    abar = NoiseSchedule.named("cosine").alphas_cumprod
    f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert abar[499] == pytest.approx(f(500 / 1000) / f(0), rel=1e-6)
    assert NoiseSchedule.named("cosine", 4000).num_timesteps == 4000


def test_noise_depends_only_on_seed_index_and_draw():
    a = image_noise([5, 9, 12], seed=3, shape=(3, 8, 8))
    b = image_noise([12, 5], seed=3, shape=(3, 8, 8))
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0])
    assert not torch.equal(image_noise([5], seed=4, shape=(3, 8, 8))[0], a[0])
    assert not torch.equal(image_noise([5], seed=3, shape=(3, 8, 8), draw=1)[0], a[0])
    assert a.std().item() == pytest.approx(1.0, abs=0.15)


def test_q_sample_mixes_signal_and_noise_by_the_schedule():
    sched = NoiseSchedule.named("linear")
    x0, eps = torch.ones(2, 3, 4, 4), torch.zeros(2, 3, 4, 4)
    xt = sched.q_sample(x0, torch.tensor([0, 999]), eps)
    assert xt[0].mean().item() == pytest.approx(math.sqrt(sched.alphas_cumprod[0]), rel=1e-6)
    assert xt[1].mean().item() == pytest.approx(math.sqrt(sched.alphas_cumprod[999]), rel=1e-5)


def test_timesteps_are_checked():
    sched = NoiseSchedule.named("linear")
    assert sched.check_timesteps([0, 999]) == [0, 999]
    for bad in (-1, 1000, 2.5):
        with pytest.raises(DiffprobeError, match="outside this model's schedule"):
            sched.check_timesteps([bad])
    with pytest.raises(DiffprobeError, match="unknown noise schedule"):
        NoiseSchedule.named("sigmoid")

"""Schedules and deterministic per-image noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from diffprobe import DiffprobeError
from diffprobe.features.noise import FlowSchedule, NoiseSchedule, image_noise


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


def test_flow_noising_equals_the_flow_schedulers_own():
    """Rectified flow: x_t = (1−σ)·x0 + σ·ε with σ = t/T, equal to FlowMatchEulerDiscreteScheduler.scale_noise
    at the same t (shift 1: a probe reads σ = t/T; the sampling shift is recorded, not applied)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    schedule = FlowSchedule(1000, {"shift": 3.0})
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0)
    x0, eps = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    for t in (1, 10, 250, 999, 1000):
        ours = schedule.q_sample(x0, t, eps)
        theirs = scheduler.scale_noise(x0, torch.full((3,), float(t)), eps)
        assert torch.allclose(ours, theirs, atol=1e-6), t
    assert torch.equal(schedule.q_sample(x0, 0, eps), x0)  # t = 0: the clean latent
    assert schedule.check_timesteps([0, 1000]) == [0, 1000]
    with pytest.raises(DiffprobeError, match=r"expected an integer in \[0, 1000\]"):
        schedule.check_timesteps([1001])
    assert "σ = t/1000" in schedule.describe_t() and "shift=3.0" in schedule.describe_t()


def test_the_parameterization_is_part_of_a_stores_identity():
    from diffprobe.features.extract import parameterization

    ddpm, flow = NoiseSchedule.named("linear", 1000), FlowSchedule(1000, {})
    assert parameterization(ddpm) == {} and parameterization(flow) == {"parameterization": "flow"}
    assert ddpm.identity() != flow.identity() and flow.name == "flow-1000"

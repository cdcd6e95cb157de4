"""Noise schedules (ᾱ_t), deterministic per-image noise, and q_sample.

ᾱ is computed in float64 with guided-diffusion's formulas rather than taken from a
diffusers scheduler, because diffusers builds betas in float32 and the ADM checkpoints
were trained with float64 schedules (the fixture's `alphas_cumprod` is float64).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..errors import DiffprobeError


def linear_alphas_cumprod(steps: int) -> np.ndarray:
    scale = 1000 / steps  # guided-diffusion rescales so any step count spans the same noise levels
    betas = np.linspace(scale * 0.0001, scale * 0.02, steps, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def cosine_alphas_cumprod(steps: int, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(s: float) -> float:
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2

    betas = np.array([min(1 - alpha_bar((i + 1) / steps) / alpha_bar(i / steps), max_beta) for i in range(steps)])
    return np.cumprod(1.0 - betas)


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """ᾱ_t for t = 0..T-1; t is an integer passed to the model unscaled."""

    alphas_cumprod: np.ndarray  # float64, shape [T]
    name: str

    @classmethod
    def named(cls, name: str, steps: int = 1000) -> "NoiseSchedule":
        if name == "linear":
            return cls(linear_alphas_cumprod(steps), f"linear-{steps}")
        if name == "cosine":
            return cls(cosine_alphas_cumprod(steps), f"cosine-{steps}")
        raise DiffprobeError(f"unknown noise schedule {name!r}: expected linear or cosine")

    @property
    def num_timesteps(self) -> int:
        return len(self.alphas_cumprod)

    def check_timesteps(self, ts: Sequence[int]) -> list[int]:
        out = []
        for t in ts:
            if int(t) != t or not 0 <= int(t) < self.num_timesteps:
                raise DiffprobeError(f"timestep {t} is outside this model's schedule: expected an integer in [0, {self.num_timesteps - 1}]")
            out.append(int(t))
        return out

    def q_sample(self, x0: torch.Tensor, t: int | torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t·x0 + √(1-ᾱ_t)·ε, computed in float64 coefficients then cast to x0's dtype."""
        t_idx = torch.as_tensor(t, dtype=torch.long).reshape(-1).cpu()
        abar = torch.from_numpy(self.alphas_cumprod)[t_idx]
        if abar.numel() == 1:
            abar = abar.expand(x0.shape[0])
        a = abar.sqrt().to(x0.device, x0.dtype).view(-1, 1, 1, 1)
        s = (1 - abar).sqrt().to(x0.device, x0.dtype).view(-1, 1, 1, 1)
        return a * x0 + s * eps


def image_noise(indices: Sequence[int], seed: int, shape: Sequence[int], draw: int = 0) -> torch.Tensor:
    """ε for each image: a function of (seed, the image's index in its dataset, draw) only.

    So an image gets the same noise in any batch, on any worker or rank, at any timestep.
    Drawn on the CPU in float32 (device-independent), one generator per image.
    """
    out = torch.empty((len(indices), *shape), dtype=torch.float32)
    gen = torch.Generator()
    for row, index in enumerate(indices):
        # SeedSequence mixes the three integers into well-separated streams.
        state = np.random.SeedSequence([int(seed), int(index), int(draw)]).generate_state(2, np.uint32)
        gen.manual_seed(int(state[0]) << 32 | int(state[1]))
        out[row] = torch.randn(tuple(shape), generator=gen)
    return out

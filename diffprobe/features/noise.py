"""Noise schedules, deterministic per-image noise, and q_sample, in two parameterizations.

- DDPM (`NoiseSchedule`): x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε. ᾱ is computed in float64 with
  guided-diffusion's formulas rather than taken from a diffusers scheduler, because diffusers
  builds betas in float32 and the ADM checkpoints were trained with float64 schedules (the
  fixture's `alphas_cumprod` is float64).
- Rectified flow (`FlowSchedule`, SD3 and FLUX): x_t = (1−σ)·x0 + σ·ε with σ = t / T.

In both, `t` is what the denoiser receives, on the scheduler's 0..T scale, so one --t means
the same thing in every family's store.
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
    parameterization = "ddpm"
    noisy = True  # x_t mixes in ε (CleanImage, an encoder's: False)

    def identity(self) -> bytes:
        """What a backbone's fingerprint hashes of its schedule."""
        return self.alphas_cumprod.tobytes()

    def describe_t(self) -> str:
        return f"t is the DDPM timestep in 0..{self.num_timesteps - 1}: x_t = √ᾱ_t·x0 + √(1−ᾱ_t)·ε"

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

    @property
    def num_train_timesteps(self) -> int:
        """T, the scheduler's num_train_timesteps (here every t a probe may ask for is below it)."""
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
        if is_one_timestep(t):  # the coefficients filled on the device (no host tensor copied up)
            abar = float(self.alphas_cumprod[int(t)])
            a, s = (device_scalar(math.sqrt(c), x0) for c in (abar, 1 - abar))
            return a * x0 + s * eps
        abar = torch.from_numpy(self.alphas_cumprod)[torch.as_tensor(t).reshape(-1).long().cpu()]
        if abar.numel() == 1:
            abar = abar.expand(x0.shape[0])
        a = abar.sqrt().to(x0.device, x0.dtype).view(-1, 1, 1, 1)
        s = (1 - abar).sqrt().to(x0.device, x0.dtype).view(-1, 1, 1, 1)
        return a * x0 + s * eps


def is_one_timestep(t: object) -> bool:
    """A single Python or NumPy number (the extraction's case: coefficients filled on the device),
    as opposed to a tensor or list of per-image timesteps."""
    return isinstance(t, (int, float, np.integer, np.floating))


def device_scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """A float64 coefficient as a one-element tensor of `like`'s dtype on its device: the value a
    float64 tensor cast to that dtype holds, made by a fill on the device, so the host never waits."""
    return torch.full((1,) * like.dim(), value, dtype=like.dtype, device=like.device)


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


@dataclass(frozen=True, eq=False)
class FlowSchedule:
    """Rectified flow (diffusers' FlowMatchEulerDiscreteScheduler): x_t = (1−σ)·x0 + σ·ε, σ = t / T.

    t is an integer in 0..T (T: pure noise), the value the transformer receives as its timestep.
    The scheduler's shift and dynamic shifting move the sampling grid of σ; they are recorded
    (`sampling`) and not applied when probing: a probe at t reads the model at σ = t / T.
    """

    num_train_timesteps: int
    sampling: dict  # the scheduler's shift settings, for the record and for sampling
    parameterization = "flow"
    noisy = True

    @property
    def name(self) -> str:
        return f"flow-{self.num_train_timesteps}"

    @property
    def num_timesteps(self) -> int:
        """Timesteps a probe may ask for: 0..T, both ends included (σ = 0 clean, σ = 1 noise)."""
        return self.num_train_timesteps + 1

    def identity(self) -> bytes:
        return np.array([self.num_train_timesteps], dtype=np.int64).tobytes()

    def describe_t(self) -> str:
        shift = ", ".join(f"{k}={v}" for k, v in self.sampling.items())
        return (f"t is the flow timestep in 0..{self.num_train_timesteps}, σ = t/{self.num_train_timesteps}: "
                f"x_t = (1−σ)·x0 + σ·ε (sampling settings recorded, not applied when probing: {shift or 'none'})")  # fmt: skip

    def check_timesteps(self, ts: Sequence[int]) -> list[int]:
        out = []
        for t in ts:
            if int(t) != t or not 0 <= int(t) <= self.num_train_timesteps:
                raise DiffprobeError(f"timestep {t} is outside this flow model's schedule: expected an integer in "
                                     f"[0, {self.num_train_timesteps}] (σ = t/{self.num_train_timesteps})")  # fmt: skip
            out.append(int(t))
        return out

    def sigma(self, t: int | torch.Tensor) -> torch.Tensor:
        """σ for each t, in float64."""
        return torch.as_tensor(t, dtype=torch.float64).reshape(-1).cpu() / self.num_train_timesteps

    def q_sample(self, x0: torch.Tensor, t: int | torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """x_t = (1−σ)·x0 + σ·ε, σ in float64 then cast to x0's dtype."""
        if is_one_timestep(t):  # σ filled on the device (no host tensor copied up)
            sigma = device_scalar(float(t) / self.num_train_timesteps, x0)
            return (1 - sigma) * x0 + sigma * eps
        sigma = self.sigma(t)
        if sigma.numel() == 1:
            sigma = sigma.expand(x0.shape[0])
        s = sigma.to(x0.device, x0.dtype).view(-1, *([1] * (x0.dim() - 1)))
        return (1 - s) * x0 + s * eps


@dataclass(frozen=True, eq=False)
class CleanImage:
    """The "schedule" of a backbone that is not a diffusion model (backbones/encoders.py): it reads
    the clean image. t = 0 is the only setting, x_t = x0, and no noise is drawn; stores record it."""

    parameterization = "none"
    name = "clean-image"
    num_timesteps = 1
    num_train_timesteps = 0
    noisy = False

    def identity(self) -> bytes:
        return b"clean-image"

    def describe_t(self) -> str:
        return "not a diffusion model: it reads the clean image, so there is no timestep (stores use t = 0)"

    def check_timesteps(self, ts: Sequence[int]) -> list[int]:
        if any(int(t) != 0 for t in ts):
            raise DiffprobeError("this backbone is not a diffusion model: it reads the clean image, so --t does not apply "
                                 "(leave it out)")  # fmt: skip
        return [0 for _ in ts]

    def q_sample(self, x0: torch.Tensor, t: int | torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
        return x0

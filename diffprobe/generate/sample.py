"""`diffprobe sample`: images from a diffusion backbone with diffusers' schedulers.

DDPM-parameterized models sample with DDPM or DDIM, the schedulers given the backbone's own β_t
(`trained_betas`), so any schedule the model was trained with is sampled exactly. Flow models
(SD3, FLUX) sample with FlowMatchEulerDiscreteScheduler ("euler") and the pipeline's own shift
settings, which probing records but does not apply. Sample i is fully determined by (seed, batch
size): each batch has its own generator seeded by (seed, batch number).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..backbones.base import Backbone
from .._io import atomic_write, output_dir, output_errors, write_json
from ..errors import DiffprobeError
from ..precision import Compute


SAMPLERS = {"ddpm": ("ddpm", "ddim"), "flow": ("euler",)}


def default_sampler(backbone: Backbone) -> str:
    return "euler" if backbone.schedule.parameterization == "flow" else "ddim"


def check_sampler(backbone: Backbone, sampler: str) -> None:
    kind = backbone.schedule.parameterization
    if sampler not in SAMPLERS[kind]:
        raise DiffprobeError(f"--sampler {sampler}: a {kind} model samples with {' or '.join(SAMPLERS[kind])}")


def flow_scheduler(backbone: Backbone, steps: int):
    """The pipeline's Euler flow scheduler with its shift; dynamic shifting takes μ from the
    image's token count as the FLUX pipeline computes it."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    schedule = backbone.schedule
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=schedule.num_train_timesteps, **schedule.sampling)
    if scheduler.config.use_dynamic_shifting:
        c = scheduler.config
        _, h, w = backbone.model_shape
        tokens = (h // 2) * (w // 2)  # FLUX packs 2×2 latent patches into one token
        slope = (c.max_shift - c.base_shift) / (c.max_image_seq_len - c.base_image_seq_len)
        sigmas = np.linspace(1.0, 1 / steps, steps)  # FluxPipeline's default grid, before the shift
        scheduler.set_timesteps(sigmas=sigmas.tolist(), mu=tokens * slope + c.base_shift - slope * c.base_image_seq_len)
    else:
        scheduler.set_timesteps(steps)
    return scheduler


def make_scheduler(backbone: Backbone, sampler: str, learned_sigma: bool):
    from diffusers import DDIMScheduler, DDPMScheduler

    check_sampler(backbone, sampler)
    abar = backbone.schedule.alphas_cumprod
    betas = 1.0 - abar / np.append(1.0, abar[:-1])
    # x0 is clipped to [-1, 1] in pixel space only: latents have their own range.
    common = dict(num_train_timesteps=len(betas), trained_betas=betas.tolist(), clip_sample=not backbone.encodes_images,
                  prediction_type=backbone.prediction_type)  # fmt: skip
    if sampler == "ddpm":
        # DDPM's σ_t² = β̃_t (posterior variance) for fixed-variance models; the model's own for learned sigma.
        return DDPMScheduler(**common, variance_type="learned_range" if learned_sigma else "fixed_small")
    if sampler == "ddim":
        return DDIMScheduler(**common, set_alpha_to_one=True, timestep_spacing="trailing")
    raise DiffprobeError(f"unknown sampler {sampler!r}: expected ddpm or ddim")


DEFAULT_DDIM_STEPS = 100


def sampling_steps(backbone: Backbone, sampler: str, steps: int | None) -> int:
    """The step count to sample with: None means the sampler's default; anything else is checked
    (0 is an error, never quietly the default)."""
    check_sampler(backbone, sampler)
    total = backbone.schedule.num_train_timesteps
    if steps is None:
        return total if sampler == "ddpm" else min(DEFAULT_DDIM_STEPS, total)
    if sampler == "ddpm" and steps != total:
        raise DiffprobeError(f"ddpm samples with all {total} steps; use ddim for fewer (got --steps {steps})")
    if not 1 <= steps <= total:
        raise DiffprobeError(f"--steps {steps}: expected 1 to {total}, the model's schedule length (or leave it out for the default)")
    return steps


def check_eta(eta: float, sampler: str) -> None:
    """DDIM's η scales the noise each step adds: σ_t = η·√((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev)); 0 is
    deterministic DDIM, 1 gives DDPM's posterior variance. Above 1, σ_t² can exceed 1−ᾱ_prev and the
    direction term √(1−ᾱ_prev−σ_t²) becomes NaN; below 0 it means nothing (σ_t is a standard
    deviation); NaN or inf make every image black while the command succeeds. So η is refused
    unless finite and in [0, 1]."""
    if not (math.isfinite(eta) and 0 <= eta <= 1):
        raise DiffprobeError(f"--eta {eta}: expected a number from 0 (deterministic DDIM, the default) to 1 "
                             "(the noise of DDPM's posterior)")  # fmt: skip
    if sampler != "ddim" and eta != 0:
        raise DiffprobeError(f"--eta {eta} applies to the ddim sampler only (ddpm always adds its posterior noise): drop --eta or use --sampler ddim")


def sample_images(backbone: Backbone, num: int, sampler: str = "ddim", steps: int | None = None, seed: int = 0,
                  batch_size: int = 64, eta: float = 0.0, compute: Compute | None = None) -> torch.Tensor:  # fmt: skip
    """uint8 images [num, 3, S, S]."""
    if backbone.num_classes and backbone.default_class_label is None:  # DiT samples its null class
        raise DiffprobeError("sampling class-conditional models is not supported yet: use an unconditional checkpoint")
    if num < 1:
        raise DiffprobeError(f"--num {num}: expected the number of images to generate, at least 1")
    if batch_size < 1:
        raise DiffprobeError(f"--batch-size {batch_size}: expected at least 1")
    check_eta(eta, sampler)
    steps = sampling_steps(backbone, sampler, steps)
    compute = compute or Compute(torch.device("cpu"), "fp32", False, False)
    backbone = compute.prepare(backbone)  # a set-up copy; the caller's backbone is unchanged
    learned_sigma = backbone.learned_sigma
    if sampler == "euler":
        scheduler = flow_scheduler(backbone, steps)
    else:
        scheduler = make_scheduler(backbone, sampler, learned_sigma)
        scheduler.set_timesteps(steps)
    images = []
    batches = range(0, num, batch_size)
    bar = tqdm(total=len(batches) * len(scheduler.timesteps), desc=f"sampling ({sampler}, {steps} steps)", unit="step", mininterval=2)
    for number, start in enumerate(batches):
        n = min(batch_size, num - start)
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([seed, number]).generate_state(1)[0]))
        x = torch.randn((n, *backbone.model_shape), generator=gen)
        for t in scheduler.timesteps:
            with torch.no_grad(), compute.autocast():
                # Flow timesteps are real numbers (σ·T after the shift), DDPM's are integers.
                t_in = torch.full((n,), float(t) if sampler == "euler" else int(t), device=compute.device)
                out = backbone.denoise(compute.batch(x.to(compute.device)), t_in).float().cpu()
            if sampler == "ddim" and learned_sigma:
                out = out[:, :backbone.in_channels]  # DDIM is deterministic: the variance channels are not used
            kwargs = {"eta": eta} if sampler == "ddim" else {}
            x = scheduler.step(out, t, x, generator=gen, **kwargs).prev_sample
            bar.update(1)
        with torch.no_grad(), compute.autocast():
            decoded = backbone.decode(x.to(compute.device)).float().cpu()
        images.append(((decoded.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8))
    bar.close()
    return torch.cat(images)


GRID_MIN_PIXELS = 512


def save_samples(images: torch.Tensor, out: str | Path, info: dict) -> dict[str, str]:
    """samples.npz (uint8 NHWC under `arr_0`, guided-diffusion's format), grid.png, samples.json."""
    from torchvision.utils import make_grid, save_image

    out = output_dir(out)
    with output_errors(out):
        def write_npz(path: str) -> None:
            with open(path, "wb") as f:  # a file object, so numpy keeps the temporary name as is
                np.savez(f, arr_0=images.permute(0, 2, 3, 1).numpy())

        atomic_write(out / "samples.npz", write_npz)
        shown = images[:100]
        nrow = int(np.ceil(np.sqrt(len(shown))))
        grid = make_grid(shown.float() / 255, nrow=nrow, padding=1, pad_value=1.0)
        scale = -(-GRID_MIN_PIXELS // grid.shape[-1])  # 4×4 samples of 32 px made a 133 px image: enlarge, pixels kept sharp
        if scale > 1:
            grid = torch.nn.functional.interpolate(grid[None], scale_factor=scale, mode="nearest")[0]
        atomic_write(out / "grid.png", lambda p: save_image(grid, p, format="png"))
        write_json(out / "samples.json", info)
    return {"npz": str(out / "samples.npz"), "grid": str(out / "grid.png")}


def sample_grid(backbone: Backbone, out: str | Path, num: int, steps: int, compute: Compute, seed: int = 0) -> Path:
    """Samples with the model's default sampler (DDIM, or Euler for flow models) into out/
    (grid.png, samples.npz, samples.json); returns the grid."""
    sampler = default_sampler(backbone)
    steps = min(steps, backbone.schedule.num_train_timesteps)
    images = sample_images(backbone, num, sampler, steps, seed=seed, batch_size=num, compute=compute)
    files = save_samples(images, out, {"source": backbone.source, "sampler": sampler, "steps": steps, "seed": seed, "num": num})
    return Path(files["grid"])

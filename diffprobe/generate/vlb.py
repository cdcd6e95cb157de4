"""The variational-bound term that trains a learned variance (Nichol & Dhariwal, 2021, improved DDPM).

Written here because neither diffusers nor PyTorch ship the training loss for the "learned_range"
variance (diffusers only samples with it). Everything is in bits per dimension, as in the paper:
KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t)) for t > 0 and the discretised decoder NLL at t = 0.
"""

from __future__ import annotations

import math
import weakref

import numpy as np
import torch

from ..features.noise import NoiseSchedule


def posterior_terms(schedule: NoiseSchedule) -> dict[str, torch.Tensor]:
    """Per-timestep coefficients of q(x_{t-1} | x_t, x_0), in float64 (as computed by guided-diffusion)."""
    abar = schedule.alphas_cumprod
    abar_prev = np.append(1.0, abar[:-1])
    betas = 1.0 - abar / abar_prev
    var = betas * (1.0 - abar_prev) / (1.0 - abar)
    # The posterior variance is 0 at t = 0: its log is clipped to the value at t = 1.
    log_var_clipped = np.log(np.append(var[1], var[1:]))
    return {
        "log_betas": torch.from_numpy(np.log(betas)),
        "log_var_clipped": torch.from_numpy(log_var_clipped),
        "coef_x0": torch.from_numpy(betas * np.sqrt(abar_prev) / (1.0 - abar)),
        "coef_xt": torch.from_numpy((1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar)),
        "sqrt_recip_abar": torch.from_numpy(np.sqrt(1.0 / abar)),
        "sqrt_recipm1_abar": torch.from_numpy(np.sqrt(1.0 / abar - 1)),
    }


_ON_DEVICE: "weakref.WeakKeyDictionary[NoiseSchedule, dict]" = weakref.WeakKeyDictionary()


def _terms_on(schedule: NoiseSchedule, device: torch.device) -> dict[str, torch.Tensor]:
    """posterior_terms on `device`, made once per schedule and device: copying the tables up at every
    training step made the host wait for the GPU several times a step."""
    per_device = _ON_DEVICE.setdefault(schedule, {})
    if device not in per_device:
        per_device[device] = {k: v.to(device) for k, v in posterior_terms(schedule).items()}
    return per_device[device]


def _at(values: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.to(like.device)[t].to(like.dtype).view(-1, *([1] * (like.ndim - 1)))


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def discretized_gaussian_nll(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """-log p of 8-bit pixels x ∈ [-1, 1] under a Gaussian integrated over each pixel's bin of width 2/255."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    upper = inv_std * (centered + 1.0 / 255.0)
    lower = inv_std * (centered - 1.0 / 255.0)
    log_cdf_upper = torch.special.log_ndtr(upper)
    log_one_minus_cdf_lower = torch.special.log_ndtr(-lower)
    log_delta = torch.log((torch.special.ndtr(upper) - torch.special.ndtr(lower)).clamp(min=1e-12))
    log_probs = torch.where(x < -0.999, log_cdf_upper, torch.where(x > 0.999, log_one_minus_cdf_lower, log_delta))
    return -log_probs


def learned_range_vlb(schedule: NoiseSchedule, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                      eps_pred: torch.Tensor, var_values: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """L_vlb per image (bits/dim) for a model predicting ε and v ∈ [-1, 1] interpolating log β_t and log β̃_t."""
    terms = _terms_on(schedule, x0.device)
    frac = (var_values + 1) / 2
    model_logvar = frac * _at(terms["log_betas"], t, x0) + (1 - frac) * _at(terms["log_var_clipped"], t, x0)
    x0_pred = _at(terms["sqrt_recip_abar"], t, x0) * x_t - _at(terms["sqrt_recipm1_abar"], t, x0) * eps_pred
    model_mean = _at(terms["coef_x0"], t, x0) * x0_pred + _at(terms["coef_xt"], t, x0) * x_t
    true_mean = _at(terms["coef_x0"], t, x0) * x0 + _at(terms["coef_xt"], t, x0) * x_t
    true_logvar = _at(terms["log_var_clipped"], t, x0)
    kl = normal_kl(true_mean, true_logvar, model_mean, model_logvar).flatten(1).mean(1) / math.log(2.0)
    nll = discretized_gaussian_nll(x0, model_mean, 0.5 * model_logvar).flatten(1).mean(1) / math.log(2.0)
    return torch.where(t == 0, nll, kl)

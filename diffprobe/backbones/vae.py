"""The VAE of a latent diffusion pipeline: images in [-1, 1] <-> the latents the noise is added to.

Encoding is deterministic: the posterior mean of AutoencoderKL (no sample is drawn), shifted
by `shift_factor` when the VAE has one (SD3/FLUX-style) and times `scaling_factor`, exactly
as the pipelines scale latents before training. So an image has one latent, whatever the
batch, seed or device, and it can be cached once per image.

`LatentBackbone` is the part of the contract every VAE model shares (encode, decode, the
latent model_shape, the encoder's identity); SD and DiT backbones build on it.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any

import torch
from torch import nn

from .base import Backbone, BlockInfo, hash_tensors


class VaeCodec(nn.Module):
    def __init__(self, vae: nn.Module):
        super().__init__()
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        self.scaling_factor = float(getattr(cfg, "scaling_factor", 1.0) or 1.0)
        self.shift_factor = float(getattr(cfg, "shift_factor", None) or 0.0)
        self.latent_channels = int(cfg.latent_channels)
        self.factor = 2 ** (len(cfg.block_out_channels) - 1)  # pixels per latent pixel (SD: 8)

    def describe(self) -> dict:
        """What a backbone's config records of its VAE (part of the store identity)."""
        return {"class": type(self.vae).__name__, "scaling_factor": self.scaling_factor, "shift_factor": self.shift_factor,
                "encoding": "posterior mean"}  # fmt: skip

    def _weights(self) -> torch.Tensor:
        return next(p for p in self.vae.parameters() if p.ndim > 1)

    def _autocast(self) -> contextlib.AbstractContextManager:
        # Weights cast to bf16/fp16 for extraction (Compute.prepare) need autocast around them.
        w = self._weights()
        if w.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(w.device.type, dtype=w.dtype)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """[B, 3, S, S] in [-1, 1] -> [B, C, S/f, S/f] float32 latents (posterior mean, scaled)."""
        w = self._weights()
        with self._autocast():
            mean = self.vae.encode(images.to(w.device, torch.float32)).latent_dist.mean
        # Contiguous: the VAE's output can be channels-last strided, and a cached copy (always
        # contiguous) must give the U-Net bit-identical input to a fresh encode.
        return ((mean.float() - self.shift_factor) * self.scaling_factor).contiguous().to(images.device)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] (for sampling)."""
        w = self._weights()
        z = latents.to(w.device, torch.float32) / self.scaling_factor + self.shift_factor
        with self._autocast():
            images = self.vae.decode(z).sample
        return images.float().clamp(-1, 1).to(latents.device)

    def identity(self, image_size: int) -> str:
        """Hash of everything encode() depends on."""
        h = hashlib.sha256(f"{type(self.vae).__name__}|{self.scaling_factor}|{self.shift_factor}|{image_size}".encode())
        hash_tensors(h, self.vae.state_dict())
        return h.hexdigest()[:20]


class LatentBackbone(Backbone):
    """A backbone whose noise lives in the latent space of `self.codec` (SD, DiT)."""

    encodes_images = True

    def __init__(self, model: nn.Module, codec: VaeCodec, blocks: list[BlockInfo], image_size: int, schedule,
                 num_classes: int | None, config: dict[str, Any], source: str):  # fmt: skip
        super().__init__(model, blocks, image_size, schedule, num_classes, config, source)
        self.codec = codec
        self.in_channels = codec.latent_channels
        self._encoder_identity: str | None = None

    @property
    def model_shape(self) -> tuple[int, int, int]:
        side = self.image_size // self.codec.factor
        return (self.in_channels, side, side)

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.codec.encode(images)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return self.codec.decode(x0)

    def encoder_identity(self) -> str:
        if self._encoder_identity is None:
            self._encoder_identity = self.codec.identity(self.image_size)
        return self._encoder_identity

    def extra_identity(self) -> dict[str, torch.Tensor]:
        return {f"vae.{k}": v for k, v in self.codec.vae.state_dict().items()}

    def fingerprint(self) -> str:
        self.encoder_identity()  # taken with the fingerprint, before Compute.prepare casts any weight
        return super().fingerprint()

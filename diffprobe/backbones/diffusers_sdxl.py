"""SDXL-style pipelines: a UNet2DConditionModel with `addition_embed_type="text_time"` (added
conditioning from a pooled text embedding and size/crop ids), two CLIP text encoders, a VAE.

Conditioning, as StableDiffusionXLPipeline gives it:
- the prompt (empty by default, `prompt=...`) is encoded once at load by the pipeline's own
  `encode_prompt`: both encoders' penultimate hidden states side by side, and the second encoder's
  pooled projection; the encoders are then freed. The empty prompt is encoded as zeros where the
  pipeline's `force_zeros_for_empty_prompt` says so (its default: SDXL base's unconditional input);
- time ids: original size = target size = the image size, crop (0, 0), as the pipeline's defaults.

The refiner (one text encoder, aesthetic-score ids) is refused in one line. Blocks, units and
the walk are Stable Diffusion's (diffusers_sd.py), with the added embedding in the time embedding.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DiffprobeError
from .base import BlockInfo
from .pipeline_parts import (architecture_config, as_int, check_image_size, check_prompt_model_options, hub_json, load_part,
                             prediction_type, read_json)  # fmt: skip
from .diffusers_sd import StableDiffusionBackbone, check_unet_blocks, meta_blocks, run_sd
from .diffusers_unet import _schedule, _units
from .prompt_cache import encoded_prompt
from .vae import VaeCodec

WHAT = "UNet2DConditionModel+text_time"  # the registry's key for SDXL's U-Net


class StableDiffusionXLBackbone(StableDiffusionBackbone):
    family = "stable-diffusion-xl"

    def __init__(self, unet: nn.Module, codec: VaeCodec, context: torch.Tensor, text_embeds: torch.Tensor, time_ids: torch.Tensor,
                 blocks: list[BlockInfo], image_size: int, schedule, config: dict[str, Any], source: str):  # fmt: skip
        super().__init__(unet, codec, context, blocks, image_size, schedule, config, source)
        self.register_buffer("text_embeds", text_embeds)  # the second encoder's pooled projection, [1, D]
        self.register_buffer("time_ids", time_ids)  # original size, crop, target size, [1, 6]

    def extra_identity(self) -> dict[str, torch.Tensor]:
        return {**super().extra_identity(), "text_embeds": self.text_embeds, "time_ids": self.time_ids}

    def added(self, batch: int, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {"text_embeds": self.text_embeds.to(device, dtype).expand(batch, -1),
                "time_ids": self.time_ids.to(device, dtype).expand(batch, -1)}  # fmt: skip

    def run(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, wanted: tuple[int, ...], out: dict | None = None) -> dict[int, torch.Tensor]:
        if y is not None:
            raise DiffprobeError("SDXL is conditioned on a prompt, not a class label: drop --class-label (use -o prompt=TEXT)")
        return run_sd(self.model, self._units, x, t, self.context, wanted, out, self.added(x.shape[0], x.device, x.dtype))

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        context = self.context.to(x_t.device).expand(x_t.shape[0], -1, -1)
        return self.model(x_t, t, encoder_hidden_states=context, added_cond_kwargs=self.added(x_t.shape[0], x_t.device, x_t.dtype)).sample

    @property
    def conditioning(self) -> str:
        how = "zeros (force_zeros_for_empty_prompt)" if self.config["empty_prompt_zeros"] and not self.config["prompt"] else \
            "encoded by both CLIP encoders as StableDiffusionXLPipeline.encode_prompt does"  # fmt: skip
        size = self.image_size
        return f"prompt {self.config['prompt']!r}, {how}; time ids: original {size}×{size}, crop (0, 0), target {size}×{size}"

    def random_like(self, seed: int = 0) -> "StableDiffusionXLBackbone":
        """A freshly initialised U-Net; the VAE and the encoded conditioning stay (they are not what is probed)."""
        from diffusers import UNet2DConditionModel

        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(self.model.config)
        config = {**self.config, "weights": f"random (seed {seed})"}
        return StableDiffusionXLBackbone(unet, self.codec, self.context, self.text_embeds, self.time_ids, self.blocks, self.image_size,
                                         self.schedule, config, source=f"{self.source} [random weights, seed {seed}]")  # fmt: skip


def pipeline_config(target: str, local: bool) -> dict:
    """model_index.json: the pipeline's own settings (force_zeros_for_empty_prompt, requires_aesthetics_score)."""
    if local:
        path = Path(target) / "model_index.json"
        return read_json(path) if path.is_file() else {}
    return hub_json(target, "model_index.json") or {}


def encode_prompt(target: str, local: bool, prompt: str, zeros_for_empty: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """StableDiffusionXLPipeline.encode_prompt on the pipeline's own encoders (loaded here, freed after):
    ([1, 77, D1 + D2] penultimate states, [1, P] pooled); zeros for the empty prompt where the pipeline says so.
    Cached (prompt_cache.py)."""
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    def encode(parts: dict) -> dict[str, torch.Tensor]:
        pipe = StableDiffusionXLPipeline(vae=None, unet=None, scheduler=None, force_zeros_for_empty_prompt=zeros_for_empty, **parts)
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompt, device=torch.device("cpu"), num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)  # fmt: skip
        if zeros_for_empty and not prompt:  # what the pipeline feeds the U-Net as its unconditional input
            embeds, pooled = torch.zeros_like(embeds), torch.zeros_like(pooled)
        return {"context": embeds.float(), "pooled": pooled.float()}

    parts = {"text_encoder": CLIPTextModel, "tokenizer": CLIPTokenizer, "text_encoder_2": CLIPTextModelWithProjection,
             "tokenizer_2": CLIPTokenizer}  # fmt: skip
    encoded = encoded_prompt(target, local, WHAT, parts, {"family": "sdxl", "prompt": prompt, "zeros_for_empty": zeros_for_empty}, encode)
    return encoded["context"], encoded["pooled"]


def load_sdxl(target: str, local: bool, device: str | torch.device = "cpu", prompt: str = "", image_size: Any = None,
              schedule: str | None = None, num_train_timesteps: Any = None, class_label: Any = None,
              subfolder: str | None = None) -> StableDiffusionXLBackbone:  # fmt: skip
    from diffusers import AutoencoderKL, UNet2DConditionModel

    check_prompt_model_options("SDXL", class_label, subfolder, "unet")
    settings = pipeline_config(target, local)
    if settings.get("requires_aesthetics_score") or (local and not (Path(target) / "text_encoder").is_dir() and (Path(target) / "text_encoder_2").is_dir()):
        raise DiffprobeError(f"{target} is an SDXL refiner (one text encoder, aesthetic-score ids): diffprobe reads SDXL base-style "
                             "pipelines (stabilityai/stable-diffusion-xl-base-1.0)")  # fmt: skip
    unet = load_part(UNet2DConditionModel, target, local, "unet", WHAT, low_cpu_mem_usage=False)
    codec = VaeCodec(load_part(AutoencoderKL, target, local, "vae", WHAT, low_cpu_mem_usage=False))
    check_unet_blocks(unet, codec.latent_channels)
    zeros = bool(settings.get("force_zeros_for_empty_prompt", True))  # the pipeline's default
    context, pooled = encode_prompt(target, local, str(prompt), zeros)
    units = _units(unet)
    downsamplers = sum(1 for name, _ in units if ".downsamplers." in name)
    sample = unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0]
    size = check_image_size(image_size, sample * codec.factor, codec.factor * 2**downsamplers, "SDXL U-Net (VAE factor × its downsampling)")
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)  # original, crop top-left, target
    expected = unet.add_embedding.linear_1.in_features
    given = unet.config.addition_time_embed_dim * time_ids.shape[1] + pooled.shape[1]
    if expected != given:
        raise DiffprobeError(f"the U-Net's added embedding takes {expected} values, but 6 time ids × {unet.config.addition_time_embed_dim} "
                             f"+ the pooled text embedding's {pooled.shape[1]} give {given}: text_encoder_2/ does not fit unet/")  # fmt: skip
    steps = as_int(num_train_timesteps, "num_train_timesteps") if num_train_timesteps is not None else None
    sched = _schedule(target, local, schedule, steps)
    added = {"text_embeds": torch.zeros(*pooled.shape, device="meta"), "time_ids": torch.zeros(*time_ids.shape, device="meta")}
    blocks = meta_blocks(unet, units, size // codec.factor, context.shape, added)
    config = architecture_config(unet)
    config.update(noise_schedule=sched.name, prompt=str(prompt), empty_prompt_zeros=zeros, image_size=size,
                  time_ids=[int(v) for v in time_ids[0]],
                  vae=codec.describe())  # fmt: skip
    backbone = StableDiffusionXLBackbone(unet, codec, context, pooled, time_ids, blocks, size, sched, config, source=f"diffusers:{target}")
    backbone.prediction_type = config["prediction_type"] = prediction_type(target, local)
    return backbone.to(device)

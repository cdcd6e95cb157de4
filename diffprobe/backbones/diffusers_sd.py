"""Stable Diffusion-style pipelines (UNet2DConditionModel + AutoencoderKL + CLIP text encoder).

Images go to latents with the VAE (posterior mean × scaling factor, see vae.py); the noise is
added there with the pipeline scheduler's ᾱ. The U-Net reads a prompt through cross-attention:
the empty prompt by default, or `prompt=...`, encoded once at load (the text encoder is then
dropped; the encoded prompt is part of the backbone's fingerprint).

Block numbering is the pixel U-Net's (diffusers_unet.py): conv_in, each down resnet(+cross-
attention) unit and downsampler, mid_block, each up unit (the last of an up block includes its
upsampler). Channels and resolution are those of the latent-space feature maps; for SD 1.5 at
512 px, conv_in is 320×64×64 and `up_blocks.1.resnets.2` (DIFT's up_blocks.1) is 1280×32×32.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import DiffprobeError
from .base import BlockInfo
from .pipeline_parts import architecture_config, as_int, check_image_size, check_prompt_model_options, load_part, prediction_type
from .diffusers_unet import _schedule, _units, walk_units
from .prompt_cache import encoded_prompt
from .vae import LatentBackbone, VaeCodec

SUPPORTED_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D")
SUPPORTED_UP = ("UpBlock2D", "CrossAttnUpBlock2D")
SUPPORTED_MID = ("UNetMidBlock2DCrossAttn", None)
WHAT = "UNet2DConditionModel"


def check_unet_blocks(unet: nn.Module, latent_channels: int) -> None:
    """What SD 1.x/2.x and SDXL U-Nets share: their block types, no class embedding, a text-to-image input."""
    cfg = unet.config
    if cfg.get("class_embed_type") is not None or cfg.get("num_class_embeds") is not None:
        raise DiffprobeError("this UNet2DConditionModel takes class embeddings (an upscaler or variation model?): diffprobe reads SD 1.x/2.x-style U-Nets only")
    if cfg.get("encoder_hid_dim_type") is not None:
        raise DiffprobeError(f"this UNet2DConditionModel projects its context ({cfg.encoder_hid_dim_type}): diffprobe reads SD 1.x/2.x-style U-Nets only")
    bad = [t for t in cfg.down_block_types if t not in SUPPORTED_DOWN] + [t for t in cfg.up_block_types if t not in SUPPORTED_UP]
    if cfg.mid_block_type not in SUPPORTED_MID:
        bad.append(cfg.mid_block_type)
    if bad:
        raise DiffprobeError(
            f"UNet2DConditionModel block type(s) {', '.join(sorted(set(bad)))} not supported; supported: "
            f"{', '.join(SUPPORTED_DOWN + SUPPORTED_UP + SUPPORTED_MID[:1])}"
        )
    if cfg.in_channels != latent_channels:
        raise DiffprobeError(
            f"the U-Net takes {cfg.in_channels} input channels but the VAE gives {latent_channels} "
            "(an inpainting or depth model?): diffprobe reads text-to-image U-Nets"
        )


def _check_supported(unet: nn.Module, latent_channels: int) -> None:
    cfg = unet.config
    if cfg.get("addition_embed_type") is not None:  # SDXL's text_time is read by diffusers_sdxl.py
        raise DiffprobeError(f"this UNet2DConditionModel needs added conditioning (addition_embed_type={cfg.addition_embed_type!r}): "
                             "diffprobe reads SD 1.x/2.x-style U-Nets and SDXL's text_time conditioning")  # fmt: skip
    check_unet_blocks(unet, latent_channels)


def _embedding(unet: nn.Module, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, added: dict | None) -> torch.Tensor:
    """UNet2DConditionModel's timestep embedding, plus SDXL's added embedding (pooled text, time ids)
    where `added` holds it, in the order forward sums them (class embeddings are refused at load)."""
    emb = unet.time_embedding(unet.get_time_embed(sample=x, timestep=t), None)
    if added is not None:
        emb = emb + unet.get_aug_embed(emb=emb, encoder_hidden_states=context, added_cond_kwargs=added)
    return unet.time_embed_act(emb) if unet.time_embed_act is not None else emb


def run_sd(unet: nn.Module, units, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, wanted: tuple[int, ...],
           out: dict | None = None, added: dict | None = None) -> dict[int, torch.Tensor]:  # fmt: skip
    """UNet2DConditionModel.forward unit by unit, stopping after the deepest wanted block."""
    if unet.config.center_input_sample:
        x = 2 * x - 1.0
    context = context.to(x.device).expand(x.shape[0], -1, -1)
    return walk_units(units, x, _embedding(unet, x, t, context, added), wanted, context=context, out=out)


class StableDiffusionBackbone(LatentBackbone):
    family = "stable-diffusion"

    def __init__(self, unet: nn.Module, codec: VaeCodec, context: torch.Tensor, blocks: list[BlockInfo],
                 image_size: int, schedule, config: dict[str, Any], source: str):  # fmt: skip
        super().__init__(unet, codec, blocks, image_size, schedule, None, config, source)
        self.register_buffer("context", context)  # the encoded prompt, [1, tokens, dim]
        self._units = _units(self.model)

    def extra_identity(self) -> dict[str, torch.Tensor]:
        return {**super().extra_identity(), "context": self.context}

    def run(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, wanted: tuple[int, ...], out: dict | None = None) -> dict[int, torch.Tensor]:
        if y is not None:
            raise DiffprobeError("a Stable Diffusion U-Net is conditioned on a prompt, not a class label: drop --class-label (use -o prompt=TEXT)")
        return run_sd(self.model, self._units, x, t, self.context, wanted, out)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        context = self.context.to(x_t.device).expand(x_t.shape[0], -1, -1)
        return self.model(x_t, t, encoder_hidden_states=context).sample

    @property
    def conditioning(self) -> str:
        return f"prompt {self.config['prompt']!r}"

    @property
    def learned_sigma(self) -> bool:
        return self.model.config.out_channels == 2 * self.model.config.in_channels

    def random_like(self, seed: int = 0) -> "StableDiffusionBackbone":
        """A freshly initialised U-Net; the VAE and the encoded prompt stay (they are not what is probed)."""
        from diffusers import UNet2DConditionModel

        torch.manual_seed(seed)
        unet = UNet2DConditionModel.from_config(self.model.config)
        config = {**self.config, "weights": f"random (seed {seed})"}
        return StableDiffusionBackbone(unet, self.codec, self.context, self.blocks, self.image_size, self.schedule, config,
                                       source=f"{self.source} [random weights, seed {seed}]")  # fmt: skip


def encode_prompt(target: str, local: bool, prompt: str) -> torch.Tensor:
    """The CLIP text encoder's last hidden state for `prompt`, padded to the tokenizer's length, [1, L, D]
    (cached: prompt_cache.py)."""
    from transformers import CLIPTextModel, CLIPTokenizer

    def encode(parts: dict) -> dict[str, torch.Tensor]:
        tokenizer, encoder = parts["tokenizer"], parts["text_encoder"].eval()
        tokens = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
        mask = tokens.attention_mask if getattr(encoder.config, "use_attention_mask", False) else None
        return {"context": encoder(tokens.input_ids, attention_mask=mask)[0].float()}

    parts = {"text_encoder": CLIPTextModel, "tokenizer": CLIPTokenizer}
    return encoded_prompt(target, local, WHAT, parts, {"family": "sd", "prompt": prompt}, encode)["context"]


def load_stable_diffusion(target: str, local: bool, device: str | torch.device = "cpu", prompt: str = "",
                          image_size: Any = None, schedule: str | None = None, num_train_timesteps: Any = None,
                          class_label: Any = None, subfolder: str | None = None) -> StableDiffusionBackbone:  # fmt: skip
    from diffusers import AutoencoderKL, UNet2DConditionModel

    check_prompt_model_options("Stable Diffusion", class_label, subfolder, "unet")
    unet = load_part(UNet2DConditionModel, target, local, "unet", WHAT, low_cpu_mem_usage=False)
    codec = VaeCodec(load_part(AutoencoderKL, target, local, "vae", WHAT, low_cpu_mem_usage=False))
    _check_supported(unet, codec.latent_channels)
    context = encode_prompt(target, local, str(prompt))
    units = _units(unet)
    downsamplers = sum(1 for name, _ in units if ".downsamplers." in name)
    sample = unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0]
    size = check_image_size(image_size, sample * codec.factor, codec.factor * 2**downsamplers, "Stable Diffusion U-Net (VAE factor × its downsampling)")
    steps = as_int(num_train_timesteps, "num_train_timesteps") if num_train_timesteps is not None else None
    sched = _schedule(target, local, schedule, steps)
    blocks = meta_blocks(unet, units, size // codec.factor, context.shape)
    config = architecture_config(unet)
    config.update(noise_schedule=sched.name, prompt=str(prompt), image_size=size,
                  vae=codec.describe())  # fmt: skip
    backbone = StableDiffusionBackbone(unet, codec, context, blocks, size, sched, config, source=f"diffusers:{target}")
    backbone.prediction_type = config["prediction_type"] = prediction_type(target, local)
    return backbone.to(device)


def meta_blocks(unet: nn.Module, units, side: int, context_shape, added: dict | None = None) -> list[BlockInfo]:
    """Every block's channels and side from one pass on the meta device (exact, computes nothing)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        meta = UNet2DConditionModel.from_config(unet.config)
    x = torch.zeros(1, unet.config.in_channels, side, side, device="meta")
    context = torch.zeros(*context_shape, device="meta")
    outs = run_sd(meta, _units(meta), x, torch.zeros(1, dtype=torch.long, device="meta"), context, tuple(range(1, len(units) + 1)),
                  added=added)  # fmt: skip
    return [BlockInfo(i, units[i - 1][0], int(h.shape[1]), int(h.shape[-1])) for i, h in outs.items()]

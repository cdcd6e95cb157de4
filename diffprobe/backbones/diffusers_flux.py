"""FLUX.1 pipelines (FluxTransformer2DModel: dev, schnell), flow-matching latent transformers.

Noise: rectified flow, x_t = (1−σ)·x0 + σ·ε, σ = t / T (features/noise.FlowSchedule). The
transformer itself takes σ (FluxPipeline passes t / 1000), so `t` keeps the meaning it has in every
other family: the scheduler's timestep, 0..T.

Latents are packed as the pipeline packs them: 2×2 latent patches become one token, with image
position ids (row, column) and zero text ids for the rotary embedding. Blocks: 1 is the token
embedding (`x_embedder`), then each double-stream block (`transformer_blocks.i`), then each
single-stream block (`single_transformer_blocks.i`); only the image tokens, split from the text
tokens, come out, as maps [B, D, H/2, W/2] in latent units (H/16 of the image at FLUX's VAE
factor 8).

Conditioning: the empty prompt by default (`prompt=...`), encoded once at load by
FluxPipeline.encode_prompt itself (CLIP's pooled output, T5's last state), the text encoders then
freed; the guidance embedding of guidance-distilled models (dev) reads the pipeline's default
guidance scale 3.5 (`guidance=...`), and is refused for models without one (schnell).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import DiffprobeError
from .base import BlockInfo
from .pipeline_parts import architecture_config, as_int, check_image_size, check_prompt_model_options, load_part
from .diffusers_sd3 import flow_schedule
from .partial import finish_depth, load_transformer
from .prompt_cache import encoded_prompt
from .tokens import stacked_blocks, tokens_to_map
from .vae import LatentBackbone, VaeCodec

WHAT = "FluxTransformer2DModel"
DEFAULT_GUIDANCE = 3.5  # FluxPipeline.__call__'s guidance_scale
MAX_SEQUENCE_LENGTH = 512  # FluxPipeline's default T5 length
DEFAULT_LATENT_SIDE = 128  # FluxPipeline.default_sample_size: the latent side it generates at


def pack(latents: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] → [B, (H/2)·(W/2), 4C], FluxPipeline._pack_latents' order."""
    b, c, h, w = latents.shape
    return latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of `pack`, to a [B, C, height, width] latent."""
    b, _, d = tokens.shape
    return tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Each packed token's (0, row, column), FluxPipeline._prepare_latent_image_ids' layout."""
    rows, cols = height // 2, width // 2  # made on the device: a host-made table would be copied up at every pass
    ids = torch.zeros(rows, cols, 3, device=device)
    ids[..., 1] += torch.arange(rows, device=device)[:, None]
    ids[..., 2] += torch.arange(cols, device=device)[None, :]
    return ids.reshape(-1, 3).to(dtype)


class FluxBackbone(LatentBackbone):
    family = "flux"
    tail_modules = ("norm_out", "proj_out")  # the output head: only sampling runs it

    def __init__(self, model: nn.Module, codec: VaeCodec, prompt: torch.Tensor, pooled: torch.Tensor, guidance: float | None,
                 blocks: list[BlockInfo], image_size: int, schedule, config: dict[str, Any], source: str):  # fmt: skip
        super().__init__(model, codec, blocks, image_size, schedule, None, config, source)
        self.register_buffer("prompt_embeds", prompt)  # [1, T5 tokens, joint dim]
        self.register_buffer("pooled_projections", pooled)  # [1, CLIP width]
        self.guidance = guidance

    def extra_identity(self) -> dict[str, torch.Tensor]:
        extra = {"prompt_embeds": self.prompt_embeds, "pooled_projections": self.pooled_projections}
        if self.guidance is not None:
            extra["guidance"] = torch.tensor([self.guidance], dtype=torch.float64)
        return {**super().extra_identity(), **extra}

    def _inputs(self, x: torch.Tensor, t: torch.Tensor) -> dict[str, torch.Tensor]:
        """What FluxTransformer2DModel.forward takes besides the tokens, for a latent batch x at timesteps t."""
        batch, dtype = x.shape[0], x.dtype
        sigma = t.to(x.device, dtype) / self.schedule.num_train_timesteps  # the transformer takes σ, as the pipeline gives it
        guidance = torch.full((batch,), self.guidance, device=x.device, dtype=dtype) if self.guidance is not None else None
        return {"timestep": sigma, "guidance": guidance,
                "encoder_hidden_states": self.prompt_embeds.to(x.device, dtype).expand(batch, -1, -1),
                "pooled_projections": self.pooled_projections.to(x.device, dtype).expand(batch, -1),
                "txt_ids": torch.zeros(self.prompt_embeds.shape[1], 3, device=x.device, dtype=dtype),
                "img_ids": image_ids(x.shape[-2], x.shape[-1], x.device, dtype)}  # fmt: skip

    def run(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, wanted: tuple[int, ...], out: dict | None = None) -> dict[int, torch.Tensor]:
        """FluxTransformer2DModel.forward up to the deepest wanted block; each wanted block's image tokens as a map."""
        if y is not None:
            raise DiffprobeError("FLUX is conditioned on a prompt, not a class label: drop --class-label (use -o prompt=TEXT)")
        model, rows, cols, last = self.model, x.shape[-2] // 2, x.shape[-1] // 2, max(wanted)
        inputs = self._inputs(x, t)
        h = model.x_embedder(pack(x))
        out = {} if out is None else out
        if 1 in wanted:
            out[1] = tokens_to_map(h, rows, cols)
        if last == 1:
            return out
        timestep = inputs["timestep"] * 1000  # as forward scales them
        guidance = inputs["guidance"] * 1000 if inputs["guidance"] is not None else None
        temb = (model.time_text_embed(timestep, inputs["pooled_projections"]) if guidance is None
                else model.time_text_embed(timestep, guidance, inputs["pooled_projections"]))  # fmt: skip
        context = model.context_embedder(inputs["encoder_hidden_states"])
        rotary = model.pos_embed(torch.cat((inputs["txt_ids"], inputs["img_ids"]), dim=0))
        index = 1
        for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
            index += 1
            if index > last:
                break
            context, h = block(hidden_states=h, encoder_hidden_states=context, temb=temb, image_rotary_emb=rotary,
                               joint_attention_kwargs=None)  # fmt: skip
            if index in wanted:
                out[index] = tokens_to_map(h, rows, cols)
        return out

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The velocity the transformer predicts (ε − x0), unpacked to the latent's shape."""
        self.require_whole("sampling")
        tokens = self.model(pack(x_t), **self._inputs(x_t, t)).sample
        return unpack(tokens, x_t.shape[-2], x_t.shape[-1])

    @property
    def conditioning(self) -> str:
        guide = f", guidance {self.guidance}" if self.guidance is not None else " (no guidance embedding)"
        return f"prompt {self.config['prompt']!r}, encoded by CLIP and T5 as FluxPipeline.encode_prompt does{guide}"

    def random_like(self, seed: int = 0) -> "FluxBackbone":
        """A freshly initialised transformer; the VAE and the encoded prompt stay (they are not what is probed)."""
        from diffusers import FluxTransformer2DModel

        torch.manual_seed(seed)
        model = FluxTransformer2DModel.from_config(self.model.config)
        config = {**self.config, "weights": f"random (seed {seed})"}
        return FluxBackbone(model, self.codec, self.prompt_embeds, self.pooled_projections, self.guidance, self.blocks,
                            self.image_size, self.schedule, config, source=f"{self.source} [random weights, seed {seed}]")  # fmt: skip


def encode_prompt(target: str, local: bool, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's own encode_prompt on its own text encoders (loaded here, freed after)."""
    from diffusers import FluxPipeline
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    def encode(parts: dict) -> dict[str, torch.Tensor]:
        pipe = FluxPipeline(transformer=None, scheduler=None, vae=None, **parts)
        embeds, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, device=torch.device("cpu"),
                                               max_sequence_length=MAX_SEQUENCE_LENGTH)  # fmt: skip
        return {"embeds": embeds.float(), "pooled": pooled.float()}

    parts = {"text_encoder": CLIPTextModel, "tokenizer": CLIPTokenizer, "text_encoder_2": T5EncoderModel, "tokenizer_2": T5TokenizerFast}
    encoded = encoded_prompt(target, local, WHAT, parts, {"family": "flux", "prompt": prompt, "tokens": MAX_SEQUENCE_LENGTH}, encode)
    return encoded["embeds"], encoded["pooled"]


def load_flux(target: str, local: bool, device: str | torch.device = "cpu", prompt: str = "", guidance: Any = None,
              image_size: Any = None, num_train_timesteps: Any = None, class_label: Any = None,
              subfolder: str | None = None, up_to_block: Any = None) -> FluxBackbone:  # fmt: skip
    """Blocks are read from the safetensors as passes first need them (backbones/partial.py);
    up_to_block=N: never read past block N."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    check_prompt_model_options("FLUX", class_label, subfolder, "transformer")
    model, lazy, deepest = load_transformer(FluxTransformer2DModel, target, local, up_to_block,
                                            ["transformer_blocks", "single_transformer_blocks"], FluxBackbone.tail_modules, WHAT)  # fmt: skip
    codec = VaeCodec(load_part(AutoencoderKL, target, local, "vae", WHAT, low_cpu_mem_usage=False))
    cfg = model.config
    if cfg.in_channels != 4 * codec.latent_channels:
        raise DiffprobeError(f"the transformer takes {cfg.in_channels} channels per token, but 2×2 patches of the VAE's "
                             f"{codec.latent_channels}-channel latents give {4 * codec.latent_channels}")  # fmt: skip
    if cfg.guidance_embeds:
        scale = DEFAULT_GUIDANCE if guidance is None else _as_float(guidance, "guidance")
    elif guidance is not None:
        raise DiffprobeError(f"guidance={guidance}: this FLUX transformer has no guidance embedding (schnell-style); drop it")
    else:
        scale = None
    steps = as_int(num_train_timesteps, "num_train_timesteps") if num_train_timesteps is not None else None
    schedule = flow_schedule(target, local, steps, WHAT)
    embeds, pooled = encode_prompt(target, local, str(prompt))
    native = DEFAULT_LATENT_SIDE * codec.factor  # FluxPipeline's default size: 1024 px at VAE factor 8
    size = check_image_size(image_size, native, codec.factor * 2, "FLUX (VAE factor × 2×2 packing)")
    side = size // codec.factor // 2
    width = cfg.num_attention_heads * cfg.attention_head_dim
    blocks = stacked_blocks("x_embedder", [("transformer_blocks", cfg.num_layers), ("single_transformer_blocks", cfg.num_single_layers)],
                            width, side)  # fmt: skip
    config = architecture_config(model)
    config.update(noise_schedule=schedule.name, parameterization="flow", sampling=schedule.sampling, prompt=str(prompt),
                  guidance=scale, image_size=size, prediction_type="flow (velocity ε − x0)",
                  vae=codec.describe())  # fmt: skip
    backbone = FluxBackbone(model, codec, embeds, pooled, scale, blocks, size, schedule, config, source=f"diffusers:{target}")
    backbone.prediction_type = "flow"
    finish_depth(backbone, lazy, deepest)
    return backbone.to(device)


def _as_float(value: Any, name: str) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise DiffprobeError(f"{name} must be a number, got {value!r}") from None

"""PixArt-α / Σ pipelines (PixArtTransformer2DModel + AutoencoderKL + T5), text-to-image latent transformers.

Conditioning, as the pipelines give it: the prompt (empty by default, `prompt=...`) is encoded once
by the pipeline's own `encode_prompt` on its T5 encoder (then freed), with its attention mask, at
the pipeline's `max_sequence_length` (α: 120 tokens, Σ: 300; `max_sequence_length=N` to change).
PixArt-α at 1024 px adds resolution and aspect-ratio conditions (the model's
`use_additional_conditions`): the image size, square.

Blocks: 1 is the patch embedding (with its position embedding), 2..N+1 the transformer blocks,
tokens as maps [B, D, H/p, W/p]. DDPM-trained: ᾱ from the pipeline's scheduler config; learned
σ in the output, as DiT. Blocks are read from the safetensors as a pass first needs them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DiffprobeError
from .base import BlockInfo
from .diffusers_unet import _schedule
from .partial import finish_depth, load_transformer
from .pipeline_parts import (architecture_config, as_int, check_image_size, check_prompt_model_options, hub_json, load_part,
                             prediction_type, read_json)  # fmt: skip
from .prompt_cache import encoded_prompt
from .tokens import stacked_blocks, tokens_to_map, walk_blocks
from .vae import LatentBackbone, VaeCodec

WHAT = "PixArtTransformer2DModel"
SEQUENCE = {"PixArtSigmaPipeline": 300, "PixArtAlphaPipeline": 120}  # each pipeline's max_sequence_length default


class PixArtBackbone(LatentBackbone):
    family = "pixart"
    tail_modules = ("norm_out", "proj_out")  # the output head: only sampling runs it

    def __init__(self, model: nn.Module, codec: VaeCodec, prompt: torch.Tensor, mask: torch.Tensor, blocks: list[BlockInfo],
                 image_size: int, schedule, config: dict[str, Any], source: str):  # fmt: skip
        super().__init__(model, codec, blocks, image_size, schedule, None, config, source)
        self.register_buffer("prompt_embeds", prompt)  # T5's last state, [1, tokens, 4096]
        self.register_buffer("prompt_mask", mask)  # which tokens are the prompt's, [1, tokens]

    def extra_identity(self) -> dict[str, torch.Tensor]:
        return {**super().extra_identity(), "prompt_embeds": self.prompt_embeds, "prompt_mask": self.prompt_mask}

    def _conditions(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        """α's resolution and aspect ratio (pixels, as the pipeline passes them); None where the model takes none."""
        if not self.model.use_additional_conditions:
            return {"resolution": None, "aspect_ratio": None}
        batch, size = x.shape[0], float(self.image_size)
        return {"resolution": torch.full((batch, 2), size, device=x.device, dtype=x.dtype),  # filled there: no host copy per pass
                "aspect_ratio": torch.ones(batch, 1, device=x.device, dtype=x.dtype)}  # fmt: skip

    def _mask_bias(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder mask as the additive bias forward makes of it: 0 keeps a token, −10000 drops it."""
        return ((1 - self.prompt_mask.to(x.device, x.dtype)) * -10000.0).unsqueeze(1).expand(x.shape[0], -1, -1)

    def run(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, wanted: tuple[int, ...], out: dict | None = None) -> dict[int, torch.Tensor]:
        """PixArtTransformer2DModel.forward up to the deepest wanted block, each wanted block as a map."""
        if y is not None:
            raise DiffprobeError("PixArt is conditioned on a prompt, not a class label: drop --class-label (use -o prompt=TEXT)")
        model, side, last, batch = self.model, x.shape[-1] // self.model.config.patch_size, max(wanted), x.shape[0]
        out = {} if out is None else out
        h = model.pos_embed(x)
        if 1 in wanted:
            out[1] = tokens_to_map(h, side)
        if last == 1:
            return out
        timestep, _ = model.adaln_single(t, self._conditions(x), batch_size=batch, hidden_dtype=h.dtype)
        context = self.prompt_embeds.to(x.device, x.dtype).expand(batch, -1, -1)
        context = model.caption_projection(context).view(batch, -1, h.shape[-1])
        bias = self._mask_bias(x)
        return walk_blocks(model.transformer_blocks, h, wanted, out, side,
                           lambda block, h: block(h, attention_mask=None, encoder_hidden_states=context, encoder_attention_mask=bias,
                                                  timestep=timestep, cross_attention_kwargs=None, class_labels=None))  # fmt: skip

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The raw output: ε and, with learned σ (out_channels = 2·in), the variance channels."""
        self.require_whole("sampling")
        batch = x_t.shape[0]
        return self.model(x_t, encoder_hidden_states=self.prompt_embeds.to(x_t.device, x_t.dtype).expand(batch, -1, -1),
                          encoder_attention_mask=self.prompt_mask.to(x_t.device).expand(batch, -1), timestep=t,
                          added_cond_kwargs=self._conditions(x_t)).sample  # fmt: skip

    @property
    def learned_sigma(self) -> bool:
        return self.model.config.out_channels == 2 * self.model.config.in_channels

    @property
    def conditioning(self) -> str:
        extra = ", resolution and aspect-ratio conditions" if self.config["additional_conditions"] else ""
        return (f"prompt {self.config['prompt']!r}, encoded by T5 as {self.config['pipeline']}.encode_prompt does "
                f"({self.config['max_sequence_length']} tokens, with its mask){extra}")  # fmt: skip

    def random_like(self, seed: int = 0) -> "PixArtBackbone":
        """A freshly initialised transformer; the VAE and the encoded prompt stay (they are not what is probed)."""
        from diffusers import PixArtTransformer2DModel

        torch.manual_seed(seed)
        model = PixArtTransformer2DModel.from_config(self.model.config)
        config = {**self.config, "weights": f"random (seed {seed})"}
        return PixArtBackbone(model, self.codec, self.prompt_embeds, self.prompt_mask, self.blocks, self.image_size, self.schedule,
                              config, source=f"{self.source} [random weights, seed {seed}]")  # fmt: skip


def pipeline_class(target: str, local: bool) -> str:
    """PixArtAlphaPipeline or PixArtSigmaPipeline, from model_index.json (α when it does not say)."""
    path = Path(target) / "model_index.json"
    index = (read_json(path) if path.is_file() else {}) if local else (hub_json(target, "model_index.json") or {})
    name = index.get("_class_name", "PixArtAlphaPipeline")
    return name if name in SEQUENCE else "PixArtAlphaPipeline"


def encode_prompt(target: str, local: bool, prompt: str, pipeline: str, tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's own encode_prompt on its T5 (loaded here, freed after): ([1, tokens, D], [1, tokens] mask)."""
    import diffusers
    from transformers import AutoTokenizer, T5EncoderModel

    def encode(parts: dict) -> dict[str, torch.Tensor]:
        pipe = getattr(diffusers, pipeline)(vae=None, transformer=None, scheduler=None, **parts)
        embeds, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, device=torch.device("cpu"),
                                                clean_caption=False, max_sequence_length=tokens)  # fmt: skip
        return {"embeds": embeds.float(), "mask": mask.long()}

    settings = {"family": "pixart", "prompt": prompt, "pipeline": pipeline, "tokens": tokens}
    encoded = encoded_prompt(target, local, WHAT, {"text_encoder": T5EncoderModel, "tokenizer": AutoTokenizer}, settings, encode)
    return encoded["embeds"], encoded["mask"]


def load_pixart(target: str, local: bool, device: str | torch.device = "cpu", prompt: str = "", image_size: Any = None,
                schedule: str | None = None, num_train_timesteps: Any = None, max_sequence_length: Any = None,
                class_label: Any = None, subfolder: str | None = None, up_to_block: Any = None) -> PixArtBackbone:  # fmt: skip
    """Blocks are read from the safetensors as passes first need them (backbones/partial.py);
    up_to_block=N: never read past block N."""
    from diffusers import AutoencoderKL, PixArtTransformer2DModel

    check_prompt_model_options("PixArt", class_label, subfolder, "transformer")
    model, lazy, deepest = load_transformer(PixArtTransformer2DModel, target, local, up_to_block, ["transformer_blocks"],
                                            PixArtBackbone.tail_modules, WHAT)  # fmt: skip
    codec = VaeCodec(load_part(AutoencoderKL, target, local, "vae", WHAT, low_cpu_mem_usage=False))
    cfg = model.config
    if cfg.in_channels != codec.latent_channels:
        raise DiffprobeError(f"the transformer takes {cfg.in_channels} input channels but the VAE gives {codec.latent_channels}")
    pipeline = pipeline_class(target, local)
    tokens = as_int(max_sequence_length, "max_sequence_length") if max_sequence_length is not None else SEQUENCE[pipeline]
    embeds, mask = encode_prompt(target, local, str(prompt), pipeline, tokens)
    size = check_image_size(image_size, cfg.sample_size * codec.factor, codec.factor * cfg.patch_size, "PixArt (VAE factor × patch size)")
    steps = as_int(num_train_timesteps, "num_train_timesteps") if num_train_timesteps is not None else None
    sched = _schedule(target, local, schedule, steps)
    side = size // codec.factor // cfg.patch_size
    width = cfg.num_attention_heads * cfg.attention_head_dim
    blocks = stacked_blocks("pos_embed", [("transformer_blocks", cfg.num_layers)], width, side)
    config = architecture_config(model)
    config.update(noise_schedule=sched.name, prompt=str(prompt), pipeline=pipeline, max_sequence_length=tokens, image_size=size,
                  additional_conditions=bool(model.use_additional_conditions),
                  vae=codec.describe())  # fmt: skip
    backbone = PixArtBackbone(model, codec, embeds, mask, blocks, size, sched, config, source=f"diffusers:{target}")
    backbone.prediction_type = config["prediction_type"] = prediction_type(target, local)
    finish_depth(backbone, lazy, deepest)
    return backbone.to(device)

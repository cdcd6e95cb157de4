"""Stable Diffusion 3 / 3.5 pipelines (SD3Transformer2DModel, the MMDiT), flow-matching latent transformers.

Noise: rectified flow, x_t = (1−σ)·x0 + σ·ε with σ = t / T (features/noise.FlowSchedule): t is
the timestep the transformer receives, 0..T. The scheduler's shift is a sampling choice: it is
recorded and used by `sample`, never when probing.

Blocks: 1 is the patch embedding (with its position embedding), 2..N+1 the joint blocks. A joint
block updates the text and image streams together; its image stream [B, (H/p)·(W/p), D] comes
out as a map [B, D, H/p, W/p] (PatchEmbed's row-major token order). SD 3.5's dual-attention
layers and qk-norm run inside the blocks as diffusers defines them.

Conditioning: the empty prompt by default (or `prompt=...`), encoded once at load by
StableDiffusion3Pipeline.encode_prompt itself (CLIP-L and CLIP-G penultimate states, T5's last
state, pooled CLIP projections), then the text encoders are freed. `t5=false` leaves T5 out
(zeros in its place), as the pipeline does with text_encoder_3=None: T5-XXL alone has 4.7B
parameters. The encoded prompt is part of the backbone's fingerprint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import DiffprobeError
from ..features.noise import FlowSchedule
from .base import BlockInfo
from .partial import finish_depth, load_transformer
from .prompt_cache import encoded_prompt
from .tokens import stacked_blocks, tokens_to_map
from .pipeline_parts import architecture_config, as_int, check_image_size, check_prompt_model_options, load_part, read_scheduler_config
from .vae import LatentBackbone, VaeCodec

WHAT = "SD3Transformer2DModel"
SHIFT_KEYS = ("shift", "use_dynamic_shifting", "base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")
MAX_SEQUENCE_LENGTH = 256  # StableDiffusion3Pipeline's default T5 length


def _run(model: nn.Module, x: torch.Tensor, t: torch.Tensor, prompt: torch.Tensor, pooled: torch.Tensor,
         wanted: tuple[int, ...], out: dict | None = None) -> dict[int, torch.Tensor]:  # fmt: skip
    """SD3Transformer2DModel.forward up to the deepest wanted block, each wanted block's image stream as a map."""
    p = model.config.patch_size
    height, width = x.shape[-2] // p, x.shape[-1] // p
    last = max(wanted)
    out = {} if out is None else out
    h = model.pos_embed(x).contiguous()
    if 1 in wanted:
        out[1] = tokens_to_map(h, height, width)
    if last == 1:
        return out
    batch = x.shape[0]
    temb = model.time_text_embed(t, pooled.to(x.device, x.dtype).expand(batch, -1))
    context = model.context_embedder(prompt.to(x.device, x.dtype).expand(batch, -1, -1))
    for index, block in enumerate(model.transformer_blocks, start=2):
        if index > last:
            break
        context, h = block(hidden_states=h, encoder_hidden_states=context, temb=temb, joint_attention_kwargs=None)
        if index in wanted:
            out[index] = tokens_to_map(h, height, width)
    return out


class SD3Backbone(LatentBackbone):
    family = "stable-diffusion-3"
    tail_modules = ("norm_out", "proj_out")  # the output head: only sampling runs it

    def __init__(self, model: nn.Module, codec: VaeCodec, prompt: torch.Tensor, pooled: torch.Tensor, blocks: list[BlockInfo],
                 image_size: int, schedule: FlowSchedule, config: dict[str, Any], source: str):  # fmt: skip
        super().__init__(model, codec, blocks, image_size, schedule, None, config, source)
        self.register_buffer("prompt_embeds", prompt)  # [1, tokens, joint dim]
        self.register_buffer("pooled_projections", pooled)  # [1, pooled dim]

    def extra_identity(self) -> dict[str, torch.Tensor]:
        return {**super().extra_identity(), "prompt_embeds": self.prompt_embeds, "pooled_projections": self.pooled_projections}

    def run(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, wanted: tuple[int, ...], out: dict | None = None) -> dict[int, torch.Tensor]:
        if y is not None:
            raise DiffprobeError("Stable Diffusion 3 is conditioned on a prompt, not a class label: drop --class-label (use -o prompt=TEXT)")
        return _run(self.model, x, t, self.prompt_embeds, self.pooled_projections, wanted, out)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The velocity the transformer predicts (ε − x0)."""
        self.require_whole("sampling")
        batch = x_t.shape[0]
        return self.model(x_t, encoder_hidden_states=self.prompt_embeds.to(x_t.device, x_t.dtype).expand(batch, -1, -1),
                          pooled_projections=self.pooled_projections.to(x_t.device, x_t.dtype).expand(batch, -1),
                          timestep=t).sample  # fmt: skip

    @property
    def conditioning(self) -> str:
        t5 = "CLIP-L, CLIP-G and T5" if self.config["t5"] else "CLIP-L and CLIP-G (T5 left out: zeros in its place)"
        return f"prompt {self.config['prompt']!r}, encoded by {t5} as StableDiffusion3Pipeline.encode_prompt does"

    def random_like(self, seed: int = 0) -> "SD3Backbone":
        """A freshly initialised transformer; the VAE and the encoded prompt stay (they are not what is probed)."""
        from diffusers import SD3Transformer2DModel

        torch.manual_seed(seed)
        model = SD3Transformer2DModel.from_config(self.model.config)
        config = {**self.config, "weights": f"random (seed {seed})"}
        return SD3Backbone(model, self.codec, self.prompt_embeds, self.pooled_projections, self.blocks, self.image_size,
                           self.schedule, config, source=f"{self.source} [random weights, seed {seed}]")  # fmt: skip


def flow_schedule(target: str, local: bool, steps: int | None, what: str = WHAT) -> FlowSchedule:
    """The pipeline scheduler's T and shift settings; a scheduler that is not a flow scheduler is refused."""
    config = read_scheduler_config(target, local)
    if config is None:
        raise DiffprobeError(f"{target} has no scheduler/scheduler_config.json: a {what} pipeline folder needs it "
                             "(its FlowMatchEulerDiscreteScheduler says T and the sampling shift)")  # fmt: skip
    if config.get("_class_name") not in (None, "FlowMatchEulerDiscreteScheduler"):
        raise DiffprobeError(f"{target}'s scheduler is a {config['_class_name']}; a {what} is read with its "
                             "FlowMatchEulerDiscreteScheduler (rectified flow)")  # fmt: skip
    total = steps if steps is not None else int(config.get("num_train_timesteps", 1000))
    return FlowSchedule(total, {k: config[k] for k in SHIFT_KEYS if k in config})


def encode_prompt(target: str, local: bool, prompt: str, t5: bool, transformer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's own encode_prompt on its own text encoders (loaded here, freed after); the
    transformer only lends its config (the width of T5's zeros when T5 is left out)."""
    from diffusers import StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    def encode(parts: dict) -> dict[str, torch.Tensor]:
        pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=None, vae=None, **parts)
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=prompt, prompt_2=None, prompt_3=None, device=torch.device("cpu"),
                                                  do_classifier_free_guidance=False, max_sequence_length=MAX_SEQUENCE_LENGTH)  # fmt: skip
        return {"embeds": embeds.float(), "pooled": pooled.float()}

    parts = {"text_encoder": CLIPTextModelWithProjection, "tokenizer": CLIPTokenizer, "text_encoder_2": CLIPTextModelWithProjection,
             "tokenizer_2": CLIPTokenizer, "text_encoder_3": T5EncoderModel if t5 else None, "tokenizer_3": T5TokenizerFast if t5 else None}  # fmt: skip
    settings = {"family": "sd3", "prompt": prompt, "t5": t5, "tokens": MAX_SEQUENCE_LENGTH, "width": transformer.config.joint_attention_dim}
    encoded = encoded_prompt(target, local, WHAT, parts, settings, encode)
    return encoded["embeds"], encoded["pooled"]


def load_sd3(target: str, local: bool, device: str | torch.device = "cpu", prompt: str = "", t5: Any = True,
             image_size: Any = None, num_train_timesteps: Any = None, class_label: Any = None,
             subfolder: str | None = None, up_to_block: Any = None) -> SD3Backbone:  # fmt: skip
    """Blocks are read from the safetensors as passes first need them (backbones/partial.py);
    up_to_block=N: never read past block N."""
    from diffusers import AutoencoderKL, SD3Transformer2DModel

    check_prompt_model_options("Stable Diffusion 3", class_label, subfolder, "transformer")
    use_t5 = as_bool(t5, "t5")
    model, lazy, deepest = load_transformer(SD3Transformer2DModel, target, local, up_to_block, ["transformer_blocks"],
                                            SD3Backbone.tail_modules, WHAT)  # fmt: skip
    codec = VaeCodec(load_part(AutoencoderKL, target, local, "vae", WHAT, low_cpu_mem_usage=False))
    cfg = model.config
    if cfg.in_channels != codec.latent_channels:
        raise DiffprobeError(f"the transformer takes {cfg.in_channels} input channels but the VAE gives {codec.latent_channels}")
    steps = as_int(num_train_timesteps, "num_train_timesteps") if num_train_timesteps is not None else None
    schedule = flow_schedule(target, local, steps)
    embeds, pooled = encode_prompt(target, local, str(prompt), use_t5, model)
    size = check_image_size(image_size, cfg.sample_size * codec.factor, codec.factor * cfg.patch_size, "SD3 (VAE factor × patch size)")
    side = size // codec.factor // cfg.patch_size
    width = cfg.num_attention_heads * cfg.attention_head_dim
    blocks = stacked_blocks("pos_embed", [("transformer_blocks", cfg.num_layers)], width, side)
    config = architecture_config(model)
    config.update(noise_schedule=schedule.name, parameterization="flow", sampling=schedule.sampling, prompt=str(prompt),
                  t5=use_t5, image_size=size, prediction_type="flow (velocity ε − x0)",
                  vae=codec.describe())  # fmt: skip
    backbone = SD3Backbone(model, codec, embeds, pooled, blocks, size, schedule, config, source=f"diffusers:{target}")
    backbone.prediction_type = "flow"
    finish_depth(backbone, lazy, deepest)
    return backbone.to(device)


def as_bool(value: Any, name: str) -> bool:
    """A yes/no option as given on the command line (-o t5=false) or from Python."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise DiffprobeError(f"{name}={value!r}: expected true or false")

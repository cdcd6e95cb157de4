"""DiT-style pipelines (DiTTransformer2DModel + AutoencoderKL), class-conditional latent transformers.

Blocks: 1 is the patch embedding (with its position embedding), 2..N+1 the transformer
blocks. A block's tokens [B, (H/p)·(W/p), D] come out as a map [B, D, H/p, W/p] (the token
order is PatchEmbed's row-major one), so pooling and everything after it are unchanged.

Conditioning: the null class by default (the label index `num_embeds_ada_norm`, the one
classifier-free guidance drops labels to), i.e. unconditional features, as DDAE reads DiT;
`class_label=K` (or extract's --class-label K) conditions on class K instead.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import DiffprobeError
from .base import BlockInfo
from .pipeline_parts import architecture_config, as_int, check_image_size, load_part, prediction_type
from .diffusers_unet import _schedule
from .partial import finish_depth, load_transformer
from .tokens import stacked_blocks, tokens_to_map, walk_blocks
from .vae import LatentBackbone, VaeCodec

WHAT = "DiTTransformer2DModel"


def _run(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, wanted: tuple[int, ...],
         out: dict | None = None) -> dict[int, torch.Tensor]:  # fmt: skip
    """DiTTransformer2DModel.forward up to the deepest wanted block, each wanted block as a map."""
    side = x.shape[-1] // model.config.patch_size
    out = {} if out is None else out
    h = model.pos_embed(x)
    if 1 in wanted:
        out[1] = tokens_to_map(h, side)
    return walk_blocks(model.transformer_blocks, h, wanted, out, side,
                       lambda block, h: block(h, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                                              timestep=t, cross_attention_kwargs=None, class_labels=y))  # fmt: skip


class DiTBackbone(LatentBackbone):
    family = "dit"
    tail_modules = ("norm_out", "proj_out_1", "proj_out_2")  # the output head: only sampling runs it

    def __init__(self, model: nn.Module, codec: VaeCodec, class_label: int, blocks: list[BlockInfo], image_size: int,
                 schedule, config: dict[str, Any], source: str):  # fmt: skip
        num_classes = int(model.config.num_embeds_ada_norm)
        super().__init__(model, codec, blocks, image_size, schedule, num_classes, config, source)
        self.default_class_label = class_label  # the null class (num_classes) unless class_label=K was given

    def labels(self, y: torch.Tensor | None, batch: int, device: torch.device) -> torch.Tensor:
        """Class labels for a batch: y, or the default (null) class; null = num_classes is allowed."""
        if y is None:
            return torch.full((batch,), self.default_class_label, dtype=torch.long, device=device)
        # Checked where y is on the host (a caller's labels); extraction checks --class-label before
        # any pass, and reading a GPU tensor back here would make the host wait at every pass.
        if y.device.type == "cpu" and y.numel() and (int(y.min()) < 0 or int(y.max()) > self.num_classes):
            raise DiffprobeError(f"class label {int(y.max()) if int(y.max()) > 0 else int(y.min())} is outside 0..{self.num_classes} "
                                 f"({self.num_classes} is the null class)")  # fmt: skip
        return y.to(device=device, dtype=torch.long)

    def run(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, wanted: tuple[int, ...], out: dict | None = None) -> dict[int, torch.Tensor]:
        return _run(self.model, x, t, self.labels(y, x.shape[0], x.device), wanted, out)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The raw output: ε and, for learned-sigma DiTs (out_channels = 2·in), the variance channels."""
        self.require_whole("sampling")
        return self.model(x_t, timestep=t, class_labels=self.labels(y, x_t.shape[0], x_t.device)).sample

    @property
    def conditioning(self) -> str:
        label = self.default_class_label
        chosen = "the null class" if label == self.num_classes else f"class {label}"
        return f"class-conditional ({self.num_classes} classes), reading {chosen} unless --class-label is given"

    @property
    def learned_sigma(self) -> bool:
        return self.model.out_channels == 2 * self.model.config.in_channels

    def random_like(self, seed: int = 0) -> "DiTBackbone":
        """A freshly initialised transformer; the VAE stays (it is not what is probed)."""
        from diffusers import DiTTransformer2DModel

        torch.manual_seed(seed)
        model = DiTTransformer2DModel.from_config(self.model.config)
        config = {**self.config, "weights": f"random (seed {seed})"}
        return DiTBackbone(model, self.codec, self.default_class_label, self.blocks, self.image_size, self.schedule, config,
                           source=f"{self.source} [random weights, seed {seed}]")  # fmt: skip


def load_dit(target: str, local: bool, device: str | torch.device = "cpu", class_label: Any = None, prompt: Any = None,
             image_size: Any = None, schedule: str | None = None, num_train_timesteps: Any = None,
             subfolder: str | None = None, up_to_block: Any = None) -> DiTBackbone:  # fmt: skip
    """Blocks are read from the safetensors as passes first need them (backbones/partial.py);
    up_to_block=N: never read past block N."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    if prompt is not None:
        raise DiffprobeError(
            "DiTTransformer2DModel is class-conditional and takes no prompt: drop prompt, and pass class_label=K "
            "(--class-label K) or nothing for the null class"
        )
    if subfolder not in (None, "transformer"):
        raise DiffprobeError(f"subfolder={subfolder!r}: a DiT pipeline folder keeps its transformer in transformer/")
    model, lazy, deepest = load_transformer(DiTTransformer2DModel, target, local, up_to_block, ["transformer_blocks"],
                                            DiTBackbone.tail_modules, WHAT)  # fmt: skip
    codec = VaeCodec(load_part(AutoencoderKL, target, local, "vae", WHAT, low_cpu_mem_usage=False))
    cfg = model.config
    if cfg.in_channels != codec.latent_channels:
        raise DiffprobeError(f"the transformer takes {cfg.in_channels} input channels but the VAE gives {codec.latent_channels}")
    null = int(cfg.num_embeds_ada_norm)
    label = null if class_label is None else as_int(class_label, "class_label")
    if not 0 <= label <= null:
        raise DiffprobeError(f"class_label {label} is outside 0..{null - 1} (or {null}, the null class)")
    size = check_image_size(image_size, cfg.sample_size * codec.factor, codec.factor * cfg.patch_size, "DiT (VAE factor × patch size)")
    steps = as_int(num_train_timesteps, "num_train_timesteps") if num_train_timesteps is not None else None
    sched = _schedule(target, local, schedule, steps)
    side = size // codec.factor // cfg.patch_size
    width = cfg.num_attention_heads * cfg.attention_head_dim
    blocks = stacked_blocks("pos_embed", [("transformer_blocks", cfg.num_layers)], width, side)
    config = architecture_config(model)
    config.update(noise_schedule=sched.name, class_label=label, null_class=null, image_size=size,
                  vae=codec.describe())  # fmt: skip
    backbone = DiTBackbone(model, codec, label, blocks, size, sched, config, source=f"diffusers:{target}")
    backbone.prediction_type = config["prediction_type"] = prediction_type(target, local)
    finish_depth(backbone, lazy, deepest)
    return backbone.to(device)

"""Any diffusers `UNet2DModel` (a local folder or a hub id) as a diffprobe backbone.

Block numbering, in the spirit of ADM's (one number per unit whose output is a skip):

    1                       conv_in
    then per down block:    each resnet (+ its attention), then its downsampler if it has one
    then                    mid_block (resnet, attention, resnet)
    then per up block:      each resnet (+ its attention); the last one also includes the upsampler

So, as in ADM, encoder block b and decoder block (N+1-b) meet across a skip connection.
`diffprobe blocks diffusers:PATH` prints the table.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import DiffprobeError
from ..features.noise import NoiseSchedule
from .base import Backbone, BlockInfo

log = logging.getLogger(__name__)

SUPPORTED_DOWN = ("DownBlock2D", "AttnDownBlock2D")
SUPPORTED_UP = ("UpBlock2D", "AttnUpBlock2D")


def _attn_role(block: nn.Module) -> str:
    """Cross-attention blocks (SD's Transformer2DModel) read the prompt; self-attention ones do not."""
    return "xattn" if getattr(block, "has_cross_attention", False) else "attn"


def _units(model: nn.Module) -> list[tuple[str, list[tuple[str, nn.Module]]]]:
    """The blocks as (name, [(role, module), ...]) in forward order; roles drive `iter_blocks`."""
    units: list[tuple[str, list[tuple[str, nn.Module]]]] = [("conv_in", [("conv", model.conv_in)])]
    for d, block in enumerate(model.down_blocks):
        attentions, attn = getattr(block, "attentions", None), _attn_role(block)
        for i, resnet in enumerate(block.resnets):
            parts = [("resnet", resnet)] + ([(attn, attentions[i])] if attentions is not None else [])
            units.append((f"down_blocks.{d}.resnets.{i}", parts))
        if block.downsamplers is not None:
            role = "resample_temb" if getattr(block, "downsample_type", "conv") == "resnet" else "resample"
            units.append((f"down_blocks.{d}.downsamplers.0", [(role, block.downsamplers[0])]))
    if model.mid_block is not None:
        units.append(("mid_block", [("xmid" if _attn_role(model.mid_block) == "xattn" else "mid", model.mid_block)]))
    for u, block in enumerate(model.up_blocks):
        attentions, attn = getattr(block, "attentions", None), _attn_role(block)
        for i, resnet in enumerate(block.resnets):
            parts = [("skip_resnet", resnet)] + ([(attn, attentions[i])] if attentions is not None else [])
            if i == len(block.resnets) - 1 and block.upsamplers is not None:
                role = "resample_temb" if getattr(block, "upsample_type", "conv") == "resnet" else "resample"
                parts.append((role, block.upsamplers[0]))
            units.append((f"up_blocks.{u}.resnets.{i}", parts))
    return units


def _check_supported(model: nn.Module) -> None:
    cfg = model.config
    if cfg.get("time_embedding_type", "positional") == "fourier":
        raise DiffprobeError("this UNet2DModel uses Fourier (score-SDE, VE) time embeddings: diffprobe reads DDPM-style models only")
    bad = [t for t in cfg.down_block_types if t not in SUPPORTED_DOWN] + [t for t in cfg.up_block_types if t not in SUPPORTED_UP]
    if bad:
        raise DiffprobeError(
            f"UNet2DModel block type(s) {', '.join(sorted(set(bad)))} not supported; supported: {', '.join(SUPPORTED_DOWN + SUPPORTED_UP)}"
        )


class DiffusersBackbone(Backbone):
    family = "diffusers"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._units = _units(self.model)

    def run(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, wanted: tuple[int, ...]) -> dict[int, torch.Tensor]:
        return run_units(self.model, self._units, x, t, y, wanted)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x_t, t, class_labels=y).sample

    @property
    def learned_sigma(self) -> bool:
        return self.model.config.out_channels == 2 * self.model.config.in_channels

    def random_like(self, seed: int = 0) -> "DiffusersBackbone":
        from diffusers import UNet2DModel

        torch.manual_seed(seed)
        model = UNet2DModel.from_config(self.model.config)
        config = {**self.config, "weights": f"random (seed {seed})"}
        return DiffusersBackbone(model, self.blocks, self.image_size, self.schedule, self.num_classes, config, source=f"{self.source} [random weights, seed {seed}]")


def run_units(model: nn.Module, units, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None,
              wanted: tuple[int, ...]) -> dict[int, torch.Tensor]:  # fmt: skip
    """UNet2DModel.forward, unrolled unit by unit so it can stop after the deepest wanted block."""
    cfg = model.config
    if cfg.center_input_sample:
        x = 2 * x - 1.0
    emb = model.time_embedding(model.time_proj(t).to(dtype=model.dtype))
    if model.class_embedding is not None:
        if y is None:
            raise DiffprobeError("this diffusers model is class-conditional: pass class labels y")
        labels = model.time_proj(y) if cfg.class_embed_type == "timestep" else y
        emb = emb + model.class_embedding(labels).to(dtype=model.dtype)
    elif y is not None:
        raise DiffprobeError("this diffusers model is unconditional: do not pass class labels y")
    return walk_units(units, x, emb, wanted)


def walk_units(units, h: torch.Tensor, emb: torch.Tensor, wanted: tuple[int, ...],
               context: torch.Tensor | None = None) -> dict[int, torch.Tensor]:  # fmt: skip
    """The U-Net's down/mid/up path unit by unit, stopping after the deepest wanted unit.

    Shared by pixel UNet2DModels and SD's UNet2DConditionModels; `context` is the encoded
    prompt that cross-attention units read (None for models without cross-attention).
    """
    last = max(wanted)
    out: dict[int, torch.Tensor] = {}
    skips: list[torch.Tensor] = []
    for index, (name, parts) in enumerate(units, start=1):
        for role, module in parts:
            if role in ("resnet", "mid"):
                h = module(h, emb)
            elif role == "skip_resnet":
                h = module(torch.cat([h, skips.pop()], dim=1), emb)
            elif role == "xattn":
                h = module(h, encoder_hidden_states=context, return_dict=False)[0]
            elif role == "xmid":
                h = module(h, emb, encoder_hidden_states=context)
            elif role == "resample_temb":
                h = module(h, temb=emb)
            else:  # conv_in, self-attention, plain down/upsamplers
                h = module(h)
        if not name.startswith(("mid_block", "up_blocks")):
            skips.append(h)
        if index in wanted:
            out[index] = h
        if index >= last:
            break
    return out


def _local_folder(target: str, subfolder: str | None) -> tuple[Path, str | None] | None:
    path = Path(target)
    if not path.exists():
        return None
    if subfolder is None and (path / "unet" / "config.json").is_file():
        subfolder = "unet"  # a pipeline folder
    folder = path / subfolder if subfolder else path
    if not (folder / "config.json").is_file():
        raise DiffprobeError(f"{folder} has no config.json: expected a folder saved with UNet2DModel.save_pretrained (or a pipeline folder with unet/)")
    return path, subfolder


def _schedule(target: str, local: bool, schedule: str | None, steps: int | None) -> NoiseSchedule:
    """The model's training schedule from its pipeline's scheduler config, when there is one."""
    if schedule is not None:
        return NoiseSchedule.named(schedule, int(steps or 1000))
    from diffusers import DDPMScheduler

    for sub in ("scheduler", None):
        try:
            if local:
                cfg_path = Path(target) / (sub or "") / "scheduler_config.json"
                if not cfg_path.is_file():
                    continue
                sched = DDPMScheduler.from_config(json.loads(cfg_path.read_text()))
            else:
                sched = DDPMScheduler.from_pretrained(target, subfolder=sub)
        except Exception:  # no scheduler config at this place: try the next
            continue
        abar = sched.alphas_cumprod.double().numpy()
        return NoiseSchedule(np.asarray(abar), f"diffusers-{sched.config.beta_schedule}-{len(abar)}")
    log.warning("no scheduler config found for %s: assuming the DDPM linear schedule with 1000 steps (set schedule=...)", target)
    return NoiseSchedule.named("linear", int(steps or 1000))


def load_diffusers(target: str, device: str | torch.device = "cpu", subfolder: str | None = None,
                   schedule: str | None = None, num_train_timesteps: int | None = None) -> DiffusersBackbone:  # fmt: skip
    from diffusers import UNet2DModel

    local = _local_folder(target, subfolder)
    try:
        if local is not None:
            model = UNet2DModel.from_pretrained(str(local[0]), subfolder=local[1], low_cpu_mem_usage=False)
        else:
            try:
                model = UNet2DModel.from_pretrained(target, subfolder=subfolder or "unet", low_cpu_mem_usage=False)
            except (OSError, EnvironmentError):
                model = UNet2DModel.from_pretrained(target, subfolder=subfolder, low_cpu_mem_usage=False)
    except (OSError, EnvironmentError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DiffprobeError(f"cannot load diffusers UNet2DModel from {target!r} (a local folder or a hub id; offline, hub ids fail): {first}") from None
    _check_supported(model)
    steps = int(num_train_timesteps) if num_train_timesteps is not None else None
    sched = _schedule(str(local[0]) if local else target, local is not None, schedule, steps)
    units = _units(model)
    # Shapes from a pass on the meta device: exact, and nothing is computed or allocated.
    with torch.device("meta"):
        meta = UNet2DModel.from_config(model.config)
    size = model.config.sample_size if isinstance(model.config.sample_size, int) else model.config.sample_size[0]
    x = torch.zeros(1, model.config.in_channels, size, size, device="meta")
    y = torch.zeros(1, dtype=torch.long, device="meta") if model.class_embedding is not None else None
    names = [name for name, _ in units]
    blocks = [
        BlockInfo(i, names[i - 1], int(h.shape[1]), int(h.shape[-1]))
        for i, h in run_units(meta, _units(meta), x, torch.zeros(1, dtype=torch.long, device="meta"), y,
                              tuple(range(1, len(units) + 1))).items()
    ]
    config = json.loads(json.dumps(dict(model.config), default=str))
    config["noise_schedule"] = sched.name
    num_classes = model.config.num_class_embeds if model.class_embedding is not None else None
    if model.config.in_channels != 3:
        raise DiffprobeError(f"{target} takes {model.config.in_channels}-channel input: diffprobe reads RGB pixel-space U-Nets")
    backbone = DiffusersBackbone(model, blocks, size, sched, num_classes, config, source=f"diffusers:{target}")
    return backbone.to(device)

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

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import DiffprobeError
from ..features.noise import NoiseSchedule
from .base import Backbone, BlockInfo
from .pipeline_parts import architecture_config, from_pretrained_checked, read_json


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

    def run(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, wanted: tuple[int, ...], out: dict | None = None) -> dict[int, torch.Tensor]:
        return run_units(self.model, self._units, x, t, y, wanted, out)

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
              wanted: tuple[int, ...], out: dict | None = None) -> dict[int, torch.Tensor]:  # fmt: skip
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
    return walk_units(units, x, emb, wanted, out=out)


def walk_units(units, h: torch.Tensor, emb: torch.Tensor, wanted: tuple[int, ...],
               context: torch.Tensor | None = None, out: dict | None = None) -> dict[int, torch.Tensor]:  # fmt: skip
    """The U-Net's down/mid/up path unit by unit, stopping after the deepest wanted unit.

    Shared by pixel UNet2DModels and SD's UNet2DConditionModels; `context` is the encoded
    prompt that cross-attention units read (None for models without cross-attention).
    """
    last = max(wanted)
    out = {} if out is None else out  # the caller's dict: a pass a hook ends early keeps what it has
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
    read_json(folder / "config.json")  # invalid JSON: one line naming the file
    return path, subfolder


# What `schedule=NAME` means when a folder has no scheduler config: diffusers' beta_schedule names
# (scaled_linear with Stable Diffusion's β range, which is what that name is used for) and
# diffprobe's own (linear = DDPM's, cosine = improved DDPM's).
SCHEDULES = {
    "linear": None,
    "scaled_linear": dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
    "squaredcos_cap_v2": dict(beta_schedule="squaredcos_cap_v2"),
    "cosine": None,
}


def named_schedule(name: str, steps: int) -> NoiseSchedule:
    """The schedule `schedule=NAME` names (see SCHEDULES), `steps` long."""
    if name not in SCHEDULES:
        raise DiffprobeError(f"schedule={name!r} is not known: expected one of {', '.join(SCHEDULES)}")
    if steps < 1:
        raise DiffprobeError(f"num_train_timesteps={steps}: expected at least 1 (the model's training schedule length, usually 1000)")
    if SCHEDULES[name] is None:
        return NoiseSchedule.named(name, steps)
    from diffusers import DDPMScheduler

    abar = DDPMScheduler(num_train_timesteps=steps, **SCHEDULES[name]).alphas_cumprod.double().numpy()
    return NoiseSchedule(np.asarray(abar), f"diffusers-{name}-{steps}")


def _schedule(target: str, local: bool, schedule: str | None, steps: int | None) -> NoiseSchedule:
    """The model's training schedule: the one named with `schedule=`, else its pipeline's scheduler
    config (scheduler/scheduler_config.json, or one beside a bare model's config.json). With neither
    it is refused: guessing (SD trained with scaled_linear, DDPM with linear) gives wrong noise silently."""
    if schedule is not None:
        return named_schedule(str(schedule), int(steps or 1000))
    from diffusers import DDPMScheduler

    for sub in ("scheduler", None):
        if local:
            cfg_path = Path(target) / (sub or "") / "scheduler_config.json"
            if not cfg_path.is_file():
                continue
            try:
                sched = DDPMScheduler.from_config(read_json(cfg_path))
            except (ValueError, TypeError, NotImplementedError) as e:
                raise DiffprobeError(f"{cfg_path}: not a scheduler config diffprobe can read ({e}); "
                                     f"name the schedule instead with -o schedule={'|'.join(SCHEDULES)}") from None  # fmt: skip
        else:
            try:
                sched = DDPMScheduler.from_pretrained(target, subfolder=sub)
            except Exception:  # no scheduler config at this place: try the next
                continue
        abar = sched.alphas_cumprod.double().numpy()
        return NoiseSchedule(np.asarray(abar), f"diffusers-{sched.config.beta_schedule}-{len(abar)}")
    raise DiffprobeError(
        f"{target} has no scheduler/scheduler_config.json, so the noise schedule its model was trained with is unknown: "
        f"name it with -o schedule={'|'.join(SCHEDULES)} (Stable Diffusion 1.x/2.x: scaled_linear; DDPM: linear; "
        "add -o num_train_timesteps=N if not 1000), or restore the pipeline's scheduler/ folder"
    )


def load_diffusers(target: str, device: str | torch.device = "cpu", subfolder: str | None = None,
                   schedule: str | None = None, num_train_timesteps: int | None = None) -> DiffusersBackbone:  # fmt: skip
    from diffusers import UNet2DModel

    local = _local_folder(target, subfolder)
    try:
        if local is not None:
            where = f"{local[1]}/ of {target}" if local[1] else target
            model = from_pretrained_checked(UNet2DModel, str(local[0]), local[1], where, True, low_cpu_mem_usage=False)
        else:
            try:
                model = from_pretrained_checked(UNet2DModel, target, subfolder or "unet", target, False, low_cpu_mem_usage=False)
            except (OSError, EnvironmentError):
                model = from_pretrained_checked(UNet2DModel, target, subfolder, target, False, low_cpu_mem_usage=False)
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
    config = architecture_config(model)
    config["noise_schedule"] = sched.name
    num_classes = model.config.num_class_embeds if model.class_embedding is not None else None
    if model.config.in_channels != 3:
        raise DiffprobeError(f"{target} takes {model.config.in_channels}-channel input: diffprobe reads RGB pixel-space U-Nets")
    backbone = DiffusersBackbone(model, blocks, size, sched, num_classes, config, source=f"diffusers:{target}")
    return backbone.to(device)

"""Loading an ADM checkpoint as a diffprobe backbone: choose flags, check, number blocks."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch

from ..errors import DiffprobeError
from ..features.noise import NoiseSchedule
from .adm import ADMUNet
from .adm_config import (
    PRESETS,
    architecture_from_flags,
    check_state_dict,
    infer_shape_flags,
    normalize_flags,
    preset_for_filename,
    read_state_dict,
    sidecar_flags,
)
from .base import Backbone, BlockInfo

log = logging.getLogger(__name__)


class ADMBackbone(Backbone):
    family = "adm"

    supports_feedback = True

    def run(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, wanted: tuple[int, ...],
            inject: dict[int, torch.Tensor] | None = None, out: dict | None = None) -> dict[int, torch.Tensor]:  # fmt: skip
        return self.model.run_blocks(x, self.model.embed(t, y), wanted, inject, out)

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(x_t, t, y)

    @property
    def learned_sigma(self) -> bool:
        return self.model.arch.out_channels == 2 * self.model.arch.in_channels

    def random_like(self, seed: int = 0) -> "ADMBackbone":
        # PyTorch's default initialisation everywhere (guided-diffusion's zero-initialised output
        # convolutions would make every residual branch vanish, a degenerate control).
        torch.manual_seed(seed)
        model = ADMUNet(self.model.arch)
        config = {**self.config, "weights": f"random (seed {seed})"}
        return ADMBackbone(model, self.blocks, self.image_size, self.schedule, self.num_classes, config, source=f"{self.source} [random weights, seed {seed}]")


def adm_block_table(model: ADMUNet, image_size: int) -> list[BlockInfo]:
    """The paper's numbering: input_blocks 1..n, middle_block n+1, output_blocks after it."""
    blocks: list[BlockInfo] = []
    # Shapes come from a pass on the meta device: nothing is computed, every shape is exact.
    with torch.device("meta"):
        meta = ADMUNet(model.arch)
    x = torch.zeros(1, model.arch.in_channels, image_size, image_size, device="meta")
    emb = torch.zeros(1, 4 * model.arch.model_channels, device="meta")
    names = [f"input_blocks.{i}" for i in range(len(model.input_blocks))] + ["middle_block"]
    names += [f"output_blocks.{i}" for i in range(len(model.output_blocks))]
    every = tuple(range(1, meta.num_blocks + 1))
    for index, h in meta.run_blocks(x, emb, every).items():
        blocks.append(BlockInfo(index, names[index - 1], int(h.shape[1]), int(h.shape[-1])))
    return blocks


def resolve_flags(path: str | Path | None, state: dict[str, torch.Tensor] | None, preset: str | None,
                  flags: dict[str, Any]) -> tuple[dict[str, Any], str]:  # fmt: skip
    """The flags to build with, and a phrase naming where they came from (for messages)."""
    if preset is not None:
        if preset not in PRESETS:
            raise DiffprobeError(f"unknown ADM preset {preset!r}; known presets: {', '.join(sorted(PRESETS))}")
        extra = f" with option(s) {', '.join(f'{k}={v}' for k, v in flags.items())}" if flags else ""
        return {**PRESETS[preset], **flags}, f"preset {preset}{extra}"
    side = sidecar_flags(path) if path is not None else None
    if side is not None:
        origin = f"flags in {Path(path).with_suffix('.json').name}"
        overrides = {k: v for k, v in flags.items() if side.get(k) != v}
        if overrides:  # the user's options changed the sidecar's flags: say so, they are the likely cause
            origin += " overridden by the given option(s) " + ", ".join(f"{k}={v}" for k, v in overrides.items())
        return {**side, **flags}, origin
    named = preset_for_filename(path) if path is not None else None
    if named is not None:
        extra = f" with option(s) {', '.join(f'{k}={v}' for k, v in flags.items())}" if flags else ""
        return {**PRESETS[named], **flags}, f"preset {named} (from the file name){extra}"
    if state is None:
        return dict(flags), "the given flags"
    # Nothing names the architecture: read what the shapes tell, ask for what they cannot.
    inferred = infer_shape_flags(state)
    attention_ds = inferred.pop("_attention_ds")
    merged = {**inferred, **flags}
    if "image_size" not in flags:
        raise DiffprobeError(
            f"cannot tell the image size of {path} from its weights: pass image_size=... (or preset=...)"
        )
    if "attention_resolutions" not in flags:
        merged["attention_resolutions"] = ",".join(str(int(flags["image_size"]) // ds) for ds in attention_ds)
    if attention_ds and "num_head_channels" not in flags and "num_heads" not in flags:
        raise DiffprobeError(
            f"{path} has attention layers, whose head count the weights do not show: pass num_head_channels=... "
            "or num_heads=... (and use_new_attention_order=True if it was trained so), or preset=..."
        )
    return merged, "flags inferred from the checkpoint's shapes"


def load_adm(path: str | Path | None = None, preset: str | None = None, device: str | torch.device = "cpu",
             **flags: Any) -> ADMBackbone:  # fmt: skip
    """An ADM backbone from a checkpoint (or random weights when path is None)."""
    state = read_state_dict(path) if path is not None else None
    chosen, origin = resolve_flags(path, state, preset, flags)
    normalized = normalize_flags(chosen)
    arch = architecture_from_flags(normalized)
    if state is not None and "label_emb.weight" in state and arch.num_classes is not None:
        # Conditional models of diffprobe's own training may have fewer classes than ImageNet's 1000.
        arch = dataclasses.replace(arch, num_classes=int(state["label_emb.weight"].shape[0]))
    model = ADMUNet(arch)
    if state is not None:
        check_state_dict(model, state, str(path), origin)
        model.load_state_dict(state)
    else:
        log.warning("ADM backbone with random weights (no checkpoint given)")
    schedule = NoiseSchedule.named(normalized["noise_schedule"], normalized["diffusion_steps"])
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(arch).items()}
    config["noise_schedule"] = schedule.name
    backbone = ADMBackbone(
        model, adm_block_table(model, arch.image_size), arch.image_size, schedule, arch.num_classes, config,
        source=f"adm:{path}" if path is not None else "adm:random",
    )
    return backbone.to(device)

"""`diffusers:FOLDER_OR_HUB_ID` -> the backbone for the model class the folder holds.

A pipeline folder (as `pipeline.save_pretrained` writes it) names its denoiser's class in
`unet/config.json` or `transformer/config.json` (`_class_name`), or in `model_index.json`;
a bare model folder names it in its own `config.json`. That class (and, for SDXL's U-Net, a
trait of its config) picks the loader in registry.FAMILIES.
"""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import DiffprobeError
from .base import Backbone
from .pipeline_parts import hub_json, read_json
from .registry import FAMILIES


def _unsupported(name: str, where: str) -> DiffprobeError:
    return DiffprobeError(f"{where} holds a {name}, which diffprobe cannot read: supported model classes are {', '.join(sorted({k.split('+')[0] for k in FAMILIES}))}")



def _local_class(root: Path) -> tuple[str | None, str | None]:
    """(class name, subfolder) of the denoiser in a local folder."""
    for sub in ("unet", "transformer"):
        cfg = root / sub / "config.json"
        if cfg.is_file():
            return read_json(cfg).get("_class_name"), sub
    index = root / "model_index.json"
    if index.is_file():
        entries = read_json(index)
        for sub in ("unet", "transformer"):
            if isinstance(entries.get(sub), list) and entries[sub][-1]:
                return entries[sub][-1], sub
    cfg = root / "config.json"
    if cfg.is_file():
        return read_json(cfg).get("_class_name"), None
    return None, None


def _hub_class(target: str) -> tuple[str | None, str | None]:
    """Class of a hub id's denoiser from its model_index.json; (None, None) if it has none."""
    index = hub_json(target, "model_index.json")
    if index is None:
        return None, None  # a bare model repo: the pixel loader reads its config.json
    for sub in ("unet", "transformer"):
        if isinstance(index.get(sub), list):
            return index[sub][-1], sub
    return None, None


def _config(target: str, sub: str, local: bool) -> dict:
    path = Path(target) / sub / "config.json"
    return (read_json(path) if path.is_file() else {}) if local else (hub_json(target, f"{sub}/config.json") or {})


def _remap(name: str | None, sub: str | None, target: str, local: bool) -> str | None:
    """The registry's key for a denoiser. Pipelines saved before diffusers split its transformers
    (facebook/DiT-XL-2-256 among them) name the generic Transformer2DModel; its norm_type tells DiT
    from PixArt, as diffusers decides. An SDXL U-Net is a UNet2DConditionModel with text_time
    added conditioning."""
    if sub is None or name not in ("Transformer2DModel", "UNet2DConditionModel"):
        return name
    config = _config(target, sub, local)
    if name == "UNet2DConditionModel":
        return "UNet2DConditionModel+text_time" if config.get("addition_embed_type") == "text_time" else name
    return {"ada_norm_zero": "DiTTransformer2DModel", "ada_norm_single": "PixArtTransformer2DModel"}.get(config.get("norm_type"), name)


def load(target: str, device: str | torch.device = "cpu", **options: Any) -> Backbone:
    local = Path(target).exists()
    name, sub = _local_class(Path(target)) if local else _hub_class(target)
    name = _remap(name, sub, target, local) or "UNet2DModel"  # a bare model folder: the pixel loader reads its config.json
    if name not in FAMILIES:
        raise _unsupported(name, f"{target}/{sub}" if sub else target)
    module, function, _ = FAMILIES[name]
    loader = getattr(importlib.import_module(f".{module}", __package__), function)
    args = (target, local) if "local" in inspect.signature(loader).parameters else (target,)
    return _call(loader, name.split("+")[0], *args, device=device, **options)


def _call(loader: Callable, name: str, *args: Any, **options: Any) -> Backbone:
    """loader(*args, **options), with an option the loader does not take as a clear error."""
    accepted = [p for p in inspect.signature(loader).parameters if p not in ("target", "local", "device")]
    unknown = sorted(set(options) - set(accepted) - {"device"})
    if unknown:
        raise DiffprobeError(f"option {unknown[0]!r} does not apply to a {name}: its options are {', '.join(accepted)}")
    return loader(*args, **options)

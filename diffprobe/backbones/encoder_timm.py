"""timm models as backbones: blocks are what timm's `feature_info` lists (CNN stages, ViT blocks),
the same modules `forward_intermediates` returns; preprocessing from timm's data config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..errors import DiffprobeError
from .encoders import EncoderLayout, VisionEncoder, describe_weights

CLS_NORMS = ("norm",)  # timm ViTs' final norm, applied to every token before the head


def _create(name: str, weights: str | None, seed: int | None = None, **options: Any):
    import timm
    import torch

    torch.manual_seed(0 if seed is None else seed)  # random weights are a function of the seed: a reload gives the same model
    if weights not in (None, "random") and not Path(weights).is_file():
        raise DiffprobeError(f"weights file {weights} not found (weights: a file, random, or leave it out for timm's own)")
    try:
        if weights is None:
            return timm.create_model(name, pretrained=True, **options)
        if weights == "random":
            return timm.create_model(name, pretrained=False, **options)
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(weights)}, **options)
    except RuntimeError as e:
        if "Unknown model" in str(e):
            raise DiffprobeError(f"timm does not know the model {name!r} (`timm.list_models('{name.split('.')[0]}*')` lists its names)") from None
        raise DiffprobeError(f"cannot create timm model {name!r}: {' '.join(str(e).split())}") from None
    except Exception as e:  # offline hub, a file of another model
        text = " ".join(str(e).split()) or type(e).__name__
        hint = ((" (offline? timm downloads its weights from the hub: pass a weights file, `-o weights=FILE` to extract, "
                "`--b-weights FILE` to cka)")
                if weights is None else "")  # fmt: skip
        raise DiffprobeError(f"cannot load timm model {name!r}{hint}: {text}") from None


def _literal(value: Any) -> Any:
    """`-o depth=3` arrives as text: numbers and booleans become themselves for timm's constructor."""
    import ast

    if not isinstance(value, str):
        return value
    try:
        return ast.literal_eval({"true": "True", "false": "False"}.get(value.lower(), value))
    except (ValueError, SyntaxError):
        return value


def load_timm(name: str, weights: str | None = None, **options: Any) -> VisionEncoder:
    import timm

    options = {k: _literal(v) for k, v in options.items()}
    model = _create(name, weights, **options)
    info = getattr(model, "feature_info", None)
    if not info:
        raise DiffprobeError(f"timm model {name!r} does not list its stages (no feature_info), so its blocks are unknown")
    paths = [f["module"] for f in info]
    data = timm.data.resolve_model_data_config(model)
    size = int(data["input_size"][-1])
    patch = getattr(model, "patch_embed", None)
    if patch is not None and getattr(patch, "img_size", None):  # a ViT built at another size than its pretrained config's
        size = int(patch.img_size[-1])
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    norm = next((n for n in CLS_NORMS if prefix and getattr(model, "cls_token", None) is not None
                 and type(getattr(model, n, None)).__name__ not in ("NoneType", "Identity")), None)  # fmt: skip
    layout = EncoderLayout(paths, prefix_tokens=prefix, cls_norm=norm, image_size=size,
                           resize_size=int(size / data.get("crop_pct", 1.0)), interpolation=str(data.get("interpolation", "bilinear")),
                           mean=tuple(data["mean"]), std=tuple(data["std"]))  # fmt: skip
    config = {"library": "timm", "model": name, "options": dict(options)}
    return VisionEncoder(model, layout, "timm", config, f"timm:{name}", lambda seed: _create(name, "random", seed, **options),
                         describe_weights(weights))  # fmt: skip

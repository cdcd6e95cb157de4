"""transformers vision models as backbones (DINOv2, ViT, ViT-MAE, and the vision towers of CLIP and
SigLIP): blocks are the encoder layers, the hidden states `output_hidden_states` returns after the
embeddings; preprocessing from the model's image processor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import DiffprobeError
from .encoders import EncoderLayout, VisionEncoder

VISION_TOWERS = {"clip": "CLIPVisionModel", "siglip": "SiglipVisionModel", "siglip2": "Siglip2VisionModel"}
CLS_NORMS = ("layernorm", "post_layernorm", "vision_model.post_layernorm")  # the final norm that a class-token probe reads
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's numbers, as image processors store them


def _config(target: str):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(target)
    except Exception as e:
        where = "a local folder" if Path(target).exists() else "a hub id"
        raise DiffprobeError(f"cannot load transformers model {target!r} ({where}; offline? download it where there is internet "
                             f"with `huggingface-cli download {target} --local-dir DIR` and pass hf:DIR): {' '.join(str(e).split())}") from None  # fmt: skip


def _model_class(config):
    import transformers

    name = VISION_TOWERS.get(config.model_type)
    return getattr(transformers, name) if name else transformers.AutoModel


def _build(target: str, config, weights: str | None, seed: int | None = None) -> nn.Module:
    """The model of `config` (read once by load_hf): from its folder or hub id, or random from the seed."""
    if config.model_type == "vit_mae":
        config.mask_ratio = 0.0  # every patch, none masked: a feature pass sees the whole image
    cls = _model_class(config)
    if weights == "random":
        torch.manual_seed(0 if seed is None else seed)  # random weights are a function of the seed: a reload gives the same model
        vision = getattr(config, "vision_config", None)
        return cls._from_config(vision if vision is not None and cls.__name__ in VISION_TOWERS.values() else config)
    if weights is not None:
        raise DiffprobeError("hf models read their weights from their folder or hub id: weights takes only random")
    try:
        return cls.from_pretrained(target, config=config if config.model_type == "vit_mae" else None)
    except Exception as e:
        raise DiffprobeError(f"cannot load the weights of {target!r} (offline?): {' '.join(str(e).split())}") from None


def _layers(model: nn.Module, count: int) -> list[str]:
    """Module paths of the encoder layers: the ModuleList with as many entries as the config's layers."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count and name.rsplit(".", 1)[-1] in ("layer", "layers"):
            return [f"{name}.{i}" for i in range(count)]
    raise DiffprobeError(f"cannot find the {count} encoder layers of {type(model).__name__}")


def _preprocessing(target: str, config) -> dict[str, Any]:
    """Size, resize, interpolation, mean and std from the model's image processor (or the config's
    image size and ImageNet statistics where a folder has none, said in the config)."""
    from transformers import AutoImageProcessor

    vision = getattr(config, "vision_config", None) or config
    size = int(getattr(vision, "image_size", 224))
    try:
        proc = AutoImageProcessor.from_pretrained(target)
    except Exception:
        return {"image_size": size, "resize_size": size, "interpolation": "bicubic", "mean": (0.485, 0.456, 0.406),
                "std": (0.229, 0.224, 0.225), "processor": "none in the folder: ImageNet mean/std"}  # fmt: skip
    crop = getattr(proc, "crop_size", None) if getattr(proc, "do_center_crop", False) else None
    size_cfg = dict(getattr(proc, "size", None) or {})
    resize = size_cfg.get("shortest_edge") or size_cfg.get("height") or size
    image_size = (crop or {}).get("height") or resize
    resample = getattr(proc, "resample", 3)
    return {"image_size": int(image_size), "resize_size": int(resize), "interpolation": RESAMPLE.get(int(resample), "bicubic"),
            "mean": tuple(proc.image_mean), "std": tuple(proc.image_std), "processor": type(proc).__name__}  # fmt: skip


def load_hf(target: str, weights: str | None = None, **options: Any) -> VisionEncoder:
    if options:
        raise DiffprobeError(f"hf models take no options here (got {', '.join(options)}): only weights=random")
    config = _config(target)
    model = _build(target, config, weights)
    vision = getattr(model.config, "vision_config", None) or model.config
    paths = _layers(model, vision.num_hidden_layers)
    prefix = 0 if config.model_type.startswith("siglip") else 1 + int(getattr(vision, "num_register_tokens", 0) or 0)  # SigLIP: no class token
    modules = dict(model.named_modules())
    norm = next((n for n in CLS_NORMS if prefix and n in modules and not isinstance(modules[n], nn.Identity)), None)
    pre = _preprocessing(target, config)

    def call(m: nn.Module, x: torch.Tensor):
        if config.model_type != "vit_mae":
            return m(pixel_values=x)
        n = (x.shape[-1] // vision.patch_size) ** 2  # ViT-MAE shuffles patches by random noise: sorted noise keeps them in place
        return m(pixel_values=x, noise=torch.arange(n, device=x.device, dtype=torch.float32).expand(len(x), n))
    layout = EncoderLayout(paths, prefix, norm, pre["image_size"], pre["resize_size"], pre["interpolation"], pre["mean"], pre["std"],
                           call=call)  # fmt: skip
    source = f"hf:{target}"
    architecture = {k: v for k, v in model.config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    return VisionEncoder(model, layout, "hf", {"library": "transformers", "architecture": architecture, "processor": pre["processor"]}, source,
                         lambda seed: _build(target, config, "random", seed), "random" if weights == "random" else "pretrained")  # fmt: skip

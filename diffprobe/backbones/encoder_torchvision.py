"""torchvision classifiers as backbones: blocks are the stages (ResNets' layer1..4, the `features`
children of ConvNeXt, EfficientNet, MobileNet, VGG, Swin), or a ViT's encoder layers; preprocessing
from the weights' own transforms."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from ..errors import DiffprobeError
from .encoders import EncoderLayout, VisionEncoder, describe_weights


def _build(arch: str, weights: str | None, seed: int | None = None):
    import torch
    import torchvision.models as tvm

    if arch not in tvm.list_models():
        raise DiffprobeError(f"torchvision does not know the model {arch!r} (torchvision.models.list_models() lists them)")
    torch.manual_seed(0 if seed is None else seed)  # random weights are a function of the seed: a reload gives the same model
    if weights is None or weights == "random" or Path(weights).is_file():
        model = tvm.get_model(arch, weights=None)
        if weights not in (None, "random"):
            from ..studies.baseline import load_checked

            load_checked(model, weights, f"torchvision {arch}", "pass the weights file of this architecture")
        return model, None
    try:  # a torchvision weights name (DEFAULT, IMAGENET1K_V1, …): downloads when online, else its cache
        enum = tvm.get_model_weights(arch)[weights]
        return tvm.get_model(arch, weights=enum), enum
    except KeyError:
        raise DiffprobeError(f"{arch} has no torchvision weights {weights!r}: "
                             f"{', '.join(w.name for w in tvm.get_model_weights(arch))} or DEFAULT") from None  # fmt: skip
    except Exception as e:
        raise DiffprobeError(f"cannot get torchvision weights {weights} for {arch} (offline? pass weights=FILE): "
                             f"{' '.join(str(e).split())}") from None  # fmt: skip


def stage_paths(model: nn.Module) -> tuple[list[str], int, str | None]:
    """(block module paths, prefix tokens, class-token norm) for the torchvision families."""
    names = dict(model.named_children())
    if all(f"layer{i}" in names for i in range(1, 5)):  # ResNet, ResNeXt, Wide ResNet
        return [f"layer{i}" for i in range(1, 5)], 0, None
    encoder = names.get("encoder")
    if encoder is not None and hasattr(encoder, "layers"):  # vit_*: class token first, encoder.ln the final norm
        return [f"encoder.layers.{n}" for n, _ in encoder.layers.named_children()], 1, "encoder.ln"
    if isinstance(names.get("features"), nn.Sequential):  # ConvNeXt, EfficientNet, MobileNet, VGG, Swin, …
        return [f"features.{n}" for n, _ in names["features"].named_children()], 0, None
    if "trunk_output" in names:  # RegNet
        return [f"trunk_output.{n}" for n, _ in names["trunk_output"].named_children()], 0, None
    raise DiffprobeError(f"diffprobe does not know the stages of torchvision's {type(model).__name__}: use timm:NAME for it")


def load_torchvision(arch: str, weights: str | None = "DEFAULT", **options: Any) -> VisionEncoder:
    if options:
        raise DiffprobeError(f"torchvision models take no options here (got {', '.join(options)}): only weights=")
    weights = "DEFAULT" if weights is None else weights
    model, enum = _build(arch, weights)
    paths, prefix, norm = stage_paths(model)
    size, resize, interpolation = 224, 256, "bilinear"
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    if enum is not None:
        t = enum.transforms()
        size, resize = int(t.crop_size[0]), int(t.resize_size[0])
        interpolation, mean, std = t.interpolation.value, tuple(t.mean), tuple(t.std)
    image_size = getattr(model, "image_size", size)  # a ViT takes exactly its size
    layout = EncoderLayout(paths, prefix, norm, image_size, resize, interpolation, mean, std)
    note = "random" if weights == "random" else describe_weights(weights) if Path(weights).is_file() else f"torchvision {weights}"
    return VisionEncoder(model, layout, "torchvision", {"library": "torchvision", "model": arch}, f"torchvision:{arch}",
                         lambda seed: _build(arch, "random", seed)[0], note)  # fmt: skip

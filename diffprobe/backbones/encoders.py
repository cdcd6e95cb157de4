"""Vision encoders that are not diffusion models (timm, torchvision, transformers) as backbones,
so both sides of a representation comparison go through one extraction, store and probe.

    load_backbone("timm:vit_base_patch16_224.mae")          # hub weights, as timm loads them
    load_backbone("timm:resnet50", weights="resnet50.safetensors")
    load_backbone("torchvision:resnet18", weights="random") # the random-weights control
    load_backbone("hf:facebook/dinov2-base")                 # or a local folder (save_pretrained)

What differs from a diffusion backbone, and only here:
- there is no noise and no timestep: the schedule is `CleanImage` (t = 0 only, x_t = x0), stores
  record it, and giving a timestep other than 0 is refused in one line;
- blocks are the model's stages (CNNs) or layers (ViTs), caught with forward hooks from one pass
  that stops after the deepest wanted one; image tokens become maps (prefix tokens dropped), and a
  model with a class token offers it, after the model's final norm, as one more block (`cls`);
- preprocessing is the model's own: the data transform resizes and crops as its library says
  (`resize_size`, `interpolation`), and `encode` maps [-1, 1] images to its mean/std.

Loaders: encoder_timm.py, encoder_torchvision.py, encoder_hf.py, encoder_baseline.py (`diffprobe baseline train`'s ResNet).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..errors import DiffprobeError
from ..features.noise import CleanImage
from .base import Backbone, BlockInfo
from .taps import StopPass
from .tokens import tokens_to_map

ENCODER_FAMILIES = ("timm", "torchvision", "hf", "baseline")


@dataclass
class EncoderLayout:
    """How to read one encoder: its block modules, its tokens, its preprocessing."""

    block_paths: list[str]  # module paths, in the order a pass runs them
    prefix_tokens: int = 0  # class / register tokens before the image tokens (0 for CNNs)
    cls_norm: str | None = None  # module whose output holds the class token after the final norm (its own block)
    image_size: int = 224
    resize_size: int = 224  # short side before the centre crop to image_size
    interpolation: str = "bilinear"
    mean: Sequence[float] = (0.485, 0.456, 0.406)
    std: Sequence[float] = (0.229, 0.224, 0.225)
    call: Callable[[nn.Module, torch.Tensor], Any] | None = None  # how to run the model (default: model(x))


class VisionEncoder(Backbone):
    """A frozen image encoder read block by block; no noise, no timestep."""

    generative = False
    prediction_type = "none"

    def __init__(self, model: nn.Module, layout: EncoderLayout, family: str, config: dict[str, Any], source: str,
                 rebuild: Callable[[int], nn.Module], weights: str):  # fmt: skip
        self.family = family
        self.layout = layout
        self.resize_size, self.interpolation = layout.resize_size, layout.interpolation
        self.weights_note = weights  # "hub", "file PATH", "folder PATH", "random"
        config = {**config, "preprocess": {"resize": layout.resize_size, "crop": layout.image_size, "interpolation": layout.interpolation,
                                           "mean": list(layout.mean), "std": list(layout.std)}}  # fmt: skip
        super().__init__(model, [], layout.image_size, CleanImage(), None, config, source)
        self._rebuild = rebuild
        self.register_buffer("_mean", torch.tensor(list(layout.mean), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(list(layout.std), dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.blocks = self._measure_blocks()

    def __repr__(self) -> str:
        return f"VisionEncoder({self.spec!r}, {self.family}, {self.image_size}px, {self.num_blocks} blocks, weights: {self.weights_note})"

    @property
    def conditioning(self) -> str:
        return "image encoder (no noise, no timestep)"

    @property
    def random_weights(self) -> bool:
        return self.weights_note == "random"

    # -- preprocessing: the model's own mean and std --------------------------------------------
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (the data transform's range) -> the model's normalised input."""
        x01 = (images + 1) / 2
        return (x01 - self._mean.to(images.device, images.dtype)) / self._std.to(images.device, images.dtype)

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        raise DiffprobeError(f"{self.spec} is an image encoder, not a generative model: it cannot sample")

    def denoise(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        raise DiffprobeError(f"{self.spec} is an image encoder, not a generative model: it has no denoiser")

    # -- the pass ---------------------------------------------------------------------------------
    def _paths(self) -> list[str]:
        return self.layout.block_paths + ([self.layout.cls_norm] if self.layout.cls_norm else [])

    def run(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None, wanted: tuple[int, ...],
            out: dict | None = None) -> dict[int, torch.Tensor]:  # fmt: skip
        """Outputs of the wanted blocks from one pass, stopped (StopPass) once the deepest has run."""
        out = {} if out is None else out
        paths = self._paths()
        deepest = max(wanted)
        handles = []

        def catch(index: int):
            def hook(module, inputs, output):
                out[index] = self._as_map(output, is_cls=index > len(self.layout.block_paths))  # the block after the layers: cls
                if index == deepest:
                    raise StopPass

            return hook

        try:
            for index in wanted:
                handles.append(self.model.get_submodule(paths[index - 1]).register_forward_hook(catch(index)))
            try:
                (self.layout.call or (lambda m, v: m(v)))(self.model, x)
            except StopPass:
                pass
        finally:
            for h in handles:
                h.remove()
        missing = [b for b in wanted if b not in out]
        if missing:
            raise DiffprobeError(f"{self.spec}: block {missing[0]} ({paths[missing[0] - 1]}) did not run in a forward pass")
        return {b: out[b] for b in wanted}

    def _as_map(self, output: Any, is_cls: bool) -> torch.Tensor:
        """A block's output as a map [B, C, H, W]: maps stay; tokens [B, N, D] lose their prefix
        tokens and become a square map; the class block is token 0 (or a pooled vector) as 1×1."""
        h = output[0] if isinstance(output, (tuple, list)) else getattr(output, "last_hidden_state", output)
        if is_cls:
            vector = h[:, 0] if h.ndim == 3 else h
            return vector[:, :, None, None]
        if h.ndim == 4:
            return h
        if h.ndim == 3:
            tokens = h[:, self.layout.prefix_tokens :]
            side = math.isqrt(tokens.shape[1])
            if side * side != tokens.shape[1]:
                raise DiffprobeError(f"{self.spec}: {tokens.shape[1]} image tokens do not make a square map")
            return tokens_to_map(tokens, side)
        raise DiffprobeError(f"{self.spec}: a block gave a {h.ndim}-d output, not a map or tokens")

    def _measure_blocks(self) -> list[BlockInfo]:
        """Channels and map size of every block, from one pass over a blank image."""
        wanted = tuple(range(1, len(self._paths()) + 1))
        with torch.no_grad():
            maps = self.run(torch.zeros(1, 3, self.image_size, self.image_size), torch.zeros(1), None, wanted)
        names = self.layout.block_paths + (["cls"] if self.layout.cls_norm else [])
        return [BlockInfo(i, names[i - 1], maps[i].shape[1], maps[i].shape[-1]) for i in wanted]

    def tap_infos(self, paths: list[str]) -> list[Any]:
        if paths:
            raise DiffprobeError(f"module paths are read inside diffusion backbones; {self.family} encoders take block numbers "
                                 f"(`diffprobe blocks {self.spec}`)")  # fmt: skip
        return []

    def random_like(self, seed: int = 0) -> "VisionEncoder":
        """The same architecture freshly initialised (the library's own init, from the seed)."""
        config = {k: v for k, v in self.config.items() if k != "preprocess"}
        with torch.random.fork_rng():  # the seed is this control's; the caller's random state is left as it was
            model = self._rebuild(seed)
        fresh = VisionEncoder(model, self.layout, self.family, config, f"{self.source} (random weights)", self._rebuild, "random")
        fresh.spec, fresh.load_options = self.spec, {**self.load_options, "weights": "random"}
        return fresh


def parse_encoder_spec(spec: str) -> tuple[str, str]:
    family, _, target = spec.partition(":")
    if family not in ENCODER_FAMILIES or not target:
        raise DiffprobeError(f"encoder spec {spec!r} not understood: expected timm:NAME, torchvision:ARCH, hf:MODEL_ID_OR_FOLDER "
                             "or baseline:DIR")  # fmt: skip
    return family, target


def load_encoder(spec: str, device: str = "cpu", weights: str | None = None, **options: Any) -> VisionEncoder:
    """timm:NAME, torchvision:ARCH or hf:ID_OR_FOLDER. weights: None (the library's pretrained
    weights: the hub, or its cache), "random", or a local file (timm, torchvision); other options
    go to the library's constructor (timm: img_size=…, depth=…)."""
    family, target = parse_encoder_spec(spec)
    if family == "timm":
        from .encoder_timm import load_timm as loader
    elif family == "torchvision":
        from .encoder_torchvision import load_torchvision as loader
    elif family == "baseline":  # a ResNet from `diffprobe baseline train`
        from .encoder_baseline import load_baseline as loader
    else:
        from .encoder_hf import load_hf as loader
    with torch.random.fork_rng():  # a loader seeds its random init; the caller's random state stays as it was
        backbone = loader(target, weights, **options)
    if backbone.random_weights:
        import logging

        logging.getLogger("diffprobe").warning("%s has RANDOM weights (weights=random): a control, not the pretrained model", spec)
    return backbone.to(device)


def describe_weights(weights: str | None, default: str = "hub") -> str:
    if weights is None:
        return default
    if weights == "random":
        return "random"
    return f"file {weights}"

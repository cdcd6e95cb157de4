"""One spec string -> one backbone.

    load_backbone("adm:/path/256x256_diffusion_uncond.pt")              # preset from the file name
    load_backbone("adm:/path/model.pt", preset="256x256_diffusion_uncond")
    load_backbone("adm:/path/model.pt", image_size=64, num_channels=64, num_head_channels=32, ...)
    load_backbone("adm:random", preset="256x256_diffusion_uncond")      # random weights
    load_backbone("diffusers:/path/to/unet_or_pipeline")                 # or a hub id
    load_backbone("diffusers:/path/to/sd-pipeline", prompt="a photo")    # Stable Diffusion-style (latent U-Net)
    load_backbone("diffusers:/path/to/dit-pipeline", class_label=207)    # DiT (null class by default)
    load_backbone("diffusers:/path/to/sdxl-base")                        # SDXL, PixArt-α/Σ, SD3/3.5, FLUX.1 likewise
    load_backbone("timm:vit_base_patch16_224.mae")                       # image encoders, no noise: encoders.py
    load_backbone("torchvision:resnet50", weights="random")              # … torchvision:ARCH, hf:MODEL_ID_OR_FOLDER

Model classes and their loaders: registry.py. Module paths inside any of them are taps too: taps.py.
"""

from __future__ import annotations

from typing import Any

from ..errors import DiffprobeError
from .base import Backbone, BlockInfo

FAMILIES = ("adm", "diffusers", "timm", "torchvision", "hf", "baseline")


def parse_spec(spec: str) -> tuple[str, str]:
    family, sep, target = spec.partition(":")
    if not sep or family not in FAMILIES or not target:
        if spec.endswith((".pt", ".pth", ".safetensors")) and ":" not in spec:
            return "adm", spec
        raise DiffprobeError(
            f"backbone spec {spec!r} not understood: expected adm:PATH.pt, adm:random, diffusers:PATH_OR_HUB_ID, "
            "or an image encoder: timm:NAME, torchvision:ARCH, hf:MODEL_ID_OR_FOLDER, baseline:DIR"
        )
    return family, target


def load_backbone(spec: str, device: str = "cpu", **options: Any) -> Backbone:
    """Load a frozen diffusion U-Net. ADM options: preset=..., or guided-diffusion flags.

    diffusers options: subfolder=..., schedule="linear"|"cosine" (when the model folder has no
    scheduler config), num_train_timesteps=...; latent pipelines also image_size=... (a multiple
    of the VAE factor), Stable Diffusion prompt="..." (default empty), DiT class_label=K
    (default: the null class).
    """
    family, target = parse_spec(spec)
    if family == "adm":
        from .adm_backbone import load_adm

        backbone: Backbone = load_adm(None if target == "random" else target, device=device, **options)
    elif family in ("timm", "torchvision", "hf", "baseline"):  # not diffusion models: the clean image, blocks = stages or layers
        from .encoders import load_encoder

        backbone = load_encoder(spec, device=device, **options)
    else:  # the folder's (or hub id's) model class picks pixel U-Net, Stable Diffusion or DiT
        from .diffusers_pipeline import load

        backbone = load(target, device=device, **options)
    backbone.spec, backbone.load_options = spec, dict(options)  # so a saved run can load it again
    return backbone


__all__ = ["Backbone", "BlockInfo", "load_backbone", "parse_spec", "FAMILIES"]

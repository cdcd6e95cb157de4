"""Which loader reads which diffusers model class: one line per family.

A `diffusers:` folder (or hub id) names its denoiser's class; `diffusers_pipeline.load` looks it up
here. Adding a family is one module with a `load_*` function plus one line below. Pure data: every
module of backbones/ may import it.
"""

from __future__ import annotations

# class name (a variant after "+": a config trait diffusers_pipeline.variant reads) -> (module, loader, what its folder holds)
FAMILIES: dict[str, tuple[str, str, str]] = {
    "UNet2DModel": ("diffusers_unet", "load_diffusers", "pixel-space U-Net (DDPM, ADM-style): unet/ or a bare model folder"),
    "UNet2DConditionModel": ("diffusers_sd", "load_stable_diffusion",
                             "Stable Diffusion 1.x/2.x-style latent U-Net: unet/, vae/, text_encoder/, tokenizer/, scheduler/"),
    "UNet2DConditionModel+text_time": ("diffusers_sdxl", "load_sdxl",
                                       "SDXL-style latent U-Net (added text_time conditioning): unet/, vae/, text_encoder/, "
                                       "text_encoder_2/, tokenizer/, tokenizer_2/, scheduler/"),
    "DiTTransformer2DModel": ("diffusers_dit", "load_dit", "DiT-style class-conditional latent transformer: transformer/, vae/, scheduler/"),
    "PixArtTransformer2DModel": ("diffusers_pixart", "load_pixart",
                                 "PixArt-α/Σ text-to-image latent transformer: transformer/, vae/, scheduler/, text_encoder/ (T5), tokenizer/"),
    "SD3Transformer2DModel": ("diffusers_sd3", "load_sd3",
                              "Stable Diffusion 3/3.5 flow-matching transformer (MMDiT): transformer/, vae/, scheduler/, "
                              "text_encoder/, text_encoder_2/, text_encoder_3/ (optional with -o t5=false), tokenizer*/"),
    "FluxTransformer2DModel": ("diffusers_flux", "load_flux",
                               "FLUX.1 flow-matching transformer (dev, schnell): transformer/, vae/, scheduler/, "
                               "text_encoder/ (CLIP), text_encoder_2/ (T5), tokenizer/, tokenizer_2/"),
}  # fmt: skip


# How messages name a registry key that is a variant.
DISPLAY = {"UNet2DConditionModel+text_time": "SDXL-style UNet2DConditionModel"}


def display(name: str) -> str:
    return DISPLAY.get(name, name)


def folder_needs(name: str) -> str:
    """What a pipeline folder of this family holds (for messages about a missing part)."""
    key = name if name in FAMILIES else next((k for k in FAMILIES if k.startswith(name + "+")), name)
    return FAMILIES[key][2].split(": ")[1] if key in FAMILIES else "its model folders"

"""One tiny random model of every backbone family, saved with each library's own constructors.

gpu_check's parity section and the host-sync test walk them all; a family that lands adds its
model here, and both check it from then on.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

import latent_models as lm

# ../shared beside the checkout; $DIFFPROBE_SHARED where it lies elsewhere (a GPU machine gets a copy carried in .gpu/shared)
SHARED = Path(os.environ.get("DIFFPROBE_SHARED") or Path(__file__).resolve().parents[2] / "shared")
FIXTURE = SHARED / "fixtures" / "adm" / "adm_uncond_tiny.pt"


def family_specs(tmp: Path) -> dict[str, tuple[str, dict]]:
    """{family: (spec, load options)} of each family's tiny random model, saved under `tmp`."""
    from diffusers import UNet2DModel
    import transformers as tf

    specs: dict[str, tuple[str, dict]] = {}
    if FIXTURE.is_file():
        specs["adm (guided-diffusion fixture)"] = (f"adm:{FIXTURE}", {})
    torch.manual_seed(0)
    UNet2DModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")
                ).save_pretrained(tmp / "unet2d")  # fmt: skip
    specs["diffusers UNet2DModel"] = (f"diffusers:{tmp / 'unet2d'}", {"schedule": "linear"})
    specs["Stable Diffusion"] = (f"diffusers:{lm.save_sd(tmp / 'sd')}", {})
    specs["SDXL"] = (f"diffusers:{lm.save_sdxl(tmp / 'sdxl')}", {})
    specs["DiT"] = (f"diffusers:{lm.save_dit(tmp / 'dit')}", {})
    specs["PixArt"] = (f"diffusers:{lm.save_pixart(tmp / 'pixart')}", {})
    specs["SD3"] = (f"diffusers:{lm.save_sd3(tmp / 'sd3')}", {})
    specs["FLUX"] = (f"diffusers:{lm.save_flux(tmp / 'flux')}", {})
    specs["timm ViT"] = ("timm:vit_tiny_patch16_224", {"weights": "random", "img_size": 32, "patch_size": 8, "depth": 2})
    specs["torchvision ResNet-18"] = ("torchvision:resnet18", {"weights": "random"})
    torch.manual_seed(0)
    tf.Dinov2Model(tf.Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                                   patch_size=8)).save_pretrained(tmp / "dinov2")  # fmt: skip
    specs["transformers DINOv2"] = (f"hf:{tmp / 'dinov2'}", {})
    return specs

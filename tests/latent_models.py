"""Tiny random latent pipelines saved as folders, built with diffusers'/transformers' own constructors.

Used by tests/test_latent_backbones.py and benchmarks/latent.py (which passes larger sizes).
"""

from __future__ import annotations

import json
import string
from pathlib import Path

import torch


def save_tokenizer(folder: Path, max_length: int = 16) -> None:
    """A CLIP BPE tokenizer over lowercase letters (no merges): enough to encode short prompts."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in string.ascii_lowercase:
        vocab[ch] = len(vocab)
        vocab[ch + "</w>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length)
    tok.save_pretrained(folder)


def vae(block_out_channels=(16, 32), latent_channels: int = 4, groups: int = 8):
    from diffusers import AutoencoderKL

    n = len(block_out_channels)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * n,
                         up_block_types=("UpDecoderBlock2D",) * n, block_out_channels=tuple(block_out_channels),
                         latent_channels=latent_channels, norm_num_groups=groups, layers_per_block=1)  # fmt: skip


def save_sd(folder: Path, seed: int = 0, text_encoder: bool = True, vae_dir: bool = True, **unet_overrides) -> str:
    """An SD-shaped pipeline: cross-attention U-Net (latent 8×8), VAE factor 2 (16-px images), CLIP text encoder."""
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    cfg = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
               down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
               cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8)  # fmt: skip
    cfg.update(unet_overrides)
    vae_channels = cfg.pop("vae_block_out_channels", (16, 32))
    UNet2DConditionModel(**cfg).save_pretrained(folder / "unet")
    if vae_dir:
        vae(vae_channels).save_pretrained(folder / "vae")
    if text_encoder:
        config = CLIPTextConfig(vocab_size=54, hidden_size=cfg["cross_attention_dim"], intermediate_size=37,
                                num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                                bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
        CLIPTextModel(config).save_pretrained(folder / "text_encoder")
    save_tokenizer(folder / "tokenizer")
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(folder / "scheduler")
    return str(folder)


def save_sdxl(folder: Path, seed: int = 0, force_zeros: bool = True, refiner: bool = False, **unet_overrides) -> str:
    """An SDXL-shaped pipeline: a text_time U-Net (latent 8×8; 1 and 2 transformer layers), CLIP-L-
    and CLIP-G-like encoders (16 + 24 wide: 40-wide context; 12-wide pooled projection), VAE factor 2.
    refiner=True: the refiner's layout (second encoder only, aesthetic-score ids)."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    time_dim, pooled = 8, 12
    cfg = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
               down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
               transformer_layers_per_block=(1, 2), attention_head_dim=(4, 8), cross_attention_dim=40,
               use_linear_projection=True, norm_num_groups=8, addition_embed_type="text_time",
               addition_time_embed_dim=time_dim, projection_class_embeddings_input_dim=6 * time_dim + pooled)  # fmt: skip
    cfg.update(unet_overrides)
    vae_channels = cfg.pop("vae_block_out_channels", (16, 32))
    UNet2DConditionModel(**cfg).save_pretrained(folder / "unet")
    vae(vae_channels).save_pretrained(folder / "vae")
    clip = dict(vocab_size=54, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=16,
                bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
    if not refiner:
        CLIPTextModel(CLIPTextConfig(hidden_size=16, **clip)).save_pretrained(folder / "text_encoder")
        save_tokenizer(folder / "tokenizer")
    CLIPTextModelWithProjection(CLIPTextConfig(hidden_size=24, projection_dim=pooled, **clip)).save_pretrained(folder / "text_encoder_2")
    save_tokenizer(folder / "tokenizer_2")
    EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012).save_pretrained(folder / "scheduler")
    index = {"_class_name": "StableDiffusionXLPipeline", "force_zeros_for_empty_prompt": force_zeros,
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "EulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "image_encoder": [None, None], "feature_extractor": [None, None]}  # fmt: skip
    if refiner:
        index.update(_class_name="StableDiffusionXLImg2ImgPipeline", requires_aesthetics_score=True)
    (folder / "model_index.json").write_text(json.dumps(index))
    return str(folder)


def save_pixart(folder: Path, seed: int = 0, sigma: bool = False, **overrides) -> str:
    """A PixArt-shaped pipeline: learned-sigma transformer over 8×8 latents (patch 2, two blocks),
    T5 encoder, VAE factor 2; α's resolution and aspect-ratio conditions unless sigma=True."""
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = dict(sample_size=8, num_layers=2, attention_head_dim=12, num_attention_heads=2, in_channels=4, out_channels=8,
               patch_size=2, cross_attention_dim=24, caption_channels=20, norm_type="ada_norm_single",
               num_embeds_ada_norm=1000, use_additional_conditions=not sigma)  # fmt: skip
    cfg.update(overrides)
    PixArtTransformer2DModel(**cfg).save_pretrained(folder / "transformer")
    vae().save_pretrained(folder / "vae")
    T5EncoderModel(T5Config(vocab_size=30, d_model=cfg["caption_channels"], d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                            pad_token_id=0, eos_token_id=1)).save_pretrained(folder / "text_encoder")  # fmt: skip
    save_t5_tokenizer(folder / "tokenizer")
    DPMSolverMultistepScheduler(beta_schedule="linear", beta_start=0.0001, beta_end=0.02).save_pretrained(folder / "scheduler")
    name = "PixArtSigmaPipeline" if sigma else "PixArtAlphaPipeline"
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": name, "transformer": ["diffusers", "PixArtTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DPMSolverMultistepScheduler"], "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "T5TokenizerFast"]}))  # fmt: skip
    return str(folder)


def save_dit(folder: Path, seed: int = 0, **overrides) -> str:
    """A DiT-shaped pipeline: learned-sigma transformer over 8×8 latents, patch 2, 10 classes (+ null)."""
    from diffusers import DDIMScheduler, DiTTransformer2DModel

    torch.manual_seed(seed)
    cfg = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=4,
               sample_size=8, patch_size=2, num_embeds_ada_norm=10)  # fmt: skip
    cfg.update(overrides)
    vae_channels = cfg.pop("vae_block_out_channels", (16, 32))
    DiTTransformer2DModel(**cfg).save_pretrained(folder / "transformer")
    vae(vae_channels).save_pretrained(folder / "vae")
    DDIMScheduler(beta_schedule="linear").save_pretrained(folder / "scheduler")
    return str(folder)


def save_t5_tokenizer(folder: Path) -> None:
    """A T5 tokenizer (transformers' Unigram model) whose vocabulary is the lowercase letters."""
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)] + [(ch, -3.0) for ch in string.ascii_lowercase]
    T5TokenizerFast(vocab=vocab, extra_ids=0).save_pretrained(folder)


def save_sd3(folder: Path, seed: int = 0, t5: bool = True, **overrides) -> str:
    """An SD3-shaped pipeline: MMDiT transformer (latent 8×8, patch 2), 16-channel VAE with a shift
    factor (factor 2: 16-px images), two CLIP encoders with projections and a T5 encoder."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = dict(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=3, attention_head_dim=8,
               num_attention_heads=4, joint_attention_dim=48, caption_projection_dim=32, pooled_projection_dim=32,
               pos_embed_max_size=16)  # fmt: skip
    cfg.update(overrides)
    SD3Transformer2DModel(**cfg).save_pretrained(folder / "transformer")
    codec = vae((16, 32), latent_channels=16)
    codec.register_to_config(shift_factor=0.06, scaling_factor=1.5)
    codec.save_pretrained(folder / "vae")
    for sub, width in (("text_encoder", 16), ("text_encoder_2", 24)):  # CLIP-L and CLIP-G: projections 16 + 16 = pooled 32
        clip = CLIPTextConfig(vocab_size=54, hidden_size=width, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                              max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1, projection_dim=16)  # fmt: skip
        CLIPTextModelWithProjection(clip).save_pretrained(folder / sub)
        save_tokenizer(folder / sub.replace("text_encoder", "tokenizer"))
    if t5:  # T5's width is the joint width; CLIP's 16 + 24 are padded up to it
        T5EncoderModel(T5Config(vocab_size=30, d_model=cfg["joint_attention_dim"], d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                                pad_token_id=0, eos_token_id=1)).save_pretrained(folder / "text_encoder_3")  # fmt: skip
        save_t5_tokenizer(folder / "tokenizer_3")
    FlowMatchEulerDiscreteScheduler(shift=3.0).save_pretrained(folder / "scheduler")
    parts = {"transformer": ["diffusers", "SD3Transformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
             "text_encoder_3": ["transformers", "T5EncoderModel"] if t5 else [None, None],
             "tokenizer_3": ["transformers", "T5TokenizerFast"] if t5 else [None, None],
             "image_encoder": [None, None], "feature_extractor": [None, None]}  # fmt: skip
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusion3Pipeline", **parts}))
    return str(folder)


def save_flux(folder: Path, seed: int = 0, guidance: bool = True, **overrides) -> str:
    """A FLUX-shaped pipeline: one double- and two single-stream blocks, 4-channel VAE with a shift
    factor (factor 2; 2×2 packing: 16 channels a token), CLIP and T5 text encoders, dynamic shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    cfg = dict(patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=8, num_attention_heads=2,
               joint_attention_dim=48, pooled_projection_dim=16, guidance_embeds=guidance, axes_dims_rope=(2, 2, 4))  # fmt: skip
    cfg.update(overrides)
    FluxTransformer2DModel(**cfg).save_pretrained(folder / "transformer")
    codec = vae((16, 32), latent_channels=4)
    codec.register_to_config(shift_factor=0.1, scaling_factor=0.4)
    codec.save_pretrained(folder / "vae")
    clip = CLIPTextConfig(vocab_size=54, hidden_size=16, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                          max_position_embeddings=16, bos_token_id=0, eos_token_id=1, pad_token_id=1)  # fmt: skip
    CLIPTextModel(clip).save_pretrained(folder / "text_encoder")
    save_tokenizer(folder / "tokenizer")
    T5EncoderModel(T5Config(vocab_size=30, d_model=cfg["joint_attention_dim"], d_ff=37, d_kv=8, num_layers=2, num_heads=4,
                            pad_token_id=0, eos_token_id=1)).save_pretrained(folder / "text_encoder_2")  # fmt: skip
    save_t5_tokenizer(folder / "tokenizer_2")
    FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15).save_pretrained(folder / "scheduler")
    parts = {"transformer": ["diffusers", "FluxTransformer2DModel"], "vae": ["diffusers", "AutoencoderKL"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"], "text_encoder": ["transformers", "CLIPTextModel"],
             "tokenizer": ["transformers", "CLIPTokenizer"], "text_encoder_2": ["transformers", "T5EncoderModel"],
             "tokenizer_2": ["transformers", "T5TokenizerFast"], "image_encoder": [None, None], "feature_extractor": [None, None]}  # fmt: skip
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline", **parts}))
    return str(folder)


# Real sizes (random weights) for benchmarks/gpu_check.py: the shapes set the speed, not the weights.
# SD 2.1's U-Net (865M) at 512 px: 64×64 latents; a VAE of the same factor 8, kept small (only x_t is timed).
SD21_SHAPE = dict(sample_size=64, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2, cross_attention_dim=1024,
                  attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, norm_num_groups=32,
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, vae_block_out_channels=(8, 8, 8, 8))  # fmt: skip
# DiT-XL/2 (675M) at 256 px: 28 blocks 1152 wide over 32×32 latents, 1000 classes.
DIT_XL_SHAPE = dict(num_attention_heads=16, attention_head_dim=72, num_layers=28, sample_size=32, num_embeds_ada_norm=1000,
                    vae_block_out_channels=(8, 8, 8, 8))  # fmt: skip

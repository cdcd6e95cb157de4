"""What an early, a middle and the last block of the released SD3/3.5 and FLUX.1 transformers need:
the weights read up to that block (bf16 GB), computed from each model's published transformer
config on the meta device (no download, no memory), as `diffprobe blocks` computes it for a folder.

    python benchmarks/depth_weights.py

The configs are the hub's `transformer/config.json` values (as of 2026); the printed totals are a
check against the parameter counts the model cards give (SD3 medium 2B, SD3.5
large 8.1B, FLUX.1 12B, DiT-XL/2 675M). SD3.5 medium's card says 2.5B; its config builds 2.24B. diffusers' DiT
repeats its timestep and class embedders in every block: 0.75B where the paper counts 675M.
"""

from __future__ import annotations

import torch

SD3 = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, attention_head_dim=64, joint_attention_dim=4096,
           pooled_projection_dim=2048)  # fmt: skip
MODELS = {
    "stabilityai/stable-diffusion-3-medium-diffusers": ("SD3Transformer2DModel",
        dict(SD3, num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=192)),
    "stabilityai/stable-diffusion-3.5-medium": ("SD3Transformer2DModel",
        dict(SD3, num_layers=24, num_attention_heads=24, caption_projection_dim=1536, pos_embed_max_size=384,
             dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")),
    "stabilityai/stable-diffusion-3.5-large": ("SD3Transformer2DModel",
        dict(SD3, num_layers=38, num_attention_heads=38, caption_projection_dim=2432, pos_embed_max_size=192, qk_norm="rms_norm")),
    "black-forest-labs/FLUX.1-dev": ("FluxTransformer2DModel",
        dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
             joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))),
    "facebook/DiT-XL-2-256": ("DiTTransformer2DModel",
        dict(sample_size=32, patch_size=2, in_channels=4, out_channels=8, num_layers=28, num_attention_heads=16,
             attention_head_dim=72, num_embeds_ada_norm=1000)),
}  # fmt: skip
TAILS = {"DiTTransformer2DModel": ("norm_out", "proj_out_1", "proj_out_2")}  # the output head (others: norm_out, proj_out)


def depth_rows(class_name: str, config: dict) -> tuple[int, list[tuple[str, int, int]]]:
    """(total parameters, [(where, block, parameters up to it)]) for the first, middle and last block."""
    import diffusers

    from diffprobe.backbones.base import BlockInfo, weights_to

    with torch.device("meta"):
        model = getattr(diffusers, class_name)(**config)
    chain = ["transformer_blocks"] + (["single_transformer_blocks"] if hasattr(model, "single_transformer_blocks") else [])
    names = [name for name in ["embedding"]] + [f"{c}.{i}" for c in chain for i in range(len(getattr(model, c)))]
    blocks = [BlockInfo(i + 1, name, 0, 0) for i, name in enumerate(names)]
    last = len(blocks)
    picks = [("early (block 2)", 2), (f"middle (block {last // 2 + 1})", last // 2 + 1), (f"last (block {last})", last)]
    total = sum(p.numel() for p in model.parameters())
    return total, [(where, b, weights_to(model, blocks, TAILS.get(class_name, ("norm_out", "proj_out")), b)) for where, b in picks]


def main() -> None:
    print("weights read to a block, bf16 (2 bytes per parameter); activations come on top")
    for hub_id, (class_name, config) in MODELS.items():
        total, rows = depth_rows(class_name, config)
        cells = ", ".join(f"{where} {n / 1e9:.2f}B = {2 * n / 1e9:.1f} GB" for where, _, n in rows)
        print(f"{hub_id}: {total / 1e9:.2f}B parameters in all; {cells}")


if __name__ == "__main__":
    main()

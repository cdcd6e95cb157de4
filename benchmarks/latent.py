"""Latent backbones: diffprobe's path against the plain path, same weights, same run.

Plain path (what DIFT-style scripts do): for every timestep, encode the images with the VAE
again, run the full diffusers forward in fp32 and catch the block with a forward hook.
diffprobe: each image encoded once (the store's latent cache), then per timestep the walk
that stops after the wanted block, in the machine's compute (`choose_compute()`: bf16 +
channels_last on CPUs with fast bf16, fp32 + channels_last on other CPUs; benchmarks/machine.py).

Models (random weights, built with diffusers' constructors; the shapes matter, not the weights):
    SD-shaped U-Net, 64-px images -> 4×16×16 latents, early exit at up_blocks.1 (its last unit)
    the same U-Net tapped inside a block (up_blocks.1's first self-attention, by module path)
    SDXL-shaped U-Net (text_time added conditioning, 1/2/2 transformer layers), early exit at up_blocks.1
    DiT, 12 blocks, patch 2, early exit at the middle block (transformer_blocks.5)
    SD3-shaped MMDiT, 12 joint blocks 384 wide, 16-channel VAE with a shift, early exit at transformer_blocks.5
    FLUX-shaped, 4 double- + 8 single-stream blocks 384 wide, 2×2 packing, early exit at single_transformer_blocks.1
The plain path of the flow models noises with (1−σ)·x0 + σ·ε and runs the pipeline-style forward
(SD3: the joint transformer; FLUX: packed tokens, ids, guidance), catching the image stream.

    python benchmarks/latent.py                                    # 8 images × 4 timesteps (make bench)
    python benchmarks/latent.py --images 16 --repeats 2 --budget 300   # the README's earlier figures
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the pipeline builders the tests use
from latent_models import save_dit, save_flux, save_sd, save_sd3, save_sdxl  # noqa: E402

from diffprobe import load_backbone  # noqa: E402
from diffprobe.features.featurize import pool_features  # noqa: E402
from diffprobe.features.noise import image_noise  # noqa: E402
from machine import Budget, add_machine_args, resolve  # noqa: E402

SD = dict(sample_size=16, block_out_channels=(64, 128, 128), layers_per_block=2, cross_attention_dim=64,
          down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32,
          attention_head_dim=8, vae_block_out_channels=(32, 64, 64))  # fmt: skip
SDXL = dict(sample_size=16, block_out_channels=(64, 128, 128), layers_per_block=2, transformer_layers_per_block=(1, 2, 2),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4, 4), norm_num_groups=32,
            vae_block_out_channels=(32, 64, 64))  # fmt: skip
DIT = dict(num_attention_heads=6, attention_head_dim=64, num_layers=12, sample_size=16, vae_block_out_channels=(32, 64, 64))
SD3 = dict(sample_size=32, num_layers=12, attention_head_dim=64, num_attention_heads=6, caption_projection_dim=384,
           joint_attention_dim=64, pos_embed_max_size=16)  # fmt: skip
FLUX = dict(num_layers=4, num_single_layers=8, attention_head_dim=64, num_attention_heads=6, axes_dims_rope=(16, 24, 24),
            joint_attention_dim=64)  # fmt: skip


def plain_features(bb, images, ts, noises, module_name, to_map, stream=0):
    """Encode every time, full fp32 forward, hook the block (`stream`: which output of a block
    that returns several: the joint transformers' image stream is 1), pool."""
    caught = {}
    module = bb.model.get_submodule(module_name)
    handle = module.register_forward_hook(lambda m, i, o: caught.__setitem__("h", o[stream] if isinstance(o, tuple) else o))
    vae, out = bb.codec.vae, []
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    try:
        for t, eps in zip(ts, noises):
            z = (vae.encode(images).latent_dist.mean - shift) * vae.config.scaling_factor
            x_t = bb.schedule.q_sample(z, t, eps)
            tt = torch.full((len(images),), t)
            bb.denoise(x_t, tt)  # the model's full forward (the SD one with the prompt, DiT with the null class)
            out.append(pool_features(to_map(caught["h"]), 1))
    finally:
        handle.remove()
    return out


def diffprobe_features(bb, compute, images, ts, noises, block):
    latents = bb.encode(images.to(compute.device))  # once per image: what the store's latent cache holds
    out = []
    for t, eps in zip(ts, noises):
        x_t = compute.batch(bb.schedule.q_sample(latents, t, eps.to(compute.device)))
        with compute.autocast():
            feats = bb.forward_features(x_t, t, [block])
        out.append(pool_features(feats[block], 1).cpu())
    return out


def measure(name, spec, block, module_name, to_map, images, ts, repeats, compute, budget, stream=0, options=None):
    plain_bb = load_backbone(spec, **(options or {}))
    plain_bb.require_whole("the plain path")  # a full forward: every block read (lazily read transformers)
    fast_bb = compute.prepare(load_backbone(spec, **(options or {})))
    noises = [image_noise(range(len(images)), 0, plain_bb.model_shape, 0) for _ in ts]
    with torch.inference_mode():
        plain_features(plain_bb, images[:2], ts[:1], [n[:2] for n in noises[:1]], module_name, to_map, stream)  # warm-up
        diffprobe_features(fast_bb, compute, images[:2], ts[:1], [n[:2] for n in noises[:1]], block)
        timings = {"plain": [], "diffprobe": []}
        for _ in budget.repeats(repeats):  # interleaved, so both see the same machine load
            start = time.perf_counter()
            ref = plain_features(plain_bb, images, ts, noises, module_name, to_map, stream)
            timings["plain"].append(time.perf_counter() - start)
            start = time.perf_counter()
            got = diffprobe_features(fast_bb, compute, images, ts, noises, block)
            timings["diffprobe"].append(time.perf_counter() - start)
    n = len(images) * len(ts)
    plain, fast = n / min(timings["plain"]), n / min(timings["diffprobe"])
    cos = min(F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1).min().item() for a, b in zip(ref, got))
    tap = fast_bb.tap_info(block)
    where = f"block {block} ({tap.name}" if isinstance(block, int) else f"module {block} (in block {fast_bb.tap_block(block)}"
    print(f"{name}: {where}, {tap.channels} ch at {tap.resolution}² of {fast_bb.num_blocks} blocks), "
          f"{len(images)} images × {len(ts)} timesteps")  # fmt: skip
    print(f"  plain (encode every time, full forward + hook, fp32): {plain:7.1f} img·t/s")
    print(f"  diffprobe (cached latents, early exit, {compute.describe()}): {fast:7.1f} img·t/s")
    print(f"  min cosine of pooled features to the plain path {cos:.5f}")
    print(f"ratio: {name} {'block ' * isinstance(block, int)}{block}, diffprobe ({compute.describe()}) vs plain: {fast / plain:.2f}×")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--timesteps", default="50,150,300,500")
    parser.add_argument("--repeats", type=int, default=2)
    add_machine_args(parser)
    parser.set_defaults(budget=25)  # per model, from its construction
    args = parser.parse_args()
    machine = resolve(args)
    print(machine.header())  # one diffprobe path (the chosen compute): nothing to skip
    compute = machine.compute
    torch.manual_seed(0)
    ts = [int(t) for t in args.timesteps.split(",")]
    images = torch.rand(args.images, 3, 64, 64) * 2 - 1
    with tempfile.TemporaryDirectory() as tmp:
        sd = load_backbone(f"diffusers:{save_sd(Path(tmp) / 'sd', **SD)}")
        up1 = max(b.index for b in sd.blocks if b.name.startswith("up_blocks.1."))
        last_unit = sd.blocks[up1 - 1].name  # up_blocks.1.resnets.2: its output is the upsampler's
        hooked = "up_blocks.1.upsamplers.0" if sd.model.up_blocks[1].upsamplers is not None else last_unit
        measure("SD-shaped U-Net", f"diffusers:{Path(tmp) / 'sd'}", up1, hooked, lambda h: h, images, ts, args.repeats,
                compute, Budget(args.budget))  # fmt: skip
        inner = "up_blocks.1.attentions.0.transformer_blocks.0.attn1"

        def tokens_to_map_8(h):  # up_blocks.1 runs at 8×8 latents
            return h.transpose(1, 2).reshape(h.shape[0], h.shape[2], 8, 8)

        measure("SD-shaped U-Net, inner module", f"diffusers:{Path(tmp) / 'sd'}", inner, inner, tokens_to_map_8, images, ts,
                args.repeats, compute, Budget(args.budget))  # fmt: skip
        sdxl_spec = f"diffusers:{save_sdxl(Path(tmp) / 'sdxl', **SDXL)}"
        sdxl = load_backbone(sdxl_spec)
        up1 = max(b.index for b in sdxl.blocks if b.name.startswith("up_blocks.1."))
        hooked = "up_blocks.1.upsamplers.0" if sdxl.model.up_blocks[1].upsamplers is not None else sdxl.blocks[up1 - 1].name
        measure("SDXL-shaped U-Net", sdxl_spec, up1, hooked, lambda h: h, images, ts, args.repeats, compute, Budget(args.budget))
        dit_spec = f"diffusers:{save_dit(Path(tmp) / 'dit', **DIT)}"
        middle = DIT["num_layers"] // 2  # transformer_blocks.5 is block 7 (block 1 is the patch embedding)
        side = DIT["sample_size"] // 2

        def tokens_to_map(h):
            return h.transpose(1, 2).reshape(h.shape[0], h.shape[2], side, side)

        measure("DiT", dit_spec, middle + 1, f"transformer_blocks.{middle - 1}", tokens_to_map, images, ts, args.repeats,
                compute, Budget(args.budget))  # fmt: skip

        def tokens_to_map_16(h):  # 64-px images, VAE factor 2, patch (or 2×2 packing) 2: 16×16 tokens
            return h.transpose(1, 2).reshape(h.shape[0], h.shape[2], 16, 16)

        flow_ts = [min(t, 1000) for t in ts]  # flow t runs 0..1000 too: σ = t/1000
        sd3_spec = f"diffusers:{save_sd3(Path(tmp) / 'sd3', **SD3)}"
        measure("SD3-shaped MMDiT", sd3_spec, 7, "transformer_blocks.5", tokens_to_map_16, images, flow_ts, args.repeats, compute,
                Budget(args.budget), stream=1)  # fmt: skip
        flux_spec = f"diffusers:{save_flux(Path(tmp) / 'flux', **FLUX)}"
        first_single = 2 + FLUX["num_layers"]  # block 1 is x_embedder, then the double-stream blocks
        measure("FLUX-shaped", flux_spec, first_single + 1, "single_transformer_blocks.1", tokens_to_map_16, images, flow_ts,
                args.repeats, compute, Budget(args.budget), stream=1, options={"image_size": 64})  # fmt: skip


if __name__ == "__main__":
    main()

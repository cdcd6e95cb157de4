"""Latent backbones: diffprobe's path against the plain path, same weights, same run.

Plain path (what DIFT-style scripts do): for every timestep, encode the images with the VAE
again, run the full diffusers forward in fp32 and catch the block with a forward hook.
diffprobe: each image encoded once (the store's latent cache), then per timestep the walk
that stops after the wanted block, in the machine's compute (`choose_compute()`: bf16 +
channels_last on CPUs with fast bf16, fp32 + channels_last on other CPUs; benchmarks/machine.py).

Models (random weights, built with diffusers' constructors; the shapes matter, not the weights):
    SD-shaped U-Net, 64-px images -> 4×16×16 latents, early exit at up_blocks.1 (its last unit)
    DiT, 12 blocks, patch 2, early exit at the middle block (transformer_blocks.5)

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
from latent_models import save_dit, save_sd  # noqa: E402

from diffprobe import load_backbone  # noqa: E402
from diffprobe.features.featurize import pool_features  # noqa: E402
from diffprobe.features.noise import image_noise  # noqa: E402
from machine import Budget, add_machine_args, resolve  # noqa: E402

SD = dict(sample_size=16, block_out_channels=(64, 128, 128), layers_per_block=2, cross_attention_dim=64,
          down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
          up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=32,
          attention_head_dim=8, vae_block_out_channels=(32, 64, 64))  # fmt: skip
DIT = dict(num_attention_heads=6, attention_head_dim=64, num_layers=12, sample_size=16, vae_block_out_channels=(32, 64, 64))


def plain_features(bb, images, ts, noises, module_name, to_map):
    """Encode every time, full fp32 forward, hook the block, pool."""
    caught = {}
    module = bb.model.get_submodule(module_name)
    handle = module.register_forward_hook(lambda m, i, o: caught.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    vae, out = bb.codec.vae, []
    try:
        for t, eps in zip(ts, noises):
            z = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
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


def measure(name, spec, block, module_name, to_map, images, ts, repeats, compute, budget):
    plain_bb = load_backbone(spec)
    fast_bb = compute.prepare(load_backbone(spec))
    noises = [image_noise(range(len(images)), 0, plain_bb.model_shape, 0) for _ in ts]
    with torch.inference_mode():
        plain_features(plain_bb, images[:2], ts[:1], [n[:2] for n in noises[:1]], module_name, to_map)  # warm-up
        diffprobe_features(fast_bb, compute, images[:2], ts[:1], [n[:2] for n in noises[:1]], block)
        timings = {"plain": [], "diffprobe": []}
        for _ in budget.repeats(repeats):  # interleaved, so both see the same machine load
            start = time.perf_counter()
            ref = plain_features(plain_bb, images, ts, noises, module_name, to_map)
            timings["plain"].append(time.perf_counter() - start)
            start = time.perf_counter()
            got = diffprobe_features(fast_bb, compute, images, ts, noises, block)
            timings["diffprobe"].append(time.perf_counter() - start)
    n = len(images) * len(ts)
    plain, fast = n / min(timings["plain"]), n / min(timings["diffprobe"])
    cos = min(F.cosine_similarity(a.flatten(1).float(), b.flatten(1).float(), dim=1).min().item() for a, b in zip(ref, got))
    print(f"{name}: block {block} ({fast_bb.blocks[block - 1].name}, {fast_bb.blocks[block - 1].channels} ch at "
          f"{fast_bb.blocks[block - 1].resolution}² of {fast_bb.num_blocks} blocks), {len(images)} images × {len(ts)} timesteps")  # fmt: skip
    print(f"  plain (encode every time, full forward + hook, fp32): {plain:7.1f} img·t/s")
    print(f"  diffprobe (cached latents, early exit, {compute.describe()}): {fast:7.1f} img·t/s")
    print(f"  min cosine of pooled features to the plain path {cos:.5f}")
    print(f"ratio: {name} block {block}, diffprobe ({compute.describe()}) vs plain: {fast / plain:.2f}×")


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
        dit_spec = f"diffusers:{save_dit(Path(tmp) / 'dit', **DIT)}"
        middle = DIT["num_layers"] // 2  # transformer_blocks.5 is block 7 (block 1 is the patch embedding)
        side = DIT["sample_size"] // 2

        def tokens_to_map(h):
            return h.transpose(1, 2).reshape(h.shape[0], h.shape[2], side, side)

        measure("DiT", dit_spec, middle + 1, f"transformer_blocks.{middle - 1}", tokens_to_map, images, ts, args.repeats,
                compute, Budget(args.budget))  # fmt: skip


if __name__ == "__main__":
    main()

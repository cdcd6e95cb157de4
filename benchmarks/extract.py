"""Extraction speed: diffprobe's path against a plain reference path, same weights, same run.

Reference: the full U-Net forward through every block, fp32, contiguous memory, block outputs
caught by forward hooks, then pooled (what the paper's public code does). diffprobe: the
public `diffprobe.featurize` that extraction, prediction and `Classifier` all call: early exit
after the deepest block, the machine's precision and layout (`choose_compute`). Also printed:
each speed-up step alone, the model's FLOPs up to the block (torch.utils.flop_counter), and
the share of the machine's matmul FLOP/s reached, measured in this run in the precision
diffprobe runs here (bf16 only on CPUs with native bf16; `--precision` to force one).

    python benchmarks/extract.py                       # CPU: 64×64, 64 channels, paper shape
    python benchmarks/extract.py --device cuda --image-size 256 --channels 256 --batch 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from diffprobe import load_backbone
from diffprobe.features.featurize import featurize, pool_features
from diffprobe.features.plan import FeaturePlan
from diffprobe.features.noise import image_noise
from diffprobe.precision import Compute, choose_compute
from diffprobe.features.store import FeatureKey


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul: the machine's practical peak for this dtype."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    sync(device)
    reps = 20 if device.type == "cuda" else 8
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start)


def model_flops(backbone, x: torch.Tensor, t: int, block: int | None) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        if block is None:
            backbone.model(x[:1], torch.full((1,), t, device=x.device))
        else:
            backbone.forward_features(x[:1], t, [block])
    return float(counter.get_total_flops())


def reference_features(backbone, x0, t, noise, keys):
    """Full forward, fp32, hooks: the plain path."""
    caught: dict[int, torch.Tensor] = {}
    handles = []
    for k in keys:
        module = backbone.model.get_submodule(backbone.blocks[k.block - 1].name)
        handles.append(module.register_forward_hook(lambda m, i, o, b=k.block: caught.__setitem__(b, o)))
    try:
        x_t = backbone.schedule.q_sample(x0, t, noise)
        backbone.model(x_t, torch.full((x0.shape[0],), t, device=x0.device))
    finally:
        for h in handles:
            h.remove()
    return {k: pool_features(caught[k.block], k.pool) for k in keys}


def timed(fn, device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--t", type=int, default=90)
    p.add_argument("--selections", default="24;19", help="block selections, ';'-separated, each comma-separated")
    p.add_argument("--precision", default=None, help="diffprobe's precision (default: what this machine runs, choose_compute)")
    p.add_argument("--skip-steps", action="store_true", help="only reference vs full diffprobe (no per-step table)")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()

    device = torch.device(args.device)
    torch.manual_seed(0)
    size = args.image_size
    # The paper model's shape (256x256_diffusion_uncond), scaled: same levels, attention at the
    # same downsampling factors (8, 16, 32), heads of 64 channels.
    backbone = load_backbone(
        "adm:random", preset="256x256_diffusion_uncond", image_size=size, num_channels=args.channels,
        channel_mult="1,1,2,2,4,4", attention_resolutions=",".join(str(size // ds) for ds in (8, 16, 32)),
    ).to(device)  # fmt: skip
    x0 = torch.rand(args.batch, 3, size, size, device=device) * 2 - 1
    noise = image_noise(range(args.batch), 0, (3, size, size)).to(device)
    # What this machine runs (choose_compute): bf16 only where the CPU has native bf16 (AVX512-BF16/AMX);
    # on AVX2-only CPUs bf16 is emulated and far slower, so it is measured only when asked for.
    precision = args.precision or choose_compute(str(device)).precision
    peak = matmul_peak(device, torch.bfloat16 if precision == "bf16" else torch.float16 if precision == "fp16" else torch.float32)
    full_flops = model_flops(backbone, x0, args.t, None)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else f'{torch.get_num_threads()} threads'}), "
          f"torch {torch.__version__}; model {size}×{size}, {args.channels} ch, {backbone.num_blocks} blocks, "
          f"{sum(p.numel() for p in backbone.parameters()) / 1e6:.1f}M params; batch {args.batch}")  # fmt: skip
    print(f"full forward {full_flops / 1e9:.2f} GFLOP/img; {precision} matmul peak measured {peak / 1e12:.2f} TFLOP/s")

    results = []
    for selection in args.selections.split(";"):
        blocks = [int(b) for b in selection.split(",")]
        keys = [FeatureKey(args.t, b, 1) for b in blocks]
        flops = model_flops(backbone, x0, args.t, max(blocks))
        fp32 = Compute(device, "fp32", False)
        variants = [("early exit, fp32", fp32), (f"early exit, {precision}", Compute(device, precision, False)),
                    (f"early exit, {precision}, channels_last", Compute(device, precision, True))]  # fmt: skip
        if device.type == "cuda":
            variants += [(f"early exit, {precision}, compiled", Compute(device, precision, False, True)),
                         (f"early exit, {precision}, channels_last, compiled", Compute(device, precision, True, True))]  # fmt: skip
        default = choose_compute(str(device), precision)  # what `diffprobe extract` uses here
        default_name = next((name for name, c in variants if c == default), None)
        if default_name is None:
            default_name = "default " + default.describe()
            variants.append((default_name, default))
        if args.skip_steps:
            variants = [(default_name, default)]

        def run_ref():
            with torch.inference_mode():
                return reference_features(backbone, x0, args.t, noise, keys)

        plan = FeaturePlan(t=args.t, blocks=blocks, pools=1)

        def run_variant(name, compute):
            def go():  # the public featurize: it sets up (and caches) a copy of the backbone per compute
                with torch.inference_mode():
                    return featurize(backbone, x0, plan, range(args.batch), keys=keys, compute=compute)

            return go

        # Interleave reference and variants so drifting machine load hits all alike.
        ref_times: list[float] = []
        var_times: dict[str, list[float]] = {name: [] for name, _ in variants}
        for _ in range(args.repeats):
            ref_times += timed(run_ref, device, 1, 1)
            for name, compute in variants:
                var_times[name] += timed(run_variant(name, compute), device, 1, 1)
        ref_out = run_ref()
        best_out = run_variant(default_name, default)()
        ref_ips = args.batch / statistics.median(ref_times)
        print(f"\nblocks {selection} at t={args.t}: {flops / 1e9:.2f} GFLOP/img to block {max(blocks)} "
              f"({flops / full_flops:.0%} of the full forward)")  # fmt: skip
        print(f"  {'reference (full forward, fp32, hooks)':<52} {ref_ips:9.1f} img/s   1.00×")
        for name, _ in variants:
            ips = args.batch / statistics.median(var_times[name])
            mark = "  <- default" if name == default_name else ""
            print(f"  {'diffprobe ' + name:<52} {ips:9.1f} img/s {ips / ref_ips:6.2f}×   {ips * flops / peak:6.1%} of peak{mark}")
        best_ips = args.batch / statistics.median(var_times[default_name])
        print(f"  default ({default.describe()}) vs reference:")
        for k in keys:
            a, b = ref_out[k].float().flatten(), best_out[k].float().flatten()
            cos = torch.nn.functional.cosine_similarity(a, b, dim=0).item()
            rows = torch.nn.functional.cosine_similarity(ref_out[k].float(), best_out[k].float(), dim=1).min().item()
            print(f"  block {k.block}: max |diff| {(a - b).abs().max().item():.4g} (feature scale {a.abs().max().item():.3g}), "
                  f"cosine {cos:.5f} (worst image {rows:.5f})")  # fmt: skip
        results.append({"blocks": blocks, "reference_img_s": ref_ips, "diffprobe_img_s": best_ips,
                        "ratio": best_ips / ref_ips, "flops_per_img": flops, "peak_flops": peak,
                        "fraction_of_peak": best_ips * flops / peak})  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "image_size": size, "channels": args.channels, "batch": args.batch, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

"""Extraction speed: diffprobe's path against a plain reference path, same weights, same run.

Reference: the full U-Net forward through every block, fp32, contiguous memory, block outputs
caught by forward hooks, then pooled (what the paper's public code does). diffprobe: the
public `diffprobe.featurize` that extraction, prediction and `Classifier` all call: early exit
after the deepest block, the machine's precision and layout (`choose_compute`). Also printed:
each speed-up step alone (fp32 and fp32 channels_last everywhere; bf16 ones only where bf16 is
fast, see benchmarks/machine.py), the model's FLOPs up to the block (torch.utils.flop_counter),
and the share of the machine's matmul FLOP/s reached, measured in this run in the precision
diffprobe runs here.

    python benchmarks/extract.py                       # CPU: 64×64, 64 channels, paper shape, block 24 (make bench)
    python benchmarks/extract.py --selections "24;19" --batch 32 --repeats 5 --budget 600   # bigger, steadier
    python benchmarks/extract.py --backbone adm:checkpoints/diffprobe-cifar10/ema.pt --selections 20 --t 10 --batch 64
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
from diffprobe.precision import Compute
from diffprobe.features.store import FeatureKey
from machine import Budget, Machine, add_machine_args, announce, paper_adm_options


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, dtype: torch.dtype) -> float:
    """FLOP/s of a large square matmul: the machine's practical peak for this dtype (best of a few)."""
    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    sync(device)
    best = float("inf")
    for _ in range(5 if device.type == "cuda" else 4):
        start = time.perf_counter()
        for _ in range(4 if device.type == "cuda" else 1):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / (4 if device.type == "cuda" else 1))
    return 2 * n**3 / best


def model_flops(backbone, x: torch.Tensor, t: int, block: int | None) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        if block is None:
            backbone.model(x[:1], torch.full((1,), t, device=x.device))
        else:
            backbone.forward_features(x[:1], t, [block])
    return float(counter.get_total_flops())


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


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


def variants(machine: Machine) -> tuple[list[tuple[str, Compute]], str]:
    """The diffprobe paths timed here, and the name of the one `diffprobe extract` uses (the default).

    Each precision timed (fp32, plus bf16/fp16 only where fast: `machine.precisions()`), in both
    layouts; compiled variants on GPUs. The default is added when it is none of these.
    """
    device = machine.device
    out = []
    for precision in machine.precisions():
        out += [(f"early exit, {precision}", Compute(device, precision, False)),
                (f"early exit, {precision}, channels_last", Compute(device, precision, True))]  # fmt: skip
    if device.type == "cuda":
        low = machine.low_precisions[0]
        out += [(f"early exit, {low}, compiled", Compute(device, low, False, True)),
                (f"early exit, {low}, channels_last, compiled", Compute(device, low, True, True))]  # fmt: skip
    default = machine.compute
    name = next((n for n, c in out if c == default), None)
    if name is None:
        name = "default " + default.describe()
        out.append((name, default))
    return out, name


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backbone", default="adm:random",
                   help="a backbone spec (default: random weights of the paper model's shape, scaled by --image-size/--channels)")  # fmt: skip
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--t", type=int, default=90)
    p.add_argument("--selections", default="24", help="block selections, ';'-separated, each comma-separated (e.g. '24;19')")
    p.add_argument("--skip-steps", action="store_true", help="only reference vs full diffprobe (no per-step table)")
    p.add_argument("--json", help="also write the results here")
    add_machine_args(p)
    p.set_defaults(budget=60)
    args = p.parse_args()

    budget = Budget(args.budget)
    machine = announce(args, args.device)
    device = machine.device
    torch.manual_seed(0)
    if args.backbone == "adm:random":
        size = args.image_size
        backbone = load_backbone("adm:random", **paper_adm_options(size, args.channels)).to(device)
    else:
        backbone = load_backbone(args.backbone).to(device)
        size = backbone.image_size
    x0 = torch.rand(args.batch, 3, size, size, device=device) * 2 - 1
    noise = image_noise(range(args.batch), 0, (3, size, size)).to(device)
    # Peak FLOP/s in the precision diffprobe runs here (bf16 only where it is fast).
    precision = machine.compute.precision
    peak = matmul_peak(device, machine.compute.dtype)
    full_flops = model_flops(backbone, x0, args.t, None)
    print(f"model {args.backbone} {size}×{size}, {backbone.num_blocks} blocks, "
          f"{sum(p.numel() for p in backbone.parameters()) / 1e6:.1f}M params; batch {args.batch}")  # fmt: skip
    print(f"full forward {full_flops / 1e9:.2f} GFLOP/img; {precision} matmul peak measured {peak / 1e12:.3f} TFLOP/s")

    timed_variants, default_name = variants(machine)
    default = machine.compute  # what `diffprobe extract` uses here
    if args.skip_steps:
        timed_variants = [(default_name, default)]
    results = []
    for selection in args.selections.split(";"):
        blocks = [int(b) for b in selection.split(",")]
        keys = [FeatureKey(args.t, b, 1) for b in blocks]
        flops = model_flops(backbone, x0, args.t, max(blocks))
        plan = FeaturePlan(t=args.t, blocks=blocks, pools=1)

        def run_ref():
            with torch.inference_mode():
                return reference_features(backbone, x0, args.t, noise, keys)

        def run_variant(compute):
            def go():  # the public featurize: it sets up (and caches) a copy of the backbone per compute
                with torch.inference_mode():
                    return featurize(backbone, x0, plan, range(args.batch), keys=keys, compute=compute)

            return go

        # One warm-up each (it also makes the set-up copy), then reference and variants interleaved,
        # so drifting machine load hits all alike.
        ref_out = run_ref()
        best_out = None
        for name, compute in timed_variants:
            out = run_variant(compute)()
            best_out = out if name == default_name else best_out
        ref_times: list[float] = []
        var_times: dict[str, list[float]] = {name: [] for name, _ in timed_variants}
        for _ in budget.repeats(args.repeats):
            ref_times.append(timed(run_ref, device))
            for name, compute in timed_variants:
                var_times[name].append(timed(run_variant(compute), device))
        ref_ips = args.batch / statistics.median(ref_times)
        print(f"\nblocks {selection} at t={args.t}: {flops / 1e9:.2f} GFLOP/img to block {max(blocks)} "
              f"({flops / full_flops:.0%} of the full forward); median of {len(ref_times)} timed batches")  # fmt: skip
        print(f"  {'reference (full forward, fp32, hooks)':<52} {ref_ips:9.1f} img/s   1.00×")
        for name, _ in timed_variants:
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
        print(f"ratio: extraction to block {max(blocks)}, diffprobe ({default.describe()}) vs reference: {best_ips / ref_ips:.2f}×")
        results.append({"blocks": blocks, "reference_img_s": ref_ips, "diffprobe_img_s": best_ips,
                        "ratio": best_ips / ref_ips, "flops_per_img": flops, "peak_flops": peak, "peak_precision": precision,
                        "fraction_of_peak": best_ips * flops / peak,
                        "variants_img_s": {n: args.batch / statistics.median(v) for n, v in var_times.items()}})  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": str(device), "backbone": args.backbone, "image_size": size,
                       "channels": args.channels if args.backbone == "adm:random" else None,
                       "batch": args.batch, "compute": default.describe(), "skipped": machine.skipped, "results": results}, f, indent=1)  # fmt: skip


if __name__ == "__main__":
    main()

"""Online training speed: diffprobe's online path against the public recipe's path, same weights, same run.

One training step of an attention head on block 24's full map (the paper's best head), at t=90:
  public recipe: the full U-Net forward in fp32 for every batch, the block caught by a hook
                 (what the paper's code does: features recomputed every step, no early exit);
  diffprobe:     `featurize` (early exit after block 24, the machine's precision and layout,
                 compiled on GPUs) and the same head forward + backward.
Prints images per second for each path and the ratio.

    python benchmarks/online.py                            # CPU: 64×64, 64 channels, paper shape (make bench)
    python benchmarks/online.py --batch 32 --steps 8 --budget 600        # bigger, steadier
    python benchmarks/online.py --device cuda --image-size 256 --channels 256 --batch 64
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from diffprobe import load_backbone
from diffprobe.features.featurize import featurize
from diffprobe.features.noise import image_noise
from diffprobe.features.plan import FeaturePlan
from diffprobe.probing.heads import AttentionHead
from machine import Budget, add_machine_args, paper_adm_options, resolve


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3, help="timed steps per path (after one warm-up step)")
    p.add_argument("--block", type=int, default=24)
    p.add_argument("--t", type=int, default=90)
    add_machine_args(p)
    p.set_defaults(budget=40)
    args = p.parse_args()

    budget = Budget(args.budget)
    machine = resolve(args, args.device)
    print(machine.header())  # one diffprobe path (the chosen compute): nothing to skip
    device, size = machine.device, args.image_size
    torch.manual_seed(0)
    backbone = load_backbone("adm:random", **paper_adm_options(size, args.channels)).to(device)
    info = backbone.blocks[args.block - 1]
    plan = FeaturePlan(t=args.t, blocks=args.block, pools=info.resolution)
    compute = machine.compute
    head = AttentionHead(info.channels, info.resolution, 1000, width=256, depth=2, heads=8).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-4)
    x0 = torch.rand(args.batch, 3, size, size, device=device) * 2 - 1
    y = torch.randint(0, 1000, (args.batch,), device=device)
    noise = image_noise(range(args.batch), 0, (3, size, size)).to(device)
    module = backbone.model.get_submodule(info.name)

    def head_step(feats: torch.Tensor) -> None:
        loss = F.cross_entropy(head(feats.float().flatten(1)), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def public_step() -> None:  # full forward, fp32, hook
        caught = {}
        handle = module.register_forward_hook(lambda m, i, o: caught.__setitem__("h", o))
        with torch.no_grad():
            backbone.model(backbone.schedule.q_sample(x0, args.t, noise), torch.full((args.batch,), args.t, device=device))
        handle.remove()
        head_step(caught["h"])

    def diffprobe_step() -> None:
        with torch.no_grad():
            feats = featurize(backbone, x0, plan, range(args.batch), compute=compute)
        head_step(feats[plan.keys[0]])

    def timed(step) -> float:
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        return time.perf_counter() - start

    print(f"model {size}×{size}, {args.channels} ch; block {args.block} map {info.channels}×{info.resolution}×{info.resolution}; "
          f"batch {args.batch}; diffprobe compute: {compute.describe()}")  # fmt: skip
    public_step()  # warm-up (and the set-up copy, compilation on GPUs)
    diffprobe_step()
    ref, ours = [], []
    for _ in budget.repeats(args.steps):  # interleaved, so drifting load hits both alike
        ref.append(timed(public_step))
        ours.append(timed(diffprobe_step))
    ref_ips, our_ips = args.batch / statistics.median(ref), args.batch / statistics.median(ours)
    print(f"  public recipe (full forward, fp32, hook) + head step   {ref_ips:8.1f} img/s   1.00×")
    print(f"  diffprobe online (featurize) + head step                {our_ips:8.1f} img/s   {our_ips / ref_ips:.2f}×")
    with torch.no_grad():
        caught = {}
        handle = module.register_forward_hook(lambda m, i, o: caught.__setitem__("h", o))
        backbone.model(backbone.schedule.q_sample(x0, args.t, noise), torch.full((args.batch,), args.t, device=device))
        handle.remove()
        ours_feats = featurize(backbone, x0, plan, range(args.batch), compute=compute)[plan.keys[0]]
    cos = F.cosine_similarity(caught["h"].float().flatten(1), ours_feats.float(), dim=1).min().item()
    print(f"  features' cosine to the public path (worst image): {cos:.5f}")
    print(f"ratio: online head step on block {args.block}, diffprobe ({compute.describe()}) vs public recipe: {our_ips / ref_ips:.2f}×")


if __name__ == "__main__":
    main()

"""Memory that grows with the depth read: a FLUX-shaped transformer saved in safetensors shards,
read whole (every block and the output head, as sampling or a plain from_pretrained holds it) and
as a probe of an early, a middle and the last block reads it (blocks are read from the shards as
a pass first needs them, backbones/partial.py), each in a fresh process.

Each process loads the pipeline, extracts one batch's features at its block and reports its peak
resident memory (VmHWM on CPU; max allocated on a GPU with --device cuda). Random weights: the
shapes matter, not the weights.

    python benchmarks/depth_memory.py                 # 8 double + 16 single blocks, 768 wide (~0.3B parameters)
    python benchmarks/depth_memory.py --width 1536    # ~1.2B parameters
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the pipeline builders the tests use


def peak_rss() -> int:
    """This process's peak resident memory since exec, in bytes. Linux's VmHWM: ru_maxrss would carry
    the parent's peak across fork + exec (the parent built the model)."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def child(folder: str, deepest: int | None, device: str) -> None:
    """One measurement, in its own process: load, read whole or as deep as `deepest`, one forward, peak memory."""
    from diffprobe import load_backbone

    bb = load_backbone(f"diffusers:{folder}", image_size=64).to(device).eval()
    if deepest is None:
        bb.require_whole("the whole-model reference")  # every block and the output head, read now
    block = deepest or bb.num_blocks
    with torch.no_grad():
        bb.forward_features(torch.randn(4, *bb.model_shape, device=device), torch.full((4,), 500, device=device), [block])
    peak = torch.cuda.max_memory_allocated() if device.startswith("cuda") else peak_rss()
    held = sum(p.numel() for p in bb.model.parameters())
    print(json.dumps({"block": block, "peak_bytes": peak, "parameters": held, "whole": deepest is None}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--width", type=int, default=768, help="heads × 64")
    parser.add_argument("--double", type=int, default=8)
    parser.add_argument("--single", type=int, default=16)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        folder, deepest = args.child
        return child(folder, None if deepest == "whole" else int(deepest), args.device)
    from latent_models import save_flux

    with tempfile.TemporaryDirectory() as tmp:
        folder = save_flux(Path(tmp) / "flux", num_layers=args.double, num_single_layers=args.single, attention_head_dim=64,
                           num_attention_heads=args.width // 64, axes_dims_rope=(16, 24, 24), joint_attention_dim=64)  # fmt: skip
        shards = Path(folder) / "transformer"
        from diffusers import FluxTransformer2DModel

        FluxTransformer2DModel.from_pretrained(shards).save_pretrained(shards, max_shard_size="200MB")  # shards, as released models are
        files = sorted(p.name for p in shards.glob("*.safetensors"))
        total = 1 + args.double + args.single
        print(f"FLUX-shaped: {args.double} double + {args.single} single blocks, {args.width} wide, {len(files)} safetensors file(s); "
              f"device {args.device}; peak = {'max allocated' if args.device.startswith('cuda') else 'RSS of the process'}")  # fmt: skip
        results = {}
        for deepest in ("whole", "2", str(1 + args.double + args.single // 2), str(total)):
            out = subprocess.run([sys.executable, __file__, "--child", folder, deepest, "--device", args.device],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            results[deepest] = json.loads(out.stdout.strip().splitlines()[-1])
        whole = results.pop("whole")
        print(f"  whole model read (as sampling holds it), block {whole['block']}: {whole['parameters'] / 1e6:.0f}M parameters held, "
              f"peak {whole['peak_bytes'] / 2**20:.0f} MiB")  # fmt: skip
        for deepest, r in results.items():
            print(f"  probe of block {deepest:>3}: {r['parameters'] / 1e6:6.0f}M parameters held, peak {r['peak_bytes'] / 2**20:6.0f} MiB "
                  f"({r['peak_bytes'] / whole['peak_bytes']:.2f} of the whole model's)")  # fmt: skip


if __name__ == "__main__":
    main()

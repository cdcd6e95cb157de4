"""Extraction end to end: the overlapped pipeline against each step in turn, same model, same run.

In turn (the reference, `extract(..., overlap=False)`): per chunk, load the images, draw each
image's ε in the main process, run the pass, copy every setting's features back and write them.
Overlapped (diffprobe's default, features/pipeline.py): ε drawn with the image by the loader
(in its worker processes when --workers > 0), the chunk's features copied back in one transfer
and written by a thread while the next chunk computes. Both stores must hold the same bytes.

Also printed: what drawing ε costs the host per image at a few model shapes (one generator per
image on one core), the ceiling the in-turn path puts on a GPU's extraction.

    python benchmarks/pipeline.py                                   # CPU: 64 px ADM, 192 images (make bench)
    python benchmarks/pipeline.py --device cuda --image-size 256 --channels 256 --images 2048 --workers 8
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffprobe import load_backbone  # noqa: E402
from diffprobe.features.extract import extract  # noqa: E402
from diffprobe.features.noise import image_noise  # noqa: E402
from diffprobe.features.plan import FeaturePlan  # noqa: E402
from diffprobe.features.store import FeatureStore  # noqa: E402
from extract import sync  # noqa: E402
from machine import Budget, add_machine_args, announce, paper_adm_options  # noqa: E402

NOISE_SHAPES = {"CIFAR pixels 3×32²": (3, 32, 32), "ADM-256 pixels 3×256²": (3, 256, 256), "SD 512 px latent 4×64²": (4, 64, 64)}


def noise_cost() -> None:
    for name, shape in NOISE_SHAPES.items():
        image_noise(range(4), 0, shape)  # warm-up
        n = 64
        start = time.perf_counter()
        image_noise(range(n), 0, shape)
        seconds = time.perf_counter() - start
        print(f"  ε on the host, {name}: {seconds / n * 1e3:.2f} ms per image ({n / seconds:.0f} img/s on one core)")


def image_folder(root: Path, count: int, size: int) -> Path:
    from PIL import Image

    gen = np.random.default_rng(0)
    for i in range(count):
        folder = root / f"class{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(gen.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return root


def time_both_paths(bb, data: Path, plan: FeaturePlan, out: Path, batch: int, compute, workers: int | None,
                    repeats: Iterable[int]) -> tuple[dict[str, float], bool, int]:  # fmt: skip
    """`extract` in turn and overlapped, interleaved (both see the same load): each path's best
    seconds over `repeats`, whether the two stores hold the same bytes, and how many settings."""
    best = {"in turn": float("inf"), "overlapped": float("inf")}
    stores = {}
    for repeat in repeats:
        for name, overlap in (("in turn", False), ("overlapped", True)):
            store = out / f"{name.replace(' ', '-')}-{repeat}"
            sync(compute.device)
            start = time.perf_counter()
            extract(bb, str(data), plan, store, batch_size=batch, compute=compute, overlap=overlap, workers=workers, progress=False)
            sync(compute.device)
            best[name] = min(best[name], time.perf_counter() - start)
            stores[name] = FeatureStore.open(store)
    keys = stores["in turn"].complete_keys()
    same = all(np.array_equal(stores["in turn"].load(k), stores["overlapped"].load(k)) for k in keys)
    return best, same, len(keys)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--channels", type=int, default=64)
    p.add_argument("--images", type=int, default=192)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--blocks", default="4,12,24", help="the paper's U-Net numbering (default: three depths to block 24)")
    p.add_argument("--pools", default="1,2,4")
    p.add_argument("--t", default="90")
    p.add_argument("--workers", type=int, default=None, help="DataLoader workers for both paths (default: diffprobe's, 0 on CPUs)")
    p.add_argument("--repeats", type=int, default=2)
    add_machine_args(p)
    args = p.parse_args()
    machine = announce(args, args.device)
    budget = Budget(args.budget if args.budget is not None else 300)
    noise_cost()
    size = args.image_size
    bb = load_backbone("adm:random", device=args.device, **paper_adm_options(size, args.channels))
    plan = FeaturePlan(t=[int(t) for t in args.t.split(",")], blocks=[int(b) for b in args.blocks.split(",")],
                       pools=[int(p) for p in args.pools.split(",")])  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        data = image_folder(tmp / "images", args.images, size)
        best, same, settings = time_both_paths(bb, data, plan, tmp, args.batch, machine.compute, args.workers, budget.repeats(args.repeats))
    print(f"  {args.images} images at {size} px, blocks {args.blocks}, pools {args.pools}, t {args.t}, batch {args.batch}, "
          f"{settings} settings, workers {args.workers if args.workers is not None else 'default'}")  # fmt: skip
    for name, seconds in best.items():
        print(f"  {name:<10} {seconds:6.2f} s  {args.images / seconds:7.1f} img/s")
    print(f"  stores byte-identical: {same}")
    print(f"ratio: extraction end to end, overlapped vs in turn ({machine.compute.describe()}): {best['in turn'] / best['overlapped']:.2f}×")
    if not same:
        sys.exit("the overlapped store differs from the in-turn one")


if __name__ == "__main__":
    main()

"""Commands of the feature stage: blocks, presets, extract, store."""

from __future__ import annotations

import argparse
import json

from ..errors import DiffprobeError
from .common import (add_backbone_args, add_data_args, add_extract_args, add_split_args, extract_options_from, load_backbone_from, log,
                     open_data, plan_from)


def cmd_blocks(args: argparse.Namespace) -> None:
    backbone = load_backbone_from(args)
    if args.all and not backbone.generative:
        raise DiffprobeError(f"{backbone.spec} is an image encoder: its blocks are its stages or layers (`diffprobe blocks "
                             f"{backbone.spec}`); module paths inside blocks are read in diffusion backbones")  # fmt: skip
    if args.all:
        return _print_modules(backbone, args.json)
    rows = backbone.block_table()
    if args.json:
        print(json.dumps({"source": backbone.source, "image_size": backbone.image_size, "model_shape": list(backbone.model_shape),
                          "parameterization": backbone.schedule.parameterization, "t": backbone.schedule.describe_t(),
                          "blocks": rows}, indent=1))  # fmt: skip
        return
    c, h, w = backbone.model_shape
    space = f", noised as {c}×{h}×{w} latents (channels and resolution below are latent-space)" if backbone.encodes_images else ""
    print(f"{backbone.source}: {backbone.family}, {backbone.image_size}×{backbone.image_size} input{space}, "
          f"schedule {backbone.schedule.name} ({backbone.schedule.parameterization}), {backbone.conditioning}")  # fmt: skip
    print(backbone.schedule.describe_t())
    weights = all("weights_to_here" in r for r in rows)  # stacked transformers: what each depth needs
    print(f"{'block':>5}  {'module':<28} {'channels':>8}  {'resolution':>10}" + ("  weights to here (bf16)" if weights else ""))
    for r in rows:
        need = f"  {_count(r['weights_to_here'])} ({2 * r['weights_to_here'] / 1e9:.3g} GB)" if weights else ""
        print(f"{r['index']:>5}  {r['name']:<28} {r['channels']:>8}  {r['resolution']:>7}×{r['resolution']}{need}")
    if backbone.generative:
        print(f"--blocks takes these numbers, or module paths inside them: `diffprobe blocks {backbone.spec} --all` lists those")
    else:
        print("--blocks takes these numbers (no --t: an image encoder reads the clean image)")


def _print_modules(backbone, as_json: bool) -> None:
    """Every module a feature pass runs, in order (from a pass on the meta device): what it gives and
    whether --blocks can tap it."""
    table = backbone.tap_table()
    if as_json:
        print(json.dumps({"source": backbone.source, "modules": [
            {"path": i.path, "block": i.block, "output": [list(s) for s in i.shape], "tappable": i.tappable,
             **({"channels": i.channels, "resolution": i.resolution} if i.tappable else {})} for i in table.values()]}, indent=1))  # fmt: skip
        return
    tappable = [i for i in table.values() if i.tappable]
    width = max(len(i.path) for i in tappable)
    print(f"{backbone.source}: {len(table)} modules run in a feature pass, {len(tappable)} give a map "
          f"(pass any of these to --blocks; text tokens and vectors are left out)")  # fmt: skip
    print(f"{'block':>5}  {'module':<{width}}  {'output (batch 1)':<24} map")
    for i in tappable:
        print(f"{i.block:>5}  {i.path:<{width}}  {i.describe_output():<24} {i.channels}×{i.resolution}×{i.resolution}")


def _count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def cmd_presets(args: argparse.Namespace) -> None:
    from ..backbones.adm_config import PRESETS

    for name, flags in PRESETS.items():
        print(f"{name}: " + " ".join(f"--{k} {v}" for k, v in flags.items()))


def cmd_extract(args: argparse.Namespace) -> None:
    from ..features.extract import extract

    backbone, data, options = load_backbone_from(args), open_data(args), extract_options_from(args)
    log.info("%s on %s (%d images, %d classes), %s", backbone.source, data.name, len(data), len(data.classes), options.compute.describe())
    summary = extract(backbone, data, plan_from(args), args.out, options).summary()
    from ..features.distributed import ranks

    if not ranks().is_main:  # under torchrun, one summary line
        return
    print(f"store {summary['root']}: {summary['rows']} rows, {len(summary['complete'])} complete arrays"
          + (f", {len(summary['incomplete'])} incomplete" if summary["incomplete"] else ""))  # fmt: skip


def cmd_store(args: argparse.Namespace) -> None:
    from ..features.store import FeatureStore

    store = FeatureStore.open(args.store)
    m = store.manifest
    info = {"backbone": m["backbone"]["source"], "fingerprint": m["backbone"]["fingerprint"], "data": m["data"]["name"],
            "noise": m["noise"], "dtype": m["dtype"], "precision": m["precision"], **store.summary()}  # fmt: skip
    print(json.dumps(info, indent=1))


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("blocks", help="print a backbone's block table (paper numbering for ADM)")
    add_backbone_args(p)
    p.add_argument("--all", action="store_true", help="every module a feature pass runs that gives a map (tappable by path)")
    p.add_argument("--json", action="store_true", help='print machine-readable JSON instead of the table')
    p.set_defaults(func=cmd_blocks)

    p = sub.add_parser("presets", help="list the ADM presets (released guided-diffusion checkpoints)")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("extract", help="extract pooled block features into a resumable store")
    add_backbone_args(p)
    add_data_args(p)
    p.add_argument("--out", required=True, help="feature store directory")
    add_extract_args(p)
    p.add_argument("--rows", choices=["train", "select", "report", "held-out"],
                   help="only the images of this role in the dataset-wide split (--val-fraction, --split-seed, "
                        "--report-share): e.g. a test store of the report rows for probe --test-store")  # fmt: skip
    add_split_args(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("store", help="describe a feature store")
    p.add_argument("store", help='a feature store folder')
    p.set_defaults(func=cmd_store)

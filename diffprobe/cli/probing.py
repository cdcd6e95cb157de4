"""Commands of the probing stage: probe (train a head on a store), predict (a saved run on images)."""

from __future__ import annotations

import argparse
import json

from ..errors import DiffprobeError
from ..features.distributed import ranks
from .common import (
    add_backbone_args,
    add_compute_args,
    add_data_args,
    add_plan_args,
    add_split_args,
    blocks_arg,
    compute_from,
    deprecated,
    float_list,
    int_list,
    load_backbone_from,
    open_data,
    plan_from,
)


def cmd_probe(args: argparse.Namespace) -> None:
    from ..features.store import FeatureKey, FeatureStore
    from ..probing.config import ProbeConfig
    from ..probing.heads import head_options
    from ..probing.train import probe

    if not args.blocks or args.blocks == "all":
        raise DiffprobeError("probe needs --blocks: the block(s) or module path(s) of the stored features to train on")
    store = FeatureStore.open(args.store)
    keys = [FeatureKey(t, b, p) for b in args.blocks for t in (args.t or [store.only_timestep()]) for p in args.pool]
    options = head_options(args.head, batchnorm=args.batchnorm or None, hidden=args.hidden, width=args.width,
                           depth=args.depth, heads=args.heads)  # fmt: skip
    config = ProbeConfig(args.head, args.recipe, options, tuple(args.wd) if args.wd else None, args.epochs, args.lr, args.val_fraction,
                         args.split_seed, args.seed, args.report_share)  # fmt: skip
    test_store = FeatureStore.open(args.test_store) if args.test_store else None
    augmented = FeatureStore.open(args.augmented_store) if args.augmented_store else None
    metrics = probe(store, keys, args.out, config, test_store, args.device, augmented=augmented, overwrite=args.overwrite)
    print(f"{args.head} head: {describe_metrics(metrics)}")
    print(f"run: {args.out}/config.json, head.pt, metrics.json, curves.png, confusion.png")


def describe_metrics(metrics: dict) -> str:
    """A trained head's line: the reported figure with its interval, then what was chosen and on what."""
    chosen, select = metrics["chosen"], metrics["select"]
    choice = (f"lr {chosen['lr']:g}, weight decay {chosen['weight_decay']:g}, epoch {chosen['epoch']} chosen on "
              f"{select['rows']} selection images (their top-1 {select['top1']:.2f}%)")  # fmt: skip
    if "report" in metrics:
        r, ci = metrics["report"], metrics["report"]["interval"]
        return (f"top-1 {r['top1']:.2f}% [{ci['low']:.2f}, {ci['high']:.2f}] (95% bootstrap), top-5 {r['top5']:.2f}% on "
                f"{r['rows']} images no choice saw ({r['source']}); {choice}")  # fmt: skip
    return (f"selection top-1 {select['top1']:.2f}% top-5 {select['top5']:.2f}%, on the rows that chose it, so optimistic "
            f"(give --report-share > 0 or --test-store for an unbiased figure); {choice}")  # fmt: skip


def cmd_predict(args: argparse.Namespace) -> None:
    from ..probing.predict import predict_files

    results = predict_files(args.run, args.images, args.top_k, args.device, backbone=args.backbone)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for r in results:
        print(r["image"] + ": " + ", ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top"]))


def cmd_probe_online(args: argparse.Namespace) -> None:
    from ..probing.config import ProbeConfig
    from ..probing.heads import head_options
    from ..probing.online import OnlineOptions, train_online

    options = head_options(args.head, hidden=args.hidden, width=args.width, depth=args.depth, heads=args.heads)
    config = ProbeConfig(args.head, args.recipe, options, (args.wd,) if args.wd is not None else None, args.epochs, args.lr,
                         args.val_fraction, args.split_seed, args.seed, args.report_share)  # fmt: skip
    online = OnlineOptions(compute=compute_from(args), limit=args.limit, subset_seed=args.subset_seed, augment=not args.no_augment,
                           feedback_blocks=tuple(args.feedback_blocks or ()), workers=args.workers)  # fmt: skip
    fitted = train_online(load_backbone_from(args), open_data(args), plan_from(args), config, args.out, online)
    if ranks().is_main:
        m = fitted.metrics
        print(f"{args.head} head (online features): {describe_metrics(m)}; run: {args.out}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe-online", help="train a head on features computed per batch by the frozen backbone "
                       "(full maps, augmentation, DifFeed; DDP under torchrun)")  # fmt: skip
    add_backbone_args(p)
    add_data_args(p)
    p.add_argument("--out", required=True, help="run directory")
    add_plan_args(p, seed_alias=False)
    p.add_argument("--head", default="attention", choices=["linear", "mlp", "cnn", "attention", "fusion", "diffeed"], help='the head trained on features computed on the fly')
    p.add_argument("--feedback-blocks", type=int_list, help="diffeed: decoder blocks fed back (e.g. 21,...,36 for the paper's ADM)")
    p.add_argument("--recipe", default="modern", choices=["modern", "paper"], help='modern: AdamW + cosine; paper: SGD, ×0.1 every 7 of 28 epochs')
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--lr", type=float, help="one learning rate (default: the recipe's)")
    p.add_argument("--wd", type=float, help="one weight decay: online training runs once, without probe's search over "
                   "several (default: the first of the recipe's for this head)")  # fmt: skip
    p.add_argument("--hidden", type=int_list, help='MLP hidden widths, comma-separated')
    p.add_argument("--width", type=int, help='attention/CNN head width')
    p.add_argument("--depth", type=int, help='attention head layers')
    p.add_argument("--heads", type=int, help='attention heads')
    p.add_argument("--limit", type=int, help="a stratified subset of this many images")
    p.add_argument("--subset-seed", type=int, default=0, help='seed of the stratified --limit/--held-out subset (which images)')
    p.add_argument("--no-augment", action="store_true", help="centre crops instead of a random-resized crop + flip per epoch")
    add_split_args(p)
    p.add_argument("--seed", type=int, default=0, help='initialisation and shuffling seed')
    add_compute_args(p)
    p.add_argument("--workers", type=int, help='image-loading worker processes (default: chosen for this machine)')
    p.set_defaults(func=cmd_probe_online)

    p = sub.add_parser("probe", help="train a head on stored features; choose epoch and weight decay on validation")
    p.add_argument("store", help="feature store directory (from extract or sweep/features)")
    p.add_argument("--t", type=int_list, help="timestep(s); several only with --head fusion (default: the store's one "
                   "timestep, as in an image encoder's store)")  # fmt: skip
    p.add_argument("--blocks", type=blocks_arg, help="block(s) or module path(s); several only with --head fusion (required)")
    deprecated(p, "--block", "--blocks", dest="blocks", type=int_list)
    p.add_argument("--pool", type=int_list, default=[1], help="pool size(s)")
    p.add_argument("--head", default="linear", choices=["linear", "mlp", "cnn", "attention", "fusion"], help='the head to train')
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--overwrite", action="store_true", help="replace a probe run already at --out (default: refuse)")
    p.add_argument("--recipe", default="modern", choices=["modern", "paper"], help="modern: AdamW + cosine; paper: SGD, ×0.1 every 7 of 28 epochs")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--lr", type=float, help="one learning rate (default: the recipe's search for this head)")
    p.add_argument("--wd", type=float_list, help="weight decay(s); each is tried, the best on validation kept "
                   "(default: the recipe's search for this head)")
    p.add_argument("--batchnorm", action="store_true", help="linear head: BatchNorm without affine first (MAE's probe)")
    p.add_argument("--hidden", type=int_list, help="MLP hidden sizes (default 1024)")
    p.add_argument("--width", type=int, help="CNN/attention width (default 256)")
    p.add_argument("--depth", type=int, help="attention: transformer blocks (default 2)")
    p.add_argument("--heads", type=int, help="attention: heads (default 8)")
    add_split_args(p)
    p.add_argument("--seed", type=int, default=0, help="initialisation and shuffling seed: same seed, same numbers")
    p.add_argument("--test-store", help="a store of held-out test images made with the same backbone")
    p.add_argument("--augmented-store", help="a store of cached augmented views (extract --augment-views K) to train on")
    p.add_argument("--device", default="auto", help='cpu, cuda, cuda:N, or auto (a GPU when there is one)')
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("predict", help="classify images with a saved probe run")
    p.add_argument("run", help="run directory written by `diffprobe probe`")
    p.add_argument("images", nargs="+", help="image files (any size or mode)")
    p.add_argument("--top-k", type=int, default=5, help='classes listed per image')
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--backbone", help="the run's backbone where it lies now, if it moved (e.g. diffusers:NEW_FOLDER); "
                   "it must be the same model (its fingerprint is checked)")
    p.add_argument("--device", default="auto", help='cpu, cuda, cuda:N, or auto (a GPU when there is one)')
    p.set_defaults(func=cmd_predict)

"""Commands that study representations: sweep, transfer, cka, baseline, compare-heads, demo."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import DiffprobeError
from ..features.distributed import ranks
from .common import (
    add_backbone_args,
    add_data_args,
    add_data_source_args,
    add_extract_args,
    add_fast_probe_args,
    add_split_args,
    add_test_data_args,
    check_image_size,
    deprecated,
    int_list,
    one_tap,
    extract_options_from,
    load_backbone_from,
    open_data,
    open_test_data,
    plan_from,
    test_limit_from,
)


def cmd_sweep(args: argparse.Namespace) -> None:
    from ..studies.sweep import describe_summary, sweep

    summary = sweep(load_backbone_from(args), open_data(args), args.out, plan_from(args), extract_options_from(args),
                    probe=args.probe, val_fraction=args.val_fraction, split_seed=args.split_seed,
                    controls=not args.no_controls, train_heads=args.head, head_epochs=args.head_epochs,
                    report_share=args.report_share, test_data=open_test_data(args), test_limit=args.test_limit)  # fmt: skip
    if ranks().is_main:  # under torchrun, one report
        print(describe_summary(summary))
        print(f"report: {args.out}/sweep.csv, {args.out}/heatmap_pool*.png, {args.out}/summary.json")


def cmd_compare(args: argparse.Namespace) -> None:
    from ..studies.compare import Entry, compare

    entries = [Entry.parse(text) for text in args.backbones]
    rows = compare(entries, open_data(args), args.out, t=args.t or (10, 50, 150), blocks=args.blocks or "all", pools=args.pool,
                   heads=args.heads, options=extract_options_from(args), val_fraction=args.val_fraction,
                   split_seed=args.split_seed, report_share=args.report_share, probe=args.probe, controls=not args.no_controls,
                   head_epochs=args.head_epochs, test_data=open_test_data(args), test_limit=args.test_limit)  # fmt: skip
    print((Path(args.out) / "compare.md").read_text().rstrip())
    print(f"table: {args.out}/compare.csv, compare.json, compare.md, compare.png ({len(rows)} backbones)")


def cmd_transfer(args: argparse.Namespace) -> None:
    from ..studies.transfer import transfer

    rows = transfer(load_backbone_from(args), args.datasets, args.out, plan_from(args), extract_options_from(args),
                    probe=args.probe, val_fraction=args.val_fraction, split_seed=args.split_seed, data_root=args.data_root,
                    download=args.download, split=args.split, controls=not args.no_controls,
                    report_share=args.report_share, test_split=args.test_split, test_limit=test_limit_from(args))  # fmt: skip
    for r in rows:
        ctrl = f"  (pixels {r['pixels_top1']:.2f}%, random weights {r['random_weights_top1']:.2f}%)" if "pixels_top1" in r else ""
        ci = f" [{r['low']:.2f}, {r['high']:.2f}]" if r["low"] is not None else ""
        print(f"{r['dataset']:<24} {r['images']:>7} images {r['classes']:>4} classes  top-1 {r['top1']:6.2f}%{ci} on {r['scored_on']}{ctrl}")
    print(f"table: {args.out}/transfer.csv, {args.out}/transfer.md, {args.out}/transfer.png")


def cmd_cka(args: argparse.Namespace) -> None:
    from ..features.store import FeatureStore
    from ..studies.cka import cka_study

    data = open_data(args) if args.data else None
    result = cka_study(FeatureStore.open(args.a), args.out, args.a_keys, args.b, args.b_keys, data, args.b_weights,
                       args.b_pool, args.batch_size, args.seed, args.forward_batch)  # fmt: skip
    print(f"CKA of {len(result['a'])} × {len(result['b'])} feature sets over {result['rows']} images (B: {result['b_name']}): "
          f"{args.out}/cka.csv, {args.out}/cka.png")  # fmt: skip


def cmd_baseline_train(args: argparse.Namespace) -> None:
    from ..studies.baseline import train_baseline

    check_image_size(args.image_size)
    info = train_baseline(open_data(args), args.out, args.arch, args.image_size, args.epochs, args.batch_size, args.lr,
                          limit=args.limit, val_fraction=args.val_fraction, split_seed=args.split_seed, seed=args.seed,
                          device=args.device, stem=args.stem)  # fmt: skip
    print(f"{info['arch']} on {info['data']}: validation top-1 {info['val_top1']:.2f}% after {info['epochs']} epochs "
          f"({info['train_images']} training images, {info['wall_seconds']:.0f} s); {args.out}/baseline.pt, baseline.json")  # fmt: skip


def cmd_compare_heads(args: argparse.Namespace) -> None:
    from ..features.store import FeatureKey, FeatureStore
    from ..precision import resolve_device
    from ..studies.heads import compare_heads, markdown_table

    if getattr(args, "block", None) is None:
        raise DiffprobeError("compare-heads needs --blocks: the stored block (or module path) the heads read")
    store = FeatureStore.open(args.store)
    key = FeatureKey(store.only_timestep() if args.t is None else args.t, args.block, args.pool)
    rows = compare_heads(store, key, args.out, args.head, args.recipe, args.fusion_t,
                         args.val_fraction, args.split_seed, args.seed, str(resolve_device(args.device)), args.report_share,
                         FeatureStore.open(args.test_store) if args.test_store else None)  # fmt: skip
    print(markdown_table(rows))
    print(f"report: {args.out}/heads.csv, heads.json, heads.png; one run directory per head and recipe")


def cmd_demo(args: argparse.Namespace) -> None:
    from ..studies.demo import HELD_OUT_IMAGES, TRAIN_IMAGES, run_demo
    from ..studies.sweep import describe_summary

    result = run_demo(open_data(args), args.out, args.checkpoint, limit=TRAIN_IMAGES if args.limit is None else args.limit,
                      held_out=HELD_OUT_IMAGES if args.held_out is None else args.held_out, blocks=args.blocks,
                      timesteps=args.t, head_epochs=args.head_epochs, samples=args.samples, test_data=open_test_data(args),
                      test_limit=args.test_limit, baseline_epochs=args.baseline_epochs, overwrite=args.overwrite)  # fmt: skip
    print(describe_summary(result["sweep"]))
    print(f"report: {args.out}/REPORT.md ({result['wall_seconds'] / 60:.1f} min)")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("sweep", help="blocks × timesteps × pools: extract, score each cell with a fast probe, heatmaps, controls")
    add_backbone_args(p)
    add_data_args(p)
    p.add_argument("--out", required=True, help="sweep directory (features/ store, sweep.csv, heatmaps, summary.json)")
    add_extract_args(p)
    add_fast_probe_args(p)
    add_test_data_args(p)
    p.add_argument("--head", action="append", default=[], choices=["linear", "mlp", "cnn", "attention"],
                   help="also train this head on the best setting (repeatable)")
    p.add_argument("--head-epochs", type=int, help="epochs for those heads (default: the modern recipe's 30)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("compare", help="several backbones (diffusion models and image encoders) on one dataset and one "
                       "split: one table, as the paper's Table 1")  # fmt: skip
    p.add_argument("backbones", nargs="+", help="backbone specs, each optionally SPEC@key=value,… (blocks=, t=, pool=, name=, and "
                   "load options such as weights=random or prompt=)")  # fmt: skip
    add_data_args(p)
    p.add_argument("--out", required=True, help="comparison folder: one sweep folder per backbone, compare.csv/.json/.md/.png")
    add_extract_args(p, blocks_required=False)
    add_fast_probe_args(p)
    add_test_data_args(p)
    p.add_argument("--heads", type=lambda s: [h for h in s.split(",") if h], default=["linear", "attention"],
                   help="heads trained on each backbone's chosen cell (comma-separated; empty: the fast probe only)")
    p.add_argument("--head-epochs", type=int, help="epochs for those heads (default: the modern recipe's)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("transfer", help="one backbone setting on several datasets: one table")
    add_backbone_args(p)
    p.add_argument("--datasets", type=lambda s: [d for d in s.split(",") if d], required=True,
                   help="comma-separated: folders, archives, torchvision:NAME")
    add_data_source_args(p)
    p.add_argument("--out", required=True, help='output folder')
    add_extract_args(p)
    add_fast_probe_args(p)
    p.add_argument("--test-split", help="report on each dataset's split of this name (e.g. test) instead of its held-out "
                   "report rows; every held-out row then selects")  # fmt: skip
    p.add_argument("--test-limit", type=int, help="a stratified subset of this many images of each test split (default: all)")
    p.set_defaults(func=cmd_transfer)

    p = sub.add_parser("cka", help="minibatch linear CKA between the features of two stores (or a store and itself)")
    p.add_argument("--a", required=True, help="feature store A")
    p.add_argument("--b", help="feature store B, or a model's blocks: baseline:DIR, torchvision:ARCH, timm:NAME or hf:ID_OR_FOLDER (default: A against itself)")
    p.add_argument("--b-weights", help="a model B's weights: a local file, 'hub' (timm's own), a torchvision weights name (IMAGENET1K_V1), "
                   "or leave out for random weights, said so (baseline:DIR and hf: folders bring their own)")
    p.add_argument("--b-pool", type=int, default=1, help="pool size for a model's block outputs")
    add_data_args(p, required=False, help="the dataset of store A (needed with a model as B)")
    p.add_argument("--a-keys", help="comma-separated settings of A, e.g. t0090_b24_p1 (default: all complete)")
    p.add_argument("--b-keys", help="settings of store B, or a model B's block names, e.g. layer3,layer4 or blocks.5 "
                   "(default: every complete setting, every block)")
    p.add_argument("--out", required=True, help='output folder')
    p.add_argument("--batch-size", type=int, default=1000, help="images per CKA minibatch (default: 1000)")
    p.add_argument("--forward-batch", type=int, default=64, help="images per forward pass of a --b model (its activations' memory; default: 64)")
    p.add_argument("--seed", type=int, default=0, help="order of rows in the minibatches")
    p.set_defaults(func=cmd_cka)

    p = sub.add_parser("baseline", help="supervised baselines to compare against")
    bsub = p.add_subparsers(dest="baseline_command", required=True, help="train: a supervised ResNet on the same images")
    p = bsub.add_parser("train", help="train a torchvision ResNet from scratch (CIFAR stem for small images)")
    add_data_args(p)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--stem", choices=("auto", "small", "standard"), default="auto",
                   help="small: 3×3 stride 1, no max-pool (4×4 maps at layer4 from 32 px); standard: torchvision's 7×7 stride 2 "
                        "and max-pool (16× cheaper at 32 px); auto: small up to 64 px")
    p.add_argument("--out", required=True, help='output folder')
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=4, help='training epochs')
    p.add_argument("--batch-size", type=int, default=128, help='images per step')
    p.add_argument("--lr", type=float, default=0.1, help='SGD learning rate')
    p.add_argument("--limit", type=int, help="a stratified subset of this many images")
    add_split_args(p, report=False)  # the held-out rows the baseline validates on (it chooses nothing)
    p.add_argument("--seed", type=int, default=0, help='initialisation and shuffling seed')
    p.add_argument("--device", default="auto", help='cpu, cuda, cuda:N, or auto (a GPU when there is one)')
    p.set_defaults(func=cmd_baseline_train)

    p = sub.add_parser("compare-heads", help="every head in the modern and paper recipes against logistic regression, same features and split")
    p.add_argument("store", help="a feature store (from extract or sweep)")
    p.add_argument("--out", required=True, help='output folder')
    p.add_argument("--t", type=int, help="the stored timestep the heads read (default: the store's one timestep)")
    p.add_argument("--blocks", dest="block", type=one_tap, help="the stored block number (or module path) the heads read (required)")
    deprecated(p, "--block", "--blocks", dest="block", type=one_tap)
    p.add_argument("--pool", type=int, required=True, help="the stored pool size; spatial heads want ≥ 2 (e.g. 4)")
    p.add_argument("--fusion-t", type=int, help="the fusion head's second timestep (same block and pool)")
    p.add_argument("--test-store", help="a store of test images no choice sees (same backbone; e.g. from extract --split "
                   "test, or extract --rows report), which then reports instead of the held-out report rows")  # fmt: skip
    p.add_argument("--head", type=lambda s: s.split(","), default=["linear", "mlp", "cnn", "attention", "fusion"],
                   help="comma-separated heads to compare (default: linear,mlp,cnn,attention,fusion)")
    p.add_argument("--recipe", type=lambda s: s.split(","), default=["modern", "paper"],
                   help="comma-separated training recipes, each head trained with each (default: modern,paper)")
    p.add_argument("--seed", type=int, default=0, help='initialisation and shuffling seed')
    p.add_argument("--device", default="auto", help='cpu, cuda, cuda:N, or auto (a GPU when there is one)')
    add_split_args(p)
    p.set_defaults(func=cmd_compare_heads)

    p = sub.add_parser("demo", help="the paper's pipeline on CIFAR-10 with the shipped checkpoint: sweep, controls, heads, samples, REPORT.md")
    add_data_args(p)
    p.add_argument("--out", required=True, help='output folder')
    p.add_argument("--checkpoint", help="an ADM checkpoint with its .json flags (default: the shipped CIFAR-10 one)")
    p.add_argument("--limit", type=int, help="training images used (a stratified subset; default 1500)")
    p.add_argument("--held-out", type=int, help="held-out images used (a stratified subset, half selecting and half "
                   "reporting; default 600)")  # fmt: skip
    p.add_argument("--blocks", type=int_list, default=[8, 13, 18, 20], help="default: encoder 8×8, bottleneck, decoder 8×8 and 16×16")
    p.add_argument("--t", type=int_list, default=[10, 100], help="timesteps (the fusion head fuses the best block at two)")
    p.add_argument("--head-epochs", type=int, help="one epoch count for every head (default: each head's demo setting)")
    p.add_argument("--samples", type=int, default=16, help="DDIM samples in the grid")
    p.add_argument("--baseline-epochs", type=int, help="epochs of the supervised ResNet-18 set beside the "
                   "diffusion features (default 20; 0: leave it out)")  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="discard the feature stores already at --out (another checkpoint's) and start again")
    add_test_data_args(p)
    p.set_defaults(func=cmd_demo)


"""The `diffprobe` command: parses arguments and calls the library; no logic of its own."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Any, Sequence

from .errors import DiffprobeError

log = logging.getLogger("diffprobe")


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _blocks(text: str) -> list[int] | str:
    return "all" if text.strip().lower() == "all" else _int_list(text)


def parse_model_options(model_flags: str | None, options: Sequence[str], preset: str | None) -> dict[str, Any]:
    """`--model-flags="--image_size 64 --num_channels 192"` (guided-diffusion's own spelling)
    and `-o key=value` pairs become keyword options of load_backbone."""
    out: dict[str, Any] = {}
    if model_flags:
        words = shlex.split(model_flags)
        if len(words) % 2:
            raise DiffprobeError(f"--model-flags must be '--name value' pairs, got {model_flags!r}")
        for name, value in zip(words[::2], words[1::2]):
            if not name.startswith("--"):
                raise DiffprobeError(f"--model-flags: expected --name before {value!r}, got {name!r}")
            out[name[2:]] = value
    for item in options:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise DiffprobeError(f"-o {item!r}: expected key=value")
        out[key] = value
    if preset:
        out["preset"] = preset
    return out


def _add_backbone_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("spec", help="adm:PATH.pt | adm:random | diffusers:FOLDER_OR_HUB_ID")
    p.add_argument("--preset", help="ADM preset (e.g. 256x256_diffusion_uncond); see `diffprobe presets`")
    p.add_argument("--model-flags", help='guided-diffusion flags as on its command line: --model-flags="--image_size 64 --num_channels 192"')
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE", help="one backbone option (repeatable)")
    p.add_argument("--prompt", help="Stable Diffusion models: the prompt the U-Net reads (default: the empty prompt)")
    p.add_argument("--image-size", type=int, help="latent models: pixel size to read at (default: the pipeline's; a multiple of the VAE factor)")


def _load_backbone(args: argparse.Namespace):
    from .backbones import load_backbone

    options = parse_model_options(args.model_flags, args.option, args.preset)
    for name in ("prompt", "image_size"):  # shorthands for -o prompt=... / -o image_size=...
        if getattr(args, name, None) is not None:
            options[name] = getattr(args, name)
    return load_backbone(args.spec, **options)


def cmd_blocks(args: argparse.Namespace) -> None:
    backbone = _load_backbone(args)
    rows = backbone.block_table()
    if args.json:
        print(json.dumps({"source": backbone.source, "image_size": backbone.image_size, "model_shape": list(backbone.model_shape),
                          "blocks": rows}, indent=1))  # fmt: skip
        return
    c, h, w = backbone.model_shape
    space = f", noised as {c}×{h}×{w} latents (channels and resolution below are latent-space)" if backbone.encodes_images else ""
    print(f"{backbone.source}: {backbone.family}, {backbone.image_size}×{backbone.image_size} input{space}, "
          f"schedule {backbone.schedule.name}, {backbone.conditioning}")  # fmt: skip
    print(f"{'block':>5}  {'module':<28} {'channels':>8}  {'resolution':>10}")
    for r in rows:
        print(f"{r['index']:>5}  {r['name']:<28} {r['channels']:>8}  {r['resolution']:>7}×{r['resolution']}")


def cmd_presets(args: argparse.Namespace) -> None:
    from .backbones.adm_config import PRESETS

    for name, flags in PRESETS.items():
        print(f"{name}: " + " ".join(f"--{k} {v}" for k, v in flags.items()))


def cmd_extract(args: argparse.Namespace) -> None:
    from .features.extract import extract

    backbone = _load_backbone(args)
    data = _open_data(args)
    options = _extract_options(args)
    log.info("%s on %s (%d images, %d classes), %s", backbone.source, data.name, len(data), len(data.classes), options["compute"].describe())
    store = extract(backbone, data, args.out, args.t, args.blocks, args.pool, **options)
    summary = store.summary()
    print(f"store {summary['root']}: {summary['rows']} rows, {len(summary['complete'])} complete arrays"
          + (f", {len(summary['incomplete'])} incomplete" if summary["incomplete"] else ""))  # fmt: skip


def cmd_store(args: argparse.Namespace) -> None:
    from .features.store import FeatureStore

    store = FeatureStore.open(args.store)
    m = store.manifest
    info = {"backbone": m["backbone"]["source"], "fingerprint": m["backbone"]["fingerprint"], "data": m["data"]["name"],
            "noise": m["noise"], "dtype": m["dtype"], "precision": m["precision"], **store.summary()}  # fmt: skip
    print(json.dumps(info, indent=1))


def _add_data_source_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-root", help="where torchvision datasets live (default: the diffprobe cache)")
    p.add_argument("--split", default="train", help="dataset split (torchvision) or sub-folder (archives); default train")
    p.add_argument("--download", action="store_true", help="let torchvision download the dataset (needs internet)")


def _add_data_args(p: argparse.ArgumentParser, required: bool = True, help: str = "") -> None:
    p.add_argument("--data", required=required, help=help or "ImageFolder dir, .tar/.tar.gz of one, or torchvision:NAME")
    _add_data_source_args(p)


def _add_extract_args(p: argparse.ArgumentParser, blocks_required: bool = True) -> None:
    p.add_argument("--blocks", type=_blocks, required=blocks_required, help="comma-separated block numbers, or all")
    p.add_argument("--t", type=_int_list, required=True, help="comma-separated timesteps, e.g. 90,150")
    p.add_argument("--pool", type=_int_list, default=[1], help="pooled grid sizes p (p×p), e.g. 1,2; default 1")
    p.add_argument("--seed", type=int, default=0, help="noise seed: ε depends on (seed, image index, draw) only")
    p.add_argument("--draws", type=int, default=1, help="average features over this many noise draws")
    p.add_argument("--limit", type=int, help="a stratified subset of this many images")
    p.add_argument("--subset-seed", type=int, default=0)
    p.add_argument("--class-label", type=int, help="class to condition on (class-conditional models only)")
    p.add_argument("--batch-size", type=int, default=64, help="images per pass; also the store's chunk size")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="stored feature dtype")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"])
    p.add_argument("--compile", default="auto", choices=["auto", "on", "off"], help="torch.compile the U-Net (auto: on for CUDA)")
    p.add_argument("--workers", type=int, help="DataLoader worker processes (default: 0 on CPU, where the U-Net needs every core; 8 on GPUs)")
    p.add_argument("--rank", type=int, default=int(os.environ.get("RANK", 0)),
                   help="this process's share of the chunks (default: $RANK, as torchrun sets it)")
    p.add_argument("--world-size", type=int, default=int(os.environ.get("WORLD_SIZE", 1)), help="default: $WORLD_SIZE")
    p.add_argument("--overwrite", action="store_true", help="discard an existing store at --out")
    p.add_argument("--augment-views", type=int, default=0,
                   help="store K random-resized-crop + flip views per image instead of the centre crop (for probe --augmented-store)")
    p.add_argument("--augment-seed", type=int, default=0)


def _add_fast_probe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--probe", default="logreg", choices=["logreg", "knn"], help="fast probe scoring each setting")
    p.add_argument("--val-fraction", type=float, default=0.1, help="stratified validation share of the rows")
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--no-controls", action="store_true", help="skip the pixels and random-weights controls")


def _extract_options(args: argparse.Namespace) -> dict[str, Any]:
    from .precision import choose_compute

    switch = {"auto": "auto", "on": True, "off": False}
    compute = choose_compute(args.device, args.precision, switch[args.channels_last], switch[args.compile])
    return dict(
        seed=args.seed, draws=args.draws, batch_size=args.batch_size, dtype=args.dtype, compute=compute,
        limit=args.limit, subset_seed=args.subset_seed, cond_class=args.class_label,
        rank=args.rank, world_size=args.world_size, overwrite=args.overwrite,
        augment_views=args.augment_views, augment_seed=args.augment_seed,
        workers=args.workers if args.workers is not None else (0 if compute.device.type == "cpu" else 8),
    )  # fmt: skip


def _open_data(args: argparse.Namespace):
    from .data import open_dataset

    return open_dataset(args.data, root=args.data_root, split=args.split, download=args.download)


def cmd_sweep(args: argparse.Namespace) -> None:
    from .studies.sweep import describe_summary, sweep

    backbone = _load_backbone(args)
    data = _open_data(args)
    options = _extract_options(args)
    summary = sweep(backbone, data, args.out, args.t, args.blocks, args.pool, probe=args.probe,
                    val_fraction=args.val_fraction, split_seed=args.split_seed, controls=not args.no_controls,
                    probe_device=str(options["compute"].device),
                    train_heads=args.head, head_epochs=args.head_epochs, **options)  # fmt: skip
    print(describe_summary(summary))
    print(f"report: {args.out}/sweep.csv, {args.out}/heatmap_pool*.png, {args.out}/summary.json")


def _float_list(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def cmd_probe(args: argparse.Namespace) -> None:
    from .probing.train import probe
    from .features.store import FeatureKey, FeatureStore

    store = FeatureStore.open(args.store)
    keys = [FeatureKey(t, b, p) for b in args.block for t in args.t for p in args.pool]
    head_options: dict[str, Any] = {}
    if args.head == "linear":
        head_options["batchnorm"] = args.batchnorm
    elif args.head == "mlp":
        head_options["hidden"] = args.hidden
    elif args.head == "cnn":
        head_options["width"] = args.width
    else:
        head_options.update(width=args.width, depth=args.depth, heads=args.heads)
    test_store = FeatureStore.open(args.test_store) if args.test_store else None
    augmented = FeatureStore.open(args.augmented_store) if args.augmented_store else None
    import torch

    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    metrics = probe(store, keys, args.out, args.head, args.recipe, args.wd, args.epochs, args.lr, args.val_fraction,
                    args.split_seed, args.seed, head_options, test_store, device, augmented=augmented)  # fmt: skip
    line = f"{args.head} head: validation top-1 {metrics['val']['top1']:.2f}% top-5 {metrics['val']['top5']:.2f}%"
    line += f" (epoch {metrics['chosen']['epoch']}, weight decay {metrics['chosen']['weight_decay']:g})"
    if "test" in metrics:
        line += f"; test top-1 {metrics['test']['top1']:.2f}%"
    print(line)
    print(f"run: {args.out}/config.json, head.pt, metrics.json, curves.png, confusion.png")


def cmd_predict(args: argparse.Namespace) -> None:
    from .probing.predict import Predictor

    results = Predictor(args.run, args.device).predict(args.images, args.top_k)
    if args.json:
        print(json.dumps(results, indent=1))
        return
    for r in results:
        print(r["image"] + ": " + ", ".join(f"{t['label']} {t['probability']:.3f}" for t in r["top"]))


def cmd_transfer(args: argparse.Namespace) -> None:
    from .features.store import FeatureKey
    from .studies.transfer import transfer

    backbone = _load_backbone(args)
    options = _extract_options(args)
    if len(args.t) != 1 or len(args.blocks) != 1 or len(args.pool) != 1:
        raise DiffprobeError("transfer takes one setting: a single --t, --blocks and --pool")
    key = FeatureKey(args.t[0], args.blocks[0], args.pool[0])
    rows = transfer(backbone, args.datasets, args.out, key, args.probe, args.val_fraction, args.split_seed,
                    args.data_root, args.download, args.split,
                    str(options["compute"].device), not args.no_controls, **options)  # fmt: skip
    for r in rows:
        ctrl = f"  (pixels {r['pixels_top1']:.2f}%, random weights {r['random_weights_top1']:.2f}%)" if "pixels_top1" in r else ""
        print(f"{r['dataset']:<24} {r['images']:>7} images {r['classes']:>4} classes  top-1 {r['top1']:6.2f}%{ctrl}")
    print(f"table: {args.out}/transfer.csv, {args.out}/transfer.md")


def _store_keys(store, text: str | None):
    from .features.store import FeatureKey

    if not text:
        keys = store.complete_keys()
        if not keys:
            raise DiffprobeError(f"{store.root} holds no complete features")
        return keys
    keys = [FeatureKey.parse(stem) for stem in text.split(",") if stem]
    missing = [k.stem for k in keys if not store.is_complete(k)]
    if missing:
        raise DiffprobeError(f"{store.root} has no complete {', '.join(missing)} (complete: {', '.join(k.stem for k in store.complete_keys())})")
    return keys


def cmd_cka(args: argparse.Namespace) -> None:
    from .studies.cka import source_cka, store_cka
    from ._io import write_csv
    from .report import heatmap, short_source
    from .features.store import FeatureStore

    store_a = FeatureStore.open(args.a)
    keys_a = _store_keys(store_a, args.a_keys)
    name_a = short_source(store_a.manifest["backbone"]["source"])
    if args.b and args.b.startswith(("baseline:", "torchvision:", "timm:")):
        from .studies.baseline import ModelSource

        if not args.data:
            raise DiffprobeError("comparing with a model needs --data: the dataset the store was extracted from")
        source = ModelSource(args.b, weights=args.b_weights, pool=args.b_pool)
        log.info("B: %s", source.description)
        matrix = source_cka(store_a, keys_a, _open_data(args), source, args.batch_size, args.seed)
        labels_b, name_b = source.stages, source.description
    else:
        store_b = FeatureStore.open(args.b) if args.b else store_a
        keys_b = _store_keys(store_b, args.b_keys if args.b else (args.b_keys or args.a_keys))
        matrix = store_cka(store_a, keys_a, store_b, keys_b, args.batch_size, args.seed)
        labels_b = [k.stem for k in keys_b]
        name_b = short_source(store_b.manifest["backbone"]["source"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "cka.csv", [{"a": ka.stem, **{b: round(float(v), 6) for b, v in zip(labels_b, row)}} for ka, row in zip(keys_a, matrix)])
    heatmap(out / "cka.png", matrix * 100, [k.stem for k in keys_a], labels_b,
            f"linear CKA ×100 (minibatch, {store_a.rows} images)", xlabel=f"B: {name_b}", ylabel=f"A: {name_a}",
            colorbar="CKA ×100")  # fmt: skip
    print(f"CKA of {len(keys_a)} × {len(labels_b)} feature sets over {store_a.rows} images (B: {name_b}): {out}/cka.csv, {out}/cka.png")


def cmd_baseline_train(args: argparse.Namespace) -> None:
    from .studies.baseline import train_baseline

    info = train_baseline(_open_data(args), args.out, args.arch, args.image_size, args.epochs, args.batch_size, args.lr,
                          limit=args.limit, val_fraction=args.val_fraction, split_seed=args.split_seed, seed=args.seed,
                          device=args.device)  # fmt: skip
    print(f"{info['arch']} on {info['data']}: validation top-1 {info['val_top1']:.2f}% after {info['epochs']} epochs "
          f"({info['train_images']} training images, {info['wall_seconds']:.0f} s); {args.out}/baseline.pt, baseline.json")  # fmt: skip


# The default training architecture: DDPM's CIFAR-10 U-Net layout (channel_mult 1,2,2,2, attention at
# 16×16, dropout 0.1) in ADM's flags, narrower by default so it trains on a CPU.
DEFAULT_PRETRAIN_FLAGS = {
    "image_size": 32, "num_channels": 64, "channel_mult": "1,2,2,2", "num_res_blocks": 2,
    "attention_resolutions": "16", "num_head_channels": 32, "dropout": 0.1, "use_scale_shift_norm": True,
    "resblock_updown": False, "learn_sigma": False, "noise_schedule": "linear", "diffusion_steps": 1000,
}  # fmt: skip


def cmd_pretrain(args: argparse.Namespace) -> None:
    from .generate.pretrain import pretrain

    flags = {**DEFAULT_PRETRAIN_FLAGS, **parse_model_options(args.model_flags, args.option, None)}
    settings = dict(batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup, weight_decay=args.weight_decay,
                    grad_clip=args.grad_clip, ema_decay=args.ema_decay, hflip=not args.no_flip, seed=args.seed,
                    holdout_fraction=args.holdout_fraction, holdout_seed=args.holdout_seed)  # fmt: skip
    from .precision import choose_compute

    device = str(choose_compute(args.device).device)  # "auto" resolved; a missing GPU is a clear error
    switch = {"auto": None, "on": True, "off": False}
    trainer = pretrain(_open_data(args), args.out, flags, args.steps, save_every=args.save_every, device=device,
                       precision=args.precision, channels_last=switch[args.channels_last], **settings)  # fmt: skip
    print(f"step {trainer.state.step}: {args.out}/ema.pt (EMA weights; load with adm:{args.out}/ema.pt), "
          f"{args.out}/model.pt, loss.csv, loss.png")


def cmd_sample(args: argparse.Namespace) -> None:
    from .precision import choose_compute
    from .generate.sample import sample_images, save_samples

    backbone = _load_backbone(args)
    compute = choose_compute(args.device, args.precision, "auto", False)
    compute.prepare(backbone)  # the whole backbone: a latent model's VAE moves and casts with its denoiser
    steps = args.steps or (backbone.schedule.num_timesteps if args.sampler == "ddpm" else 100)
    images = sample_images(backbone, args.num, args.sampler, steps, args.seed, args.batch_size, args.eta, compute)
    info = {"source": backbone.source, "sampler": args.sampler, "steps": steps, "eta": args.eta, "seed": args.seed,
            "batch_size": args.batch_size, "num": args.num, "precision": compute.describe()}  # fmt: skip
    files = save_samples(images, args.out, info)
    print(f"{args.num} samples ({args.sampler}, {steps} steps): {files['grid']}, {files['npz']}")


def cmd_fid(args: argparse.Namespace) -> None:
    import numpy as np

    from .data import open_dataset, stratified_subset
    from .generate.fid import compute_fid, dataset_batches, inception_fid, load_npz_images

    fake = load_npz_images(args.samples)
    metric = inception_fid(args.inception_weights)  # first: fail before reading images
    real = open_dataset(args.real, root=args.data_root, split=args.split, download=args.download)
    rows = stratified_subset(real.labels, args.real_limit, 0) if args.real_limit else np.arange(len(real))
    value = compute_fid(metric, fake, dataset_batches(real, rows, args.batch_size), len(rows), args.batch_size)
    result = {"fid": value, "samples": str(args.samples), "num_samples": len(fake), "real": str(args.real),
              "num_real": int(len(rows)), "inception_weights": args.inception_weights or "torch-fidelity download"}  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"FID {value:.2f} ({len(fake)} samples vs {len(rows)} real images of {args.real})")


def cmd_demo(args: argparse.Namespace) -> None:
    from .studies.demo import DEFAULT_CHECKPOINT, run_demo

    checkpoint = Path(args.checkpoint) if args.checkpoint else DEFAULT_CHECKPOINT
    if not checkpoint.is_file():
        raise DiffprobeError(f"checkpoint not found: {checkpoint}; pass --checkpoint PATH.pt (an ADM checkpoint with its PATH.json flags, e.g. from diffprobe export)")
    result = run_demo(_open_data(args), args.out, checkpoint, limit=args.limit, blocks=args.blocks, timesteps=args.t,
                      pools=args.pool, head_epochs=args.head_epochs, samples=args.samples)  # fmt: skip
    from .studies.sweep import describe_summary

    print(describe_summary(result["sweep"]))
    print(f"report: {args.out}/REPORT.md ({result['wall_seconds'] / 60:.1f} min)")


def cmd_export(args: argparse.Namespace) -> None:
    from .generate.card import export_run

    notes = Path(args.notes).read_text() if args.notes else ""
    card = export_run(args.run, args.out, _open_data(args), limit=args.limit, blocks=args.blocks, timesteps=args.t,
                      pools=args.pool, hardware=args.hardware, notes=notes)  # fmt: skip
    for key, value in card["facts"].items():
        print(f"{key}: {value}")
    print(f"model card: {args.out}/MODEL_CARD.md")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffprobe", description="Diffusion U-Nets as image classifiers: extract and probe block features.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("blocks", help="print a backbone's block table (paper numbering for ADM)")
    _add_backbone_args(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_blocks)

    p = sub.add_parser("presets", help="list the ADM presets (released guided-diffusion checkpoints)")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("extract", help="extract pooled block features into a resumable store")
    _add_backbone_args(p)
    _add_data_args(p)
    p.add_argument("--out", required=True, help="feature store directory")
    _add_extract_args(p)
    p.set_defaults(func=cmd_extract)

    p = sub.add_parser("sweep", help="blocks × timesteps × pools: extract, score each cell with a fast probe, heatmaps, controls")
    _add_backbone_args(p)
    _add_data_args(p)
    p.add_argument("--out", required=True, help="sweep directory (features/ store, sweep.csv, heatmaps, summary.json)")
    _add_extract_args(p)
    _add_fast_probe_args(p)
    p.add_argument("--head", action="append", default=[], choices=["linear", "mlp", "cnn", "attention"],
                   help="also train this head on the best setting (repeatable)")
    p.add_argument("--head-epochs", type=int, help="epochs for those heads (default: the modern recipe's 30)")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("transfer", help="one backbone setting on several datasets: one table")
    _add_backbone_args(p)
    p.add_argument("--datasets", type=lambda s: [d for d in s.split(",") if d], required=True,
                   help="comma-separated: folders, archives, torchvision:NAME")
    _add_data_source_args(p)
    p.add_argument("--out", required=True)
    _add_extract_args(p)
    _add_fast_probe_args(p)
    p.set_defaults(func=cmd_transfer)

    p = sub.add_parser("probe", help="train a head on stored features; choose epoch and weight decay on validation")
    p.add_argument("store", help="feature store directory (from extract or sweep/features)")
    p.add_argument("--t", type=_int_list, required=True, help="timestep(s); several only with --head fusion")
    p.add_argument("--block", type=_int_list, required=True, help="block(s); several only with --head fusion")
    p.add_argument("--pool", type=_int_list, default=[1], help="pool size(s)")
    p.add_argument("--head", default="linear", choices=["linear", "mlp", "cnn", "attention", "fusion"])
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--recipe", default="modern", choices=["modern", "paper"], help="modern: AdamW + cosine; paper: SGD, ×0.1 every 7 of 28 epochs")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--lr", type=float, help="override the recipe's learning rate")
    p.add_argument("--wd", type=_float_list, default=[1e-4], help="weight decay(s); several are tried, the best on validation kept")
    p.add_argument("--batchnorm", action="store_true", help="linear head: BatchNorm without affine first (MAE's probe)")
    p.add_argument("--hidden", type=_int_list, default=[1024], help="MLP hidden sizes")
    p.add_argument("--width", type=int, default=256, help="CNN/attention width")
    p.add_argument("--depth", type=int, default=2, help="attention: transformer blocks")
    p.add_argument("--heads", type=int, default=8, help="attention: heads")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0, help="initialisation and shuffling seed: same seed, same numbers")
    p.add_argument("--test-store", help="a store of held-out test images made with the same backbone")
    p.add_argument("--augmented-store", help="a store of cached augmented views (extract --augment-views K) to train on")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("predict", help="classify images with a saved probe run")
    p.add_argument("run", help="run directory written by `diffprobe probe`")
    p.add_argument("images", nargs="+", help="image files (any size or mode)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("cka", help="minibatch linear CKA between the features of two stores (or a store and itself)")
    p.add_argument("--a", required=True, help="feature store A")
    p.add_argument("--b", help="feature store B, baseline:DIR, torchvision:ARCH or timm:NAME (default: A against itself)")
    p.add_argument("--b-weights", help="torchvision:ARCH weights: a local state_dict file or a torchvision weights name (else random, and said so)")
    p.add_argument("--b-pool", type=int, default=1, help="pool size for a model's stage outputs")
    _add_data_args(p, required=False, help="the dataset of store A (needed with a model as B)")
    p.add_argument("--a-keys", help="comma-separated settings of A, e.g. t0090_b24_p1 (default: all complete)")
    p.add_argument("--b-keys", help="settings of B (default: all complete)")
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--seed", type=int, default=0, help="order of rows in the minibatches")
    p.set_defaults(func=cmd_cka)

    p = sub.add_parser("baseline", help="supervised baselines to compare against")
    bsub = p.add_subparsers(dest="baseline_command", required=True)
    p = bsub.add_parser("train", help="train a torchvision ResNet from scratch (CIFAR stem for small images)")
    _add_data_args(p)
    p.add_argument("--arch", default="resnet18")
    p.add_argument("--out", required=True)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--limit", type=int, help="a stratified subset of this many images")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--split-seed", type=int, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=cmd_baseline_train)

    p = sub.add_parser("pretrain", help="train an ADM denoiser (ε-prediction, EMA) that `adm:RUN/ema.pt` loads; resumes")
    _add_data_args(p)
    p.add_argument("--out", required=True, help="run folder: training-state.pt, ema.pt + ema.json, model.pt, loss.csv/png")
    p.add_argument("--steps", type=int, required=True, help="total optimiser steps (rerun with more to continue)")
    p.add_argument("--model-flags", help='guided-diffusion flags over the default CIFAR layout, e.g. --model-flags="--num_channels 128"')
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE", help="one guided-diffusion flag (repeatable)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--warmup", type=int, default=500, help="linear learning-rate warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay (warmed up as (1+n)/(10+n))")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--holdout-fraction", type=float, default=0.1, help="stratified validation split left out of training")
    p.add_argument("--holdout-seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (also on SIGTERM / Ctrl-C)")
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="autocast dtype (auto: bf16 on CPU and bf16-capable GPUs)")
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"], help="auto: off (slower for training on the CPUs measured)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sample", help="generate images (DDPM or DDIM via diffusers schedulers): PNG grid + .npz")
    _add_backbone_args(p)
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, default=64)
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm"])
    p.add_argument("--steps", type=int, help="DDIM steps (default 100); DDPM always uses all of the schedule's")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM η (0: deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("fid", help="FID of samples (.npz) against real images (torchmetrics / torch-fidelity Inception)")
    p.add_argument("samples", help="samples.npz from `diffprobe sample` (or guided-diffusion's arr_0 format)")
    p.add_argument("--real", required=True, help="real images: ImageFolder, .tar(.gz), or torchvision:NAME")
    _add_data_source_args(p)
    p.add_argument("--real-limit", type=int, help="a stratified subset of this many real images")
    p.add_argument("--inception-weights", help="TF-FID Inception weights file (pt_inception-2015-12-05); default: download")
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--out", help="write the result as JSON here")
    p.set_defaults(func=cmd_fid)

    p = sub.add_parser("demo", help="the paper's pipeline on CIFAR-10 with the shipped checkpoint: sweep, controls, heads, samples, REPORT.md")
    _add_data_args(p)
    p.add_argument("--out", required=True)
    p.add_argument("--checkpoint", help="an ADM checkpoint with its .json flags (default: the shipped CIFAR-10 one)")
    p.add_argument("--limit", type=int, default=6000, help="images used (a stratified subset)")
    p.add_argument("--blocks", type=_int_list, default=[8, 13, 18, 20], help="default: encoder 8×8, bottleneck, decoder 8×8 and 16×16")
    p.add_argument("--t", type=_int_list, default=[10, 50, 150])
    p.add_argument("--pool", type=_int_list, default=[1, 2])
    p.add_argument("--head-epochs", type=int, default=20)
    p.add_argument("--samples", type=int, default=64)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="a pretrain run -> a checkpoint folder with model card (probes, samples, loss curve)")
    p.add_argument("run", help="the pretrain --out folder")
    _add_data_args(p, help="the dataset it was trained on (its validation split is probed)")
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, help="probe on a stratified subset of this many images (default: all)")
    p.add_argument("--blocks", type=_int_list, default=[4, 8, 13, 16, 18, 20])
    p.add_argument("--t", type=_int_list, default=[10, 50, 150])
    p.add_argument("--pool", type=_int_list, default=[1, 2])
    p.add_argument("--hardware", help="what it was trained on (default: this machine's CPU)")
    p.add_argument("--notes", help="a Markdown file appended to the card")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("store", help="describe a feature store")
    p.add_argument("store")
    p.set_defaults(func=cmd_store)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="diffprobe: %(message)s")
    try:
        args.func(args)
    except DiffprobeError as e:
        print(f"diffprobe: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("diffprobe: interrupted; finished work is kept, rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Commands of the generative side: pretrain, sample, fid, export."""

from __future__ import annotations

import argparse

from .common import SWITCH, add_backbone_args, add_data_args, add_data_source_args, add_split_args, deprecated, int_list, load_backbone_from, open_data, parse_model_options


def cmd_pretrain(args: argparse.Namespace) -> None:
    from ..generate.pretrain import DEFAULT_PRETRAIN_FLAGS, pretrain

    flags = parse_model_options(args.model_flags, args.option, None)  # over the defaults, or a warm start's checkpoint flags
    settings = dict(batch_size=args.batch_size, lr=args.lr, warmup_steps=args.warmup, weight_decay=args.weight_decay,
                    grad_clip=args.grad_clip, ema_decay=args.ema_decay, hflip=not args.no_flip, seed=args.seed,
                    val_fraction=args.val_fraction, split_seed=args.split_seed, loss_weighting=args.loss_weighting,
                    snr_gamma=args.snr_gamma)  # fmt: skip
    channels_last = None if args.channels_last == "auto" else SWITCH[args.channels_last]
    trainer = pretrain(open_data(args), args.out, flags, args.steps, save_every=args.save_every, device=args.device,
                       precision=args.precision, channels_last=channels_last, init_from=args.init_from,
                       defaults=DEFAULT_PRETRAIN_FLAGS, **settings)  # fmt: skip
    print(f"step {trainer.state.step}: {args.out}/ema.pt (EMA weights; load with adm:{args.out}/ema.pt), "
          f"{args.out}/model.pt, loss.csv, loss.png")


def cmd_sample(args: argparse.Namespace) -> None:
    from .._io import output_dir
    from ..generate.sample import default_sampler, sample_images, sampling_steps, save_samples
    from ..precision import choose_compute

    output_dir(args.out)  # before any work: an unusable --out is one clear line
    backbone = load_backbone_from(args)
    compute = choose_compute(args.device, args.precision, "auto", False)
    args.sampler = args.sampler or default_sampler(backbone)
    steps = sampling_steps(backbone, args.sampler, args.steps)
    images = sample_images(backbone, args.num, args.sampler, steps, args.seed, args.batch_size, args.eta, compute)
    info = {"source": backbone.source, "sampler": args.sampler, "steps": steps, "eta": args.eta, "seed": args.seed,
            "batch_size": args.batch_size, "num": args.num, "precision": compute.describe()}  # fmt: skip
    files = save_samples(images, args.out, info)
    print(f"{args.num} samples ({args.sampler}, {steps} steps): {files['grid']}, {files['npz']}")


def cmd_fid(args: argparse.Namespace) -> None:
    from ..generate.fid import fid_of_samples

    val_split = (args.val_fraction, args.split_seed) if args.val_only else None
    r = fid_of_samples(args.samples, open_data(args, args.real), args.real_limit, args.inception_weights, args.batch_size, args.out,
                       val_split)  # fmt: skip
    where = "the validation split of " if val_split else ""
    print(f"FID {r['fid']:.2f} ({r['num_samples']} samples vs {r['num_real']} real images of {where}{args.real})")


def cmd_export(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ..generate.card import export_run

    notes = Path(args.notes).read_text() if args.notes else ""
    card = export_run(args.run, args.out, open_data(args), limit=args.limit, blocks=args.blocks, timesteps=args.t,
                      pools=args.pool, samples=args.samples, hardware=args.hardware, notes=notes)  # fmt: skip
    for key, value in card["facts"].items():
        print(f"{key}: {value}")
    print(f"model card: {args.out}/MODEL_CARD.md")


def cmd_card(args: argparse.Namespace) -> None:
    from ..generate.card import refresh_card

    card = refresh_card(args.folder, demo=args.demo, fid=args.fid, probe=args.probe)
    for key, value in card["facts"].items():
        print(f"{key}: {value}")
    print(f"model card: {args.folder}/MODEL_CARD.md")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pretrain", help="train an ADM denoiser (ε-prediction, EMA) that `adm:RUN/ema.pt` loads; resumes, or warm-starts with --init-from")
    add_data_args(p)
    p.add_argument("--out", required=True, help="run folder: training-state.pt, ema.pt + ema.json, model.pt, loss.csv/png")
    p.add_argument("--steps", type=int, required=True, help="total optimiser steps (rerun with more to continue; "
                   "with --init-from, the checkpoint's steps count too)")
    p.add_argument("--init-from", metavar="FILE.pt", help="warm-start a new run from these weights (e.g. checkpoints/diffprobe-cifar10/ema.pt): "
                   "architecture from FILE.json, weights into model and EMA, step count continued, fresh optimiser. "
                   "Not an exact continuation (Adam moments and the EMA's history are lost); an --out with its own "
                   "training state resumes from that instead")
    p.add_argument("--model-flags", help='guided-diffusion flags over the default CIFAR layout, e.g. --model-flags="--num_channels 128"')
    p.add_argument("-o", "--option", action="append", default=[], metavar="KEY=VALUE", help="one guided-diffusion flag (repeatable)")
    p.add_argument("--batch-size", type=int, default=64, help='images per step')
    p.add_argument("--lr", type=float, default=2e-4, help='AdamW learning rate')
    p.add_argument("--warmup", type=int, default=500, help="linear learning-rate warm-up steps")
    p.add_argument("--weight-decay", type=float, default=0.0, help='AdamW weight decay')
    p.add_argument("--grad-clip", type=float, default=1.0, help='gradient norm clipping (0: off)')
    p.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay (warmed up as (1+n)/(10+n))")
    p.add_argument("--loss-weighting", default="uniform", choices=["uniform", "min-snr"],
                   help="uniform: the simple ε-MSE (DDPM); min-snr: per-sample weight min(SNR, γ)/SNR (Min-SNR-γ)")
    p.add_argument("--snr-gamma", type=float, default=5.0, help="γ of --loss-weighting min-snr")
    p.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    p.add_argument("--seed", type=int, default=0, help="initialisation and every random draw of training")
    add_split_args(p, report=False)  # the validation split left out of training: the one probes score on
    deprecated(p, "--holdout-fraction", "--val-fraction", dest="val_fraction", type=float)
    deprecated(p, "--holdout-seed", "--split-seed", dest="split_seed", type=int)
    p.add_argument("--save-every", type=int, default=500, help="checkpoint every N steps (also on SIGTERM / Ctrl-C)")
    p.add_argument("--device", default="auto", help='cpu, cuda, cuda:N, or auto (a GPU when there is one)')
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"], help="autocast dtype (auto: bf16 where the CPU or GPU runs it fast)")
    p.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"], help="auto: off (slower for training on the CPUs measured)")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("sample", help="generate images (DDPM or DDIM via diffusers schedulers): PNG grid + .npz")
    add_backbone_args(p)
    p.add_argument("--out", required=True, help='output folder')
    p.add_argument("--num", type=int, default=64, help='images to sample')
    p.add_argument("--sampler", choices=["ddim", "ddpm", "euler"], help="default: ddim, or euler for flow models (SD3, FLUX)")
    p.add_argument("--steps", type=int, help="DDIM steps (default 100); DDPM always uses all of the schedule's")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM η (0: deterministic)")
    p.add_argument("--seed", type=int, default=0, help="sampling noise seed")
    p.add_argument("--batch-size", type=int, default=64, help='images per step')
    p.add_argument("--device", default="auto", help='cpu, cuda, cuda:N, or auto (a GPU when there is one)')
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"], help='number format the denoiser runs in (auto: bf16 where fast, else fp32)')
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("fid", help="FID of samples (.npz) against real images (torchmetrics / torch-fidelity Inception)")
    p.add_argument("samples", help="samples.npz from `diffprobe sample` (or guided-diffusion's arr_0 format)")
    p.add_argument("--real", required=True, help="real images: ImageFolder, .tar(.gz), or torchvision:NAME")
    add_data_source_args(p)
    p.add_argument("--val-only", action="store_true", help="real images: only the validation split (--val-fraction, "
                   "--split-seed: the images pretrain leaves out; what a model card's FID uses)")
    add_split_args(p, report=False)
    p.add_argument("--real-limit", type=int, help="a stratified subset of this many real images (of the split)")
    p.add_argument("--inception-weights", help="TF-FID Inception weights file (torch-fidelity's weights-inception-2015-12-05-6726825d.pth); default: download")
    p.add_argument("--batch-size", type=int, default=100, help='images per Inception batch')
    p.add_argument("--out", help="write the result as JSON here")
    p.set_defaults(func=cmd_fid)

    p = sub.add_parser("export", help="a pretrain run -> a checkpoint folder with model card (probes, samples, loss curve)")
    p.add_argument("run", help="the pretrain --out folder")
    add_data_args(p, help="the dataset it was trained on (its validation split is probed)")
    p.add_argument("--out", required=True, help='output folder')
    p.add_argument("--limit", type=int, help="probe on a stratified subset of this many images (default: all)")
    p.add_argument("--blocks", type=int_list, default=[4, 8, 13, 16, 18, 20], help="blocks the exported card's probe sweep reads")
    p.add_argument("--t", type=int_list, default=[10, 50, 150], help="timesteps the card's probe sweep reads")
    p.add_argument("--pool", type=int_list, default=[1, 2], help="pool sizes the card's probe sweep reads")
    p.add_argument("--samples", type=int, default=64, help="DDIM samples (100 steps each) in the card's grid")
    p.add_argument("--hardware", help="what the run (since its warm start, if any) trained on (default: what it recorded)")
    p.add_argument("--notes", help="a Markdown file appended to the card")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("card", help="rewrite a checkpoint folder's model card from its card.json (no rerun), adding the "
                       "demo's attention head, a FID or a sweep's probe figures")
    p.add_argument("folder", help="a checkpoint folder from diffprobe export (card.json, ema.pt)")
    p.add_argument("--demo", help="runs/demo/demo.json of `diffprobe demo --checkpoint FOLDER/ema.pt`: its attention head's top-1")
    p.add_argument("--fid", help="the --out JSON of `diffprobe fid SAMPLES.npz --val-only` on samples of FOLDER/ema.pt")
    p.add_argument("--probe", help="the summary.json of `diffprobe sweep adm:FOLDER/ema.pt` (report rows, controls): the card's probe figures")
    p.set_defaults(func=cmd_card)

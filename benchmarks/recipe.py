"""Which pre-training recipe converges fastest per image seen: arms against a baseline, same run.

Every arm is diffprobe's own Trainer, started from the same weights (by default the shipped
checkpoint's EMA, a warm start as `pretrain --init-from` does; `--scratch` starts every arm from
the same random initialisation instead, which width arms need), trained on the same number of
images, then scored the same way:

- held-out ε-MSE: the plain (unweighted) denoising error on validation-split images, each at a
  fixed t spread over the schedule with fixed noise, so every arm answers the same questions;
- probe: logistic regression on pooled features of one block at one t (default t=10, block 20,
  pool 2: the shipped card's best cell), trained on training-split images and scored on
  validation-split images (the same images for every arm, so differences are paired).

Arms are `name:key=value,...` over the baseline's settings (PretrainConfig fields such as lr,
batch_size, ema_decay, loss_weighting, snr_gamma, warmup_images; or an architecture flag such as
num_channels, with --scratch). The baseline is also scored on its raw online weights, which shows
what the EMA gives at this horizon. Prints each arm's numbers and its difference from the baseline,
and writes them to --out as JSON/CSV.

    python benchmarks/recipe.py --data ../shared/data/cifar10-train.tar.gz               # default arms, 6,400 images each
    python benchmarks/recipe.py --data ... --images 12800 --arms "lr 1e-3:lr=1e-3" "min-snr:loss_weighting=min-snr"
    python benchmarks/recipe.py --data ... --scratch --images 25600 --arms "32 channels:num_channels=32"

Convergence is slow on a CPU: each arm of 6,400 images takes ~5 minutes on 2 cores (bf16). This is
a study, not a speed benchmark, so `make bench` does not run it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch

from diffprobe import FeaturePlan, featurize, load_backbone
from diffprobe._io import write_csv
from diffprobe.backbones.adm_config import normalize_flags
from diffprobe.data import images_uint8, open_dataset, stratified_split, stratified_subset, to_model_range
from diffprobe.generate.pretrain import DEFAULT_PRETRAIN_FLAGS, PretrainConfig, Trainer, WarmStart, export_weights, training_rows
from diffprobe.probing.fastprobe import logistic_regression
from machine import add_machine_args, announce

DEFAULT_ARMS = ["lr 5e-4:lr=5e-4", "lr 1e-3:lr=1e-3", "batch 32:batch_size=32", "min-SNR γ=5:loss_weighting=min-snr"]
CONFIG_FIELDS = {f.name: f.type for f in fields(PretrainConfig)}


def parse_arm(spec: str) -> tuple[str, dict[str, str]]:
    name, _, settings = spec.partition(":")
    pairs = [s.split("=", 1) for s in settings.split(",") if s.strip()]
    if not name or any(len(p) != 2 for p in pairs):
        raise SystemExit(f"arm {spec!r}: expected 'name:key=value,...'")
    return name.strip(), {k.strip(): v.strip() for k, v in pairs}


def arm_setup(base: PretrainConfig, settings: dict[str, str], scratch: bool) -> tuple[PretrainConfig, int]:
    """The arm's config and its warm-up in images (warm-up is given in images so batch arms match)."""
    changes, flags, warmup_images = {}, dict(base.flags), None
    for key, value in settings.items():
        if key == "warmup_images":
            warmup_images = int(value)
        elif key in CONFIG_FIELDS and key not in ("flags", "init_from"):
            default = getattr(base, key)
            changes[key] = type(default)(value) if not isinstance(default, bool) else value.lower() in ("1", "true", "yes")
        elif key in normalize_flags(flags):
            if not scratch:
                raise SystemExit(f"{key}={value} changes the architecture: warm-started arms share one network; pass --scratch")
            flags[key] = value
        else:
            raise SystemExit(f"unknown setting {key!r}: a PretrainConfig field, warmup_images, or a guided-diffusion flag")
    return replace(base, flags=flags, **changes), warmup_images


def heldout_mse(model: torch.nn.Module, trainer: Trainer, x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> float:
    """Unweighted ε-MSE of `model` on fixed (x0, t, ε); eval mode, the trainer's precision."""
    model.eval()
    errors = []
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=trainer.precision == "bf16"):
        for i in range(0, len(x0), 128):
            x_t = trainer.schedule.q_sample(x0[i : i + 128], t[i : i + 128], eps[i : i + 128])
            out = model(x_t.to(trainer.device), t[i : i + 128].to(trainer.device)).float()
            errors.append((out[:, :3].cpu() - eps[i : i + 128]).square().mean(dim=(1, 2, 3)))
    model.train()
    return float(torch.cat(errors).mean())


def probe_accuracy(model: torch.nn.Module, flags: dict, probe: dict, plan: FeaturePlan, tmp: Path, tag: str) -> float:
    """Logistic-regression top-1 of the model's pooled features (exported and loaded as `adm:` like any checkpoint)."""
    path = tmp / f"{tag}.pt"
    export_weights(model, flags, path, 0)
    backbone = load_backbone(f"adm:{path}")
    feats = {}
    for split in ("train", "val"):
        x, idx = probe[split]
        chunks = [featurize(backbone, x[i : i + 128], plan, idx[i : i + 128]) for i in range(0, len(x), 128)]
        key = next(iter(chunks[0]))
        feats[split] = torch.cat([c[key] for c in chunks]).float().cpu().numpy()  # featurize runs on the GPU when there is one
    score, _ = logistic_regression(feats["train"], probe["train_y"], feats["val"], probe["val_y"])
    return score.top1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="the training data (ImageFolder, .tar.gz, torchvision:NAME)")
    parser.add_argument("--init-from", default="checkpoints/diffprobe-cifar10/ema.pt", help="weights every arm starts from")
    parser.add_argument("--scratch", action="store_true", help="start every arm from the same random initialisation instead")
    parser.add_argument("--arms", nargs="*", default=DEFAULT_ARMS, help="name:key=value,... (see above)")
    parser.add_argument("--images", type=int, default=6400, help="images each arm trains on")
    parser.add_argument("--batch-size", type=int, default=64, help="the baseline's batch")
    parser.add_argument("--lr", type=float, default=2e-4, help="the baseline's learning rate")
    parser.add_argument("--warmup-images", type=int, default=1280, help="learning-rate warm-up, in images")
    parser.add_argument("--probe-train", type=int, default=2000)
    parser.add_argument("--probe-val", type=int, default=1000)
    parser.add_argument("--mse-images", type=int, default=512)
    parser.add_argument("--t", type=int, default=10)
    parser.add_argument("--block", type=int, default=20)
    parser.add_argument("--pool", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/bench-recipe", help="folder for recipe.json / recipe.csv")
    add_machine_args(parser)
    args = parser.parse_args()
    machine = announce(args, "cpu")
    precision = machine.compute.precision if machine.compute.precision in ("fp32", "bf16") else "fp32"

    source = None if args.scratch else WarmStart.read(args.init_from)
    flags = dict(source.flags) if source else dict(DEFAULT_PRETRAIN_FLAGS)
    base = PretrainConfig(flags=flags, batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    data = open_dataset(args.data)
    rows = training_rows(data.labels, base)
    images = images_uint8(data, rows, 32)
    val_rows = np.flatnonzero(stratified_split(data.labels, base.val_fraction, base.split_seed))

    # Fixed questions for every arm: probe images (train rows / validation rows) and held-out (x0, t, ε).
    gen = torch.Generator().manual_seed(args.seed)
    probe_train = rows[stratified_subset(data.labels[rows], args.probe_train, args.seed)]
    probe_val = val_rows[stratified_subset(data.labels[val_rows], args.probe_val, args.seed)]
    probe = {"train": (to_model_range(images_uint8(data, probe_train, 32, "probe images")), probe_train),
             "val": (to_model_range(images_uint8(data, probe_val, 32, "probe images")), probe_val),
             "train_y": data.labels[probe_train], "val_y": data.labels[probe_val]}  # fmt: skip
    mse_rows = val_rows[: args.mse_images]
    mse_x0 = to_model_range(images_uint8(data, mse_rows, 32, "held-out images"))
    mse_t = torch.linspace(0, 999, len(mse_rows)).round().long()[torch.randperm(len(mse_rows), generator=gen)]
    mse_eps = torch.randn(mse_x0.shape, generator=gen)
    plan = FeaturePlan(t=args.t, blocks=args.block, pools=args.pool)

    arms = [("baseline", {})] + [parse_arm(a) for a in args.arms]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, settings in [("start", None), *arms]:
            if settings is None:
                if args.scratch:
                    continue  # nothing to learn from a random network's score here
                config, warmup_images = base, args.warmup_images
            else:
                config, warmup_images = arm_setup(base, settings, args.scratch)
            config = replace(config, warmup_steps=max(1, (warmup_images or args.warmup_images) // config.batch_size))
            trainer = Trainer(config, images, tmp / "run", "cpu", precision)
            if source is not None:
                trainer.warm_start(source)
            steps = 0 if settings is None else args.images // config.batch_size
            start, timed_from = time.perf_counter(), trainer.state.step + 1  # the first step warms kernels up: untimed
            for step in range(trainer.state.step, trainer.state.step + steps):
                if step == timed_from:
                    start = time.perf_counter()
                trainer.step(step)
            seconds = time.perf_counter() - start
            scored = [("", trainer.ema.module)] + ([(" (raw weights, no EMA)", trainer.model)] if name == "baseline" else [])
            for suffix, model in scored:
                row = {"arm": name + suffix, "settings": json.dumps(settings or {}), "images": steps * config.batch_size,
                       "steps": steps, "img_per_s": round((steps - 1) * config.batch_size / seconds, 2) if steps > 1 else None,
                       "heldout_mse": round(heldout_mse(model, trainer, mse_x0, mse_t, mse_eps), 5),
                       "probe_top1": round(probe_accuracy(model, trainer.flags, probe, plan, tmp, "w"), 2)}  # fmt: skip
                results.append(row)
                print(f"  {row['arm']:<34} {row['images']:>6} images  held-out ε-MSE {row['heldout_mse']:.5f}  "
                      f"probe {row['probe_top1']:.2f}%" + (f"  ({row['img_per_s']} img/s)" if steps else ""), flush=True)  # fmt: skip

    baseline = next(r for r in results if r["arm"] == "baseline")
    print(f"\nper image seen ({args.images} images per arm; probe: logreg, t={args.t} block {args.block} pool {args.pool}, "
          f"{args.probe_train} train / {args.probe_val} validation images):")  # fmt: skip
    for row in results:
        row["mse_ratio_vs_baseline"], row["probe_vs_baseline"] = None, None
        if row["arm"] in ("baseline", "start"):
            continue
        row["mse_ratio_vs_baseline"] = round(row["heldout_mse"] / baseline["heldout_mse"], 4)
        row["probe_vs_baseline"] = round(row["probe_top1"] - baseline["probe_top1"], 2)
        print(f"ratio: {row['arm']} vs baseline: held-out ε-MSE {row['mse_ratio_vs_baseline']:.3f}×, "
              f"probe {row['probe_vs_baseline']:+.2f} points")  # fmt: skip
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"machine": machine.header(), "images_per_arm": args.images, "init_from": None if args.scratch else args.init_from,
            "probe": {"t": args.t, "block": args.block, "pool": args.pool, "train": args.probe_train, "val": args.probe_val},
            "results": results}  # fmt: skip
    (out / "recipe.json").write_text(json.dumps(meta, indent=2))
    write_csv(out / "recipe.csv", results)
    print(f"wrote {out / 'recipe.json'} and {out / 'recipe.csv'}")


if __name__ == "__main__":
    main()

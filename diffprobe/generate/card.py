"""`diffprobe export`: a pretrain run → a shippable checkpoint folder with its model card.

The folder holds the EMA weights as a guided-diffusion state_dict (`ema.pt`, with `ema.json`
naming the flags, so `adm:FOLDER/ema.pt` loads with nothing else), the loss curve, a sample grid,
the validation-split probe results (a sweep with its controls), `card.json` (machine-readable)
and `MODEL_CARD.md`.
"""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from ..backbones import load_backbone
from ..data import LabeledImages, cache_dir
from ..errors import DiffprobeError
from ..features.extract import ExtractOptions
from ..features.plan import FeaturePlan
from ..precision import choose_compute
from .._io import output_dir, torch_save
from .pretrain import CHECKPOINT_NAME

SIZE_BUDGET_BYTES = 25 * 1024 * 1024  # what a checkpoint inside the repository may weigh


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def export_run(run: str | Path, dest: str | Path, data: LabeledImages, limit: int | None = None,
               blocks: Sequence[int] = (4, 8, 13, 16, 18, 20), timesteps: Sequence[int] = (10, 50, 150),
               pools: Sequence[int] = (1, 2), samples: int = 64, hardware: str | None = None,
               notes: str = "") -> dict[str, Any]:  # fmt: skip
    from .sample import sample_grid
    from ..studies.sweep import sweep

    run, dest = Path(run), Path(dest)
    if not (run / "ema.pt").is_file() or not (run / CHECKPOINT_NAME).is_file():
        raise DiffprobeError(f"{run} is not a pretrain run (expected ema.pt and {CHECKPOINT_NAME}): pass the --out folder of `diffprobe pretrain`")
    output_dir(dest)
    blob = torch.load(run / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    config, state = blob["config"], blob["state"]
    weights = torch.load(run / "ema.pt", map_location="cpu", weights_only=True)
    params = sum(v.numel() for v in weights.values())
    # float32 when it fits the budget; else float16 (loads into the float32 model unchanged in shape).
    half = params * 4 > SIZE_BUDGET_BYTES
    if half:
        weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    torch_save(weights, dest / "ema.pt")
    side = json.loads((run / "ema.json").read_text())
    side["stored_dtype"] = "float16" if half else "float32"
    (dest / "ema.json").write_text(json.dumps(side, indent=2) + "\n")
    for name in ("loss.png", "loss.csv"):
        shutil.copy(run / name, dest / name)

    spec = f"adm:{dest / 'ema.pt'}"
    compute = choose_compute()
    backbone = load_backbone(spec)
    # Features and samples behind the card live in the cache, not beside the shipped files.
    work = cache_dir() / "export" / f"{dest.resolve().name}-{state['step']}"
    summary = sweep(backbone, data, work / "sweep", FeaturePlan(t=timesteps, blocks=blocks, pools=pools),
                    ExtractOptions(limit=limit, compute=compute))  # fmt: skip
    for name in ("sweep.csv", "heatmap_pool1.png", "heatmap_pool2.png", "summary.json"):
        if (work / "sweep" / name).is_file():
            shutil.copy(work / "sweep" / name, dest / f"probe_{name}")
    shutil.copy(sample_grid(backbone, work / "samples", samples, 100, compute), dest / "samples.png")

    history = state["history"]
    best, controls = summary["best"], summary["controls"]
    facts = {
        "architecture": "ADM U-Net (guided-diffusion layout), " + ", ".join(f"{k}={v}" for k, v in side["flags"].items()),
        "parameters": f"{params / 1e6:.2f}M, stored as {side['stored_dtype']} ({(dest / 'ema.pt').stat().st_size / 2**20:.1f} MiB)",
        "training data": f"{data.name}: {config['train_rows']} images (all but the stratified validation split, "
                         f"fraction {config.get('val_fraction', config.get('holdout_fraction'))}, seed {config.get('split_seed', config.get('holdout_seed'))})",
        "objective": "ε-prediction, simple MSE" + (" + λ·L_vlb (learned sigma)" if side["flags"].get("learn_sigma") else ""),
        "optimiser": f"AdamW lr {config['lr']}, warm-up {config['warmup_steps']} steps, weight decay {config['weight_decay']}, "
                     f"grad clip {config['grad_clip']}, batch {config['batch_size']}, EMA {config['ema_decay']} (warmed up), "
                     f"random flips {config['hflip']}",
        "steps": f"{state['step']} ({state['step'] * config['batch_size'] / config['train_rows']:.2f} epochs)",
        "wall time": f"{(state['wall_seconds'] + state.get('window_seconds', 0.0)) / 3600:.2f} h of training",
        "hardware": hardware or f"{cpu_name()}, {torch.get_num_threads()} threads, bf16 autocast",
        "final training loss": f"{history[-1]['loss']:.4f} (mean of the last 10 steps; curve: loss.png)",
        "probe (validation split)": f"logistic regression on {summary['rows']} images: best t={best['t']} block {best['block']} "
                                    f"pool {best['pool']}: {best['top1']:.2f}% top-1",
        "controls": f"random weights {controls['random_weights']['top1']:.2f}%, raw pixels {controls['pixels']['top1']:.2f}%",
    }
    card = {"summary": f"ADM trained by diffprobe on CIFAR-10, {state['step']} steps", "facts": facts,
            "config": config, "probe": summary, "notes": notes}  # fmt: skip
    (dest / "card.json").write_text(json.dumps(card, indent=1, default=float) + "\n")
    write_model_card(dest, card)
    return card


def write_model_card(dest: Path, card: dict[str, Any]) -> None:
    facts = card["facts"]
    lines = ["# diffprobe-cifar10: the default checkpoint", "",
             "A denoising diffusion model trained with `diffprobe pretrain` on the CIFAR-10 images in "
             "`../shared/data/cifar10-train.tar.gz`, minus the validation split every diffprobe probe scores on. "
             "Load it with `adm:checkpoints/diffprobe-cifar10/ema.pt` (flags in `ema.json`).", "",
             "| | |", "|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v} |" for k, v in facts.items()]
    lines += ["", "## Loss", "", "![loss](loss.png) (`loss.csv`)", "",
              "## Samples (DDIM, 100 steps or the whole schedule if shorter, seed 0)", "", "![samples](samples.png)", "",
              "## Probes on the validation split (`probe_sweep.csv`, `probe_summary.json`)", "",
              "![pool 1](probe_heatmap_pool1.png) ![pool 2](probe_heatmap_pool2.png)", ""]  # fmt: skip
    if card.get("notes"):
        lines += ["## Notes", "", card["notes"], ""]
    (dest / "MODEL_CARD.md").write_text("\n".join(lines))

"""`diffprobe demo`: the paper's pipeline end to end on CIFAR-10 with the shipped checkpoint, and a report.

Steps: a block × timestep × pool sweep with a fast logistic-regression probe on the validation
split (the images the checkpoint never trained on), the two controls (raw pixels; the same
architecture with random weights), linear and attention heads on the best setting, a DDIM
sample grid, and REPORT.md that states every number with the file it came from.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

from .._io import output_dir
from ..backbones import load_backbone
from ..data import LabeledImages
from ..errors import DiffprobeError
from ..features.extract import ExtractOptions
from ..features.plan import FeaturePlan
from ..precision import choose_compute

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CHECKPOINT = PACKAGE_ROOT / "checkpoints" / "diffprobe-cifar10" / "ema.pt"


def run_demo(data: LabeledImages, out: str | Path, checkpoint: str | Path = DEFAULT_CHECKPOINT, limit: int = 6000,
             blocks: Sequence[int] = (8, 13, 18, 20), timesteps: Sequence[int] = (10, 50, 150),
             pools: Sequence[int] = (1, 2), heads: Sequence[str] = ("linear", "attention"), head_epochs: int = 20,
             samples: int = 64, sample_steps: int = 50) -> dict[str, Any]:  # fmt: skip
    from ..generate.sample import sample_grid
    from .sweep import sweep

    if not Path(checkpoint).is_file():
        raise DiffprobeError(f"checkpoint not found: {checkpoint}; pass --checkpoint PATH.pt (an ADM checkpoint with its "
                             "PATH.json flags, e.g. from diffprobe export)")  # fmt: skip
    out = output_dir(out)
    started = time.time()
    spec = f"adm:{checkpoint}"
    backbone = load_backbone(spec)
    compute = choose_compute()
    plan = FeaturePlan(t=timesteps, blocks=blocks, pools=pools)
    summary = sweep(backbone, data, out / "sweep", plan, ExtractOptions(limit=limit, compute=compute), train_heads=list(heads),
                    head_epochs=head_epochs)  # fmt: skip
    summary["bottleneck_block"] = backbone.bottleneck_block
    grid = sample_grid(backbone, out / "samples", samples, sample_steps, compute)
    result = {"checkpoint": str(checkpoint), "data": data.name, "sweep": summary,
              "samples": str(grid), "wall_seconds": time.time() - started}  # fmt: skip
    (out / "demo.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    write_report(out, result, card_path(checkpoint))
    return result


def card_path(checkpoint: str | Path) -> Path:
    return Path(checkpoint).parent / "card.json"


def write_report(out: Path, result: dict[str, Any], card: Path) -> None:
    """REPORT.md: every number with the file it was read from."""
    s = result["sweep"]
    best, controls, heads = s["best"], s.get("controls", {}), s.get("heads", {})
    info = json.loads(card.read_text()) if card.is_file() else {}
    rows = s["rows"]
    lines = [
        "# diffprobe demo report",
        "",
        f"Checkpoint `{result['checkpoint']}`" + (f" ({info.get('summary', '')})" if info else "") + ".",
        f"Data: {result['data']}, {rows} images (a stratified subset); validation = the dataset-wide held-out split "
        f"(fraction {s['val_fraction']}, seed {s['split_seed']}), images the checkpoint was not trained on.",
        f"Total wall time {result['wall_seconds'] / 60:.1f} min.",
        "",
        "## Which block and timestep (fast logistic-regression probe, validation top-1)",
        "",
        "![pool 1](sweep/heatmap_pool1.png) ![pool 2](sweep/heatmap_pool2.png)",
        "",
        f"Best cell: t = {best['t']}, block {best['block']}, pool {best['pool']}×{best['pool']}: "
        f"**{best['top1']:.2f}%** top-1, {best['top5']:.2f}% top-5 (`sweep/best.json`; every cell in `sweep/sweep.csv`).",
        "",
        shape_sentence(s),
        "",
        "## Controls (same probe, same rows, same split; `sweep/summary.json`)",
        "",
        "| features | validation top-1 |",
        "|---|---|",
        f"| pre-trained U-Net, best cell | {best['top1']:.2f}% |",
    ]
    if controls:
        lines += [
            f"| same architecture, random weights ({controls['random_weights']['setting']}) | {controls['random_weights']['top1']:.2f}% |",
            f"| raw pixels ({controls['pixels']['features']} values) | {controls['pixels']['top1']:.2f}% |",
            "",
            f"Pre-training adds {best['top1'] - controls['random_weights']['top1']:+.2f} points over random weights "
            f"and {best['top1'] - controls['pixels']['top1']:+.2f} over pixels.",
        ]
    if heads:
        lines += ["", "## Heads on the best setting (`sweep/head-*/metrics.json`, curves and confusion PNGs beside)", "",
                  "| head | validation top-1 | top-5 |", "|---|---|---|"]  # fmt: skip
        for kind, h in heads.items():
            lines.append(f"| {kind} | {h['top1']:.2f}% | {h['top5']:.2f}% |")
    lines += ["", "## Generation (DDIM, `samples/samples.json`)", "", "![samples](samples/grid.png)", ""]
    if info:
        lines += ["## The checkpoint (its card: `" + str(card.parent / "MODEL_CARD.md") + "`)", ""]
        lines += [f"- {k}: {v}" for k, v in info.get("facts", {}).items()]
    (out / "REPORT.md").write_text("\n".join(lines) + "\n")


def shape_sentence(summary: dict[str, Any]) -> str:
    """Does the sweep show the paper's shape (best at/after the bottleneck, small-to-middle t)?"""
    best = summary["best"]
    bottleneck = summary.get("bottleneck_block")
    t_ok = best["t"] <= 300
    if bottleneck is None:
        return f"Best timestep t = {best['t']} ({'small-to-middle, as in the paper' if t_ok else 'larger than the paper finds best'})."
    b_ok = best["block"] >= bottleneck
    verdict = "shows" if (b_ok and t_ok) else "does not show"
    return (f"The paper finds the best features at or after the bottleneck (block {bottleneck} here) at small-to-middle t. "
            f"This sweep {verdict} that shape: best block {best['block']} "
            f"({'at/after' if b_ok else 'before'} the bottleneck), best t = {best['t']}.")  # fmt: skip

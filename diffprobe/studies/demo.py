"""`diffprobe demo`: the paper's pipeline end to end on CIFAR-10 with the shipped checkpoint, and a report.

Steps, each reading what the one before cached (one U-Net pass per batch and timestep fills
every block and pool; nothing is extracted twice):
  1. a block × timestep sweep with a fast logistic-regression probe on pool-1 features, on the
     validation split (the images the checkpoint never trained on); the same pass also stores
     each cell's 4×4 map;
  2. the controls: raw pixels and the same architecture with random weights, at the best cell;
  3. linear, MLP and attention heads on the best block's 4×4 map, and a fusion head over that
     map at two timesteps (the paper's DifFormer);
  4. a DDIM sample grid;
and REPORT.md, which says for each of the paper's findings whether it holds here, with the
number and the file it came from.
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
from ..validate import positive_int
from ..features.extract import ExtractOptions
from ..features.plan import FeaturePlan
from ..features.store import FeatureKey, FeatureStore
from ..precision import choose_compute

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CHECKPOINT = PACKAGE_ROOT / "checkpoints" / "diffprobe-cifar10" / "ema.pt"
MAP_POOL = 4  # the spatial heads read the block's map average-pooled to 4×4: 16 tokens

# The heads' settings, fixed from the modern recipe's searches on these features (README "Heads"),
# so the demo trains each head once instead of once per grid point. The linear head keeps the
# recipe's 15,000-step floor; attention and fusion peak by epoch ~10 on 3,600 images and then
# overfit (train 93%, validation 45% after 30 epochs), so 15 epochs, and a 1-layer, 128-wide trunk.
DEMO_HEADS: dict[str, dict[str, Any]] = {
    "linear": {"lr": 1e-1, "weight_decays": (1.0,)},
    "mlp": {"lr": 1e-3, "weight_decays": (0.5,), "epochs": 30},
    "attention": {"lr": 5e-4, "weight_decays": (0.05,), "epochs": 15, "options": {"width": 128, "depth": 1, "heads": 4}},
    "fusion": {"lr": 5e-4, "weight_decays": (0.05,), "epochs": 15, "options": {"width": 128, "depth": 1, "heads": 4}},
}


def run_demo(data: LabeledImages, out: str | Path, checkpoint: str | Path = DEFAULT_CHECKPOINT, limit: int = 4000,
             blocks: Sequence[int] = (8, 13, 18, 20), timesteps: Sequence[int] = (10, 100),
             heads: Sequence[str] = ("linear", "mlp", "attention", "fusion"), head_epochs: int | None = None,
             samples: int = 36, sample_steps: int = 25) -> dict[str, Any]:  # fmt: skip
    from ..generate.sample import sample_grid
    from .sweep import sweep

    if not Path(checkpoint).is_file():
        raise DiffprobeError(f"checkpoint not found: {checkpoint}; pass --checkpoint PATH.pt (an ADM checkpoint with its "
                             "PATH.json flags, e.g. from diffprobe export)")  # fmt: skip
    if len(timesteps) < 2 and "fusion" in heads:
        raise DiffprobeError("the fusion head fuses two timesteps: give at least two --t values")
    if head_epochs is not None:
        head_epochs = positive_int(head_epochs, "head epochs (--head-epochs)")
    out = output_dir(out)
    started = time.time()
    backbone = load_backbone(f"adm:{checkpoint}")
    compute = choose_compute()
    plan = FeaturePlan(t=timesteps, blocks=blocks, pools=(1, MAP_POOL))
    summary = sweep(backbone, data, out / "sweep", plan, ExtractOptions(limit=limit, compute=compute), score_pools=(1,))
    summary["bottleneck_block"] = backbone.bottleneck_block
    summary["heads"] = train_map_heads(FeatureStore.open(out / "sweep" / "features"), out / "heads", summary, heads,
                                       head_epochs, str(compute.device))  # fmt: skip
    grid = sample_grid(backbone, out / "samples", samples, sample_steps, compute)
    result = {"checkpoint": str(checkpoint), "data": data.name, "sweep": summary, "compute": compute.describe(),
              "samples": str(grid), "wall_seconds": time.time() - started}  # fmt: skip
    (out / "demo.json").write_text(json.dumps(result, indent=1, default=float) + "\n")
    write_report(out, result, card_path(checkpoint))
    return result


def train_map_heads(store: FeatureStore, out: Path, summary: dict[str, Any], heads: Sequence[str], epochs: int | None,
                    device: str) -> dict[str, Any]:  # fmt: skip
    """Each head on the best (t, block)'s 4×4 map; fusion adds the same block at the next-best t.
    `epochs` None: each head's demo setting (DEMO_HEADS)."""
    from ..probing.config import ProbeConfig
    from ..probing.train import probe as train_probe

    best = summary["best"]
    block, t_best = int(best["block"]), int(best["t"])
    others = sorted((r for r in summary["cells"] if r["block"] == block and r["t"] != t_best), key=lambda r: -r["top1"])
    results: dict[str, Any] = {}
    for kind in heads:
        keys = [FeatureKey(t_best, block, MAP_POOL)]
        if kind == "fusion":
            if not others:
                continue
            keys.append(FeatureKey(int(others[0]["t"]), block, MAP_POOL))
        settings = dict(DEMO_HEADS.get(kind, {}))
        settings["epochs"] = epochs if epochs is not None else settings.get("epochs")
        config = ProbeConfig(kind, options=settings.pop("options", {}), val_fraction=summary["val_fraction"],
                             split_seed=summary["split_seed"], **settings)  # fmt: skip
        metrics = train_probe(store, keys, out / kind, config, device=device)
        results[kind] = {"top1": metrics["val"]["top1"], "top5": metrics["val"]["top5"], "run": str(out / kind),
                         "inputs": [k.stem for k in keys], "chosen": metrics["chosen"]}  # fmt: skip
    return results


def card_path(checkpoint: str | Path) -> Path:
    return Path(checkpoint).parent / "card.json"


def write_report(out: Path, result: dict[str, Any], card: Path) -> None:
    """REPORT.md: each of the paper's findings, whether it holds here, with the number and its file."""
    s = result["sweep"]
    best, controls, heads = s["best"], s.get("controls", {}), s.get("heads", {})
    info = json.loads(card.read_text()) if card.is_file() else {}
    lines = [
        "# diffprobe demo report",
        "",
        f"Checkpoint `{result['checkpoint']}`" + (f" ({info.get('summary', '')})" if info else "") + ".",
        f"Data: {result['data']}, {s['rows']} images (a stratified subset); validation = the dataset-wide held-out split "
        f"(fraction {s['val_fraction']}, seed {s['split_seed']}), images the checkpoint was not trained on.",
        f"Ran on {result.get('compute', 'this machine')}; total wall time {result['wall_seconds'] / 60:.1f} min.",
        "",
        "## The paper's findings, here",
        "",
        *[f"- {line}" for line in findings(s)],
        "",
        "## Which block and timestep (fast logistic-regression probe on pool-1 features, validation top-1)",
        "",
        "![pool 1](sweep/heatmap_pool1.png)",
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
        ]
    if heads:
        lines += ["", f"## Heads on block {best['block']}'s {MAP_POOL}×{MAP_POOL} map (`heads/*/metrics.json`, curves and "
                  "confusion PNGs beside)", "", "| head | inputs | validation top-1 | top-5 | chosen epoch |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for kind, h in heads.items():
            lines.append(f"| {kind} | {', '.join(h['inputs'])} | {h['top1']:.2f}% | {h['top5']:.2f}% | {h['chosen']['epoch']} |")
        lines += ["", "The validation split here is small: one image is "
                  f"{100 / max(1, round(s['rows'] * s['val_fraction'])):.2f} points, so differences of a point or two are noise."]
    lines += ["", "## Generation (DDIM, `samples/samples.json`)", "", "![samples](samples/grid.png)", ""]
    if info:
        lines += ["## The checkpoint (its card: `" + str(card.parent / "MODEL_CARD.md") + "`)", ""]
        lines += [f"- {k}: {v}" for k, v in info.get("facts", {}).items()]
    (out / "REPORT.md").write_text("\n".join(lines) + "\n")


def findings(summary: dict[str, Any]) -> list[str]:
    """One line per finding of the paper: holds / does not hold here, with the numbers."""
    best, controls, heads = summary["best"], summary.get("controls", {}), summary.get("heads", {})
    verdict = {True: "**holds**", False: "**does not hold**"}
    out = []
    bottleneck = summary.get("bottleneck_block")
    if bottleneck is not None:
        ok = best["block"] >= bottleneck and best["t"] <= min(c["t"] for c in summary.get("cells", [best]))
        out.append(f"Best features at or after the bottleneck, at small t: {verdict[ok]} (best block {best['block']}, "
                   f"bottleneck {bottleneck}; best t = {best['t']}).")  # fmt: skip
    if controls:
        rw, px = controls["random_weights"]["top1"], controls["pixels"]["top1"]
        out.append(f"Pre-training, not the architecture, makes the features: {verdict[best['top1'] > max(rw, px)]} "
                   f"({best['top1']:.2f}% against random weights {rw:.2f}% and pixels {px:.2f}%).")  # fmt: skip
    got = {k: h["top1"] for k, h in heads.items()}
    if {"linear", "mlp", "attention"} <= set(got):
        lin, mlp, att = got["linear"], got["mlp"], got["attention"]
        out.append(f"Heads on the spatial map, linear < MLP ≤ attention: linear < MLP {verdict[lin < mlp]} "
                   f"({lin:.2f}% vs {mlp:.2f}%); MLP ≤ attention {verdict[mlp <= att]} ({mlp:.2f}% vs {att:.2f}%).")  # fmt: skip
        out.append(f"A spatial head beats the best pooled linear probe: {verdict[max(mlp, att) > best['top1']]} "
                   f"({max(mlp, att):.2f}% against logistic regression's {best['top1']:.2f}% on pool 1).")  # fmt: skip
    if "fusion" in got and "attention" in got:
        out.append(f"Fusing two timesteps (DifFormer) beats one: {verdict[got['fusion'] > got['attention']]} "
                   f"({got['fusion']:.2f}% vs attention {got['attention']:.2f}%).")  # fmt: skip
    return out


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

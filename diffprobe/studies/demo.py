"""`diffprobe demo`: the paper's pipeline end to end on CIFAR-10 with the shipped checkpoint, and a report.

Steps, each reading what the one before cached (one U-Net pass per batch and timestep fills
every block and pool; nothing is extracted twice):
  1. a block × timestep sweep with a fast logistic-regression probe on pool-1 features, trained
     on training images and choosing its cell on the selection rows (held-out images the
     checkpoint never trained on); the same pass also stores each cell's 4×4 map;
  2. the controls: raw pixels and the same architecture with random weights, given the same search;
  3. linear, MLP and attention heads on the best block's 4×4 map, and a fusion head over that
     map at two timesteps (the paper's DifFormer);
  4. a supervised ResNet-18 trained from scratch on training images (`baseline train`), its stages
     swept by the same probe on the same rows: diffusion features beside a discriminative network;
  5. a DDIM sample grid;
and REPORT.md, which judges each of the paper's findings on the report rows (or a test set),
which no choice saw: holds, does not hold, or not separable at this size, with the paired
interval and the file it came from.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._io import output_dir, read_json_object, write_json, write_text
from ..backbones import load_backbone
from ..data import LabeledImages
from ..errors import DiffprobeError
from ..validate import positive_int
from ..features.extract import ExtractOptions
from ..features.plan import FeaturePlan
from ..features.reporting import Reporting
from ..features.store import FeatureKey, FeatureStore
from ..precision import choose_compute
from ..probing.intervals import Interval, compare, paired_difference
from .sweep import choose_cell

PACKAGE_ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT_PATH = Path("checkpoints") / "diffprobe-cifar10" / "ema.pt"


def default_checkpoint() -> Path:
    """The shipped checkpoint: $DIFFPROBE_CHECKPOINT; else the source tree's checkpoints/ (a clone,
    an editable install); else where `pip install .` put it (share/diffprobe/ under the
    environment's prefix, pyproject's data-files). None found is one line saying where it looked."""
    import os
    import sys

    if os.environ.get("DIFFPROBE_CHECKPOINT"):
        return Path(os.environ["DIFFPROBE_CHECKPOINT"])
    places = [PACKAGE_ROOT / CHECKPOINT_PATH, Path(sys.prefix) / "share" / "diffprobe" / CHECKPOINT_PATH]
    for place in places:
        if place.is_file():
            return place
    raise DiffprobeError(f"the default checkpoint is in none of {', '.join(map(str, places))}: pass --checkpoint FILE, set "
                         "$DIFFPROBE_CHECKPOINT, or install diffprobe from its source folder (pip install .)")  # fmt: skip


MAP_POOL = 4  # the spatial heads read the block's map average-pooled to 4×4: 16 tokens
# Images: a stratified 1,500 of the training images, and 600 of the dataset's held-out ones (the
# checkpoint never trained on them), half selecting and half reporting. A 10% split of one
# 2,100-image subset would report on a sixth as many: a 95% interval is about ±14 points at 50
# report images and ±5.6 at 300, and that width decides which of the paper's findings separate at
# all. 2,100 images keep the demo within 4 minutes on a 2-core AVX2-only CPU (README).
TRAIN_IMAGES, HELD_OUT_IMAGES = 1500, 600
# The supervised ResNet-18 beside the diffusion model, trained on the same 1,500 labelled images.
# torchvision's stem (16× cheaper at 32 px than the small-image one) lets 20 epochs fit in under
# 3 minutes on 2 AVX2 cores, reaching ~44% validation top-1; the small stem could afford only 4
# epochs in that time and stayed at chance (9.3%), a comparison against an untrained network.
BASELINE_EPOCHS = 20
BASELINE_RECIPE = {"stem": "standard", "batch_size": 64, "lr": 0.05}

# The heads' settings, fixed from the modern recipe's searches on these features (README "Heads"),
# so the demo trains each head once instead of once per grid point. The linear head trains 60
# epochs, not the recipe's 15,000-step floor: on the demo's 3,600-image store of 2026-11-30 the
# floor (500 epochs, 34 s) scored 54.0% on the report rows and 60 epochs (4 s) 55.4%. Attention
# and fusion peak by epoch ~10 on 3,600 images and then overfit (train 93%, validation 45% after
# 30 epochs), so 15 epochs, and a 1-layer, 128-wide trunk.
DEMO_HEADS: dict[str, dict[str, Any]] = {
    "linear": {"lr": 1e-1, "weight_decays": (1.0,), "epochs": 60},
    "mlp": {"lr": 1e-3, "weight_decays": (0.5,), "epochs": 30},
    "attention": {"lr": 5e-4, "weight_decays": (0.05,), "epochs": 15, "options": {"width": 128, "depth": 1, "heads": 4}},
    "fusion": {"lr": 5e-4, "weight_decays": (0.05,), "epochs": 15, "options": {"width": 128, "depth": 1, "heads": 4}},
}


def run_demo(data: LabeledImages, out: str | Path, checkpoint: str | Path | None = None, limit: int = TRAIN_IMAGES,
             held_out: int | None = HELD_OUT_IMAGES,
             blocks: Sequence[int] = (8, 13, 18, 20), timesteps: Sequence[int] = (10, 100),
             heads: Sequence[str] = ("linear", "mlp", "attention", "fusion"), head_epochs: int | None = None,
             samples: int = 16, sample_steps: int = 25, test_data: LabeledImages | None = None,
             test_limit: int | None = None, baseline_epochs: int | None = BASELINE_EPOCHS,
             overwrite: bool = False) -> dict[str, Any]:  # fmt: skip
    from ..generate.sample import sample_grid
    from .sweep import sweep

    checkpoint = default_checkpoint() if checkpoint is None else checkpoint
    if not Path(checkpoint).is_file():
        raise DiffprobeError(f"checkpoint not found: {checkpoint}; pass --checkpoint PATH.pt (an ADM checkpoint with its "
                             "PATH.json flags, e.g. from diffprobe export)")  # fmt: skip
    if len(timesteps) < 2 and "fusion" in heads:
        raise DiffprobeError("the fusion head fuses two timesteps: give at least two --t values")
    if head_epochs is not None:
        head_epochs = positive_int(head_epochs, "head epochs (--head-epochs)")
    baseline_epochs = BASELINE_EPOCHS if baseline_epochs is None else baseline_epochs
    if baseline_epochs:  # checked before the sweep, not after it (0 leaves the baseline out)
        baseline_epochs = positive_int(baseline_epochs, "baseline epochs (--baseline-epochs)")
    out = output_dir(out)
    started = time.time()
    backbone = load_backbone(f"adm:{checkpoint}")
    compute = choose_compute()
    plan = FeaturePlan(t=timesteps, blocks=blocks, pools=(1, MAP_POOL))
    options = ExtractOptions(limit=limit, held_out=held_out, compute=compute, overwrite=overwrite)  # overwrite: start every store again
    summary = sweep(backbone, data, out / "sweep", plan, options, score_pools=(1,),
                    test_data=test_data, test_limit=test_limit)  # fmt: skip
    summary["bottleneck_block"] = backbone.bottleneck_block
    reporting = sweep_reporting(out / "sweep", summary)
    summary["heads"], hits = train_map_heads(reporting, out / "heads", summary, heads, head_epochs, str(compute.device))
    summary["findings"] = judge_findings(reporting, summary, hits, str(compute.device))
    if baseline_epochs:
        summary["baseline"] = baseline_row(data, out, reporting, summary, options, baseline_epochs, backbone.image_size,
                                           str(compute.device), test_data, test_limit)  # fmt: skip
    grid = sample_grid(backbone, out / "samples", samples, sample_steps, compute)
    result = {"checkpoint": str(checkpoint), "data": data.name, "images": {"train": limit, "held_out": held_out},
              "sweep": summary, "compute": compute.describe(),
              "samples": str(grid), "wall_seconds": time.time() - started}  # fmt: skip
    write_json(out / "demo.json", result)
    write_report(out, result, card_path(checkpoint))
    return result


def baseline_row(data: LabeledImages, out: Path, reporting: Reporting, summary: dict[str, Any], options: ExtractOptions,
                 epochs: int, image_size: int, device: str, test_data: LabeledImages | None, test_limit: int | None) -> dict[str, Any]:  # fmt: skip
    """A ResNet-18 trained from scratch on training images only (the dataset-wide split keeps the
    selection and report rows out of it), read as a backbone: its stages swept by the same fast
    probe on the same rows as the diffusion model, and the two best cells compared on the report
    rows. Trained once: a rerun reads baseline/ back."""
    from ..backbones import load_backbone
    from .baseline import train_baseline
    from .compare import split_identity
    from .sweep import cell_key, cell_score, sweep

    folder = out / "baseline"
    training = {"arch": "resnet18", "epochs": epochs, "limit": options.limit, "image_size": image_size,
                "data_fingerprint": data.fingerprint(), **BASELINE_RECIPE}  # fmt: skip
    info_path = folder / "baseline.json"
    if {k: read_json_or_empty(info_path).get(k) for k in training} != training:
        # `limit` training images: the subset is drawn from the whole dataset, then its held-out part dropped.
        total = None if options.limit is None else round(options.limit / (1 - summary["val_fraction"]))
        train_baseline(data, folder, "resnet18", image_size, epochs, limit=total, val_fraction=summary["val_fraction"],
                       split_seed=summary["split_seed"], device=device, **BASELINE_RECIPE)  # fmt: skip
        info = json.loads(info_path.read_text())
        write_json(info_path, {**info, "limit": options.limit})
    info = json.loads(info_path.read_text())
    network = load_backbone(f"baseline:{folder}")
    # A network trained again (another recipe, an earlier diffprobe's, or a run cut short between training
    # and extraction) makes the store of the old one stale: the demo owns it, so it is discarded, not refused.
    manifest = out / "baseline-sweep" / "features" / "manifest.json"
    stale = manifest.is_file() and read_json_or_empty(manifest).get("backbone", {}).get("fingerprint") != network.fingerprint()
    theirs = sweep(network, data, out / "baseline-sweep", FeaturePlan(t=None, blocks="all", pools=(1,)),
                   replace(options, overwrite=True) if stale else options, controls=False,
                   val_fraction=summary["val_fraction"], split_seed=summary["split_seed"], report_share=summary["report_share"],
                   test_data=test_data, test_limit=test_limit)  # fmt: skip
    their_reporting = sweep_reporting(out / "baseline-sweep", theirs)
    args = (summary["val_fraction"], summary["split_seed"], summary["report_share"])
    if split_identity(their_reporting.store, *args)[0] != split_identity(reporting.store, *args)[0]:
        raise DiffprobeError("the baseline's store holds other rows than the diffusion sweep's: remove OUT/baseline-sweep and rerun")
    row = {"network": f"ResNet-18 ({info['stem']} stem) trained from scratch on {info['train_images']} training images ({epochs} epochs, "
                      f"validation top-1 {info['val_top1']:.1f}%)", "best": theirs["best"], "folder": str(folder)}  # fmt: skip
    if reporting.reports:
        ours = cell_score(summary["probe"], reporting, cell_key(summary["best"]), device).report_hits
        base = cell_score(theirs["probe"], their_reporting, cell_key(theirs["best"]), device).report_hits
        row["finding"] = claim("Diffusion features beat a supervised network's on the same rows", "pre-trained diffusion best cell",
                               f"supervised ResNet-18 stage {theirs['best']['block']}", paired_difference(ours, base))  # fmt: skip
    return row


def read_json_or_empty(path: Path) -> dict[str, Any]:
    """A JSON file's object, or {} when it is missing or unreadable (a run killed mid-write): the
    project's reader, with "start again" in place of its error."""
    try:
        return read_json_object(path, "")
    except DiffprobeError:
        return {}


def sweep_reporting(sweep_dir: Path, summary: dict[str, Any]) -> Reporting:
    """The sweep's store, roles and report rows (its test store, if it had one)."""
    store = FeatureStore.open(sweep_dir / "features")
    test = FeatureStore.open(summary["test_store"]) if summary.get("test_store") else None
    return Reporting.of(store, summary["val_fraction"], summary["split_seed"], summary["report_share"], test, "the demo")


def train_map_heads(reporting: Reporting, out: Path, summary: dict[str, Any], heads: Sequence[str], epochs: int | None,
                    device: str) -> tuple[dict[str, Any], dict[str, np.ndarray]]:  # fmt: skip
    """Each head on the best (t, block)'s 4×4 map; fusion adds the same block at the t that
    scored next on the selection rows. `epochs` None: each head's demo setting (DEMO_HEADS).
    Returns each head's summary and its hits on the report rows or test store (for paired comparisons)."""
    from ..probing.config import ProbeConfig
    from ..probing.train import fit_head, report_head, save_run
    from .sweep import head_summary

    best = summary["best"]
    block, t_best = int(best["block"]), int(best["t"])
    others = sorted((r for r in summary["cells"] if r["block"] == block and r["t"] != t_best), key=lambda r: -r["select_top1"])
    store, roles = reporting.store, reporting.roles
    results: dict[str, Any] = {}
    hits: dict[str, np.ndarray] = {}
    for kind in heads:
        keys = [FeatureKey(t_best, block, MAP_POOL)]
        if kind == "fusion":
            if not others:
                continue
            keys.append(FeatureKey(int(others[0]["t"]), block, MAP_POOL))
        settings = dict(DEMO_HEADS.get(kind, {}))
        settings["epochs"] = epochs if epochs is not None else settings.get("epochs")
        config = ProbeConfig(kind, options=settings.pop("options", {}), val_fraction=summary["val_fraction"],
                             split_seed=summary["split_seed"], report_share=roles.report_share, **settings)  # fmt: skip
        fitted = fit_head(store, keys, config, device)
        scored = report_head(fitted, reporting)  # a test store's figures go into the run's metrics
        save_run(fitted, out / kind)
        results[kind] = {**head_summary(fitted.metrics, out / kind), "inputs": [k.stem for k in keys]}
        if reporting.reports:
            hits[kind] = scored
    return results, hits


def judge_findings(reporting: Reporting, summary: dict[str, Any], hits: dict[str, np.ndarray],
                   device: str) -> list[dict[str, Any]]:  # fmt: skip
    """Each of the paper's findings as a paired comparison on the report rows (or test store): it
    holds only when the 95% interval of the difference excludes zero in the paper's direction;
    otherwise it does not hold (the reverse is separable) or is not separable at this size."""
    from .sweep import cell_key, cell_score

    if not reporting.reports:
        return []
    cells = summary["cells"]

    probed: dict[FeatureKey, np.ndarray] = {}

    def cell_hits(row: dict) -> np.ndarray:  # each cell probed once (the best cell is usually also a side's best)
        key = cell_key(row)
        if key not in probed:
            probed[key] = cell_score(summary["probe"], reporting, key, device).report_hits
        return probed[key]

    best = summary["best"]
    best_hits = cell_hits(best)
    out = []
    bottleneck = summary.get("bottleneck_block")
    before = [r for r in cells if r["block"] < bottleneck] if bottleneck is not None else []
    after = [r for r in cells if r["block"] >= bottleneck] if bottleneck is not None else []
    if before and after:
        a, b = choose_cell(after), choose_cell(before)  # each side's best, chosen on the selection rows
        out.append(claim("Best features at or after the bottleneck", f"block {a['block']} (t={a['t']})",
                         f"block {b['block']} (t={b['t']}) before it", paired_difference(cell_hits(a), cell_hits(b))))  # fmt: skip
    for name in ("random_weights", "pixels"):
        control = summary.get("controls", {}).get(name, {})
        if "pretrained_minus_control" in control:
            out.append(claim("Pre-training, not the architecture, makes the features", "pre-trained best cell",
                             name.replace("_", " ") + (f" ({control['setting']})" if "setting" in control else ""),
                             Interval(**control["pretrained_minus_control"])))  # fmt: skip
    pairs = [("Heads on the map: MLP beats linear", "mlp", "linear"), ("Heads on the map: attention beats MLP", "attention", "mlp"),
             ("Fusing two timesteps (DifFormer) beats one", "fusion", "attention")]  # fmt: skip
    for text, a, b in pairs:
        if a in hits and b in hits:
            out.append(claim(text, f"{a} head", f"{b} head", paired_difference(hits[a], hits[b])))
    spatial = [k for k in ("mlp", "attention") if k in hits]
    if spatial:
        chosen = max(spatial, key=lambda k: summary["heads"][k]["select_top1"])  # chosen on the selection rows
        out.append(claim("A head on the spatial map beats the best pooled linear probe", f"{chosen} head (the better on "
                         "the selection rows)", f"logistic regression on pool {best['pool']}", paired_difference(hits[chosen], best_hits)))  # fmt: skip
    return out


def claim(finding: str, a: str, b: str, diff: Interval) -> dict[str, Any]:
    """A finding that A beats B, judged by the paired interval of A − B."""
    if diff.low > 0:
        verdict = "holds"
    elif diff.high < 0:
        verdict = "does not hold"
    else:
        verdict = "not separable at this size"
    return {"finding": finding, "a": a, "b": b, "verdict": verdict, "difference": diff.to_dict(), "text": compare(a, b, diff)}


def card_path(checkpoint: str | Path) -> Path:
    return Path(checkpoint).parent / "card.json"


def write_report(out: Path, result: dict[str, Any], card: Path) -> None:
    """REPORT.md: each of the paper's findings, judged on rows no choice saw, with its interval and its file."""
    from .sweep import headline

    s = result["sweep"]
    best, controls, heads, roles = s["best"], s.get("controls", {}), s.get("heads", {}), s["roles"]
    info = json.loads(card.read_text()) if card.is_file() else {}
    lines = [
        "# diffprobe demo report",
        "",
        f"Checkpoint `{result['checkpoint']}`" + (f" ({info.get('summary', '')})" if info else "") + ".",
        f"Data: {result['data']}, {s['rows']} images ({subset_words(result.get('images', {}))}). Rows, each image's role fixed by seeds and "
        f"stratified by class: {roles['train']} train the probes and heads; the dataset-wide held-out split (fraction "
        f"{roles['val_fraction']}, seed {roles['split_seed']}, images the checkpoint was not trained on) gives "
        f"{roles['select']} **selection** rows, on which every choice is made (probe C, cell, epoch, head)"
        + (f", and every number below is computed on a test set that no choice saw: {roles['reported_on']}."
           if s.get("test_store") else
           f", and {roles['report']} **report** rows that no choice saw, on which every number below is computed."),
        f"Intervals are 95% bootstrap intervals over those {roles['report_images']} images; a finding holds only when the "
        f"paired interval of its difference excludes zero (one image is {100 / max(1, roles['report_images']):.2f} points).",
        f"Ran on {result.get('compute', 'this machine')}; total wall time {result['wall_seconds'] / 60:.1f} min.",
        "",
        "## The paper's findings, here",
        "",
        *[f"- {line}" for line in findings(s)],
        "",
        "## Which block and timestep (fast logistic-regression probe on pool-1 features, selection top-1)",
        "",
        "![pool 1](sweep/heatmap_pool1.png)",
        "",
        f"Best cell on the selection rows: t = {best['t']}, block {best['block']}, pool {best['pool']}×{best['pool']} "
        f"(selection top-1 {best['select_top1']:.2f}%, the maximum over {len(s['cells'])} cells and so optimistic); "
        f"on the report rows: **{headline(best)}** (`sweep/best.json`; every cell in `sweep/sweep.csv`).",
        "",
        shape_sentence(s),
        "",
        "## Controls (same probe, same search over cells, same rows; `sweep/summary.json`)",
        "",
        "| features | top-1 on the report rows (95% interval) | chosen cell |",
        "|---|---|---|",
        f"| pre-trained U-Net | {headline(best)} | t={best['t']} block {best['block']} |",
    ]
    if controls:
        rw, px = controls["random_weights"], controls["pixels"]
        lines += [f"| same architecture, random weights | {headline(rw)} | {rw['setting']} |",
                  f"| raw pixels ({px['features']} values) | {headline(px)} | – |"]  # fmt: skip
    if heads:
        lines += ["", f"## Heads on block {best['block']}'s {MAP_POOL}×{MAP_POOL} map (`heads/*/metrics.json`, curves and "
                  "confusion PNGs beside)", "", "| head | inputs | top-1 on the report rows (95% interval) | selection top-1 | chosen epoch |",
                  "|---|---|---|---|---|"]  # fmt: skip
        for kind, h in heads.items():
            lines.append(f"| {kind} | {', '.join(h['inputs'])} | {headline(h)} | {h['select_top1']:.2f}% | {h['chosen']['epoch']} |")
    if s.get("baseline"):
        b = s["baseline"]
        lines += ["", "## Beside a discriminative network (same images, same split, same probe; `baseline-sweep/summary.json`)", "",
                  "| features | top-1 on the report rows (95% interval) | chosen cell |", "|---|---|---|",
                  f"| pre-trained diffusion U-Net (generative, no labels) | {headline(best)} | t={best['t']} block {best['block']} |",
                  f"| {b['network']} (supervised on the labels) | {headline(b['best'])} | stage {b['best']['block']} (layer{b['best']['block']}) |"]  # fmt: skip
        if b.get("finding"):
            lines += ["", f"- {b['finding']['text']}: **{b['finding']['verdict']}**."]
        lines += ["", "`diffprobe compare` builds this table for any backbones: see the README's *Compare with other representations*."]
    lines += ["", "## Generation (DDIM, `samples/samples.json`)", "", "![samples](samples/grid.png)", ""]
    if info:
        lines += ["## The checkpoint (its card: `" + str(card.parent / "MODEL_CARD.md") + "`)", ""]
        lines += [f"- {k}: {v}" for k, v in info.get("facts", {}).items()]
    write_text(out / "REPORT.md", "\n".join(lines) + "\n")


def subset_words(images: dict[str, Any]) -> str:
    if images.get("held_out") is None:
        return "a stratified subset"
    return f"stratified subsets: up to {images['train']} of the training images and {images['held_out']} of the held-out ones"


def findings(summary: dict[str, Any]) -> list[str]:
    """One line per finding of the paper: holds / does not hold / not separable here, with the paired difference."""
    judged = summary.get("findings") or []
    if not judged:
        return ["No report rows: findings are not judged (every figure would be a selection score)."]
    return [f"{f['finding']}: **{f['verdict']}** ({f['text']})." for f in judged]


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

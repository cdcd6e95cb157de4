"""Block × timestep × pool search with a fast probe, and the controls every report carries.

One U-Net pass per (batch, timestep) fills every block of the store (features.extract); then a
fast probe scores each (t, block, pool) cell on the validation split. The controls answer "what
does pre-training add?": the same probe on raw pixels, and on the same architecture with random
weights at the best setting.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import numpy as np
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..backbones.base import Backbone
from ..data import LabeledImages, model_transform
from ..errors import DiffprobeError
from ..validate import positive_int
from ..precision import choose_compute
from ..probing.fastprobe import ProbeScore, knn, logistic_regression
from ..features.extract import ExtractOptions, extract
from ..features.distributed import ranks
from ..features.plan import FeaturePlan
from .._io import output_dir, write_csv, write_json
from ..report import heatmap, short_source
from ..features.store import FeatureKey, FeatureStore

log = logging.getLogger(__name__)
PROBES = ("logreg", "knn")


def fast_probe(kind: str, features: np.ndarray, labels: np.ndarray, is_val: np.ndarray, device: str = "cpu") -> ProbeScore:
    args = (features[~is_val], labels[~is_val], features[is_val], labels[is_val])
    if kind == "logreg":
        return logistic_regression(*args, device=device)[0]
    if kind == "knn":
        return knn(*args, device=device)
    raise DiffprobeError(f"unknown fast probe {kind!r}; expected one of {', '.join(PROBES)}")


def score_store(store: FeatureStore, keys: Sequence[FeatureKey] | None = None, probe: str = "logreg",
                val_fraction: float = 0.1, split_seed: int = 0, device: str = "cpu") -> list[dict]:  # fmt: skip
    """One row per (t, block, pool): validation top-1/top-5 of the fast probe."""
    keys = list(keys) if keys is not None else store.complete_keys()
    if not keys:
        raise DiffprobeError(f"{store.root} holds no complete features to probe: run the extraction first")
    is_val = store.split(val_fraction, split_seed)
    labels = store.labels
    rows = []
    for key in tqdm(keys, desc=f"{probe} probes", unit="cell"):
        score = fast_probe(probe, store.load(key), labels, is_val, device)
        rows.append({"t": key.t, "block": key.block, "pool": key.pool, "probe": probe, "top1": round(score.top1, 3),
                     "top5": round(score.top5, 3), **score.params})  # fmt: skip
    return rows


def write_sweep(out: str | Path, rows: list[dict], title: str) -> dict:
    """sweep.csv, one heatmap PNG per pool size (block × t), best.json. Returns the best row."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "sweep.csv", rows)
    best = max(rows, key=lambda r: (r["top1"], r["top5"]))
    for pool in sorted({r["pool"] for r in rows}):
        cells = [r for r in rows if r["pool"] == pool]
        blocks = sorted({r["block"] for r in cells})
        ts = sorted({r["t"] for r in cells})
        grid = np.full((len(blocks), len(ts)), np.nan)
        for r in cells:
            grid[blocks.index(r["block"]), ts.index(r["t"])] = r["top1"]
        mark = (blocks.index(best["block"]), ts.index(best["t"])) if best["pool"] == pool else None
        heatmap(out / f"heatmap_pool{pool}.png", grid, blocks, ts, f"{title}, pool {pool}×{pool}", best=mark)
    write_json(out / "best.json", best)
    return best


def pixel_features(data: LabeledImages, rows: np.ndarray, image_size: int, side: int = 32) -> np.ndarray:
    """The pixels control: clean images at the model's transform, area-averaged to ≤ side×side."""
    transform = model_transform(image_size)
    side = min(side, image_size)
    out = np.empty((len(rows), 3 * side * side), dtype=np.float32)
    for i, index in enumerate(tqdm(rows, desc="pixels control", unit="img", leave=False)):
        x = transform(data.load(int(index)))[None]
        out[i] = F.adaptive_avg_pool2d(x, side).flatten().numpy()
    return out


def run_controls(backbone: Backbone, data: LabeledImages, store: FeatureStore, best: dict, out: str | Path,
                 probe: str = "logreg", val_fraction: float = 0.1, split_seed: int = 0, device: str = "cpu",
                 options: ExtractOptions | None = None) -> dict:  # fmt: skip
    """Pixels and random-weight controls on the same rows, noise and split as the store.

    Under torchrun every rank extracts its share of the random-weights store; rank 0 scores."""
    out = Path(out)
    key = FeatureKey(int(best["t"]), int(best["block"]), int(best["pool"]))
    noise = store.manifest["noise"]
    plan = FeaturePlan(t=key.t, blocks=key.block, pools=key.pool, noise_seed=noise["seed"], draws=noise["draws"])
    random_store = extract(backbone.random_like(seed=0), data, plan, out / "control_random_weights",
                           (options or ExtractOptions()).same_rows_as(store))  # fmt: skip
    if not ranks().is_main:
        return {}
    is_val = store.split(val_fraction, split_seed)
    labels = store.labels
    cache = out / "control_pixels.npy"
    if cache.is_file() and np.load(cache, mmap_mode="r").shape[0] == store.rows:
        pixels = np.load(cache)
    else:
        pixels = pixel_features(data, store.indices, backbone.image_size)
        np.save(cache, pixels)
    pixel_score = fast_probe(probe, pixels, labels, is_val, device)
    random_score = fast_probe(probe, random_store.load(key), labels, is_val, device)
    return {
        "pixels": {"top1": pixel_score.top1, "top5": pixel_score.top5, "features": int(pixels.shape[1]), **pixel_score.params},
        "random_weights": {"top1": random_score.top1, "top5": random_score.top5, "setting": key.stem, **random_score.params},
    }


def sweep(backbone: Backbone, data: LabeledImages, out: str | Path, plan: FeaturePlan, options: ExtractOptions | None = None,
          probe: str = "logreg", val_fraction: float = 0.1, split_seed: int = 0, controls: bool = True,
          train_heads: Sequence[str] = (), head_epochs: int | None = None,
          score_pools: Sequence[int] | None = None) -> dict:  # fmt: skip
    """Extract (resuming), score every cell, write the report files, run the controls, and
    train each head in `train_heads` on the best setting (run directories head-<kind>/).
    `score_pools`: only these pool sizes are scored (the others are extracted in the same pass
    for heads that read maps, but a fast probe on them would cost more than it tells).
    Fast probes and heads run on the extraction's device."""
    out = Path(out)
    options = options or ExtractOptions()
    if head_epochs is not None:  # checked before extraction, not after an hour of it
        head_epochs = positive_int(head_epochs, "head epochs (--head-epochs)")
    if options.augment_views:
        raise DiffprobeError("a sweep scores centre-crop features; extract augmented views separately (extract --augment-views)")
    plan = plan.resolve(backbone)
    output_dir(out)  # before any work: an unusable --out costs nothing
    store = extract(backbone, data, plan, out / "features", options)
    probe_device = str((options.compute or choose_compute()).device)
    share = ranks()  # under torchrun: every rank extracts, rank 0 scores, writes and trains heads
    if share.is_main:
        scored = [k for k in plan.keys if score_pools is None or k.pool in score_pools]
        if not scored:
            raise DiffprobeError(f"none of the pools {list(plan.pools)} is among the pools to score {list(score_pools or [])}")
        rows = score_store(store, scored, probe, val_fraction, split_seed, probe_device)
        best = write_sweep(out, rows, f"{short_source(backbone.source)} on {data.name}: {probe} top-1 (validation)")
    best = share.broadcast(best if share.is_main else None)
    summary = {"backbone": backbone.source, "data": data.name, "rows": store.rows, "probe": probe,
               "val_fraction": val_fraction, "split_seed": split_seed, "best": best}  # fmt: skip
    if share.is_main:
        summary["cells"] = rows  # every scored cell (also in sweep.csv)
    if controls:
        control = run_controls(backbone, data, store, best, out, probe, val_fraction, split_seed, probe_device, options)
        if control:  # rank 0's scores (other ranks only helped extract)
            summary["controls"] = control
    if not share.is_main:
        return summary
    if train_heads:
        from ..probing.config import ProbeConfig
        from ..probing.train import probe as train_probe

        key = FeatureKey(int(best["t"]), int(best["block"]), int(best["pool"]))
        summary["heads"] = {}
        for kind in train_heads:
            config = ProbeConfig(kind, epochs=head_epochs, val_fraction=val_fraction, split_seed=split_seed)
            metrics = train_probe(store, [key], out / f"head-{kind}", config, device=probe_device)
            summary["heads"][kind] = {"top1": metrics["val"]["top1"], "top5": metrics["val"]["top5"], "run": str(out / f"head-{kind}")}
    write_json(out / "summary.json", summary)
    return summary


def describe_summary(summary: dict) -> str:
    best = summary["best"]
    lines = [f"best: t={best['t']} block={best['block']} pool={best['pool']}: {summary['probe']} top-1 {best['top1']:.2f}% "
             f"(top-5 {best['top5']:.2f}%) on {summary['rows']} images, validation split"]  # fmt: skip
    if "controls" in summary:
        c = summary["controls"]
        lines.append(f"controls: raw pixels {c['pixels']['top1']:.2f}%, random weights {c['random_weights']['top1']:.2f}% "
                     f"(same probe, same split)")  # fmt: skip
    for kind, h in summary.get("heads", {}).items():
        where = f"on {', '.join(h['inputs'])}" if h.get("inputs") else "at the best setting"
        lines.append(f"{kind} head {where}: top-1 {h['top1']:.2f}% (run: {h['run']})")
    return "\n".join(lines)

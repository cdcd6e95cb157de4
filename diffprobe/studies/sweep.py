"""Block × timestep × pool search with a fast probe, and the controls every report carries.

One U-Net pass per (batch, timestep) fills every block of the store (features.extract); then a
fast probe trains on the train rows of each (t, block, pool) cell and is scored on the
selection rows, which choose the best cell; that one cell is then scored on the report rows,
with a bootstrap interval (features/roles.py). The controls answer "what does pre-training
add?": raw pixels, and the same architecture with random weights given the same search over
cells; each is reported on the same report rows, against the pre-trained best as a paired
difference.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..backbones.base import Backbone
from ..data import LabeledImages, model_transform
from ..errors import DiffprobeError
from ..validate import positive_int
from ..precision import choose_compute
from ..probing.fastprobe import ProbeScore, knn, knn_votes, logistic_regression, logreg_logits, topk
from ..probing.intervals import Interval, accuracy_interval, compare, paired_difference
from ..features.extract import ExtractOptions, extract
from ..features.distributed import ranks
from ..features.plan import FeaturePlan
from ..features.reporting import Reporting, check_test_data
from ..features.roles import REPORT_SHARE, Roles
from .._io import claim_output, save_npy, write_csv, write_json
from ..report import heatmap, short_source, short_tap
from ..features.store import FeatureKey, FeatureStore, tap_order

log = logging.getLogger(__name__)
PROBES = ("logreg", "knn")


@dataclass
class CellScore:
    """A fast probe on one feature set: fitted on the train rows, its choices (C) and score on the
    select rows, and each report row's top-1 hit (for the reported figure and paired comparisons)."""

    select: ProbeScore
    report_hits: np.ndarray  # bool per report row; empty without report rows
    report_top5: float | None

    def row(self) -> dict:
        """The sweep.csv columns: selection and report scores side by side."""
        report = {"report_top1": round(100.0 * self.report_hits.mean(), 3), "report_top5": round(self.report_top5, 3)} if len(self.report_hits) else {}
        return {"probe": self.select.method, "select_top1": round(self.select.top1, 3), "select_top5": round(self.select.top5, 3),
                **report, **self.select.params}  # fmt: skip

    def report(self) -> Interval | None:
        return accuracy_interval(self.report_hits) if len(self.report_hits) else None


def fast_probe(kind: str, features: np.ndarray, labels: np.ndarray, roles: Roles, device: str = "cpu",
               report: tuple[np.ndarray, np.ndarray] | None = None) -> CellScore:  # fmt: skip
    """Train on roles.train, choose (logreg's C) and score on roles.select, then score the
    chosen model once on roles.report, or on `report` (a test set's features and labels)."""
    x_train, y_train = features[roles.train], labels[roles.train]
    x_sel, y_sel = features[roles.select], labels[roles.select]
    x_rep, y_rep = report if report is not None else (features[roles.report], labels[roles.report])
    num_classes = int(labels.max()) + 1
    if kind == "logreg":
        score, model = logistic_regression(x_train, y_train, x_sel, y_sel, device=device)
        logits = logreg_logits(model, x_rep) if len(x_rep) else None
    elif kind == "knn":
        score = knn(x_train, y_train, x_sel, y_sel, device=device)
        logits = knn_votes(x_train, y_train, x_rep, num_classes, device=device).cpu() if len(x_rep) else None
    else:
        raise DiffprobeError(f"unknown fast probe {kind!r}; expected one of {', '.join(PROBES)}")
    if logits is None:
        return CellScore(score, np.zeros(0, dtype=bool), None)
    y = torch.as_tensor(y_rep)
    return CellScore(score, (logits.argmax(1) == y).numpy(), topk(logits, y, 5))


def cell_score(probe: str, reporting: Reporting, key: FeatureKey, device: str = "cpu") -> CellScore:
    """The fast probe on one cell of the store, reported where `reporting` says."""
    store = reporting.store
    report = reporting.features(key) if reporting.test is not None else None
    return fast_probe(probe, store.load(key), store.labels, reporting.roles, device, report)


def score_store(reporting: Reporting, keys: Sequence[FeatureKey] | None, probe: str,
                device: str = "cpu") -> tuple[list[dict], dict[FeatureKey, CellScore]]:  # fmt: skip
    """One row per (t, block, pool): the fast probe's selection and report scores; and each cell's CellScore."""
    store = reporting.store
    keys = list(keys) if keys is not None else store.complete_keys()
    if not keys:
        raise DiffprobeError(f"{store.root} holds no complete features to probe: run the extraction first")
    rows, cells = [], {}
    for key in tqdm(keys, desc=f"{probe} probes", unit="cell"):
        cells[key] = cell_score(probe, reporting, key, device)
        rows.append({"t": key.t, "block": key.block, "pool": key.pool, **cells[key].row()})
    return rows, cells


def choose_cell(rows: Sequence[dict]) -> dict:
    """The best cell on the selection rows (ties: top-5, then the earlier cell)."""
    return max(rows, key=lambda r: (r["select_top1"], r["select_top5"]))


def cell_key(row: dict) -> FeatureKey:
    block = row["block"]  # a block number, or a module path (read back from CSV as text)
    return FeatureKey(int(row["t"]), int(block) if str(block).isdigit() else str(block), int(row["pool"]))


def write_sweep(out: str | Path, rows: list[dict], title: str) -> dict:
    """sweep.csv, one heatmap PNG per pool size (block × t, selection top-1: what the choice
    saw), best.json. Returns the best row (chosen on the selection rows)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "sweep.csv", rows)
    best = choose_cell(rows)
    for pool in sorted({r["pool"] for r in rows}):
        cells = [r for r in rows if r["pool"] == pool]
        blocks = sorted({r["block"] for r in cells}, key=tap_order)
        ts = sorted({r["t"] for r in cells})
        grid = np.full((len(blocks), len(ts)), np.nan)
        for r in cells:
            grid[blocks.index(r["block"]), ts.index(r["t"])] = r["select_top1"]
        mark = (blocks.index(best["block"]), ts.index(best["t"])) if best["pool"] == pool else None
        heatmap(out / f"heatmap_pool{pool}.png", grid, [short_tap(b) for b in blocks], ts, f"{title}, pool {pool}×{pool}",
                ylabel="block or module", best=mark)  # fmt: skip
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


def cached_pixels(data: LabeledImages, store: FeatureStore, image_size: int, cache: Path) -> np.ndarray:
    """The pixels control's features of a store's images, computed once (cache: an .npy file, with
    a .json naming the images and size it holds: other rows of the same count are not read as these)."""
    key = {"rows": store.manifest["rows"]["selection"], "data": store.manifest["data"].get("fingerprint"), "image_size": int(image_size)}
    key_file = cache.with_suffix(".json")
    if cache.is_file() and key_file.is_file() and json.loads(key_file.read_text()) == key:
        return np.load(cache)
    pixels = pixel_features(data, store.indices, image_size)
    save_npy(cache, pixels)
    write_json(key_file, key)
    return pixels


def run_controls(backbone: Backbone, data: LabeledImages, reporting: Reporting, plan: FeaturePlan, best: CellScore,
                 out: str | Path, probe: str = "logreg", device: str = "cpu", options: ExtractOptions | None = None,
                 test_data: LabeledImages | None = None) -> dict:  # fmt: skip
    """The pixels and random-weights controls, searched as the pre-trained model was: the same
    architecture with random weights over every cell of `plan`, its own best chosen on the
    selection rows; both reported on the same report rows (or test set: `test_data`, the images
    of reporting.test), each against the pre-trained best as a paired difference. Under torchrun
    every rank extracts its share; rank 0 scores."""
    out = Path(out)
    store, options = reporting.store, options or ExtractOptions()
    random_backbone = backbone.random_like(seed=0)
    random_store = extract(random_backbone, data, plan, out / "control_random_weights", options.same_rows_as(store))
    random_test = None
    if reporting.test is not None:
        if test_data is None:
            raise DiffprobeError("the controls on a test store need its images: give the test data")
        random_test = extract(random_backbone, test_data, plan, out / "control_random_weights-test", options.same_rows_as(reporting.test))
    if not ranks().is_main:
        return {}
    pixels = cached_pixels(data, store, backbone.image_size, out / "control_pixels.npy")
    pixel_report = None
    if reporting.test is not None:
        pixel_report = (cached_pixels(test_data, reporting.test, backbone.image_size, out / "control_pixels-test.npy"), reporting.test.labels)
    random_reporting = Reporting(random_store, reporting.roles, random_test)
    rows, cells = score_store(random_reporting, plan.keys, probe, device)
    random_best = choose_cell(rows)
    controls = {"random_weights": (cells[cell_key(random_best)], {"setting": cell_key(random_best).stem, "cells": rows}),
                "pixels": (fast_probe(probe, pixels, store.labels, reporting.roles, device, pixel_report), {"features": int(pixels.shape[1])})}
    result = {}
    for name, (score, extra) in controls.items():
        entry = {**score.row(), **extra}
        report = score.report()
        if report is not None:
            entry["report"] = report.to_dict()
            entry["pretrained_minus_control"] = paired_difference(best.report_hits, score.report_hits).to_dict()
        result[name] = entry
    return result


def sweep(backbone: Backbone, data: LabeledImages, out: str | Path, plan: FeaturePlan, options: ExtractOptions | None = None,
          probe: str = "logreg", val_fraction: float = 0.1, split_seed: int = 0, controls: bool = True,
          train_heads: Sequence[str] = (), head_epochs: int | None = None,
          score_pools: Sequence[int] | None = None, report_share: float = REPORT_SHARE,
          test_data: LabeledImages | None = None, test_limit: int | None = None) -> dict:  # fmt: skip
    """Extract (resuming), score every cell, choose the best on the selection rows and report it
    on the report rows with its interval (features/roles.py), run the controls with their own
    search, train each head in `train_heads` on the chosen setting (run directories head-<kind>/),
    and write the report files.
    `test_data`: a test set (say the dataset's test split; `test_limit` images of it, stratified)
    extracted with the same plan into test-features/, which then reports instead of the
    report rows; with another dataset every held-out row selects.
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
    scored = [k for k in plan.keys if score_pools is None or k.pool in score_pools]
    if not scored:
        raise DiffprobeError(f"none of the pools {list(plan.pools)} is among the pools to score {list(score_pools or [])}")
    if test_data is not None:
        check_test_data(data, test_data)
    claim_output(out, "sweep", resumable=True)  # before any work: an unusable --out, or another run's, costs nothing
    store = extract(backbone, data, plan, out / "features", options)
    test_store = None
    if test_data is not None:
        test_store = extract(backbone, test_data, plan, out / "test-features", options.for_test_set(test_limit))
    reporting = Reporting.of(store, val_fraction, split_seed, report_share, test_store, "sweep")
    report_share = reporting.roles.report_share
    probe_device = str((options.compute or choose_compute()).device)
    share = ranks()  # under torchrun: every rank extracts, rank 0 scores, writes and trains heads
    best, cells = None, {}
    if share.is_main:
        rows, cells = score_store(reporting, scored, probe, probe_device)
        best = write_sweep(out, rows, f"{short_source(backbone.source)} on {data.name}: {probe} top-1 (selection rows)")
    best = share.broadcast(best if share.is_main else None)
    summary = {"backbone": backbone.source, "data": data.name, "rows": store.rows, "probe": probe, "roles": reporting.describe(),
               "val_fraction": val_fraction, "split_seed": split_seed, "report_share": report_share,
               "test_store": str(test_store.root) if test_store is not None else None, "best": best}  # fmt: skip
    if share.is_main:
        summary["cells"] = rows  # every scored cell (also in sweep.csv)
        report = cells[cell_key(best)].report()
        if report is not None:
            best["report"] = report.to_dict()
        write_json(out / "best.json", best)
    if controls:
        control_plan = FeaturePlan.from_keys(scored, plan.noise_seed, plan.draws)
        control = run_controls(backbone, data, reporting, control_plan, cells.get(cell_key(best)), out, probe, probe_device,
                               options, test_data)  # fmt: skip
        if control:  # rank 0's scores (other ranks only helped extract)
            summary["controls"] = control
    if not share.is_main:
        return summary
    if train_heads:
        from ..probing.config import ProbeConfig
        from ..probing.train import probe as train_probe

        summary["heads"] = {}
        for kind in train_heads:
            config = ProbeConfig(kind, epochs=head_epochs, val_fraction=val_fraction, split_seed=split_seed, report_share=report_share)
            metrics = train_probe(store, [cell_key(best)], out / f"head-{kind}", config, test_store, device=probe_device)
            summary["heads"][kind] = head_summary(metrics, out / f"head-{kind}")
    write_json(out / "summary.json", summary)
    return summary


def figures(select_top1: float, report: Interval | None, where: str = "report rows") -> dict[str, Any]:
    """A row's figures: the reported top-1 with its interval (or the selection score, said so);
    `where`: what the report rows are (Reporting.unit)."""
    if report is None:
        return {"top1": round(select_top1, 2), "low": None, "high": None, "scored_on": "selection rows (optimistic)",
                "select_top1": round(select_top1, 2)}  # fmt: skip
    return {"top1": round(report.estimate, 2), "low": round(report.low, 2), "high": round(report.high, 2),
            "scored_on": f"{report.rows} {where}", "select_top1": round(select_top1, 2)}  # fmt: skip


def head_summary(metrics: dict, run: Path) -> dict:
    """What a study keeps of a trained head: its selection score, its report interval, its run."""
    entry = {"select_top1": metrics["select"]["top1"], "select_top5": metrics["select"]["top5"], "run": str(run),
             "chosen": metrics["chosen"]}  # fmt: skip
    if "report" in metrics:
        entry["report"] = metrics["report"]["interval"]
    return entry


def headline(entry: dict) -> str:
    """A score as a report states it: the report interval, or the selection score said to be one."""
    if "report" in entry:
        r = entry["report"]
        return f"{r['estimate']:.2f}% [{r['low']:.2f}, {r['high']:.2f}] on {r['rows']} report images"
    return f"{entry['select_top1']:.2f}% (selection score: the rows that chose it, so optimistic)"


def describe_summary(summary: dict) -> str:
    best, roles = summary["best"], summary["roles"]
    lines = [f"best cell, chosen on {roles['select']} selection images: t={best['t']} block={best['block']} pool={best['pool']} "
             f"(selection top-1 {best['select_top1']:.2f}%)",
             f"{summary['probe']} top-1 at that cell: {headline(best)}"]  # fmt: skip
    if "controls" in summary:
        c = summary["controls"]
        lines.append(f"controls, each with its own search: random weights ({c['random_weights']['setting']}) "
                     f"{headline(c['random_weights'])}; raw pixels {headline(c['pixels'])}")  # fmt: skip
        for name in ("random_weights", "pixels"):
            if "pretrained_minus_control" in c[name]:
                lines.append("  " + compare("pre-trained", name.replace("_", " "), Interval(**c[name]["pretrained_minus_control"])))
    for kind, h in summary.get("heads", {}).items():
        where = f"on {', '.join(h['inputs'])}" if h.get("inputs") else "at the best cell"
        lines.append(f"{kind} head {where}: top-1 {headline(h)} (run: {h['run']})")
    if not roles.get("report_images", roles["report"]):
        lines.append("no report rows: every figure above is a selection score; give --report-share > 0 or a test set for unbiased ones")
    return "\n".join(lines)

"""`diffprobe compare-heads`: every head in both recipes against L-BFGS logistic regression,
on the same stored features and the same train / select / report rows (features/roles.py).

The table the README's "Heads" section shows: one row per (head, recipe) with its top-1 on the
report rows and its interval, the learning rate, weight decay and epoch chosen on the selection
rows, and whether it is separable from logistic regression (paired); plus a bar chart. Linear,
MLP, CNN and attention heads read one (t, block, pool) cell; the fusion head reads that cell
and the same block at a second timestep.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from .._io import output_dir, write_csv, write_json
from ..errors import DiffprobeError
from ..features.store import FeatureKey, FeatureStore
from ..features.reporting import Reporting
from ..features.roles import REPORT_SHARE
from ..probing.config import ProbeConfig
from ..probing.intervals import Interval, compare, paired_difference
from ..report import head_bars
from .sweep import cell_score, figures

HEAD_KINDS = ("linear", "mlp", "cnn", "attention", "fusion")
RECIPES = ("modern", "paper")


def compare_heads(store: FeatureStore, key: FeatureKey, out: str | Path, heads: Sequence[str] = HEAD_KINDS,
                  recipes: Sequence[str] = RECIPES, fusion_t: int | None = None, val_fraction: float = 0.1,
                  split_seed: int = 0, seed: int = 0, device: str = "cpu", report_share: float = REPORT_SHARE,
                  test_store: FeatureStore | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """Train each head in each recipe on `key` (fusion: `key` + the same block at `fusion_t`),
    each choosing on the selection rows and reported on the report rows (or `test_store`) with
    its interval and its paired difference against logistic regression; write heads.csv,
    heads.json, heads.png and one run directory per (head, recipe)."""
    from ..probing.train import fit_head, report_head, save_run

    if "fusion" in heads and fusion_t is None:
        raise DiffprobeError("the fusion head needs a second timestep: give --fusion-t")
    reporting = Reporting.of(store, val_fraction, split_seed, report_share, test_store, "compare-heads")
    roles = reporting.roles
    reporting.require([key] + ([FeatureKey(fusion_t, key.block, key.pool)] if "fusion" in heads else []))
    out = output_dir(out)
    started = time.time()
    reference = cell_score("logreg", reporting, key, device)
    rows = [{"head": "logistic regression (L-BFGS)", "recipe": "-", "inputs": key.stem, **figures(reference.select.top1, reference.report(), reporting.unit),
             "chosen": f"C={reference.select.params['C']:.3g}", "seconds": round(time.time() - started, 1)}]  # fmt: skip
    jobs = [(kind, recipe) for kind in heads for recipe in recipes]
    for kind, recipe in tqdm(jobs, desc="heads", unit="run"):
        keys = [key] + ([FeatureKey(fusion_t, key.block, key.pool)] if kind == "fusion" else [])
        started = time.time()
        config = ProbeConfig(kind, recipe, val_fraction=val_fraction, split_seed=split_seed, seed=seed, report_share=roles.report_share)
        fitted = fit_head(store, keys, config, device, progress=False)
        hits = report_head(fitted, reporting)  # a test store's figures go into the run's metrics
        save_run(fitted, out / f"{kind}-{recipe}")
        chosen = fitted.metrics["chosen"]
        row = {"head": kind, "recipe": recipe, "inputs": ", ".join(k.stem for k in keys),
               **figures(fitted.metrics["select"]["top1"], Interval(**fitted.metrics["report"]["interval"]) if reporting.reports else None,
                         reporting.unit),
               "chosen": f"lr={chosen['lr']:g} wd={chosen['weight_decay']:g} epoch={chosen['epoch']}/{chosen['epochs_trained']}",
               "seconds": round(time.time() - started, 1)}  # fmt: skip
        if reporting.reports:
            diff = paired_difference(hits, reference.report_hits)
            row["vs_logreg"] = compare(f"{kind} ({recipe})", "logistic regression", diff)
        rows.append(row)
    write_csv(out / "heads.csv", rows)
    write_json(out / "heads.json", {"store": str(store.root), "rows": store.rows, "roles": reporting.describe(), "results": rows})
    shown = f"{reporting.rows} {reporting.unit}" if reporting.reports else f"{len(roles.select)} selection images, optimistic"
    fused = f" (fusion: + t{fusion_t:04d})" if "fusion" in heads else ""
    head_bars(out / "heads.png", rows, f"heads on {key.stem}{fused}, top-1 on {shown}")
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| head | recipe | inputs | top-1 (95% interval) | scored on | selection top-1 | chosen on the selection rows |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        ci = f" [{r['low']:.2f}, {r['high']:.2f}]" if r["low"] is not None else ""
        lines.append(f"| {r['head']} | {r['recipe']} | {r['inputs']} | {r['top1']:.2f}%{ci} | {r['scored_on']} | "
                     f"{r['select_top1']:.2f}% | {r['chosen']} |")  # fmt: skip
    verdicts = [r["vs_logreg"] for r in rows if r.get("vs_logreg")]
    return "\n".join(lines + ([""] + [f"- {v}" for v in verdicts] if verdicts else []))

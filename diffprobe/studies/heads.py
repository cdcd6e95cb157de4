"""`diffprobe compare-heads`: every head in both recipes against L-BFGS logistic regression,
on the same stored features and the same validation split.

The table the README's "Heads" section shows: one row per (head, recipe) with validation top-1
and the learning rate, weight decay and epoch chosen on validation, plus a bar chart. Linear,
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
from ..probing.config import ProbeConfig
from ..report import head_bars
from .sweep import fast_probe

HEAD_KINDS = ("linear", "mlp", "cnn", "attention", "fusion")
RECIPES = ("modern", "paper")


def compare_heads(store: FeatureStore, key: FeatureKey, out: str | Path, heads: Sequence[str] = HEAD_KINDS,
                  recipes: Sequence[str] = RECIPES, fusion_t: int | None = None, val_fraction: float = 0.1,
                  split_seed: int = 0, seed: int = 0, device: str = "cpu") -> list[dict[str, Any]]:  # fmt: skip
    """Train each head in each recipe on `key` (fusion: `key` + the same block at `fusion_t`);
    write heads.csv, heads.json, heads.png and one run directory per (head, recipe)."""
    from ..probing.train import fit_head, save_run

    out = output_dir(out)
    if "fusion" in heads and fusion_t is None:
        raise DiffprobeError("the fusion head needs a second timestep: give --fusion-t")
    is_val = store.split(val_fraction, split_seed)
    started = time.time()
    score = fast_probe("logreg", store.load(key), store.labels, is_val, device)
    rows = [{"head": "logistic regression (L-BFGS)", "recipe": "-", "inputs": key.stem, "val_top1": round(score.top1, 2),
             "val_top5": round(score.top5, 2), "chosen": f"C={score.params['C']:.3g}", "seconds": round(time.time() - started, 1)}]
    jobs = [(kind, recipe) for kind in heads for recipe in recipes]
    for kind, recipe in tqdm(jobs, desc="heads", unit="run"):
        keys = [key] + ([FeatureKey(fusion_t, key.block, key.pool)] if kind == "fusion" else [])
        started = time.time()
        fitted = fit_head(store, keys, ProbeConfig(kind, recipe, val_fraction=val_fraction, split_seed=split_seed, seed=seed),
                          device, progress=False)  # fmt: skip
        save_run(fitted, out / f"{kind}-{recipe}")
        chosen = fitted.metrics["chosen"]
        rows.append({"head": kind, "recipe": recipe, "inputs": ", ".join(k.stem for k in keys),
                     "val_top1": round(fitted.metrics["val"]["top1"], 2), "val_top5": round(fitted.metrics["val"]["top5"], 2),
                     "chosen": f"lr={chosen['lr']:g} wd={chosen['weight_decay']:g} epoch={chosen['epoch']}/{chosen['epochs_trained']}",
                     "seconds": round(time.time() - started, 1)})  # fmt: skip
    write_csv(out / "heads.csv", rows)
    write_json(out / "heads.json", {"store": str(store.root), "rows": store.rows, "val_rows": int(is_val.sum()),
                                    "val_fraction": val_fraction, "split_seed": split_seed, "results": rows})  # fmt: skip
    head_bars(out / "heads.png", rows, f"heads on {key.stem} ({int(is_val.sum())} validation images)")
    return rows


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| head | recipe | inputs | validation top-1 | chosen on validation |", "|---|---|---|---|---|"]
    lines += [f"| {r['head']} | {r['recipe']} | {r['inputs']} | {r['val_top1']:.2f}% | {r['chosen']} |" for r in rows]
    return "\n".join(lines)

"""One backbone setting, several datasets, one table: the paper's transfer study."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..backbones.base import Backbone
from ..data import open_dataset
from ..errors import DiffprobeError
from ..features.extract import ExtractOptions, extract
from ..features.plan import FeaturePlan
from .._io import output_dir, write_csv
from ..precision import choose_compute
from .sweep import fast_probe, run_controls


def transfer(backbone: Backbone, datasets: Sequence[str], out: str | Path, plan: FeaturePlan,
             options: ExtractOptions | None = None, probe: str = "logreg", val_fraction: float = 0.1, split_seed: int = 0,
             data_root: str | None = None, download: bool = False, split: str = "train",
             controls: bool = True) -> list[dict]:  # fmt: skip
    """Extract the plan's one setting on each dataset (stores under out/<name>/), score it with the
    fast probe on a stratified validation split (with the pixels and random-weight controls), and
    write transfer.csv and transfer.md."""
    out = Path(out)
    options = options or ExtractOptions()
    plan = plan.resolve(backbone)
    if len(plan.keys) != 1:
        raise DiffprobeError("transfer takes one setting: a single --t, --blocks and --pool")
    key = plan.keys[0]
    probe_device = str((options.compute or choose_compute()).device)
    if options.augment_views:
        raise DiffprobeError("transfer scores centre-crop features: drop --augment-views")
    output_dir(out)
    rows = []
    for spec in datasets:
        data = open_dataset(spec, root=data_root, split=split, download=download)
        store = extract(backbone, data, plan, out / data.name, options)
        score = fast_probe(probe, store.load(key), store.labels, store.split(val_fraction, split_seed), probe_device)
        row = {"dataset": data.name, "images": store.rows, "classes": len(data.classes), "setting": key.stem,
               "probe": probe, "top1": round(score.top1, 2), "top5": round(score.top5, 2)}  # fmt: skip
        if controls:
            best = {"t": key.t, "block": key.block, "pool": key.pool}
            ctrl = run_controls(backbone, data, store, best, out / data.name, probe, val_fraction, split_seed, probe_device, options)
            row.update(pixels_top1=round(ctrl["pixels"]["top1"], 2), random_weights_top1=round(ctrl["random_weights"]["top1"], 2))
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "transfer.csv", rows)
    lines = [f"Transfer of {backbone.source} at {key.stem} ({probe} probe, {val_fraction:.0%} stratified validation split)", "",
             "| dataset | images | classes | top-1 % | top-5 % | raw pixels top-1 % | random weights top-1 % |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    lines += [f"| {r['dataset']} | {r['images']} | {r['classes']} | {r['top1']:.2f} | {r['top5']:.2f} | "
              f"{r.get('pixels_top1', '–')} | {r.get('random_weights_top1', '–')} |" for r in rows]  # fmt: skip
    (out / "transfer.md").write_text("\n".join(lines) + "\n")
    return rows

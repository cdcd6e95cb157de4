"""One backbone setting, several datasets, one table: the paper's transfer study."""

from __future__ import annotations

import hashlib
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


def distinct_names(specs: Sequence[str], names: Sequence[str]) -> list[str]:
    """One store folder name per dataset. Names that collide (a/cifar and b/cifar are both "cifar")
    take their parent folders' names in front until they differ: the stores would otherwise be one
    folder holding two datasets' features, which no run could ever finish."""
    specs = [str(s) for s in specs]
    duplicates = sorted({s for s in specs if specs.count(s) > 1})
    if duplicates:
        raise DiffprobeError(f"--datasets lists {duplicates[0]} more than once: name each dataset once")
    out = list(names)
    for depth in range(1, 1 + max(len(Path(s).resolve().parts) for s in specs)):
        clash = {n for n in out if out.count(n) > 1}
        if not clash:
            break
        for i, (spec, name) in enumerate(zip(specs, names)):
            if out[i] in clash and not spec.startswith("torchvision:"):
                parents = Path(spec).resolve().parent.parts[-depth:]
                out[i] = "-".join([*(p.strip("/") or "root" for p in parents), name])
    clash = {n for n in out if out.count(n) > 1}
    for i, spec in enumerate(specs):  # left over (say a folder named like a torchvision dataset): a short hash
        if out[i] in clash:
            out[i] = f"{out[i]}-{hashlib.sha256(spec.encode()).hexdigest()[:6]}"
    return out


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
    opened = [open_dataset(spec, root=data_root, split=split, download=download) for spec in datasets]
    rows = []
    for data, name in zip(opened, distinct_names(datasets, [d.name for d in opened])):
        store = extract(backbone, data, plan, out / name, options)
        score = fast_probe(probe, store.load(key), store.labels, store.split(val_fraction, split_seed), probe_device)
        row = {"dataset": name, "images": store.rows, "classes": len(data.classes), "setting": key.stem,
               "probe": probe, "top1": round(score.top1, 2), "top5": round(score.top5, 2)}  # fmt: skip
        if controls:
            best = {"t": key.t, "block": key.block, "pool": key.pool}
            ctrl = run_controls(backbone, data, store, best, out / name, probe, val_fraction, split_seed, probe_device, options)
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

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
from .._io import output_dir, write_csv, write_text
from ..precision import choose_compute
from ..features.reporting import Reporting, check_test_data
from ..features.roles import REPORT_SHARE
from ..probing.intervals import Interval, compare
from ..report import short_source, transfer_bars
from .sweep import cell_score, figures, run_controls


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
             controls: bool = True, report_share: float = REPORT_SHARE, test_split: str | None = None,
             test_limit: int | None = None) -> list[dict]:  # fmt: skip
    """Extract the plan's one setting on each dataset (stores under out/<name>/), score it with the
    fast probe (C chosen on the selection rows, top-1 with its interval on the report rows, or on
    each dataset's `test_split` (stores out/<name>-test/, `test_limit` images each) when given;
    with the pixels and random-weight controls, each against the setting as a paired
    difference), and write transfer.csv, transfer.md and transfer.png (bars with intervals)."""
    out = Path(out)
    options = options or ExtractOptions()
    plan = plan.resolve(backbone)
    if len(plan.keys) != 1:
        raise DiffprobeError("transfer takes one setting: a single --t, --blocks and --pool")
    key = plan.keys[0]
    probe_device = str((options.compute or choose_compute()).device)
    if options.augment_views:
        raise DiffprobeError("transfer scores centre-crop features: drop --augment-views")
    opened = [open_dataset(spec, root=data_root, split=split, download=download) for spec in datasets]
    tests: list = [None] * len(opened)
    if test_split is not None:  # every test set opened and checked before anything is written
        tests = [open_dataset(spec, root=data_root, split=test_split, download=download) for spec in datasets]
        for data, test in zip(opened, tests):
            check_test_data(data, test)
    output_dir(out)
    rows = []
    for data, test_data, name in zip(opened, tests, distinct_names(datasets, [d.name for d in opened])):
        store = extract(backbone, data, plan, out / name, options)
        test_store = None
        if test_data is not None:
            test_store = extract(backbone, test_data, plan, out / f"{name}-test", options.for_test_set(test_limit))
        reporting = Reporting.of(store, val_fraction, split_seed, report_share, test_store, f"transfer to {name}")
        score = cell_score(probe, reporting, key, probe_device)
        row = {"dataset": name, "images": store.rows, "classes": len(data.classes), "setting": key.stem,
               "probe": probe, **figures(score.select.top1, score.report(), reporting.unit)}  # fmt: skip
        if controls:  # one setting: the controls have nothing to search either
            ctrl = run_controls(backbone, data, reporting, plan, score, out / name, probe, probe_device, options, test_data)
            for control in ("pixels", "random_weights"):
                c = ctrl[control]
                row[f"{control}_top1"] = round(c["report"]["estimate"] if "report" in c else c["select_top1"], 2)
                if "pretrained_minus_control" in c:
                    row[f"vs_{control}"] = compare(key.stem, control.replace("_", " "), Interval(**c["pretrained_minus_control"]))
        rows.append(row)
    out.mkdir(parents=True, exist_ok=True)
    write_csv(out / "transfer.csv", rows)
    lines = [f"Transfer of {backbone.source} at {key.stem} ({probe} probe; its C chosen on the selection rows, top-1 with a "
             f"95% bootstrap interval on rows no choice saw: a {val_fraction:.0%} stratified held-out split, "
             + (f"all of it selecting; every dataset's '{test_split}' split reports)" if test_split else f"{report_share:.0%} of it reporting)"),
             "",
             "| dataset | images | classes | top-1 % (95% interval) | scored on | raw pixels top-1 % | random weights top-1 % |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        ci = f" [{r['low']:.2f}, {r['high']:.2f}]" if r["low"] is not None else ""
        lines.append(f"| {r['dataset']} | {r['images']} | {r['classes']} | {r['top1']:.2f}{ci} | {r['scored_on']} | "
                     f"{r.get('pixels_top1', '–')} | {r.get('random_weights_top1', '–')} |")  # fmt: skip
    verdicts = [f"- {r['dataset']}: {r[k]}" for r in rows for k in ("vs_random_weights", "vs_pixels") if r.get(k)]
    lines += [""] + verdicts if verdicts else []
    write_text(out / "transfer.md", "\n".join(lines) + "\n")
    shown = f"{test_split} splits" if test_split else "report rows"
    transfer_bars(out / "transfer.png", rows, f"{short_source(backbone.source)} at {key.stem}: {probe} top-1 on each dataset's {shown}")
    return rows

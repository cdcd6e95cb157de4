"""`diffprobe compare`: several backbones (diffusion models and image encoders) on one dataset,
one stratified split and seed, one table, as the paper's Table 1 sets ADM beside BigBiGAN, SimCLR,
SwAV, MAE and MAGE.

Each backbone gets its own `sweep` (blocks × timesteps × pools, the cell chosen on the selection
rows only) in OUT/<name>/, then the heads on its chosen cell; every figure is scored on the same
report rows (or the same test set). A finished backbone is not recomputed; a backbone whose rows or
roles differ from the others' is refused, so the table's rows are comparable.

    backbone | params | generative? | best block / t | fast probe | linear | attention
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from .._io import claim_output, write_csv, write_json, write_text
from ..errors import DiffprobeError
from ..features.plan import FeaturePlan
from ..features.roles import REPORT_SHARE, store_roles
from ..features.store import FeatureStore

log = logging.getLogger(__name__)
PER_BACKBONE = ("blocks", "t", "pool", "name")  # options of one entry that compare reads; the rest go to load_backbone


@dataclass
class Entry:
    """One backbone of a comparison: `SPEC@key=value,key=value` on the command line."""

    spec: str
    options: dict[str, Any] = field(default_factory=dict)  # load_backbone's
    blocks: str | None = None  # this backbone's block list (default: the comparison's)
    t: str | None = None
    pool: str | None = None
    name: str | None = None

    @classmethod
    def parse(cls, text: str) -> "Entry":
        spec, _, rest = text.partition("@")
        entry = cls(spec)
        for item in [i for i in re.split(r",(?=[A-Za-z_]+=)", rest) if i] if rest else []:
            key, sep, value = item.partition("=")
            if not sep:
                raise DiffprobeError(f"{text}: options after @ are key=value pairs separated by commas, got {item!r}")
            if key in PER_BACKBONE:
                setattr(entry, key, value)
            else:
                entry.options[key] = value
        return entry

    @property
    def folder(self) -> str:
        """A file-system name for this entry (its own `name=` when given)."""
        if self.name:
            return self.name
        text = self.spec.split(":", 1)[-1].rstrip("/")
        base = Path(text).stem if Path(text).suffix in (".pt", ".pth", ".safetensors") else text
        if Path(text).name in ("ema.pt", "model.pt"):
            base = f"{Path(text).parent.name}-{Path(text).stem}"
        slug = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{self.spec.split(':', 1)[0]}-{base}").strip("-")
        return slug + ("-random" if self.options.get("weights") == "random" else "")


def split_identity(store, val_fraction: float, split_seed: int, report_share: float) -> tuple[str, dict[str, int]]:
    """A hash of the rows a store holds (dataset indices and labels) and the roles they play."""
    roles = store_roles(store, val_fraction, split_seed, report_share)
    h = hashlib.sha256()
    for part in (np.asarray(store.indices, np.int64), np.asarray(store.labels, np.int64), roles.train, roles.select, roles.report):
        h.update(np.ascontiguousarray(part).astype(np.int64).tobytes())
    return h.hexdigest()[:16], roles.describe()


def compare(entries: Sequence[Entry], data, out: str | Path, t: Sequence[int] = (10, 50, 150), blocks: str = "all",
            pools: Sequence[int] = (1, 2), heads: Sequence[str] = ("linear", "attention"), options=None,
            val_fraction: float = 0.1, split_seed: int = 0, report_share: float = REPORT_SHARE, probe: str = "logreg",
            controls: bool = False, head_epochs: int | None = None, test_data=None, test_limit: int | None = None) -> list[dict]:  # fmt: skip
    """Sweep each backbone on `data` with one split, then write compare.csv/.json/.md/.png."""
    from ..backbones import load_backbone
    from .sweep import sweep

    if len(entries) < 1:
        raise DiffprobeError("compare needs at least one backbone")
    folders = [e.folder for e in entries]
    if len(set(folders)) != len(folders):
        raise DiffprobeError(f"two backbones would share the folder {next(f for f in folders if folders.count(f) > 1)!r}: "
                             "give one of them @name=…")  # fmt: skip
    out = Path(out)
    claim_output(out, "compare", resumable=True)
    rows, split = [], None
    for entry, folder in zip(entries, folders):
        where = out / folder
        done = where / "summary.json"
        recorded = where / "compare-entry.json"
        # Everything that changes this backbone's row: a rerun with other settings recomputes it.
        wanted = {"spec": entry.spec, "options": entry.options, "blocks": entry.blocks or blocks, "t": entry.t or list(t),
                  "pool": entry.pool or list(pools), "heads": list(heads), "head_epochs": head_epochs, "probe": probe,
                  "data": data.name}  # fmt: skip
        if done.is_file() and recorded.is_file() and json.loads(recorded.read_text()) == wanted:
            log.info("%s: finished before, read from %s", entry.spec, done)
            summary = json.loads(done.read_text())
            info = json.loads(recorded.with_name("compare-backbone.json").read_text())
        else:
            backbone = load_backbone(entry.spec, **entry.options)
            generative = backbone.generative
            entry_t = entry.t if entry.t is not None else (list(t) if generative else None)
            plan = FeaturePlan(t=entry_t or (), blocks=entry.blocks or blocks, pools=entry.pool or pools)
            summary = sweep(backbone, data, where, plan, options, probe=probe, val_fraction=val_fraction, split_seed=split_seed,
                            controls=controls, train_heads=heads, head_epochs=head_epochs, report_share=report_share,
                            test_data=test_data, test_limit=test_limit)  # fmt: skip
            info = {"params": int(sum(p.numel() for p in backbone.model.parameters())), "generative": generative,
                    "random_weights": backbone.random_weights, "family": backbone.family}  # fmt: skip
            write_json(where / "compare-backbone.json", info)
            write_json(recorded, wanted)
        identity, described = split_identity(FeatureStore.open(where / "features"), val_fraction, split_seed, report_share)
        if split is None:
            split = (identity, entry.spec, described)
        elif identity != split[0]:
            raise DiffprobeError(f"{entry.spec} was probed on other rows or roles than {split[1]} ({described} against "
                                 f"{split[2]}): a comparison needs one dataset and one split; use a new --out")  # fmt: skip
        rows.append(table_row(entry, summary, info))
    write_table(out, rows, data.name, split, test_data is not None)
    return rows


def _figure(entry: dict | None) -> dict[str, Any]:
    """top-1 with its interval where report rows scored it; else the selection score, marked."""
    if not entry:
        return {"top1": None, "low": None, "high": None, "on": None}
    report = entry.get("report")
    if report:
        return {"top1": round(report["estimate"], 2), "low": round(report["low"], 2), "high": round(report["high"], 2), "on": "report"}
    return {"top1": round(entry["select_top1"], 2), "low": None, "high": None, "on": "selection (optimistic)"}


def table_row(entry: Entry, summary: dict, info: dict) -> dict[str, Any]:
    best = summary["best"]
    label = entry.name or summary["backbone"]
    if info.get("random_weights") and "random" not in label:
        label += " (random weights)"
    setting = f"block {best['block']}" + (f" / t={best['t']}" if info["generative"] else " / clean image")
    heads = summary.get("heads") or {}
    return {"backbone": label, "params_M": round(info["params"] / 1e6, 2), "generative": "yes" if info["generative"] else "no",
            "best": f"{setting}, pool {best['pool']}",
            "fast_probe": _figure(best), **{kind: _figure(h) for kind, h in heads.items()}}  # fmt: skip


def _cell(figure: dict) -> str:
    if figure["top1"] is None:
        return "–"
    interval = f" [{figure['low']:.2f}, {figure['high']:.2f}]" if figure["low"] is not None else " (selection rows)"
    return f"{figure['top1']:.2f}%{interval}"


def write_table(out: Path, rows: list[dict], data_name: str, split: tuple, tested: bool) -> None:
    from ..report import compare_bars

    kinds = [k for k in ("fast_probe", "linear", "mlp", "cnn", "attention") if any(k in r for r in rows)]
    flat = [{"backbone": r["backbone"], "params_M": r["params_M"], "generative": r["generative"], "best": r["best"],
             **{f"{k}_{part}": r.get(k, {}).get(part) for k in kinds for part in ("top1", "low", "high", "on")}} for r in rows]  # fmt: skip
    write_csv(out / "compare.csv", flat)
    write_json(out / "compare.json", {"data": data_name, "split": {"identity": split[0], **split[2]}, "rows": rows})
    names = {"fast_probe": "fast probe (logreg)", "linear": "linear", "attention": "attention", "mlp": "MLP", "cnn": "CNN"}
    lines = ["| backbone | params (M) | generative? | best block / t | " + " | ".join(names[k] for k in kinds) + " |",
             "|---|---|---|---|" + "---|" * len(kinds)]
    lines += [f"| {r['backbone']} | {r['params_M']} | {r['generative']} | {r['best']} | "
              + " | ".join(_cell(r.get(k) or _figure(None)) for k in kinds) + " |" for r in rows]  # fmt: skip
    rows_note = ("a test set" if tested else f"{split[2]['report']} report rows" if split[2]["report"]
                 else "the selection rows (no report rows: optimistic)")  # fmt: skip
    lines += ["", f"Every backbone: the same {split[2]['train']} training and {split[2]['select']} selection rows of {data_name} "
              f"(split {split[0]}); cells and epochs chosen on the selection rows, top-1 with its 95% bootstrap interval on {rows_note}."]
    write_text(out / "compare.md", "\n".join(lines) + "\n")
    compare_bars(out / "compare.png", rows, kinds, [names[k] for k in kinds], f"{data_name}: top-1 on {rows_note}")

"""`diffprobe export`: a pretrain run → a shippable checkpoint folder with its model card.

The folder holds the EMA weights as a guided-diffusion state_dict (`ema.pt`, with `ema.json`
naming the flags and the training behind them, so `adm:FOLDER/ema.pt` loads with nothing else
and `pretrain --init-from FOLDER/ema.pt` warm-starts from it), the loss curve, a sample grid,
the validation-split probe results (a sweep with its controls), `card.json` (machine-readable)
and `MODEL_CARD.md`.

The card states: the linear probe (logistic regression) on the validation split with its two
controls; the attention head's top-1 (from `diffprobe demo`, added with `diffprobe card
--demo`); FID against the validation split (from `diffprobe fid --val-only`, added with
`diffprobe card --fid`: only ever a number computed with the real Inception weights); the
training cost (steps, images seen, hours, hardware), summed over warm starts. What was not
measured says so; no number stands in for it.

`diffprobe card FOLDER` rewrites card.json and MODEL_CARD.md from card.json and the folder's
files, without rerunning anything.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from ..backbones import load_backbone
from ..data import LabeledImages, cache_dir
from ..errors import DiffprobeError
from ..features.store import FeatureKey
from ..features.extract import ExtractOptions
from ..features.plan import FeaturePlan
from ..precision import choose_compute
from .._io import output_dir, read_json_object, torch_save, write_csv, write_text
from ..report import loss_curve
from .fid import INCEPTION_FILE
from .pretrain import CHECKPOINT_NAME, file_sha256, training_segments

SIZE_BUDGET_BYTES = 25 * 1024 * 1024  # what a checkpoint inside the repository may weigh


def export_run(run: str | Path, dest: str | Path, data: LabeledImages, limit: int | None = None,
               blocks: Sequence[int] = (4, 8, 13, 16, 18, 20), timesteps: Sequence[int] = (10, 50, 150),
               pools: Sequence[int] = (1, 2), samples: int = 64, hardware: str | None = None,
               notes: str = "") -> dict[str, Any]:  # fmt: skip
    from .sample import sample_grid
    from ..studies.sweep import sweep

    run, dest = Path(run), Path(dest)
    if not (run / "ema.pt").is_file() or not (run / CHECKPOINT_NAME).is_file():
        raise DiffprobeError(f"{run} is not a pretrain run (expected ema.pt and {CHECKPOINT_NAME}): pass the --out folder of `diffprobe pretrain`")
    output_dir(dest)
    blob = torch.load(run / CHECKPOINT_NAME, map_location="cpu", weights_only=True)
    config, state = blob["config"], blob["state"]
    history = loss_history(run, config)  # read first: dest may be the warm start's own folder, rewritten below
    weights = torch.load(run / "ema.pt", map_location="cpu", weights_only=True)
    params = sum(v.numel() for v in weights.values())
    # float32 when it fits the budget; else float16 (loads into the float32 model unchanged in shape).
    half = params * 4 > SIZE_BUDGET_BYTES
    if half:
        weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    torch_save(weights, dest / "ema.pt")
    training = training_segments(config, state)
    if hardware:  # what the user says it ran on replaces the run's own description of its last segment
        training[-1]["hardware"] = hardware
    side = json.loads((run / "ema.json").read_text())
    side["stored_dtype"] = "float16" if half else "float32"
    side["training"] = training  # a warm start from this file counts on from here
    (dest / "ema.json").write_text(json.dumps(side, indent=2) + "\n")
    write_csv(dest / "loss.csv", history)
    loss_curve(dest / "loss.png", history)

    spec = f"adm:{dest / 'ema.pt'}"
    compute = choose_compute()
    backbone = load_backbone(spec)
    # Features and samples behind the card live in the cache, not beside the shipped files.
    work = cache_dir() / "export" / f"{dest.resolve().name}-{state['step']}"
    summary = sweep(backbone, data, work / "sweep", FeaturePlan(t=timesteps, blocks=blocks, pools=pools),
                    ExtractOptions(limit=limit, compute=compute))  # fmt: skip
    copy_probe_files(work / "sweep", dest)
    shutil.copy(sample_grid(backbone, work / "samples", samples, 100, compute), dest / "samples.png")

    card = {"summary": f"ADM trained by diffprobe on CIFAR-10, {state['step']} steps", "config": config,
            "training": training, "probe": summary, "attention": None, "fid": None, "notes": notes}  # fmt: skip
    write_card(dest, card)
    return card


def loss_history(run: Path, config: dict[str, Any]) -> list[dict[str, Any]]:
    """The run's loss.csv rows, after those of the checkpoint it was warm-started from (its folder's
    loss.csv, up to the warm start's step) when that file is there, so a card's curve covers all
    of the training behind its weights."""
    own = read_csv_rows(run / "loss.csv")
    init = config.get("init_from") or {}
    earlier = Path(init["path"]).parent / "loss.csv" if init else None
    if earlier is None or not earlier.is_file():
        return own
    return [r for r in read_csv_rows(earlier) if r["step"] <= init["step"]] + own


def read_csv_rows(path: Path) -> list[dict[str, Any]]:
    import csv

    with open(path) as f:
        return [{k: (int(v) if k == "step" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


# ------------------------------------------------------------------------------ the card's facts


def training_facts(segments: list[dict[str, Any]], train_rows: int) -> dict[str, str]:
    """Steps, images seen, hours and hardware, summed over the segments (a run and its warm starts)."""
    steps = sum(s["steps"] for s in segments)
    known = [s for s in segments if s.get("images_seen") is not None]
    images = sum(s["images_seen"] for s in known)
    unknown_images = steps - sum(s["steps"] for s in known)
    hours = [s["hours"] for s in segments if s.get("hours") is not None]
    facts = {
        "steps": f"{steps} ({images / train_rows:.2f} epochs)" if not unknown_images else f"{steps}",
        "images seen": " + ".join(f"{s['images_seen']:,} ({s['steps']} steps × batch {s['batch_size']})" for s in known)
                       + (f" + unknown ({unknown_images} steps of unrecorded batch size)" if unknown_images else "")
                       + (f" = {images:,}" if len(known) > 1 and not unknown_images else ""),
        "wall time": f"{sum(hours):.2f} h of training" + ("" if len(hours) == len(segments) else " (plus segments whose time was not recorded)"),
        "hardware": "; then ".join(dict.fromkeys(s.get("hardware") or "not recorded" for s in segments)),
    }  # fmt: skip
    if len(segments) > 1:
        parts = []
        for i, seg in enumerate(segments, 1):
            hw = seg.get("hardware") or "hardware not recorded"
            h = f"{seg['hours']:.2f} h" if seg.get("hours") is not None else "time not recorded"
            text = f"{i}. {seg['steps']} steps × batch {seg.get('batch_size') or '?'}, {h} on {hw}"
            if seg.get("warm_start"):
                w = seg["warm_start"]
                text += (f" (warm start from {w['path']}, sha256 {w['sha256'][:12]}…, at step {w['step']}: fresh AdamW "
                         "moments and learning-rate warm-up, online weights and EMA both from its EMA)")  # fmt: skip
            parts.append(text)
        facts["training segments"] = "; ".join(parts)
    return facts


def objective_fact(config: dict[str, Any], segments: list[dict[str, Any]]) -> str:
    """The loss of the last run, and of earlier segments where they differ (a warm start may change it)."""

    def name(weighting: str | None, gamma: float | None) -> str:
        if weighting == "min-snr":
            return f"ε-prediction, MSE weighted min(SNR, {gamma:g})/SNR (Min-SNR-γ)"
        return "ε-prediction, simple MSE"

    last = name(config.get("loss_weighting", "uniform"), config.get("snr_gamma"))
    earlier = {name(s.get("loss_weighting", "uniform"), s.get("snr_gamma")) for s in segments[:-1]}
    if earlier and earlier != {last}:
        return f"{last} (segments before the last: {'; '.join(sorted(earlier))})"
    return last


def scored(entry: dict[str, Any]) -> str:
    """A probe figure as the card states it: top-1 on report rows with its interval, or a score
    of the older protocol (chosen and scored on the same validation rows), said so."""
    if "report" in entry:
        r = entry["report"]
        return f"{r['estimate']:.2f}% top-1 [{r['low']:.2f}, {r['high']:.2f}] on {r['rows']} report images no choice saw"
    if "select_top1" in entry:
        return f"{entry['select_top1']:.2f}% top-1 on the selection rows (optimistic: they chose it)"
    return f"{entry['top1']:.2f}% top-1 (chosen and scored on the same validation rows, so optimistic)"


def probe_fact(summary: dict[str, Any]) -> str:
    """The card's probe line: the cell, chosen where, and its score where no choice was made."""
    best, roles = summary["best"], summary.get("roles")
    cell = f"best t={best['t']} block {best['block']} pool {best['pool']}"
    if not roles or "report" not in best:
        return f"logistic regression on {summary['rows']} images: {cell}: {scored(best)}"
    return (f"logistic regression on {roles['train']} training images, {cell} chosen on {roles['select']} selection images "
            f"({best['select_top1']:.2f}%): {scored(best)}")  # fmt: skip


def attention_fact(attention: dict[str, Any] | None) -> str:
    if not attention:
        return "not measured yet (`diffprobe demo` trains it; add it with `diffprobe card FOLDER --demo runs/demo/demo.json`)"
    p = attention["pool"]
    where = f"t={attention['t']} block {attention['block']}, its map pooled to {p}×{p} ({p * p} token{'s' if p > 1 else ''}"
    where += "; 1×1 is the global average, not the spatial map)" if p == 1 else ")"
    if "report" in attention:
        return f"{scored(attention)}, {where} (`diffprobe demo`: {attention['source']})"
    return (f"{attention['top1']:.2f}% top-1 ({attention['top5']:.2f}% top-5), {where}, on {attention['rows']} images, "
            f"chosen and scored on the same validation rows (`diffprobe demo`: {attention['source']})")  # fmt: skip


def fid_fact(fid: dict[str, Any] | None) -> str:
    if fid:
        made = fid.get("samples_info") or {}
        how = f", {made['sampler'].upper()} {made['steps']} steps, seed {made['seed']}" if made.get("sampler") else ""
        return (f"{fid['fid']:.2f}: {fid['num_samples']} samples{how} vs {fid['num_real']} images of the validation split "
                f"(torchmetrics / TF-FID Inception, {fid['inception_weights']}; `{fid['source']}`)")  # fmt: skip
    if not (Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE).is_file():
        return "not computed: no Inception weights available offline"
    return "not computed yet (`diffprobe fid SAMPLES.npz --real DATA --val-only --out fid.json`, then `diffprobe card FOLDER --fid fid.json`)"


def card_facts(dest: Path, card: dict[str, Any]) -> dict[str, str]:
    """Every line of the card's table, from card.json's fields and the folder's files."""
    config, summary = card["config"], card["probe"]
    side = json.loads((dest / "ema.json").read_text())
    weights = torch.load(dest / "ema.pt", map_location="cpu", weights_only=True, mmap=True)
    params = sum(v.numel() for v in weights.values())
    last = read_csv_rows(dest / "loss.csv")[-1]
    controls = summary["controls"]
    facts = {
        "architecture": "ADM U-Net (guided-diffusion layout), " + ", ".join(f"{k}={v}" for k, v in side["flags"].items()),
        "parameters": f"{params / 1e6:.2f}M, stored as {side['stored_dtype']} ({(dest / 'ema.pt').stat().st_size / 2**20:.1f} MiB, "
                      f"sha256 {card['sha256'][:12]}…)",
        "training data": f"{summary['data']}: {config['train_rows']} images (all but the stratified validation split, "
                         f"fraction {config.get('val_fraction', config.get('holdout_fraction'))}, seed {config.get('split_seed', config.get('holdout_seed'))})",
        "objective": objective_fact(config, card["training"]) + (" + λ·L_vlb (learned sigma)" if side["flags"].get("learn_sigma") else ""),
        "optimiser": f"AdamW lr {config['lr']}, warm-up {config['warmup_steps']} steps, weight decay {config['weight_decay']}, "
                     f"grad clip {config['grad_clip']}, batch {config['batch_size']}, EMA {config['ema_decay']} (warmed up), "
                     f"random flips {config['hflip']}",
        **training_facts(card["training"], config["train_rows"]),
        "final training loss": f"{float(last['loss']):.4f} (loss.csv's last row, step {last['step']}: the mean since the row before; curve: loss.png)",
        "probe (validation split)": probe_fact(summary),
        "controls": f"random weights {scored(controls['random_weights'])}, raw pixels {scored(controls['pixels'])}",
        "attention head (validation split)": attention_fact(card.get("attention")),
        "FID (validation split)": fid_fact(card.get("fid")),
    }  # fmt: skip
    return facts


def write_card(dest: Path, card: dict[str, Any]) -> None:
    """card.json and MODEL_CARD.md, the facts computed afresh from the card's fields."""
    card.setdefault("attention", None)  # null until measured: the card says "not measured", never a stand-in
    card.setdefault("fid", None)
    card["sha256"] = file_sha256(dest / "ema.pt")
    card["summary"] = f"ADM trained by diffprobe on CIFAR-10, {sum(s['steps'] for s in card['training'])} steps"
    card["facts"] = card_facts(dest, card)
    order = ["summary", "facts", "config", "training", "probe", "attention", "fid", "sha256", "notes"]
    card = {k: card[k] for k in order if k in card} | {k: v for k, v in card.items() if k not in order}
    write_text(dest / "card.json", json.dumps(card, indent=1, default=float) + "\n")
    write_model_card(dest, card)


# ------------------------------------------------------------------------------ `diffprobe card`: refresh


def refresh_card(dest: str | Path, demo: str | Path | None = None, fid: str | Path | None = None,
                 probe: str | Path | None = None) -> dict[str, Any]:  # fmt: skip
    """Rewrite a checkpoint folder's card from its card.json, adding the attention head of a
    `diffprobe demo` run (its demo.json), a `diffprobe fid --val-only` result and the probe
    figures of a `diffprobe sweep` (its summary.json), each checked to be of this checkpoint and
    this validation split."""
    dest = Path(dest)
    path = dest / "card.json"
    if not path.is_file() or not (dest / "ema.pt").is_file():
        raise DiffprobeError(f"{dest} is not a checkpoint folder (expected card.json and ema.pt from diffprobe export)")
    card = read_json_object(path, "restore it, or export the folder again (diffprobe export)")
    try:
        if "training" not in card:  # cards of diffprobe 0.2: the training record lives in ema.json (or only the step count)
            side = read_json_object(dest / "ema.json", "restore it beside ema.pt")
            card["training"] = side.get("training") or [{"steps": side["step"], "batch_size": card["config"]["batch_size"],
                                                        "images_seen": side["step"] * card["config"]["batch_size"],
                                                        "hours": None, "hardware": None}]  # fmt: skip
        sha = file_sha256(dest / "ema.pt")
        config = card["config"]
        split = (config.get("val_fraction", config.get("holdout_fraction")), config.get("split_seed", config.get("holdout_seed")))
        if demo is not None:
            card["attention"] = attention_from_demo(Path(demo), sha, split)
        if fid is not None:
            card["fid"] = fid_result(Path(fid), sha, split, config["data_fingerprint"])
        if probe is not None:
            card["probe"] = probe_from_sweep(Path(probe), sha, split)
            copy_probe_files(Path(probe).parent, dest)
        write_card(dest, card)
    except (KeyError, TypeError, AttributeError, IndexError) as e:  # a hand-edited or truncated card.json / ema.json
        what = f"lacks the key {e.args[0]!r}" if isinstance(e, KeyError) else f"is damaged ({type(e).__name__}: {e})"
        raise DiffprobeError(f"{path} (or its ema.json, loss.csv) {what}: restore it, or export the folder again (diffprobe export)") from None
    return card


def _same_checkpoint(path: str, sha: str, what: str) -> None:
    if not Path(path).is_file():
        raise DiffprobeError(f"cannot check that {what} is of this checkpoint: {path} is not on this machine (run it here)")
    if file_sha256(path) != sha:
        raise DiffprobeError(f"{what} was made with {path}, not this checkpoint's ema.pt (sha256 differs)")


PROBE_FILES = ("sweep.csv", "heatmap_pool1.png", "heatmap_pool2.png", "summary.json")  # shipped as probe_<name>


def copy_probe_files(sweep_dir: Path, dest: Path) -> None:
    """The sweep's table, heatmaps and summary beside the card (probe_*), replacing older ones."""
    for name in PROBE_FILES:
        (dest / f"probe_{name}").unlink(missing_ok=True)
        if (sweep_dir / name).is_file():
            shutil.copy(sweep_dir / name, dest / f"probe_{name}")


def probe_from_sweep(path: Path, sha: str, split: tuple[Any, Any]) -> dict[str, Any]:
    """A sweep's summary.json as the card's probe: of this checkpoint, on its validation split,
    reported on rows no choice saw (a selection score never goes on a card as a result)."""
    summary = read_json_object(path, "pass the summary.json written by diffprobe sweep")
    missing = [k for k in ("backbone", "data", "rows", "val_fraction", "split_seed", "best", "controls") if k not in summary]
    if missing:
        raise DiffprobeError(f"{path} is not a sweep summary with its controls (no {', '.join(missing)}): pass the "
                             "summary.json of `diffprobe sweep` run without --no-controls")  # fmt: skip
    family, _, target = str(summary["backbone"]).partition(":")
    if family != "adm":
        raise DiffprobeError(f"{path} is a sweep of {summary['backbone']}, not of an ADM checkpoint")
    _same_checkpoint(target, sha, f"the sweep {path}")
    if (summary["val_fraction"], summary["split_seed"]) != tuple(split):
        raise DiffprobeError(f"{path} held out another split (fraction {summary['val_fraction']}, seed {summary['split_seed']}; "
                             f"the checkpoint left out fraction {split[0]}, seed {split[1]}): its rows may include training images")  # fmt: skip
    if "report" not in summary["best"]:
        raise DiffprobeError(f"{path} has no report rows (a selection score, optimistic): sweep with --report-share > 0 or --test-data")
    return {**summary, "source": str(path)}


def attention_from_demo(demo: Path, sha: str, split: tuple[Any, Any]) -> dict[str, Any]:
    result = read_json_object(demo, "pass runs/demo/demo.json, the result of diffprobe demo")
    sweep = result.get("sweep")
    missing = [k for k in ("checkpoint", "data", "sweep") if k not in result]
    if isinstance(sweep, dict):
        missing += [f"sweep.{k}" for k in ("val_fraction", "split_seed", "best", "rows") if k not in sweep]
    elif "sweep" in result:
        missing.append("sweep as an object")
    if missing:
        raise DiffprobeError(f"{demo} is not a demo result (no {', '.join(missing)}): pass runs/demo/demo.json")
    heads = sweep.get("heads") or {}
    if "attention" not in heads:
        raise DiffprobeError(f"{demo} has no attention head (the demo ran with --heads without attention)")
    _same_checkpoint(result["checkpoint"], sha, f"the demo {demo}")
    if (sweep["val_fraction"], sweep["split_seed"]) != tuple(split):
        raise DiffprobeError(f"{demo} validated on another split (fraction {sweep['val_fraction']}, seed {sweep['split_seed']}; "
                             f"the checkpoint left out fraction {split[0]}, seed {split[1]})")  # fmt: skip
    head = heads["attention"]
    best = dict(sweep["best"])
    if head.get("inputs"):  # the demo's heads read the best block's map: the cell is in their inputs
        key = FeatureKey.parse(head["inputs"][0])
        best.update(t=key.t, block=key.block, pool=key.pool)
    scores = {k: head[k] for k in ("report", "select_top1", "top1", "top5") if k in head}  # "top1": demos before the report rows
    return {**scores, "t": best["t"], "block": best["block"], "pool": best["pool"],
            "rows": sweep["rows"], "data": result["data"], "source": str(demo), "run": head.get("run")}  # fmt: skip


def fid_result(path: Path, sha: str, split: tuple[Any, Any], data_fingerprint: str) -> dict[str, Any]:
    fid = read_json_object(path, "pass the fid.json written by diffprobe fid")
    try:
        value = float(fid["fid"])
    except (TypeError, ValueError, KeyError) as e:
        raise DiffprobeError(f"cannot read a FID result from {path} ({type(e).__name__}: {e}): pass the --out of diffprobe fid") from None
    real = fid.get("real_split") or {}
    if real.get("split") != "validation" or (real.get("val_fraction"), real.get("split_seed")) != tuple(split):
        raise DiffprobeError(f"{path} is not against the checkpoint's validation split (fraction {split[0]}, seed {split[1]}): "
                             "rerun diffprobe fid with --val-only")  # fmt: skip
    if fid.get("real_fingerprint") != data_fingerprint:
        raise DiffprobeError(f"{path} compares with other images ({fid.get('real')}) than the checkpoint was trained on")
    source = (fid.get("samples_info") or {}).get("source", "")
    if not source.startswith("adm:"):
        raise DiffprobeError(f"cannot tell which model made {fid.get('samples')} (no samples.json from diffprobe sample beside it)")
    _same_checkpoint(source[len("adm:"):], sha, f"the samples {fid['samples']}")
    return {**fid, "fid": value, "source": str(path)}


def write_model_card(dest: Path, card: dict[str, Any]) -> None:
    facts = card["facts"]
    lines = ["# diffprobe-cifar10: the default checkpoint", "",
             "A denoising diffusion model trained with `diffprobe pretrain` on the CIFAR-10 images in "
             "`../shared/data/cifar10-train.tar.gz`, minus the validation split every diffprobe probe scores on. "
             "Load it with `adm:checkpoints/diffprobe-cifar10/ema.pt` (flags in `ema.json`).", "",
             "| | |", "|---|---|"]  # fmt: skip
    lines += [f"| {k} | {v} |" for k, v in facts.items()]
    lines += ["", "## Loss", "", "![loss](loss.png) (`loss.csv`)", "",
              "## Samples (DDIM, 100 steps or the whole schedule if shorter, seed 0)", "", "![samples](samples.png)", "",
              "## Probes on the validation split (`probe_sweep.csv`, `probe_summary.json`)", "",
              "The heatmaps show each cell's score on the rows that chose the best cell (selection rows where the "
              "sweep had report rows); the figures in the table above are the chosen cell's on rows no choice saw.", "",
              "![pool 1](probe_heatmap_pool1.png) ![pool 2](probe_heatmap_pool2.png)", ""]  # fmt: skip
    if card.get("notes"):
        lines += ["## Notes", "", card["notes"], ""]
    write_text(dest / "MODEL_CARD.md", "\n".join(lines))

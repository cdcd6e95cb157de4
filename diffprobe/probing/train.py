"""Training and evaluating heads on stored features; the saved run that `predict` loads.

A run directory holds:
    config.json    everything needed to rebuild the head and the backbone setting
    head.pt        head weights + the feature standardisation (a plain state dict)
    metrics.json   top-1/top-5 on the selection rows (which chose epoch, learning rate and weight decay) and
                   on the report rows or test store (with a bootstrap interval), per-class accuracy, the roles
    curves.png, confusion.png
"""

from __future__ import annotations

import copy
import math
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import __version__
from ..errors import DiffprobeError
from .fastprobe import topk
from .rows import load_inputs, standardization
from .heads import build_head, head_options
from .._io import claim_output, output_dir, output_errors, read_json_object, torch_save, write_json
from ..features.distributed import join, ranks
from ..features.plan import FeaturePlan
from ..features.reporting import Reporting, check_same_backbone, check_same_backbone_manifest
from ..features.roles import store_roles
from .intervals import accuracy_interval
from ..precision import resolve_device
from .config import ProbeConfig, Recipe
from ..report import confusion_matrix_plot, training_curves
from ..features.store import FeatureKey, FeatureStore

log = logging.getLogger(__name__)
RUN_FORMAT = 1
DIVERGED = 10.0  # a final training loss this many times chance's marks a run that blew up


def _lr_at(recipe: Recipe, epoch: float) -> float:
    if recipe.schedule == "step":
        return recipe.lr * recipe.gamma ** int(epoch // recipe.step_every)
    if epoch < recipe.warmup_epochs:
        return recipe.lr * (epoch + 1e-3) / recipe.warmup_epochs
    span = max(recipe.epochs - recipe.warmup_epochs, 1e-9)
    return 0.5 * recipe.lr * (1 + np.cos(np.pi * (epoch - recipe.warmup_epochs) / span))


def input_shapes(store: FeatureStore, keys: Sequence[FeatureKey]) -> list[tuple[int, int]]:
    return [(int(store.open_array(k).shape[1]) // (k.pool * k.pool), k.pool) for k in keys]


class FeatureHead(torch.nn.Module):
    """A head plus the standardisation of its inputs, so a saved run is self-contained."""

    def __init__(self, head: torch.nn.Module, means: Sequence[torch.Tensor], stds: Sequence[torch.Tensor], fusion: bool):
        super().__init__()
        self.head, self.fusion = head, fusion
        for i, (m, s) in enumerate(zip(means, stds)):
            self.register_buffer(f"mean{i}", m.reshape(1, -1).clone())
            self.register_buffer(f"std{i}", s.reshape(1, -1).clone())
        self.n_inputs = len(means)

    def forward(self, xs: Sequence[torch.Tensor] | torch.Tensor) -> torch.Tensor:
        xs = [xs] if isinstance(xs, torch.Tensor) else xs
        xs = [(x - getattr(self, f"mean{i}")) / getattr(self, f"std{i}") for i, x in enumerate(xs)]
        return self.head(xs) if self.fusion else self.head(xs[0])


def _evaluate(model: FeatureHead, xs: list[torch.Tensor], y: torch.Tensor, batch: int = 1024) -> tuple[float, float, float, torch.Tensor]:
    model.eval()
    logits = []
    with torch.no_grad():
        for start in range(0, len(y), batch):
            logits.append(model([x[start:start + batch] for x in xs]))
    out = torch.cat(logits)
    return F.cross_entropy(out, y).item(), topk(out, y, 1), topk(out, y, 5), out


def augmented_rows(store: FeatureStore, augmented: FeatureStore, train_rows: np.ndarray) -> np.ndarray:
    """[K, n_train] row numbers in the augmented store: view v of each training image."""
    check_same_backbone(store, augmented, "augmented")
    k = int(augmented.manifest["transform"].get("views", 0))
    if k < 1:
        raise DiffprobeError(f"{augmented.root} holds no augmented views (extract it with --augment-views K)")
    first_row = {int(idx): row for row, idx in enumerate(augmented.indices[::k])}
    wanted = store.indices[train_rows]
    missing = [int(i) for i in wanted if int(i) not in first_row]
    if missing:
        raise DiffprobeError(f"{augmented.root} lacks views of {len(missing)} training images (e.g. dataset index {missing[0]}): extract it over the same images")
    base = np.array([first_row[int(i)] * k for i in wanted])
    return base[None, :] + np.arange(k)[:, None]


def train_once(store: FeatureStore, keys: Sequence[FeatureKey], head_kind: str, recipe: Recipe, weight_decay: float,
               train_rows: np.ndarray, val_rows: np.ndarray, seed: int, head_options: dict,
               device: str = "cpu", progress: bool = True,
               augmented: FeatureStore | None = None) -> tuple[FeatureHead, list[dict], int]:  # fmt: skip
    """Train for the recipe's epochs; return the head at its best validation epoch and the history.

    With an augmented store, each epoch shows every training image as one of its cached views,
    drawn at random per image and epoch (from the seed).

    Under torchrun the head trains with DistributedDataParallel: every rank draws the same
    epoch order from the seed, takes its share of each batch (rank r: items r, r + N, ...), and
    scales its summed loss so that DDP's gradient average is the one-process batch's mean
    gradient. So N ranks take the same optimiser steps as one process (up to float rounding),
    with the same global batch. (torch's DistributedSampler would shard whole epochs instead,
    giving other batches than the one-process run.)"""
    share = ranks()
    torch.manual_seed(seed)
    recipe = recipe.for_rows(len(train_rows))
    labels = torch.from_numpy(store.labels)
    xs_train = load_inputs(store, keys, train_rows)
    xs_val = load_inputs(store, keys, val_rows)
    y_train, y_val = labels[train_rows], labels[val_rows]
    scalers = [standardization(x) for x in xs_train]  # fitted on the clean (centre-crop) training features
    num_classes = len(store.classes)
    head = build_head(head_kind, input_shapes(store, keys), num_classes, **head_options)
    model = FeatureHead(head, [m for m, _ in scalers], [s for _, s in scalers], head_kind == "fusion").to(device)
    views = None
    if augmented is not None:
        view_rows = augmented_rows(store, augmented, train_rows)  # [K, n]
        xs_train = [torch.from_numpy(augmented.load(k, view_rows.reshape(-1))).reshape(*view_rows.shape, -1) for k in keys]
        views = view_rows.shape[0]
    xs_train = [x.to(device) for x in xs_train]
    xs_val = [x.to(device) for x in xs_val]
    y_train, y_val = y_train.to(device), y_val.to(device)
    net = model
    if share.group:
        from torch.nn.parallel import DistributedDataParallel

        if device.startswith("cuda"):
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)  # batch statistics over the global batch
        net = DistributedDataParallel(net, device_ids=[torch.device(device).index] if device.startswith("cuda") else None)
    decay = [p for n, p in model.named_parameters() if p.ndim > 1]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if recipe.optimizer == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum)
    else:
        opt = torch.optim.AdamW(groups, lr=recipe.lr)
    gen = torch.Generator().manual_seed(seed)
    n = len(y_train)
    steps_per_epoch = max(1, -(-n // recipe.batch_size))
    history, best_state, best_epoch, best_top1 = [], None, 0, -1.0
    check_every = max(1, recipe.epochs // 100)
    bar = tqdm(range(recipe.epochs), desc=f"{head_kind} {recipe.name} lr={recipe.lr:g} wd={weight_decay:g}", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        model.train()
        order = torch.randperm(n, generator=gen).to(device)
        if views is not None:
            pick = torch.randint(views, (n,), generator=gen).to(device)
            epoch_inputs = [x[pick, torch.arange(n, device=device)] for x in xs_train]
        else:
            epoch_inputs = xs_train
        total_loss, correct = 0.0, 0
        for step in range(steps_per_epoch):
            for group in opt.param_groups:
                group["lr"] = _lr_at(recipe, epoch + step / steps_per_epoch)
            idx = order[step * recipe.batch_size:(step + 1) * recipe.batch_size]
            if len(idx) < 2 * share.world_size and n >= 2 * share.world_size:
                continue  # BatchNorm cannot train on a batch of one (per rank)
            mine = idx[share.rank::share.world_size]
            logits = net([x[mine] for x in epoch_inputs])
            loss = F.cross_entropy(logits, y_train[mine], reduction="sum", label_smoothing=recipe.label_smoothing)
            loss = loss * (share.world_size / len(idx))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += loss.item() * len(idx) / share.world_size
            correct += (logits.argmax(1) == y_train[mine]).sum().item()
        if share.group:  # the epoch's training loss and accuracy over every rank's share
            sums = torch.tensor([total_loss, float(correct)], dtype=torch.float64, device=y_train.device)
            torch.distributed.all_reduce(sums)
            total_loss, correct = sums[0].item(), int(sums[1].item())
        if (epoch + 1) % check_every and epoch + 1 != recipe.epochs:
            continue  # long floors (hundreds of epochs on a small store) are checked ~100 times, not every epoch
        val_loss, val_top1, val_top5, _ = _evaluate(model, xs_val, y_val)
        history.append({"epoch": epoch + 1, "train_loss": total_loss / n, "train_top1": 100.0 * correct / n,
                        "select_loss": val_loss, "select_top1": val_top1, "select_top5": val_top5})  # fmt: skip
        if val_top1 > best_top1:
            best_top1, best_epoch, best_state = val_top1, epoch + 1, copy.deepcopy(model.state_dict())
        bar.set_postfix(select_top1=f"{val_top1:.1f}")
    model.load_state_dict(best_state)
    return model.cpu(), history, best_epoch


def per_class_report(logits: torch.Tensor, y: torch.Tensor, classes: Sequence[str]) -> tuple[dict, np.ndarray]:
    pred = logits.argmax(1).cpu().numpy()
    truth = y.cpu().numpy()
    k = len(classes)
    matrix = np.zeros((k, k), dtype=np.int64)
    np.add.at(matrix, (truth, pred), 1)
    per_class = {c: (100.0 * matrix[i, i] / matrix[i].sum() if matrix[i].sum() else None) for i, c in enumerate(classes)}
    return per_class, matrix


@dataclass
class FittedHead:
    """What training a head on a store gives back, in memory: nothing is written until `save_run`."""

    model: FeatureHead
    keys: list[FeatureKey]
    config: ProbeConfig
    metrics: dict[str, Any]
    confusion: np.ndarray
    input_shapes: list[tuple[int, int]]
    classes: list[str]
    store_manifest: dict[str, Any]
    store_root: str
    augmented_root: str | None = None


def check_keys(store: FeatureStore, keys: Sequence[FeatureKey], head: str) -> None:
    available = set(store.complete_keys())
    for k in keys:
        if k not in available:
            have = ", ".join(x.stem for x in sorted(available)) or "none"
            raise DiffprobeError(f"{store.root} has no complete features for t={k.t} block={k.block} pool={k.pool} (complete: {have})")
    if head != "fusion" and len(keys) != 1:
        raise DiffprobeError(f"the {head} head takes one --t/--blocks/--pool setting; use --head fusion for several")
    warn_if_one_token(head, [k.pool for k in keys])


def check_two_classes(train_labels: np.ndarray, classes: Sequence[str], source: str) -> None:
    """A head trained on one class scores 100% on it and knows nothing: refuse, as the fast probes do."""
    present = np.unique(train_labels)
    if len(present) < 2:
        only = classes[int(present[0])] if len(present) else "none"
        raise DiffprobeError(f"the training rows of {source} hold a single class ({only}, of {len(classes)} in the dataset): "
                             "nothing to classify; extract images of at least two classes")  # fmt: skip


def divergence(history: list[dict], num_classes: int) -> str | None:
    """Why a training run blew up, or None. A non-finite loss, or a final training loss far above
    chance's ln(K) (a head that learns ends below it), means the learning rate was too high."""
    last = history[-1]
    chance = math.log(max(num_classes, 2))
    if not (math.isfinite(last["train_loss"]) and math.isfinite(last["select_loss"])) or last["train_loss"] > DIVERGED * chance:
        return (f"final training loss {last['train_loss']:.3g}, selection-row loss {last['select_loss']:.3g} "
                f"(chance is {chance:.2f})")  # fmt: skip
    return None


def warn_if_one_token(head: str, pools: Sequence[int]) -> None:
    """Spatial heads on a 1×1 pooled map see one token: nothing to attend to or convolve over."""
    if head in ("attention", "cnn", "fusion", "diffeed") and all(p == 1 for p in pools):
        log.warning("the %s head on pool 1 sees a single token, so it is an MLP in disguise: give it the block's map "
                    "(--pool ≥ 2, or the full resolution; the paper's attention head reads 16×16)", head)  # fmt: skip


def fit_head(store: FeatureStore, keys: Sequence[FeatureKey], config: ProbeConfig, device: str = "cpu",
             progress: bool = True, augmented: FeatureStore | None = None) -> FittedHead:  # fmt: skip
    """Train on the train split, choose epoch, learning rate and weight decay on validation; validation metrics.
    Under torchrun every rank trains its share of each batch (DDP) and all reach the same head."""
    join("auto", torch.device(device))
    keys = list(keys)
    check_keys(store, keys, config.head)
    roles = store_roles(store, config.val_fraction, config.split_seed, config.report_share).check(f"a head on {store.root}")
    train_rows, val_rows = roles.train, roles.select  # epoch, learning rate and weight decay are chosen on the select rows
    check_two_classes(store.labels[train_rows], store.classes, str(store.root))
    trials, diverged = [], []  # every (lr, weight decay) of the search, in order; ties keep the first
    for recipe in config.training_recipes():
        for wd in config.weight_decays:
            model, history, best_epoch = train_once(store, keys, config.head, recipe, wd, train_rows, val_rows, config.seed,
                                                    config.options, device, progress, augmented)  # fmt: skip
            blown = divergence(history, len(store.classes))
            if blown:
                diverged.append(f"lr {recipe.lr:g}, weight decay {wd:g} ({blown})")
                log.warning("training diverged at lr %g, weight decay %g (%s): left out of the choice", recipe.lr, wd, blown)
                continue
            trials.append((max(h["select_top1"] for h in history), recipe.lr, wd, model, history, best_epoch))
    if not trials:  # a diverged head scores like chance, or worse: never a number to report
        raise DiffprobeError(f"training diverged at {'; '.join(diverged)}: lower --lr (or leave it out to use the recipe's search)")
    best_top1, best_lr, best_wd, model, history, best_epoch = max(trials, key=lambda tr: tr[0])

    labels = torch.from_numpy(store.labels)
    _, sel_top1, sel_top5, _ = _evaluate(model, load_inputs(store, keys, val_rows), labels[val_rows])
    metrics: dict[str, Any] = {
        "select": {"top1": sel_top1, "top5": sel_top5, "rows": int(len(val_rows))},
        "chosen": {"epoch": best_epoch, "weight_decay": best_wd, "lr": best_lr, "epochs_trained": history[-1]["epoch"]},
        "trials": [{"lr": lr, "weight_decay": wd, "select_top1": top1, "epoch": ep} for top1, lr, wd, _, _, ep in trials],
        "roles": roles.describe(),
        "train_rows": int(len(train_rows)),
        "history": history,
    }
    shown = roles.report if roles.has_report else val_rows  # the confusion matrix of the rows that report, if any
    report, matrix = report_metrics(model, load_inputs(store, keys, shown), labels[shown], store.classes)
    if roles.has_report:
        metrics["report"] = {**report, "source": f"held-out report rows of {store.root}"}
    else:
        metrics["select"]["per_class_top1"] = report["per_class_top1"]
    return FittedHead(model, keys, config, metrics, matrix, input_shapes(store, keys), store.classes, store.manifest,
                      str(store.root), str(augmented.root) if augmented is not None else None)  # fmt: skip


def report_metrics(model: FeatureHead, xs: list[torch.Tensor], y: torch.Tensor, classes: Sequence[str]) -> tuple[dict[str, Any], np.ndarray]:
    """A head's figures on rows no choice saw (see report_from_logits) and their confusion matrix."""
    return report_from_logits(_evaluate(model, xs, y)[3], y, classes)


def report_from_logits(logits: torch.Tensor, y: torch.Tensor, classes: Sequence[str]) -> tuple[dict[str, Any], np.ndarray]:
    """Top-1 with its bootstrap interval, top-5 and per-class top-1; the confusion matrix."""
    logits, y = logits.cpu(), y.cpu()
    per_class, matrix = per_class_report(logits, y, classes)
    interval = accuracy_interval((logits.argmax(1) == y).numpy())
    figures = {"top1": topk(logits, y, 1), "top5": topk(logits, y, 5), "rows": int(len(y)), "interval": interval.to_dict(),
               "per_class_top1": per_class}  # fmt: skip
    return figures, matrix


def _scored(fitted: FittedHead, store: FeatureStore, rows: np.ndarray | None) -> tuple[dict[str, Any], np.ndarray]:
    """One pass of a fitted head over rows of a store of its backbone and noise (default: all):
    its figures (top-1 with its interval, top-5, per class) and each row's top-1 hit."""
    check_same_backbone_manifest(fitted.store_manifest, fitted.store_root, store)
    if store.classes != fitted.classes:
        raise DiffprobeError(f"store {store.root} has other classes than the one the head was trained on")
    rows = np.arange(store.rows) if rows is None else np.asarray(rows)
    labels = torch.from_numpy(store.labels)[rows]
    logits = _evaluate(fitted.model, load_inputs(store, fitted.keys, rows), labels)[3]
    return report_from_logits(logits, labels, store.classes)[0], (logits.argmax(1) == labels.to(logits.device)).cpu().numpy()


def evaluate_store(fitted: FittedHead, store: FeatureStore, rows: np.ndarray | None = None) -> dict[str, Any]:
    """Top-1 (with its interval) and top-5 of a fitted head on rows of another store of the same
    backbone and noise (default: all of them)."""
    return _scored(fitted, store, rows)[0]


def report_head(fitted: FittedHead, reporting: Reporting) -> np.ndarray:
    """Score a fitted head where `reporting` says, in one pass: a test store's figures replace
    metrics["report"] (fit_head computed the report rows' own); each reporting row's top-1 hit,
    for paired comparisons (empty when nothing reports)."""
    if reporting.test is not None:
        figures, hits = _scored(fitted, reporting.test, None)
        fitted.metrics["report"] = {**figures, "source": reporting.source()}
        return hits
    if not reporting.roles.has_report:
        return np.zeros(0, dtype=bool)
    return _scored(fitted, reporting.store, reporting.roles.report)[1]


def shown_score(metrics: dict[str, Any]) -> str:
    """The figure a plot or a line states: the report rows' top-1, else the selection score, said so."""
    if "report" in metrics:
        return f"report top-1 {metrics['report']['top1']:.1f}% ({metrics['report']['rows']} images)"
    return f"selection top-1 {metrics['select']['top1']:.1f}% (optimistic: these rows chose it)"


def save_run(fitted: FittedHead, out: str | Path) -> Path:
    """The run directory `diffprobe predict` and `Probe.load` read (see the module docstring)."""
    out = output_dir(out)
    m, cfg = fitted.store_manifest, fitted.config
    recipe = cfg.training_recipe()
    recipe = replace(recipe, lr=fitted.metrics.get("chosen", {}).get("lr", recipe.lr))  # the rate the search kept
    config = {
        "format": RUN_FORMAT,
        "diffprobe": __version__,
        "head": cfg.head,
        "head_options": cfg.options,
        "input_shapes": fitted.input_shapes,
        "keys": [asdict(k) for k in fitted.keys],
        "plan": FeaturePlan.from_keys(fitted.keys, m["noise"]["seed"], m["noise"]["draws"]).to_dict(),
        "probe_config": cfg.to_dict(),
        "recipe": asdict(recipe),
        "weight_decays": list(cfg.weight_decays),
        "val_fraction": cfg.val_fraction,
        "split_seed": cfg.split_seed,
        "seed": cfg.seed,
        "classes": fitted.classes,
        "store": fitted.store_root,
        "augmented_store": fitted.augmented_root,
        "backbone": m["backbone"],
        "loaded_with": m.get("loaded_with", {}),
        "noise": m["noise"],
        "transform": m["transform"],
        "precision": m["precision"],
    }
    with output_errors(out, "--out"):  # a disk that fills up during the run
        write_json(out / "config.json", config)
        torch_save(fitted.model.state_dict(), out / "head.pt")
        write_json(out / "metrics.json", fitted.metrics)
        setting = ", ".join(k.stem for k in fitted.keys)
        training_curves(out / "curves.png", fitted.metrics["history"], f"{cfg.head} head, {recipe.name} recipe, {setting}",
                        chosen_epoch=fitted.metrics.get("chosen", {}).get("epoch"))  # fmt: skip
        confusion_matrix_plot(out / "confusion.png", fitted.confusion, fitted.classes,
                              f"{cfg.head} head, {shown_score(fitted.metrics)}")  # fmt: skip
    return out


def probe(store: FeatureStore, keys: Sequence[FeatureKey], out: str | Path, config: ProbeConfig | None = None,
          test_store: FeatureStore | None = None, device: str = "auto", progress: bool = True,
          augmented: FeatureStore | None = None, overwrite: bool = False) -> dict:  # fmt: skip
    """`diffprobe probe`: fit a head, score the test store if given, save the run; its metrics.
    An --out that already holds a run is refused unless `overwrite`."""
    config = config or ProbeConfig()
    if test_store is not None:  # checked before any training, so a bad test store costs nothing
        reporting = Reporting.of(store, config.val_fraction, config.split_seed, config.report_share, test_store, f"a head on {store.root}")
        config = replace(config, report_share=reporting.roles.report_share)
    if ranks().is_main:
        claim_output(out, "probe", overwrite=overwrite)  # before any training: an unusable or taken --out costs nothing
    fitted = fit_head(store, keys, config, str(resolve_device(device)), progress, augmented)
    if test_store is not None:
        report_head(fitted, reporting)
    if ranks().is_main:  # under torchrun every rank holds the same head; one writes the run
        save_run(fitted, out)
    return fitted.metrics


def read_run_json(path: Path, required: bool = True) -> dict:
    """A run's JSON file as a dict, or one error naming the file (damaged, edited, not JSON)."""
    if not path.is_file():
        if required:
            raise DiffprobeError(f"{path.parent} is not a probe run (expected {path.name}): run `diffprobe probe` first")
        return {}
    return read_json_object(path, "restore it from the run, or train the run again")


def load_run(run_dir: str | Path) -> tuple[dict, FeatureHead]:
    """A saved run's config and its head (with standardisation), ready for inference."""
    run_dir = Path(run_dir)
    cfg_path, weights = run_dir / "config.json", run_dir / "head.pt"
    if not cfg_path.is_file() or not weights.is_file():
        raise DiffprobeError(f"{run_dir} is not a probe run (expected config.json and head.pt): run `diffprobe probe` first")
    config = read_run_json(cfg_path)
    if config.get("format") != RUN_FORMAT:
        raise DiffprobeError(f"{run_dir} was written by an incompatible diffprobe (run format {config.get('format')}, expected {RUN_FORMAT})")
    try:
        shapes = [(int(c), int(p)) for c, p in config["input_shapes"]]
        classes = [str(c) for c in config["classes"]]
        head = build_head(config["head"], shapes, len(classes), **head_options(config["head"], **config["head_options"]))
    except KeyError as e:
        raise DiffprobeError(f"{cfg_path} lacks the key {e.args[0]!r}: restore the file, or train the run again") from None
    except (TypeError, ValueError) as e:
        raise DiffprobeError(f"{cfg_path} does not describe a head ({e}): restore the file, or train the run again") from None
    except DiffprobeError as e:
        raise DiffprobeError(f"{cfg_path} does not describe a head this diffprobe builds: {e}") from None
    dims = [c * p * p for c, p in shapes]
    model = FeatureHead(head, [torch.zeros(d) for d in dims], [torch.ones(d) for d in dims], config["head"] == "fusion")
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except Exception as e:  # a shape mismatch (RuntimeError) or a damaged file (UnpicklingError, EOFError, OSError)
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise DiffprobeError(f"{weights} does not fit the head described in config.json, or is damaged ({first}): "
                             "train the run again") from None  # fmt: skip
    return config, model.eval()

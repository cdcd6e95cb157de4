"""Training and evaluating heads on stored features; the saved run that `predict` loads.

A run directory holds:
    config.json    everything needed to rebuild the head and the backbone setting
    head.pt        head weights + the feature standardisation (a plain state dict)
    metrics.json   validation (and test) top-1/top-5, per-class accuracy, chosen epoch and weight decay
    curves.png, confusion.png
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .. import __version__
from ..errors import DiffprobeError
from .fastprobe import Standardizer, topk
from .heads import build_head
from .._io import output_dir, output_errors, torch_save, write_json
from ..report import confusion_matrix_plot, training_curves
from ..features.store import FeatureKey, FeatureStore

log = logging.getLogger(__name__)
RUN_FORMAT = 1


@dataclass(frozen=True)
class Recipe:
    name: str
    optimizer: str  # sgd | adamw
    lr: float
    epochs: int
    batch_size: int = 128
    schedule: str = "step"  # step (×gamma every step_every epochs) | cosine (after linear warmup)
    step_every: int = 7
    gamma: float = 0.1
    warmup_epochs: int = 0
    momentum: float = 0.9


def recipe_for(name: str, head: str, epochs: int | None = None, lr: float | None = None) -> Recipe:
    """`paper`: the public code's SGD recipe (lr 1e-2 linear, 5e-2 attention; ×0.1 every 7 epochs;
    28 epochs; batch 128). `modern`: AdamW, linear warmup then cosine."""
    if name == "paper":
        base = Recipe("paper", "sgd", 5e-2 if head in ("attention", "fusion") else 1e-2, 28)
    elif name == "modern":
        # lr per head measured on CIFAR-10 features (linear: 1e-2 beat 1e-3 by 4 points on 3,000 images)
        lr = {"linear": 1e-2, "mlp": 1e-3}.get(head, 3e-4)
        base = Recipe("modern", "adamw", lr, 30, schedule="cosine", warmup_epochs=2)
    else:
        raise DiffprobeError(f"unknown recipe {name!r}: expected paper or modern")
    changes = {k: v for k, v in {"epochs": epochs, "lr": lr}.items() if v is not None}
    return Recipe(**{**asdict(base), **changes})


def _lr_at(recipe: Recipe, epoch: float) -> float:
    if recipe.schedule == "step":
        return recipe.lr * recipe.gamma ** int(epoch // recipe.step_every)
    if epoch < recipe.warmup_epochs:
        return recipe.lr * (epoch + 1e-3) / recipe.warmup_epochs
    span = max(recipe.epochs - recipe.warmup_epochs, 1e-9)
    return 0.5 * recipe.lr * (1 + np.cos(np.pi * (epoch - recipe.warmup_epochs) / span))


def load_inputs(store: FeatureStore, keys: Sequence[FeatureKey], rows: np.ndarray | None = None) -> list[torch.Tensor]:
    return [torch.from_numpy(store.load(k, rows)) for k in keys]


def input_shapes(store: FeatureStore, keys: Sequence[FeatureKey]) -> list[tuple[int, int]]:
    shapes = []
    for k in keys:
        dim = store.load(k, np.arange(1)).shape[1]
        shapes.append((dim // (k.pool * k.pool), k.pool))
    return shapes


class FeatureHead(torch.nn.Module):
    """A head plus the standardisation of its inputs, so a saved run is self-contained."""

    def __init__(self, head: torch.nn.Module, means: Sequence[torch.Tensor], stds: Sequence[torch.Tensor], fusion: bool):
        super().__init__()
        self.head, self.fusion = head, fusion
        for i, (m, s) in enumerate(zip(means, stds)):
            self.register_buffer(f"mean{i}", m.reshape(1, -1).clone())
            self.register_buffer(f"std{i}", s.reshape(1, -1).clone())
        self.n_inputs = len(means)

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
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
    drawn at random per image and epoch (from the seed)."""
    torch.manual_seed(seed)
    labels = torch.from_numpy(store.labels)
    xs_train = load_inputs(store, keys, train_rows)
    xs_val = load_inputs(store, keys, val_rows)
    y_train, y_val = labels[train_rows], labels[val_rows]
    scalers = [Standardizer(x) for x in xs_train]  # fitted on the clean (centre-crop) training features
    num_classes = len(store.classes)
    head = build_head(head_kind, input_shapes(store, keys), num_classes, **head_options)
    model = FeatureHead(head, [s.mean for s in scalers], [s.std for s in scalers], head_kind == "fusion").to(device)
    views = None
    if augmented is not None:
        view_rows = augmented_rows(store, augmented, train_rows)  # [K, n]
        xs_train = [torch.from_numpy(augmented.load(k, view_rows.reshape(-1))).reshape(*view_rows.shape, -1) for k in keys]
        views = view_rows.shape[0]
    xs_train = [x.to(device) for x in xs_train]
    xs_val = [x.to(device) for x in xs_val]
    y_train, y_val = y_train.to(device), y_val.to(device)
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
    bar = tqdm(range(recipe.epochs), desc=f"{head_kind} {recipe.name} wd={weight_decay:g}", unit="epoch", disable=not progress, leave=False)
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
            if len(idx) < 2 and n >= 2:
                continue  # BatchNorm cannot train on a batch of one
            logits = model([x[idx] for x in epoch_inputs])
            loss = F.cross_entropy(logits, y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total_loss += loss.item() * len(idx)
            correct += (logits.argmax(1) == y_train[idx]).sum().item()
        val_loss, val_top1, val_top5, _ = _evaluate(model, xs_val, y_val)
        history.append({"epoch": epoch + 1, "train_loss": total_loss / n, "train_top1": 100.0 * correct / n,
                        "val_loss": val_loss, "val_top1": val_top1, "val_top5": val_top5})  # fmt: skip
        if val_top1 > best_top1:
            best_top1, best_epoch, best_state = val_top1, epoch + 1, copy.deepcopy(model.state_dict())
        bar.set_postfix(val_top1=f"{val_top1:.1f}")
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


def check_same_backbone(a: FeatureStore, b: FeatureStore, role: str = "test") -> None:
    fa, fb = a.manifest["backbone"]["fingerprint"], b.manifest["backbone"]["fingerprint"]
    if fa != fb or a.manifest["noise"] != b.manifest["noise"]:
        raise DiffprobeError(f"{role} store {b.root} was made with another backbone or noise setting than {a.root}")
    if a.classes != b.classes:
        raise DiffprobeError(f"{role} store {b.root} has other classes than {a.root}")


def _same_images(a: FeatureStore, b: FeatureStore) -> bool:
    da, db = a.manifest["data"], b.manifest["data"]
    if "layout" in da and "layout" in db:
        return da["layout"] == db["layout"]
    return da.get("fingerprint") == db.get("fingerprint")


def check_held_out(store: FeatureStore, test_store: FeatureStore, train_rows: np.ndarray, val_rows: np.ndarray) -> None:
    """A test store of the same dataset must not score the head on images it was trained on
    (an inflated number with no warning); overlap with the validation rows, which chose the
    epoch and weight decay, is only warned about."""
    if not _same_images(store, test_store):
        return
    test = set(test_store.indices.tolist())
    trained = test & set(store.indices[train_rows].tolist())
    if trained:
        raise DiffprobeError(
            f"test store {test_store.root} shares {len(trained)} of its {test_store.rows} images with the training rows of "
            f"{store.root} (same dataset): a test score on them would be inflated; extract the test store from held-out "
            "images (another split, e.g. --split test, or only the validation rows)"
        )
    validated = test & set(store.indices[val_rows].tolist())
    if validated:
        log.warning("test store %s: %d of its %d images are validation rows, which chose the epoch and weight decay",
                    test_store.root, len(validated), test_store.rows)  # fmt: skip


def probe(store: FeatureStore, keys: Sequence[FeatureKey], out: str | Path, head_kind: str = "linear",
          recipe_name: str = "modern", weight_decays: Sequence[float] = (1e-4,), epochs: int | None = None,
          lr: float | None = None, val_fraction: float = 0.1, split_seed: int = 0, seed: int = 0,
          head_options: dict | None = None, test_store: FeatureStore | None = None, device: str = "cpu",
          progress: bool = True, augmented: FeatureStore | None = None) -> dict:  # fmt: skip
    """Train a head on the train split, choose epoch and weight decay on validation, save the run."""
    head_options = dict(head_options or {})
    available = set(store.complete_keys())
    for k in keys:
        if k not in available:
            have = ", ".join(x.stem for x in sorted(available)) or "none"
            raise DiffprobeError(f"{store.root} has no complete features for t={k.t} block={k.block} pool={k.pool} (complete: {have})")
    if head_kind != "fusion" and len(keys) != 1:
        raise DiffprobeError(f"the {head_kind} head takes one --t/--block/--pool setting; use --head fusion for several")
    recipe = recipe_for(recipe_name, head_kind, epochs, lr)
    is_val = store.split(val_fraction, split_seed)
    train_rows, val_rows = np.flatnonzero(~is_val), np.flatnonzero(is_val)
    if len(val_rows) == 0 or len(train_rows) == 0:
        raise DiffprobeError(f"the split leaves no validation or no training rows ({store.rows} rows, val fraction {val_fraction})")
    if test_store is not None:  # checked before any training, so a bad test store costs nothing
        check_same_backbone(store, test_store)
        check_held_out(store, test_store, train_rows, val_rows)
    out = output_dir(out)
    trials = []
    for wd in weight_decays:
        model, history, best_epoch = train_once(store, keys, head_kind, recipe, wd, train_rows, val_rows, seed,
                                                head_options, device, progress, augmented)  # fmt: skip
        trials.append((max(h["val_top1"] for h in history), wd, model, history, best_epoch))
    best_top1, best_wd, model, history, best_epoch = max(trials, key=lambda tr: tr[0])

    labels = torch.from_numpy(store.labels)
    _, val_top1, val_top5, val_logits = _evaluate(model, load_inputs(store, keys, val_rows), labels[val_rows])
    per_class, matrix = per_class_report(val_logits, labels[val_rows], store.classes)
    metrics: dict[str, Any] = {
        "val": {"top1": val_top1, "top5": val_top5, "rows": int(len(val_rows)), "per_class_top1": per_class},
        "chosen": {"epoch": best_epoch, "weight_decay": best_wd},
        "weight_decay_trials": {str(wd): top1 for top1, wd, *_ in trials},
        "train_rows": int(len(train_rows)),
        "history": history,
    }
    if test_store is not None:
        tlabels = torch.from_numpy(test_store.labels)
        _, t1, t5, _ = _evaluate(model, load_inputs(test_store, keys), tlabels)
        metrics["test"] = {"top1": t1, "top5": t5, "rows": test_store.rows}

    config = {
        "format": RUN_FORMAT,
        "diffprobe": __version__,
        "head": head_kind,
        "head_options": head_options,
        "input_shapes": input_shapes(store, keys),
        "keys": [asdict(k) for k in keys],
        "recipe": asdict(recipe),
        "weight_decays": list(weight_decays),
        "val_fraction": val_fraction,
        "split_seed": split_seed,
        "seed": seed,
        "classes": store.classes,
        "store": str(store.root),
        "augmented_store": str(augmented.root) if augmented is not None else None,
        "backbone": store.manifest["backbone"],
        "loaded_with": store.manifest.get("loaded_with", {}),
        "noise": store.manifest["noise"],
        "transform": store.manifest["transform"],
        "precision": store.manifest["precision"],
    }
    with output_errors(out, "--out"):  # a disk that fills up during the run
        write_json(out / "config.json", config)
        torch_save(model.state_dict(), out / "head.pt")
        write_json(out / "metrics.json", metrics)
        setting = ", ".join(k.stem for k in keys)
        training_curves(out / "curves.png", history, f"{head_kind} head, {recipe.name} recipe, {setting}")
        confusion_matrix_plot(out / "confusion.png", matrix, store.classes, f"{head_kind} head, validation top-1 {val_top1:.1f}%")
    return metrics


def load_run(run_dir: str | Path) -> tuple[dict, FeatureHead]:
    """A saved run's config and its head (with standardisation), ready for inference."""
    run_dir = Path(run_dir)
    cfg_path, weights = run_dir / "config.json", run_dir / "head.pt"
    if not cfg_path.is_file() or not weights.is_file():
        raise DiffprobeError(f"{run_dir} is not a probe run (expected config.json and head.pt): run `diffprobe probe` first")
    config = json.loads(cfg_path.read_text())
    if config.get("format") != RUN_FORMAT:
        raise DiffprobeError(f"{run_dir} was written by an incompatible diffprobe (run format {config.get('format')}, expected {RUN_FORMAT})")
    shapes = [tuple(s) for s in config["input_shapes"]]
    head = build_head(config["head"], shapes, len(config["classes"]), **config["head_options"])
    dims = [c * p * p for c, p in shapes]
    model = FeatureHead(head, [torch.zeros(d) for d in dims], [torch.ones(d) for d in dims], config["head"] == "fusion")
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except Exception as e:  # a shape mismatch (RuntimeError) or a damaged file (UnpicklingError, OSError)
        raise DiffprobeError(f"{weights} does not fit the head described in config.json: {str(e).splitlines()[0]}") from None
    return config, model.eval()

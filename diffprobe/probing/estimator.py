"""`Probe`: a head on stored features, with scikit-learn's face (fit / predict / score / save).

    clf = Probe(head="linear").fit(store)            # trains in memory; nothing is written
    clf.score(test_store)                            # accuracy in [0, 1], as scikit-learn's score
    clf.save("runs/lin")                             # the run directory `diffprobe predict` reads
    clf = Probe.load("runs/lin")

Every parameter is in the constructor (a `ProbeConfig`'s fields); the same parameters on the
same store give the same numbers as `diffprobe probe` with the same flags.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin

from ..errors import DiffprobeError
from ..features.arrays import ArrayFeatures
from ..features.roles import REPORT_SHARE, store_roles
from ..features.plan import FeaturePlan
from ..features.store import FeatureKey, FeatureStore
from ..precision import resolve_device
from .config import ProbeConfig
from .heads import HEAD_OPTIONS
from ..features.reporting import check_held_out, check_same_backbone_manifest
from .train import FeatureHead, FittedHead, evaluate_store, fit_head, load_run, read_run_json, save_run


log = logging.getLogger("diffprobe")


def _as_keys(setting: FeaturePlan | FeatureKey | Sequence[FeatureKey] | None, store: FeatureStore) -> list[FeatureKey]:
    if setting is None:
        complete = store.complete_keys()
        if len(complete) != 1:
            have = ", ".join(k.stem for k in complete) or "none"
            raise DiffprobeError(f"{store.root} holds {len(complete)} complete settings ({have}): pass the one to train on, "
                                 "fit(store, FeaturePlan(t=..., blocks=..., pools=...))")  # fmt: skip
        return complete
    if isinstance(setting, FeaturePlan):
        return setting.keys
    if isinstance(setting, FeatureKey):
        return [setting]
    return list(setting)


class Probe(ClassifierMixin, BaseEstimator):
    """A classification head on frozen diffusion features (see ProbeConfig for each parameter).

    A scikit-learn estimator: `get_params` / `set_params` / `clone` work, and `fit(X, y)` on
    arrays puts it in a `Pipeline` or `GridSearchCV` (which then do the selecting and scoring)."""

    def __init__(self, head: str = "linear", recipe: str = "modern", *, weight_decays: Sequence[float] | None = None,
                 epochs: int | None = None, lr: float | None = None, val_fraction: float = 0.1, split_seed: int = 0,
                 seed: int = 0, report_share: float = REPORT_SHARE, device: str = "auto", progress: bool = False,
                 **head_options: Any):  # fmt: skip
        self.config = ProbeConfig(head, recipe, head_options, weight_decays, epochs, lr, val_fraction, split_seed, seed, report_share)  # type: ignore[arg-type]
        self.device, self.progress = device, progress
        # The arguments as given (scikit-learn's clone checks get_params returns the very objects passed in).
        self._params = {"head": head, "recipe": recipe, "weight_decays": weight_decays, "epochs": epochs, "lr": lr,
                        "val_fraction": val_fraction, "split_seed": split_seed, "seed": seed, "report_share": report_share,
                        "device": device, "progress": progress, **head_options}  # fmt: skip
        self.fitted_: FittedHead | None = None
        self.label_values_: np.ndarray | None = None  # fit(X, y): y's own labels, which predict returns

    @classmethod
    def from_config(cls, config: ProbeConfig, device: str = "auto", progress: bool = False) -> "Probe":
        c = config
        return cls(c.head, c.recipe, weight_decays=c.weight_decays, epochs=c.epochs, lr=c.lr, val_fraction=c.val_fraction,
                   split_seed=c.split_seed, seed=c.seed, report_share=c.report_share, device=device, progress=progress,
                   **c.options)  # fmt: skip

    # ------------------------------------------------------------------ scikit-learn's parameter protocol
    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return dict(self._params)

    def set_params(self, **params: Any) -> "Probe":
        merged = {**self.get_params(), **params}
        if "head" in params:  # another head: its own options, not the old head's
            merged = {k: v for k, v in merged.items() if k not in HEAD_OPTIONS.get(self.config.head, {}) or k in params}
        self.__init__(**merged)  # type: ignore[misc]
        return self

    # ------------------------------------------------------------------ training
    def fit(self, store: FeatureStore | str | Path | np.ndarray | Sequence[np.ndarray],
            setting: FeaturePlan | FeatureKey | Sequence[FeatureKey] | np.ndarray | Sequence[Any] | None = None,
            augmented: FeatureStore | None = None) -> "Probe":  # fmt: skip
        """On a store: train on its train rows, choose epoch, learning rate and weight decay on its
        selection rows (features/roles.py); `setting` says which (t, block, pool) feature(s) to
        read (optional when the store holds one). On arrays, `fit(X, y)`: X [N, D] (or one such
        array per setting, for fusion), y N labels; choices are made on a stratified
        `val_fraction` of them, and scoring is the caller's (score(X_test, y_test))."""
        device = str(resolve_device(self.device))
        if isinstance(store, (np.ndarray, torch.Tensor)) or (isinstance(store, (list, tuple)) and store
                                                             and isinstance(store[0], (np.ndarray, torch.Tensor))):  # fmt: skip
            if setting is None:
                raise DiffprobeError("fit(X, y): give the labels y of the feature rows X")
            arrays = ArrayFeatures(list(store) if isinstance(store, (list, tuple)) else [store], np.asarray(setting))
            config = replace(self.config, report_share=0.0)  # the caller keeps its own test rows
            self.fitted_ = fit_head(arrays, arrays.keys, config, device, self.progress)  # type: ignore[arg-type]
            self.label_values_ = arrays.class_values
            return self
        store = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
        self.fitted_ = fit_head(store, _as_keys(setting, store), self.config, device, self.progress, augmented)
        self.label_values_ = None
        return self

    @property
    def fitted(self) -> FittedHead:
        if self.fitted_ is None:
            raise DiffprobeError("this Probe is not fitted yet: call fit(store) (or Probe.load(run_dir)) first")
        return self.fitted_

    @property
    def head_(self) -> FeatureHead:
        return self.fitted.model

    @property
    def keys_(self) -> list[FeatureKey]:
        return self.fitted.keys

    @property
    def metrics_(self) -> dict[str, Any]:
        return self.fitted.metrics

    # ------------------------------------------------------------------ inference on features
    def _features(self, X: FeatureStore | Sequence[np.ndarray | torch.Tensor] | np.ndarray | torch.Tensor) -> list[torch.Tensor]:
        """The head's inputs: a store's features (checked to come from the same backbone and noise),
        or arrays [N, C·p·p], one per setting, checked against the widths the head was trained on."""
        if isinstance(X, (str, Path)):
            X = FeatureStore.open(X)
        if isinstance(X, FeatureStore):
            check_same_backbone_manifest(self.fitted.store_manifest, self.fitted.store_root, X, role="the")
            return [torch.from_numpy(X.load(k)) for k in self.keys_]
        xs = [X] if isinstance(X, (np.ndarray, torch.Tensor)) else list(X) if isinstance(X, (list, tuple)) else None
        if xs is None:
            raise DiffprobeError(f"expected a FeatureStore or pooled features (arrays [N, C·p·p], one per setting), got {type(X).__name__}")
        widths = [c * p * p for c, p in self.fitted.input_shapes]
        if len(xs) != len(widths):
            raise DiffprobeError(f"this probe reads {len(widths)} setting(s) ({', '.join(k.stem for k in self.keys_)}), got {len(xs)} feature array(s)")
        out = []
        for x, width, key in zip(xs, widths, self.keys_):
            x = torch.as_tensor(np.asarray(x) if isinstance(x, np.ndarray) else x, dtype=torch.float32)
            if x.ndim != 2 or x.shape[1] != width:
                raise DiffprobeError(f"features for {key.stem} must be [N, {width}] (pooled as stored), got {list(x.shape)}")
            out.append(x)
        return out

    @torch.no_grad()
    def decision_function(self, X) -> torch.Tensor:
        """Logits [N, classes] for a store, or for pooled features (one array per setting, as stored)."""
        head = self.head_.eval()
        xs = self._features(X)
        return torch.cat([head([x[i:i + 1024] for x in xs]) for i in range(0, len(xs[0]), 1024)])

    def predict_proba(self, X) -> np.ndarray:
        return torch.softmax(self.decision_function(X), dim=1).numpy()

    def predict(self, X, indices: bool = False) -> np.ndarray:
        """The predicted labels, as `Classifier.predict` gives them: class names for a store's
        probe, y's own labels after fit(X, y). indices=True: positions in `classes_` instead."""
        index = self.decision_function(X).argmax(1).numpy()
        if indices:
            return index
        values = self.label_values_ if self.label_values_ is not None else np.asarray(self.classes_)
        return values[index]

    @property
    def classes_(self) -> list:
        return self.label_values_.tolist() if self.label_values_ is not None else self.fitted.classes

    def score(self, X: FeatureStore | np.ndarray | Sequence[np.ndarray], y: Any = None,
              rows: str | Sequence[int] | np.ndarray | None = None) -> float:  # fmt: skip
        """Top-1 accuracy in [0, 1], on rows no choice saw unless told otherwise.

        The store the probe was fitted on: its report rows (rows="select", "train", "all" or row
        indices to ask for others). Another store of the same backbone: all its rows, after
        checking that none was a training row of the fit. Arrays: score(X, y), as scikit-learn."""
        if isinstance(X, (str, Path)):
            X = FeatureStore.open(X)
        if not isinstance(X, FeatureStore):
            if y is None:
                raise DiffprobeError("score(features, y): give the labels of the features")
            return float((self.predict(X) == np.asarray(y)).mean())
        return evaluate_store(self.fitted, X, self._score_rows(X, rows))["top1"] / 100.0

    def _score_rows(self, store: FeatureStore, rows: str | Sequence[int] | np.ndarray | None) -> np.ndarray | None:
        cfg, fitted = self.config, self.fitted
        same = Path(fitted.store_root).resolve() == store.root.resolve()
        if rows is None and not same:  # another store: all of it, if it holds no image the head trained on
            if Path(fitted.store_root).is_dir():
                trained_on = FeatureStore.open(fitted.store_root)
                roles = store_roles(trained_on, cfg.val_fraction, cfg.split_seed, cfg.report_share)
                check_held_out(trained_on, store, roles.train, roles.select)
            return None
        if rows is not None and not isinstance(rows, str):
            return np.asarray(rows)
        roles = store_roles(store, cfg.val_fraction, cfg.split_seed, cfg.report_share)
        chosen = rows or "report"
        if chosen == "all":
            return None
        if chosen not in ("report", "select", "train"):
            raise DiffprobeError(f"rows={rows!r}: expected 'report', 'select', 'train', 'all' or row indices")
        picked = getattr(roles, chosen)
        if not len(picked):
            raise DiffprobeError(f"{store.root} has no {chosen} rows under report_share {cfg.report_share}: score a test store, "
                                 "or pass rows='select' for the (optimistic) selection score")  # fmt: skip
        if chosen != "report":
            log.warning("scoring the %s rows of %s: %s", chosen, store.root,
                        "they chose the epoch and rates, so the score is optimistic" if chosen == "select" else "the head trained on them")
        return picked

    # ------------------------------------------------------------------ persistence
    def save(self, out: str | Path) -> Path:
        """Write the run directory (config.json, head.pt, metrics.json, curves.png, confusion.png)."""
        if self.label_values_ is not None:
            raise DiffprobeError("this Probe was fitted on arrays, with no backbone behind them for `diffprobe predict` to "
                                 "load: fit it on a store to save a run (or pickle it)")  # fmt: skip
        return save_run(self.fitted, out)

    @classmethod
    def load(cls, run_dir: str | Path, device: str = "auto") -> "Probe":
        config, head = load_run(run_dir)
        try:
            probe = cls.from_config(ProbeConfig.from_dict(config["probe_config"]) if "probe_config" in config else
                                    ProbeConfig(config["head"], config["recipe"]["name"], config["head_options"],
                                                tuple(config["weight_decays"]), val_fraction=config["val_fraction"],
                                                split_seed=config["split_seed"], seed=config["seed"]), device)  # fmt: skip
            manifest = {k: config[k] for k in ("backbone", "loaded_with", "noise", "transform", "precision")}
            probe.fitted_ = FittedHead(head, [FeatureKey(**k) for k in config["keys"]], probe.config,
                                       json_metrics(run_dir), np.zeros((0, 0)), [tuple(s) for s in config["input_shapes"]],
                                       config["classes"], manifest, config["store"], config.get("augmented_store"))  # fmt: skip
        except KeyError as e:
            raise DiffprobeError(f"{Path(run_dir) / 'config.json'} lacks the key {e.args[0]!r}: restore it, or train the run again") from None
        except (TypeError, AttributeError, ValueError) as e:
            raise DiffprobeError(f"{Path(run_dir) / 'config.json'} is damaged ({e}): restore it, or train the run again") from None
        if probe.config.head != config["head"]:  # the file was edited by hand
            raise DiffprobeError(f"{Path(run_dir) / 'config.json'} names head {config['head']!r} but was trained as "
                                 f"{probe.config.head!r}: restore the file, or train the run again")  # fmt: skip
        return probe

    def __repr__(self) -> str:
        state = f"fitted on {', '.join(k.stem for k in self.keys_)}" if self.fitted_ else "not fitted"
        return f"Probe({self.config.head!r}, {self.config.recipe!r}, {state})"


def json_metrics(run_dir: str | Path) -> dict[str, Any]:
    return read_run_json(Path(run_dir) / "metrics.json", required=False)

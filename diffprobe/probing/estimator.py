"""`Probe`: a head on stored features, with scikit-learn's face (fit / predict / score / save).

    clf = Probe(head="linear").fit(store)            # trains in memory; nothing is written
    clf.score(test_store)                            # accuracy in [0, 1], as scikit-learn's score
    clf.save("runs/lin")                             # the run directory `diffprobe predict` reads
    clf = Probe.load("runs/lin")

Every parameter is in the constructor (a `ProbeConfig`'s fields); the same parameters on the
same store give the same numbers as `diffprobe probe` with the same flags.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import DiffprobeError
from ..features.plan import FeaturePlan
from ..features.store import FeatureKey, FeatureStore
from ..precision import resolve_device
from .config import ProbeConfig
from .train import FeatureHead, FittedHead, check_same_backbone_manifest, evaluate_store, fit_head, load_run, read_run_json, save_run


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


class Probe:
    """A classification head on frozen diffusion features (see ProbeConfig for each parameter)."""

    def __init__(self, head: str = "linear", recipe: str = "modern", *, weight_decays: Sequence[float] | None = None,
                 epochs: int | None = None, lr: float | None = None, val_fraction: float = 0.1, split_seed: int = 0,
                 seed: int = 0, device: str = "auto", progress: bool = False, **head_options: Any):  # fmt: skip
        self.config = ProbeConfig(head, recipe, head_options, weight_decays, epochs, lr, val_fraction, split_seed, seed)  # type: ignore[arg-type]
        self.device, self.progress = device, progress
        self.fitted_: FittedHead | None = None

    @classmethod
    def from_config(cls, config: ProbeConfig, device: str = "auto", progress: bool = False) -> "Probe":
        probe = cls(device=device, progress=progress)
        probe.config = config
        return probe

    # ------------------------------------------------------------------ training
    def fit(self, store: FeatureStore | str | Path, setting: FeaturePlan | FeatureKey | Sequence[FeatureKey] | None = None,
            augmented: FeatureStore | None = None) -> "Probe":  # fmt: skip
        """Train on the store's training split; epoch and weight decay chosen on its validation split.
        setting: which (t, block, pool) feature(s) to read; optional when the store holds one."""
        store = store if isinstance(store, FeatureStore) else FeatureStore.open(store)
        device = str(resolve_device(self.device))
        self.fitted_ = fit_head(store, _as_keys(setting, store), self.config, device, self.progress, augmented)
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
    def classes_(self) -> list[str]:
        return self.fitted.classes

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

    def predict(self, X) -> np.ndarray:
        """Class indices (names in `classes_`)."""
        return self.decision_function(X).argmax(1).numpy()

    def score(self, X: FeatureStore, y: np.ndarray | None = None) -> float:
        """Top-1 accuracy in [0, 1] on a store (its labels) or on features X with labels y."""
        if isinstance(X, FeatureStore):
            return evaluate_store(self.fitted, X)["top1"] / 100.0
        if y is None:
            raise DiffprobeError("score(features, y): give the labels of the features")
        return float((self.predict(X) == np.asarray(y)).mean())

    # ------------------------------------------------------------------ persistence
    def save(self, out: str | Path) -> Path:
        """Write the run directory (config.json, head.pt, metrics.json, curves.png, confusion.png)."""
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

"""Features given as arrays (`Probe().fit(X, y)`), with the face of a `FeatureStore` that head
training reads: labels, classes, roles and `load(key, rows)`, held in memory.

This lets a `Probe` sit in a scikit-learn `Pipeline` or `GridSearchCV`, which hand it arrays,
while training runs through the same code as a store's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..errors import DiffprobeError
from .store import FeatureKey


class ArrayFeatures:
    """One [N, D] float array per setting (several for a fusion head) and N labels."""

    root = Path("<arrays>")  # no files, named in messages
    dataset_labels = None  # no dataset behind the rows: roles come from the labels themselves

    def __init__(self, xs: Sequence[Any], y: Any, classes: Sequence[Any] | None = None):
        self.arrays = [np.asarray(x, dtype=np.float32) for x in xs]
        y = np.asarray(y)
        if y.ndim != 1 or any(a.ndim != 2 or len(a) != len(y) for a in self.arrays):
            shapes = ", ".join(str(list(a.shape)) for a in self.arrays)
            raise DiffprobeError(f"fit(X, y): expected X as [N, D] array(s) and y as N labels, got X {shapes} and y {list(y.shape)}")
        if not all(np.isfinite(a).all() for a in self.arrays):
            raise DiffprobeError("fit(X, y): X holds NaN or infinite values")
        self.class_values = np.unique(y) if classes is None else np.asarray(classes)
        lookup = {c: i for i, c in enumerate(self.class_values.tolist())}
        unknown = sorted({v for v in y.tolist() if v not in lookup}, key=str)
        if unknown:
            raise DiffprobeError(f"labels {unknown[:5]} are not among the classes {self.class_values.tolist()[:10]}")
        self._labels = np.array([lookup[v] for v in y.tolist()], dtype=np.int64)
        self.keys = [FeatureKey(0, i + 1, 1) for i in range(len(self.arrays))]  # stand-ins: one per array
        self.manifest = {"backbone": {"source": "arrays", "fingerprint": "arrays"}, "noise": {"seed": 0, "draws": 1},
                         "transform": None, "precision": None, "loaded_with": {}}  # fmt: skip

    @property
    def rows(self) -> int:
        return len(self._labels)

    @property
    def labels(self) -> np.ndarray:
        return self._labels

    @property
    def indices(self) -> np.ndarray:
        return np.arange(self.rows)

    @property
    def classes(self) -> list[str]:
        return [str(c) for c in self.class_values.tolist()]

    def complete_keys(self) -> list[FeatureKey]:
        return list(self.keys)

    def load(self, key: FeatureKey, rows: np.ndarray | None = None) -> np.ndarray:
        array = self.arrays[self.keys.index(key)]
        return array if rows is None else array[rows]

    def open_array(self, key: FeatureKey) -> np.ndarray:
        return self.arrays[self.keys.index(key)]

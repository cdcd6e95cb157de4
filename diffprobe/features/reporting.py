"""Where a study's reported numbers come from: its store's report rows, or a test store.

Every study that chooses (a cell, a head's epoch and rates, C) chooses on the selection rows of
its store (features/roles.py) and reports on rows no choice saw:
  - by default the store's own report rows, a stratified part of the dataset's held-out split;
  - or a test store (`--test-data`, `--test-store`): another split such as CIFAR-10's test set,
    or the report rows of the same dataset extracted on their own (`extract --rows report`).
With a test store of *another* dataset every held-out row of the store selects (nothing of it
needs keeping back); one of the *same* dataset must share no image with the train or select
rows, or its score would be inflated without a word.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from ..errors import DiffprobeError
from .roles import Roles, store_roles
from .store import FeatureKey, FeatureStore

if TYPE_CHECKING:
    from ..data import LabeledImages


def same_images(a: FeatureStore, b: FeatureStore) -> bool:
    """Do the two stores index the same dataset (so their row indices name the same images)?"""
    da, db = a.manifest["data"], b.manifest["data"]
    if "layout" in da and "layout" in db:
        return da["layout"] == db["layout"]
    return da.get("fingerprint") == db.get("fingerprint")


def check_same_backbone_manifest(manifest: dict, root: str | Path, b: FeatureStore, role: str = "test") -> None:
    if manifest["backbone"]["fingerprint"] != b.manifest["backbone"]["fingerprint"] or manifest["noise"] != b.manifest["noise"]:
        raise DiffprobeError(f"{role} store {b.root} was made with another backbone or noise setting than {root}")


def check_same_backbone(a: FeatureStore, b: FeatureStore, role: str = "test") -> None:
    check_same_backbone_manifest(a.manifest, a.root, b, role)
    if a.classes != b.classes:
        raise DiffprobeError(f"{role} store {b.root} has other classes than {a.root}")


def check_held_out(store: FeatureStore, test_store: FeatureStore, train_rows: np.ndarray, select_rows: np.ndarray) -> None:
    """A test store of the same dataset must hold none of the images the head was trained on or
    chose its epoch and rates on: a score on them would be inflated with no warning. (Make one with
    `extract --rows report`: the report rows, which neither role touches.)"""
    if not same_images(store, test_store):
        return
    test = set(test_store.indices.tolist())
    for rows, role in ((train_rows, "training"), (select_rows, "selection")):
        shared = test & set(store.indices[rows].tolist())
        if shared:
            raise DiffprobeError(
                f"test store {test_store.root} shares {len(shared)} of its {test_store.rows} images with the {role} rows of "
                f"{store.root} (same dataset): a test score on them would be inflated; extract the test store from the "
                "report rows (extract --rows report, same --val-fraction/--split-seed) or from another split (--split test)"
            )


def check_test_data(data: "LabeledImages", test: "LabeledImages") -> None:
    """Refuse a test set that is the training images themselves (a folder without a test
    sub-folder opens as its only split), before anything is extracted."""
    if data.layout_fingerprint() == test.layout_fingerprint():
        raise DiffprobeError(f"the test data is the same images as the data ({data.name}): give its test split "
                             "(--test-split, or a folder of its own), or leave --test-data out to report on the held-out "
                             "report rows")  # fmt: skip


@dataclass(frozen=True)
class Reporting:
    """A store's roles, and the rows its results are reported on."""

    store: FeatureStore
    roles: Roles
    test: FeatureStore | None = None

    @classmethod
    def of(cls, store: FeatureStore, val_fraction: float, split_seed: int, report_share: float,
           test: FeatureStore | None = None, what: str = "a study") -> "Reporting":  # fmt: skip
        """The roles of `store`'s rows, checked for `what`; with a test store, checked to share
        the backbone and no chosen-on image."""
        if test is not None:
            check_same_backbone(store, test)
            if not same_images(store, test):  # another split reports: every held-out row selects
                report_share = 0.0
        roles = store_roles(store, val_fraction, split_seed, report_share).check(what)
        if test is not None:
            check_held_out(store, test, roles.train, roles.select)
            if test.rows == 0:
                raise DiffprobeError(f"test store {test.root} holds no images")
        return cls(store, roles, test)

    @property
    def reports(self) -> bool:
        """Are there rows no choice saw? (Else every figure is a selection score, and says so.)"""
        return self.test is not None or self.roles.has_report

    @property
    def rows(self) -> int:
        return self.test.rows if self.test is not None else int(len(self.roles.report))

    @property
    def unit(self) -> str:
        """What one reporting row is, in a table's words."""
        return "test images" if self.test is not None else "report rows"

    def require(self, keys: Sequence[FeatureKey]) -> None:
        """Refuse, before any training, a test store that lacks a cell the study will report on."""
        if self.test is None:
            return
        missing = [k.stem for k in keys if k not in set(self.test.complete_keys())]
        if missing:
            raise DiffprobeError(f"test store {self.test.root} lacks {', '.join(missing)}: extract it with the same --t, "
                                 "--blocks and --pool (the store resumes)")  # fmt: skip

    def features(self, key: FeatureKey) -> tuple[np.ndarray, np.ndarray]:
        """The report rows' features of one cell and their labels."""
        if self.test is None:
            return self.store.load(key)[self.roles.report], self.store.labels[self.roles.report]
        self.require([key])
        return self.test.load(key), self.test.labels

    def source(self) -> str:
        if self.test is not None:
            return f"test store {self.test.root}"  # its size is in each report's "rows"
        if self.roles.has_report:
            return f"held-out report rows of {self.store.root} ({len(self.roles.report)} images)"
        return "none: every figure is a selection score (optimistic)"

    def describe(self) -> dict[str, Any]:
        """What every output records: the roles' sizes and seeds, and what reports."""
        return {**self.roles.describe(), "reported_on": self.source(), "report_images": self.rows}

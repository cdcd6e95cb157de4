"""Three roles for the images of a store: train, select, report.

A head or a fast probe trains on the *train* rows; every choice (C, epoch, learning rate, weight
decay, the best (t, block, pool) cell, the best head) is made on the *select* rows; every number
given as a result is computed on the *report* rows, which no choice saw. Scoring the chosen
setting on the rows that chose it is optimistic: the maximum of many noisy scores.

The roles are properties of each image in its whole dataset, fixed by seeds and stratified by
class: the dataset-wide validation split (`data.stratified_split(val_fraction, split_seed)`, the
images `diffprobe pretrain` holds out) is divided into select and report parts (a stratified
`report_share` of it reports). So every store, backbone, head and cell of one dataset sees the same
three sets of images, and the report rows were never trained on by the shipped checkpoint either.
With a test store (or `report_share=0`) every held-out row selects and the test store reports.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..data import stratified_split
from ..errors import DiffprobeError

if TYPE_CHECKING:
    from .store import FeatureStore

REPORT_SHARE = 0.5  # of the held-out rows, the share kept for reporting
TRAIN, SELECT, REPORT = 0, 1, 2


def dataset_roles(labels: np.ndarray, val_fraction: float, split_seed: int, report_share: float = REPORT_SHARE) -> np.ndarray:
    """The role of every image of a dataset (TRAIN, SELECT or REPORT), from all its labels."""
    if not 0 <= report_share < 1:
        raise DiffprobeError(f"report share {report_share} must be in [0, 1): the held-out rows need some to select on")
    roles = np.full(len(labels), TRAIN, dtype=np.int8)
    held = np.flatnonzero(stratified_split(labels, val_fraction, split_seed))
    roles[held] = SELECT
    # A stream of its own ([seed, 2]), so the report part is not a prefix of another split's permutation.
    reports = stratified_split(labels[held], report_share, [split_seed, 2]) if report_share else np.zeros(len(held), bool)
    roles[held[reports]] = REPORT
    return roles


@dataclass(frozen=True)
class Roles:
    """Row indices (into one store, or one list of images) of each role."""

    train: np.ndarray
    select: np.ndarray
    report: np.ndarray  # empty when a test set reports instead, or report_share is 0
    val_fraction: float
    split_seed: int
    report_share: float

    @classmethod
    def from_roles(cls, roles: np.ndarray, val_fraction: float, split_seed: int, report_share: float) -> "Roles":
        return cls(np.flatnonzero(roles == TRAIN), np.flatnonzero(roles == SELECT), np.flatnonzero(roles == REPORT),
                   val_fraction, split_seed, report_share)  # fmt: skip

    @property
    def has_report(self) -> bool:
        return len(self.report) > 0

    def check(self, what: str) -> "Roles":
        if len(self.train) == 0 or len(self.select) == 0:
            raise DiffprobeError(f"{what}: the split leaves {len(self.train)} training and {len(self.select)} selection rows "
                                 f"(val fraction {self.val_fraction}); use more images or a larger --val-fraction")  # fmt: skip
        return self

    def describe(self) -> dict[str, Any]:
        """What every output records about its rows."""
        return {"train": int(len(self.train)), "select": int(len(self.select)), "report": int(len(self.report)),
                "val_fraction": self.val_fraction, "split_seed": self.split_seed, "report_share": self.report_share}  # fmt: skip


def store_roles(store: "FeatureStore", val_fraction: float = 0.1, split_seed: int = 0, report_share: float = REPORT_SHARE) -> Roles:
    """The roles of a store's rows: its images' roles in the whole dataset (dataset_labels.npy);
    stores written before that file existed split their own rows."""
    whole = store.dataset_labels  # checked against the store's own labels, as every reader's are
    if whole is not None:
        roles = dataset_roles(whole, val_fraction, split_seed, report_share)[store.indices]
    else:
        roles = dataset_roles(store.labels, val_fraction, split_seed, report_share)
    return Roles.from_roles(roles, val_fraction, split_seed, report_share)

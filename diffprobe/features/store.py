"""The on-disk feature store: one array per (timestep, block, pool), a manifest, resume.

Layout of a store directory:

    manifest.json                    identity (model, data, rows, transform, noise, dtype, precision)
    labels.npy, indices.npy          per row: class label, index of the image in its dataset
    dataset_labels.npy               the label of every image of the dataset (defines the split)
    features/t0090_b24_p1.npy        [rows, channels·p·p] float16 (or float32), a .npy memmap
    features/t0090_b24_p1.done       one byte per chunk of rows: 1 once that chunk is written

Rows are written a chunk at a time into the memmap, and a chunk's byte in the `.done` file is
set only after its rows are flushed. So a process killed at any point (kill -9) leaves only
whole chunks marked, and rerunning recomputes the rest. Chunks are the unit of work, and
different processes (ranks) may write disjoint chunks of the same arrays at once. A new store
is written whole in a temporary sibling folder and renamed into place (a kill leaves no half
store); arrays are created under a temporary name and hard-linked into place, so concurrent
creators never clobber each other.

    chunk_prints.json                per chunk: a hash of its images' names and sizes, so a rerun
                                     after fixing a corrupt image keeps every finished chunk
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from .._io import atomic_write, output_errors, publish_dir, save_npy, temp_sibling_dir, write_json
from ..errors import DiffprobeError
from .guard import check_finite

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# Fields that must be equal for a store to be reused; any difference means other features.
IDENTITY_FIELDS = ("format", "backbone", "data", "rows", "transform", "noise", "dtype", "precision", "chunk_rows")


@dataclass(frozen=True, order=True)
class FeatureKey:
    t: int
    block: int
    pool: int

    @property
    def stem(self) -> str:
        return f"t{self.t:04d}_b{self.block:02d}_p{self.pool}"

    @classmethod
    def parse(cls, stem: str) -> "FeatureKey":
        t, b, p = stem.split("_")
        return cls(int(t[1:]), int(b[1:]), int(p[1:]))


def _describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    diffs = []
    for name in IDENTITY_FIELDS:
        if old.get(name) != new.get(name):
            a, b = old.get(name), new.get(name)
            if isinstance(a, dict) and isinstance(b, dict):
                keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
                diffs.append(f"{name} ({', '.join(f'{k}: {a.get(k)!r} vs {b.get(k)!r}' for k in keys[:3])})")
            else:
                diffs.append(f"{name} ({a!r} vs {b!r})")
    return "; ".join(diffs)


CHUNK_PRINTS = "chunk_prints.json"  # per chunk of rows: a hash of its images' names and sizes
_CREATION_FILES = {"labels.npy", "indices.npy", "dataset_labels.npy"}


def _identity(manifest: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """The fields that must match. Where both sides know the data's layout (names and labels),
    the content fingerprint is left to the per-chunk check; older stores compare it whole."""
    ident = {k: manifest.get(k) for k in IDENTITY_FIELDS}
    data, other_data = ident.get("data"), other.get("data") or {}
    if isinstance(data, dict):
        data = dict(data)
        if "layout" in data and "layout" in other_data:
            data.pop("fingerprint", None)
        else:
            data.pop("layout", None)
        ident["data"] = data
    return ident


def _chunk_prints(row_prints: Sequence[str], chunk_rows: int) -> list[str]:
    out = []
    for start in range(0, len(row_prints), chunk_rows):
        h = hashlib.sha256("\n".join(row_prints[start:start + chunk_rows]).encode())
        out.append(h.hexdigest()[:16])
    return out


def _abandoned_creation(root: Path) -> bool:
    """A folder holding only what an older diffprobe wrote before manifest.json (killed in between):
    no features in it, so nothing computed is lost by creating the store again."""
    if not root.is_dir():
        return False
    names = [p.name for p in root.iterdir()]
    leftover = [n for n in names if n in _CREATION_FILES or (n.startswith(".") and n.endswith(".tmp"))]
    return bool(names) and len(leftover) == len(names)


class FeatureStore:
    """A directory of cached features. Open with `create_or_open` (writers) or `open` (readers)."""

    def __init__(self, root: str | Path, manifest: dict[str, Any]):
        self.root = Path(root)
        self.manifest = manifest
        self._maps: dict[FeatureKey, np.memmap] = {}

    # ---------------------------------------------------------------- opening
    @classmethod
    def open(cls, root: str | Path) -> "FeatureStore":
        root = Path(root)
        path = root / "manifest.json"
        if not path.is_file():
            raise DiffprobeError(f"{root} is not a feature store (no manifest.json): run `diffprobe extract --out {root}` first")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DiffprobeError(f"{path} is corrupt: {e}") from None
        if manifest.get("format") != FORMAT_VERSION:
            raise DiffprobeError(f"{root} was written by an incompatible diffprobe (store format {manifest.get('format')}, expected {FORMAT_VERSION})")
        return cls(root, manifest)

    @classmethod
    def create_or_open(cls, root: str | Path, manifest: dict[str, Any], labels: np.ndarray, indices: np.ndarray,
                       dataset_labels: np.ndarray | None = None,
                       row_prints: Sequence[str] | None = None) -> "FeatureStore":  # fmt: skip
        """Open the store at root if it holds exactly these features' identity; create it if absent.

        A store with another identity (model, data, rows, noise, ...) is an error, never reused.
        row_prints (one content print per row, data.row_prints) let a rerun accept a dataset
        whose only changed files lie in chunks not yet finished, such as a corrupt image fixed
        after it stopped the extraction.
        """
        root = Path(root)
        manifest = {"format": FORMAT_VERSION, **manifest}
        chunk_prints = lambda rows: _chunk_prints(row_prints, rows) if row_prints is not None else None  # noqa: E731
        prints = chunk_prints(int(manifest["chunk_rows"]))
        if root.exists() and not root.is_dir():
            raise DiffprobeError(f"--out {root} is a file, not a folder: choose a folder path")
        with output_errors(root, "--out"):
            if not (root / "manifest.json").is_file():
                if _abandoned_creation(root):
                    log.warning("%s holds only the start of a store whose creation was interrupted: creating it again", root)
                    shutil.rmtree(root, ignore_errors=True)
                if not root.is_dir() or not any(root.iterdir()):
                    if cls._create(root, manifest, labels, indices, dataset_labels, prints):
                        return cls.open(root)
                elif not (root / "manifest.json").is_file():  # (another rank may have created it meanwhile)
                    raise DiffprobeError(f"{root} exists and is not a feature store: choose an empty or new --out")
            store = cls.open(root)  # existing, or created by another process (rank) just now
            if store.manifest.get("chunk_rows") != manifest["chunk_rows"]:
                # The chunk size is how the work is cut, not what is computed: a rerun with another
                # --batch-size resumes in the store's own chunks (the caller says so) and keeps them.
                manifest = {**manifest, "chunk_rows": store.manifest.get("chunk_rows")}
                prints = chunk_prints(store.chunk_rows)
            store._check_identity(manifest, prints)
        return store

    @staticmethod
    def _create(root: Path, manifest: dict[str, Any], labels: np.ndarray, indices: np.ndarray,
                dataset_labels: np.ndarray | None, prints: list[str] | None) -> bool:  # fmt: skip
        """Write every file of a new store in a temporary sibling, then rename it into place, so a
        kill at any moment leaves either no store or a whole one. False if another process's
        store took the place first."""
        tmp = temp_sibling_dir(root, "creating")
        save_npy(tmp / "labels.npy", labels.astype(np.int64))
        save_npy(tmp / "indices.npy", indices.astype(np.int64))
        if dataset_labels is not None:
            save_npy(tmp / "dataset_labels.npy", dataset_labels.astype(np.int64))
        if prints is not None:
            write_json(tmp / CHUNK_PRINTS, prints)
        write_json(tmp / "manifest.json", manifest)
        return publish_dir(tmp, root)

    def _check_identity(self, manifest: dict[str, Any], prints: list[str] | None) -> None:
        old, new = _identity(self.manifest, manifest), _identity(manifest, self.manifest)
        if old != new:
            raise DiffprobeError(
                f"{self.root} holds other features ({_describe_difference(old, new)}): "
                "choose another --out, or pass --overwrite to discard them"
            )
        old_print, new_print = self.manifest["data"].get("fingerprint"), manifest["data"].get("fingerprint")
        if old_print != new_print:  # same images and labels by name, some files' bytes differ
            self._accept_changed_files(manifest, prints)

    def _accept_changed_files(self, manifest: dict[str, Any], prints: list[str] | None) -> None:
        """Changed files are fine in chunks no array has finished (they are computed from the new
        files); in a finished chunk they would mix two versions of the data, so that is refused."""
        stored = self._stored_prints()
        if stored is None or prints is None or len(stored) != len(prints):
            raise DiffprobeError(
                f"{self.root} holds features of other images (data fingerprint {self.manifest['data'].get('fingerprint')} vs "
                f"{manifest['data'].get('fingerprint')}): choose another --out, or pass --overwrite to discard them"
            )
        changed = [c for c, (a, b) in enumerate(zip(stored, prints)) if a != b]
        finished = [c for c in changed if any(self.done_chunks(k)[c] for k in self.keys())]
        if finished:
            rows = self.chunk_slice(finished[0])
            raise DiffprobeError(
                f"{self.root}: images of {len(finished)} finished chunk(s) changed since they were extracted (first: rows "
                f"{rows.start}-{rows.stop - 1}, dataset index {int(self.indices[rows.start])} onwards), so their features no "
                "longer match the files: put the old files back, choose another --out, or pass --overwrite to discard the store"
            )
        log.warning("%s: files of %d unfinished chunk(s) changed (a fixed image?): they are extracted from the new files",
                    self.root, len(changed))  # fmt: skip
        write_json(self.root / CHUNK_PRINTS, prints)
        self.manifest["data"]["fingerprint"] = manifest["data"]["fingerprint"]
        write_json(self.root / "manifest.json", self.manifest)

    def _stored_prints(self) -> list[str] | None:
        path = self.root / CHUNK_PRINTS
        return json.loads(path.read_text()) if path.is_file() else None

    @staticmethod
    def discard(root: str | Path) -> None:
        """Remove a store for --overwrite: renamed aside first, so a kill mid-way never leaves half a store at root."""
        root = Path(root)
        with output_errors(root, "--out"):
            aside = temp_sibling_dir(root, "discarding")
            os.rename(root, aside / "old")
            shutil.rmtree(aside)

    # ---------------------------------------------------------------- shape of the store
    @property
    def rows(self) -> int:
        return int(self.manifest["rows"]["count"])

    @property
    def chunk_rows(self) -> int:
        return int(self.manifest["chunk_rows"])

    @property
    def num_chunks(self) -> int:
        return -(-self.rows // self.chunk_rows)

    def chunk_slice(self, chunk: int) -> slice:
        return slice(chunk * self.chunk_rows, min((chunk + 1) * self.chunk_rows, self.rows))

    @property
    def labels(self) -> np.ndarray:
        return np.load(self.root / "labels.npy")

    @property
    def indices(self) -> np.ndarray:
        return np.load(self.root / "indices.npy")

    def split(self, val_fraction: float = 0.1, seed: int = 0) -> np.ndarray:
        """Boolean mask of validation rows.

        The split is a property of each image in its whole dataset (data.stratified_split over all
        of the dataset's labels, fixed by the seed), not of this store's rows: every store of a
        dataset, whatever its subset, validates on the same images, and they are exactly the
        images `diffprobe pretrain` holds out with the same fraction and seed. (Stores written
        before dataset_labels.npy existed split their own rows.)
        """
        from ..data import stratified_split

        whole = self.root / "dataset_labels.npy"
        if whole.is_file():
            return stratified_split(np.load(whole), val_fraction, seed)[self.indices]
        return stratified_split(self.labels, val_fraction, seed)

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["data"]["classes"])

    def _paths(self, key: FeatureKey) -> tuple[Path, Path]:
        base = self.root / "features" / key.stem
        return base.with_suffix(".npy"), base.with_suffix(".done")

    def keys(self) -> list[FeatureKey]:
        folder = self.root / "features"
        if not folder.is_dir():
            return []
        return sorted(FeatureKey.parse(p.stem) for p in folder.glob("t*_b*_p*.npy"))

    # ---------------------------------------------------------------- writing
    def ensure_array(self, key: FeatureKey, dim: int) -> None:
        array_path, done_path = self._paths(key)
        dtype = np.dtype(self.manifest["dtype"])
        if not array_path.exists():
            atomic_write(array_path, lambda p: np.lib.format.open_memmap(p, mode="w+", dtype=dtype, shape=(self.rows, dim)).flush(), exclusive=True)
        if not done_path.exists():
            atomic_write(done_path, lambda p: Path(p).write_bytes(bytes(self.num_chunks)), exclusive=True)
        shape = np.load(array_path, mmap_mode="r").shape
        if shape != (self.rows, dim):
            raise DiffprobeError(f"{array_path} has shape {shape}, expected {(self.rows, dim)}: the store is damaged")

    def done_chunks(self, key: FeatureKey) -> np.ndarray:
        _, done_path = self._paths(key)
        if not done_path.exists():
            return np.zeros(self.num_chunks, dtype=bool)
        return np.frombuffer(done_path.read_bytes(), dtype=np.uint8).astype(bool)

    def write_chunk(self, key: FeatureKey, chunk: int, values: np.ndarray) -> None:
        """Write a chunk's rows, flush them, then mark the chunk done (in that order)."""
        if key not in self._maps:
            self._maps[key] = np.load(self._paths(key)[0], mmap_mode="r+")
        target = self._maps[key]
        target[self.chunk_slice(chunk)] = values
        target.flush()
        fd = os.open(self._paths(key)[1], os.O_WRONLY)
        try:
            os.pwrite(fd, b"\x01", chunk)  # one byte per chunk: disjoint writers never overlap
        finally:
            os.close(fd)

    # ---------------------------------------------------------------- reading
    def is_complete(self, key: FeatureKey) -> bool:
        return self._paths(key)[0].exists() and bool(self.done_chunks(key).all())

    def complete_keys(self) -> list[FeatureKey]:
        return [k for k in self.keys() if self.is_complete(k)]

    def load(self, key: FeatureKey, rows: np.ndarray | None = None) -> np.ndarray:
        """Features as float32 [rows, dim]; an incomplete array is an error, never partial data."""
        array_path, _ = self._paths(key)
        if not array_path.exists():
            have = ", ".join(k.stem for k in self.complete_keys()) or "none"
            raise DiffprobeError(f"{self.root} has no features for t={key.t} block={key.block} pool={key.pool} (complete: {have})")
        if not self.is_complete(key):
            missing = int((~self.done_chunks(key)).sum())
            raise DiffprobeError(f"{array_path.name} in {self.root} is incomplete ({missing} chunks missing): rerun the extraction to resume it")
        data = np.load(array_path, mmap_mode="r")
        values = np.asarray(data if rows is None else data[rows], dtype=np.float32)
        check_finite(values, key.t, key.block, key.pool, where=str(self.root))  # stores from before the guard
        return values

    def select_keys(self, stems: str | None = None) -> list[FeatureKey]:
        """Settings named like "t0090_b24_p1,t0150_b24_p1" (all complete ones when None), each complete."""
        if not stems:
            keys = self.complete_keys()
            if not keys:
                raise DiffprobeError(f"{self.root} holds no complete features")
            return keys
        try:
            keys = [FeatureKey.parse(stem) for stem in stems.split(",") if stem]
        except ValueError:
            raise DiffprobeError(f"settings {stems!r}: expected names like t0090_b24_p1, comma-separated") from None
        missing = [k.stem for k in keys if not self.is_complete(k)]
        if missing:
            have = ", ".join(k.stem for k in self.complete_keys()) or "none"
            raise DiffprobeError(f"{self.root} has no complete {', '.join(missing)} (complete: {have})")
        return keys

    def summary(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "rows": self.rows,
            "complete": [k.stem for k in self.complete_keys()],
            "incomplete": [k.stem for k in self.keys() if not self.is_complete(k)],
        }


def feature_keys(timesteps: Iterable[int], blocks: Iterable[int], pools: Iterable[int]) -> list[FeatureKey]:
    return sorted(FeatureKey(t, b, p) for t in timesteps for b in blocks for p in pools)

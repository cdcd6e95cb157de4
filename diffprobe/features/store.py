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

A damaged file (a truncated or unreadable array, a .done of the wrong size, labels that are short,
out of range or disagree with dataset_labels.npy) is an error naming it for every reader; a writer
(a rerun of extract) repairs it, keeping every chunk it can. A rerun with another chunk size
(--batch-size) resumes in the store's own chunks. New arrays have their disk blocks reserved, and
the free space is checked before they are made: a memory map on a full disk dies of SIGBUS.
"""

from __future__ import annotations

import errno
import functools
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


def tap_order(tap: "int | str") -> tuple:
    """Block numbers first, in order, then module paths (backbones/taps.py), by name."""
    return (0, tap, "") if isinstance(tap, int) else (1, 0, tap)


@functools.total_ordering
@dataclass(frozen=True)
class FeatureKey:
    t: int
    block: "int | str"  # a block number, or a module path inside the denoiser
    pool: int

    def _order(self) -> tuple:
        return (self.t, *tap_order(self.block), self.pool)

    def __lt__(self, other: "FeatureKey") -> bool:
        return self._order() < other._order()

    @property
    def stem(self) -> str:
        """The file name: t0090_b24_p1 for block 24; t0090_p1_mup_blocks.1.attentions.0 for a module path."""
        if isinstance(self.block, str):
            return f"t{self.t:04d}_p{self.pool}_m{self.block}"
        return f"t{self.t:04d}_b{self.block:02d}_p{self.pool}"

    @property
    def tap_label(self) -> str:
        return f"block {self.block}" if isinstance(self.block, int) else self.block

    @classmethod
    def parse(cls, stem: str) -> "FeatureKey":
        t, second, third = stem.split("_", 2)
        if second.startswith("p") and third.startswith("m") and len(third) > 1:
            return cls(int(t[1:]), third[1:], int(second[1:]))
        if "_" in third:
            raise ValueError(stem)
        return cls(int(t[1:]), int(second[1:]), int(third[1:]))


def _leaf_differences(a: Any, b: Any, where: str) -> list[str]:
    """'where.key: old vs new' for every differing leaf of two nested dicts (values shortened)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key) != b.get(key):
                out += _leaf_differences(a.get(key), b.get(key), f"{where}.{key}")
        return out
    return [f"{where}: {_short(a)} vs {_short(b)}"]


def _short(value: Any, width: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= width else text[: width - 1] + "…"


def _describe_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    """The fields that differ, down to the changed leaf (backbone.config.prompt: 'a cat' vs 'a dog'), in one line."""
    diffs = []
    for name in IDENTITY_FIELDS:
        if old.get(name) != new.get(name):
            diffs += _leaf_differences(old.get(name), new.get(name), name)
    return "; ".join(diffs[:4]) + (f"; and {len(diffs) - 4} more" if len(diffs) > 4 else "")


CHUNK_PRINTS = "chunk_prints.json"  # per chunk of rows: a hash of its images' names and sizes
_CREATION_FILES = {"labels.npy", "indices.npy", "dataset_labels.npy"}


def _identity(manifest: dict[str, Any], other: dict[str, Any]) -> dict[str, Any]:
    """The fields that must match. Where both sides know the data's layout (names and labels),
    the content fingerprint is left to the per-chunk check; older stores compare it whole."""
    ident = {k: manifest.get(k) for k in IDENTITY_FIELDS}
    if isinstance(ident.get("backbone"), dict):  # where the model lies is not what it is: a copied folder resumes
        ident["backbone"] = {k: v for k, v in ident["backbone"].items() if k != "source"}
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


class Damaged(Exception):
    """What is wrong with one file of a store (the caller names the file and the fix)."""


def npy_header(path: Path) -> tuple[tuple[int, ...], np.dtype, int]:
    """Shape, dtype and data offset of a .npy file, read from its header alone: nothing is loaded,
    mapped or unpickled, so a damaged or hostile file is described, never executed."""
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version not in readers:
                raise Damaged(f"not a .npy file diffprobe writes (format version {version})")
            shape, fortran, dtype = readers[version](f)
            offset = f.tell()
    except (ValueError, EOFError) as e:
        raise Damaged(f"not a readable .npy file ({e})") from None
    if fortran:
        raise Damaged("stored in Fortran order, which diffprobe never writes")
    return shape, dtype, offset


def load_rows_file(path: Path) -> np.ndarray:
    """A small per-row .npy (labels, indices), loaded with pickles refused."""
    try:
        return np.load(path, allow_pickle=False)
    except ValueError as e:  # truncated, garbled, or an object array (a pickle inside)
        raise Damaged(f"not a readable array of numbers ({e})") from None


def check_done_bytes(data: bytes, chunks: int) -> None:
    if len(data) != chunks:
        raise Damaged(f"it has {len(data)} byte(s), expected {chunks} (one per chunk of rows)")
    if data.strip(b"\x00\x01"):
        raise Damaged("it holds bytes other than 0 (to do) and 1 (done)")


class FeatureStore:
    """A directory of cached features. Open with `create_or_open` (writers) or `open` (readers)."""

    def __init__(self, root: str | Path, manifest: dict[str, Any]):
        self.root = Path(root)
        self.manifest = manifest
        self._maps: dict[FeatureKey, np.memmap] = {}
        self._rows_cache: tuple[np.ndarray, np.ndarray, np.ndarray | None] | None = None  # checked labels, indices, dataset labels

    def __repr__(self) -> str:
        backbone = self.manifest.get("backbone", {})
        source = backbone.get("source", "?") if isinstance(backbone, dict) else "?"
        rows = self.manifest.get("rows")
        count = rows.get("count", "?") if isinstance(rows, dict) else "?"
        return f"FeatureStore({str(self.root)!r}, {source}, {count} rows, {len(self.keys())} settings)"

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

        def chunk_prints(chunk_rows: int) -> list[str] | None:
            return _chunk_prints(row_prints, chunk_rows) if row_prints is not None else None

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
            store._repair_row_files(labels, indices, dataset_labels)
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
        return self._row_files()[0]

    @property
    def indices(self) -> np.ndarray:
        return self._row_files()[1]

    @property
    def dataset_labels(self) -> np.ndarray | None:
        """The label of every image of the dataset (checked against labels.npy), or None for stores
        written before dataset_labels.npy existed."""
        return self._row_files()[2]

    def split(self, val_fraction: float = 0.1, seed: int = 0) -> np.ndarray:
        """Boolean mask of validation rows.

        The split is a property of each image in its whole dataset (data.stratified_split over all
        of the dataset's labels, fixed by the seed), not of this store's rows: every store of a
        dataset, whatever its subset, validates on the same images, and they are exactly the
        images `diffprobe pretrain` holds out with the same fraction and seed. (Stores written
        before dataset_labels.npy existed split their own rows.)
        """
        from ..data import stratified_split

        labels, indices, whole = self._row_files()
        if whole is not None:
            return stratified_split(whole, val_fraction, seed)[indices]
        return stratified_split(labels, val_fraction, seed)

    def _damaged(self, path: Path, problem: str) -> DiffprobeError:
        return DiffprobeError(
            f"{path} is damaged: {problem}. Rerun the extract command that made {self.root} to repair it "
            "(finished chunks are kept), or pass --overwrite to start the store again"
        )

    def _row_files(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """labels.npy, indices.npy and dataset_labels.npy, checked against each other and the manifest:
        a short, garbled, float or out-of-range file, or labels shuffled against the dataset's, would
        otherwise train on wrong labels without a word."""
        if self._rows_cache is not None:
            return self._rows_cache
        n_classes = len(self.manifest.get("data", {}).get("classes") or []) or None
        size = self.manifest.get("data", {}).get("size")
        arrays = {}
        for name, length, bound in (("labels.npy", self.rows, n_classes), ("indices.npy", self.rows, size),
                                    ("dataset_labels.npy", size, n_classes)):  # fmt: skip
            path = self.root / name
            if name == "dataset_labels.npy" and not path.is_file():
                arrays[name] = None  # stores from before it existed
                continue
            try:
                values = load_rows_file(path)
                what = "class labels" if "labels" in name else "dataset indices"
                if values.dtype.kind not in "iu":
                    raise Damaged(f"it holds {values.dtype} values, expected integer {what}")
                if values.ndim != 1 or (length is not None and len(values) != length):
                    raise Damaged(f"it holds {values.size} values{'' if values.ndim == 1 else f' of shape {values.shape}'}, expected {length} {what}")
                low = int(values.min()) if len(values) else 0
                high = int(values.max()) if len(values) else 0
                if low < 0 or (bound is not None and high >= bound):
                    bad = low if low < 0 else high
                    raise Damaged(f"it holds {bad}, expected {what} from 0 to {bound - 1 if bound else 'any'}")
            except FileNotFoundError:
                raise self._damaged(path, "the file is missing") from None
            except Damaged as e:
                raise self._damaged(path, str(e)) from None
            arrays[name] = values.astype(np.int64)
        labels, indices, whole = arrays["labels.npy"], arrays["indices.npy"], arrays["dataset_labels.npy"]
        if whole is not None:
            if len(indices) and int(indices.max()) >= len(whole):
                raise self._damaged(self.root / "indices.npy", f"it holds {int(indices.max())}, beyond the {len(whole)} images of dataset_labels.npy")
            wrong = np.flatnonzero(whole[indices] != labels)
            if len(wrong):
                r = int(wrong[0])
                raise self._damaged(self.root / "labels.npy", f"it disagrees with dataset_labels.npy on {len(wrong)} of {len(labels)} rows "
                                    f"(first: row {r}, image {int(indices[r])}: {int(labels[r])} vs {int(whole[indices[r]])})")  # fmt: skip
        self._rows_cache = (labels, indices, whole)
        return self._rows_cache

    def _repair_row_files(self, labels: np.ndarray, indices: np.ndarray, dataset_labels: np.ndarray | None) -> None:
        """A writer knows what these files must hold (its identity matched: same dataset, same rows),
        so a damaged one is rewritten rather than refused."""
        for name, values in (("labels.npy", labels), ("indices.npy", indices), ("dataset_labels.npy", dataset_labels)):
            path = self.root / name
            if values is None or (name == "dataset_labels.npy" and not path.is_file()):
                continue
            try:
                stored = load_rows_file(path) if path.is_file() else None
            except Damaged:
                stored = None
            same = stored is not None and stored.dtype == np.int64 and np.array_equal(stored, values.astype(np.int64))
            if not same:
                log.warning("%s was damaged (missing, unreadable or not what the dataset defines): rewritten from the dataset", path)
                save_npy(path, values.astype(np.int64))
        self._rows_cache = None

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["data"]["classes"])

    def _paths(self, key: FeatureKey) -> tuple[Path, Path]:
        folder = self.root / "features"  # not with_suffix: a module path's stem has dots of its own
        return folder / f"{key.stem}.npy", folder / f"{key.stem}.done"

    def keys(self) -> list[FeatureKey]:
        folder = self.root / "features"
        if not folder.is_dir():
            return []
        return sorted(FeatureKey.parse(p.stem) for p in folder.glob("t*_p*.npy"))

    # ---------------------------------------------------------------- checking arrays
    def _array_problem(self, key: FeatureKey, dim: int | None = None) -> tuple[str, int | None] | None:
        """What is wrong with a feature array's file, if anything: (problem, bytes present) where the
        header is sound but the data is cut short (those chunks can be kept), else (problem, None)."""
        path = self._paths(key)[0]
        try:
            shape, dtype, offset = npy_header(path)
        except Damaged as e:
            return str(e), None
        expected_dtype = np.dtype(self.manifest["dtype"])
        if dtype != expected_dtype:
            what = "Python objects (dtype object)" if dtype.hasobject else f"{dtype} values"
            return f"it holds {what}, expected {expected_dtype} features", None
        if len(shape) != 2 or shape[0] != self.rows or (dim is not None and shape[1] != dim):
            want = f"({self.rows}, {dim if dim is not None else 'channels'})"
            return f"it has shape {shape}, expected {want}", None
        size, need = path.stat().st_size, offset + shape[0] * shape[1] * dtype.itemsize
        if size < need:
            return f"it is truncated ({size} of {need} bytes)", size
        return None

    def _done_problem(self, key: FeatureKey) -> str | None:
        try:
            check_done_bytes(self._paths(key)[1].read_bytes(), self.num_chunks)
        except FileNotFoundError:
            return None
        except Damaged as e:
            return str(e)
        return None

    def damage(self, key: FeatureKey) -> DiffprobeError | None:
        """The one-line error for a damaged array or .done file of `key` (None if both are sound)."""
        array_path, done_path = self._paths(key)
        if array_path.exists() and (problem := self._array_problem(key)):
            return self._damaged(array_path, problem[0])
        if problem := self._done_problem(key):
            return self._damaged(done_path, problem)
        return None

    # ---------------------------------------------------------------- writing
    def check_free_space(self, dims: dict[FeatureKey, int]) -> None:
        """Refuse, before any array is created or mapped, what the disk cannot hold: a write into a
        memory map on a full disk kills the process with SIGBUS, printing nothing. Counts the arrays
        still to create and the unallocated holes of existing (sparse) ones."""
        itemsize, need = np.dtype(self.manifest["dtype"]).itemsize, 0
        for key, dim in dims.items():
            path = self._paths(key)[0]
            if path.exists():  # a sparse array's holes, but only as much as its unfinished chunks can fill
                # (compressing file systems report fewer blocks than bytes for finished data too)
                st, todo = path.stat(), int((~self.done_chunks(key)).sum()) * self.chunk_rows * dim * itemsize
                need += min(max(0, st.st_size - st.st_blocks * 512), todo)
            else:
                need += self.rows * dim * itemsize + 4096  # + header and .done
        free = shutil.disk_usage(self.root).free
        if need > free:
            raise DiffprobeError(
                f"not enough free space for the features of {self.root}: they need {_size(need)}, the disk has "
                f"{_size(free)} free. Free space (or choose another --out) and rerun the same command: finished chunks are kept"
            )

    def ensure_array(self, key: FeatureKey, dim: int) -> None:
        """Create the array and its .done file, or check them. Damage a rerun can undo is undone and
        logged: a truncated array keeps its whole chunks and recomputes the rest; an unreadable one
        is moved aside (NAME.npy.damaged, nothing deleted) and recomputed; a garbled .done cannot
        say which chunks are finished, so all of them are recomputed."""
        array_path, done_path = self._paths(key)
        dtype = np.dtype(self.manifest["dtype"])
        if array_path.exists() and (problem := self._array_problem(key, dim)):
            reason, present = problem
            if present is not None:
                self._salvage_truncated(key, dim, present, reason)
            else:
                aside = array_path.with_name(array_path.name + ".damaged")
                os.replace(array_path, aside)
                done_path.unlink(missing_ok=True)
                log.warning("%s was damaged (%s): moved aside to %s and recomputed", array_path, reason, aside.name)
        if (reason := self._done_problem(key)) is not None:
            log.warning("%s was damaged (%s): it cannot tell which chunks are finished, so %s is recomputed",
                        done_path, reason, array_path.name)  # fmt: skip
            atomic_write(done_path, lambda p: Path(p).write_bytes(bytes(self.num_chunks)))
        if not array_path.exists():
            done_path.unlink(missing_ok=True)  # marks of an array that is not there mean nothing
            atomic_write(array_path, lambda p: _create_array(p, dtype, (self.rows, dim)), exclusive=True)
        if not done_path.exists():
            atomic_write(done_path, lambda p: Path(p).write_bytes(bytes(self.num_chunks)), exclusive=True)

    def _salvage_truncated(self, key: FeatureKey, dim: int, present: int, reason: str) -> None:
        """Extend a cut-short array to its size and unmark the chunks that reached past the cut."""
        array_path, done_path = self._paths(key)
        _, dtype, offset = npy_header(array_path)
        row_bytes = dim * dtype.itemsize
        done = bytearray(done_path.read_bytes()) if self._done_problem(key) is None and done_path.exists() else bytearray(self.num_chunks)
        lost = [c for c in range(self.num_chunks) if done[c] and offset + self.chunk_slice(c).stop * row_bytes > present]
        for c in lost:
            done[c] = 0
        atomic_write(done_path, lambda p: Path(p).write_bytes(bytes(done)))  # first: no chunk stays marked over zeros
        os.truncate(array_path, offset + self.rows * row_bytes)
        _reserve(array_path)  # the writer that repairs runs before any other rank writes (extract's barrier)
        log.warning("%s was damaged (%s): %d finished chunk(s) past the cut are recomputed, the other %d kept",
                    array_path, reason, len(lost), sum(done))  # fmt: skip

    def done_chunks(self, key: FeatureKey) -> np.ndarray:
        """Which chunks are finished. A .done file of the wrong size or with other bytes than 0 and 1
        (damaged) counts as none: it must never make an array look complete."""
        _, done_path = self._paths(key)
        if not done_path.exists() or self._done_problem(key) is not None:
            return np.zeros(self.num_chunks, dtype=bool)
        return np.frombuffer(done_path.read_bytes(), dtype=np.uint8).astype(bool)

    def write_chunk(self, key: FeatureKey, chunk: int, values: np.ndarray) -> None:
        """Write a chunk's rows, flush them, then mark the chunk done (in that order)."""
        if key not in self._maps:
            self._maps[key] = np.load(self._paths(key)[0], mmap_mode="r+")
        target = self._maps[key]
        try:
            target[self.chunk_slice(chunk)] = values
            target.flush()
            fd = os.open(self._paths(key)[1], os.O_WRONLY)
            try:
                os.pwrite(fd, b"\x01", chunk)  # one byte per chunk: disjoint writers never overlap
            finally:
                os.close(fd)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            raise DiffprobeError(f"no space left on the disk of {self.root} while writing {key.stem}: free space and rerun "
                                 "the same command (finished chunks are kept; this one is recomputed)") from None  # fmt: skip

    # ---------------------------------------------------------------- reading
    def is_complete(self, key: FeatureKey) -> bool:
        return self._paths(key)[0].exists() and bool(self.done_chunks(key).all()) and self._array_problem(key) is None

    def only_timestep(self) -> int:
        """The store's timestep when it holds one (an image encoder's store: 0); otherwise ask for --t."""
        ts = sorted({k.t for k in self.keys()})
        if len(ts) != 1:
            raise DiffprobeError(f"{self.root} holds timesteps {', '.join(map(str, ts)) or 'none'}: give --t")
        return ts[0]

    def complete_keys(self) -> list[FeatureKey]:
        """The settings ready to read. A damaged file is an error naming it, not a setting quietly
        left out: the reader would otherwise say only "no complete features"."""
        for k in self.keys():
            if error := self.damage(k):
                raise error
        return [k for k in self.keys() if self.is_complete(k)]

    def load(self, key: FeatureKey, rows: np.ndarray | None = None) -> np.ndarray:
        """Features as float32 [rows, dim]; an incomplete or damaged array is an error, never partial data."""
        data = self.open_array(key)
        values = np.asarray(data if rows is None else data[rows], dtype=np.float32)
        check_finite(values, key.t, key.block, key.pool, where=str(self.root))  # stores from before the guard
        return values

    def open_array(self, key: FeatureKey) -> np.ndarray:
        """The whole array of a setting, memory-mapped read-only in its stored dtype (nothing read yet);
        an incomplete or damaged array is an error."""
        array_path, _ = self._paths(key)
        if not array_path.exists():
            have = ", ".join(k.stem for k in self.complete_keys()) or "none"
            raise DiffprobeError(f"{self.root} has no features for t={key.t} block={key.block} pool={key.pool} (complete: {have})")
        if error := self.damage(key):
            raise error
        if not self.is_complete(key):
            missing = int((~self.done_chunks(key)).sum())
            raise DiffprobeError(f"{array_path.name} in {self.root} is incomplete ({missing} chunks missing): rerun the extraction to resume it")
        return np.load(array_path, mmap_mode="r")

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
        for k in keys:
            if self._paths(k)[0].exists() and (error := self.damage(k)):
                raise error
        missing = [k.stem for k in keys if not self.is_complete(k)]
        if missing:
            have = ", ".join(k.stem for k in self.complete_keys()) or "none"
            raise DiffprobeError(f"{self.root} has no complete {', '.join(missing)} (complete: {have})")
        return keys

    def summary(self) -> dict[str, Any]:
        return {
            "root": str(self.root),
            "rows": self.rows,
            "complete": [k.stem for k in self.keys() if self.is_complete(k)],
            "incomplete": [k.stem for k in self.keys() if not self.is_complete(k)],
            "damaged": [str(e) for k in self.keys() if (e := self.damage(k))],
        }


def _size(n: int) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} bytes"  # unreachable


def _create_array(path: str, dtype: np.dtype, shape: tuple[int, int]) -> None:
    """A new .npy array with its blocks reserved: open_memmap alone makes a sparse file, whose
    blocks are only found (or not: SIGBUS) when the memory map is written."""
    np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape).flush()
    _reserve(path)  # the file is still private (a temporary name): no other writer to race


def _reserve(path: str | Path) -> None:
    """Allocate a file's holes. Only on files no other process writes yet: where the file system
    lacks fallocate, glibc emulates it by writing zero bytes into blocks it reads as zero."""
    fd = os.open(path, os.O_RDWR)
    try:
        os.posix_fallocate(fd, 0, os.fstat(fd).st_size)
    except OSError as e:
        if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise  # ENOSPC: the caller's output_errors makes it one line
    finally:
        os.close(fd)


def feature_keys(timesteps: Iterable[int], blocks: Iterable[int], pools: Iterable[int]) -> list[FeatureKey]:
    return sorted(FeatureKey(t, b, p) for t in timesteps for b in blocks for p in pools)

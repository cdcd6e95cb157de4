"""Feature rows for head training: in memory when they fit, else read from the store's memory map
batch by batch, so a head's peak memory does not grow with the store.

`load_inputs` gives, per setting, either a float32 tensor or a `StoreRows`: both index the same
way (`x[tensor_of_positions]`, `x[a:b]`, `len(x)`, `.to(device)`), so training and evaluation do not
branch. Ranks on one machine that stream the same store share its pages through the OS page cache.
The input standardisation is computed the same way on both (float64 sums over chunks), so a head
trained on streamed rows is the head trained on the same rows in memory.

The budget: $DIFFPROBE_MEMORY_BUDGET (bytes, or with K/M/G), else half the memory available now.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from ..errors import DiffprobeError
from ..features.guard import check_finite
from ..features.store import FeatureKey

CHUNK = 8192  # rows per read when a pass goes over every row


def memory_budget() -> int:
    """Bytes of features a head may hold in memory."""
    text = os.environ.get("DIFFPROBE_MEMORY_BUDGET")
    if text:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
        if not match:
            raise DiffprobeError(f"DIFFPROBE_MEMORY_BUDGET={text!r}: expected bytes, e.g. 4G or 500M")
        scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[match.group(2).upper()]
        return int(float(match.group(1)) * scale)
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 // 2
    return 4 * 2**30


class StoreRows:
    """Rows `rows` of one stored setting, read from its memory map as float32, a batch at a time."""

    def __init__(self, store: Any, key: FeatureKey, rows: np.ndarray, device: str | torch.device = "cpu"):
        self.store, self.key, self.rows, self.device = store, key, np.asarray(rows), torch.device(device)
        self.array = store.open_array(key)
        # Rows of a file are read with pread, not through the mapping: pages touched through a
        # mapping count in the process's resident memory until it is closed, so an epoch over a
        # big store would look (and be accounted, by cgroups) as big as the store.
        self.file = getattr(self.array, "filename", None)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def shape(self) -> tuple[int, int]:
        return (len(self.rows), int(self.array.shape[1]))

    def to(self, device: str | torch.device) -> "StoreRows":
        return StoreRows(self.store, self.key, self.rows, device)

    def __getitem__(self, index: Any) -> torch.Tensor:
        positions = np.arange(*index.indices(len(self.rows))) if isinstance(index, slice) else torch.as_tensor(index).cpu().numpy()
        wanted = self.rows[positions]
        order = np.argsort(wanted, kind="stable")  # reads in file order; the batch keeps its own order
        values = np.empty((len(wanted), self.shape[1]), dtype=np.float32)
        values[order] = self._read(wanted[order]) if self.file else self.array[wanted[order]]
        return torch.from_numpy(values).to(self.device)

    def _read(self, rows: np.ndarray) -> np.ndarray:
        """Sorted rows from the .npy file, each run of consecutive rows in one pread."""
        width, dtype = self.array.shape[1], self.array.dtype
        row_bytes = width * dtype.itemsize
        out = np.empty((len(rows), width), dtype=dtype)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1
        fd = os.open(self.file, os.O_RDONLY)
        try:
            for run in np.split(np.arange(len(rows)), breaks):
                first, count = int(rows[run[0]]), len(run)
                data = os.pread(fd, count * row_bytes, self.array.offset + first * row_bytes)
                out[run[0]:run[0] + count] = np.frombuffer(data, dtype=dtype).reshape(count, width)
        finally:
            os.close(fd)
        return out

    def chunks(self) -> Any:
        for start in range(0, len(self.rows), CHUNK):
            yield self[start:start + CHUNK]


def load_inputs(store: Any, keys: Sequence[FeatureKey], rows: np.ndarray | None = None) -> list[Any]:
    """Per setting, the rows as a float32 tensor, or as StoreRows when all of them together would
    pass the memory budget."""
    rows = np.arange(store.rows) if rows is None else np.asarray(rows)
    widths = [int(store.open_array(k).shape[1]) for k in keys]
    if 4 * len(rows) * sum(widths) <= memory_budget():
        return [torch.from_numpy(store.load(k, rows)) for k in keys]
    return [StoreRows(store, k, rows) for k in keys]


def standardization(x: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-feature mean and standard deviation (unbiased, floored at 1e-6) of a tensor's or StoreRows'
    rows, from float64 sums over chunks: the same numbers either way. Non-finite rows are an error."""
    total = squares = None
    count = 0
    parts = x.chunks() if isinstance(x, StoreRows) else (x[i:i + CHUNK] for i in range(0, len(x), CHUNK))
    for part in parts:
        part64 = part.double()
        if isinstance(x, StoreRows):
            check_finite(part.numpy(), x.key.t, x.key.block, x.key.pool, where=str(x.store.root))
        total = part64.sum(0) if total is None else total + part64.sum(0)
        squares = (part64**2).sum(0) if squares is None else squares + (part64**2).sum(0)
        count += len(part)
    mean = total / count
    var = ((squares - count * mean**2) / max(count - 1, 1)).clamp_min(0)
    return mean.float().reshape(1, -1), var.sqrt().float().clamp_min(1e-6).reshape(1, -1)

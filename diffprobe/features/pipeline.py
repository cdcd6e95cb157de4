"""What extraction overlaps with the network's pass: noise drawn by the loader, chunks written by a thread.

Per chunk, extraction draws ε for every image (one seeded generator per image, on the CPU, so
that ε is the same on any device), runs the network, and writes each setting's rows to disk.
Done one after another, the GPU waits for the host twice per chunk: drawing ε for 64 images at
256 px takes ~70 ms on one core (benchmarks/pipeline.py), about as long as ADM-256's pass on an
H100. So:

- `NoisedImages` draws each image's ε inside the DataLoader, in its worker processes and ahead
  of time, and the loader pins it with the image for an asynchronous upload;
- `ChunkWriter` copies a chunk's pooled features to the host in one transfer, and a background
  thread casts, checks and writes them while the main thread runs the next chunk.

Neither changes a value: ε comes from the same function (`featurize.noise_draws`), the rows written
are the same bytes, and a chunk is still marked done only after its rows are flushed (a thread
still writing when the process is stopped leaves that chunk undone, to be recomputed).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from .guard import check_finite
from .featurize import noise_draws
from .store import FeatureKey, FeatureStore

log = logging.getLogger(__name__)
IN_FLIGHT_IMAGES = 4096  # images (with their ε) the loader's workers may hold ready: bounds shared and pinned host memory
PENDING_CHUNKS = 2  # chunks computed but not yet written: bounds host memory, and surfaces a write error within two chunks


class NoisedImages(Dataset):
    """A dataset of (image, label, index, error) items with each image's ε draws appended:
    [draws, *model_shape], draw d of view v from stream (seed, index, v·draws + d), as
    `featurize.noise_draws` draws them."""

    def __init__(self, images: Dataset, seed: int, shape: Sequence[int], draws: int, views: np.ndarray | None = None):
        self.images, self.seed, self.shape, self.draws, self.views = images, seed, tuple(shape), draws, views

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int) -> tuple:
        item = self.images[key]
        view = int(self.views[key]) if self.views is not None else 0
        return (*item, torch.cat(noise_draws([item[2]], self.seed, self.shape, self.draws, [view])))


def prefetch_factor(batch: int, workers: int) -> dict:
    """The DataLoader's prefetch_factor (batches each worker prepares ahead), at most 2 and as many as
    IN_FLIGHT_IMAGES allow: 8 workers × 2 batches of 512 images with their ε at 256 px would hold
    ~25 GB of host memory. Empty without workers (the option is refused then)."""
    return {"prefetch_factor": max(1, min(2, IN_FLIGHT_IMAGES // max(1, batch * workers)))} if workers else {}


class ChunkWriter:
    """Writes computed chunks to the store: on a background thread (`background=True`), or at once.

    `submit` starts one device-to-host copy of all the chunk's settings (into pinned memory on a
    GPU, marked by an event) and returns; the thread waits for that copy, casts to the store's
    dtype, checks the values are finite and writes each setting. At most PENDING_CHUNKS wait,
    and a failed write is raised by the next `submit` or by leaving the `with` block, which
    always waits for the chunks already computed to be written.
    """

    def __init__(self, store: FeatureStore, dtype: str, background: bool = True):
        self.store, self.dtype, self.background = store, dtype, background
        self._queue: queue.Queue = queue.Queue(maxsize=PENDING_CHUNKS)
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._drain, name="diffprobe-chunk-writer", daemon=True)
            self._thread.start()

    def __enter__(self) -> "ChunkWriter":
        return self

    def __exit__(self, kind, error, trace) -> None:
        self.close(raise_error=kind is None)

    def submit(self, chunk: int, pooled: dict[FeatureKey, torch.Tensor]) -> None:
        keys = list(pooled)
        flat = torch.cat([pooled[k] for k in keys], dim=1)  # one transfer for the chunk, not one per setting
        widths = [pooled[k].shape[1] for k in keys]
        event = None
        if flat.device.type == "cuda":
            with torch.cuda.device(flat.device):  # the copy's stream is flat's device's, and the event must mark that one
                host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
                host.copy_(flat, non_blocking=True)
                event = torch.cuda.Event(blocking=True)  # the writer thread sleeps on it instead of spinning a core
                event.record(torch.cuda.current_stream(flat.device))
        else:
            host = flat.detach().cpu()
        job = (chunk, keys, widths, host, event)
        if not self.background:
            self._write(*job)
            return
        self._raise_pending()
        self._queue.put(job)  # blocks while PENDING_CHUNKS wait: the thread is the slower side

    def close(self, raise_error: bool = True) -> None:
        """Wait until every submitted chunk is written; raise the first failure (when already failing, log it)."""
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()
        if raise_error:
            self._raise_pending()
        elif self._error is not None:
            log.error("writing a chunk also failed: %s", self._error)

    def _raise_pending(self) -> None:
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def _drain(self) -> None:
        while (job := self._queue.get()) is not None:
            if self._error is None:  # after a failure the rest is dropped: nothing is marked done out of order
                try:
                    self._write(*job)
                except BaseException as e:  # handed to the main thread, which raises it
                    self._error = e

    def _write(self, chunk: int, keys: list[FeatureKey], widths: list[int], host: torch.Tensor, event) -> None:
        if event is not None:
            event.synchronize()
        parts = np.split(host.numpy(), np.cumsum(widths)[:-1], axis=1)
        for k, part in zip(keys, parts):
            values = part.astype(self.dtype)
            check_finite(values, k.t, k.block, k.pool)  # after the cast: float16 overflow counts too
            self.store.write_chunk(k, chunk, values)

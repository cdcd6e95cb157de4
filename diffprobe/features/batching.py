"""How many images one pass takes: a fixed default on CPUs, on a GPU what its free memory holds.

A store is cut into chunks of rows (resume, ranks and the done marks work per chunk), and a
chunk is one pass, unless it does not fit: then it runs in passes of half, a quarter, ... of
its rows, so a store made on a large GPU resumes on a small one. On a GPU the default is measured, not guessed: two small passes (2 and 4 images,
after one that reads lazily loaded weights) give the bytes each image adds to the peak, and
the pass is the largest power of two that fits MEMORY_SHARE of the free memory, shared by the
ranks on the device. A pass that still runs out of memory (fragmentation, another process)
is retried in halves, so the work goes on instead of stopping; after a run of chunks without
trouble the larger pass is tried again, since one OOM need not mean the rest never fits.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, TypeVar

import torch

from ..backbones.base import Backbone
from ..errors import DiffprobeError
from ..precision import Compute
from .plan import FeaturePlan

log = logging.getLogger(__name__)

CPU_BATCH = 64  # the batch every CPU figure in benchmarks/ and the README was measured at
MAX_GPU_BATCH = 512  # past this a pass gains no speed and a chunk's writes grow large
REGROW_AFTER = 8  # chunks without trouble before a halved pass is tried at double again (a failed try waits 4× longer)
MEMORY_SHARE = 0.8  # of the device's free memory: the rest for the allocator's fragmentation and the loader's pinned uploads

T = TypeVar("T")


def default_batch_size(backbone: Backbone, plan: FeaturePlan, compute: Compute, ranks_per_device: int = 1,
                       class_label: int | None = None) -> int:  # fmt: skip
    """Images per pass when none is asked for: CPU_BATCH on a CPU; on a GPU, fitted to its free memory."""
    if compute.device.type != "cuda":
        return CPU_BATCH
    per_image = bytes_per_image(backbone, plan, compute, class_label)
    free, _ = torch.cuda.mem_get_info(compute.device)
    return fitted_batch(free * MEMORY_SHARE / max(1, ranks_per_device), per_image)


def fitted_batch(budget_bytes: float, per_image_bytes: float, ceiling: int = MAX_GPU_BATCH) -> int:
    """The largest power of two ≤ ceiling whose pass fits the budget (at least 1)."""
    batch = 1
    while batch * 2 <= ceiling and batch * 2 * per_image_bytes <= budget_bytes:
        batch *= 2
    return batch


@contextlib.contextmanager
def eager(runner: Backbone):
    """The runner's uncompiled walk for a while: measuring must not compile for other batch sizes."""
    compiled = runner._run
    runner._run = None
    try:
        yield runner
    finally:
        runner._run = compiled


def bytes_per_image(backbone: Backbone, plan: FeaturePlan, compute: Compute, class_label: int | None = None) -> float:
    """What one more image adds to the peak memory of a pass to the plan's deepest block (and of
    the VAE's encode for latent models), measured eagerly on the device: eager keeps at least as
    many tensors alive as compiled code, so the fit errs on the safe side."""
    from .featurize import encode_images

    device = compute.device
    runner = compute.prepare(backbone)
    resolved = plan.resolve(backbone)
    t, blocks = resolved.keys[0].t, list({k.block: None for k in resolved.keys})

    def peak(rows: int, step: Callable[[int], object]) -> int:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step(rows)
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base

    def walk(rows: int) -> None:
        x = torch.zeros(rows, *backbone.model_shape, device=device)
        y = None if class_label is None else torch.full((rows,), class_label, device=device)  # class-conditional models need one
        with torch.inference_mode(), compute.autocast(), eager(runner):
            runner.forward_features(compute.batch(x), t, blocks, y=y)

    def encode(rows: int) -> None:
        with torch.inference_mode():
            encode_images(backbone, torch.zeros(rows, 3, backbone.image_size, backbone.image_size), compute)

    steps = [walk] + ([encode] if backbone.encodes_images else [])
    per_image = 0.0
    for step in steps:
        step(1)  # weights read lazily, kernels chosen: once-only costs kept out of the measure
        per_image = max(per_image, (peak(4, step) - peak(2, step)) / 2)
    return max(per_image, 1.0)


def in_passes(rows: int, pass_rows: int, run: Callable[[slice], T]) -> list[T]:
    """run(slice) over consecutive slices of at most pass_rows of `rows` rows."""
    return [run(slice(start, min(start + pass_rows, rows))) for start in range(0, rows, pass_rows)]


def release_cached(device: torch.device) -> None:
    """After an OOM: the blocks the failed pass left in PyTorch's CUDA cache go back, so the next try sees them free."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def halving_on_oom(pass_rows: int, run: Callable[[int], T], device: torch.device) -> tuple[T, int]:
    """run(pass_rows), retried with half the rows each time the device runs out of memory; returns
    the result and the pass size that worked (the caller keeps it for the chunks that follow)."""
    while True:
        try:
            return run(pass_rows), pass_rows
        except torch.OutOfMemoryError:
            if pass_rows == 1:
                raise DiffprobeError(f"one image at a time does not fit in the memory of {device}: use a device with more memory, "
                                     "--precision bf16/fp16, or an earlier block") from None  # fmt: skip
            pass_rows = max(1, pass_rows // 2)
            release_cached(device)
            log.warning("%s ran out of memory: passes of %d images for now (--batch-size sets the chunk)", device, pass_rows)


class PassSize:
    """Images per pass, chunk after chunk: the chunk's rows, halved on each OOM (halving_on_oom).
    A transient OOM (fragmentation, another process's burst) would otherwise cost the rest of a
    long extraction its batch size, so after REGROW_AFTER clean chunks the pass is tried at double
    size, up to the chunk's rows; a try that runs out of memory keeps the size that worked and
    waits four times longer before the next one, so a GPU that is really full pays rarely."""

    def __init__(self, rows: int, device: torch.device):
        self.ceiling, self.rows, self.device = rows, rows, device
        self.clean, self.wait = 0, REGROW_AFTER

    def run(self, run: Callable[[int], T]) -> T:
        if self.rows < self.ceiling and self.clean >= self.wait:
            trial = min(self.ceiling, self.rows * 2)
            try:
                result = run(trial)
            except torch.OutOfMemoryError:
                release_cached(self.device)
                self.clean, self.wait = 0, self.wait * 4
                log.info("passes of %d images still do not fit %s: staying at %d", trial, self.device, self.rows)
            else:
                log.info("passes of %d images fit %s again", trial, self.device)
                self.rows, self.clean, self.wait = trial, 0, REGROW_AFTER  # that OOM was passing: the next one starts afresh
                return result
        result, rows = halving_on_oom(self.rows, run, self.device)
        self.clean = self.clean + 1 if rows == self.rows else 0
        self.rows = rows
        return result

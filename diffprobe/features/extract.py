"""The extraction loop: dataset -> noise(t, seed) -> backbone blocks -> pooled features -> store.

One U-Net pass per (batch, timestep) yields every requested block; the pass stops after
the deepest block. Work is done in chunks of rows (a chunk is a batch); a chunk already
marked done in the store is skipped, so an interrupted extraction resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import __version__
from ..backbones.base import Backbone
from ..data import (
    AugmentedViews,
    LabeledImages,
    TransformedImages,
    augment_description,
    model_transform,
    stratified_subset,
    transform_description,
)
from ..errors import DiffprobeError
from .latents import LatentCache
from .noise import image_noise
from ..precision import Compute, choose_compute
from .store import FeatureKey, FeatureStore, feature_keys

log = logging.getLogger(__name__)
DTYPES = ("float16", "float32")


def pool_features(h: torch.Tensor, pool: int) -> torch.Tensor:
    """Adaptive average pooling to pool×pool, flattened channel-major ([B, C·p·p]), in float32."""
    return F.adaptive_avg_pool2d(h.float(), pool).flatten(1)


def batch_features(backbone: Backbone, compute: Compute, x0: torch.Tensor, t: int, noises: Sequence[torch.Tensor],
                   keys: Sequence[FeatureKey], y: torch.Tensor | None = None) -> dict[FeatureKey, torch.Tensor]:  # fmt: skip
    """Pooled features of one batch at one timestep, averaged over the given noise draws.

    One pass per draw computes every requested block and stops after the deepest.
    """
    blocks = sorted({k.block for k in keys})
    sums: dict[FeatureKey, torch.Tensor] = {}
    for eps in noises:
        x_t = compute.batch(backbone.schedule.q_sample(x0, t, eps))
        with compute.autocast():
            feats = backbone.forward_features(x_t, t, blocks, y=y)
        for k in keys:
            pooled = pool_features(feats[k.block], k.pool)
            sums[k] = pooled if k not in sums else sums[k] + pooled
    return {k: v / len(noises) for k, v in sums.items()}


@dataclass(frozen=True)
class ExtractionPlan:
    timesteps: list[int]
    blocks: list[int]
    pools: list[int]

    @property
    def keys(self) -> list[FeatureKey]:
        return feature_keys(self.timesteps, self.blocks, self.pools)


def make_plan(backbone: Backbone, timesteps: Sequence[int], blocks: Sequence[int] | str, pools: Sequence[int]) -> ExtractionPlan:
    ts = sorted(set(backbone.schedule.check_timesteps(timesteps)))
    if not ts:
        raise DiffprobeError("no timesteps requested")
    chosen = backbone.resolve_blocks(blocks)
    pools = sorted(set(int(p) for p in pools))
    if not pools or min(pools) < 1:
        raise DiffprobeError(f"pool sizes must be integers ≥ 1, got {pools}")
    for b in chosen:
        res = backbone.blocks[b - 1].resolution
        if max(pools) > res:
            raise DiffprobeError(f"pool {max(pools)} is larger than block {b}'s {res}×{res} feature map")
    return ExtractionPlan(ts, chosen, pools)


def build_manifest(backbone: Backbone, data: LabeledImages, rows: np.ndarray, plan_dtype: str, compute: Compute,
                   seed: int, draws: int, chunk_rows: int, cond_class: int | None, limit: int | None,
                   subset_seed: int, augment_views: int = 0, augment_seed: int = 0) -> dict:  # fmt: skip
    return {
        "backbone": {
            "source": backbone.source,
            "family": backbone.family,
            "fingerprint": backbone.fingerprint(),
            "config": backbone.config,
            "class_label": cond_class,
        },
        "data": {"name": data.name, "fingerprint": data.fingerprint(), "size": len(data), "classes": data.classes},
        "rows": {
            "count": len(rows),
            "selection": hashlib.sha256(rows.astype(np.int64).tobytes()).hexdigest()[:20],
            "limit": limit,
            "subset_seed": subset_seed if limit is not None else None,
        },
        "transform": (augment_description(backbone.image_size, augment_views, augment_seed) if augment_views
                      else transform_description(backbone.image_size)),
        "noise": {"schedule": backbone.schedule.name, "seed": seed, "draws": draws},
        "dtype": plan_dtype,
        "precision": compute.precision,
        "chunk_rows": chunk_rows,
        "loaded_with": {"spec": absolute_spec(backbone.spec), "options": backbone.load_options},
        "written_with": {
            "diffprobe": __version__,
            "torch": torch.__version__,
            "device": compute.describe(),
            "python": platform.python_version(),
        },
    }


def absolute_spec(spec: str) -> str:
    """The spec with a local path made absolute, so a saved run finds the checkpoint from anywhere."""
    family, sep, target = spec.partition(":")
    if sep and target != "random" and Path(target).exists():
        return f"{family}:{Path(target).resolve()}"
    return spec


def extract(
    backbone: Backbone,
    data: LabeledImages,
    out: str | Path,
    timesteps: Sequence[int],
    blocks: Sequence[int] | str,
    pools: Sequence[int] = (1,),
    *,
    seed: int = 0,
    draws: int = 1,
    batch_size: int = 64,
    dtype: str = "float16",
    compute: Compute | None = None,
    limit: int | None = None,
    subset_seed: int = 0,
    cond_class: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    augment_views: int = 0,
    augment_seed: int = 0,
) -> FeatureStore:
    """Extract pooled block features of `data` into the store at `out` (resuming if present).

    rank/world_size: this process writes chunks rank, rank+world_size, ... so several
    processes (torchrun ranks) fill one store together.
    augment_views=K: instead of the centre crop, K random-resized-crop + flip views of each
    image (rows = images × K, view-major within an image), each with its own noise, so heads
    can train with augmentation without running the U-Net every epoch.
    """
    if dtype not in DTYPES:
        raise DiffprobeError(f"dtype {dtype!r}: expected float16 or float32")
    if draws < 1:
        raise DiffprobeError("draws (noise samples averaged per image) must be ≥ 1")
    if not 0 <= rank < world_size:
        raise DiffprobeError(f"rank {rank} is not in [0, {world_size})")
    if backbone.num_classes is not None and cond_class is None and backbone.default_class_label is None:
        raise DiffprobeError(f"{backbone.source} is class-conditional: choose the class label to condition on (--class-label)")
    if backbone.num_classes is None and cond_class is not None:
        raise DiffprobeError(f"{backbone.source} is unconditional: drop --class-label")
    if len(data) == 0:
        raise DiffprobeError(f"dataset {data.name} is empty")
    compute = compute or choose_compute()
    plan = make_plan(backbone, timesteps, blocks, pools)
    rows = stratified_subset(data.labels, limit, subset_seed) if limit is not None else np.arange(len(data))
    if augment_views < 0:
        raise DiffprobeError("augment_views must be ≥ 0")
    views = np.tile(np.arange(max(augment_views, 1)), len(rows))
    if augment_views:
        rows = np.repeat(rows, augment_views)

    out = Path(out)
    if overwrite and (out / "manifest.json").is_file():
        shutil.rmtree(out)
    manifest = build_manifest(backbone, data, rows, dtype, compute, seed, draws, batch_size, cond_class, limit,
                              subset_seed, augment_views, augment_seed)  # fmt: skip
    store = FeatureStore.create_or_open(out, manifest, data.labels[rows], rows, data.labels)
    if store.chunk_rows != batch_size:
        log.info("resuming with the store's chunk size %d (batch size %d ignored)", store.chunk_rows, batch_size)
    for key in plan.keys:
        store.ensure_array(key, backbone.blocks[key.block - 1].channels * key.pool**2)

    done = {key: store.done_chunks(key) for key in plan.keys}
    my_chunks = range(rank, store.num_chunks, world_size)
    todo: list[tuple[int, list[int]]] = []  # (chunk, timesteps still missing in it)
    for chunk in my_chunks:
        missing_ts = sorted({k.t for k in plan.keys if not done[k][chunk]})
        if missing_ts:
            todo.append((chunk, missing_ts))
    if not todo:
        log.info("all %d arrays in %s are complete: nothing to do", len(plan.keys), out)
        return store

    model = compute.prepare(backbone)
    if augment_views:  # the loader addresses store rows; the view picks crop, flip and noise
        dataset = AugmentedViews(data, rows, views, backbone.image_size, augment_seed)
        batches = [list(range(store.rows))[store.chunk_slice(chunk)] for chunk, _ in todo]
    else:  # the loader addresses dataset indices
        dataset = TransformedImages(data, model_transform(backbone.image_size), backbone.image_size)
        batches = [rows[store.chunk_slice(chunk)].tolist() for chunk, _ in todo]
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=compute.device.type == "cuda")
    shape = backbone.model_shape  # the noise lives where the model adds it (latents for VAE models)
    latents = LatentCache.open(model, store)  # latent models encode each image once, cached in the store
    total = sum(len(ts) for _, ts in todo)
    images_done, started = 0, time.perf_counter()
    # The bar closes (ending its line) before any error propagates, so messages start clean.
    with tqdm(total=total, desc=f"extract → {out.name}", unit="pass", disable=not progress) as bar, torch.inference_mode():
        for (chunk, missing_ts), (x0, _, index, errors) in zip(todo, loader):
            bad = [e for e in errors if e]
            if bad:
                more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
                raise DiffprobeError("; ".join(bad[:3]) + more + ". Fix or remove the file(s), then rerun: finished chunks are kept")
            x0 = latents.encode_chunk(model, chunk, x0.to(compute.device))
            chunk_views = views[store.chunk_slice(chunk)] if augment_views else np.zeros(len(index), dtype=int)
            noises = [torch.stack([image_noise([i], seed, shape, int(v) * draws + draw)[0]
                                   for i, v in zip(index.tolist(), chunk_views)]).to(compute.device)
                      for draw in range(draws)]  # fmt: skip
            y = None if cond_class is None else torch.full((len(index),), cond_class, device=compute.device)
            for t in missing_ts:
                keys_t = [k for k in plan.keys if k.t == t and not done[k][chunk]]
                pooled = batch_features(model, compute, x0, t, noises, keys_t, y)
                for k in keys_t:
                    store.write_chunk(k, chunk, pooled[k].cpu().numpy().astype(dtype))
                bar.update(1)
            images_done += len(index)
            bar.set_postfix(img_per_s=f"{images_done / (time.perf_counter() - started):.1f}")
    return store

"""The extraction loop: dataset -> featurize (noise, backbone blocks, pooling) -> store.

One pass per (batch, timestep) yields every requested block and stops after the deepest (see
`featurize`). Work is done in chunks of rows (a chunk is a batch); a chunk already marked done
in the store is skipped, so an interrupted extraction resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import logging
import platform
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from .. import __version__
from .._io import output_errors
from ..backbones.base import Backbone
from ..data import (
    AugmentedViews,
    LabeledImages,
    TransformedImages,
    augment_description,
    backbone_transform,
    backbone_transform_description,
    open_dataset,
    stratified_subset,
)
from ..errors import DiffprobeError
from ..validate import known_keywords
from ..precision import Compute, choose_compute
from .batching import PassSize, default_batch_size, in_passes
from .distributed import Ranks, join, ranks, ranks_per_device
from .featurize import featurize
from .latents import LatentCache
from .pipeline import ChunkWriter, NoisedImages, prefetch_factor
from .plan import FeaturePlan
from .roles import REPORT, REPORT_SHARE, SELECT, TRAIN, dataset_roles
from .store import FeatureKey, FeatureStore

log = logging.getLogger(__name__)
DTYPES = ("float16", "float32")


@dataclass(frozen=True)
class ExtractOptions:
    """How (not what) to extract: none of these change a feature's value except dtype, compute's
    precision, class_label and the row selection, which the store's identity records."""

    batch_size: int | None = None  # images per pass and a new store's chunk size (default: 64 on CPUs, fitted to a GPU's memory)
    dtype: str = "float16"  # stored feature dtype
    compute: Compute | None = None  # default: this machine's fastest (choose_compute())
    limit: int | None = None  # a stratified subset of this many images (with held_out: of the training images)
    held_out: int | None = None  # a stratified subset of this many of the held-out images, apart from limit's
    subset_seed: int = 0
    rows_role: str | None = None  # only the images of one role (features/roles.py): train, select, report or held-out
    role_split: tuple[float, int, float] = (0.1, 0, REPORT_SHARE)  # the roles' val_fraction, split_seed, report_share
    class_label: int | None = None  # class-conditional models: the class to condition on
    rank: int | None = None  # this process writes chunks rank, rank + world_size, ... (default: torchrun's, or 0)
    world_size: int | None = None  # default: torchrun's, or $WORLD_SIZE, or 1
    dist_backend: str = "auto"  # under torchrun: nccl on GPUs, gloo on CPUs
    workers: int | None = None  # DataLoader workers (default: 0 on CPU, 8 on GPUs)
    overwrite: bool = False
    progress: bool = True
    augment_views: int = 0  # K random-resized-crop + flip views per image instead of the centre crop
    augment_seed: int = 0
    overlap: bool = True  # draw ε in the loader and write chunks from a thread while the next computes (False: in turn)

    def same_rows_as(self, store: FeatureStore) -> "ExtractOptions":
        """These options, selecting the rows `store` holds (for controls on the same images). An
        --overwrite carries over: the controls of a store started again are stale too."""
        rows = store.manifest["rows"]
        role = rows.get("role") or {}
        return replace(self, limit=rows["limit"], held_out=rows.get("held_out"), subset_seed=rows["subset_seed"] or 0,
                       rows_role=role.get("role"), role_split=tuple(role.get("split", self.role_split)))  # fmt: skip

    def for_test_set(self, limit: int | None) -> "ExtractOptions":
        """These options for a test set: `limit` of its images (stratified) or all; the row choices
        that pick roles of the training dataset (--held-out, --rows) do not apply to it."""
        return replace(self, limit=limit, held_out=None, rows_role=None)


def build_manifest(backbone: Backbone, data: LabeledImages, rows: np.ndarray, plan: FeaturePlan,
                   options: ExtractOptions, compute: Compute) -> dict:  # fmt: skip
    return {
        "backbone": {
            "source": backbone.source,
            "family": backbone.family,
            "fingerprint": backbone.fingerprint(),
            "config": backbone.config,
            "class_label": options.class_label,
        },
        "data": {"name": data.name, "fingerprint": data.fingerprint(), "layout": data.layout_fingerprint(),
                 "size": len(data), "classes": data.classes},
        "rows": {
            "count": len(rows),
            "selection": hashlib.sha256(rows.astype(np.int64).tobytes()).hexdigest()[:20],
            "limit": options.limit,
            "subset_seed": options.subset_seed if options.limit is not None or options.held_out is not None else None,
            **({"held_out": options.held_out} if options.held_out is not None else {}),
            "role": {"role": options.rows_role, "split": list(options.role_split)} if options.rows_role else None,
        },
        "transform": (augment_description(backbone.image_size, options.augment_views, options.augment_seed)
                      if options.augment_views else backbone_transform_description(backbone)),
        "noise": {"schedule": backbone.schedule.name, **parameterization(backbone.schedule), **plan.noise()},
        "dtype": options.dtype,
        "precision": compute.precision,
        "chunk_rows": options.batch_size,
        "loaded_with": {"spec": absolute_spec(backbone.spec), "options": backbone.load_options},
        "written_with": {
            "diffprobe": __version__,
            "torch": torch.__version__,
            "device": compute.describe(),
            "python": platform.python_version(),
        },
    }


def parameterization(schedule) -> dict:
    """A flow schedule says so in the store's identity; DDPM stores keep the identity they always had."""
    return {"parameterization": "flow"} if schedule.parameterization == "flow" else {}


def absolute_spec(spec: str) -> str:
    """The spec with a local path made absolute, so a saved run finds the checkpoint from anywhere."""
    family, sep, target = spec.partition(":")
    if sep and target != "random" and Path(target).exists():
        return f"{family}:{Path(target).resolve()}"
    return spec


ROW_ROLES = {"train": (TRAIN,), "select": (SELECT,), "report": (REPORT,), "held-out": (SELECT, REPORT)}


def rows_of_role(labels: np.ndarray, rows: np.ndarray, role: str, split: tuple[float, int, float]) -> np.ndarray:
    """The rows whose images have this role in the whole dataset: e.g. a test store of the report
    rows, which a head trained on a store of the same dataset never chose on."""
    if role not in ROW_ROLES:
        raise DiffprobeError(f"--rows {role!r}: expected one of {', '.join(ROW_ROLES)}")
    roles = dataset_roles(np.asarray(labels), *split)
    kept = rows[np.isin(roles[rows], ROW_ROLES[role])]
    if not len(kept):
        raise DiffprobeError(f"no {role} rows among the {len(rows)} images selected (val fraction {split[0]}, report share "
                             f"{split[2]}): use more images or another split")  # fmt: skip
    return kept


def select_rows(labels: np.ndarray, o: ExtractOptions) -> np.ndarray:
    """The dataset rows a store holds: all, a stratified `limit` of them, or (with `held_out`) a
    stratified `limit` of the training images and `held_out` of the held-out ones, so a study can
    report on many more images than a 10% split of its subset would give; then only one role's,
    if asked."""
    if o.held_out is None:
        rows = stratified_subset(labels, o.limit, o.subset_seed) if o.limit is not None else np.arange(len(labels))
    else:
        held = dataset_roles(labels, *o.role_split) != TRAIN
        parts = []
        for where, n in ((np.flatnonzero(~held), o.limit), (np.flatnonzero(held), o.held_out)):
            parts.append(where[stratified_subset(labels[where], n, o.subset_seed)] if n is not None and len(where) else where)
        rows = np.sort(np.concatenate(parts))
    if o.rows_role:
        rows = rows_of_role(labels, rows, o.rows_role, o.role_split)
    return rows


def extract(backbone: Backbone, data: LabeledImages | str | Path, plan: FeaturePlan, out: str | Path,
            options: ExtractOptions | None = None, **overrides) -> FeatureStore:  # fmt: skip
    """Extract the plan's pooled block features of `data` into the store at `out` (resuming if present).

    data: a LabeledImages, or a spec for `open_dataset` (folder, .tar(.gz), torchvision:NAME).
    options / overrides: ExtractOptions fields (`extract(bb, data, plan, out, limit=500)`).
    With rank/world_size, several processes (torchrun ranks) fill one store together.
    With augment_views=K, rows are K random-resized-crop + flip views per image (view-major
    within an image), each with its own noise, so heads can train on augmented features
    without running the network every epoch.
    """
    if options is not None and not isinstance(options, ExtractOptions):
        raise DiffprobeError(f"options: expected an ExtractOptions (or its fields as keyword arguments), got {options!r}")
    known_keywords(overrides, ExtractOptions.__dataclass_fields__, "extract option(s)")
    o = replace(options or ExtractOptions(), **overrides)
    for name in ("limit", "held_out", "batch_size", "subset_seed", "augment_views", "augment_seed", "workers", "class_label", "rank", "world_size"):
        value = getattr(o, name)  # a type a user can get wrong ("50"): one error naming it, before any work
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer))):
            raise DiffprobeError(f"{name}: expected an integer, got {value!r}")
    if isinstance(data, (str, Path)):
        data = open_dataset(data)
    elif not isinstance(data, LabeledImages):
        raise DiffprobeError(f"data: expected a dataset spec (folder, .tar(.gz), torchvision:NAME) or a LabeledImages from "
                             f"open_dataset, got {type(data).__name__}")  # fmt: skip
    if o.dtype not in DTYPES:
        raise DiffprobeError(f"dtype {o.dtype!r}: expected float16 or float32")
    if backbone.num_classes is not None and o.class_label is None and backbone.default_class_label is None:
        raise DiffprobeError(f"{backbone.source} is class-conditional: choose the class label to condition on (--class-label)")
    if backbone.num_classes is None and o.class_label is not None:
        raise DiffprobeError(f"{backbone.source} is unconditional: drop --class-label")
    if o.class_label is not None:  # checked before a store exists (a null class, where a model has one, is num_classes)
        top = backbone.num_classes if backbone.default_class_label is not None else backbone.num_classes - 1
        if not 0 <= o.class_label <= top:
            raise DiffprobeError(f"--class-label {o.class_label} is outside this model's classes 0..{top}"
                                 + (f" ({top} is the null class)" if top == backbone.num_classes else ""))  # fmt: skip
    if len(data) == 0:
        raise DiffprobeError(f"dataset {data.name} is empty")
    if o.augment_views < 0:
        raise DiffprobeError("augment_views must be ≥ 0")
    # Counts are checked before anything is created: a negative --limit used to slice from the end
    # (a 193-row store of 200 images) and 0 made an empty store reported complete.
    if o.limit is not None and o.limit < 1:
        raise DiffprobeError(f"--limit {o.limit}: expected a number of images, at least 1 (omit --limit for the whole dataset)")
    if o.held_out is not None and o.held_out < 1:
        raise DiffprobeError(f"--held-out {o.held_out}: expected a number of held-out images, at least 1 (omit --held-out for none beyond --limit's)")
    if o.batch_size is not None and o.batch_size < 1:
        raise DiffprobeError(f"--batch-size {o.batch_size}: expected a number of images per pass, at least 1 (default: 64 on CPUs, "
                             "fitted to a GPU's free memory)")  # fmt: skip
    if o.workers is not None and o.workers < 0:
        raise DiffprobeError(f"--workers {o.workers}: expected 0 (load images in this process) or more")
    compute = o.compute or choose_compute()
    join(o.dist_backend, compute.device)
    share = ranks(o.rank, o.world_size)
    plan = plan.resolve(backbone)
    if o.batch_size is None:
        o = replace(o, batch_size=default_batch_size(backbone, plan, compute, ranks_per_device(compute.device), o.class_label))
        if compute.device.type == "cuda":
            log.info("%d images per pass: what %s's free memory holds (--batch-size sets it)", o.batch_size, compute.device)
    rows = select_rows(data.labels, o)
    views = np.tile(np.arange(max(o.augment_views, 1)), len(rows))
    if o.augment_views:
        rows = np.repeat(rows, o.augment_views)

    out = Path(out)
    manifest = build_manifest(backbone, data, rows, plan, o, compute)

    def open_store() -> FeatureStore:
        if o.overwrite and share.is_main and (out / "manifest.json").is_file():
            FeatureStore.discard(out)  # only rank 0 discards: the others would delete each other's work
        store = FeatureStore.create_or_open(out, manifest, data.labels[rows], rows, data.labels, data.row_prints(rows))
        dims = {key: backbone.tap_info(key.block).channels * key.pool**2 for key in plan.keys}
        store.check_free_space(dims)
        with output_errors(out, "--out"):  # a disk that fills while the arrays are made
            for key, dim in dims.items():
                store.ensure_array(key, dim)
        return store

    # Rank 0 creates (or checks) the store and its arrays while the others wait, then they open it.
    store = open_store() if share.is_main else None
    share.barrier()
    store = store or open_store()
    if store.chunk_rows != o.batch_size:
        log.info("%s was made with --batch-size %d: resuming in its own chunks of %d rows (--batch-size %d applies to new stores)",
                 out, store.chunk_rows, store.chunk_rows, o.batch_size)  # fmt: skip
    fill(store, backbone, data, plan, rows, views, o, compute, share)
    share.barrier()
    missing = {k.stem: int((~store.done_chunks(k)).sum()) for k in plan.keys if not store.is_complete(k)}
    if missing and share.group:
        raise DiffprobeError(f"all {share.world_size} ranks finished but {out} still misses chunks ({missing}): rerun the same command to fill them")
    if missing:
        log.info("rank %d of %d: its chunks are done; %s completes when every rank has run", share.rank, share.world_size, out)
    return store


def fill(store: FeatureStore, backbone: Backbone, data: LabeledImages, plan: FeaturePlan, rows: np.ndarray,
         views: np.ndarray, o: ExtractOptions, compute: Compute, share: Ranks) -> None:  # fmt: skip
    """Compute and write this rank's chunks that are not done yet."""
    out = store.root

    done = {key: store.done_chunks(key) for key in plan.keys}
    todo = [(chunk, [k for k in plan.keys if not done[k][chunk]]) for chunk in range(share.rank, store.num_chunks, share.world_size)]
    todo = [(chunk, keys) for chunk, keys in todo if keys]  # (chunk, settings still missing in it)
    if not todo:
        log.info("all %d arrays in %s are complete: nothing to do", len(plan.keys), out)
        return

    if o.augment_views:  # the loader addresses store rows; the view picks crop, flip and noise
        dataset = AugmentedViews(data, rows, views, backbone.image_size, o.augment_seed)
        batches = [list(range(store.rows))[store.chunk_slice(chunk)] for chunk, _ in todo]
    else:  # the loader addresses dataset indices
        dataset = TransformedImages(data, backbone_transform(backbone), backbone.image_size)
        batches = [rows[store.chunk_slice(chunk)].tolist() for chunk, _ in todo]
    if o.overlap and backbone.schedule.noisy:  # ε drawn with the image, by the loader's workers, ahead of the pass
        dataset = NoisedImages(dataset, plan.noise_seed, backbone.model_shape, plan.draws, views if o.augment_views else None)
    workers = o.workers if o.workers is not None else (0 if compute.device.type == "cpu" else 8)
    loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=compute.device.type == "cuda",
                        **prefetch_factor(store.chunk_rows, workers))  # fmt: skip
    total = sum(len({k.t for k in keys}) for _, keys in todo)
    latents = LatentCache.open(backbone, store)  # latent models encode each image once, cached in the store
    images_done, started = 0, time.perf_counter()
    # A chunk is one pass, so a resumed store's bytes do not depend on who resumed it; a chunk too
    # large for this device (a store made on a bigger GPU) is split only when it runs out of memory.
    pass_size = PassSize(store.chunk_rows, compute.device)
    # The bar closes (ending its line) before any error propagates, so messages start clean.
    writer = ChunkWriter(store, o.dtype, background=o.overlap)
    with tqdm(total=total, desc=f"extract → {out.name}", unit="pass", disable=not o.progress) as bar, writer, torch.inference_mode():
        for (chunk, keys), (x0, _, index, errors, *noise) in zip(todo, loader):
            bad = [e for e in errors if e]
            if bad:
                more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
                raise DiffprobeError("; ".join(bad[:3]) + more + ". Fix or replace the file(s) under the same name, then rerun "
                                     "the same command: finished chunks are kept (removing a file changes the dataset: use a new --out)")
            chunk_views = views[store.chunk_slice(chunk)] if o.augment_views else None
            y = None if o.class_label is None else torch.full((len(index),), o.class_label, device=compute.device)

            def run_chunk(rows_per_pass: int) -> dict[FeatureKey, torch.Tensor]:  # called at once, within this iteration
                z0 = latents.encode_chunk(backbone, chunk, x0, compute, rows_per_pass)  # model space: cached latents, or the pixels
                parts = in_passes(len(index), rows_per_pass, lambda s: featurize(
                    backbone, z0[s], plan, index[s].tolist(), keys=keys, views=None if chunk_views is None else chunk_views[s],
                    y=None if y is None else y[s], compute=compute, encoded=True, noise=noise[0][s] if noise else None))  # fmt: skip
                return {k: torch.cat([part[k] for part in parts]) if len(parts) > 1 else parts[0][k] for k in keys}

            pooled = pass_size.run(run_chunk)
            writer.submit(chunk, pooled)
            bar.update(len({k.t for k in keys}))
            images_done += len(index)
            bar.set_postfix(img_per_s=f"{images_done / (time.perf_counter() - started):.1f}")

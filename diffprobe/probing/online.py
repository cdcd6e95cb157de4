"""Online features: the frozen backbone computes each batch's features inside the training loop.

For what no disk holds: the attention head and DifFormer on full maps (block 24's 16×16×1024
map is ~670 GB per setting for ImageNet in fp16), and DifFeed, which needs a second pass. Each
training image is seen as a fresh random-resized crop + flip per epoch (view = epoch), with its
noise still a function of (seed, image, view); validation uses centre crops, computed once.
Under torchrun each rank computes the features of its share of every global batch (the
backbone's cost is split) and the head trains with DDP. The backbone runs in the machine's
fast precision on a set-up copy, never receives gradients, and is checked unchanged at the end.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..backbones.base import Backbone
from ..data import AugmentedViews, LabeledImages, TransformedImages, backbone_transform, stratified_subset
from ..errors import DiffprobeError
from ..features.distributed import join, ranks
from ..features.extract import ExtractOptions, build_manifest
from ..features.featurize import encode_images, featurize, noise_draws
from ..features.pipeline import NoisedImages
from ..features.plan import FeaturePlan
from ..features.roles import Roles, dataset_roles
from ..precision import Compute, choose_compute
from .config import ProbeConfig
from .diffeed import DifFeed
from .heads import build_head
from .train import (FeatureHead, FittedHead, _evaluate, _lr_at, check_two_classes, divergence, per_class_report,
                    report_from_logits, save_run, warn_if_one_token)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class OnlineOptions:
    compute: Compute | None = None  # default: this machine's fastest (compiled on GPUs)
    limit: int | None = None  # a stratified subset of this many images
    subset_seed: int = 0
    augment: bool = True  # random-resized crop + flip per (image, epoch); False: centre crops
    augment_seed: int = 0
    feedback_blocks: tuple[int, ...] = ()  # DifFeed: decoder blocks fed back (head "diffeed")
    standardize_images: int = 512  # training images (centre crop) whose features fix the standardisation
    workers: int | None = None
    progress: bool = True


def _batches(loader_data, rows: list[list[int]], workers: int, pin: bool = False) -> DataLoader:
    return DataLoader(loader_data, batch_sampler=rows, num_workers=workers, pin_memory=pin)


def _features(backbone: Backbone, x0: torch.Tensor, plan: FeaturePlan, index, views, compute: Compute,
              noise: torch.Tensor | None = None) -> list[torch.Tensor]:  # fmt: skip
    with torch.no_grad():  # plain tensors (not inference-mode ones): the head trains on them
        feats = featurize(backbone, x0, plan, index, views=views, compute=compute, noise=noise)
    return [feats[k].float() for k in plan.keys]


def train_online(backbone: Backbone, data: LabeledImages, plan: FeaturePlan, config: ProbeConfig, out: str | Path | None,
                 options: OnlineOptions | None = None) -> FittedHead:  # fmt: skip
    o = options or OnlineOptions()
    compute = o.compute or choose_compute()
    join("auto", compute.device)
    share = ranks()
    plan = plan.resolve(backbone)
    keys, recipe = plan.keys, config.training_recipe()
    if plan.draws != 1:
        raise DiffprobeError("online features use one noise draw per (image, view): set draws=1")
    diffeed = config.head == "diffeed"
    if (config.head != "fusion" or diffeed) and len(keys) != 1:
        raise DiffprobeError(f"the {config.head} head reads one (t, block, pool) setting; use --head fusion for several")
    warn_if_one_token(config.head, [k.pool for k in keys])
    rows = stratified_subset(data.labels, o.limit, o.subset_seed) if o.limit is not None else np.arange(len(data))
    roles = Roles.from_roles(dataset_roles(np.asarray(data.labels), config.val_fraction, config.split_seed, config.report_share)[rows],
                             config.val_fraction, config.split_seed, config.report_share)  # fmt: skip
    train_idx, val_idx, report_idx = rows[roles.train], rows[roles.select], rows[roles.report]  # the epoch is chosen on val_idx
    if len(train_idx) < 2 or len(val_idx) == 0:
        raise DiffprobeError(f"{len(rows)} images leave too few for training and validation (val fraction {config.val_fraction})")
    check_two_classes(np.asarray(data.labels)[train_idx], data.classes, data.name)
    workers = o.workers if o.workers is not None else (0 if compute.device.type == "cpu" else 8)
    fingerprint = backbone.fingerprint()
    runner = compute.prepare(backbone)
    centre = TransformedImages(data, backbone_transform(backbone), backbone.image_size)

    def centre_features(indices: np.ndarray, desc: str) -> tuple[list[torch.Tensor], torch.Tensor]:
        parts: list[list[torch.Tensor]] = []
        labels = []
        batches = [indices[i:i + recipe.batch_size].tolist() for i in range(0, len(indices), recipe.batch_size)]
        for x0, y, index, errors in tqdm(_batches(centre, batches, workers), desc=desc, total=len(batches), disable=not o.progress, leave=False):
            if any(errors):
                raise DiffprobeError(next(e for e in errors if e))
            parts.append(_features(backbone, x0, plan, index.tolist(), None, compute) if not diffeed else [x0])
            labels.append(y)
        return [torch.cat(p) for p in zip(*parts)], torch.cat(labels)

    key = keys[0]
    shapes = [(backbone.tap_info(k.block).channels, k.pool) for k in keys]
    standard, _ = centre_features(train_idx[: o.standardize_images], "online: standardisation")
    if diffeed:  # the read block's features change as the adapters learn: standardise its first-pass values
        standard = _features(backbone, standard[0], plan, train_idx[: o.standardize_images].tolist(), None, compute)
    means = [x.mean(0) for x in standard]
    stds = [x.std(0).clamp_min(1e-6) for x in standard]
    torch.manual_seed(config.seed)
    head_kind = ("attention" if key.pool > 1 else "linear") if diffeed else config.head
    options = config.options if head_kind in ("attention", "fusion") or not diffeed else {}
    head = FeatureHead(build_head(head_kind, shapes, len(data.classes), **options),
                       means, stds, config.head == "fusion")  # fmt: skip
    model: torch.nn.Module = head
    if diffeed:
        if not o.feedback_blocks:
            raise DiffprobeError("the diffeed head needs feedback blocks (--feedback-blocks, e.g. the decoder blocks 21-36)")
        model = DifFeed(runner, o.feedback_blocks, key.block, key.pool, head)
    model = model.to(compute.device)
    net = model
    if share.group:
        from torch.nn.parallel import DistributedDataParallel

        net = DistributedDataParallel(model, device_ids=[compute.device.index] if compute.device.type == "cuda" else None)
    opt = (torch.optim.SGD(model.parameters(), lr=recipe.lr, momentum=recipe.momentum, weight_decay=config.weight_decays[0])
           if recipe.optimizer == "sgd" else torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=config.weight_decays[0]))  # fmt: skip
    # DifFeed's gradients pass through the backbone under autocast: in fp16 (a GPU without bf16) they
    # underflow without loss scaling, PyTorch's own scaler; a head on detached features trains in fp32
    scaler = torch.amp.GradScaler(compute.device.type, enabled=compute.precision == "fp16" and diffeed)

    val_inputs, val_labels = centre_features(val_idx, "online: validation features") if not diffeed else (None, None)
    gen = torch.Generator().manual_seed(config.seed)
    n, bs = len(train_idx), recipe.batch_size
    steps = max(1, -(-n // bs))
    history: list[dict[str, Any]] = []
    best_state, best_epoch, best_top1 = None, 0, -1.0

    def evaluate(indices: np.ndarray | None = None) -> tuple[float, float, float, torch.Tensor, torch.Tensor]:
        """On the selection rows (cached features), or on other rows (features computed here)."""
        if not diffeed:
            inputs, labels = (val_inputs, val_labels) if indices is None else centre_features(indices, "online: report features")
            return (*_evaluate(head, [v.to(compute.device) for v in inputs], labels.to(compute.device)), labels)
        indices = val_idx if indices is None else indices
        model.eval()
        logits, labels = [], []
        with torch.no_grad():
            for x0, y, index, _ in _batches(centre, [indices[i:i + bs].tolist() for i in range(0, len(indices), bs)], workers):
                logits.append(diffeed_logits(model, runner, x0, index, None, plan, key, compute))
                labels.append(y)
        out, y = torch.cat(logits).cpu(), torch.cat(labels)
        from .fastprobe import topk

        return F.cross_entropy(out, y).item(), topk(out, y, 1), topk(out, y, 5), out, y

    for epoch in tqdm(range(recipe.epochs), desc=f"online {config.head}", unit="epoch", disable=not o.progress):
        model.train()
        order = train_idx[torch.randperm(n, generator=gen).numpy()]
        view = epoch if o.augment else 0
        mine = [order[s * bs:(s + 1) * bs][share.rank::share.world_size].tolist() for s in range(steps)]
        images = (AugmentedViews(data, np.arange(len(data)), np.full(len(data), view), backbone.image_size, o.augment_seed)
                  if o.augment else centre)  # fmt: skip
        if backbone.schedule.noisy and not diffeed:  # ε drawn by the loader with the image (features/pipeline.py)
            images = NoisedImages(images, plan.noise_seed, backbone.model_shape, 1, np.full(len(data), view))
        # Summed on the device and read once an epoch: a read every step would make the host wait for the GPU.
        total = torch.zeros((), dtype=torch.float64, device=compute.device)
        correct = torch.zeros((), dtype=torch.long, device=compute.device)
        for step, (x0, y, index, errors, *noise) in enumerate(_batches(images, mine, workers, compute.device.type == "cuda")):
            if any(errors):
                raise DiffprobeError(next(e for e in errors if e))
            for group in opt.param_groups:
                group["lr"] = _lr_at(recipe, epoch + step / steps)
            y = y.to(compute.device)
            views = [view] * len(index)
            if diffeed:
                logits = diffeed_logits(net, runner, x0, index, views, plan, key, compute)
            else:
                logits = net([f.to(compute.device) for f in _features(backbone, x0, plan, index.tolist(), views, compute,
                                                                      noise[0] if noise else None)])  # fmt: skip
            global_batch = len(order[step * bs:(step + 1) * bs])
            loss = F.cross_entropy(logits.float(), y, reduction="sum") * (share.world_size / global_batch)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            total += loss.detach().double() * global_batch / share.world_size
            correct += (logits.argmax(1) == y).sum()
        val_loss, val_top1, val_top5, _, _ = evaluate()
        history.append({"epoch": epoch + 1, "train_loss": total.item() / n, "train_top1": 100.0 * correct.item() * share.world_size / n,
                        "select_loss": val_loss, "select_top1": val_top1, "select_top5": val_top5})  # fmt: skip
        if val_top1 > best_top1:
            best_top1, best_epoch, best_state = val_top1, epoch + 1, copy.deepcopy(model.state_dict())
    blown = divergence(history, len(data.classes))
    if blown:
        raise DiffprobeError(f"training diverged at lr {recipe.lr:g} ({blown}): lower --lr")
    model.load_state_dict(best_state)
    _, val_top1, val_top5, val_logits, val_y = evaluate()
    backbone._fingerprint = None  # recomputed from the weights as they are now
    if backbone.fingerprint() != fingerprint:
        raise RuntimeError("the frozen backbone's weights changed during online training: a diffprobe bug")
    metrics = {"select": {"top1": val_top1, "top5": val_top5, "rows": int(len(val_idx))},
               "chosen": {"epoch": best_epoch, "weight_decay": config.weight_decays[0], "lr": recipe.lr}, "train_rows": int(n),
               "roles": roles.describe(), "history": history, "online": True, "world_size": share.world_size}  # fmt: skip
    if len(report_idx):  # the chosen epoch's head, once, on images no choice saw
        *_, rep_logits, rep_y = evaluate(report_idx)
        report, matrix = report_from_logits(rep_logits, rep_y, data.classes)
        metrics["report"] = {**report, "source": f"held-out report rows of {data.name}"}
    else:
        per_class, matrix = per_class_report(val_logits, val_y, data.classes)
        metrics["select"]["per_class_top1"] = per_class
    manifest = build_manifest(backbone, data, rows, plan, ExtractOptions(compute=compute, limit=o.limit, subset_seed=o.subset_seed), compute)
    saved_config = replace(config, head=head_kind, options=options) if diffeed else config  # the head itself, as predict rebuilds it
    fitted = FittedHead(head.cpu(), keys, saved_config, metrics, matrix, shapes,
                        data.classes, manifest, f"online:{data.name}")  # fmt: skip
    if out is not None and share.is_main:
        save_run(fitted, out)
        if diffeed:
            torch.save({k: v.cpu() for k, v in model.adapters.state_dict().items()}, Path(out) / "feedback.pt")
    return fitted


def diffeed_logits(model, runner: Backbone, x0: torch.Tensor, index, views, plan: FeaturePlan, key, compute: Compute) -> torch.Tensor:
    """DifFeed's logits for clean images: encode, noise (as featurize does), two passes."""
    x0 = encode_images(runner, x0, compute)
    eps = noise_draws(index.tolist(), plan.noise_seed, tuple(x0.shape[1:]), 1, views)[0].to(compute.device) if runner.schedule.noisy else None
    x_t = compute.batch(runner.schedule.q_sample(x0, key.t, eps))
    with compute.autocast():
        return model(x_t, key.t).float()

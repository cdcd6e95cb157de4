"""A supervised baseline trained here.

`train_baseline` trains a torchvision ResNet from scratch on a dataset diffprobe reads (CIFAR-10
here, a few CPU minutes with --limit), so offline users have a real discriminative network to
compare diffusion features against. It is read back as the `baseline:DIR` backbone
(backbones/encoder_baseline.py), in `extract`, `compare` and `cka` alike.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..data import LabeledImages, images_uint8, stratified_split, stratified_subset, to_model_range
from .._io import output_dir, write_json
from ..errors import DiffprobeError
from ..precision import choose_compute
from ..backbones.adm_config import check_state_dict
from ..backbones.pickles import load_torch_file

log = logging.getLogger(__name__)
RESNET_STAGES = ("layer1", "layer2", "layer3", "layer4")


STEMS = ("auto", "small", "standard")


def resolve_stem(stem: str, image_size: int) -> str:
    if stem not in STEMS:
        raise DiffprobeError(f"unknown stem {stem!r}: expected {', '.join(STEMS)}")
    return ("small" if image_size <= 64 else "standard") if stem == "auto" else stem


def build_resnet(arch: str, num_classes: int, image_size: int, stem: str = "auto") -> nn.Module:
    """A torchvision ResNet, randomly initialised. stem "small": a 3×3 stride-1 convolution and no
    max-pool (the usual small-image stem: a 32×32 image still has 4×4 maps at layer4); "standard":
    torchvision's 7×7 stride-2 convolution and max-pool (16× fewer FLOPs at 32 px, 1×1 at layer4);
    "auto": small up to 64 px."""
    import torchvision.models as tvm

    if not arch.startswith("resnet") or not hasattr(tvm, arch):
        raise DiffprobeError(f"unknown baseline architecture {arch!r}: expected a torchvision ResNet such as resnet18 or resnet50")
    model = getattr(tvm, arch)(weights=None, num_classes=num_classes)
    if resolve_stem(stem, image_size) == "small":
        model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    return model


def random_crop_flip(images: torch.Tensor, padding: int, gen: torch.Generator) -> torch.Tensor:
    """Per-image random crop (zero padding) and horizontal flip of a uint8 batch, on tensors: the
    in-memory images need no PIL round trip, and one generator makes every epoch reproducible."""
    n, _, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    dy = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * padding + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    out = torch.empty_like(images)
    for i in range(n):
        crop = padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


def train_baseline(data: LabeledImages, out: str | Path, arch: str = "resnet18", image_size: int = 32, epochs: int = 4,
                   batch_size: int = 128, lr: float = 0.1, weight_decay: float = 5e-4, limit: int | None = None,
                   val_fraction: float = 0.1, split_seed: int = 0, seed: int = 0, device: str = "auto",
                   progress: bool = True, stem: str = "auto") -> dict:  # fmt: skip
    """SGD (momentum 0.9, nesterov) with cosine decay, random crop (padding 4) + flip; the same
    stratified validation split diffprobe's probes use. Writes baseline.pt and baseline.json."""
    output_dir(out)  # an unusable --out fails before training, not after
    stem = resolve_stem(stem, image_size)
    torch.manual_seed(seed)
    compute = choose_compute(device)
    rows = stratified_subset(data.labels, limit, 0) if limit is not None else np.arange(len(data))
    # The dataset-wide split of FeatureStore.split: the same validation images as the probes.
    is_val = stratified_split(data.labels, val_fraction, split_seed)[rows]
    train_idx, val_idx = rows[~is_val], rows[is_val]
    train_images = images_uint8(data, train_idx, image_size, "decoding training images")
    val_images = images_uint8(data, val_idx, image_size, "decoding validation images")
    train_labels = torch.from_numpy(data.labels[train_idx])
    val_labels = torch.from_numpy(data.labels[val_idx])
    steps_per_epoch = max(1, len(train_idx) // batch_size)
    gen = torch.Generator().manual_seed(seed)
    model = build_resnet(arch, len(data.classes), image_size, stem).to(compute.device).to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(1, epochs * steps_per_epoch), pct_start=0.15)
    # fp16 autocast (a GPU without bf16) needs loss scaling, or small gradients underflow to zero: PyTorch's own scaler
    scaler = torch.amp.GradScaler(compute.device.type, enabled=compute.precision == "fp16")
    history, started = [], time.perf_counter()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_idx), generator=gen)
        bar = tqdm(range(steps_per_epoch), desc=f"{arch} epoch {epoch + 1}/{epochs}", unit="batch", disable=not progress, leave=False)
        for step in bar:
            pick = order[step * batch_size : (step + 1) * batch_size]
            x = to_model_range(random_crop_flip(train_images[pick], image_size // 8, gen))
            x = x.to(compute.device).contiguous(memory_format=torch.channels_last)
            y = train_labels[pick].to(compute.device)
            with compute.autocast():
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            bar.set_postfix(loss=f"{loss.item():.3f}")
        history.append({"epoch": epoch + 1, "val_top1": evaluate(model, val_images, val_labels, compute)})
        log.info("%s epoch %d: validation top-1 %.2f%%", arch, epoch + 1, history[-1]["val_top1"])
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.float().cpu().state_dict(), out / "baseline.pt")
    info = {"arch": arch, "stem": stem, "image_size": image_size, "classes": data.classes, "data": data.name,
            "data_fingerprint": data.fingerprint(), "train_images": int(len(train_idx)), "val_images": int(len(val_idx)),
            "epochs": epochs, "batch_size": batch_size, "lr": lr, "val_top1": history[-1]["val_top1"], "history": history, "seed": seed,
            "wall_seconds": round(time.perf_counter() - started, 1), "device": compute.describe()}  # fmt: skip
    write_json(out / "baseline.json", info)
    return info


@torch.no_grad()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, compute, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        x = to_model_range(images[start : start + batch_size]).to(compute.device).contiguous(memory_format=torch.channels_last)
        with compute.autocast():
            pred = model(x).argmax(1)
        correct += (pred.cpu() == labels[start : start + batch_size]).sum().item()
    return 100.0 * correct / max(len(images), 1)


def load_checked(model: nn.Module, path: str | Path, config: str, recover: str) -> None:
    """Weights from a file into `model`: a pickle with code is refused, a damaged file or one of
    another architecture is one line naming the file (and the keys or shapes that differ)."""
    state = load_torch_file(path, "weights", recover)
    if not isinstance(state, dict):
        raise DiffprobeError(f"{path} holds a {type(state).__name__}, not a state dict of weights: {recover}")
    check_state_dict(model, state, str(path), config, hint=recover[:1].upper() + recover[1:] + ".")
    model.load_state_dict(state)

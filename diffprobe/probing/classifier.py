"""`Classifier`: a frozen backbone, a feature plan and a fitted probe as one `nn.Module` from
images to logits. `diffprobe predict` is this module on image files, so the two agree exactly.

    model = Classifier(backbone, plan, probe)        # or Classifier.from_run("runs/lin")
    model(x)                                         # x: [B, 3, S, S] in [-1, 1] -> logits
    model.predict(["cat.png", pil_image, tensor])    # class names
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Sequence, Union

import torch
from PIL import Image
from torch import nn

from ..backbones import load_backbone
from ..backbones.base import Backbone
from ..data import backbone_transform, read_image, to_rgb
from ..errors import DiffprobeError
from ..features.featurize import featurize
from ..features.plan import FeaturePlan
from ..precision import Compute, choose_compute
from .estimator import Probe

ImageLike = Union[str, Path, Image.Image, torch.Tensor]
PIXEL_SLACK = 1e-3  # resampling and float rounding can step just past ±1
log = logging.getLogger("diffprobe")


def content_index(x: torch.Tensor) -> int:
    """A stand-in for the dataset index in ε(seed, index, draw): a hash of the pixels, so an
    image gets the same noise, and the same prediction, whatever the order of the inputs."""
    return int.from_bytes(hashlib.sha256(x.detach().cpu().float().contiguous().numpy().tobytes()).digest()[:4], "little") & 0x7FFFFFFF


class Classifier(nn.Module):
    def __init__(self, backbone: Backbone, plan: FeaturePlan | None, probe: Probe, compute: Compute | None = None):
        super().__init__()
        manifest = probe.fitted.store_manifest
        if backbone.fingerprint() != manifest["backbone"]["fingerprint"]:
            raise DiffprobeError(
                f"the backbone at {backbone.source} is not the one this run was trained on (fingerprint {backbone.fingerprint()} vs "
                f"{manifest['backbone']['fingerprint']}): its weights or flags differ"
            )
        noise = manifest["noise"]
        plan = plan or FeaturePlan.from_keys(probe.keys_, noise["seed"], noise["draws"])
        if (plan.noise_seed, plan.draws) != (noise["seed"], noise["draws"]):
            raise DiffprobeError(f"the plan's noise (seed {plan.noise_seed}, {plan.draws} draws) differs from the features the "
                                 f"probe was trained on (seed {noise['seed']}, {noise['draws']} draws)")  # fmt: skip
        self.plan = plan.resolve(backbone)
        missing = [k.stem for k in probe.keys_ if k not in set(self.plan.keys)]
        if missing:
            raise DiffprobeError(f"the plan does not cover the probe's setting(s) {', '.join(missing)}")
        self.backbone, self.probe, self.head = backbone, probe, probe.head_.eval()
        self.keys, self.classes = probe.keys_, list(probe.classes_)
        self.compute = compute or choose_compute()
        label = manifest["backbone"].get("class_label")
        self.class_label = None if label is None else int(label)
        self.transform = backbone_transform(backbone)

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str = "auto", backbone: str | None = None) -> "Classifier":
        """The backbone, plan and head of a saved probe run (`diffprobe probe --out RUN`).
        backbone: where the model lies now, when it moved since training (a spec, e.g.
        diffusers:NEW_FOLDER); its fingerprint must still match the run's."""
        if (Path(run_dir) / "feedback.pt").is_file():
            raise DiffprobeError(f"{run_dir} is a DifFeed run (feedback.pt): serving it needs the second pass, which predict does not run yet")
        probe = Probe.load(run_dir)
        m = probe.fitted.store_manifest
        spec = backbone or m.get("loaded_with", {}).get("spec") or m["backbone"]["source"]
        try:
            backbone = load_backbone(spec, **m.get("loaded_with", {}).get("options", {}))
        except DiffprobeError as e:
            hint = "" if backbone else " (if it moved, point to it with --backbone SPEC)"
            raise DiffprobeError(f"cannot load the backbone this run was trained on ({spec}){hint}: {e}") from None
        return cls(backbone, None, probe, choose_compute(device))

    def to_batch(self, images: Sequence[ImageLike] | torch.Tensor) -> torch.Tensor:
        """Paths and PIL images go through the model transform; tensors are taken as transformed
        ([3, S, S] or [B, 3, S, S] in [-1, 1], checked)."""
        if isinstance(images, torch.Tensor):
            return self.check_pixels(images if images.ndim == 4 else images[None])
        if isinstance(images, (str, Path, Image.Image)):
            images = [images]
        out = []
        for im in images:
            if isinstance(im, torch.Tensor):
                out.append(self.check_pixels(im[None] if im.ndim == 3 else im)[0])
            elif isinstance(im, Image.Image):
                out.append(self.transform(to_rgb(im)))
            elif isinstance(im, (str, Path)):
                out.append(self.transform(read_image(im)))
            else:
                raise DiffprobeError(f"expected image paths, PIL images or tensors [3, S, S] in [-1, 1], got {type(im).__name__}")
        return torch.stack(out)

    def check_pixels(self, x: torch.Tensor) -> torch.Tensor:
        """A transformed batch [B, 3, S, S] in [-1, 1] (what the model transform gives), or one
        error saying what the tensor holds: [0, 255] or [0, 1] pixels are not this model's input."""
        s = self.backbone.image_size
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, s, s):
            raise DiffprobeError(f"expected images as a tensor [B, 3, {s}, {s}] (or [3, {s}, {s}]), got shape {list(x.shape)}: "
                                 "pass paths or PIL images to have them resized and cropped")  # fmt: skip
        if not x.is_floating_point():
            raise DiffprobeError(f"expected float pixels in [-1, 1], got a {x.dtype} tensor: use x.float() / 127.5 - 1")
        lo, hi = x.min().item(), x.max().item()
        if not (lo >= -1 - PIXEL_SLACK and hi <= 1 + PIXEL_SLACK):
            fix = " (that looks like [0, 255]: use x / 127.5 - 1)" if hi > 2 else ""
            raise DiffprobeError(f"expected pixels in [-1, 1] (the model transform's range), got values in [{lo:.3g}, {hi:.3g}]{fix}")
        if lo >= 0 and x.numel() > 3 * 64:  # a whole batch without a dark pixel: almost surely [0, 1] input
            log.warning("every pixel is ≥ 0: the model expects [-1, 1]; if these are [0, 1] images, use x * 2 - 1")
        return x

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, classes] for transformed images x [B, 3, S, S] in [-1, 1]."""
        indices = [content_index(xi) for xi in x]
        y = None if self.class_label is None else torch.full((len(x),), self.class_label, device=self.compute.device)
        feats = featurize(self.backbone, x, self.plan, indices, keys=self.keys, y=y, compute=self.compute)
        return self.head([feats[k].cpu() for k in self.keys])

    def predict_proba(self, images: Sequence[ImageLike] | torch.Tensor, batch_size: int = 32) -> torch.Tensor:
        x = self.to_batch(images)
        return torch.cat([torch.softmax(self(x[i:i + batch_size]), dim=1) for i in range(0, len(x), batch_size)])

    def predict(self, images: Sequence[ImageLike] | torch.Tensor, batch_size: int = 32, indices: bool = False) -> list:
        """Class names, as `Probe.predict` gives them; indices=True: positions in `classes` instead."""
        index = self.predict_proba(images, batch_size).argmax(1).tolist()
        return index if indices else [self.classes[i] for i in index]

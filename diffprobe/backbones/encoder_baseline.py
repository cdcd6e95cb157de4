"""`baseline:DIR` as a backbone: the ResNet that `diffprobe baseline train` trained from scratch
(studies/baseline.py), read through its stages (layer1..4) like any image encoder, so the demo and
`compare` can set a supervised network beside diffusion features on the same split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import DiffprobeError
from .encoders import EncoderLayout, VisionEncoder


def load_baseline(folder: str, weights: str | None = None, **options: Any) -> VisionEncoder:
    from ..studies.baseline import RESNET_STAGES, build_resnet, load_checked

    if options:
        raise DiffprobeError(f"baseline backbones take no options (got {', '.join(options)})")
    if weights not in (None, "random"):
        raise DiffprobeError(f"baseline:{folder} brings its own weights (baseline.pt): weights takes only random, not {weights!r}")
    info_path = Path(folder) / "baseline.json"
    if not info_path.is_file():
        raise DiffprobeError(f"{folder} is not a baseline run (no baseline.json): run `diffprobe baseline train` first")
    info = json.loads(info_path.read_text())

    def build(seed: int | None = None):
        import torch

        torch.manual_seed(0 if seed is None else seed)
        return build_resnet(info["arch"], len(info["classes"]), info["image_size"], info.get("stem", "auto"))  # runs before stems: auto

    model = build()
    if weights != "random":
        load_checked(model, Path(folder) / "baseline.pt", f"a {info['arch']} baseline", "run `diffprobe baseline train` again")
    size = int(info["image_size"])
    # Trained on images in [-1, 1] (to_model_range): mean and std 0.5 make encode() the identity.
    layout = EncoderLayout(list(RESNET_STAGES), 0, None, size, size, "bilinear", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    config = {"library": "diffprobe baseline", "arch": info["arch"], "image_size": size, "classes": len(info["classes"])}
    note = "random" if weights == "random" else f"trained by diffprobe on {info['data']} (val top-1 {info['val_top1']:.1f}%)"
    return VisionEncoder(model, layout, "baseline", config, f"baseline:{folder}", build, note)

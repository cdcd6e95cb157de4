"""`diffprobe predict`: a saved probe run on image files, top-k classes per image."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..validate import positive_int
from .classifier import Classifier


def predict_files(run_dir: str | Path, images: Sequence[str | Path], top_k: int = 5, device: str = "auto",
                  batch: int = 32, backbone: str | None = None) -> list[dict]:  # fmt: skip
    top_k = positive_int(top_k, "top-k (--top-k)")  # before the backbone loads: a bad flag costs nothing
    model = Classifier.from_run(run_dir, device, backbone)
    results = []
    for start in range(0, len(images), batch):
        chunk = list(images[start:start + batch])
        values, idx = model.predict_proba(chunk).topk(min(top_k, len(model.classes)), dim=1)
        for path, v, i in zip(chunk, values.tolist(), idx.tolist()):
            results.append({"image": str(path), "top": [{"label": model.classes[c], "probability": p} for c, p in zip(i, v)]})
    return results

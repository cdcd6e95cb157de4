"""Classifying new images with a saved probe run: backbone + head + transform, as trained."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

import torch

from ..backbones import load_backbone
from ..data import model_transform, read_image
from ..errors import DiffprobeError
from ..features.extract import pool_features
from ..features.noise import image_noise
from ..precision import choose_compute
from .train import load_run


def content_index(x: torch.Tensor) -> int:
    """A stand-in for the dataset index in ε(seed, index, draw): a hash of the pixels, so an
    image gets the same noise, and the same prediction, whatever the order of the inputs."""
    return int.from_bytes(hashlib.sha256(x.numpy().tobytes()).digest()[:4], "little") & 0x7FFFFFFF


class Predictor:
    def __init__(self, run_dir: str | Path, device: str = "auto"):
        self.config, self.head = load_run(run_dir)
        loaded = self.config["backbone"]
        spec = self.config.get("loaded_with", {}).get("spec") or loaded["source"]
        options = self.config.get("loaded_with", {}).get("options", {})
        try:
            self.backbone = load_backbone(spec, **options)
        except DiffprobeError as e:
            raise DiffprobeError(f"cannot load the backbone this run was trained on ({spec}): {e}") from None
        if self.backbone.fingerprint() != loaded["fingerprint"]:
            raise DiffprobeError(
                f"the backbone at {spec} is not the one this run was trained on (fingerprint "
                f"{self.backbone.fingerprint()} vs {loaded['fingerprint']}): its weights or flags changed"
            )
        # This machine's fastest setting: bf16 and fp32 features agree to cosine ≥ 0.9999.
        self.compute = choose_compute(device)
        self.compute.prepare(self.backbone)
        self.transform = model_transform(self.backbone.image_size)
        self.keys = [tuple(k.values()) for k in self.config["keys"]]  # (t, block, pool)
        self.noise = self.config["noise"]
        self.y = None if loaded.get("class_label") is None else int(loaded["class_label"])

    @torch.inference_mode()
    def probabilities(self, images: Sequence[str | Path]) -> torch.Tensor:
        x0 = torch.stack([self.transform(read_image(p)) for p in images])
        indices = [content_index(x) for x in x0]
        shape = self.backbone.model_shape
        x0 = self.backbone.encode(x0.to(self.compute.device))  # latents for VAE models, pixels otherwise
        y = None if self.y is None else torch.full((len(images),), self.y, device=self.compute.device)
        by_t: dict[int, list[tuple[int, int]]] = {}
        for t, block, pool in self.keys:
            by_t.setdefault(t, []).append((block, pool))
        pooled: dict[tuple[int, int, int], torch.Tensor] = {}
        for t, wanted in by_t.items():
            for draw in range(self.noise["draws"]):
                eps = image_noise(indices, self.noise["seed"], shape, draw).to(self.compute.device)
                x_t = self.compute.batch(self.backbone.schedule.q_sample(x0, t, eps))
                with self.compute.autocast():
                    feats = self.backbone.forward_features(x_t, t, sorted({b for b, _ in wanted}), y=y)
                for block, pool in wanted:
                    value = pool_features(feats[block], pool) / self.noise["draws"]
                    pooled[(t, block, pool)] = pooled.get((t, block, pool), 0) + value
        inputs = [pooled[k].cpu() for k in self.keys]
        return torch.softmax(self.head(inputs), dim=1)

    def predict(self, images: Sequence[str | Path], top_k: int = 5, batch: int = 32) -> list[dict]:
        classes = self.config["classes"]
        results = []
        for start in range(0, len(images), batch):
            chunk = list(images[start:start + batch])
            probs = self.probabilities(chunk)
            values, idx = probs.topk(min(top_k, len(classes)), dim=1)
            for path, v, i in zip(chunk, values.tolist(), idx.tolist()):
                results.append({"image": str(path), "top": [{"label": classes[c], "probability": p} for c, p in zip(i, v)]})
        return results

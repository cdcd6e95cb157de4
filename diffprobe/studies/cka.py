"""Centred kernel alignment (CKA) between feature sources.

- `linear_cka`: linear CKA of two full feature matrices (Kornblith et al., 2019), computed in
  feature space, float64.
- `rbf_cka`: CKA with Gaussian kernels, bandwidth a fraction of the median pairwise distance.
- `MinibatchCKA`: the unbiased HSIC estimator accumulated over minibatches (Nguyen et al., 2021),
  so 50,000 images never sit in memory at once; it fills a whole A × B matrix in one pass.

Written here because no maintained library in this stack (torchmetrics, scikit-learn) offers CKA.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import DiffprobeError


def _as64(x) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(x) if not isinstance(x, torch.Tensor) else x).to(torch.float64)
    if t.ndim != 2:
        raise DiffprobeError(f"CKA takes [images, features] matrices, got shape {list(t.shape)}")
    return t


def _check_pair(x: torch.Tensor, y: torch.Tensor) -> None:
    if x.shape[0] != y.shape[0]:
        raise DiffprobeError(f"CKA compares the same images: {x.shape[0]} rows vs {y.shape[0]}")
    if x.shape[0] < 4:
        raise DiffprobeError(f"CKA needs at least 4 images, got {x.shape[0]}")


def linear_cka(x, y) -> float:
    """‖YᵀX‖²_F / (‖XᵀX‖_F ‖YᵀY‖_F) on column-centred features."""
    x, y = _as64(x), _as64(y)
    _check_pair(x, y)
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    xx, yy = torch.linalg.matrix_norm(x.T @ x), torch.linalg.matrix_norm(y.T @ y)
    if xx <= 0 or yy <= 0:
        raise DiffprobeError("CKA is undefined for constant features (zero variance in every feature)")
    return float(torch.linalg.matrix_norm(y.T @ x) ** 2 / (xx * yy))


def _rbf_kernel(x: torch.Tensor, sigma_fraction: float) -> torch.Tensor:
    sq = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist") ** 2  # exact, not via matmul
    median = torch.median(sq[sq > 0]) if (sq > 0).any() else torch.tensor(0.0, dtype=sq.dtype)
    if median <= 0:
        raise DiffprobeError("CKA is undefined for constant features (all images identical)")
    return torch.exp(-sq / (2 * sigma_fraction**2 * median))


def _hsic_biased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    n = k.shape[0]
    h = torch.eye(n, dtype=k.dtype) - 1.0 / n
    return torch.trace(k @ h @ l @ h)


def rbf_cka(x, y, sigma_fraction: float = 0.5) -> float:
    """CKA with Gaussian kernels, σ = sigma_fraction · √(median squared distance)."""
    x, y = _as64(x), _as64(y)
    _check_pair(x, y)
    k, l = _rbf_kernel(x, sigma_fraction), _rbf_kernel(y, sigma_fraction)
    return float(_hsic_biased(k, l) / torch.sqrt(_hsic_biased(k, k) * _hsic_biased(l, l)))


def hsic_unbiased(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:
    """Song et al.'s unbiased HSIC of two n×n Gram matrices (n ≥ 4), as used by Nguyen et al."""
    n = k.shape[0]
    if n < 4:
        raise DiffprobeError(f"unbiased HSIC needs minibatches of at least 4 images, got {n}")
    k = k - torch.diag_embed(torch.diagonal(k))
    l = l - torch.diag_embed(torch.diagonal(l))
    ones = torch.ones(n, 1, dtype=k.dtype, device=k.device)
    term = torch.trace(k @ l) + (ones.T @ k @ ones) * (ones.T @ l @ ones) / ((n - 1) * (n - 2)) - 2 * (ones.T @ k @ l @ ones) / (n - 2)
    return term.squeeze() / (n * (n - 3))


class MinibatchCKA:
    """Linear CKA of every A source against every B source, accumulated over minibatches.

        cka = MinibatchCKA(n_a=3, n_b=4)
        for batch in batches: cka.update([a1, a2, a3], [b1, b2, b3, b4])   # [batch, features] each
        cka.compute()  # -> [3, 4] matrix
    """

    def __init__(self, n_a: int, n_b: int):
        self.hsic_ab = torch.zeros(n_a, n_b, dtype=torch.float64)
        self.hsic_aa = torch.zeros(n_a, dtype=torch.float64)
        self.hsic_bb = torch.zeros(n_b, dtype=torch.float64)
        self.batches = 0

    def update(self, a: Sequence, b: Sequence) -> None:
        grams_a = [(lambda t: t @ t.T)(_as64(x)) for x in a]
        grams_b = [(lambda t: t @ t.T)(_as64(y)) for y in b]
        n = {g.shape[0] for g in grams_a + grams_b}
        if len(n) != 1:
            raise DiffprobeError(f"every source in a minibatch must hold the same images, got row counts {sorted(n)}")
        for i, ka in enumerate(grams_a):
            self.hsic_aa[i] += hsic_unbiased(ka, ka)
            for j, lb in enumerate(grams_b):
                self.hsic_ab[i, j] += hsic_unbiased(ka, lb)
        for j, lb in enumerate(grams_b):
            self.hsic_bb[j] += hsic_unbiased(lb, lb)
        self.batches += 1

    def compute(self) -> np.ndarray:
        if self.batches == 0:
            raise DiffprobeError("no minibatches were given to CKA")
        if (self.hsic_aa <= 0).any() or (self.hsic_bb <= 0).any():
            raise DiffprobeError("CKA is undefined for a source with constant features (its HSIC with itself is not positive)")
        return (self.hsic_ab / torch.sqrt(self.hsic_aa[:, None] * self.hsic_bb[None, :])).numpy()


def store_cka(store_a, keys_a, store_b, keys_b, batch_size: int = 1000, seed: int = 0, progress: bool = True) -> np.ndarray:
    """Minibatch linear CKA of stored features: every key of A against every key of B.

    Both stores must hold the same images in the same rows. Rows are visited in a seeded random
    order, so each minibatch is a sample of the whole set (stores are sorted by class).
    """

    if store_a.manifest["data"]["fingerprint"] != store_b.manifest["data"]["fingerprint"] or not np.array_equal(store_a.indices, store_b.indices):
        raise DiffprobeError(f"{store_a.root} and {store_b.root} hold different images: CKA compares features of the same images")
    if batch_size < 4:
        raise DiffprobeError("CKA minibatches need at least 4 images")
    order = np.random.default_rng(seed).permutation(store_a.rows)
    n_batches = max(1, store_a.rows // batch_size)  # equal-sized batches; the remainder joins them
    mb = MinibatchCKA(len(keys_a), len(keys_b))
    for rows in tqdm(np.array_split(order, n_batches), desc="CKA", unit="batch", disable=not progress):
        rows = np.sort(rows)  # memmap reads in file order
        mb.update([store_a.load(k, rows) for k in keys_a], [store_b.load(k, rows) for k in keys_b])
    return mb.compute()


def is_model_spec(b: str | None) -> bool:
    """Whether --b names an image encoder (timm:, torchvision:, hf:, baseline:) rather than a store."""
    from ..backbones.encoders import ENCODER_FAMILIES

    family, sep, _ = (b or "").partition(":")
    return bool(sep) and family in ENCODER_FAMILIES


class EncoderSource:
    """B side of a CKA study against a model: every block of an image encoder (`load_encoder`, the
    same loader as `extract --backbone timm:…`), average-pooled to `pool`×`pool`, read through the
    encoder's own preprocessing.

    weights: a local file, a library weights name ("hub" for timm's own, a torchvision weights
    name such as IMAGENET1K_V1), or None for random weights, said so in `description`.
    `baseline:DIR` and `hf:` folders bring their own weights, so None means theirs.
    blocks: comma-separated block names (layer3,layer4 or blocks.5); None for all. The forward
    stops at the deepest one asked for.
    """

    def __init__(self, spec: str, weights: str | None = None, pool: int = 1, blocks: str | None = None):
        from ..backbones.encoders import load_encoder
        from ..data import backbone_transform
        from ..report import short_source

        brings_own = spec.startswith(("baseline:", "hf:"))
        if weights is None and not brings_own:
            weights = "random"
        elif weights == "hub":
            weights = None  # the library's pretrained weights: the hub, or its cache
        self.backbone = load_encoder(spec, weights=weights)
        self.backbone.eval()
        self.blocks = self.backbone.blocks
        if blocks:
            names = [name.strip() for name in blocks.split(",") if name.strip()]
            if not names:
                raise DiffprobeError(f"--b-keys {blocks!r} names no block of {spec}: give names such as layer3,layer4, or leave it out")
            by_name = {b.name: b for b in self.backbone.blocks}
            unknown = [name for name in names if name not in by_name]
            if unknown:
                raise DiffprobeError(f"{spec} has no block {', '.join(unknown)} (--b-keys): its blocks are "
                                     f"{', '.join(by_name)}")  # fmt: skip
            self.blocks = [by_name[name] for name in dict.fromkeys(names)]
        self.stages = [b.name for b in self.blocks]
        self.pool = pool
        self.transform = backbone_transform(self.backbone)
        note, name = self.backbone.weights_note, short_source(spec)  # a plot label: no long folders
        if spec.startswith("baseline:") and note != "random":
            note = f"{self.backbone.config['arch']} {note}"  # which network the folder holds
        if note == "random":
            self.description = f"{name} with RANDOM weights (no weights given)"
        else:
            self.description = f"{name} (weights {Path(note[5:]).name})" if note.startswith("file ") else f"{name} ({note})"

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Images from `transform` ([-1, 1]) -> {block name: pooled, flattened features}."""
        maps = self.backbone.forward_features(self.backbone.encode(images), 0, [b.index for b in self.blocks])
        pooled = {}
        for block in self.blocks:
            pooled[block.name] = torch.nn.functional.adaptive_avg_pool2d(maps[block.index].float(), self.pool).flatten(1)
        return pooled


def source_cka(store_a, keys_a, data, source, batch_size: int = 500, seed: int = 0, progress: bool = True,
               forward_batch: int = 64) -> np.ndarray:  # fmt: skip
    """Minibatch linear CKA of stored features (A) against a model's stage features (B) computed
    on the same images, batch by batch (nothing but one CKA minibatch of pooled features in memory).
    The model runs `forward_batch` images at a time: a CKA minibatch of 500 images at 224 px
    through one forward would hold every stage's activations for all 500 at once (8 GB for ResNet-18)."""

    if data.fingerprint() != store_a.manifest["data"]["fingerprint"]:
        raise DiffprobeError(f"--data is not the dataset {store_a.root} was extracted from ({store_a.manifest['data']['name']})")
    if batch_size < 4:
        raise DiffprobeError("CKA minibatches need at least 4 images")
    order = np.random.default_rng(seed).permutation(store_a.rows)
    mb = MinibatchCKA(len(keys_a), len(source.stages))
    indices = store_a.indices
    for rows in tqdm(np.array_split(order, max(1, store_a.rows // batch_size)), desc="CKA", unit="batch", disable=not progress):
        rows = np.sort(rows)
        parts = []
        for start in range(0, len(rows), forward_batch):
            images = torch.stack([source.transform(data.load(int(i))) for i in indices[rows[start:start + forward_batch]]])
            parts.append(source.features(images))
        feats = {s: torch.cat([part[s] for part in parts]) for s in source.stages}
        mb.update([store_a.load(k, rows) for k in keys_a], [feats[s] for s in source.stages])
    return mb.compute()


def cka_study(store_a, out, a_keys: str | None = None, b: str | None = None, b_keys: str | None = None, data=None,
              b_weights: str | None = None, b_pool: int = 1, batch_size: int = 1000, seed: int = 0, forward_batch: int = 64) -> dict:  # fmt: skip
    """Minibatch linear CKA between settings of store A and those of B (another store, A itself,
    or a model's blocks: baseline:DIR, torchvision:ARCH, timm:NAME, hf:ID computed on `data`);
    writes cka.csv and an annotated heatmap cka.png into `out`."""
    from .._io import output_dir, write_csv
    from ..features.store import FeatureStore
    from ..report import heatmap, short_source

    keys_a = store_a.select_keys(a_keys)
    name_a = short_source(store_a.manifest["backbone"]["source"])
    if is_model_spec(b):
        if data is None:
            raise DiffprobeError("comparing with a model needs --data: the dataset the store was extracted from")
        if b_weights and Path(b_weights).is_file():  # a file: read it safely first (code refused, damage one line)
            from ..backbones.pickles import load_torch_file

            if Path(b_weights).suffix != ".safetensors":
                load_torch_file(b_weights, "--b-weights file", "pass a state_dict saved with torch.save (or a torchvision weights name)")
        source = EncoderSource(b, weights=b_weights, pool=b_pool, blocks=b_keys)
        matrix = source_cka(store_a, keys_a, data, source, batch_size, seed, forward_batch=forward_batch)
        labels_b, name_b = source.stages, source.description
    else:
        store_b = FeatureStore.open(b) if b else store_a
        keys_b = store_b.select_keys(b_keys if b else (b_keys or a_keys))
        matrix = store_cka(store_a, keys_a, store_b, keys_b, batch_size, seed)
        labels_b, name_b = [k.stem for k in keys_b], short_source(store_b.manifest["backbone"]["source"])
    out = output_dir(out)
    write_csv(out / "cka.csv", [{"a": ka.stem, **{lb: round(float(v), 6) for lb, v in zip(labels_b, row)}}
                                for ka, row in zip(keys_a, matrix)])  # fmt: skip
    heatmap(out / "cka.png", matrix, [k.stem for k in keys_a], labels_b, f"linear CKA (minibatch, {store_a.rows} images)",
            xlabel=f"B: {name_b}", ylabel=f"A: {name_a}", colorbar="linear CKA", limits=(0.0, 1.0), fmt="{:.2f}")  # fmt: skip
    return {"matrix": matrix, "a": [k.stem for k in keys_a], "b": labels_b, "b_name": name_b, "rows": store_a.rows}

"""Per-image latents cached in the feature store, so a latent model's encoder runs once per image.

A VAE encode costs about as much as a U-Net pass; a sweep over five timesteps, a resumed
extraction or a second run adding timesteps to a store would otherwise encode every image
again each time. Inside a store directory:

    latents/latents.npy    [rows, C, h, w] float32, a .npy memmap, row-aligned with the store
    latents/latents.done   one byte per chunk of rows: 1 once that chunk's latents are flushed
    latents/latents.json   what the latents are a function of: the encoder's identity (VAE
                           weights, scaling, image size), the rows, the transform, the precision

As for features, a chunk is marked done only after its rows are flushed, so a killed process
leaves only whole chunks, and ranks writing disjoint chunks never overlap. Latents written for
another identity are discarded, never used. Backbones whose encode() is the identity (pixel
models) get a pass-through and nothing is written.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write, write_json
from ..backbones.base import Backbone
from ..precision import Compute, upload
from .batching import in_passes
from .featurize import encode_images
from .store import FeatureStore


class PixelInputs:
    """Pixel models: the model input is the image itself (encode is the identity)."""

    encoded_chunks = 0

    def encode_chunk(self, backbone: Backbone, chunk: int, images: torch.Tensor, compute: Compute, pass_rows: int | None = None) -> torch.Tensor:
        return encode_images(backbone, images, compute)


class LatentCache:
    def __init__(self, store: FeatureStore, backbone: Backbone):
        self.store = store
        self.folder = Path(store.root) / "latents"
        self.array_path = self.folder / "latents.npy"
        self.done_path = self.folder / "latents.done"
        self.shape = (store.rows, *backbone.model_shape)
        manifest = store.manifest
        self.identity = {
            "encoder": backbone.encoder_identity(),
            "shape": list(self.shape),
            "rows": manifest["rows"],
            "transform": manifest["transform"],
            "precision": manifest["precision"],
            "chunk_rows": store.chunk_rows,
        }
        self.encoded_chunks = 0  # chunks this process had to encode (the rest were cache hits)
        self._map: np.memmap | None = None
        self._prepare()

    @classmethod
    def open(cls, backbone: Backbone, store: FeatureStore) -> "LatentCache | PixelInputs":
        """The cache of `store` for `backbone`'s encoder; a pass-through when there is nothing to cache."""
        return cls(store, backbone) if backbone.encodes_images else PixelInputs()

    def _prepare(self) -> None:
        import json

        info = self.folder / "latents.json"
        if info.is_file():
            try:
                same = json.loads(info.read_text()) == self.identity
            except json.JSONDecodeError:
                same = False
            if same and self.array_path.is_file() and self.done_path.is_file():
                return
            # Another encoder, other rows or a damaged cache: start over (never reuse).
            for path in (info, self.array_path, self.done_path):
                path.unlink(missing_ok=True)
        shape, chunks = self.shape, self.store.num_chunks
        atomic_write(self.array_path, lambda p: np.lib.format.open_memmap(p, mode="w+", dtype=np.float32, shape=shape).flush(), exclusive=True)
        atomic_write(self.done_path, lambda p: Path(p).write_bytes(bytes(chunks)), exclusive=True)
        write_json(info, self.identity, exclusive=True)  # last: its presence says the files are usable

    def done(self) -> np.ndarray:
        return np.frombuffer(self.done_path.read_bytes(), dtype=np.uint8).astype(bool)

    def _array(self) -> np.memmap:
        if self._map is None:
            self._map = np.load(self.array_path, mmap_mode="r+")
        return self._map

    def encode_chunk(self, backbone: Backbone, chunk: int, images: torch.Tensor, compute: Compute, pass_rows: int | None = None) -> torch.Tensor:
        """The latents of one chunk of store rows (on the compute's device): from the cache, or encoded
        (in passes of at most pass_rows images) and cached now."""
        rows = self.store.chunk_slice(chunk)
        if self.done()[chunk]:
            return upload(torch.from_numpy(np.array(self._array()[rows])), compute.device)
        latents = torch.cat(in_passes(len(images), pass_rows or len(images), lambda s: encode_images(backbone, images[s], compute)))
        target = self._array()
        target[rows] = latents.cpu().numpy()
        target.flush()
        fd = os.open(self.done_path, os.O_WRONLY)
        try:
            os.pwrite(fd, b"\x01", chunk)  # one byte per chunk: disjoint writers never overlap
        finally:
            os.close(fd)
        self.encoded_chunks += 1
        return latents

"""`diffprobe fid`: Fréchet Inception Distance of generated samples against real images.

The statistics come from torchmetrics' FrechetInceptionDistance, which uses torch-fidelity's
Inception-v3 port (the TF-FID network, so numbers compare with published FIDs computed the same
way). Its weights download on first use; offline, `--inception-weights FILE` supplies them, and
with neither the command stops with an error saying so. It never reports a number from a
network without those weights.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..backbones.pickles import load_torch_file
from ..errors import DiffprobeError

INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def inception_fid(weights: str | Path | None = None, feature: int = 2048):
    """A torchmetrics FID metric, with a clear error when the Inception weights cannot be had."""
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError as e:  # pragma: no cover - an install problem, said plainly
        raise DiffprobeError(f"FID needs torchmetrics and torch-fidelity: pip install 'torchmetrics[image]' ({e})") from None
    if weights is not None and not Path(weights).is_file():
        raise DiffprobeError(f"Inception weights not found: {weights}; --inception-weights expects the file {INCEPTION_FILE} (TF-FID Inception-v3)")
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE
    if weights is None and cached.is_file():
        weights = cached  # torch-fidelity would unpickle the cached download unchecked: it goes the safe way too
    if weights is not None:
        with tempfile.TemporaryDirectory(prefix="diffprobe-inception-") as tmp:
            return _metric(FrechetInceptionDistance, feature, plain_inception_copy(weights, Path(tmp)), weights)
    return _metric(FrechetInceptionDistance, feature, None, None)


def plain_inception_copy(weights: str | Path, folder: Path) -> str:
    """The tensors of `weights`, read with weights_only=True (a pickle carrying code is refused,
    never run), saved again as a plain state_dict in `folder`. torch-fidelity unpickles its weights
    file with weights_only=False; the file it gets is this copy, which holds tensors only."""
    state = load_torch_file(weights, "Inception weights", f"--inception-weights expects the file {INCEPTION_FILE} (TF-FID Inception-v3)")
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise DiffprobeError(f"{weights} is not a state_dict: --inception-weights expects the file {INCEPTION_FILE} "
                             "(a dict of parameter name -> tensor)")  # fmt: skip
    plain = folder / INCEPTION_FILE
    torch.save(dict(state), plain)
    return str(plain)


def _metric(cls, feature: int, path: str | None, weights: str | Path | None):
    try:
        return cls(feature=feature, feature_extractor_weights_path=path)
    except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError
        if weights is None:
            from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

            raise DiffprobeError(
                "FID needs the Inception-v3 weights of TF-FID and they could not be downloaded "
                f"({type(e).__name__}: {str(e).splitlines()[0][:160]}). Download {URL_INCEPTION_V3} where there is "
                "internet and pass --inception-weights FILE (or place it in torch's hub cache, "
                f"{Path(torch.hub.get_dir()) / 'checkpoints' / INCEPTION_FILE})"
            ) from None
        raise DiffprobeError(f"cannot load Inception weights from {weights}: {str(e).splitlines()[0][:200]}") from None


def load_npz_images(path: str | Path) -> torch.Tensor:
    """uint8 [N, 3, H, W] from a samples .npz (guided-diffusion's `arr_0`, NHWC)."""
    try:
        with np.load(path) as f:
            arr = f["arr_0"] if "arr_0" in f else f[list(f.keys())[0]]
    except (OSError, ValueError, KeyError, IndexError) as e:
        raise DiffprobeError(f"cannot read samples from {path}: {e}") from None
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise DiffprobeError(f"{path}: expected uint8 images of shape [N, H, W, 3], got {arr.dtype} {list(arr.shape)}")
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def dataset_batches(data, rows: np.ndarray, batch_size: int) -> Iterable[torch.Tensor]:
    """Real images as uint8 [B, 3, H, W] at their own resolution (Inception resizes to 299)."""
    from torchvision.transforms.v2.functional import pil_to_tensor

    for start in range(0, len(rows), batch_size):
        batch = [pil_to_tensor(data.load(int(i))) for i in rows[start : start + batch_size]]
        sizes = {tuple(b.shape) for b in batch}
        if len(sizes) > 1:
            raise DiffprobeError(f"real images of different sizes {sorted(sizes)[:3]}: FID here needs one size (resize the folder first)")
        yield torch.stack(batch)


def compute_fid(metric, fake: torch.Tensor, real: Iterable[torch.Tensor], real_count: int, batch_size: int = 100) -> float:
    """FID between uint8 image batches; progress over both sets."""
    with torch.no_grad():
        for start in tqdm(range(0, len(fake), batch_size), desc="FID: generated images", unit="batch", mininterval=2):
            metric.update(fake[start : start + batch_size], real=False)
        for batch in tqdm(real, total=-(-real_count // batch_size), desc="FID: real images", unit="batch", mininterval=2):
            metric.update(batch, real=True)
    return float(metric.compute())


def fid_of_samples(samples: str | Path, real, real_limit: int | None = None, inception_weights: str | Path | None = None,
                   batch_size: int = 100, out: str | Path | None = None, val_split: tuple[float, int] | None = None) -> dict:  # fmt: skip
    """FID of a samples .npz against a dataset: all of it, or its validation split when `val_split`
    = (val_fraction, split_seed) is given (the images `diffprobe pretrain` left out), then a
    stratified subset of `real_limit` of those if given. The result dict (with the samples'
    samples.json, when there is one beside them, naming the model) is also written as JSON to `out`."""
    import json

    from .._io import write_json
    from ..data import stratified_split, stratified_subset

    fake = load_npz_images(samples)
    metric = inception_fid(inception_weights)  # first: fail before reading images
    rows = np.flatnonzero(stratified_split(real.labels, *val_split)) if val_split else np.arange(len(real))
    if real_limit:
        rows = rows[stratified_subset(real.labels[rows], real_limit, 0)]
    value = compute_fid(metric, fake, dataset_batches(real, rows, batch_size), len(rows), batch_size)
    info = Path(samples).with_name("samples.json")
    split = ({"split": "validation", "val_fraction": val_split[0], "split_seed": val_split[1]} if val_split else {"split": "all"})
    result = {"fid": value, "samples": str(samples), "num_samples": len(fake), "real": real.name,
              "real_fingerprint": real.fingerprint(), "real_split": {**split, "limit": real_limit},
              "num_real": int(len(rows)), "inception_weights": str(inception_weights or "torch-fidelity download"),
              "samples_info": json.loads(info.read_text()) if info.is_file() else None}  # fmt: skip
    if out:
        write_json(out, result)
    return result

"""One function from clean images to pooled block features: extraction, prediction and online
training all call `featurize`, so the features a head was trained on are the ones it is served.

    x0 ──backbone.encode──▶ model space ──q_sample(t, ε(seed, image, view·draws + draw))──▶ x_t
       ──one pass per t, stopping after the deepest block──▶ {block: map} ──pool p×p──▶ {FeatureKey: [B, C·p·p]}
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..backbones.base import Backbone
from ..errors import DiffprobeError
from ..precision import Compute, choose_compute
from .noise import image_noise
from .plan import FeaturePlan
from .store import FeatureKey


def pool_features(h: torch.Tensor, pool: int) -> torch.Tensor:
    """Adaptive average pooling to pool×pool, flattened channel-major ([B, C·p·p]), in float32."""
    return F.adaptive_avg_pool2d(h.float(), pool).flatten(1)


def noise_draws(indices: Sequence[int], seed: int, shape: Sequence[int], draws: int,
                views: Sequence[int] | None = None) -> list[torch.Tensor]:  # fmt: skip
    """ε for each image and draw: draw d of view v of image i uses stream (seed, i, v·draws + d)."""
    views = np.zeros(len(indices), dtype=int) if views is None else views
    return [torch.cat([image_noise([int(i)], seed, shape, int(v) * draws + d) for i, v in zip(indices, views)])
            for d in range(draws)]  # fmt: skip


def encode_images(backbone: Backbone, images: torch.Tensor, compute: Compute) -> torch.Tensor:
    """Clean images in [-1, 1] -> model space (latents for VAE models), float32 on the compute's
    device, run on the compute's set-up copy: the one encoding featurize, the latent cache and
    online training share."""
    with torch.no_grad(), compute.autocast():
        return compute.prepare(backbone).encode(images.to(compute.device, non_blocking=True)).float()


def check_batch(backbone: Backbone, x0: object, indices: Sequence[int], encoded: bool) -> list[int]:
    """One index per image of a batch [B, C, H, W] of the backbone's shape; else one error that
    says what was given (an unbatched image would be read as C images, short indices would reuse ε)."""
    if not isinstance(x0, torch.Tensor):
        raise DiffprobeError(f"x0: expected a torch.Tensor [B, 3, S, S] in [-1, 1], got {type(x0).__name__}"
                             + (" (use torch.from_numpy, channels first)" if isinstance(x0, np.ndarray) else ""))  # fmt: skip
    c, s = (backbone.model_shape[0], backbone.model_shape[1]) if encoded else (3, backbone.image_size)
    if x0.ndim != 4 or x0.shape[1] != c:
        hint = " (one image: add the batch dimension, x0[None])" if x0.ndim == 3 else ""
        raise DiffprobeError(f"x0: expected a batch [B, {c}, {s}, {s}], got shape {list(x0.shape)}{hint}")
    if isinstance(indices, (str, bytes)) or not isinstance(indices, Iterable):
        raise DiffprobeError(f"indices: expected one integer per image, got {indices!r}")
    indices = list(indices)
    if len(indices) != len(x0):
        raise DiffprobeError(f"indices: {len(indices)} given for {len(x0)} images; each image needs its own index "
                             "(its noise is drawn from it)")  # fmt: skip
    return indices


def featurize(backbone: Backbone, x0: torch.Tensor, plan: FeaturePlan, indices: Sequence[int], *,
              keys: Sequence[FeatureKey] | None = None, views: Sequence[int] | None = None,
              y: torch.Tensor | None = None, compute: Compute | None = None, encoded: bool = False,
              noise: torch.Tensor | None = None) -> dict[FeatureKey, torch.Tensor]:  # fmt: skip
    """Pooled features of one batch of clean images, averaged over the plan's noise draws.

    x0: [B, 3, S, S] in [-1, 1] (the model transform's output), or already in model space
    (`encoded=True`, e.g. cached latents). indices: each image's identity for its noise (its
    dataset index, or a content hash for new images). keys: a subset of the plan's (t, block,
    pool) settings (default: all). compute: where and how the frozen network runs (default:
    this machine's fastest, `choose_compute()`); the caller's backbone is not changed.
    noise: ε already drawn for these images, [B, draws, *model shape] as `noise_draws` draws it
    (extraction draws it in its loader workers, features/pipeline.py); default: drawn here.
    """
    indices = check_batch(backbone, x0, indices, encoded)
    compute = compute or choose_compute()
    runner = compute.prepare(backbone)
    keys = list(keys) if keys is not None else plan.resolve(backbone).keys
    x0 = x0.to(compute.device, non_blocking=True) if encoded else encode_images(backbone, x0, compute)
    if backbone.schedule.noisy and noise is not None:
        if tuple(noise.shape) != (len(indices), plan.draws, *x0.shape[1:]):
            raise DiffprobeError(f"noise: expected [{len(indices)}, {plan.draws}, {', '.join(map(str, x0.shape[1:]))}] "
                                 f"(images, draws, model shape), got {list(noise.shape)}")  # fmt: skip
        noises = list(noise.to(compute.device, non_blocking=True).unbind(1))
    elif backbone.schedule.noisy:
        noises = [e.to(compute.device, non_blocking=True)
                  for e in noise_draws(indices, plan.noise_seed, tuple(x0.shape[1:]), plan.draws, views)]  # fmt: skip
    else:  # an encoder reads the clean image: no noise to draw, one pass
        noises = [None]
    sums: dict[FeatureKey, torch.Tensor] = {}
    for t in sorted({k.t for k in keys}):
        keys_t = [k for k in keys if k.t == t]
        blocks = list({k.block: None for k in keys_t})  # numbers and module paths: the backbone orders them
        for eps in noises:
            x_t = compute.batch(backbone.schedule.q_sample(x0, t, eps))
            if compute.compile and compute.compile_mode == "reduce-overhead":
                torch.compiler.cudagraph_mark_step_begin()  # a new replay: the last pass's maps were pooled already
            with compute.autocast():
                feats = runner.forward_features(x_t, t, blocks, y=y)
            for k in keys_t:
                pooled = pool_features(feats[k.block], k.pool)
                sums[k] = pooled if k not in sums else sums[k] + pooled
    return {k: v / len(noises) for k, v in sums.items()}

"""The one check on feature values: NaN or Inf never reach a store or a head silently.

A checkpoint with one NaN weight makes every later block NaN; float16 storage turns values
above 65504 into Inf. Either way the features are useless, and a probe on them reports chance
accuracy (or crashes) without saying why, so extraction stops at the first such value and a
store read back is checked the same way.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import DiffprobeError


def _count_nonfinite(values: np.ndarray | torch.Tensor) -> tuple[int, int, int]:
    """(NaN count, Inf count, total) without copying a tensor to float64."""
    if isinstance(values, torch.Tensor):
        return int(torch.isnan(values).sum()), int(torch.isinf(values).sum()), values.numel()
    return int(np.isnan(values).sum()), int(np.isinf(values).sum()), values.size


def check_finite(values: np.ndarray | torch.Tensor, t: int, block: int, pool: int | None = None, where: str = "") -> None:
    """Raise a DiffprobeError naming block and timestep if any value is NaN or ±Inf."""
    if isinstance(values, torch.Tensor):
        if bool(torch.isfinite(values).all()):
            return
    elif np.isfinite(values).all():
        return
    nans, infs, total = _count_nonfinite(values)
    what = " and ".join(f"{n} {name}" for n, name in ((nans, "NaN"), (infs, "Inf")) if n)
    setting = f"block {block} at t={t}" + (f" (pool {pool})" if pool is not None else "")
    if where:  # a store written before this check existed
        raise DiffprobeError(
            f"{where}: {setting} holds non-finite features ({what} of {total} values): "
            "re-extract it with --overwrite (a NaN/Inf in the checkpoint's weights, or float16 overflow: try --dtype float32)"
        )
    raise DiffprobeError(
        f"{setting} gave non-finite features ({what} of {total} values in this batch): the checkpoint's weights "
        "probably hold NaN/Inf (check them, e.g. torch.isfinite on each tensor); if the values only overflow "
        "float16, use --dtype float32. Finished chunks are kept"
    )

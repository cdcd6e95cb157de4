"""Finds where a pass would make the host wait for the GPU, on a machine without one.

The pass runs on PyTorch's meta device (shapes, no data) under a dispatch mode and a function
mode that record every operation a GPU would have to synchronise for:
  - a read of a device value on the host (`.item()`, `.tolist()`, `bool(t)`, a copy to the CPU);
  - a tensor made on the host and copied up during the pass (`torch.tensor(..., device=)`,
    `.to(device)` of a host tensor, an index tensor on the host): a pageable copy the host waits
    on at every pass.
What the pass reads from the host before it starts (the batch, its noise) is the caller's.
On a GPU, `torch.cuda.set_sync_debug_mode("error")` is the direct check (benchmarks/gpu_check.py).
"""

from __future__ import annotations

import traceback

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

META = torch.device("meta")


def _devices(tree) -> set[str]:
    return {x.device.type for x in tree_leaves(tree) if isinstance(x, torch.Tensor)}


def _caller() -> str:
    """The innermost frame outside torch and this file: where the operation was asked for."""
    for frame in reversed(traceback.extract_stack()):
        if "/torch/" not in frame.filename and not frame.filename.endswith("/host_sync.py"):
            return f"{frame.filename.split('site-packages/')[-1].split('/work/main/')[-1]}:{frame.lineno} ({frame.line})"
    return "?"


class HostSyncAudit(TorchDispatchMode):
    """Records each host read of a meta tensor and each host tensor copied onto the meta device."""

    def __init__(self):
        super().__init__()
        self.events: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        before = _devices((args, kwargs))
        # A meta tensor has no value to give: a read is recorded and answered with zeros, so the
        # pass goes on and every place is listed, not only the first.
        if func is torch.ops.aten._local_scalar_dense.default and "meta" in before:
            self.events.append(f"host read ({func}) at {_caller()}")
            return 0
        if "meta" in before and kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu":
            self.events.append(f"device tensor copied down ({func}) at {_caller()}")
            return torch.zeros(args[0].shape, dtype=kwargs.get("dtype") or args[0].dtype)
        out = func(*args, **kwargs)
        if "cpu" in before and "meta" not in before and "meta" in _devices(out):
            self.events.append(f"host tensor copied up ({func}) at {_caller()}")
        return out


class HostDataAudit(TorchFunctionMode):
    """What the dispatch mode cannot see, since the copy happens before an operator runs: host data
    made into a device tensor (`torch.tensor([...], device=x.device)`), and a device tensor indexed
    by a host tensor (the index is copied up first)."""

    MAKERS = {torch.tensor, torch.as_tensor, torch.asarray}
    READS = {torch.Tensor.item, torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__bool__, torch.Tensor.__index__,
             torch.Tensor.tolist}  # fmt: skip

    def __init__(self, events: list[str]):
        super().__init__()
        self.events = events

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self.READS and isinstance(args[0], torch.Tensor) and args[0].device.type == "meta":
            self.events.append(f"host read ({func.__name__}) at {_caller()}")  # answered with zeros, as below
            return torch.zeros(args[0].shape).tolist() if func is torch.Tensor.tolist else (False if func is torch.Tensor.__bool__ else 0)
        device = kwargs.get("device")
        if func in self.MAKERS and device is not None and torch.device(device).type == "meta":
            if not (args and isinstance(args[0], torch.Tensor) and args[0].device.type == "meta"):
                self.events.append(f"host data copied up ({func.__name__}) at {_caller()}")
        if func is torch.Tensor.__getitem__ and args and isinstance(args[0], torch.Tensor) and args[0].device.type == "meta":
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.device.type == "cpu" and i.dim() > 0 for i in index):
                self.events.append(f"indexed by a host tensor (copied up) at {_caller()}")
        return func(*args, **kwargs)


class Audit:
    """Both audits at once: `with Audit() as audit: ...`, then `audit.events`."""

    def __init__(self):
        self.dispatch = HostSyncAudit()
        self.function = HostDataAudit(self.dispatch.events)

    @property
    def events(self) -> list[str]:
        return self.dispatch.events

    def __enter__(self) -> "Audit":
        self.function.__enter__()
        self.dispatch.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self.dispatch.__exit__(*exc)
        self.function.__exit__(*exc)


def audit_featurize(backbone, plan, batch: int = 2) -> list[str]:
    """The host waits one featurize pass of `backbone` would cause on a GPU, given its batch and
    noise already on the device (as extraction hands them over); a warm-up pass first, so that
    once-only work (weights read lazily, set-up copies) is not counted."""
    from diffprobe.features.featurize import featurize
    from diffprobe.precision import Compute

    compute = Compute(META, "fp32", False)
    x0 = torch.zeros(batch, *backbone.model_shape, device=META)
    noise = torch.zeros(batch, plan.draws, *backbone.model_shape, device=META) if backbone.schedule.noisy else None
    # A class-conditional model reads labels as extraction hands them over: on the device.
    label = backbone.default_class_label if backbone.default_class_label is not None else 0
    y = torch.full((batch,), label, device=META) if backbone.num_classes is not None else None
    indices = list(range(batch))
    with torch.inference_mode():
        with Audit():  # the warm-up: its once-only work is not counted (and a host read must not end it)
            featurize(backbone, x0, plan, indices, compute=compute, encoded=True, noise=noise, y=y)
        with Audit() as audit:
            pooled = featurize(backbone, x0, plan, indices, compute=compute, encoded=True, noise=noise, y=y)
    assert all(v.device == META for v in pooled.values())
    return audit.events


def walk_plan(backbone):
    """A plan that reads a backbone's first, middle and last block (an encoder's last before its
    class token) at two pools, with two noise draws where there is noise."""
    from diffprobe.features.plan import FeaturePlan

    deepest = backbone.num_blocks if backbone.generative else max(1, backbone.num_blocks - 1)
    if not backbone.generative:
        t, draws = 0, 1
    else:
        t, draws = (300 if backbone.schedule.parameterization == "flow" else 100), 2
    return FeaturePlan(t=t, blocks=sorted({1, max(1, deepest // 2), deepest}), pools=[1, 2], draws=draws)

"""Where and in which number format the frozen U-Net runs.

Defaults come from measurement (benchmarks/extract.py): on a CPU with native bf16 (AVX512-BF16
or AMX), bf16 autocast with channels_last is several times faster than fp32 with features of
cosine ≥ 0.999 to the fp32 ones; on CUDA, bf16 autocast (fp16 where bf16 is missing).
"""

from __future__ import annotations

import contextlib
import copy
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .errors import DiffprobeError

if TYPE_CHECKING:
    from .backbones.base import Backbone

PRECISIONS = ("fp32", "bf16", "fp16")
# torch.compile's modes: "default" fuses norms and pointwise ops; "max-autotune" also times
# matmul/conv kernel choices (minutes of compilation); "reduce-overhead" replays the pass as a
# CUDA graph (fewer launches: pays on small batches). Which pays is measured per GPU by
# benchmarks/gpu_check.py --compile-modes; auto stays "default" until a GPU run says otherwise.
COMPILE_MODES = ("default", "max-autotune", "max-autotune-no-cudagraphs", "reduce-overhead")


@dataclass(frozen=True)
class Compute:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16 (the autocast dtype; weights stay fp32)
    channels_last: bool
    compile: bool = False  # torch.compile the block walk (GPUs: fuses GroupNorm/SiLU/scale-shift)
    compile_mode: str = "default"  # torch.compile's mode (COMPILE_MODES), when compile is on

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    @property
    def changes_model(self) -> bool:
        return self.precision != "fp32" or self.channels_last or self.compile

    def prepare(self, backbone: "Backbone") -> "Backbone":
        """The backbone set up to run here: on this device, weights cast, layout and compile applied.

        The caller's backbone is never changed: the set-up copy is made once and cached on it
        (so demo, export and sampling share one copy per compute). With bf16/fp16, conv and
        linear weights are cast once in the copy: autocast would otherwise cast every frozen
        weight again at every call. The values are the ones autocast would use; norm parameters
        stay float32. The copy keeps the original's fingerprint (the fp32 weights').
        """
        origin = backbone.__dict__.get("_prepared_from")
        if origin is not None:  # a set-up copy: serve this compute from the original fp32 backbone
            return backbone if backbone.__dict__["_prepared_for"] == self else self.prepare(origin)
        if not self.changes_model and _device_of(backbone) == self.device:
            return backbone  # nothing to set up
        cache = backbone.__dict__.setdefault("_prepared", {})
        if self in cache:
            return cache[self]
        backbone.fingerprint()  # taken on the fp32 weights, carried into the copy
        backbone.__dict__["_prepared"] = {}  # copy the backbone, not the copies made for other computes
        try:
            prepared = copy.deepcopy(backbone)
        finally:
            backbone.__dict__["_prepared"] = cache
        cache[self] = prepared
        # Plain __dict__ entries: neither is a submodule of the copy (no weights counted twice).
        prepared.__dict__["_prepared_for"], prepared.__dict__["_prepared_from"] = self, backbone
        prepared.to(self.device)
        if self.precision != "fp32":
            for m in prepared.modules():
                if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
                    m.to(self.dtype)
        if self.channels_last:
            prepared.to(memory_format=torch.channels_last)
        if self.compile:
            prepared.compile(**({} if self.compile_mode == "default" else {"mode": self.compile_mode}))
        return prepared

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def describe(self) -> str:
        compiled = (" compiled" + (f" ({self.compile_mode})" if self.compile_mode != "default" else "")) * self.compile
        return f"{self.device.type} {self.precision}" + " channels_last" * self.channels_last + compiled


def upload(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor onto `device` without the host waiting: on a GPU pinned first (a pageable copy
    blocks), then copied asynchronously; PyTorch keeps the pinned block until the copy is done."""
    if device.type != "cuda":
        return x.to(device)
    if x.device.type != "cpu":  # already on a GPU (this one or another): only host memory is pinned
        return x.to(device, non_blocking=True)
    return (x if x.is_pinned() else x.pin_memory()).to(device, non_blocking=True)


def _device_of(module: torch.nn.Module) -> torch.device:
    first = next(iter(module.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def resolve_device(device: str = "auto") -> torch.device:
    """'auto' -> the GPU of this process (cuda:LOCAL_RANK under torchrun) if any, else the CPU.
    A bare 'cuda' gets that index too: torch.cuda.set_device, NCCL's device_id and pinned copies
    need one, and under torchrun each rank must land on its own GPU, not all on cuda:0.
    The one place a device name is resolved; a GPU asked for but absent is a clear error."""
    if device == "auto":
        return _this_ranks_gpu() if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise DiffprobeError(f"device {device!r} not understood: expected auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DiffprobeError(f"--device {device} asked for, but no CUDA GPU is visible: use --device cpu (or auto)")
    return _this_ranks_gpu() if dev.type == "cuda" and dev.index is None else dev


def _this_ranks_gpu() -> torch.device:
    import os

    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def describe_hardware(device: torch.device, precision: str) -> str:
    """What a computation ran on, in words: the CPU and its threads, or the GPU, and the autocast dtype."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{cpu_name()}, {torch.get_num_threads()} threads"
    return f"{where}, {precision}"


def cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def choose_compute(device: str = "auto", precision: str = "auto", channels_last: str | bool = "auto",
                   compile: str | bool = "auto") -> Compute:  # fmt: skip
    """Resolve 'auto' settings for this machine; explicit ones are checked and kept."""
    dev = resolve_device(str(device))  # a torch.device too: a bare cuda gets this rank's index
    if precision == "auto":
        if dev.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_has_fast_bf16() else "fp32"
    if precision not in PRECISIONS:
        raise DiffprobeError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)} or auto")
    if dev.type == "cpu" and precision == "fp16":
        raise DiffprobeError("fp16 autocast is for GPUs; on a CPU use bf16 or fp32")
    if channels_last == "auto":
        # Measured (benchmarks/extract.py): on CPU channels_last is faster in bf16 (~1.2×) and in fp32
        # (issue 12: 73 vs 62 img/s on an AVX2-only CPU, shipped checkpoint, batch 64); on an H100,
        # eager channels_last was slower (230 vs 331 img/s at 256×256).
        channels_last = dev.type == "cpu"
    mode = "default"
    if isinstance(compile, str) and compile in COMPILE_MODES:  # a mode asked for by name: compiled in that mode
        compile, mode = True, compile
    elif compile == "auto":
        # torch.compile fuses the memory-bound norm/pointwise ops on GPUs; on CPU it gained nothing
        # (73-83 vs 84-87 img/s eager) and costs a minute of compilation.
        compile = dev.type == "cuda"
    elif isinstance(compile, str):
        raise DiffprobeError(f"compile {compile!r}: expected auto, on, off or a torch.compile mode ({', '.join(COMPILE_MODES)})")
    if mode == "reduce-overhead" and dev.type != "cuda":
        raise DiffprobeError("--compile reduce-overhead replays CUDA graphs: it needs a GPU (on a CPU use off or default)")
    return Compute(dev, precision, bool(channels_last), bool(compile), mode)

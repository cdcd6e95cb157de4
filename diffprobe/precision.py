"""Where and in which number format the frozen U-Net runs.

Defaults come from measurement (benchmarks/extract.py): on a CPU with native bf16 (AVX512-BF16
or AMX), bf16 autocast with channels_last is several times faster than fp32 with features of
cosine ≥ 0.999 to the fp32 ones; on CUDA, bf16 autocast (fp16 where bf16 is missing).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from .errors import DiffprobeError

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Compute:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16 (the autocast dtype; weights stay fp32)
    channels_last: bool
    compile: bool = False  # torch.compile the block walk (GPUs: fuses GroupNorm/SiLU/scale-shift)

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.precision == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]

    def prepare(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move a frozen model for inference, in place.

        With bf16/fp16, conv and linear weights are cast once here: autocast would otherwise
        cast every weight again at every call (frozen weights are not in its cast cache). The
        values are the same ones autocast would use. Norm parameters stay float32. A
        backbone's fingerprint is taken before the cast, so it still names the fp32 weights.
        """
        fingerprint = getattr(module, "fingerprint", None)
        if callable(fingerprint):
            fingerprint()
        cast_to = getattr(module, "_diffprobe_weights_cast_to", None)
        if cast_to is not None and cast_to != self.precision:
            raise DiffprobeError(
                f"this model's weights were already cast to {cast_to} for extraction; load it again to run it in {self.precision}"
            )
        module = module.to(self.device)
        if self.precision != "fp32":
            module._diffprobe_weights_cast_to = self.precision
            for m in module.modules():
                if isinstance(m, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Linear)):
                    m.to(self.dtype)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        if self.compile and hasattr(module, "compile"):
            module.compile()
        return module

    def batch(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def describe(self) -> str:
        return f"{self.device.type} {self.precision}" + " channels_last" * self.channels_last + " compiled" * self.compile


def cpu_has_fast_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def choose_compute(device: str = "auto", precision: str = "auto", channels_last: str | bool = "auto",
                   compile: str | bool = "auto") -> Compute:  # fmt: skip
    """Resolve 'auto' settings for this machine; explicit ones are checked and kept."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DiffprobeError("--device cuda asked for, but no CUDA GPU is visible: use --device cpu")
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
        # Measured (benchmarks/extract.py): on CPU bf16 channels_last is ~1.2× faster; on an H100,
        # eager channels_last was slower (230 vs 331 img/s at 256×256).
        channels_last = dev.type == "cpu" and precision == "bf16"
    if compile == "auto":
        # torch.compile fuses the memory-bound norm/pointwise ops on GPUs; on CPU it gained nothing
        # (73-83 vs 84-87 img/s eager) and costs a minute of compilation.
        compile = dev.type == "cuda"
    return Compute(dev, precision, bool(channels_last), bool(compile))

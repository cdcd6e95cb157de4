"""What the benchmarks run on this machine: the compute diffprobe chooses, what they skip and why.

Every benchmark takes the same three flags (`make bench BENCH_ARGS=...` passes them to all):

    --precision auto|fp32|bf16   diffprobe's precision (auto: `choose_compute()`, what diffprobe runs here)
    --bf16-variants              also time bf16 variants on a CPU without native bf16 (slow there)
    --as-no-fast-bf16            behave as on a CPU without native bf16 (AVX2-only): runs that path here

bf16 variants are timed only where bf16 is fast: CPUs with native bf16 (AVX512-BF16 or AMX,
`cpu_has_fast_bf16()`) and GPUs. On AVX2-only CPUs PyTorch emulates bf16, measured ~40× slower
than fp32: timing it there took the benchmarks past 10 minutes and taught nothing, since
diffprobe never runs it there.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import torch

from diffprobe import precision as dp_precision
from diffprobe.precision import Compute, choose_compute

BF16_SLOWDOWN_NOTE = "measured ~40x slower than fp32 there"


def add_machine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("machine (the same for every benchmark)")
    g.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="diffprobe's precision (default auto: what diffprobe runs on this machine, choose_compute)")  # fmt: skip
    g.add_argument("--bf16-variants", action="store_true",
                   help="also time bf16 variants on a CPU without native bf16 (skipped by default: emulated, slow)")  # fmt: skip
    g.add_argument("--as-no-fast-bf16", action="store_true",
                   help="behave as on a CPU without native bf16 (AVX2-only): diffprobe's choice and the skips of that path")  # fmt: skip
    g.add_argument("--budget", type=float, default=None,
                   help="seconds (from the start) after which the timed repeats stop early; one always runs (default: the benchmark's)")


@dataclass(frozen=True)
class Machine:
    device: torch.device
    compute: Compute  # what diffprobe runs here (choose_compute, or --precision)
    fast_bf16: bool  # native bf16 (False under --as-no-fast-bf16)
    simulated: bool  # --as-no-fast-bf16
    low_precisions: tuple[str, ...]  # the reduced precisions timed besides fp32
    skipped: str | None  # what was left out and why, or None

    def header(self) -> str:
        if self.device.type == "cuda":
            where = f"{torch.cuda.get_device_name(self.device)}, bf16 {'yes' if self.fast_bf16 else 'no'}"
        else:
            where = (f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16 "
                     f"{'yes' if self.fast_bf16 else 'no'}{' (simulated: --as-no-fast-bf16)' if self.simulated else ''}, "
                     f"{torch.get_num_threads()} threads")  # fmt: skip
        return f"machine: {where}; torch {torch.__version__}; chosen compute: {self.compute.describe()}"

    def precisions(self) -> list[str]:
        """fp32 (the reference's) and the reduced precisions worth timing here."""
        return ["fp32", *self.low_precisions]


def bf16_plan(device_type: str, fast_bf16: bool, force: bool, capability: str, simulated: bool = False) -> tuple[bool, str | None]:
    """Whether to time bf16 variants, and the line that says why not (None when they are timed)."""
    if device_type != "cpu" or fast_bf16 or force:
        return True, None
    why = "simulated with --as-no-fast-bf16" if simulated else f"CPU capability {capability}"
    return False, (f"skipped bf16 variants: this CPU has no native bf16 ({why}): {BF16_SLOWDOWN_NOTE}, "
                   "and diffprobe runs fp32 here (--bf16-variants to time them anyway)")  # fmt: skip


def resolve(args: argparse.Namespace, device: str | torch.device = "cpu") -> Machine:
    dev = torch.device(device)
    simulated = bool(args.as_no_fast_bf16) and dev.type == "cpu"
    if dev.type == "cuda":
        fast = torch.cuda.is_bf16_supported()
    else:
        fast = dp_precision.cpu_has_fast_bf16() and not simulated  # the test that choose_compute makes
    precision = args.precision
    if precision == "auto" and simulated:
        precision = "fp32"  # what choose_compute picks on a CPU without native bf16
    compute = choose_compute(dev, precision)
    timed_bf16, skipped = bf16_plan(dev.type, fast, args.bf16_variants or compute.precision == "bf16",
                                    torch.backends.cpu.get_cpu_capability(), simulated)  # fmt: skip
    if dev.type == "cuda":
        low = ("bf16",) if fast else ("fp16",)
    else:
        low = ("bf16",) if timed_bf16 else ()
    return Machine(dev, compute, fast, simulated, low, skipped)


def announce(args: argparse.Namespace, device: str | torch.device = "cpu") -> Machine:
    """`resolve`, then print the machine line and what is skipped (if anything)."""
    machine = resolve(args, device)
    print(machine.header())
    if machine.skipped:
        print(machine.skipped)
    return machine


def paper_adm_options(size: int, channels: int) -> dict:
    """load_backbone options of the paper model's shape (256x256_diffusion_uncond) scaled down: the
    same levels, attention at the same downsampling factors (8, 16, 32; at least 1 px), heads of 64
    channels, at `size` px and `channels` base channels (with "adm:random")."""
    return {"preset": "256x256_diffusion_uncond", "image_size": size, "num_channels": channels, "channel_mult": "1,1,2,2,4,4",
            "attention_resolutions": ",".join(str(max(1, size // ds)) for ds in (8, 16, 32))}


class Budget:
    """Wall-clock budget, counted from its creation: at least one timed repeat, then stop once it is spent."""

    def __init__(self, seconds: float | None):
        self.seconds, self.start = seconds, time.perf_counter()

    def spent(self) -> bool:
        return self.seconds is not None and time.perf_counter() - self.start >= self.seconds

    def repeats(self, wanted: int):
        """Yields repeat indices; stops early (with a printed line) once the budget is spent."""
        for i in range(wanted):
            if i and self.spent():
                print(f"  (stopped after {i} of {wanted} repeats: the {self.seconds:.0f} s budget is spent)")
                return
            yield i


if __name__ == "__main__":  # `python benchmarks/machine.py [--as-no-fast-bf16]`: the machine line alone
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    add_machine_args(p)
    args = p.parse_args()
    announce(args, args.device)

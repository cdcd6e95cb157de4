"""Training speed of `diffprobe pretrain`: its default settings against a plain fp32 reference, same run.

Each variant is diffprobe's own Trainer (the same loss, optimiser, clipping and EMA step) on random
uint8 images of the model's size; only precision and memory format change. The reference is fp32
with contiguous tensors, what a plain PyTorch training loop does. Variants: each precision timed
here (fp32; bf16 only where it is fast, see benchmarks/machine.py) with and without channels_last.
Prints img/s and the ratio; on a CPU without native bf16 diffprobe trains in fp32, so its default
is the reference (1.00×).

    python benchmarks/pretrain.py                          # CPU: the default CIFAR model, 64 channels (make bench)
    python benchmarks/pretrain.py --batch 64 --steps 6 --budget 600      # the README's earlier figures
    python benchmarks/pretrain.py --device cuda --channels 128 --batch 128
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from diffprobe.generate.pretrain import DEFAULT_PRETRAIN_FLAGS
from diffprobe.generate.pretrain import PretrainConfig, Trainer
from machine import Budget, Machine, add_machine_args, announce

REFERENCE = "reference: fp32, contiguous"


def step_time(trainer: Trainer, step: int, device: torch.device) -> float:
    start = time.perf_counter()
    trainer.step(step)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def variants(machine: Machine) -> tuple[list[tuple[str, str, bool]], str]:
    """(name, precision, channels_last) of the Trainer set-ups timed here, and the name of the default.

    The default is what `diffprobe pretrain` runs here: bf16 autocast where bf16 is fast, else fp32
    (fp16 needs loss scaling, so GPUs without bf16 train in fp32); channels_last is opt-in.
    """
    default_precision = machine.compute.precision if machine.compute.precision in ("fp32", "bf16") else "fp32"
    out = [(REFERENCE, "fp32", False)]
    for precision in machine.precisions():
        if precision not in ("fp32", "bf16"):
            continue
        if precision != "fp32":
            out.append((f"{precision} autocast", precision, False))
        out.append((f"{precision}" + " autocast" * (precision != "fp32") + " + channels_last", precision, True))
    default = next(name for name, precision, cl in out if precision == default_precision and not cl)
    return out, default


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    parser.add_argument("--device", default="cpu")
    add_machine_args(parser)
    parser.set_defaults(budget=60)
    args = parser.parse_args()
    budget = Budget(args.budget)
    machine = announce(args, args.device)
    device = machine.device
    flags = {**DEFAULT_PRETRAIN_FLAGS, "num_channels": args.channels}
    images = torch.randint(0, 256, (args.batch * 4, 3, 32, 32), dtype=torch.uint8)
    timed, default = variants(machine)
    trainers = {}
    times: dict[str, list[float]] = {name: [] for name, _, _ in timed}
    with tempfile.TemporaryDirectory() as tmp:
        for name, precision, channels_last in timed:
            config = PretrainConfig(flags=flags, batch_size=args.batch)
            trainers[name] = Trainer(config, images, tmp, str(device), precision, channels_last)
            step_time(trainers[name], 0, device)  # warms up allocators and kernels
        for step in budget.repeats(args.steps):  # interleaved, so drifting load hits all alike
            for name, _, _ in timed:
                times[name].append(step_time(trainers[name], step + 1, device))
    params = sum(p.numel() for p in trainers[REFERENCE].model.parameters())
    print(f"pretrain step, {args.channels} channels ({params / 1e6:.2f}M params), batch {args.batch}, "
          f"median of {len(times[REFERENCE])} timed steps")  # fmt: skip
    rates = {name: args.batch / statistics.median(t) for name, t in times.items()}
    ref = rates[REFERENCE]
    for name, rate in rates.items():
        mark = "  <- default" if name == default else ""
        print(f"  {name:<32} {rate:7.1f} img/s   {rate / ref:5.2f}× reference{mark}")
    label = "fp32, contiguous: the reference's set-up" if default == REFERENCE else default
    print(f"ratio: training step, diffprobe default ({label}) vs reference: {rates[default] / ref:.2f}×")


if __name__ == "__main__":
    main()

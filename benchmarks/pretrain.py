"""Training speed of `diffprobe pretrain`: its default settings against a plain fp32 reference, same run.

Each variant is diffprobe's own Trainer (the same loss, optimiser, clipping and EMA step) on random
uint8 images of the model's size; only precision and memory format change. The reference is fp32
with contiguous tensors, what a plain PyTorch training loop does. Prints img/s and the ratio.

    python benchmarks/pretrain.py                          # CPU: the default CIFAR model, 64 channels
    python benchmarks/pretrain.py --channels 32 --batch 64
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


def steps_per_second(trainer: Trainer, steps: int, device: torch.device) -> float:
    times = []
    for step in range(steps + 1):  # the first step warms up allocators and kernels
        start = time.perf_counter()
        loss = trainer.loss(step)
        trainer.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainer.model.parameters(), 1.0)
        trainer.optimizer.step()
        trainer.ema.update_parameters(trainer.model)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if step:
            times.append(time.perf_counter() - start)
    return 1.0 / statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    flags = {**DEFAULT_PRETRAIN_FLAGS, "num_channels": args.channels}
    images = torch.randint(0, 256, (args.batch * 4, 3, 32, 32), dtype=torch.uint8)
    variants = [("reference: fp32, contiguous", "fp32", False), ("bf16 autocast (default)", "bf16", False),
                ("bf16 autocast + channels_last", "bf16", True)]  # fmt: skip
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, precision, channels_last in variants:
            config = PretrainConfig(flags=flags, batch_size=args.batch)
            trainer = Trainer(config, images, tmp, str(device), precision, channels_last)
            results[name] = args.batch * steps_per_second(trainer, args.steps, device)
    params = sum(p.numel() for p in trainer.model.parameters())
    print(f"pretrain step, {args.channels} channels ({params / 1e6:.2f}M params), batch {args.batch}, {device}, "
          f"{torch.get_num_threads()} threads")  # fmt: skip
    ref = results[variants[0][0]]
    for name, rate in results.items():
        print(f"  {name:<32} {rate:7.1f} img/s   {rate / ref:5.2f}× reference")


if __name__ == "__main__":
    main()

"""`make bench`: the five benchmarks, each diffprobe's path against a plain reference in the same run.

Prints the machine (CPU capability, native bf16, the compute diffprobe chooses) and what is
skipped on it, runs extract, pretrain, online, latent and pipeline one after another (one process each,
never two at once), then the ratios they printed and the wall time of each and of all. Flags
after the script name go to every benchmark (benchmarks/machine.py):

    python benchmarks/all.py                        # ≈ 2 minutes on a 2-core AVX512-BF16 CPU
    python benchmarks/all.py --as-no-fast-bf16      # the AVX2-only path (fp32), run here
    make bench BENCH_ARGS=--bf16-variants           # time bf16 variants even where bf16 is emulated
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from machine import add_machine_args, resolve

HERE = Path(__file__).resolve().parent
BENCHMARKS = ("extract", "pretrain", "online", "latent", "pipeline")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_machine_args(parser)
    args = parser.parse_args()
    passed = sys.argv[1:]  # only machine flags: every benchmark takes them
    start = time.perf_counter()
    machine = resolve(args)
    print(machine.header(), flush=True)
    print(machine.skipped or "bf16 variants timed: bf16 is fast here", flush=True)
    ratios: list[str] = []
    walls: dict[str, float] = {}
    failed = []
    for name in BENCHMARKS:
        print(f"\n=== benchmarks/{name}.py {' '.join(passed)}".rstrip(), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, str(HERE / f"{name}.py"), *passed], stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1)  # fmt: skip
        for line in proc.stdout:
            print(line, end="", flush=True)
            if line.startswith("ratio: "):
                ratios.append(f"{name:<9} {line[len('ratio: '):].rstrip()}")
        if proc.wait():
            failed.append(name)
        walls[name] = time.perf_counter() - t0
        print(f"({name}: {walls[name]:.0f} s)", flush=True)
    print("\nratios (diffprobe's path / the plain reference, same run):")
    for line in ratios:
        print(f"  {line}")
    print("wall time: " + ", ".join(f"{n} {s:.0f} s" for n, s in walls.items()) +
          f"; total {time.perf_counter() - start:.0f} s ({(time.perf_counter() - start) / 60:.1f} min)")  # fmt: skip
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

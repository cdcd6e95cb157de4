"""A head's peak memory against its store's size: stores 1× and 4× the memory budget, streamed.

Two synthetic stores (random float16 features with a class signal, chunked as extraction writes
them) are probed with a linear head in fresh processes. With $DIFFPROBE_MEMORY_BUDGET set below the
store's size, head training reads rows from the memory map batch by batch (probing/rows.py); the
reference is the same probe with the budget above the store (everything loaded as float32).
Peak = VmHWM of the probing process (the store's pages in the OS page cache are not the process's).

    python benchmarks/probe_memory.py                       # budget 64 MiB; stores of 64 and 256 MiB
    python benchmarks/probe_memory.py --budget-mib 256      # stores of 256 MiB and 1 GiB
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def make_store(root: Path, rows: int, width: int, classes: int = 10) -> None:
    from diffprobe.features.store import FeatureKey, FeatureStore

    rng = np.random.default_rng(0)
    labels = np.arange(rows) % classes
    chunk = 4096
    names = [f"class{c}" for c in range(classes)]
    manifest = {"chunk_rows": chunk, "rows": {"count": rows}, "dtype": "float16",
                "data": {"fingerprint": f"synthetic-{rows}", "classes": names}, "backbone": {"fingerprint": "synthetic", "source": "synthetic"},
                "noise": {"seed": 0, "draws": 1}, "transform": {}, "precision": "fp32"}  # fmt: skip
    store = FeatureStore.create_or_open(root, manifest, labels, np.arange(rows))
    key = FeatureKey(0, 1, 1)
    store.ensure_array(key, width)
    centres = rng.normal(size=(classes, width)).astype(np.float32)
    for c, start in enumerate(range(0, rows, chunk)):
        part = labels[start:start + chunk]
        values = centres[part] * 0.3 + rng.normal(size=(len(part), width)).astype(np.float32)
        store.write_chunk(key, c, values.astype(np.float16))


def child(store: str, budget: str) -> None:
    os.environ["DIFFPROBE_MEMORY_BUDGET"] = budget
    from diffprobe.cli import main

    with tempfile.TemporaryDirectory() as out:
        code = main(["--quiet", "probe", store, "--t", "0", "--blocks", "1", "--pool", "1", "--epochs", "2", "--wd", "0",
                     "--out", str(Path(out) / "run")])  # fmt: skip
        metrics = json.loads((Path(out) / "run" / "metrics.json").read_text()) if code == 0 else {}
    status = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in Path("/proc/self/status").read_text().splitlines()
              if line.startswith(("RssAnon:", "RssFile:"))}  # fmt: skip
    print(json.dumps({"peak_bytes": peak_rss(), "code": code, "select_top1": metrics.get("select", {}).get("top1"), **status}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget-mib", type=int, default=64)
    parser.add_argument("--width", type=int, default=1024, help="features per row (float16 on disk)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child)
    budget = args.budget_mib * 2**20
    with tempfile.TemporaryDirectory() as tmp:
        results = {}
        for times in (1, 4):
            rows = times * budget // (4 * args.width)  # the store as float32 (what a head would load) is `times` × the budget
            root = Path(tmp) / f"store{times}"
            make_store(root, rows, args.width)
            for mode, limit in (("streamed", f"{args.budget_mib // 2}M"), ("in memory", "1T")):
                out = subprocess.run([sys.executable, __file__, "--child", str(root), limit], capture_output=True, text=True, check=True)
                results[(times, mode)] = json.loads(out.stdout.strip().splitlines()[-1]) | {"rows": rows}
        print(f"linear head, 2 epochs, {args.width} float16 features a row; budget for streaming {args.budget_mib // 2} MiB")
        for (times, mode), r in results.items():
            size = r["rows"] * args.width * 4 / 2**20
            print(f"  store {size:6.0f} MiB as float32 ({r['rows']:6d} rows), {mode:9s}: peak RSS {r['peak_bytes'] / 2**20:6.0f} MiB "
                  f"(at the end: anonymous {r.get('RssAnon', 0) / 2**20:.0f} MiB, mapped file pages {r.get('RssFile', 0) / 2**20:.0f} MiB), "
                  f"selection top-1 {r['select_top1']:.1f}%")  # fmt: skip
        small, large = results[(1, "streamed")]["peak_bytes"], results[(4, "streamed")]["peak_bytes"]
        loaded_small, loaded_large = results[(1, "in memory")]["peak_bytes"], results[(4, "in memory")]["peak_bytes"]
        print(f"ratio: streamed peak, 4× store vs 1× store: {large / small:.2f}× (in memory: {loaded_large / loaded_small:.2f}×)")


if __name__ == "__main__":
    main()

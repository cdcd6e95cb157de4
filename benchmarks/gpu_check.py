"""The GPU acceptance check: one command, one JSON, one short summary, for a short GPU window.

    python benchmarks/gpu_check.py --device cuda --out gpu_check/       # a GPU: under 8 minutes
    python benchmarks/gpu_check.py --device cpu --tiny --out /tmp/gc    # the same code paths on a CPU in a minute (a test runs it)

Sections (each recorded, pass or fail, so one failure does not cost the rest of the window):
  parity      every family's tiny model (ADM fixture, UNet2DModel, SD, SDXL, DiT, PixArt, SD3, FLUX,
              timm, transformers): on the device in fp32 (TF32 off, restored after) against the CPU's
              fp32 features (max error relative to the largest value), bf16 / fp16 by cosine, and
              where one pass would make the host wait;
  throughput  random weights at real sizes (--tiny: small ones), diffprobe's path against the plain
              path (full fp32 forward + hook) in the same run, with the cosine between them: the
              paper's ADM-256 to block 24 (img/s and share of the bf16 matmul peak), an SD-2.1-shaped
              U-Net to up_blocks.1 at 512 px, a DiT-XL/2-shaped transformer to block 14 at 256 px, an
              online attention-head step and a pretrain step of the shipped checkpoint's architecture;
              on a GPU also ADM-256 at the pass size extraction fits to its memory; and `extract` end to
              end over image files, overlapped (ε in the loader, a writer thread) against in turn;
  torchrun    2 processes on one device (NCCL refuses two ranks on one GPU, so gloo carries the
              collectives there): the store is byte-identical to one process's, the DDP linear head
              within ±0.5 points of one process's;
  compiled    (GPU, not --tiny) every family's walk torch.compile'd against eager, both bf16: last,
              since each compiles for about a minute;
  memory      peak device memory of each throughput case (diffprobe's path and the plain one apart,
              each above what was allocated when it started);
  compile     (--compile-modes) the ADM case in each torch.compile mode asked for: which one pays here.
Writes OUT/gpu_check.json and OUT/gpu_check.txt after every check (a window cut short keeps what
ran; "complete" says whether the run ended); checks not started within --budget seconds are
recorded as skipped, and so are the fixture's checks where ../shared is not beside the checkout
(a GPU machine: set DIFFPROBE_SHARED, or run benchmarks/gpu_prepare.sh first and carry .gpu). Exits 1 when a check failed, 3 when none failed but some were skipped.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny pipeline builders the tests use
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT))

from diffprobe import load_backbone  # noqa: E402
from diffprobe.features.featurize import pool_features  # noqa: E402
from diffprobe.features.noise import image_noise  # noqa: E402
from diffprobe.precision import Compute  # noqa: E402
from host_sync import audit_featurize, walk_plan  # noqa: E402
from extract import sync  # noqa: E402
from machine import paper_adm_options  # noqa: E402
from tiny_families import FIXTURE, family_specs  # noqa: E402



_ALLOCATED_AT_RESET: dict = {}


def peak_memory(device: torch.device) -> float | None:
    """Peak memory (MiB) since the last reset_peak: on GPUs what the allocator held above what was
    allocated at the reset (the case's own, not what earlier cases left); the process's VmHWM on CPUs."""
    if device.type == "cuda":
        return round((torch.cuda.max_memory_allocated(device) - _ALLOCATED_AT_RESET.get(device, 0)) / 2**20, 1)
    try:
        line = next(line for line in Path("/proc/self/status").read_text().splitlines() if line.startswith("VmHWM"))
        return round(int(line.split()[1]) / 1024, 1)
    except (OSError, StopIteration):
        return None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        _ALLOCATED_AT_RESET[device] = torch.cuda.memory_allocated(device)


def settle(device: torch.device) -> None:
    """Between checks: what earlier cases left goes (a prepared copy and its original refer to
    each other, so only a collection frees them; the allocator's cache would shrink the free memory
    the fitted batch sees), and torch.compile starts clean (its recompile limit counts per code object,
    and ADM's walk is compiled again by many cases: past the limit it would silently run eagerly)."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class Report:
    """Results by section, a summary line per result, and whether anything failed. The files are
    rewritten after every result, so a window that ends early (a command's time limit) still
    leaves what was measured; a check not started before the budget ends is recorded as skipped."""

    def __init__(self, out: Path, header: dict, budget: float | None = None, device: torch.device | None = None):
        self.out, self.header, self.results, self.lines, self.failed, self.skipped = out, header, {}, [], [], []
        self.deadline = time.perf_counter() + budget if budget else None
        self.device = device

    def skip(self, section: str, name: str, why: str) -> None:
        self.skipped.append(f"{section}/{name}")
        self.lines.append(f"[skipped] {section}/{name}: {why}")
        print(self.lines[-1], flush=True)
        self.write(complete=False)

    def record(self, section: str, name: str, fn) -> None:
        start = time.perf_counter()
        if self.deadline is not None and start > self.deadline:
            return self.skip(section, name, "past the --budget")
        if self.device is not None:
            settle(self.device)
        try:
            result = fn()
            result["seconds"] = round(time.perf_counter() - start, 1)
            ok = result.pop("ok", True)
        except Exception as e:  # one broken family or setting is a finding, not the end of the window
            result, ok = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc(limit=4)}, False
        result["passed"] = ok
        self.results.setdefault(section, {})[name] = result
        shown = ", ".join(f"{k} {v}" for k, v in result.items() if k not in ("trace", "passed") and not isinstance(v, (dict, list)))
        self.lines.append(f"[{'ok' if ok else 'FAIL'}] {section}/{name}: {shown}")
        print(self.lines[-1], flush=True)
        if not ok:
            self.failed.append(f"{section}/{name}")
        self.write(complete=False)

    def write(self, complete: bool = True) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        header = {**self.header, "complete": complete}
        (self.out / "gpu_check.json").write_text(json.dumps({**header, "results": self.results, "failed": self.failed,
                                                             "skipped": self.skipped}, indent=1))  # fmt: skip
        text = [f"{k}: {v}" for k, v in header.items()] + self.lines + [f"failed: {', '.join(self.failed) or 'none'}"]
        (self.out / "gpu_check.txt").write_text("\n".join(text) + "\n")


# ---------------------------------------------------------------------------------------- parity
def features(bb, x_t: torch.Tensor, t: int, compute: Compute | None = None) -> dict:
    runner = compute.prepare(bb) if compute else bb
    with torch.inference_mode(), (compute.autocast() if compute else torch.autocast("cpu", enabled=False)):
        x = compute.batch(x_t.to(compute.device)) if compute else x_t
        out = runner.forward_features(x, t, "all")
    return {b: v.float().cpu() for b, v in out.items()}


def check_timestep(bb) -> int:
    """The t the parity checks read at: a mid-noise step of the model's schedule (0 for an image encoder)."""
    return 0 if not bb.generative else (300 if bb.schedule.parameterization == "flow" else 100)


def parity(spec: str, options: dict, device: torch.device, tiny: bool) -> dict:
    cpu_bb = load_backbone(spec, **options)
    t = check_timestep(cpu_bb)
    images = torch.rand(2, 3, cpu_bb.image_size, cpu_bb.image_size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.inference_mode():
        x0 = cpu_bb.encode(images)
    noise = image_noise(range(2), 0, tuple(x0.shape[1:]))
    x_t = cpu_bb.schedule.q_sample(x0, t, noise)
    reference = features(cpu_bb, x_t, t)
    scale = max(v.abs().max().item() for v in reference.values()) or 1.0
    dev_bb = load_backbone(spec, device=str(device), **options)
    with tf32_off():
        fp32 = features(dev_bb, x_t.to(device), t, Compute(device, "fp32", False))
    error = max((fp32[b] - reference[b]).abs().max().item() for b in reference) / scale
    result = {"blocks": len(reference), "fp32_max_rel_error": float(f"{error:.3g}")}
    low = ("bf16", "fp16") if device.type == "cuda" else ("bf16",)
    for precision in low:
        got = features(dev_bb, x_t.to(device), t, Compute(device, precision, True))
        result[f"{precision}_min_cosine"] = round(min(F.cosine_similarity(got[b].flatten(), reference[b].flatten(), dim=0).item()
                                                      for b in reference), 5)  # fmt: skip
    result.update(host_waits(cpu_bb, dev_bb, device))
    cosines = [v for k, v in result.items() if k.endswith("min_cosine")]
    result["ok"] = (error < (1e-4 if device.type == "cuda" else 1e-6) and all(c > 0.99 for c in cosines) and not result["host_waits"]
                    and result.get("cuda_sync_debug", "none") == "none")  # fmt: skip
    return result


@contextlib.contextmanager
def tf32_off():
    """fp32 parity without TF32, restored after: the throughput cases' plain path runs as PyTorch's defaults leave it."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def compiled_parity(spec: str, options: dict, device: torch.device) -> dict:
    """torch.compile'd walk against the eager one, both bf16 on the device: a GPU section of its
    own, after throughput, since each family compiles for about a minute."""
    bb = load_backbone(spec, device=str(device), **options)
    t = check_timestep(bb)
    x_t = torch.randn(2, *bb.model_shape, generator=torch.Generator().manual_seed(0)).to(device)
    eager = features(bb, x_t, t, Compute(device, "bf16", True))
    compiled = features(bb, x_t, t, Compute(device, "bf16", True, compile=True))
    cosine = min(F.cosine_similarity(compiled[b].flatten(), eager[b].flatten(), dim=0).item() for b in eager)
    return {"blocks": len(eager), "compiled_vs_eager_min_cosine": round(cosine, 5), "ok": cosine > 0.99}


def host_waits(cpu_bb, dev_bb, device: torch.device) -> dict:
    """Where one featurize pass would make the host wait for the device: every host read and
    host-made tensor copied up, found on the meta device (tests/host_sync.py); on a GPU also
    PyTorch's own sync debug mode over a pass whose batch and noise are already on the device."""
    from diffprobe.features.featurize import featurize

    plan = walk_plan(cpu_bb)
    sites = audit_featurize(cpu_bb, plan)
    result: dict = {"host_waits": len(sites), **({"host_wait_sites": "; ".join(sites[:3])} if sites else {})}
    if device.type == "cuda":
        compute = Compute(device, "bf16", True)
        x0 = torch.zeros(2, *dev_bb.model_shape, device=device)
        noise = torch.zeros(2, plan.draws, *dev_bb.model_shape, device=device) if dev_bb.schedule.noisy else None
        with torch.inference_mode():
            featurize(dev_bb, x0, plan, [0, 1], compute=compute, encoded=True, noise=noise)  # set-up and lazy reads first
            torch.cuda.synchronize(device)
            torch.cuda.set_sync_debug_mode("error")
            try:
                featurize(dev_bb, x0, plan, [0, 1], compute=compute, encoded=True, noise=noise)
                result["cuda_sync_debug"] = "none"
            except RuntimeError as e:
                result["cuda_sync_debug"] = str(e).splitlines()[0][:200]
            finally:
                torch.cuda.set_sync_debug_mode("default")
    return result


# -------------------------------------------------------------------------------------- torchrun
def torchrun_check(device: torch.device, tiny: bool, tmp: Path) -> dict:
    """2 processes on one device against one process: the store's bytes, a DDP linear head's top-1."""
    from PIL import Image

    data = tmp / "images"
    gen = torch.Generator().manual_seed(0)
    for c in range(4):
        (data / f"class{c}").mkdir(parents=True, exist_ok=True)
        for i in range(16 if tiny else 64):
            pixels = (torch.rand(16, 16, 3, generator=gen) * 255 * (c + 1) / 4).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(data / f"class{c}" / f"{i}.png")
    backend = "gloo"  # CPUs; and on one GPU, where NCCL refuses two ranks on the same device (what `auto` picks there too)
    # Chunks of 16 so both ranks get some (a GPU's fitted batch would hold every image in one chunk), and
    # eager: both runs must compute alike, and two ranks compiling at once would outlast the timeout.
    common = ["extract", f"adm:{FIXTURE}", "--data", str(data), "--blocks", "2,4", "--t", "10", "--device", str(device.type),
              "--batch-size", "16", "--compile", "off"]  # fmt: skip
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # and carried packages (gpu_check.sh)
    env = {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}

    def run(argv: list[str], ranks: int) -> None:
        import socket

        with socket.socket() as s:  # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(ranks), "--master-addr", "127.0.0.1",
                    "--master-port", str(port)] if ranks > 1 else [sys.executable]  # fmt: skip
        cmd = launcher + ["-m", "diffprobe", "-q", *argv] + (["--dist-backend", backend] if ranks > 1 and argv[0] == "extract" else [])
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        if done.returncode:
            error = [line for line in done.stderr.strip().splitlines() if "error" in line.lower()] or done.stderr.strip().splitlines()
            raise RuntimeError(f"{' '.join(argv[:2])} on {ranks} process(es): {error[-1] if error else done.returncode}")

    run([*common, "--out", str(tmp / "one")], 1)
    run([*common, "--out", str(tmp / "two")], 2)
    files = sorted(p.name for p in (tmp / "one" / "features").glob("*.npy"))
    same = all((tmp / "one" / "features" / f).read_bytes() == (tmp / "two" / "features" / f).read_bytes() for f in files)
    probe = ["probe", None, "--t", "10", "--blocks", "4", "--head", "linear", "--recipe", "paper", "--epochs", "3",
             "--device", str(device.type), "--report-share", "0.5", "--val-fraction", "0.5"]  # fmt: skip
    top1 = {}
    for name, ranks in (("one", 1), ("two", 2)):
        argv = list(probe)
        argv[1] = str(tmp / "one")
        run([*argv, "--out", str(tmp / f"head-{name}")], ranks)
        top1[name] = json.loads((tmp / f"head-{name}" / "metrics.json").read_text())["report"]["top1"]
    gap = abs(top1["one"] - top1["two"])
    return {"backend": backend, "store_arrays": len(files), "store_byte_identical": same, "ddp_linear_top1": top1["two"],
            "one_process_top1": top1["one"], "ok": same and bool(files) and gap <= 0.5}  # fmt: skip


# ------------------------------------------------------------------------------------ throughput
def timed_pair(plain, fast, device: torch.device, repeats: int) -> tuple[float, float]:
    plain(), fast()  # warm-up: allocators, kernels, the set-up copy, compilation
    best = [float("inf"), float("inf")]
    for _ in range(repeats):  # interleaved, so both see the same load
        for i, fn in enumerate((plain, fast)):
            sync(device)
            start = time.perf_counter()
            fn()
            sync(device)
            best[i] = min(best[i], time.perf_counter() - start)
    return best[0], best[1]


def hooked_forward(bb, module_name: str, x_t: torch.Tensor, t: int) -> torch.Tensor:
    """The plain path: the model's whole forward in fp32, the block caught with a hook."""
    caught = {}
    handle = bb.model.get_submodule(module_name).register_forward_hook(
        lambda m, i, o: caught.__setitem__("h", o[0] if isinstance(o, tuple) else o))
    try:
        with torch.inference_mode():
            bb.denoise(x_t, torch.full((len(x_t),), t, device=x_t.device))
    finally:
        handle.remove()
    return caught["h"]


def extraction_case(spec: str, options: dict, block: int, batch: int, device: torch.device, compute: Compute, repeats: int,
                    tokens_side: int | None = None, peak: float | None = None, module: str | None = None) -> dict:  # fmt: skip
    """diffprobe's early-exit pass in the fast compute against the whole fp32 forward + hook, same weights, same batch."""
    bb = load_backbone(spec, device=str(device), **options)
    bb.require_whole("the plain path")
    t = 90
    x_t = torch.randn(batch, *bb.model_shape, device=device, generator=torch.Generator(device).manual_seed(0))
    name = module or bb.blocks[block - 1].name
    runner = compute.prepare(bb)
    out = {}

    def plain():
        out["plain"] = hooked_forward(bb, name, x_t, t)

    def fast():
        with torch.inference_mode(), compute.autocast():
            out["fast"] = runner.forward_features(compute.batch(x_t), t, [block])[block]

    slow, quick = timed_pair(plain, fast, device, repeats)
    peaks = {}
    for name_, fn in (("plain", plain), ("diffprobe", fast)):  # each path's own peak, after the timing (warm)
        reset_peak(device)
        fn()
        sync(device)
        peaks[name_] = peak_memory(device)
    a = out["plain"] if out["plain"].ndim == 4 else out["plain"].transpose(1, 2).reshape(batch, -1, tokens_side, tokens_side)
    cosine = F.cosine_similarity(pool_features(a, 1), pool_features(out["fast"], 1), dim=1).min().item()
    result = {"block": f"{block} ({name})", "batch": batch, "plain_img_s": round(batch / slow, 1), "diffprobe_img_s": round(batch / quick, 1),
              "ratio": round(slow / quick, 2), "min_cosine": round(cosine, 5), "compute": compute.describe(), "peak_mib": peaks["diffprobe"],
              "plain_peak_mib": peaks["plain"]}  # fmt: skip
    if peak:
        from extract import model_flops

        flops = model_flops(runner, compute.batch(x_t[:1]), t, block)
        result["share_of_bf16_peak"] = round(flops * batch / quick / peak, 3)
    result["ok"] = cosine > 0.99
    return result


def fitted_batch_case(adm: tuple, device: torch.device, compute: Compute, repeats: int, peak: float | None) -> dict:
    """The pass size extraction picks by default on this GPU (features/batching.py), timed like the batch-64 case."""
    from diffprobe.features.batching import default_batch_size
    from diffprobe.features.plan import FeaturePlan

    bb = load_backbone(adm[0], device=str(device), **adm[1])
    batch = default_batch_size(bb, FeaturePlan(t=90, blocks=adm[2]), compute)
    runner = compute.prepare(bb)
    x_t = torch.randn(batch, *bb.model_shape, device=device)
    reset_peak(device)

    def fast():  # diffprobe's path only: the plain fp32 forward would not fit at this batch
        with torch.inference_mode(), compute.autocast():
            runner.forward_features(compute.batch(x_t), 90, [adm[2]])

    _, quick = timed_pair(fast, fast, device, repeats)
    result = {"fitted_batch": batch, "diffprobe_img_s": round(batch / quick, 1), "compute": compute.describe(), "peak_mib": peak_memory(device)}
    if peak:
        from extract import model_flops

        result["share_of_bf16_peak"] = round(model_flops(runner, compute.batch(x_t[:1]), 90, adm[2]) * batch / quick / peak, 3)
    return result


def end_to_end(device: torch.device, compute: Compute, tiny: bool, tmp: Path) -> dict:
    """`extract` over image files, overlapped (ε in the loader, chunks written by a thread) against in turn:
    img/s of each and whether the stores hold the same bytes (benchmarks/pipeline.py, at GPU sizes)."""
    from pipeline import image_folder, time_both_paths

    from diffprobe.features.plan import FeaturePlan

    size, channels, images = (32, 32, 32) if tiny else (256, 256, 1024)
    compute = Compute(compute.device, compute.precision, compute.channels_last)  # eager: the host side is measured, not a compilation
    bb = load_backbone("adm:random", device=str(device), **paper_adm_options(size, channels))
    data = image_folder(tmp / "images", images, size)
    plan = FeaturePlan(t=90, blocks=[4, 12, min(24, bb.num_blocks)], pools=[1, 2])
    seconds, same, _ = time_both_paths(bb, data, plan, tmp, 8 if tiny else 64, compute, None, range(2))  # the best of a warm run and a timed one
    return {"images": images, "size": size, "in_turn_img_s": round(images / seconds["in turn"], 1),
            "overlapped_img_s": round(images / seconds["overlapped"], 1), "ratio": round(seconds["in turn"] / seconds["overlapped"], 2),
            "stores_byte_identical": same, "min_cosine": 1.0 if same else 0.0, "ok": same}  # fmt: skip


def online_step(device: torch.device, compute: Compute, tiny: bool, repeats: int) -> dict:
    from diffprobe.features.featurize import featurize
    from diffprobe.features.plan import FeaturePlan
    from diffprobe.probing.heads import AttentionHead

    size, channels, batch = (32, 32, 4) if tiny else (256, 256, 64)
    bb = load_backbone("adm:random", device=str(device), **paper_adm_options(size, channels))
    block = min(24, bb.num_blocks)
    info = bb.blocks[block - 1]
    plan = FeaturePlan(t=90, blocks=block, pools=info.resolution)
    head = AttentionHead(info.channels, info.resolution, 1000, width=256, depth=2, heads=8).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=1e-4)
    x0 = torch.rand(batch, 3, size, size, device=device) * 2 - 1
    y = torch.randint(0, 1000, (batch,), device=device)

    def step():
        with torch.no_grad():
            feats = featurize(bb, x0, plan, range(batch), compute=compute)[plan.keys[0]]
        loss = F.cross_entropy(head(feats.float()), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    reset_peak(device)
    _, quick = timed_pair(step, step, device, repeats)
    return {"block": block, "map": f"{info.channels}×{info.resolution}²", "batch": batch, "img_s": round(batch / quick, 1),
            "compute": compute.describe(), "peak_mib": peak_memory(device)}  # fmt: skip


def pretrain_step(device: torch.device, tiny: bool, repeats: int, tmp: Path) -> dict:
    from diffprobe.generate.pretrain import DEFAULT_PRETRAIN_FLAGS, PretrainConfig, Trainer

    batch = 8 if tiny else 128
    images = torch.randint(0, 256, (batch * 2, 3, 32, 32), dtype=torch.uint8)
    precision = "bf16" if device.type == "cuda" else "fp32"
    trainer = Trainer(PretrainConfig(flags=dict(DEFAULT_PRETRAIN_FLAGS), batch_size=batch), images, str(tmp), str(device), precision, False)
    reset_peak(device)
    steps = iter(range(1000))
    _, quick = timed_pair(lambda: trainer.step(next(steps)), lambda: trainer.step(next(steps)), device, repeats)
    params = sum(p.numel() for p in trainer.model.parameters())
    return {"params_M": round(params / 1e6, 2), "batch": batch, "img_s": round(batch / quick, 1), "precision": precision,
            "peak_mib": peak_memory(device)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="small sizes everywhere: the same code paths in about a minute")
    p.add_argument("--out", default="gpu_check", help="folder for gpu_check.json and gpu_check.txt")
    p.add_argument("--skip", default="", help="comma-separated sections to leave out: parity, throughput, torchrun, compiled "
                   "(compiled against eager for every family: GPU only, about a minute each)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--budget", type=float, default=480,
                   help="seconds after which checks not yet started are recorded as skipped (default 480; gpu_check.sh passes 420 and "
                        "runs extract.py's table after it with the time left; the device tool runs one "
                        "command for at most 10 minutes; results are written after each check either way)")  # fmt: skip
    p.add_argument("--compile-modes", default="",
                   help="also time ADM-256 to block 24 compiled in these torch.compile modes, comma-separated (eager, default, "
                        "max-autotune, max-autotune-no-cudagraphs, reduce-overhead): minutes of compilation each, so not in "
                        "the default run")  # fmt: skip
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("gpu_check: no CUDA device here; --device cpu --tiny runs the same code paths on the CPU")
    from diffprobe.precision import choose_compute, resolve_device
    from extract import matmul_peak

    device = resolve_device(args.device)  # cuda -> cuda:0: set_device, NCCL and pinned copies need an index
    skip = {s for s in args.skip.split(",") if s}

    compute = choose_compute(str(device))
    header = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.backends.cpu.get_cpu_capability()})",
              "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "tiny": args.tiny, "compute": compute.describe()}  # fmt: skip
    peak = None
    if device.type == "cuda":
        peak = matmul_peak(device, torch.bfloat16)
        header["bf16_matmul_peak_tflops"] = round(peak / 1e12, 1)
    started = time.perf_counter()
    report = Report(Path(args.out), header, args.budget, device)
    families = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        if "parity" not in skip:
            families = family_specs(tmp)
            if not FIXTURE.is_file():
                report.skip("parity", "adm (guided-diffusion fixture)", f"{FIXTURE} is not here: set DIFFPROBE_SHARED "
                            "(benchmarks/gpu_prepare.sh carries a copy in .gpu/shared)")  # fmt: skip
            for family, (spec, options) in families.items():
                report.record("parity", family, lambda s=spec, o=options: parity(s, o, device, args.tiny))
        if "throughput" not in skip:
            import latent_models as lm

            repeats = 1 if args.tiny else args.repeats
            if args.tiny:
                adm = ("adm:random", paper_adm_options(32, 64), 24, 4)
                sd = (f"diffusers:{lm.save_sd(tmp / 'sd-tiny')}", {}, None, 2)
                dit = (f"diffusers:{lm.save_dit(tmp / 'dit-tiny')}", {}, None, 2)
            else:
                adm = ("adm:random", {"preset": "256x256_diffusion_uncond"}, 24, 64)
                sd = (f"diffusers:{lm.save_sd(tmp / 'sd21', **lm.SD21_SHAPE)}", {"image_size": 512}, None, 16)
                dit = (f"diffusers:{lm.save_dit(tmp / 'ditxl', **lm.DIT_XL_SHAPE)}", {}, 15, 64)
            report.record("throughput", "ADM-256 to block 24" + " (tiny)" * args.tiny,
                          lambda: extraction_case(adm[0], adm[1], adm[2], adm[3], device, compute, repeats, peak=peak))
            if device.type == "cuda":
                report.record("throughput", "ADM-256 to block 24 at the fitted batch" + " (tiny)" * args.tiny,
                              lambda: fitted_batch_case(adm, device, compute, repeats, peak))
            sd_bb = load_backbone(sd[0], **sd[1])
            up1 = max(b.index for b in sd_bb.blocks if b.name.startswith("up_blocks.1."))
            hooked = "up_blocks.1"  # the plain path catches the whole up block: its last unit's output, upsampled where it upsamples
            report.record("throughput", "SD-2.1-shaped U-Net to up_blocks.1" + (" (tiny)" if args.tiny else " at 512 px"),
                          lambda: extraction_case(sd[0], sd[1], up1, sd[3], device, compute, repeats, module=hooked))
            dit_bb = load_backbone(dit[0], **dit[1])
            dit_block = dit[2] or max(2, dit_bb.num_blocks // 2)
            side = dit_bb.blocks[dit_block - 1].resolution
            del sd_bb, dit_bb
            report.record("throughput", f"DiT to block {dit_block}" + (" (tiny)" if args.tiny else " (XL/2-shaped, 256 px)"),
                          lambda: extraction_case(dit[0], dit[1], dit_block, dit[3], device, compute, repeats, tokens_side=side))
            report.record("throughput", "online attention-head step", lambda: online_step(device, compute, args.tiny, repeats))
            report.record("throughput", "pretrain step (shipped architecture)", lambda: pretrain_step(device, args.tiny, repeats, tmp / "pre"))
            report.record("throughput", "extraction end to end, overlapped vs in turn" + " (tiny)" * args.tiny,
                          lambda: end_to_end(device, compute, args.tiny, tmp / "end-to-end"))
        if "torchrun" not in skip:
            if FIXTURE.is_file():
                report.record("torchrun", "2 processes vs 1", lambda: torchrun_check(device, args.tiny, tmp / "torchrun"))
            else:
                report.skip("torchrun", "2 processes vs 1", f"{FIXTURE} is not here: set DIFFPROBE_SHARED")
        if "compiled" not in skip and device.type == "cuda" and not args.tiny:  # a minute of compilation per family
            for family, (spec, options) in (families or family_specs(tmp)).items():
                report.record("compiled", family, lambda s=spec, o=options: compiled_parity(s, o, device))
        if "throughput" not in skip:
            for mode in [m for m in args.compile_modes.split(",") if m]:  # which mode pays on this GPU (precision.COMPILE_MODES)
                moded = Compute(compute.device, compute.precision, compute.channels_last, mode != "eager", "default" if mode == "eager" else mode)
                report.record("compile", f"ADM-256 to block 24, {mode}" + " (tiny)" * args.tiny,
                              lambda c=moded: extraction_case(adm[0], adm[1], adm[2], adm[3], device, c, repeats, peak=peak))
    header["wall_seconds"] = round(time.perf_counter() - started, 1)
    report.write(complete=True)
    print(f"gpu_check: {len(report.failed)} failed of {sum(len(v) for v in report.results.values())}"
          + (f", {len(report.skipped)} skipped past the budget" if report.skipped else "") + "; "
          f"{args.out}/gpu_check.json, gpu_check.txt ({header['wall_seconds']} s)")  # fmt: skip
    sys.exit(1 if report.failed else 3 if report.skipped else 0)


if __name__ == "__main__":
    main()

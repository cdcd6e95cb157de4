"""benchmarks/: which variants run where (no timing here: the benchmarks are not tests)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

import diffprobe.precision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import extract as bench_extract  # noqa: E402
import machine  # noqa: E402
import pretrain as bench_pretrain  # noqa: E402
import recipe as bench_recipe  # noqa: E402


def machine_for(*argv: str, fast_bf16: bool, monkeypatch) -> machine.Machine:
    monkeypatch.setattr(diffprobe.precision, "cpu_has_fast_bf16", lambda: fast_bf16)  # what choose_compute reads
    parser = argparse.ArgumentParser()
    machine.add_machine_args(parser)
    return machine.resolve(parser.parse_args(list(argv)), "cpu")


def precisions_timed(m: machine.Machine) -> set[str]:
    names = [name for name, _ in bench_extract.variants(m)[0]]
    assert len(names) == len(set(names))  # one row per set-up
    return {c.precision for _, c in bench_extract.variants(m)[0]} | {p for _, p, _ in bench_pretrain.variants(m)[0]}


@pytest.mark.parametrize("argv, native_bf16", [((), False), (("--as-no-fast-bf16",), True)])  # an AVX2 CPU; simulated
def test_a_cpu_without_native_bf16_skips_bf16_and_says_why(argv, native_bf16, monkeypatch):
    m = machine_for(*argv, fast_bf16=native_bf16, monkeypatch=monkeypatch)
    assert precisions_timed(m) == {"fp32"}
    assert m.compute.precision == "fp32" and m.compute.channels_last  # what diffprobe runs there
    assert m.skipped.startswith("skipped bf16 variants: this CPU has no native bf16") and "--bf16-variants" in m.skipped
    extract_default = dict(bench_extract.variants(m)[0])[bench_extract.variants(m)[1]]
    assert extract_default == m.compute
    assert bench_pretrain.variants(m)[1] == bench_pretrain.REFERENCE  # trains in fp32 there: the reference's set-up


def test_native_bf16_or_the_flag_times_bf16(monkeypatch):
    fast = machine_for(fast_bf16=True, monkeypatch=monkeypatch)
    assert precisions_timed(fast) == {"fp32", "bf16"} and fast.skipped is None
    assert fast.compute.precision == "bf16"
    assert bench_pretrain.variants(fast)[1] == "bf16 autocast"
    forced = machine_for("--bf16-variants", fast_bf16=False, monkeypatch=monkeypatch)
    assert precisions_timed(forced) == {"fp32", "bf16"} and forced.compute.precision == "fp32"


def test_recipe_arms_override_the_baseline_and_keep_the_network_when_warm_started():
    from diffprobe.generate.pretrain import DEFAULT_PRETRAIN_FLAGS, PretrainConfig

    base = PretrainConfig(flags=dict(DEFAULT_PRETRAIN_FLAGS))
    name, settings = bench_recipe.parse_arm("min-SNR γ=5:loss_weighting=min-snr,snr_gamma=3,batch_size=32,hflip=false")
    config, warmup = bench_recipe.arm_setup(base, settings, scratch=False)
    assert name == "min-SNR γ=5" and warmup is None
    assert (config.loss_weighting, config.snr_gamma, config.batch_size, config.hflip) == ("min-snr", 3.0, 32, False)
    assert base.batch_size == 64 and config.lr == base.lr  # the baseline itself is untouched
    with pytest.raises(SystemExit, match="changes the architecture.*--scratch"):
        bench_recipe.arm_setup(base, {"num_channels": "32"}, scratch=False)
    wide, _ = bench_recipe.arm_setup(base, {"num_channels": "32", "warmup_images": "640"}, scratch=True)
    assert wide.flags["num_channels"] == "32"
    with pytest.raises(SystemExit, match="unknown setting 'lrr'"):
        bench_recipe.arm_setup(base, {"lrr": "1"}, scratch=True)
    with pytest.raises(SystemExit, match="expected 'name:key=value"):
        bench_recipe.parse_arm("lr 1e-3:lr")


def test_gpu_check_runs_its_code_paths_on_the_cpu(tmp_path):
    """benchmarks/gpu_check.py --device cpu --tiny: every family's parity and every throughput case run
    (torchrun is left out here: test_distributed runs the same two checks), so the script a GPU
    window depends on cannot rot."""
    import json
    import os
    import subprocess

    root = Path(__file__).resolve().parents[1]  # through the shell script a GPU window runs: its environment set-up too
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable, "DEVICE": "cpu", "TINY": "1", "SKIP": "torchrun",
           "OUT": str(tmp_path)}  # fmt: skip
    done = subprocess.run(["bash", "benchmarks/gpu_check.sh"], capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.startswith("torch ")  # gpu_env.sh's import check of every package diffprobe needs
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    parity, throughput = report["results"]["parity"], report["results"]["throughput"]
    for family in ("Stable Diffusion", "SDXL", "DiT", "PixArt", "SD3", "FLUX", "diffusers UNet2DModel", "timm ViT", "transformers DINOv2",
                   "torchvision ResNet-18"):
        assert parity[family]["passed"] and parity[family]["bf16_min_cosine"] > 0.99, family
        assert parity[family]["host_waits"] == 0, parity[family]  # no host read or upload inside the walk
    assert len(throughput) == 6 and all(r["passed"] for r in throughput.values())
    assert throughput["extraction end to end, overlapped vs in turn (tiny)"]["stores_byte_identical"]
    assert all(r["min_cosine"] > 0.99 and r["ratio"] > 0 for name, r in throughput.items() if "ratio" in r)
    assert report["failed"] == [] and "failed: none" in (tmp_path / "gpu_check.txt").read_text()


def test_gpu_train_returns_what_export_needs_in_pieces(cifar_small, tmp_path):
    """benchmarks/gpu_train.sh on the CPU: warm-starts from the shipped checkpoint (resuming its own run
    is pretrain's, tested in test_pretrain); what comes back is ema.pt in pieces under 16 MiB and
    training-state.pt without its weights, which is what `export` reads."""
    import os
    import subprocess

    import torch

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHON": sys.executable, "DEVICE": "cpu", "DATA": str(cifar_small), "BATCH": "4", "LIMIT_S": "200",
           "RUN": str(tmp_path / "run"), "OUT": str(tmp_path / "out"), "STEPS": "2801"}  # the shipped checkpoint is at step 2800
    done = subprocess.run(["bash", "benchmarks/gpu_train.sh"], capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert done.returncode == 0 and "step 2801," in done.stdout, done.stdout[-3000:] + done.stderr[-3000:]
    out = tmp_path / "out"
    pieces = sorted(out.glob("ema.pt.part-*"))
    assert len(pieces) > 1 and all(p.stat().st_size <= 16 * 2**20 for p in pieces)
    assert b"".join(p.read_bytes() for p in pieces) == (tmp_path / "run" / "ema.pt").read_bytes()
    state = torch.load(out / "training-state.pt", weights_only=True)
    assert set(state) == {"config", "state"} and state["state"]["step"] == 2801 and state["config"]["batch_size"] == 4
    assert (out / "ema.json").is_file() and (out / "loss.csv").is_file() and len(list(out.iterdir())) <= 8

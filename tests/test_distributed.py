"""torchrun-native extraction on CPU (gloo, two processes): the store equals one process's, byte for byte."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from conftest import FIXTURE_SPEC, ROOT

ARGS = ["--blocks", "3,13", "--t", "10,90", "--pool", "1,2", "--limit", "48", "--batch-size", "8", "--precision", "fp32"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd: list[str], cache) -> subprocess.CompletedProcess:
    # One thread per process: the same kernels in both runs, and two ranks fit on two cores.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFPROBE_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    env.pop("RANK", None), env.pop("WORLD_SIZE", None)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
            "--master-port", str(free_port()), "-m", "diffprobe", *args]  # fmt: skip


def test_two_torchrun_ranks_fill_a_store_identical_to_one_process(cifar_small, tmp_path, isolated_cache):
    single, double = tmp_path / "single", tmp_path / "double"
    one = run([sys.executable, "-m", "diffprobe", "extract", FIXTURE_SPEC, "--data", str(cifar_small), "--out", str(single), *ARGS], isolated_cache)
    assert one.returncode == 0, one.stderr
    two = run(torchrun(2, "extract", FIXTURE_SPEC, "--data", str(cifar_small), "--out", str(double), *ARGS), isolated_cache)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "joined the gloo process group" in two.stderr
    names = sorted(p.name for p in (single / "features").iterdir())
    assert names == sorted(p.name for p in (double / "features").iterdir()) and len(names) == 16
    for name in names:
        assert (single / "features" / name).read_bytes() == (double / "features" / name).read_bytes(), name
    for name in ("labels.npy", "indices.npy"):
        assert np.array_equal(np.load(single / name), np.load(double / name))


@pytest.mark.parametrize("extra, message", [
    (["--world-size", "3"], "--world-size 3 (torchrun says 2)"),
    (["--dist-backend", "nccl"], "NCCL backend needs CUDA GPUs"),
])  # fmt: skip
def test_torchrun_bad_settings_are_one_clear_line(cifar_small, tmp_path, isolated_cache, extra, message):
    out = tmp_path / "s"
    r = run(torchrun(2, "extract", FIXTURE_SPEC, "--data", str(cifar_small), "--out", str(out), *ARGS, *extra), isolated_cache)
    assert r.returncode != 0 and message in r.stderr
    errors = [line for line in r.stderr.splitlines() if line.startswith("diffprobe: error:")]
    assert errors and "Traceback" not in "\n".join(line for line in r.stderr.splitlines() if "diffprobe" in line)


def test_ddp_linear_head_matches_one_process(cifar_small, tmp_path, isolated_cache):
    import json

    store = tmp_path / "store"
    made = run([sys.executable, "-m", "diffprobe", "extract", FIXTURE_SPEC, "--data", str(cifar_small), "--out", str(store),
                "--blocks", "3", "--t", "10", "--pool", "2", "--batch-size", "50"], isolated_cache)  # fmt: skip
    assert made.returncode == 0, made.stderr
    head = ["probe", str(store), "--t", "10", "--blocks", "3", "--pool", "2", "--epochs", "6", "--seed", "2"]
    one = run([sys.executable, "-m", "diffprobe", *head, "--out", str(tmp_path / "one")], isolated_cache)
    assert one.returncode == 0, one.stderr
    two = run(torchrun(2, *head, "--out", str(tmp_path / "two")), isolated_cache)
    assert two.returncode == 0, two.stderr[-3000:]
    a = json.loads((tmp_path / "one" / "metrics.json").read_text())
    b = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert abs(a["select"]["top1"] - b["select"]["top1"]) <= 0.5, (a["select"]["top1"], b["select"]["top1"])
    assert [h["train_loss"] for h in a["history"]] == pytest.approx([h["train_loss"] for h in b["history"]], rel=1e-3)


def test_a_rerun_with_another_world_size_fills_what_a_dead_rank_left(cifar_small, tmp_path):
    """A store does not remember how many ranks wrote it: after rank 1 of 2 died (never ran), a
    rerun with any world size computes exactly the missing chunks, and the arrays equal one process's."""
    from diffprobe.cli import main
    from diffprobe.features.store import FeatureStore

    base = ["extract", FIXTURE_SPEC, "--data", str(cifar_small), *ARGS]
    assert main([*base, "--out", str(tmp_path / "one")]) == 0
    out = str(tmp_path / "ranked")
    assert main([*base, "--out", out, "--rank", "0", "--world-size", "2"]) == 0
    store = FeatureStore.open(out)
    assert not store.complete_keys() and all(store.done_chunks(k)[::2].all() for k in store.keys())
    for rank in range(3):  # the rerun: three ranks this time
        assert main([*base, "--out", out, "--rank", str(rank), "--world-size", "3"]) == 0
    assert len(store.complete_keys()) == 8
    for key in store.keys():
        assert np.array_equal(store.load(key), FeatureStore.open(tmp_path / "one").load(key))


def test_online_attention_head_under_two_torchrun_ranks(cifar_small, tmp_path, isolated_cache):
    import json

    r = run(torchrun(2, "probe-online", FIXTURE_SPEC, "--data", str(cifar_small), "--limit", "40", "--t", "10", "--blocks", "3",
                     "--pool", "4", "--head", "attention", "--width", "16", "--heads", "2", "--depth", "1", "--epochs", "1",
                     "--out", str(tmp_path / "run")), isolated_cache)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["online"] and len(metrics["history"]) == 1


def test_auto_backend_shares_one_gpu_with_gloo(monkeypatch):
    """NCCL refuses two ranks on one GPU: with more local ranks than GPUs, auto picks gloo."""
    import torch

    from diffprobe.features.distributed import backend_for

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert backend_for("auto", torch.device("cuda", 0)) == "gloo"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert backend_for("auto", torch.device("cuda", 0)) == "nccl"
    assert backend_for("auto", torch.device("cpu")) == "gloo" and backend_for("nccl", torch.device("cpu")) == "nccl"

"""Extraction into the feature store: correctness, resume after kill -9, ranks, identity checks."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import CIFAR_TAR, FIXTURE_SPEC, ROOT
from diffprobe import DiffprobeError, load_backbone
from diffprobe.data import model_transform, open_dataset
from diffprobe.features.plan import FeaturePlan
from diffprobe.features.extract import extract
from diffprobe.features.featurize import pool_features
from diffprobe.features.noise import image_noise
from diffprobe.precision import Compute, choose_compute
from diffprobe.features.store import FeatureKey, FeatureStore

FP32 = Compute(torch.device("cpu"), "fp32", False)
BF16 = Compute(torch.device("cpu"), "bf16", True)
FAST = choose_compute("cpu")  # this CPU's fast path (bf16 is ~40× slower than fp32 where it is not native)


def run_extract(out, data, **kw):
    args = dict(timesteps=[90, 300], blocks=[13, 18], pools=[1, 2], batch_size=40, compute=FP32, progress=False)
    args.update(kw)
    plan = FeaturePlan(t=args.pop("timesteps"), blocks=args.pop("blocks"), pools=args.pop("pools"),
                       noise_seed=args.pop("seed", 0), draws=args.pop("draws", 1))
    return extract(load_backbone(FIXTURE_SPEC), data, plan, out, **args)


def test_store_holds_exactly_the_pooled_block_features(cifar_small, tmp_path):
    data = open_dataset(cifar_small)
    store = run_extract(tmp_path / "s", data, dtype="float32")
    assert store.rows == 300 and len(store.complete_keys()) == 8
    assert np.array_equal(store.labels, data.labels)
    # Recompute a few rows by hand: transform, ε(seed, index), q_sample, blocks, pooling.
    bb = load_backbone(FIXTURE_SPEC)
    rows = [0, 77, 299]
    x0 = torch.stack([model_transform(32)(data.load(i)) for i in rows])
    x_t = bb.schedule.q_sample(x0, 300, image_noise(rows, 0, (3, 32, 32)))
    with torch.inference_mode():
        h = bb.forward_features(x_t, 300, [18])[18]
    expected = pool_features(h, 2).numpy()
    got = store.load(FeatureKey(300, 18, 2), np.array(rows))
    assert got.shape == (3, 64 * 4)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_features_do_not_depend_on_the_batch(cifar_small, tmp_path):
    data = open_dataset(cifar_small)
    a = run_extract(tmp_path / "a", data, batch_size=40, dtype="float32", blocks=[13], pools=[1])
    b = run_extract(tmp_path / "b", data, batch_size=64, dtype="float32", blocks=[13], pools=[1])
    for key in a.complete_keys():
        np.testing.assert_allclose(a.load(key), b.load(key), rtol=1e-5, atol=1e-5)


def test_rerun_is_a_no_op(cifar_small, tmp_path, monkeypatch):
    data = open_dataset(cifar_small)
    run_extract(tmp_path / "s", data, compute=FAST)
    before = {p.name: p.read_bytes() for p in (tmp_path / "s" / "features").iterdir()}

    def forbidden(*a, **k):
        raise AssertionError("the U-Net ran although every chunk was done")

    monkeypatch.setattr("diffprobe.backbones.adm_backbone.ADMBackbone.run", forbidden)
    run_extract(tmp_path / "s", data, compute=FAST)
    after = {p.name: p.read_bytes() for p in (tmp_path / "s" / "features").iterdir()}
    assert before == after


def test_new_blocks_extend_a_store_and_only_missing_work_runs(cifar_small, tmp_path):
    data = open_dataset(cifar_small)
    run_extract(tmp_path / "s", data, blocks=[13], pools=[1])
    store = run_extract(tmp_path / "s", data, blocks=[13, 18], pools=[1])
    assert {k.stem for k in store.complete_keys()} == {"t0090_b13_p1", "t0090_b18_p1", "t0300_b13_p1", "t0300_b18_p1"}


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "diffprobe", *args]


def test_killed_extraction_resumes_to_identical_arrays(cifar_small, tmp_path):
    # This CPU's default precision (bf16 only where it is native: forced bf16 is ~40× slower on AVX2-only CPUs).
    common = ["extract", FIXTURE_SPEC, "--data", str(cifar_small), "--blocks", "5,13,18,25", "--t", "50,300",
              "--pool", "1,2", "--batch-size", "6", "--limit", "72"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    subprocess.run(_cli(*common, "--out", str(tmp_path / "whole")), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*common, "--out", str(killed)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_file = killed / "features" / "t0300_b25_p2.done"
    deadline = time.time() + 120
    while time.time() < deadline:
        if done_file.exists() and sum(done_file.read_bytes()) >= 5:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    partial = FeatureStore.open(killed)
    assert not all(partial.is_complete(k) for k in partial.keys()), "the run finished before it could be killed"
    with pytest.raises(DiffprobeError, match="incomplete"):
        partial.load(FeatureKey(300, 25, 2))

    subprocess.run(_cli(*common, "--out", str(killed)), check=True, env=env, capture_output=True)
    whole, resumed = FeatureStore.open(tmp_path / "whole"), FeatureStore.open(killed)
    assert whole.keys() == resumed.keys() and len(whole.keys()) == 16
    for key in whole.keys():
        assert np.array_equal(whole.load(key), resumed.load(key)), key


def test_ranks_fill_disjoint_chunks_of_one_store(cifar_small, tmp_path):
    data = open_dataset(cifar_small)
    single = run_extract(tmp_path / "single", data, blocks=[13], pools=[1])
    run_extract(tmp_path / "ranked", data, blocks=[13], pools=[1], rank=1, world_size=2)
    partial = FeatureStore.open(tmp_path / "ranked")
    assert partial.done_chunks(FeatureKey(90, 13, 1)).tolist() == [False, True] * 4
    ranked = run_extract(tmp_path / "ranked", data, blocks=[13], pools=[1], rank=0, world_size=2)
    for key in single.complete_keys():
        assert np.array_equal(single.load(key), ranked.load(key))


def test_a_store_of_other_features_is_never_reused(cifar_small, tmp_path):
    data = open_dataset(cifar_small)
    out = tmp_path / "s"
    run_extract(out, data, blocks=[13], pools=[1])
    with pytest.raises(DiffprobeError, match=r"holds other features \(noise.*seed"):
        run_extract(out, data, blocks=[13], pools=[1], seed=1)
    with pytest.raises(DiffprobeError, match=r"holds other features \(rows"):
        run_extract(out, data, blocks=[13], pools=[1], limit=100)
    other = load_backbone("adm:random", image_size=32, num_channels=32, channel_mult="1,1,2,2",
                          attention_resolutions="16,8,4", num_head_channels=8, learn_sigma=True, resblock_updown=True)  # fmt: skip
    with pytest.raises(DiffprobeError, match=r"holds other features \(backbone.*fingerprint"):
        extract(other, data, FeaturePlan(t=[90], blocks=[13], pools=[1]), out, compute=FP32, progress=False)
    fresh = extract(other, data, FeaturePlan(t=[90], blocks=[13], pools=[1]), out, compute=FP32, progress=False, overwrite=True)
    assert fresh.manifest["backbone"]["fingerprint"] == other.fingerprint()


def test_limit_takes_a_balanced_subset(cifar_small, tmp_path):
    store = run_extract(tmp_path / "s", open_dataset(cifar_small), blocks=[13], pools=[1], limit=50)
    assert store.rows == 50 and np.bincount(store.labels).tolist() == [5] * 10


def test_unreadable_image_stops_with_its_path_and_keeps_finished_chunks(cifar_small, tmp_path):
    folder = tmp_path / "data"
    shutil.copytree(cifar_small, folder)
    victim = sorted((folder / "truck").iterdir())[-1]
    victim.write_bytes(b"\x89PNG broken")
    data = open_dataset(folder)
    with pytest.raises(DiffprobeError, match=f"cannot read image .*{victim.name}"):
        run_extract(tmp_path / "s", data, blocks=[13], pools=[1])
    store = FeatureStore.open(tmp_path / "s")
    assert store.done_chunks(FeatureKey(90, 13, 1)).sum() >= 7  # every chunk before the bad one


def test_pool_larger_than_the_map_is_refused(cifar_small, tmp_path):
    with pytest.raises(DiffprobeError, match="larger than block 13's 4×4"):
        run_extract(tmp_path / "s", open_dataset(cifar_small), blocks=[13], pools=[8])


@pytest.mark.slow
def test_cli_extracts_from_the_shared_cifar_archive(tmp_path, capsys):
    from diffprobe.cli import main

    out = tmp_path / "store"
    code = main(["extract", FIXTURE_SPEC, "--data", str(CIFAR_TAR), "--limit", "200", "--blocks", "13,18",
                 "--t", "90", "--out", str(out)])  # fmt: skip
    assert code == 0
    store = FeatureStore.open(out)
    assert store.manifest["data"]["size"] == 50000 and store.rows == 200
    assert store.manifest["data"]["classes"][-1] == "truck"
    assert "200 rows, 2 complete arrays" in capsys.readouterr().out


def test_prepare_never_changes_the_callers_backbone():
    bb = load_backbone(FIXTURE_SPEC)
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    fingerprint = bb.fingerprint()
    fast = BF16.prepare(bb)
    assert fast is not bb and BF16.prepare(bb) is fast  # one set-up copy per compute, cached
    assert BF16.prepare(fast) is fast  # a set-up copy is not copied again
    assert FP32.prepare(fast) is bb  # another compute is served from the original, not the cast copy
    conv = next(m for m in fast.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.dtype == torch.bfloat16 and conv.weight.is_contiguous(memory_format=torch.channels_last)
    assert all(torch.equal(before[k], v) and v.dtype == before[k].dtype for k, v in bb.state_dict().items())
    assert fast.fingerprint() == fingerprint  # the copy is named by the fp32 weights it came from
    assert FP32.prepare(bb) is bb  # fp32, NCHW, this device: nothing to set up


def test_noise_draws_are_averaged(cifar_small, tmp_path):
    data = open_dataset(cifar_small)
    store = run_extract(tmp_path / "s", data, blocks=[18], pools=[1], timesteps=[300], draws=2, dtype="float32", limit=20)
    bb = load_backbone(FIXTURE_SPEC)
    rows = store.indices[:4].tolist()
    x0 = torch.stack([model_transform(32)(data.load(i)) for i in rows])
    pooled = []
    with torch.inference_mode():
        for draw in (0, 1):
            x_t = bb.schedule.q_sample(x0, 300, image_noise(rows, 0, (3, 32, 32), draw))
            pooled.append(pool_features(bb.forward_features(x_t, 300, [18])[18], 1))
    np.testing.assert_allclose(store.load(FeatureKey(300, 18, 1))[:4], ((pooled[0] + pooled[1]) / 2).numpy(), atol=1e-4)
    assert store.split(0.5, seed=0).sum() == 10  # 2 images per class, one of each to validation


def test_overlapped_extraction_writes_the_bytes_of_the_in_turn_path(cifar_small, tmp_path):
    """ε drawn in a loader worker process and chunks written by a thread (the default) against each
    step in turn, with augmented views and two draws (the streams that depend on the view)."""
    data = open_dataset(cifar_small)
    common = dict(blocks=[5, 13], pools=[1, 2], timesteps=[300], draws=2, limit=12, batch_size=5, augment_views=2)
    overlapped = run_extract(tmp_path / "overlapped", data, workers=1, **common)
    in_turn = run_extract(tmp_path / "in-turn", data, overlap=False, **common)
    assert overlapped.rows == 24 and len(overlapped.complete_keys()) == 4
    for key in in_turn.complete_keys():
        assert np.array_equal(overlapped.load(key), in_turn.load(key)), key


def test_a_compile_mode_reaches_torch_compile_and_cuda_graphs_need_a_gpu(monkeypatch):
    from diffprobe.precision import COMPILE_MODES

    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **options: seen.append(options) or fn)
    compute = choose_compute("cpu", "fp32", False, "max-autotune")
    assert compute.compile and compute.describe() == "cpu fp32 compiled (max-autotune)"
    compute.prepare(load_backbone(FIXTURE_SPEC))
    assert seen == [{"dynamic": False, "mode": "max-autotune"}]
    assert choose_compute("cpu", "fp32", False, True).compile_mode == "default" and "reduce-overhead" in COMPILE_MODES
    with pytest.raises(DiffprobeError, match="CUDA graphs: it needs a GPU"):
        choose_compute("cpu", "fp32", False, "reduce-overhead")


def test_a_pass_that_runs_out_of_memory_is_retried_in_halves(cifar_small, tmp_path, monkeypatch, caplog):
    """Chunks of 8 images whose passes fit only 2 at a time: the extraction goes on in passes of 2 and
    writes what a store made in chunks of 2 holds; one image that does not fit is one clear error."""
    import diffprobe.features.extract as extraction
    from diffprobe.features.batching import fitted_batch

    data = open_dataset(cifar_small)
    small = run_extract(tmp_path / "small", data, blocks=[13], pools=[1], timesteps=[90], limit=16, batch_size=2)
    real = extraction.featurize

    def fits_two(backbone, x0, *args, **kw):
        if len(x0) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(backbone, x0, *args, **kw)

    monkeypatch.setattr(extraction, "featurize", fits_two)
    halved = run_extract(tmp_path / "halved", data, blocks=[13], pools=[1], timesteps=[90], limit=16, batch_size=8)
    assert halved.chunk_rows == 8 and halved.is_complete(FeatureKey(90, 13, 1))
    assert np.array_equal(halved.load(FeatureKey(90, 13, 1)), small.load(FeatureKey(90, 13, 1)))
    assert "passes of 2 images for now" in caplog.text and "passes of 4 images" in caplog.text
    monkeypatch.setattr(extraction, "featurize", lambda *a, **k: (_ for _ in ()).throw(torch.OutOfMemoryError("simulated")))
    with pytest.raises(DiffprobeError, match="one image at a time does not fit"):
        run_extract(tmp_path / "none-fits", data, blocks=[13], pools=[1], timesteps=[90], limit=16, batch_size=2)
    # A GPU's pass: the largest power of two within the memory budget, capped.
    assert fitted_batch(10e9, 1e9) == 8 and fitted_batch(1e9, 3e9) == 1 and fitted_batch(1e15, 1.0) == 512


def test_a_halved_pass_is_tried_at_double_size_again_after_clean_chunks(monkeypatch):
    """One OOM (fragmentation) must not halve the rest of a long extraction: after REGROW_AFTER
    clean chunks the pass doubles back towards the chunk's rows; a try that fails keeps the size
    that worked and waits 4× longer before the next."""
    from diffprobe.features import batching

    monkeypatch.setattr(batching, "REGROW_AFTER", 2)
    fits = {"rows": 2}
    tried = []

    def run(rows):
        tried.append(rows)
        if rows > fits["rows"]:
            raise torch.OutOfMemoryError("simulated")
        return rows

    size = batching.PassSize(8, torch.device("cpu"))
    assert size.run(run) == 2 and tried == [8, 4, 2]  # halved to what fits
    fits["rows"] = 8  # the memory came back
    tried.clear()
    assert [size.run(run) for _ in range(6)] == [2, 2, 4, 4, 4, 8] and tried == [2, 2, 4, 4, 4, 8]
    fits["rows"] = 4  # full again: halved; one failed try after 2 clean chunks, the next only after 8 more
    tried.clear()
    assert [size.run(run) for _ in range(11)] == [4] * 11 and size.wait == 8
    assert tried[:6] == [8, 4, 4, 4, 8, 4] and tried.count(8) == 2
    assert size.run(run) == 4 and tried[-2:] == [8, 4] and size.wait == 32
    fits["rows"] = 8  # free again: the next try fits, and a later OOM is waited out from the start again
    size.clean = size.wait
    assert size.run(run) == 8 and size.rows == 8 and size.wait == 2


def test_the_per_image_memory_is_the_peak_difference_of_two_small_passes(monkeypatch):
    """bytes_per_image on a stand-in for the CUDA allocator: a fixed part (weights, workspace)
    cancels out, each image adds 300 bytes; the walk runs eagerly even on a compiled runner."""
    from diffprobe.features import batching

    bb = load_backbone(FIXTURE_SPEC)
    bb._run = compiled = object()  # a compiled walk must not be called for the odd batch sizes
    passes = []
    real = bb.forward_features
    monkeypatch.setattr(bb, "forward_features", lambda x, *a, **k: passes.append((len(x), bb._run)) or real(x, *a, **k))
    for name, fake in {"synchronize": lambda device=None: None, "reset_peak_memory_stats": lambda device=None: None,
                       "memory_allocated": lambda device=None: 5000,
                       "max_memory_allocated": lambda device=None: 5000 + 7000 + 300 * passes[-1][0]}.items():  # fmt: skip
        monkeypatch.setattr(torch.cuda, name, fake)
    assert batching.bytes_per_image(bb, FeaturePlan(t=90, blocks=[13]), FP32) == 300
    assert passes == [(1, None), (4, None), (2, None)] and bb._run is compiled

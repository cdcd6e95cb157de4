"""Issue 10, case by case: every bad input or kill gets a non-zero exit, one line with no
traceback, no silent wrong number, and nothing already computed is lost."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CIFAR_TAR, FIXTURE_CKPT, FIXTURE_SPEC, ROOT
from diffprobe import DiffprobeError
from diffprobe.cli import main
from diffprobe.data import open_dataset, read_image
from diffprobe.features.store import FeatureKey, FeatureStore

KEY = FeatureKey(90, 13, 1)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *needles: str) -> str:
    """Non-zero exit, exactly one error line, no traceback; returns the line."""
    assert code != 0, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("diffprobe: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def extract_args(data, out, *extra):
    return ["extract", FIXTURE_SPEC, "--data", data, "--blocks", "13", "--t", "90", "--out", out,
            "--batch-size", "40", "--device", "cpu", "--precision", "fp32", *extra]  # fmt: skip


def nan_checkpoint(tmp_path, key="middle_block.0.in_layers.2.weight"):
    """The fixture with one NaN in a conv weight (the middle block, block 13), beside its flags."""
    state = torch.load(FIXTURE_CKPT, weights_only=True)
    state[key].view(-1)[0] = float("nan")
    path = tmp_path / "nan.pt"
    torch.save(state, path)
    shutil.copy(FIXTURE_CKPT.with_suffix(".json"), path.with_suffix(".json"))
    return path


# ---------------------------------------------------------------- 1. NaN features


def test_nan_weights_stop_extraction_naming_block_and_timestep(cifar_small, tmp_path, capsys):
    ckpt, out = nan_checkpoint(tmp_path), tmp_path / "store"
    args = extract_args(cifar_small, out, "--limit", "40")
    args[1], args[5] = f"adm:{ckpt}", "8,13,18"
    code, _, err = run(capsys, *args)
    assert_one_line_error(code, err, "block 13 at t=90", "non-finite features", "NaN")
    store = FeatureStore.open(out)
    assert not store.done_chunks(FeatureKey(90, 13, 1)).any()  # nothing NaN was marked done
    done = FeatureKey(90, 8, 1)  # block 8 comes before the NaN and was written: kept, finite
    assert store.is_complete(done) and np.isfinite(store.load(done)).all()


def _poison(store: FeatureStore, key: FeatureKey) -> None:
    """What an older diffprobe left: a complete array of NaN."""
    array = np.load(store.root / "features" / f"{key.stem}.npy", mmap_mode="r+")
    array[:] = np.nan
    array.flush()


def test_probe_and_sweep_on_a_nan_store_are_one_line(cifar_small, tmp_path, capsys):
    sweep_out = tmp_path / "sweep"
    assert run(capsys, *extract_args(cifar_small, sweep_out / "features", "--limit", "60"))[0] == 0
    store = FeatureStore.open(sweep_out / "features")
    _poison(store, KEY)
    code, _, err = run(capsys, "probe", store.root, "--t", "90", "--blocks", "13", "--out", tmp_path / "run", "--epochs", "1")
    assert_one_line_error(code, err, "block 13 at t=90", "non-finite features", "--overwrite")
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".diffprobe-run"]  # checked and claimed up front, nothing written
    sweep = ["sweep", *extract_args(cifar_small, sweep_out, "--limit", "60")[1:], "--no-controls"]
    assert_one_line_error(*run(capsys, *sweep)[::2], "non-finite features")
    assert store.is_complete(KEY)  # the store itself is left as it was


# ---------------------------------------------------------------- 2. every PIL mode, 16-bit scaled


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    ramp = np.linspace(0, 65535, 64 * 64).reshape(64, 64).astype(np.uint16)
    path = tmp_path / "deep.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode.startswith("I")
    got = np.asarray(read_image(path))
    assert got.shape == (64, 64, 3) and got.min() == 0 and got.max() == 255
    np.testing.assert_array_equal(got[..., 0], np.round(ramp / 257).astype(np.uint8))
    assert len(np.unique(got)) > 200  # a ramp, not a white page


def test_float_image_out_of_range_is_one_line(tmp_path):
    path = tmp_path / "depth.tiff"
    Image.fromarray(np.full((8, 8), -40.0, dtype=np.float32)).save(path)
    with pytest.raises(DiffprobeError, match="cannot read image .*depth.tiff: F image with values in \\[-40, -40\\]"):
        read_image(path)


# ---------------------------------------------------------------- 3. truncated or damaged archives


@pytest.mark.parametrize("damage", ["truncated", "garbled"])
def test_broken_archive_is_one_line_and_leaves_no_folder(damage, tmp_path, capsys, isolated_cache):
    data = CIFAR_TAR.read_bytes()[:600_000]
    if damage == "garbled":  # a readable start, then bytes that are not deflate data
        data = data[:300_000] + bytes(range(256)) * 2000
    broken = tmp_path / f"{damage}.tar.gz"
    broken.write_bytes(data)
    archives = isolated_cache / "archives"
    archives.mkdir(exist_ok=True)
    stale = archives / f".{damage}-0000.unpack-4194303-old"  # left by a killed run (pid not alive)
    stale.mkdir()
    for _ in range(2):  # a retry must not pile up folders either
        code, _, err = run(capsys, *extract_args(broken, tmp_path / "store"))
        assert_one_line_error(code, err, "cannot unpack", "download or copy it again")
    assert not [p for p in archives.iterdir() if damage in p.name]
    assert not (tmp_path / "store").exists()


# ---------------------------------------------------------------- 4. a fixed image resumes, keeping chunks


def _array_bytes(store: FeatureStore, key: FeatureKey) -> bytes:
    return (store.root / "features" / f"{key.stem}.npy").read_bytes()


def test_fixing_a_corrupt_image_resumes_and_keeps_finished_chunks(cifar_small, tmp_path, capsys):
    folder = tmp_path / "data"
    shutil.copytree(cifar_small, folder)
    victim = sorted((folder / "truck").iterdir())[-1]  # in the last chunk
    original = victim.read_bytes()
    victim.write_bytes(b"\x89PNG broken")
    out = tmp_path / "store"
    code, _, err = run(capsys, *extract_args(folder, out))
    assert_one_line_error(code, err, victim.name, "Fix or replace the file(s) under the same name", "finished chunks are kept")
    store = FeatureStore.open(out)
    done_before = store.done_chunks(KEY).copy()
    assert done_before.sum() == store.num_chunks - 1
    rows = np.concatenate([np.arange(store.num_chunks * 40)[store.chunk_slice(c)] for c in np.flatnonzero(done_before)])
    kept = np.load(out / "features" / f"{KEY.stem}.npy")[rows].copy()

    victim.write_bytes(original)  # the fix
    code, out_text, err = run(capsys, *extract_args(folder, out))
    assert code == 0, err
    store = FeatureStore.open(out)
    assert store.is_complete(KEY)
    np.testing.assert_array_equal(np.load(out / "features" / f"{KEY.stem}.npy")[rows], kept)  # not recomputed
    straight = tmp_path / "straight"
    assert run(capsys, *extract_args(cifar_small, straight))[0] == 0
    assert _array_bytes(store, KEY) == _array_bytes(FeatureStore.open(straight), KEY)


def test_changed_image_in_a_finished_chunk_is_refused(cifar_small, tmp_path, capsys):
    folder = tmp_path / "data"
    shutil.copytree(cifar_small, folder)
    out = tmp_path / "store"
    assert run(capsys, *extract_args(folder, out, "--limit", "80"))[0] == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    store = FeatureStore.open(out)
    victim = open_dataset(folder).describe(int(store.indices[0]))
    Image.new("RGB", (32, 32), (9, 9, 9)).save(victim, format="PNG")  # another image under the same name
    code, _, err = run(capsys, *extract_args(folder, out, "--limit", "80"))
    assert_one_line_error(code, err, "images of 1 finished chunk(s) changed", "put the old files back", "--overwrite")
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# ---------------------------------------------------------------- 5. output paths: one line, no traceback


def test_unusable_out_for_extract_and_probe(cifar_small, tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, _, err = run(capsys, *extract_args(cifar_small, blocker / "store", "--limit", "40"))
    assert_one_line_error(code, err, str(blocker), "choose another --out location")
    code, _, err = run(capsys, *extract_args(cifar_small, blocker, "--limit", "40"))
    assert_one_line_error(code, err, "is a file, not a folder")

    out = tmp_path / "store"
    assert run(capsys, *extract_args(cifar_small, out, "--limit", "60"))[0] == 0
    before = _array_bytes(FeatureStore.open(out), KEY)
    code, _, err = run(capsys, "probe", out, "--t", "90", "--blocks", "13", "--out", blocker / "run", "--epochs", "1")
    assert_one_line_error(code, err, str(blocker), "choose another --out location")
    assert _array_bytes(FeatureStore.open(out), KEY) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_out(cifar_small, tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        code, _, err = run(capsys, *extract_args(cifar_small, locked / "store", "--limit", "40"))
        assert_one_line_error(code, err, "Permission denied", "choose another --out location")
    finally:
        locked.chmod(0o700)


@pytest.mark.parametrize("flags, message", [
    (["--num", "0"], "--num 0: expected the number of images to generate, at least 1"),
    (["--num", "-3"], "--num -3: expected"),
    (["--steps", "0"], "--steps 0: expected 1 to 1000"),  # was quietly 100
    (["--steps", "-5"], "--steps -5: expected 1 to 1000"),
    (["--batch-size", "0"], "--batch-size 0: expected at least 1"),
])  # fmt: skip
def test_sample_refuses_bad_counts(flags, message, tmp_path, capsys):
    code, _, err = run(capsys, "sample", FIXTURE_SPEC, "--out", tmp_path / "s", "--device", "cpu", "--num", "2", *flags)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "s" / "samples.npz").exists()


# ---------------------------------------------------------------- 6. silent surprises


def test_test_store_overlapping_training_rows_is_refused(cifar_small, tmp_path, capsys):
    train, test = tmp_path / "train", tmp_path / "test"
    assert run(capsys, *extract_args(cifar_small, train, "--limit", "100"))[0] == 0
    assert run(capsys, *extract_args(cifar_small, test, "--limit", "60", "--subset-seed", "1"))[0] == 0
    code, _, err = run(capsys, "probe", train, "--t", "90", "--blocks", "13", "--out", tmp_path / "run",
                       "--epochs", "1", "--test-store", test)  # fmt: skip
    assert_one_line_error(code, err, "shares", "with the training rows", "would be inflated")
    assert not (tmp_path / "run").exists()  # refused before any training or writing


def test_option_mismatch_blames_the_option_not_the_sidecar(capsys):
    code, _, err = run(capsys, "blocks", FIXTURE_SPEC, "-o", "num_channels=64")
    line = assert_one_line_error(code, err, "overridden by the given option(s) num_channels=64", "shapes differ")
    assert len(line) < 600


def test_checkpoint_carrying_code_is_refused_for_safety_and_never_run(tmp_path, capsys):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "payload": Payload()}, path)
    code, _, err = run(capsys, "blocks", f"adm:{path}")
    assert_one_line_error(code, err, "contains Python objects or code (posix.mkdir)", "refused for safety",
                          "torch.load(PATH, weights_only=False)")  # fmt: skip
    assert not marker.exists()


def test_preset_mismatch_is_summarised(capsys):
    code, _, err = run(capsys, "blocks", FIXTURE_SPEC, "--preset", "256x256_diffusion_uncond")
    line = assert_one_line_error(code, err, "does not match preset 256x256_diffusion_uncond", "shapes differ (e.g.",
                                 "keys missing from the checkpoint")  # fmt: skip
    assert len(line) < 700


# ---------------------------------------------------------------- 8. store creation is atomic


def test_a_kill_while_creating_a_store_leaves_nothing_that_blocks_the_rerun(cifar_small, tmp_path, capsys):
    out = tmp_path / "store"
    # A real kill -9 between labels.npy and manifest.json, in a process of its own.
    script = (
        "import os, signal, sys, numpy as np\n"
        "import diffprobe.features.store as s\n"
        "s.write_json = lambda *a, **k: os.kill(os.getpid(), signal.SIGKILL)\n"
        "s.FeatureStore.create_or_open(sys.argv[1], {'chunk_rows': 40, 'rows': {'count': 2}}, np.zeros(2), np.arange(2))\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(out)], env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and [p.name for p in tmp_path.iterdir() if ".creating-" in p.name]
    assert run(capsys, *extract_args(cifar_small, out, "--limit", "40"))[0] == 0
    assert FeatureStore.open(out).is_complete(KEY)
    assert not [p for p in tmp_path.iterdir() if ".creating-" in p.name]  # the leftover is cleaned up


def test_a_half_store_left_by_an_older_version_is_recreated(cifar_small, tmp_path, capsys):
    out = tmp_path / "store"
    out.mkdir()
    np.save(out / "labels.npy", np.zeros(3, dtype=np.int64))  # killed before manifest.json
    assert run(capsys, *extract_args(cifar_small, out, "--limit", "40"))[0] == 0
    assert FeatureStore.open(out).rows == 40


def _create(root, barrier):
    barrier.wait()
    store = FeatureStore.create_or_open(root, {"chunk_rows": 4, "rows": {"count": 8}, "data": {"fingerprint": "x"}},
                                        np.arange(8), np.arange(8))  # fmt: skip
    return store.manifest


def test_concurrent_ranks_create_one_identical_store(tmp_path):
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    barrier = ctx.Manager().Barrier(4)
    with ctx.Pool(4) as pool:
        manifests = pool.starmap(_create, [(tmp_path / "store", barrier)] * 4)
    assert all(m == manifests[0] for m in manifests)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["indices.npy", "labels.npy", "manifest.json"]


# ---------------------------------------------------------------- issue 19: heads, probes, predict, the Python API


@pytest.fixture(scope="module")
def small_store(cifar_small, tmp_path_factory):
    """60 images of the fixture model at t=90, blocks 8 and 13, pools 1 and 2 (block 13's map is 4×4)."""
    out = tmp_path_factory.mktemp("i19") / "store"
    args = extract_args(cifar_small, out, "--limit", "60", "--pool", "1,2")
    args[5] = "8,13"
    assert main([str(a) for a in args]) == 0
    return FeatureStore.open(out)


@pytest.fixture(scope="module")
def saved_run(small_store, tmp_path_factory):
    out = tmp_path_factory.mktemp("i19run") / "run"
    assert main(["probe", str(small_store.root), "--t", "90", "--blocks", "13", "--out", str(out), "--epochs", "2"]) == 0
    return out


def probe_args(store, out, *extra):
    return ["probe", store.root, "--t", "90", "--blocks", "13", "--out", out, "--epochs", "2", *extra]


@pytest.mark.parametrize("flags, needles", [
    (["--epochs", "0"], ["epochs (--epochs) must be ≥ 1"]),
    (["--lr", "-0.1"], ["learning rate (--lr) must be > 0"]),
    (["--lr", "nan"], ["learning rate (--lr) must be a finite number"]),
    (["--lr", "0"], ["learning rate (--lr) must be > 0"]),
    (["--lr", "1e6"], ["learning rate (--lr) must be ≤ 10"]),
    (["--wd", "-1"], ["weight decay (--wd) must be ≥ 0"]),
    (["--head", "attention", "--pool", "2", "--heads", "3"], ["width 256 must be divisible by its 3 heads"]),
    (["--head", "mlp", "--hidden", "0"], ["hidden", "must be ≥ 1"]),
    (["--head", "cnn", "--pool", "2", "--width", "0"], ["width must be ≥ 1"]),
    (["--head", "attention", "--pool", "2", "--depth", "0"], ["depth must be ≥ 1"]),
    (["--val-fraction", "1.5"], ["val_fraction", "< 1"]),
])  # fmt: skip
def test_probe_flags_out_of_range_are_one_line_before_training(small_store, tmp_path, capsys, flags, needles):
    assert_one_line_error(*run(capsys, *probe_args(small_store, tmp_path / "run", *flags))[::2], *needles)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_a_diverging_rate_is_an_error_not_a_number(small_store, tmp_path, capsys, monkeypatch):
    from diffprobe.probing import config as config_module

    monkeypatch.setattr(config_module, "MAX_LR", 1e9)  # past the flag check: training itself must catch it
    code, _, err = run(capsys, *probe_args(small_store, tmp_path / "run", "--lr", "1e6", "--recipe", "paper"))
    assert_one_line_error(code, err, "training diverged at", "lower --lr")
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_probe_and_probe_online_refuse_a_single_class(cifar_small, tmp_path, capsys):
    one = tmp_path / "one-class"
    shutil.copytree(cifar_small / "cat", one / "cat")
    out = tmp_path / "store"
    assert run(capsys, *extract_args(one, out))[0] == 0
    code, _, err = run(capsys, *probe_args(FeatureStore.open(out), tmp_path / "run"))
    assert_one_line_error(code, err, "single class (cat, of 1", "nothing to classify")
    online = ["probe-online", FIXTURE_SPEC, "--data", one, "--out", tmp_path / "online", "--blocks", "13", "--t", "90",
              "--head", "linear", "--epochs", "1", "--device", "cpu", "--precision", "fp32"]  # fmt: skip
    assert_one_line_error(*run(capsys, *online)[::2], "single class (cat", "nothing to classify")


@pytest.mark.parametrize("k", ["0", "-1", "two"])
def test_predict_top_k_must_be_positive(saved_run, cifar_small, capsys, k):
    image = sorted((cifar_small / "cat").iterdir())[0]
    try:
        code, out, err = run(capsys, "predict", saved_run, image, "--top-k", k)
    except SystemExit as e:  # argparse refuses a non-integer itself, with its one usage line
        assert e.code == 2 and "Traceback" not in capsys.readouterr().err
        return
    assert_one_line_error(code, err, "top-k (--top-k)")
    assert out == ""


def _damaged_copy(saved_run, tmp_path, name: str, damage) -> object:
    copy = tmp_path / "run"
    shutil.copytree(saved_run, copy)
    damage(copy / name)
    return copy


@pytest.mark.parametrize("name, damage, needles", [
    ("head.pt", lambda p: p.write_bytes(b""), ["head.pt", "damaged"]),
    ("head.pt", lambda p: p.write_bytes(p.read_bytes()[:100]), ["head.pt", "damaged"]),
    ("config.json", lambda p: p.write_text("{not json"), ["config.json is not valid JSON"]),
    ("config.json", lambda p: p.write_text("[1, 2]"), ["holds a JSON list, not an object"]),
    ("metrics.json", lambda p: p.write_text("{"), ["metrics.json is not valid JSON"]),
    ("config.json", lambda p: p.write_text(p.read_text().replace('"input_shapes"', '"shapes"')), ["lacks the key 'input_shapes'"]),
    ("config.json", lambda p: p.write_text(p.read_text().replace('"keys"', '"kees"')), ["lacks the key 'keys'"]),
    ("config.json", lambda p: p.write_text(p.read_text().replace('"head": "linear"', '"head": "mlp"')), ["config.json"]),
    ("config.json", lambda p: p.write_text(p.read_text().replace('"head": "linear"', '"head": "resnet"')), ["unknown head 'resnet'"]),
])  # fmt: skip
def test_predict_on_a_damaged_run_is_one_line(saved_run, cifar_small, tmp_path, capsys, name, damage, needles):
    run_dir = _damaged_copy(saved_run, tmp_path, name, damage)
    image = sorted((cifar_small / "cat").iterdir())[0]
    assert_one_line_error(*run(capsys, "predict", run_dir, image)[::2], *needles)


# ---- the Python API: wrong types and values name the argument


@pytest.mark.parametrize("kwargs, needle", [
    ({"t": 10.7, "blocks": 13}, "t: expected integers"),
    ({"t": 90, "blocks": None}, "blocks: expected integers"),
    ({"t": "90,abc", "blocks": 13}, "t: expected integers"),
    ({"t": 90, "blocks": 13, "pools": [1.5]}, "pools: expected integers"),
    ({"t": 90, "blocks": 13, "draws": "2"}, "draws"),
    ({"t": 90, "blocks": 13, "noise_seed": -1}, "noise_seed must be ≥ 0"),
])  # fmt: skip
def test_feature_plan_types(kwargs, needle):
    from diffprobe import FeaturePlan

    with pytest.raises(DiffprobeError, match=needle):
        FeaturePlan(**kwargs)


def test_feature_plan_accepts_numpy_integers_and_whole_floats():
    from diffprobe import FeaturePlan

    assert FeaturePlan(t=np.int64(90), blocks=np.array([13, 8]), pools=2.0).keys[0] == FeatureKey(90, 8, 2)


@pytest.mark.parametrize("kwargs, needle", [
    ({"epochs": "2"}, "epochs \\(--epochs\\): expected an integer"),
    ({"epochs": 0}, "epochs \\(--epochs\\) must be ≥ 1"),
    ({"lr": "0.1"}, "learning rate \\(--lr\\): expected a number"),
    ({"head": "mlp", "hiden": [64]}, "unknown head option\\(s\\) 'hiden' \\(did you mean 'hidden'\\?\\)"),
    ({"head": "mlp", "hidden": "64"}, "hidden"),
    ({"weight_decays": "0.1"}, "weight_decays: expected numbers"),
    ({"head": "linear", "batchnorm": "yes"}, "batchnorm: expected True or False"),
    ({"seed": 1.5}, "seed: expected an integer"),
])  # fmt: skip
def test_probe_constructor_types(kwargs, needle):
    from diffprobe import Probe

    with pytest.raises(DiffprobeError, match=needle):
        Probe(**kwargs)


def test_another_heads_option_is_ignored_with_a_warning(caplog):
    from diffprobe import Probe

    with caplog.at_level("WARNING", logger="diffprobe"):
        probe = Probe(head="linear", hidden=[64])
    assert "the linear head takes no hidden: ignored" in caplog.text
    assert probe.config.options == {"batchnorm": False}


def test_probe_predict_checks_the_store_and_the_width(small_store, cifar_small, tmp_path):
    from diffprobe import Probe, extract, load_backbone, FeaturePlan

    probe = Probe(epochs=1).fit(small_store, FeatureKey(90, 13, 1))
    width = small_store.load(FeatureKey(90, 13, 1)).shape[1]
    assert probe.predict(small_store).shape == (small_store.rows,)
    with pytest.raises(DiffprobeError, match=rf"features for {FeatureKey(90, 13, 1).stem} must be \[N, {width}\]"):
        probe.predict(np.zeros((4, width + 1), dtype=np.float32))
    with pytest.raises(DiffprobeError, match="reads 1 setting"):
        probe.predict([np.zeros((4, width)), np.zeros((4, width))])
    other = extract(load_backbone("adm:random", image_size=32, num_channels=32, num_res_blocks=1, channel_mult="1,2,2,2",
                                  attention_resolutions="8"), str(cifar_small), FeaturePlan(t=90, blocks=13),
                    tmp_path / "other", limit=20, progress=False)  # fmt: skip
    with pytest.raises(DiffprobeError, match="another backbone or noise setting"):
        probe.predict(other)


def test_featurize_checks_its_batch_and_indices(fixture_backbone):
    from diffprobe import FeaturePlan, featurize

    plan, s = FeaturePlan(t=90, blocks=13), fixture_backbone.image_size
    x = torch.zeros(2, 3, s, s)
    with pytest.raises(DiffprobeError, match="indices: 1 given for 2 images"):
        featurize(fixture_backbone, x, plan, [0])
    with pytest.raises(DiffprobeError, match=r"add the batch dimension, x0\[None\]"):
        featurize(fixture_backbone, x[0], plan, [0, 1, 2])
    with pytest.raises(DiffprobeError, match="expected a torch.Tensor .*use torch.from_numpy"):
        featurize(fixture_backbone, x.numpy(), plan, [0, 1])
    assert featurize(fixture_backbone, x, plan, range(2))[plan.keys[0]].shape[0] == 2


def test_classifier_says_which_pixel_range_it_expects(saved_run, cifar_small, caplog):
    from diffprobe import Classifier

    model = Classifier.from_run(saved_run, device="cpu")
    s = model.backbone.image_size
    image = sorted((cifar_small / "cat").iterdir())[0]
    pixels = model.to_batch([image])
    with pytest.raises(DiffprobeError, match=r"expected pixels in \[-1, 1\].*looks like \[0, 255\]"):
        model.predict((pixels + 1) * 127.5)
    with pytest.raises(DiffprobeError, match="got a torch.uint8 tensor"):
        model.predict(((pixels + 1) * 127.5).to(torch.uint8))
    with pytest.raises(DiffprobeError, match=rf"tensor \[B, 3, {s}, {s}\]"):
        model.predict(torch.zeros(1, 3, s + 1, s + 1))
    with caplog.at_level("WARNING", logger="diffprobe"):
        model.predict(torch.full((1, 3, s, s), 0.5))
    assert "expects [-1, 1]" in caplog.text
    assert model.predict(pixels) == model.predict([image])


@pytest.mark.parametrize("demo, needle", [
    ("[1, 2]", "holds a JSON list, not an object"),
    ("{not json", "is not valid JSON"),
    ('{"checkpoint": "x.pt"}', "is not a demo result (no data, sweep"),
])  # fmt: skip
def test_card_with_a_bad_demo_result_is_one_line(cifar_small, tmp_path, capsys, demo, needle):
    from test_card import _checkpoint

    _checkpoint(tmp_path / "ckpt", cifar_small)
    (tmp_path / "demo.json").write_text(demo)
    assert_one_line_error(*run(capsys, "card", tmp_path / "ckpt", "--demo", tmp_path / "demo.json")[::2], needle)


@pytest.mark.parametrize("drop", ["config", "probe"])
def test_card_json_without_its_keys_is_one_line(cifar_small, tmp_path, capsys, drop):
    import json

    from test_card import _checkpoint

    _checkpoint(tmp_path / "ckpt", cifar_small)
    card_path = tmp_path / "ckpt" / "card.json"
    card = json.loads(card_path.read_text())
    del card[drop]
    card_path.write_text(json.dumps(card))
    assert_one_line_error(*run(capsys, "card", tmp_path / "ckpt")[::2], f"lacks the key '{drop}'", "export the folder again")


# ---- issue 19: security, backbones, generation


class _Mkdir:
    """Unpickling this creates a folder: the proof that a pickle's code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _evil_pickle(path, marker, tensors=None):
    torch.save({**(tensors or {"weight": torch.zeros(1)}), "payload": _Mkdir(marker)}, path)
    return path


def _tiny_folder(root, size=32):
    """Two classes of four random PNGs: the smallest ImageFolder the commands accept."""
    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / cls / f"{i}.png")
    return root


def _unet_pipeline(folder, **overrides):
    from test_diffusers import save_unet

    return save_unet(folder, **overrides)


REFUSED = ("contains Python objects or code (posix.mkdir)", "refused for safety")


def test_inception_weights_carrying_code_are_refused_and_never_run(tmp_path, capsys):
    marker = tmp_path / "ran"
    weights = _evil_pickle(tmp_path / "evil.pth", marker)
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 32, 32, 3), dtype=np.uint8))
    code, _, err = run(capsys, "fid", tmp_path / "s.npz", "--real", _tiny_folder(tmp_path / "real"), "--inception-weights", weights)
    assert_one_line_error(code, err, str(weights), *REFUSED)
    assert not marker.exists()  # torch-fidelity's own torch.load(weights_only=False) would have run it


def test_empty_inception_weights_are_one_line(tmp_path, capsys):
    (tmp_path / "empty.pth").write_bytes(b"")
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((2, 32, 32, 3), dtype=np.uint8))
    code, _, err = run(capsys, "fid", tmp_path / "s.npz", "--real", _tiny_folder(tmp_path / "real"), "--inception-weights",
                       tmp_path / "empty.pth")  # fmt: skip
    assert_one_line_error(code, err, "cannot read Inception weights", "empty")


def _as_bin(folder, safetensors_name, bin_name, marker):
    """Replace a component's safetensors weights by a .bin pickle of the same tensors plus code."""
    from safetensors.torch import load_file

    weights = folder / safetensors_name
    tensors = load_file(weights)
    weights.unlink()
    return _evil_pickle(weights.with_name(bin_name), marker, tensors)


def test_diffusers_bin_carrying_code_is_refused_and_never_run(tmp_path, capsys):
    marker = tmp_path / "ran"
    folder = Path(_unet_pipeline(tmp_path / "pipe"))
    evil = _as_bin(folder / "unet", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin", marker)
    code, _, err = run(capsys, "blocks", f"diffusers:{folder}")
    assert_one_line_error(code, err, str(evil), *REFUSED)
    assert not marker.exists()


def test_clip_text_encoder_bin_carrying_code_is_refused(tmp_path, capsys):
    from latent_models import save_sd

    marker = tmp_path / "ran"
    folder = Path(save_sd(tmp_path / "sd"))
    evil = _as_bin(folder / "text_encoder", "model.safetensors", "pytorch_model.bin", marker)
    code, _, err = run(capsys, "blocks", f"diffusers:{folder}")
    assert_one_line_error(code, err, str(evil), *REFUSED)  # was: an UnpicklingError traceback
    assert not marker.exists()


def _pretrain(capsys, data, out, *extra):
    return run(capsys, "pretrain", "--data", data, "--out", out, "--steps", "2", "--batch-size", "2", "--val-fraction", "0.25",
               "--device", "cpu", "--precision", "fp32", "-o", "num_channels=32", "-o", "channel_mult=1,2", "-o", "num_res_blocks=1",
               "-o", "attention_resolutions=", *extra)  # fmt: skip


def test_training_state_carrying_code_is_refused_and_never_run(tmp_path, capsys):
    marker, out = tmp_path / "ran", tmp_path / "run"
    out.mkdir()
    state = _evil_pickle(out / "training-state.pt", marker, {"config": torch.zeros(1)})
    code, _, err = _pretrain(capsys, _tiny_folder(tmp_path / "data"), out)
    assert_one_line_error(code, err, str(state), *REFUSED)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["empty", "cut short"])
def test_damaged_training_state_says_how_to_go_on(damage, tmp_path, capsys):
    data, out = _tiny_folder(tmp_path / "data"), tmp_path / "run"
    assert _pretrain(capsys, data, out)[0] == 0
    state = out / "training-state.pt"
    state.write_bytes(b"" if damage == "empty" else state.read_bytes()[:3000])
    code, _, err = _pretrain(capsys, data, out, "--steps", "3")
    assert_one_line_error(code, err, f"cannot read training state {state}", damage, "move it aside",
                          f"--init-from {out / 'ema.pt'}")  # fmt: skip
    state.rename(tmp_path / "aside.pt")  # what the line says: it goes on from the weights saved with the state
    code, outp, err = _pretrain(capsys, data, out, "--steps", "3", "--init-from", out / "ema.pt")
    assert code == 0, err
    assert outp.startswith("step 3:")


def test_cka_b_weights_carrying_code_is_one_line(cifar_small, tmp_path, capsys):
    store, marker = tmp_path / "store", tmp_path / "ran"
    assert run(capsys, *extract_args(cifar_small, store, "--limit", "40"))[0] == 0
    weights = _evil_pickle(tmp_path / "evil.pth", marker)
    code, _, err = run(capsys, "cka", "--a", store, "--b", "torchvision:resnet18", "--b-weights", weights, "--data", cifar_small,
                       "--out", tmp_path / "cka")  # fmt: skip
    assert_one_line_error(code, err, str(weights), *REFUSED)  # was: an UnpicklingError traceback
    assert not marker.exists()


def test_cka_b_weights_of_another_architecture_name_the_keys(cifar_small, tmp_path, capsys):
    store = tmp_path / "store"
    assert run(capsys, *extract_args(cifar_small, store, "--limit", "40"))[0] == 0
    torch.save({"fc.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    code, _, err = run(capsys, "cka", "--a", store, "--b", "torchvision:resnet18", "--b-weights", tmp_path / "other.pth",
                       "--data", cifar_small, "--out", tmp_path / "cka")  # fmt: skip
    assert_one_line_error(code, err, "other.pth does not match torchvision resnet18", "shapes differ", "keys missing")


def _edit_unet_weights(folder, edit):
    from safetensors.torch import load_file, save_file

    path = Path(folder) / "unet" / "diffusion_pytorch_model.safetensors"
    save_file(edit(load_file(path)), path)


@pytest.mark.parametrize("edit, needles", [
    (lambda w: {**w, "foreign.weight": torch.zeros(3)}, ["1 key(s) in the weights but not in the model of config.json: foreign.weight"]),
    (lambda w: {k: v for k, v in w.items() if not k.startswith("conv_out")},
     ["2 key(s) missing from the weights (they would be random): conv_out.bias, conv_out.weight"]),
    (lambda w: {k: v for k, v in w.items() if not k.startswith("mid_block")}, ["key(s) missing from the weights", ", ..."]),
    (lambda w: {**w, "conv_in.weight": torch.zeros(32, 3, 5, 5)},
     ["tensor conv_in.weight has shape [32, 3, 5, 5] in the weights", "makes it [32, 3, 3, 3]"]),
])  # fmt: skip
def test_diffusers_weights_that_do_not_fit_the_config_are_refused(edit, needles, tmp_path, capsys):
    folder = _unet_pipeline(tmp_path / "pipe")
    _edit_unet_weights(folder, edit)
    code, _, err = run(capsys, "blocks", f"diffusers:{folder}")
    line = assert_one_line_error(code, err, f"unet/ of {folder}", *needles)
    assert len(line) < 500


@pytest.mark.parametrize("broken", ["unet/config.json", "model_index.json"])
def test_invalid_pipeline_json_names_the_file(broken, tmp_path, capsys):
    folder = Path(_unet_pipeline(tmp_path / "pipe"))
    if broken == "model_index.json":  # diffprobe reads it when no component config names the class
        shutil.rmtree(folder / "unet")
    (folder / broken).write_text('{"_class_name": "UNet2DModel",')
    code, _, err = run(capsys, "blocks", f"diffusers:{folder}")
    assert_one_line_error(code, err, f"{folder / broken} is not valid JSON")


def test_pipeline_without_scheduler_is_refused_unless_the_schedule_is_named(tmp_path, capsys):
    folder = Path(_unet_pipeline(tmp_path / "pipe"))
    shutil.rmtree(folder / "scheduler")
    code, _, err = run(capsys, "blocks", f"diffusers:{folder}")
    assert_one_line_error(code, err, "no scheduler/scheduler_config.json", "-o schedule=linear|scaled_linear|squaredcos_cap_v2")
    code, out, err = run(capsys, "blocks", f"diffusers:{folder}", "-o", "schedule=scaled_linear")
    assert code == 0, err
    assert "schedule diffusers-scaled_linear-1000" in out


def _diffusers_store(capsys, folder, data, out):
    code, _, err = run(capsys, "extract", f"diffusers:{folder}", "--data", data, "--blocks", "5", "--t", "90", "--limit", "40",
                       "--out", out, "--batch-size", "40", "--device", "cpu", "--precision", "fp32")  # fmt: skip
    assert code == 0, err
    return FeatureStore.open(out)


def test_a_copied_pipeline_is_the_same_backbone_and_other_weights_are_not(cifar_small, tmp_path, capsys):
    from diffprobe import load_backbone
    from diffprobe.probing.classifier import Classifier
    from diffprobe.probing.estimator import Probe

    folder = Path(_unet_pipeline(tmp_path / "sd"))
    store = _diffusers_store(capsys, folder, cifar_small, tmp_path / "store")
    assert run(capsys, "probe", tmp_path / "store", "--t", "90", "--blocks", "5", "--out", tmp_path / "run", "--epochs", "1")[0] == 0
    shutil.copytree(folder, tmp_path / "sd2")  # cp -r sd sd2
    copy = load_backbone(f"diffusers:{tmp_path / 'sd2'}")
    assert copy.fingerprint() == store.manifest["backbone"]["fingerprint"]  # was: the path was part of it
    Classifier(copy, None, Probe.load(tmp_path / "run"))  # the saved run accepts the copy (was: "its weights or flags differ")
    _unet_pipeline(tmp_path / "other")  # same config, then other weights under it
    _edit_unet_weights(tmp_path / "other", lambda w: {k: v + 1e-3 if k == "conv_in.bias" else v for k, v in w.items()})
    with pytest.raises(DiffprobeError, match="its weights or flags differ"):
        Classifier(load_backbone(f"diffusers:{tmp_path / 'other'}"), None, Probe.load(tmp_path / "run"))
    # `mv sd moved`: predict says how to point at it, and then predicts with it.
    shutil.move(folder, tmp_path / "moved")
    image = sorted((cifar_small / "cat").iterdir())[0]
    assert_one_line_error(*run(capsys, "predict", tmp_path / "run", image)[::2], "if it moved, point to it with --backbone SPEC")
    code, out, err = run(capsys, "predict", tmp_path / "run", image, "--backbone", f"diffusers:{tmp_path / 'moved'}", "--top-k", "1")
    assert code == 0 and out.startswith(str(image)), err
    assert_one_line_error(*run(capsys, "predict", tmp_path / "run", image, "--backbone", f"diffusers:{tmp_path / 'other'}")[::2],
                          "its weights or flags differ")  # fmt: skip


def test_a_store_resumes_with_a_copied_pipeline(cifar_small, tmp_path, capsys):
    # Old stores written with the path in the fingerprint are refused (the safe direction): their
    # fingerprint cannot be told from that of other weights, so they are re-extracted once.
    folder = Path(_unet_pipeline(tmp_path / "sd"))
    store = _diffusers_store(capsys, folder, cifar_small, tmp_path / "store")
    before = store.load(store.complete_keys()[0]).copy()
    shutil.copytree(folder, tmp_path / "sd2")
    again = _diffusers_store(capsys, tmp_path / "sd2", cifar_small, tmp_path / "store")
    assert np.array_equal(again.load(again.complete_keys()[0]), before)


@pytest.mark.parametrize("eta", ["nan", "-5", "1.5", "inf"])
def test_sample_refuses_an_eta_outside_0_to_1(eta, tmp_path, capsys):
    code, _, err = run(capsys, "sample", FIXTURE_SPEC, "--out", tmp_path / "s", "--device", "cpu", "--num", "1", "--steps", "2", "--eta", eta)
    assert_one_line_error(code, err, f"--eta {float(eta)}: expected a number from 0")
    assert not (tmp_path / "s" / "samples.npz").exists()  # was: black images and the success line


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps 0: expected the total number of optimiser steps, at least 1"),
    (["--steps", "-5"], "--steps -5: expected"),
    (["--batch-size", "0"], "--batch-size 0: expected at least 1"),
    (["--save-every", "0"], "--save-every 0: expected a checkpoint every N steps"),
    (["--lr", "-1"], "--lr -1.0: expected a learning rate above 0"),
    (["--lr", "nan"], "--lr nan: expected a learning rate above 0"),
])  # fmt: skip
def test_pretrain_refuses_bad_settings(flags, message, tmp_path, capsys):
    code, _, err = _pretrain(capsys, _tiny_folder(tmp_path / "data"), tmp_path / "run", *flags)
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "run").exists()  # was (--steps 0): a success line naming files never written


def test_sigterm_stops_pretrain_with_143_after_saving(tmp_path):
    data, out = _tiny_folder(tmp_path / "data"), tmp_path / "run"
    args = ["pretrain", "--data", str(data), "--out", str(out), "--steps", "100000", "--batch-size", "2", "--val-fraction", "0.25",
            "--save-every", "1", "--device", "cpu", "--precision", "fp32", "-o", "num_channels=32", "-o", "channel_mult=1,2",
            "-o", "num_res_blocks=1", "-o", "attention_resolutions="]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "diffprobe", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "training-state.pt").exists():  # the first save: the loop (and its handler) is running
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 143, stderr  # was 0, with the success line
    assert "step " not in stdout  # no "step N: ... ema.pt" success line
    stopped = [line for line in stderr.splitlines() if line.startswith("diffprobe: stopped by SIGTERM")]
    assert len(stopped) == 1 and "rerun the same command to resume" in stopped[0] and "Traceback" not in stderr, stderr
    saved = torch.load(out / "training-state.pt", weights_only=True)["state"]["step"]
    assert 1 <= saved < 100000


# ---- issue 19: store, data, extraction


@pytest.mark.parametrize("flags, message", [
    (["--limit", "-7"], "--limit -7: expected a number of images, at least 1"),  # was a 193-row store
    (["--limit", "0"], "--limit 0: expected a number of images, at least 1"),  # was an empty store, "complete"
    (["--batch-size", "0"], "--batch-size 0: expected a number of images per pass, at least 1"),
    (["--batch-size", "-4"], "--batch-size -4: expected a number of images per pass, at least 1"),
    (["--image-size", "640000"], "--image-size 640000: expected at most 8192 pixels a side"),
    (["--image-size", "0"], "--image-size 0: expected a positive side length in pixels"),
    (["--image-size", "-64"], "--image-size -64: expected a positive side length in pixels"),
])  # fmt: skip
def test_extract_refuses_bad_counts_and_sizes(flags, message, cifar_small, tmp_path, capsys):
    code, _, err = run(capsys, *extract_args(cifar_small, tmp_path / "store", *flags))
    assert_one_line_error(code, err, message)
    assert not (tmp_path / "store").exists()  # refused before anything was created


def test_another_batch_size_resumes_in_the_stores_own_chunks(cifar_small, tmp_path, capsys, caplog):
    out, straight = tmp_path / "store", tmp_path / "straight"
    assert run(capsys, *extract_args(cifar_small, straight, "--limit", "80"))[0] == 0
    assert run(capsys, *extract_args(cifar_small, out, "--limit", "80"))[0] == 0
    done = out / "features" / f"{KEY.stem}.done"
    done.write_bytes(b"\x01\x00")  # the second chunk still to do
    with caplog.at_level("INFO", logger="diffprobe"):
        code, _, err = run(capsys, *extract_args(cifar_small, out, "--limit", "80", "--batch-size", "32"))
    assert code == 0, err
    assert "made with --batch-size 40: resuming in its own chunks of 40 rows" in caplog.text
    store = FeatureStore.open(out)
    assert store.chunk_rows == 40 and store.is_complete(KEY)
    assert _array_bytes(store, KEY) == _array_bytes(FeatureStore.open(straight), KEY)


@pytest.fixture(scope="module")
def two_chunk_store(cifar_small, tmp_path_factory):
    """A finished 80-row store in two chunks of 40, copied by each test that damages it."""
    out = tmp_path_factory.mktemp("issue19") / "store"
    assert main([str(a) for a in extract_args(cifar_small, out, "--limit", "80")]) == 0
    return out


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _probe(capsys, store, tmp_path):
    return run(capsys, "probe", store, "--t", "90", "--blocks", "13", "--out", tmp_path / "run", "--epochs", "1")


@pytest.mark.parametrize("damage, file, problem, repair", [
    ("truncated", f"{KEY.stem}.npy", "it is truncated (6000 of 10368 bytes)", "1 finished chunk(s) past the cut are recomputed, the other 1 kept"),
    ("pickle", f"{KEY.stem}.npy", "it holds Python objects (dtype object), expected float16", "moved aside to t0090_b13_p1.npy.damaged"),
    ("short", f"{KEY.stem}.done", "it has 1 byte(s), expected 2 (one per chunk of rows)", "cannot tell which chunks are finished"),
    ("garbled", f"{KEY.stem}.done", "it holds bytes other than 0 (to do) and 1 (done)", "cannot tell which chunks are finished"),
])  # fmt: skip
def test_damaged_feature_files_are_one_line_and_a_rerun_repairs_them(damage, file, problem, repair, two_chunk_store,
                                                                      cifar_small, tmp_path, capsys, caplog):  # fmt: skip
    out = tmp_path / "store"
    shutil.copytree(two_chunk_store, out)
    path, marker = out / "features" / file, tmp_path / "unpickled"
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:6000])  # chunk 0 whole, chunk 1 cut
    elif damage == "pickle":  # a pickle inside must never be loaded (it would run os.mkdir)
        np.save(path, np.array([Payload(marker)] * 80, dtype=object), allow_pickle=True)
    else:
        path.write_bytes(b"\x01" if damage == "short" else b"\x01\x07")  # the short one used to count as complete
    code, _, err = _probe(capsys, out, tmp_path)
    assert_one_line_error(code, err, f"{path} is damaged: {problem}", "Rerun the extract command", "--overwrite")
    assert not (tmp_path / "run" / "head.pt").exists() and not marker.exists()

    with caplog.at_level("WARNING", logger="diffprobe"):
        code, _, err = run(capsys, *extract_args(cifar_small, out, "--limit", "80"))
    assert code == 0, err
    assert repair in caplog.text and not marker.exists()
    assert _array_bytes(FeatureStore.open(out), KEY) == _array_bytes(FeatureStore.open(two_chunk_store), KEY)


@pytest.mark.parametrize("damage, problem", [
    ("truncated", "not a readable array of numbers"),
    ("short", "it holds 70 values, expected 80 class labels"),
    ("negative", "it holds -1, expected class labels from 0 to 9"),
    ("too big", "it holds 10, expected class labels from 0 to 9"),
    ("float", "it holds float64 values, expected integer class labels"),
    ("shuffled", "it disagrees with dataset_labels.npy on"),  # used to train silently on the wrong labels
])  # fmt: skip
def test_damaged_labels_are_one_line_and_a_rerun_rewrites_them(damage, problem, two_chunk_store, cifar_small, tmp_path, capsys):
    out = tmp_path / "store"
    shutil.copytree(two_chunk_store, out)
    path, labels = out / "labels.npy", np.load(two_chunk_store / "labels.npy")
    bad = {"short": labels[:70], "float": labels.astype(np.float64), "shuffled": np.random.default_rng(0).permutation(labels),
           "negative": np.where(np.arange(80) == 5, -1, labels), "too big": np.where(np.arange(80) == 5, 10, labels)}  # fmt: skip
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:300])
    else:
        np.save(path, bad[damage])
    code, _, err = _probe(capsys, out, tmp_path)
    assert_one_line_error(code, err, f"{path} is damaged: {problem}", "Rerun the extract command")
    assert not (tmp_path / "run" / "head.pt").exists()
    assert run(capsys, *extract_args(cifar_small, out, "--limit", "80"))[0] == 0
    np.testing.assert_array_equal(FeatureStore.open(out).labels, labels)
    assert _array_bytes(FeatureStore.open(out), KEY) == _array_bytes(FeatureStore.open(two_chunk_store), KEY)


def test_full_disk_is_refused_before_mapping_and_the_rerun_completes(two_chunk_store, cifar_small, tmp_path, capsys, monkeypatch):
    out = tmp_path / "store"
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=5000))  # writing the map would SIGBUS
    code, _, err = run(capsys, *extract_args(cifar_small, out, "--limit", "80"))
    assert_one_line_error(code, err, "not enough free space for the features of", "they need 14.3 KB, the disk has 5.0 KB free",
                          "rerun the same command")  # fmt: skip
    assert not list(out.glob("features/*.npy"))  # refused before any array was made
    monkeypatch.setattr(shutil, "disk_usage", real)
    assert run(capsys, *extract_args(cifar_small, out, "--limit", "80"))[0] == 0
    assert _array_bytes(FeatureStore.open(out), KEY) == _array_bytes(FeatureStore.open(two_chunk_store), KEY)


def test_disk_filling_during_extraction_is_one_line_and_keeps_finished_chunks(two_chunk_store, cifar_small, tmp_path, capsys,
                                                                             monkeypatch):  # fmt: skip
    import errno

    out, real = tmp_path / "store", os.pwrite

    def pwrite(fd, data, offset):
        if offset == 1:  # marking the second chunk done
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)
    code, _, err = run(capsys, *extract_args(cifar_small, out, "--limit", "80"))
    assert_one_line_error(code, err, f"no space left on the disk of {out} while writing {KEY.stem}", "free space and rerun")
    assert FeatureStore.open(out).done_chunks(KEY).tolist() == [True, False]
    monkeypatch.setattr(os, "pwrite", real)
    assert run(capsys, *extract_args(cifar_small, out, "--limit", "80"))[0] == 0
    assert _array_bytes(FeatureStore.open(out), KEY) == _array_bytes(FeatureStore.open(two_chunk_store), KEY)


def test_transfer_over_two_datasets_of_one_folder_name_finishes_both(cifar_small, tmp_path, capsys):
    for parent, start in (("a", 0), ("b", 3)):  # two different datasets, both called "cifar"
        for folder in sorted(cifar_small.iterdir()):
            for image in sorted(folder.iterdir())[start:start + 3]:
                (tmp_path / parent / "cifar" / folder.name).mkdir(parents=True, exist_ok=True)
                shutil.copy(image, tmp_path / parent / "cifar" / folder.name / image.name)
    out = tmp_path / "transfer"
    code, _, err = run(capsys, "transfer", FIXTURE_SPEC, "--datasets", f"{tmp_path / 'a' / 'cifar'},{tmp_path / 'b' / 'cifar'}",
                          "--t", "90", "--blocks", "13", "--out", out, "--device", "cpu", "--precision", "fp32",
                          "--no-controls", "--batch-size", "30", "--val-fraction", "0.34")  # fmt: skip
    assert code == 0, err
    for name in ("a-cifar", "b-cifar"):
        assert FeatureStore.open(out / name).is_complete(KEY), name
        assert name in (out / "transfer.md").read_text()
    assert (FeatureStore.open(out / "a-cifar").manifest["data"]["fingerprint"]
            != FeatureStore.open(out / "b-cifar").manifest["data"]["fingerprint"])  # fmt: skip


@pytest.mark.parametrize("member", ["../evil.txt", "link-out"])
def test_archive_member_escaping_its_folder_is_named(member, tmp_path, capsys, isolated_cache):
    import io
    import tarfile

    archive = tmp_path / "unsafe.tar"
    with tarfile.open(archive, "w") as tar:
        image = (tmp_path / "cat.png")
        Image.new("RGB", (8, 8)).save(image)
        tar.add(image, "data/cat/cat.png")
        info = tarfile.TarInfo(member)
        if member == "link-out":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
        else:
            info.size = 4
            tar.addfile(info, io.BytesIO(b"evil"))
    code, _, err = run(capsys, *extract_args(archive, tmp_path / "store"))
    line = assert_one_line_error(code, err, f"cannot unpack {archive}: it holds an unsafe member {member!r}", "rebuild the archive")
    assert "truncated" not in line and "download or copy it again" not in line
    assert not list(isolated_cache.rglob("evil.txt")) and not (tmp_path / "store").exists()


def test_oversized_image_is_one_line_naming_the_limit(two_chunk_store, tmp_path, capsys, monkeypatch):
    import PIL.Image

    image = tmp_path / "big.png"
    Image.new("RGB", (64, 64), (200, 10, 10)).save(image)
    assert run(capsys, "probe", two_chunk_store, "--t", "90", "--blocks", "13", "--out", tmp_path / "run", "--epochs", "1")[0] == 0
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # stands in for a 14000×14000 PNG (a traceback before)
    code, _, err = run(capsys, "predict", tmp_path / "run", image, "--device", "cpu")
    assert_one_line_error(code, err, f"image {image} is 64×64 = 4,096 pixels, over the limit of 1,000",
                          "DIFFPROBE_MAX_IMAGE_PIXELS=4096")  # fmt: skip
    assert PIL.Image.MAX_IMAGE_PIXELS == 1000  # PIL's own setting is left as it was
    monkeypatch.setenv("DIFFPROBE_MAX_IMAGE_PIXELS", "5000")
    code, text, err = run(capsys, "predict", tmp_path / "run", image, "--device", "cpu")
    assert code == 0 and str(image) in text, err


@pytest.mark.parametrize("limit", ["-7", "0"])
def test_every_subset_refuses_non_positive_limits(limit, cifar_small, tmp_path, capsys):
    """The check lives in stratified_subset, so commands other than extract (baseline, online probes) share it."""
    code, _, err = run(capsys, "baseline", "train", "--data", cifar_small, "--out", tmp_path / "b", "--limit", limit,
                       "--epochs", "1", "--device", "cpu")  # fmt: skip
    assert_one_line_error(code, err, f"a subset of {limit} images (--limit {limit}): expected at least 1")


@pytest.mark.parametrize("data, kwargs, needle", [
    ([1, 2, 3], {}, "data: expected a dataset spec .* got list"),
    (None, {"limit": "50"}, "limit: expected an integer, got '50'"),
    (None, {"batchsize": 8}, "unknown extract option\\(s\\) 'batchsize' \\(did you mean 'batch_size'\\?\\)"),
    (None, {"options": "fast"}, "options: expected an ExtractOptions"),
])  # fmt: skip
def test_extract_from_python_names_a_wrong_argument(fixture_backbone, cifar_small, tmp_path, data, kwargs, needle):
    from diffprobe import FeaturePlan, extract

    with pytest.raises(DiffprobeError, match=needle):
        extract(fixture_backbone, str(cifar_small) if data is None else data, FeaturePlan(t=90, blocks=13), tmp_path / "o", **kwargs)
    assert not (tmp_path / "o").exists()

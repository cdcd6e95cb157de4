"""Heads, fast probes, sweep, probe runs and predict, on real CIFAR-10 features of the fixture model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from conftest import FIXTURE_SPEC
from diffprobe import DiffprobeError, load_backbone
from diffprobe.cli import main
from diffprobe.data import open_dataset
from diffprobe.probing.fastprobe import knn, logistic_regression
from diffprobe.features.plan import FeaturePlan
from diffprobe.features.extract import extract
from diffprobe.probing.heads import HEADS, build_head
from diffprobe.precision import choose_compute
from diffprobe.probing.config import ProbeConfig, search_grid
from diffprobe.probing.train import probe
from diffprobe.features.roles import store_roles
from diffprobe.features.store import FeatureKey, FeatureStore

CPU = choose_compute("cpu")  # what this CPU runs fast: bf16 where it is native, fp32 on AVX2-only CPUs (bf16 ~40× slower there)


@pytest.fixture(scope="module")
def store(cifar_small, tmp_path_factory) -> FeatureStore:
    out = tmp_path_factory.mktemp("probing") / "store"
    return extract(load_backbone(FIXTURE_SPEC), open_dataset(cifar_small), FeaturePlan(t=[10, 90], blocks=[3, 13], pools=[1, 2]), out,
                   compute=CPU, progress=False)  # fmt: skip


@pytest.mark.parametrize("kind", HEADS)
def test_every_head_maps_features_to_logits(kind):
    shapes = [(8, 2)] if kind != "fusion" else [(8, 2), (4, 1)]
    options = {"width": 16, "heads": 2} if kind in ("attention", "fusion") else {}
    head = build_head(kind, shapes, 5, **options)
    xs = [torch.randn(3, c * p * p) for c, p in shapes]
    out = head(xs) if kind == "fusion" else head(xs[0])
    assert out.shape == (3, 5)
    out.sum().backward()


def test_head_input_errors():
    with pytest.raises(DiffprobeError, match="unknown head"):
        build_head("transformer", [(8, 1)], 3)
    with pytest.raises(DiffprobeError, match="use the fusion head"):
        build_head("linear", [(8, 1), (8, 1)], 3)


def test_logistic_regression_agrees_with_scikit_learn(store):
    x, y = store.load(FeatureKey(10, 3, 2)), store.labels
    val = store.split(0.2, 0)
    score, model = logistic_regression(x[~val], y[~val], x[val], y[val])
    scaler = StandardScaler().fit(x[~val])
    sk = LogisticRegression(C=score.params["C"], max_iter=5000).fit(scaler.transform(x[~val]), y[~val])
    sk_top1 = 100 * sk.score(scaler.transform(x[val]), y[val])
    assert abs(score.top1 - sk_top1) <= 0.5 + 1e-9, (score.top1, sk_top1)
    assert score.top1 > 20  # chance is 10
    assert model["weights"].shape == (x.shape[1] + 1, 10)


def test_knn_votes_for_the_nearest_classes():
    train = np.array([[1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9]], dtype=np.float32)
    score = knn(train, np.array([0, 0, 1, 1]), np.array([[1, 0.05], [0.05, 1]], dtype=np.float32), np.array([0, 1]), k=2)
    assert score.top1 == 100.0


def test_fast_probe_inputs_are_checked():
    with pytest.raises(DiffprobeError, match="empty"):
        logistic_regression(np.zeros((0, 3)), np.zeros(0, int), np.zeros((2, 3)), np.zeros(2, int))
    with pytest.raises(DiffprobeError, match="single class"):
        logistic_regression(np.ones((4, 3)), np.zeros(4, int), np.ones((2, 3)), np.zeros(2, int))


def test_probe_run_is_reproducible_and_complete(store, tmp_path):
    key = [FeatureKey(10, 3, 2)]
    a = probe(store, key, tmp_path / "a", ProbeConfig("mlp", epochs=4, seed=3), progress=False)
    b = probe(store, key, tmp_path / "b", ProbeConfig("mlp", epochs=4, seed=3), progress=False)
    assert a["select"] == b["select"] and a["report"] == b["report"] and a["history"] == b["history"]
    for name in ("config.json", "head.pt", "metrics.json", "curves.png", "confusion.png"):
        assert (tmp_path / "a" / name).is_file()
    assert set(a["report"]["per_class_top1"]) == set(store.classes)


def test_learning_rate_and_weight_decay_are_chosen_on_validation(store, tmp_path):
    m = probe(store, [FeatureKey(90, 13, 1)], tmp_path / "r", ProbeConfig("linear", weight_decays=(0.0, 10.0), epochs=3), progress=False)
    trials = m["trials"]
    lrs, _ = search_grid("modern", "linear")
    assert [(t["lr"], t["weight_decay"]) for t in trials] == [(lr, wd) for lr in lrs for wd in (0.0, 10.0)]
    best = max(trials, key=lambda t: t["select_top1"])
    assert m["chosen"]["weight_decay"] == best["weight_decay"] and m["chosen"]["lr"] == best["lr"]
    assert m["select"]["top1"] == pytest.approx(best["select_top1"])


def test_probe_errors(store, tmp_path):
    with pytest.raises(DiffprobeError, match="no complete features for t=10 block=25"):
        probe(store, [FeatureKey(10, 25, 1)], tmp_path / "r", progress=False)
    with pytest.raises(DiffprobeError, match="use --head fusion"):
        probe(store, [FeatureKey(10, 3, 1), FeatureKey(90, 3, 1)], tmp_path / "r", ProbeConfig("linear"), progress=False)


def test_cli_probe_predict_round_trip(store, tmp_path, capsys, cifar_small):
    run = tmp_path / "run"
    assert main(["probe", str(store.root), "--t", "10", "--block", "3", "--pool", "2", "--head", "linear",
                 "--epochs", "3", "--out", str(run)]) == 0  # fmt: skip
    assert "images no choice saw (held-out report rows of" in capsys.readouterr().out
    images = sorted((cifar_small / "ship").iterdir())[:2]
    odd = tmp_path / "odd.png"
    Image.new("LA", (50, 20), (128, 255)).save(odd)
    assert main(["predict", str(run), *map(str, images), str(odd), "--json", "--top-k", "3"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 3 and len(results[0]["top"]) == 3
    assert abs(sum(t["probability"] for t in results[0]["top"])) <= 1.0 + 1e-6
    # Same image, same answer, whatever else is in the batch.
    assert main(["predict", str(run), str(images[0]), "--json"]) == 0
    alone = json.loads(capsys.readouterr().out)
    assert alone[0]["top"][0]["label"] == results[0]["top"][0]["label"]
    assert alone[0]["top"][0]["probability"] == pytest.approx(results[0]["top"][0]["probability"], abs=1e-4)


def test_predict_errors(store, tmp_path, capsys):
    run = tmp_path / "run"
    probe(store, [FeatureKey(10, 3, 1)], run, ProbeConfig("linear", epochs=1), progress=False)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    assert main(["predict", str(run), str(bad)]) == 2
    assert "cannot read image" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), str(bad)]) == 2
    assert "is not a probe run" in capsys.readouterr().err
    config = json.loads((run / "config.json").read_text())
    config["format"] = 99
    (run / "config.json").write_text(json.dumps(config))
    assert main(["predict", str(run), str(bad)]) == 2
    assert "incompatible diffprobe" in capsys.readouterr().err
    config["format"] = 1
    config["input_shapes"] = [[99, 1]]
    (run / "config.json").write_text(json.dumps(config))
    assert main(["predict", str(run), str(bad)]) == 2
    assert "does not fit the head" in capsys.readouterr().err


def test_predict_refuses_a_changed_backbone(store, tmp_path, capsys):
    import shutil

    from conftest import FIXTURE_CKPT

    ckpt = tmp_path / "model.pt"
    shutil.copy(FIXTURE_CKPT, ckpt)
    shutil.copy(FIXTURE_CKPT.with_suffix(".json"), tmp_path / "model.json")
    run = tmp_path / "run"
    probe(store, [FeatureKey(10, 3, 1)], run, ProbeConfig("linear", epochs=1), progress=False)
    config = json.loads((run / "config.json").read_text())
    config["loaded_with"]["spec"] = f"adm:{ckpt}"
    (run / "config.json").write_text(json.dumps(config))
    sd = torch.load(ckpt, weights_only=True)
    sd["out.2.bias"] += 1
    torch.save(sd, ckpt)
    dummy = tmp_path / "x.png"
    Image.new("RGB", (32, 32)).save(dummy)
    assert main(["predict", str(run), str(dummy)]) == 2
    assert "not the one this run was trained on" in capsys.readouterr().err
    ckpt.unlink()
    assert main(["predict", str(run), str(dummy)]) == 2
    assert "cannot load the backbone this run was trained on" in capsys.readouterr().err


def test_sweep_writes_csv_heatmaps_best_and_controls(cifar_small, tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["sweep", FIXTURE_SPEC, "--data", str(cifar_small), "--blocks", "3,8,13", "--t", "10,300",
                 "--pool", "1,2", "--out", str(out), "--head", "linear", "--head-epochs", "3"])  # fmt: skip
    assert code == 0
    text = capsys.readouterr().out
    assert "linear head at the best cell: top-1" in text and (out / "head-linear" / "head.pt").is_file()
    assert "best cell, chosen on 10 selection images: t=" in text and "report images" in text and "controls, each with its own search" in text
    rows = (out / "sweep.csv").read_text().splitlines()
    assert rows[0].startswith("t,block,pool,probe,select_top1,select_top5,report_top1,report_top5") and len(rows) == 1 + 12
    assert (out / "heatmap_pool1.png").is_file() and (out / "heatmap_pool2.png").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["roles"] == {"train": 270, "select": 10, "report": 20, "val_fraction": 0.1, "split_seed": 0, "report_share": 0.5,
                                "reported_on": f"held-out report rows of {out / 'features'} (20 images)", "report_images": 20}  # fmt: skip
    assert summary["best"]["select_top1"] == max(float(r.split(",")[4]) for r in rows[1:])
    report = summary["best"]["report"]
    assert report["rows"] == 20 and report["low"] <= report["estimate"] <= report["high"]
    assert report["estimate"] == pytest.approx(next(float(r.split(",")[6]) for r in rows[1:] if r.startswith(
        f"{summary['best']['t']},{summary['best']['block']},{summary['best']['pool']},")))  # fmt: skip
    controls = summary["controls"]
    assert 0 <= controls["pixels"]["report"]["estimate"] <= 100 and len(controls["random_weights"]["cells"]) == 12
    assert controls["random_weights"]["pretrained_minus_control"]["rows"] == 20
    # The random-weights control searched the same 12 cells itself and is reported at its own choice (issue 20).
    random = controls["random_weights"]
    own_best = max(random["cells"], key=lambda r: (r["select_top1"], r["select_top5"]))
    assert random["setting"] == FeatureKey(own_best["t"], own_best["block"], own_best["pool"]).stem
    assert random["report_top1"] == own_best["report_top1"]
    assert "beats" in text or "not separable at this size" in text

    # Other rows on the same --out with --overwrite: the controls start again too (they were refused, advising the
    # --overwrite just given), and the pixels control is not read from the cache of the other rows.
    pixels_key = json.loads((out / "control_pixels.json").read_text())
    code = main(["sweep", FIXTURE_SPEC, "--data", str(cifar_small), "--blocks", "3", "--t", "10", "--pool", "1",
                 "--limit", "150", "--overwrite", "--out", str(out)])  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert FeatureStore.open(out / "control_random_weights").rows == 150
    assert json.loads((out / "control_pixels.json").read_text())["rows"] != pixels_key["rows"]
    assert np.load(out / "control_pixels.npy").shape[0] == 150


def test_transfer_writes_one_table(cifar_small, tmp_path, capsys):
    import shutil
    import tarfile

    # Two "datasets" made from the shared CIFAR-10: a folder of 5 classes and a .tar.gz of the other 5.
    first, second = tmp_path / "animals", tmp_path / "staging" / "vehicles"
    for cls in sorted(p.name for p in cifar_small.iterdir()):
        target = first if cls in ("bird", "cat", "deer", "dog", "frog") else second
        shutil.copytree(cifar_small / cls, target / cls)
    archive = tmp_path / "vehicles.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(second, arcname="vehicles")
    out = tmp_path / "transfer"
    code = main(["transfer", FIXTURE_SPEC, "--datasets", f"{first},{archive}", "--t", "10", "--blocks", "3",
                 "--pool", "2", "--out", str(out)])  # fmt: skip
    assert code == 0
    table = (out / "transfer.md").read_text()
    assert "| animals | 150 | 5 |" in table and "| vehicles | 150 | 5 |" in table
    assert "raw pixels top-1 %" in table and "random_weights_top1" in (out / "transfer.csv").read_text()
    assert len((out / "transfer.csv").read_text().splitlines()) == 3
    assert main(["transfer", FIXTURE_SPEC, "--datasets", str(first), "--t", "10,90", "--blocks", "3", "--out", str(out)]) == 2
    assert "one setting" in capsys.readouterr().err


def test_augmented_views_are_cached_deterministically_and_train_a_head(cifar_small, store, tmp_path, capsys):
    data = open_dataset(cifar_small)
    bb = load_backbone(FIXTURE_SPEC)
    kw = dict(compute=CPU, progress=False, limit=60, augment_views=3, batch_size=32)
    a = extract(bb, data, FeaturePlan(t=[10], blocks=[3], pools=[2]), tmp_path / "aug_a", **kw)
    b = extract(load_backbone(FIXTURE_SPEC), data, FeaturePlan(t=[10], blocks=[3], pools=[2]), tmp_path / "aug_b", **kw)
    key = FeatureKey(10, 3, 2)
    assert a.rows == 180 and np.array_equal(a.indices[::3], a.indices[1::3])
    assert np.array_equal(a.load(key), b.load(key))  # same view, same features, every run
    feats = a.load(key)
    assert not np.allclose(feats[0], feats[1])  # two views of one image differ
    assert a.manifest["transform"]["views"] == 3 and a.manifest["transform"]["crop"] == "random-resized"

    # The store of 300 clean images: train on the augmented views of the 60 images it has.
    with pytest.raises(DiffprobeError, match="lacks views of"):
        probe(store, [key], tmp_path / "r", ProbeConfig("linear", epochs=2), progress=False, augmented=a)
    clean = extract(load_backbone(FIXTURE_SPEC), data, FeaturePlan(t=[10], blocks=[3], pools=[2]), tmp_path / "clean", compute=CPU, progress=False, limit=60)
    m = probe(clean, [key], tmp_path / "r", ProbeConfig("linear", epochs=3, val_fraction=0.5), progress=False, augmented=a)
    # The split is the dataset's (FeatureStore.split): about half of this subset, exactly the store's mask.
    roles = store_roles(clean, 0.5, 0)  # the dataset's split, halved into selection and report rows
    assert (m["select"]["rows"], m["report"]["rows"]) == (len(roles.select), len(roles.report))
    assert 20 <= len(roles.select) + len(roles.report) <= 40 and len(roles.select) >= 10
    assert m["history"][0]["train_top1"] >= 0
    with pytest.raises(DiffprobeError, match="holds no augmented views"):
        probe(clean, [key], tmp_path / "r2", ProbeConfig("linear", epochs=1), progress=False, augmented=clean)
    code = main(["sweep", FIXTURE_SPEC, "--data", str(cifar_small), "--blocks", "3", "--t", "10", "--augment-views", "2",
                 "--out", str(tmp_path / "sw")])  # fmt: skip
    assert code == 2 and "a sweep scores centre-crop features" in capsys.readouterr().err


def test_probe_bad_inputs(store, tmp_path, capsys, cifar_small):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["probe", str(empty), "--t", "10", "--block", "3", "--out", str(tmp_path / "r")]) == 2
    assert "is not a feature store" in capsys.readouterr().err
    # A store whose extraction never finished: no complete array to train on.
    partial = extract(load_backbone(FIXTURE_SPEC), open_dataset(cifar_small), FeaturePlan(t=[10], blocks=[3], pools=[1]), tmp_path / "partial",
                      compute=CPU, progress=False, rank=0, world_size=50, batch_size=4)  # fmt: skip
    assert not partial.complete_keys()
    assert main(["probe", str(partial.root), "--t", "10", "--block", "3", "--out", str(tmp_path / "r")]) == 2
    assert "no complete features for t=10 block=3" in capsys.readouterr().err
    # A test store from another backbone.
    other = extract(load_backbone(FIXTURE_SPEC).random_like(1), open_dataset(cifar_small), FeaturePlan(t=[10], blocks=[3], pools=[1]), tmp_path / "other",
                    compute=CPU, progress=False, limit=20)  # fmt: skip
    code = main(["probe", str(store.root), "--t", "10", "--block", "3", "--epochs", "1", "--test-store", str(other.root),
                 "--out", str(tmp_path / "r")])  # fmt: skip
    assert code == 2 and "test store" in capsys.readouterr().err


def test_predict_with_an_unknown_block_in_the_run(store, tmp_path, capsys):
    run = tmp_path / "run"
    probe(store, [FeatureKey(10, 3, 1)], run, ProbeConfig("linear", epochs=1), progress=False)
    config = json.loads((run / "config.json").read_text())
    config["keys"][0]["block"] = 99
    (run / "config.json").write_text(json.dumps(config))
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 30)).save(image)
    assert main(["predict", str(run), str(image)]) == 2
    assert "block 99 is out of range" in capsys.readouterr().err


def test_a_one_token_attention_head_is_warned_about(store, tmp_path, caplog):
    probe(store, [FeatureKey(10, 3, 1)], tmp_path / "r", ProbeConfig("attention", options={"width": 16, "heads": 2}, epochs=1), progress=False)
    assert any("sees a single token" in r.message for r in caplog.records)
    caplog.clear()
    probe(store, [FeatureKey(10, 3, 2)], tmp_path / "r2", ProbeConfig("attention", options={"width": 16, "heads": 2}, epochs=1), progress=False)
    assert not any("sees a single token" in r.message for r in caplog.records)

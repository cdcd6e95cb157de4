"""Issue 20: selection apart from reporting. Choices are made on the selection rows, numbers come
from report rows no choice saw, with intervals; the controls search as the model does; the
estimator scores the rows it is told."""

from __future__ import annotations

import json

import numpy as np
import pytest

import diffprobe as dp
from conftest import FIXTURE_SPEC
from diffprobe.cli import main
from diffprobe.features.reporting import Reporting
from diffprobe.features.roles import REPORT, SELECT, TRAIN, dataset_roles, store_roles
from diffprobe.probing.intervals import Interval
from diffprobe.studies.demo import claim
from diffprobe.studies.sweep import fast_probe, score_store
from test_head_recipes import synthetic_store


@pytest.fixture(scope="module")
def store(cifar_small, tmp_path_factory):
    bb = dp.load_backbone(FIXTURE_SPEC)
    return dp.extract(bb, str(cifar_small), dp.FeaturePlan(t=10, blocks=3, pools=2), tmp_path_factory.mktemp("honest") / "feat",
                      progress=False)  # fmt: skip


def test_roles_are_stratified_disjoint_and_the_same_for_every_subset():
    labels = np.repeat(np.arange(10), 100)
    roles = dataset_roles(labels, 0.2, 3)
    for c in range(10):  # 20 held out per class, half of them report
        assert [(roles[labels == c] == r).sum() for r in (TRAIN, SELECT, REPORT)] == [80, 10, 10]
    assert np.array_equal(roles, dataset_roles(labels, 0.2, 3))
    assert not np.array_equal(roles, dataset_roles(labels, 0.2, 4))
    held = dataset_roles(labels, 0.2, 3, report_share=0.0)
    assert set(np.unique(held)) == {TRAIN, SELECT} and np.array_equal(held == TRAIN, roles == TRAIN)  # the same held-out images


def test_a_store_subset_sees_its_images_roles_in_the_whole_dataset(cifar_small, store, tmp_path):
    small = dp.extract(dp.load_backbone(FIXTURE_SPEC), str(cifar_small), dp.FeaturePlan(t=10, blocks=3, pools=2), tmp_path / "s",
                       limit=100, progress=False)  # fmt: skip
    whole, part = store_roles(store), store_roles(small)
    role_of = {}
    for name in ("train", "select", "report"):
        role_of.update({int(i): name for i in store.indices[getattr(whole, name)]})
    for name in ("train", "select", "report"):
        assert all(role_of[int(i)] == name for i in small.indices[getattr(part, name)])


def test_the_reported_score_of_a_lucky_cell_comes_from_the_report_rows(tmp_path):
    """Twenty cells of pure noise: the best selection score is inflated by the choice; the reported
    one is computed on other rows, and matches a hand computation there."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 100)
    store = synthetic_store(tmp_path / "noise", rng.normal(size=(400, 8)).astype(np.float32), labels)
    roles = store_roles(store, 0.5, 0)
    keys = []
    for i in range(20):  # more noise cells beside the synthetic store's one
        key = dp.FeatureKey(10, 100 + i, 1)
        store.ensure_array(key, 8)
        store.write_chunk(key, 0, rng.normal(size=(400, 8)).astype(np.float32))
        keys.append(key)
    rows, cells = score_store(Reporting(store, roles), keys, "logreg")
    best = max(rows, key=lambda r: (r["select_top1"], r["select_top5"]))
    key = dp.FeatureKey(best["t"], best["block"], best["pool"])
    assert best["select_top1"] > 25 + 5  # the winner of 20 noisy cells looks better than chance (25%) ...
    hand = fast_probe("logreg", store.load(key), store.labels, roles).report_hits
    assert best["report_top1"] == pytest.approx(100 * hand.mean(), abs=1e-3)  # ... its reported score is the report rows'
    assert best["report_top1"] != pytest.approx(best["select_top1"])
    report = cells[key].report()
    assert report.rows == len(roles.report) == 100 and report.low <= 25 <= report.high  # honest: chance is inside


@pytest.mark.parametrize("low, high, verdict", [(0.5, 4.0, "holds"), (-3.0, 2.0, "not separable at this size"),
                                                (-4.0, -0.5, "does not hold")])  # fmt: skip
def test_a_finding_holds_only_when_the_paired_interval_excludes_zero(low, high, verdict):
    judged = claim("A beats B", "A", "B", Interval((low + high) / 2, low, high, 400))
    assert judged["verdict"] == verdict
    if verdict == "not separable at this size":
        assert "400 images" in judged["text"]


def test_probe_score_uses_report_rows_and_says_so_otherwise(store, caplog):
    clf = dp.Probe(epochs=2).fit(store)
    roles = store_roles(store)
    default = clf.score(store)
    labels = store.labels[roles.report]
    assert default == pytest.approx((clf.predict(store, indices=True)[roles.report] == labels).mean())
    with caplog.at_level("WARNING", logger="diffprobe"):
        clf.score(store, rows="train")
    assert "the head trained on them" in caplog.text
    assert clf.score(store, rows="all") == pytest.approx((clf.predict(store, indices=True) == store.labels).mean())
    no_report = dp.Probe(epochs=2, report_share=0.0).fit(store)
    with pytest.raises(dp.DiffprobeError, match="no report rows under report_share 0.0"):
        no_report.score(store)
    with pytest.raises(dp.DiffprobeError, match="rows='every'"):
        clf.score(store, rows="every")


def test_a_test_store_with_training_images_is_refused_by_score(store, cifar_small, tmp_path):
    clf = dp.Probe(epochs=1).fit(store)
    overlap = dp.extract(dp.load_backbone(FIXTURE_SPEC), str(cifar_small), dp.FeaturePlan(t=10, blocks=3, pools=2),
                         tmp_path / "again", limit=50, progress=False)  # fmt: skip
    with pytest.raises(dp.DiffprobeError, match="shares .* images with the training rows"):
        clf.score(overlap)


def test_predict_returns_labels_like_the_classifier(store):
    clf = dp.Probe(epochs=1).fit(store)
    names, index = clf.predict(store), clf.predict(store, indices=True)
    assert names.dtype.kind == "U" and list(names[:5]) == [clf.classes_[i] for i in index[:5]]


def test_probe_is_a_scikit_learn_estimator(store):
    from sklearn.base import clone
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    key = store.complete_keys()[0]
    X, y = store.load(key), np.array(store.classes)[store.labels]  # string labels, as a user's
    probe = dp.Probe("mlp", epochs=2, hidden=[32])
    assert clone(probe).get_params() == probe.get_params() and probe.get_params()["hidden"] == [32]
    assert probe.set_params(lr=1e-2).config.lr == 1e-2
    fitted = make_pipeline(StandardScaler(), dp.Probe(epochs=2)).fit(X[:200], y[:200])
    assert set(fitted.predict(X[200:])) <= set(store.classes)
    assert 0 <= fitted.score(X[200:], y[200:]) <= 1
    search = GridSearchCV(dp.Probe(epochs=1), {"lr": [1e-2, 1e-1]}, cv=2).fit(X[:200], y[:200])
    assert search.best_params_["lr"] in (1e-2, 1e-1)
    with pytest.raises(dp.DiffprobeError, match="fitted on arrays"):
        search.best_estimator_.save("/nonexistent")
    with pytest.raises(dp.DiffprobeError, match="give the labels y"):
        dp.Probe().fit(X)


def test_classifier_predict_can_give_indices(store, cifar_small):
    clf = dp.Probe(epochs=1).fit(store)
    model = dp.Classifier(dp.load_backbone(FIXTURE_SPEC), dp.FeaturePlan(t=10, blocks=3, pools=2), clf)
    images = sorted((cifar_small / "ship").iterdir())[:2]
    assert [model.classes[i] for i in model.predict(images, indices=True)] == model.predict(images)


def test_a_test_store_of_the_report_rows_from_the_cli(cifar_small, tmp_path, capsys):
    """extract --rows report makes the test store a same-dataset study can use: the head reports
    on it, and a store holding selection rows is refused."""
    base = ["extract", FIXTURE_SPEC, "--data", str(cifar_small), "--blocks", "3", "--t", "10", "--device", "cpu"]
    assert main([*base, "--out", str(tmp_path / "all")]) == 0
    assert main([*base, "--out", str(tmp_path / "report"), "--rows", "report"]) == 0
    assert main([*base, "--out", str(tmp_path / "held"), "--rows", "held-out"]) == 0
    whole, test = dp.FeatureStore.open(tmp_path / "all"), dp.FeatureStore.open(tmp_path / "report")
    assert sorted(test.indices) == sorted(whole.indices[store_roles(whole).report])
    assert test.manifest["rows"]["role"] == {"role": "report", "split": [0.1, 0, 0.5]}
    capsys.readouterr()
    assert main(["probe", str(whole.root), "--t", "10", "--blocks", "3", "--epochs", "2", "--out", str(tmp_path / "run"),
                 "--test-store", str(test.root)]) == 0  # fmt: skip
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["report"]["source"] == f"test store {test.root}" and metrics["report"]["rows"] == test.rows
    assert f"test store {test.root}" in capsys.readouterr().out
    assert main(["probe", str(whole.root), "--t", "10", "--blocks", "3", "--epochs", "1", "--out", str(tmp_path / "run2"),
                 "--test-store", str(tmp_path / "held")]) == 2  # fmt: skip
    assert "with the selection rows" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "none"), "--rows", "report", "--val-fraction", "0.01"]) == 2  # 0.3 a class
    assert "no report rows among the 300 images" in capsys.readouterr().err


def test_sweep_and_transfer_report_on_a_test_split(cifar_with_test, tmp_path, capsys):
    """--test-data: every choice on the held-out rows of the training split (all of them select),
    every reported number, the controls' too, on the test split; a test set that is the training
    images themselves is refused before any work."""
    sweep = ["sweep", FIXTURE_SPEC, "--data", str(cifar_with_test), "--blocks", "2,3", "--t", "10", "--pool", "1",
             "--device", "cpu", "--out", str(tmp_path / "sweep")]  # fmt: skip
    assert main([*sweep, "--test-data", str(cifar_with_test)]) == 0
    summary = json.loads((tmp_path / "sweep" / "summary.json").read_text())
    roles, best = summary["roles"], summary["best"]
    assert roles["report"] == 0 and roles["select"] == 30 and roles["report_images"] == 80
    assert roles["reported_on"].startswith(f"test store {tmp_path / 'sweep' / 'test-features'}")
    store, test = dp.FeatureStore.open(tmp_path / "sweep" / "features"), dp.FeatureStore.open(tmp_path / "sweep" / "test-features")
    key = dp.FeatureKey(best["t"], best["block"], best["pool"])
    hand = fast_probe("logreg", store.load(key), store.labels, store_roles(store, report_share=0.0), report=(test.load(key), test.labels))
    assert best["report"]["rows"] == 80 and best["report"]["estimate"] == pytest.approx(100 * hand.report_hits.mean())
    for control in ("random_weights", "pixels"):
        assert summary["controls"][control]["report"]["rows"] == 80
    assert "on 80 report images" in capsys.readouterr().out

    transfer = ["transfer", FIXTURE_SPEC, "--datasets", str(cifar_with_test), "--blocks", "3", "--t", "10", "--pool", "1",
                "--device", "cpu", "--no-controls", "--out", str(tmp_path / "transfer")]  # fmt: skip
    assert main([*transfer, "--test-split", "test"]) == 0
    table = (tmp_path / "transfer" / "transfer.md").read_text()
    assert "| 80 test images |" in table and "'test' split reports" in table and (tmp_path / "transfer" / "transfer.png").is_file()

    plain = tmp_path / "plain"  # one split only: the "test split" would be the training images
    plain.symlink_to(cifar_with_test / "train")
    capsys.readouterr()
    assert main([*transfer, "--datasets", str(plain), "--test-split", "test", "--out", str(tmp_path / "t2")]) == 2
    assert "the test data is the same images as the data" in capsys.readouterr().err
    assert not (tmp_path / "t2").exists()


def test_compare_heads_reports_on_a_test_store(store, cifar_with_test, tmp_path):
    from diffprobe.data import open_dataset
    from diffprobe.studies.heads import compare_heads

    key = store.complete_keys()[0]
    test_split = open_dataset(cifar_with_test, split="test")
    test = dp.extract(dp.load_backbone(FIXTURE_SPEC), test_split, dp.FeaturePlan(t=10, blocks=3, pools=2), tmp_path / "test", progress=False)
    rows = compare_heads(store, key, tmp_path / "heads", ["mlp"], ["modern"], test_store=test)
    logreg, linear = rows
    assert logreg["scored_on"] == linear["scored_on"] == f"{test.rows} test images" and "vs_logreg" in linear
    metrics = json.loads((tmp_path / "heads" / "mlp-modern" / "metrics.json").read_text())
    assert metrics["report"]["source"].startswith(f"test store {test.root}") and linear["top1"] == round(metrics["report"]["top1"], 2)
    assert json.loads((tmp_path / "heads" / "heads.json").read_text())["roles"]["report"] == 0  # every held-out row selected
    partial = dp.extract(dp.load_backbone(FIXTURE_SPEC), test_split, dp.FeaturePlan(t=20, blocks=3, pools=2), tmp_path / "other-t",
                         progress=False)  # fmt: skip
    with pytest.raises(dp.DiffprobeError, match="lacks t0010_b03_p2"):
        compare_heads(store, key, tmp_path / "h2", ["mlp"], ["modern"], test_store=partial)


def test_held_out_adds_held_out_images_to_a_training_subset():
    """--limit N --held-out M: N training images and M held-out ones, each stratified, so a small
    study reports on many images; the roles of those images are their dataset roles."""
    from diffprobe.features.extract import ExtractOptions, select_rows

    labels = np.repeat(np.arange(10), 500)
    roles = dataset_roles(labels, 0.1, 0)
    rows = select_rows(labels, ExtractOptions(limit=1000, held_out=300))
    assert (roles[rows] == TRAIN).sum() == 1000 and (roles[rows] != TRAIN).sum() == 300
    assert np.bincount(labels[rows[roles[rows] != TRAIN]]).tolist() == [30] * 10  # stratified
    plain = select_rows(labels, ExtractOptions(limit=1300))
    assert (roles[plain] != TRAIN).sum() < 200  # a 10% split of one subset: 130 or so
    everything = select_rows(labels, ExtractOptions(held_out=10**6))  # all of both
    assert len(everything) == len(labels)
    only_report = select_rows(labels, ExtractOptions(limit=1000, held_out=300, rows_role="report"))
    assert set(roles[only_report]) == {REPORT} and set(only_report) <= set(rows)
    # A test set takes none of the training dataset's row choices: all of it, or its own --test-limit.
    study = ExtractOptions(limit=1000, held_out=300, rows_role="report")
    assert len(select_rows(labels, study.for_test_set(None))) == len(labels)
    assert np.bincount(labels[select_rows(labels, study.for_test_set(200))]).tolist() == [20] * 10

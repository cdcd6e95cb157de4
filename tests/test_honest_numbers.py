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
    rows, cells = score_store(store, keys, "logreg", roles)
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

"""The Python face: value objects, Probe (fit/score/predict/save), Classifier, and their agreement with the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import diffprobe as dp
from conftest import FIXTURE_SPEC
from diffprobe.cli import main


@pytest.fixture(scope="module")
def bb():
    return dp.load_backbone(FIXTURE_SPEC)


@pytest.fixture(scope="module")
def store(bb, cifar_small, tmp_path_factory):
    plan = dp.FeaturePlan(t=10, blocks=3, pools=2)
    return dp.extract(bb, str(cifar_small), plan, tmp_path_factory.mktemp("api") / "feat", progress=False)


def test_feature_plan_is_one_checked_value(bb):
    plan = dp.FeaturePlan(t="150,90", blocks=[24, 19, 24], pools=2, noise_seed=3, draws=2)
    assert plan.t == (90, 150) and plan.blocks == (19, 24) and plan.pools == (2,)
    assert dp.FeaturePlan.from_dict(plan.to_dict()) == plan
    assert json.loads(json.dumps(plan.to_dict())) == plan.to_dict()
    every = dp.FeaturePlan(t=10, blocks="all").resolve(bb)
    assert every.blocks == tuple(range(1, bb.num_blocks + 1)) and every.resolved
    with pytest.raises(dp.DiffprobeError, match="out of range"):
        dp.FeaturePlan(t=10, blocks=99).resolve(bb)
    with pytest.raises(dp.DiffprobeError, match="outside this model's schedule"):
        dp.FeaturePlan(t=5000, blocks=3).resolve(bb)
    with pytest.raises(dp.DiffprobeError, match="larger than block"):
        dp.FeaturePlan(t=10, blocks=bb.num_blocks // 2 + 1, pools=64).resolve(bb)
    with pytest.raises(dp.DiffprobeError, match="resolve the plan"):
        dp.FeaturePlan(t=10, blocks="all").keys


def test_probe_config_round_trip_and_head_options():
    cfg = dp.ProbeConfig("attention", options={"width": 64, "hidden": [7]}, weight_decays=(0.0, 1e-3), seed=4)
    assert cfg.options == {"width": 64, "depth": 2, "heads": 8}  # another head's option is dropped, defaults filled
    assert dp.ProbeConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(dp.DiffprobeError, match="unknown recipe"):
        dp.ProbeConfig("linear", recipe="fancy")
    assert dp.ProbeConfig("linear", lr=0.5).training_recipe().lr == 0.5  # an lr given is the lr used


def test_timm_style_backbone_face(bb):
    x = torch.randn(2, *bb.model_shape)
    a = bb.forward_intermediates(x, 10, [3, 5])
    b = bb.forward_features(x, 10, [3, 5])
    assert a.keys() == {3, 5} and all(torch.equal(a[k], b[k]) for k in a)
    info = bb.feature_info
    assert len(info) == bb.num_blocks and info[0]["module"] == bb.blocks[0].name
    assert info[2]["num_chs"] == a[3].shape[1] and info[2]["reduction"] == bb.image_size // a[3].shape[-1]


def test_featurize_uses_the_fast_compute_and_leaves_the_backbone_alone(bb):
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    plan = dp.FeaturePlan(t=10, blocks=3, pools=1)
    x0 = torch.rand(4, 3, bb.image_size, bb.image_size) * 2 - 1
    fast = dp.featurize(bb, x0, plan, range(4))  # this machine's default compute
    exact = dp.featurize(bb, x0, plan, range(4), compute=dp.Compute(torch.device("cpu"), "fp32", False))
    key = plan.keys[0]
    cos = torch.nn.functional.cosine_similarity(fast[key], exact[key], dim=1)
    assert cos.min() > 0.999
    assert all(torch.equal(before[k], v) for k, v in bb.state_dict().items())


def test_notebook_flow_equals_the_cli(bb, store, cifar_small, tmp_path, capsys):
    # Load -> extract -> fit -> score -> predict, no CLI; nothing written until save().
    clf = dp.Probe(head="linear", epochs=3, seed=1).fit(store)
    assert not list(tmp_path.iterdir())
    assert 0.0 <= clf.score(store) <= 1.0
    assert clf.predict(store).shape == (store.rows,) and clf.predict_proba(store).shape == (store.rows, 10)

    # The CLI on the same store, with the same seeds, gives the same numbers.
    run = tmp_path / "cli-run"
    assert main(["probe", str(store.root), "--t", "10", "--blocks", "3", "--pool", "2", "--epochs", "3", "--seed", "1",
                 "--out", str(run)]) == 0  # fmt: skip
    cli_metrics = json.loads((run / "metrics.json").read_text())
    in_memory = json.loads(json.dumps(clf.metrics_, default=float))
    assert cli_metrics["select"] == in_memory["select"] and cli_metrics["report"] == in_memory["report"] and cli_metrics["history"] == in_memory["history"]  # exactly
    assert cli_metrics["chosen"] == clf.metrics_["chosen"]
    loaded = dp.Probe.load(run)
    assert np.allclose(loaded.predict_proba(store), clf.predict_proba(store), atol=1e-6)

    # Classifier (nn.Module, images -> logits) and `diffprobe predict` agree on the same images.
    clf.save(tmp_path / "py-run")
    model = dp.Classifier(bb, dp.FeaturePlan(t=10, blocks=3, pools=2), clf)
    assert isinstance(model, torch.nn.Module)
    images = sorted((cifar_small / "ship").iterdir())[:3]
    probs = model.predict_proba(images)
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "py-run"), *map(str, images), "--json", "--top-k", "10"]) == 0
    for row, result in zip(probs, json.loads(capsys.readouterr().out)):
        for top in result["top"]:
            assert top["probability"] == pytest.approx(row[model.classes.index(top["label"])].item(), abs=1e-6)
    # Paths, PIL images and transformed tensors are the same input.
    pil = Image.open(images[0])
    tensor = model.transform(pil.convert("RGB"))
    assert model.predict([images[0], pil, tensor]) == [model.predict([images[0]])[0]] * 3
    logits = model(tensor[None])
    assert logits.shape == (1, 10)


def test_classifier_refuses_another_backbone_or_noise(bb, store):
    clf = dp.Probe(head="linear", epochs=1).fit(store)
    with pytest.raises(dp.DiffprobeError, match="not the one this run was trained on"):
        dp.Classifier(bb.random_like(1), None, clf)
    with pytest.raises(dp.DiffprobeError, match="noise"):
        dp.Classifier(bb, dp.FeaturePlan(t=10, blocks=3, pools=2, noise_seed=9), clf)
    with pytest.raises(dp.DiffprobeError, match="does not cover"):
        dp.Classifier(bb, dp.FeaturePlan(t=90, blocks=3, pools=2), clf)
    with pytest.raises(dp.DiffprobeError, match="not fitted"):
        dp.Probe().predict(store)


def test_a_bare_cuda_device_gets_this_ranks_index_and_upload_never_pins_gpu_memory(monkeypatch):
    """torch.cuda.set_device, NCCL's device_id and DDP need an index: `--device cuda` under torchrun
    means cuda:LOCAL_RANK (modulo the GPUs visible), as `auto` does; an explicit index is kept. A
    tensor already on a GPU is copied as is (pin_memory() on it would raise)."""
    from diffprobe.precision import resolve_device, upload

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert resolve_device("cuda") == torch.device("cuda", 1) == resolve_device("auto")
    assert resolve_device("cuda:0") == torch.device("cuda", 0) and resolve_device("cpu") == torch.device("cpu")
    pinned = []
    fake_gpu_tensor = type("OnGpu", (), {"device": torch.device("cuda", 1), "pin_memory": lambda self: pinned.append(1),
                                         "to": lambda self, device, non_blocking=False: (device, non_blocking)})()  # fmt: skip
    assert upload(fake_gpu_tensor, torch.device("cuda", 0)) == (torch.device("cuda", 0), True) and not pinned

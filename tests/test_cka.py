"""CKA: its defining properties, the minibatch estimator, and a direct NumPy implementation."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffprobe import DiffprobeError
from diffprobe.studies.cka import MinibatchCKA, hsic_unbiased, linear_cka, rbf_cka


def numpy_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """The kernel-space formula, HSIC(K, L) = tr(K H L H), with K = XXᵀ, L = YYᵀ."""
    n = x.shape[0]
    h = np.eye(n) - np.ones((n, n)) / n
    k, l = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    return hsic(k, l) / np.sqrt(hsic(k, k) * hsic(l, l))


def numpy_unbiased_hsic(k: np.ndarray, l: np.ndarray) -> float:
    """Song et al. (2012), eq. 5, written out term by term."""
    n = k.shape[0]
    kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    return (np.trace(kt @ lt) + kt.sum() * lt.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * (kt @ lt).sum()) / (n * (n - 3))


@pytest.fixture()
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 40))
    y = np.tanh(x @ rng.normal(size=(40, 25))) + 0.5 * rng.normal(size=(300, 25))
    return x, y


def test_identical_features_give_one(data):
    x, _ = data
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert rbf_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    mb = MinibatchCKA(1, 1)
    for rows in np.array_split(np.arange(300), 5):
        mb.update([x[rows]], [x[rows]])
    assert mb.compute()[0, 0] == pytest.approx(1.0, abs=1e-12)


def test_invariant_to_orthogonal_maps_and_isotropic_scaling(data):
    x, y = data
    q, _ = np.linalg.qr(np.random.default_rng(1).normal(size=(40, 40)))
    base = linear_cka(x, y)
    assert linear_cka(x @ q, y) == pytest.approx(base, abs=1e-10)
    assert linear_cka(7.5 * x, 0.01 * y) == pytest.approx(base, abs=1e-10)
    assert rbf_cka(x @ q, 3 * y) == pytest.approx(rbf_cka(x, y), abs=1e-8)
    assert 0 < base < 1
    # Not invariant to arbitrary invertible maps: an anisotropic scaling changes it.
    assert abs(linear_cka(x * np.linspace(0.1, 10, 40), y) - base) > 1e-3


def test_agrees_with_the_numpy_formulas(data):
    x, y = data
    assert linear_cka(x, y) == pytest.approx(numpy_linear_cka(x, y), abs=1e-10)
    k, l = x[:50] @ x[:50].T, y[:50] @ y[:50].T
    assert hsic_unbiased(torch.from_numpy(k), torch.from_numpy(l)).item() == pytest.approx(numpy_unbiased_hsic(k, l), rel=1e-9)


def test_minibatch_matches_full_batch_on_many_images():
    rng = np.random.default_rng(2)
    n = 6000
    x = rng.normal(size=(n, 30))
    y = x[:, :20] @ rng.normal(size=(20, 20)) + rng.normal(size=(n, 20))
    z = rng.normal(size=(n, 10))
    mb = MinibatchCKA(2, 2)
    for rows in np.array_split(rng.permutation(n), 12):
        mb.update([x[rows], y[rows]], [y[rows], z[rows]])
    got = mb.compute()
    assert got[0, 0] == pytest.approx(linear_cka(x, y), abs=0.01)
    assert got[1, 0] == pytest.approx(1.0, abs=1e-12)
    assert abs(got[0, 1]) < 0.02 and abs(got[1, 1]) < 0.02  # unrelated features: near 0 (the unbiased estimator is not biased up)
    assert linear_cka(x, z) > abs(got[0, 1])  # the biased full-batch estimate sits above 0


def test_clear_errors_instead_of_nan():
    ones = np.ones((10, 3))
    rand = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(DiffprobeError, match="constant features"):
        linear_cka(ones, rand)
    with pytest.raises(DiffprobeError, match="constant features"):
        rbf_cka(ones, rand)
    with pytest.raises(DiffprobeError, match="at least 4"):
        linear_cka(rand[:3], rand[:3])
    with pytest.raises(DiffprobeError, match="same images"):
        linear_cka(rand, rand[:5])
    mb = MinibatchCKA(1, 1)
    with pytest.raises(DiffprobeError, match="at least 4"):
        mb.update([rand[:3]], [rand[:3]])
    with pytest.raises(DiffprobeError, match="no minibatches"):
        MinibatchCKA(1, 1).compute()
    mb.update([ones], [rand])
    with pytest.raises(DiffprobeError, match="constant features"):
        mb.compute()


def test_cka_command_on_two_stores(cifar_small, tmp_path, capsys):
    from conftest import FIXTURE_SPEC
    from diffprobe.cli import main

    base = ["--data", str(cifar_small), "--blocks", "3,13", "--t", "10", "--limit", "100"]
    assert main(["extract", FIXTURE_SPEC, *base, "--out", str(tmp_path / "a")]) == 0
    assert main(["extract", "adm:random", "--model-flags=--image_size 32 --num_channels 32 --channel_mult 1,2 "
                 "--attention_resolutions 8 --num_head_channels 8", *base, "--out", str(tmp_path / "b")]) == 0  # fmt: skip
    capsys.readouterr()
    assert main(["cka", "--a", str(tmp_path / "a"), "--b", str(tmp_path / "b"), "--out", str(tmp_path / "ab"), "--batch-size", "25"]) == 0
    rows = (tmp_path / "ab" / "cka.csv").read_text().splitlines()
    assert rows[0] == "a,t0010_b03_p1,t0010_b13_p1" and len(rows) == 3
    assert (tmp_path / "ab" / "cka.png").is_file()
    assert main(["cka", "--a", str(tmp_path / "a"), "--out", str(tmp_path / "aa"), "--batch-size", "25"]) == 0
    self_rows = (tmp_path / "aa" / "cka.csv").read_text().splitlines()
    assert self_rows[1].split(",")[1] == "1.0"  # a setting against itself
    other = ["--data", str(cifar_small), "--blocks", "3", "--t", "10", "--limit", "50", "--out", str(tmp_path / "c")]
    assert main(["extract", FIXTURE_SPEC, *other]) == 0
    capsys.readouterr()
    assert main(["cka", "--a", str(tmp_path / "a"), "--b", str(tmp_path / "c"), "--out", str(tmp_path / "x")]) == 2
    assert "hold different images" in capsys.readouterr().err
    assert main(["cka", "--a", str(tmp_path / "a"), "--a-keys", "t0090_b03_p1", "--out", str(tmp_path / "x")]) == 2
    assert "no complete t0090_b03_p1" in capsys.readouterr().err


def test_baseline_stems_give_the_maps_they_promise():
    from diffprobe.studies.baseline import build_resnet

    x = torch.zeros(1, 3, 32, 32)
    for stem, side in (("auto", 4), ("small", 4), ("standard", 1)):  # auto: the small stem up to 64 px
        model = build_resnet("resnet18", 10, 32, stem).eval()
        trunk = torch.nn.Sequential(*list(model.children())[:-2])
        assert trunk(x).shape[-1] == side, stem
    assert build_resnet("resnet18", 10, 224).conv1.kernel_size == (7, 7)
    with pytest.raises(DiffprobeError, match="unknown stem"):
        build_resnet("resnet18", 10, 32, "tiny")


def test_baseline_training_and_cka_against_model_stages(cifar_small, tmp_path, capsys):
    from conftest import FIXTURE_SPEC
    from diffprobe.cli import main

    # torchvision's stem (16× cheaper at 32 px), read back with it by baseline:DIR (its weights would not load otherwise).
    assert main(["baseline", "train", "--data", str(cifar_small), "--epochs", "1", "--batch-size", "64", "--stem", "standard",
                 "--out", str(tmp_path / "base")]) == 0  # fmt: skip
    info = json.loads((tmp_path / "base" / "baseline.json").read_text())
    assert info["arch"] == "resnet18" and info["train_images"] == 270 and 0 <= info["val_top1"] <= 100
    assert info["stem"] == "standard"
    assert "validation top-1" in capsys.readouterr().out

    assert main(["extract", FIXTURE_SPEC, "--data", str(cifar_small), "--blocks", "3,13", "--t", "10", "--limit", "60",
                 "--out", str(tmp_path / "store")]) == 0  # fmt: skip
    capsys.readouterr()
    code = main(["cka", "--a", str(tmp_path / "store"), "--b", f"baseline:{tmp_path / 'base'}", "--data", str(cifar_small),
                 "--out", str(tmp_path / "vs_base"), "--batch-size", "20"])  # fmt: skip
    assert code == 0 and "resnet18 trained by diffprobe" in capsys.readouterr().out
    header = (tmp_path / "vs_base" / "cka.csv").read_text().splitlines()[0]
    assert header == "a,layer1,layer2,layer3,layer4"
    assert main(["cka", "--a", str(tmp_path / "store"), "--b", f"baseline:{tmp_path / 'base'}", "--data", str(cifar_small),
                 "--out", str(tmp_path / "vs_base_small"), "--batch-size", "20", "--forward-batch", "7"]) == 0  # fmt: skip
    split = (tmp_path / "vs_base_small" / "cka.csv").read_text().splitlines()
    whole = (tmp_path / "vs_base" / "cka.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in split] == [r.split(",")[0] for r in whole]
    for a, b in zip(split[1:], whole[1:]):  # the forward batch changes memory, not the result
        assert max(abs(float(x) - float(y)) for x, y in zip(a.split(",")[1:], b.split(",")[1:])) < 1e-4
    code = main(["cka", "--a", str(tmp_path / "store"), "--b", "torchvision:resnet18", "--data", str(cifar_small),
                 "--out", str(tmp_path / "vs_tv"), "--batch-size", "30"])  # fmt: skip
    assert code == 0 and "RANDOM weights" in capsys.readouterr().out
    assert main(["cka", "--a", str(tmp_path / "store"), "--b", "torchvision:resnet18", "--out", str(tmp_path / "x")]) == 2
    assert "needs --data" in capsys.readouterr().err
    assert main(["cka", "--a", str(tmp_path / "store"), "--b", "baseline:/nonexistent", "--data", str(cifar_small), "--out", str(tmp_path / "x")]) == 2
    assert "not a baseline run" in capsys.readouterr().err


def test_encoder_source_random_from_a_local_file_and_the_extract_path(tmp_path):
    """CKA's model side is the encoder backbone `extract` uses: the same blocks, preprocessing and
    features (pooled), so a CKA against timm:NAME equals one against its extracted store."""
    import timm
    from PIL import Image

    from diffprobe.backbones.encoders import load_encoder
    from diffprobe.data import backbone_transform
    from diffprobe.studies.cka import EncoderSource

    random = EncoderSource("timm:resnet18")
    assert "RANDOM weights" in random.description and random.stages == ["act1", "layer1", "layer2", "layer3", "layer4"]
    torch.manual_seed(1)  # other weights than the random source's (seed 0)
    full = timm.create_model("resnet18", pretrained=False)
    torch.save(full.state_dict(), tmp_path / "r18.pth")
    loaded = EncoderSource("timm:resnet18", weights=str(tmp_path / "r18.pth"), pool=2)
    assert "weights" in loaded.description and "RANDOM" not in loaded.description
    x = torch.stack([loaded.transform(Image.new("RGB", (40, 30), (i * 40, 0, 0))) for i in range(3)])
    feats = loaded.features(x)
    assert feats["layer4"].shape == (3, 512 * 4)
    backbone = load_encoder("timm:resnet18", weights=str(tmp_path / "r18.pth")).eval()
    assert backbone_transform(backbone)(Image.new("RGB", (40, 30))).shape == x.shape[1:]
    with torch.no_grad():
        direct = backbone.forward_features(backbone.encode(x), 0, [5])[5]
    torch.testing.assert_close(feats["layer4"], torch.nn.functional.adaptive_avg_pool2d(direct, 2).flatten(1))
    assert not torch.allclose(EncoderSource("timm:resnet18", pool=2).features(x)["layer4"], feats["layer4"])  # the file's weights
    # --b-keys picks blocks by name; the walk stops at the deepest picked (layer4 never runs)
    picked = EncoderSource("timm:resnet18", weights=str(tmp_path / "r18.pth"), pool=2, blocks="layer3,layer1")
    ran = []
    picked.backbone.model.layer4.register_forward_hook(lambda *a: ran.append("layer4"))
    some = picked.features(x)
    assert picked.stages == ["layer3", "layer1"] == list(some) and not ran
    torch.testing.assert_close(some["layer3"], feats["layer3"])
    with pytest.raises(DiffprobeError, match=r"has no block layer9 \(--b-keys\): its blocks are act1, layer1"):
        EncoderSource("timm:resnet18", blocks="layer9")
    with pytest.raises(DiffprobeError, match="names no block"):
        EncoderSource("timm:resnet18", blocks=" , ")
    with pytest.raises(DiffprobeError, match="does not know the model"):
        EncoderSource("timm:no_such_net")

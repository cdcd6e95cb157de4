"""`diffprobe compare`: the shipped diffusion checkpoint beside two image encoders on one dataset
and one split, one table; a finished backbone is not recomputed; another split is refused."""

from __future__ import annotations

import json

import numpy as np

from conftest import ROOT
from diffprobe.cli import main
from diffprobe.features.roles import store_roles
from diffprobe.features.store import FeatureStore

SHIPPED = f"adm:{ROOT / 'checkpoints' / 'diffprobe-cifar10' / 'ema.pt'}"
VIT = "timm:vit_tiny_patch16_224@weights=random,img_size=32,patch_size=8,depth=2,name=vit-tiny-random"
RESNET = "torchvision:resnet18@weights=random,blocks=3,4"


def test_compare_diffusion_and_encoders_on_one_split(cifar_small, tmp_path, capsys, caplog):
    out = tmp_path / "cmp"
    common = ["--data", str(cifar_small), "--out", str(out), "--limit", "100", "--heads", "linear", "--head-epochs", "1",
              "--no-controls", "--report-share", "0.5", "--val-fraction", "0.4"]  # fmt: skip
    assert main(["compare", f"{SHIPPED}@blocks=13,20,t=10", VIT, RESNET, *common]) == 0
    printed = capsys.readouterr().out
    table = json.loads((out / "compare.json").read_text())
    rows = table["rows"]
    assert [r["generative"] for r in rows] == ["yes", "no", "no"]
    assert "random weights" in rows[2]["backbone"] and rows[1]["backbone"] == "vit-tiny-random"
    assert rows[0]["best"].startswith("block ") and "t=10" in rows[0]["best"] and "clean image" in rows[1]["best"]
    for r in rows:  # every figure on the report rows, with its interval
        for kind in ("fast_probe", "linear"):
            assert r[kind]["on"] == "report" and r[kind]["low"] <= r[kind]["top1"] <= r[kind]["high"]
    assert rows[0]["params_M"] > 9 and rows[2]["params_M"] > 11
    assert "| backbone | params (M) | generative? |" in printed and (out / "compare.png").is_file() and (out / "compare.csv").is_file()

    # One split for all: the same images, labels and roles in every backbone's store.
    folders = sorted(p for p in out.iterdir() if (p / "features").is_dir())
    stores = [FeatureStore.open(f / "features") for f in folders]
    assert len(stores) == 3
    for store in stores[1:]:
        assert np.array_equal(store.indices, stores[0].indices) and np.array_equal(store.labels, stores[0].labels)
        a, b = store_roles(store, 0.4, 0, 0.5), store_roles(stores[0], 0.4, 0, 0.5)
        assert all(np.array_equal(getattr(a, k), getattr(b, k)) for k in ("train", "select", "report"))

    # Resume: the finished backbones are read back, not loaded or recomputed.
    caplog.clear()
    stamps = {f.name: (f / "summary.json").stat().st_mtime_ns for f in folders}
    assert main(["compare", f"{SHIPPED}@blocks=13,20,t=10", VIT, RESNET, *common]) == 0
    assert {f.name: (f / "summary.json").stat().st_mtime_ns for f in folders} == stamps
    assert caplog.text.count("finished before") == 3

    # Another subset for a new backbone: its rows differ from the others', refused in one line.
    other = [w if w != "100" else "80" for w in common]
    assert main(["compare", f"{SHIPPED}@blocks=13,20,t=10", "timm:resnet18@weights=random,blocks=2", *other]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "other rows or roles" in err[-1] and "one dataset and one split" in err[-1]

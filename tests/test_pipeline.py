"""The issue's chain on real images, through the command line: pretrain → sample → extract → probe,
then export (checkpoint + model card) and the demo report on the exported checkpoint."""

from __future__ import annotations

import json
import urllib.error

import numpy as np

from diffprobe.cli import main
from diffprobe.backbones import load_backbone

FLAGS = "--image_size 16 --num_channels 32 --channel_mult 1,2 --num_res_blocks 1 --attention_resolutions 8 --diffusion_steps 50"


def test_pretrain_sample_extract_probe_export_demo(cifar_small, cifar_with_test, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["pretrain", "--data", str(cifar_small), "--out", str(run), "--model-flags", FLAGS, "--batch-size", "8",
              "--save-every", "2", "--warmup", "2"]  # fmt: skip
    assert main([*common, "--steps", "4"]) == 0
    assert "step 4:" in capsys.readouterr().out
    assert main([*common, "--steps", "6"]) == 0  # resumes
    assert json.loads((run / "ema.json").read_text())["step"] == 6

    spec = f"adm:{run / 'ema.pt'}"
    assert main(["sample", spec, "--out", str(tmp_path / "samples"), "--num", "4", "--steps", "3", "--seed", "1"]) == 0
    arr = np.load(tmp_path / "samples" / "samples.npz")["arr_0"]
    assert arr.shape == (4, 16, 16, 3) and arr.dtype == np.uint8

    store = tmp_path / "store"
    assert main(["extract", spec, "--data", str(cifar_small), "--blocks", "3,5", "--t", "10", "--out", str(store)]) == 0
    assert main(["probe", str(store), "--t", "10", "--block", "5", "--out", str(tmp_path / "probe"), "--epochs", "2"]) == 0
    metrics = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    assert 0 <= metrics["report"]["top1"] <= 100 and metrics["report"]["rows"] > 0 and metrics["select"]["rows"] > 0
    capsys.readouterr()

    ckpt = tmp_path / "ckpt"
    assert main(["export", str(run), "--data", str(cifar_small), "--out", str(ckpt), "--blocks", "3,5", "--t", "10",
                 "--pool", "1"]) == 0  # fmt: skip
    card = json.loads((ckpt / "card.json").read_text())
    assert card["config"]["train_rows"] == 270 and "probe (validation split)" in card["facts"]
    for name in ("ema.pt", "ema.json", "MODEL_CARD.md", "loss.png", "samples.png", "probe_heatmap_pool1.png"):
        assert (ckpt / name).is_file(), name

    out = tmp_path / "demo"
    assert main(["demo", "--data", str(cifar_small), "--checkpoint", str(ckpt / "ema.pt"), "--out", str(out), "--limit", "300",
                 "--blocks", "3,5", "--t", "10,30", "--head-epochs", "2", "--samples", "4", "--baseline-epochs", "1"]) == 0  # fmt: skip
    report = (out / "REPORT.md").read_text()
    summary = json.loads((out / "sweep" / "summary.json").read_text())
    assert f"{summary['best']['report']['estimate']:.2f}% [{summary['best']['report']['low']:.2f}," in report
    assert f"{summary['controls']['pixels']['report']['estimate']:.2f}%" in report and "random weights" in report
    assert f"{summary['roles']['select']} **selection** rows" in report and f"{summary['roles']['report']} **report** rows" in report
    assert (out / "samples" / "grid.png").is_file()
    demo = json.loads((out / "demo.json").read_text())
    heads = demo["sweep"]["heads"]
    assert set(heads) == {"linear", "mlp", "attention", "fusion"}
    assert all(h["inputs"][0].endswith("_p4") for h in heads.values()) and len(heads["fusion"]["inputs"]) == 2
    for kind, h in heads.items():  # every head's number is in the report, with its interval
        assert f"| {kind} |" in report and f"{h['report']['estimate']:.2f}% [{h['report']['low']:.2f}" in report
    baseline = demo["sweep"]["baseline"]  # a supervised ResNet-18 beside the diffusion features, same rows, same probe
    assert "Beside a discriminative network" in report and f"**{baseline['finding']['verdict']}**" in report
    # The demo's recipe (torchvision's stem, read back as a backbone with that stem: its weights would not load otherwise).
    assert "(standard stem)" in report and json.loads((out / "baseline" / "baseline.json").read_text())["stem"] == "standard"
    assert baseline["finding"]["difference"]["rows"] == summary["roles"]["report"]
    base_summary = json.loads((out / "baseline-sweep" / "summary.json").read_text())
    same = ("train", "select", "report", "report_images", "val_fraction", "split_seed", "report_share")
    assert {k: base_summary["roles"][k] for k in same} == {k: summary["roles"][k] for k in same} and base_summary["best"]["t"] == 0
    judged = demo["sweep"]["findings"]  # each finding has a verdict from its paired interval
    assert len(judged) >= 5 and all(f"**{f['verdict']}**" in report for f in judged)
    for f in judged:
        d = f["difference"]
        assert f["verdict"] == ("holds" if d["low"] > 0 else "does not hold" if d["high"] < 0 else "not separable at this size")

    # Another baseline recipe on the same --out: the network is trained again and the store of the old one, which the demo
    # owns, is discarded (it used to be refused, with advice to pass an --overwrite the demo did not have).
    old_print = json.loads((out / "baseline-sweep" / "features" / "manifest.json").read_text())["backbone"]["fingerprint"]
    assert main(["demo", "--data", str(cifar_small), "--checkpoint", str(ckpt / "ema.pt"), "--out", str(out), "--limit", "300",
                 "--blocks", "3,5", "--t", "10,30", "--head-epochs", "1", "--samples", "1", "--baseline-epochs", "2"]) == 0  # fmt: skip
    assert json.loads((out / "baseline" / "baseline.json").read_text())["epochs"] == 2
    new_print = json.loads((out / "baseline-sweep" / "features" / "manifest.json").read_text())["backbone"]["fingerprint"]
    assert new_print != old_print and new_print == load_backbone(f"baseline:{out / 'baseline'}").fingerprint()

    # With a test split, every number of the demo (cells, controls, heads, findings) is the test split's.
    out = tmp_path / "demo-test"
    assert main(["demo", "--data", str(cifar_with_test), "--test-data", str(cifar_with_test), "--checkpoint", str(ckpt / "ema.pt"),
                 "--out", str(out), "--blocks", "3,5", "--t", "10,30", "--head-epochs", "1", "--samples", "1",
                 "--baseline-epochs", "0"]) == 0  # fmt: skip
    demo = json.loads((out / "demo.json").read_text())
    sweep = demo["sweep"]
    assert sweep["roles"]["report"] == 0 and sweep["roles"]["report_images"] == 80
    assert all(h["report"]["rows"] == 80 for h in sweep["heads"].values())
    assert all(f["difference"]["rows"] == 80 for f in sweep["findings"]) and sweep["findings"]
    assert "computed on a test set that no choice saw: test store" in (out / "REPORT.md").read_text()


def test_fid_command_without_weights_fails_clearly(cifar_small, tmp_path, capsys, monkeypatch):
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(fe, "load_state_dict_from_url", offline)
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    assert main(["fid", str(tmp_path / "s.npz"), "--real", str(cifar_small)]) == 2
    err = capsys.readouterr().err
    assert "could not be downloaded" in err and "--inception-weights" in err
    np.savez(tmp_path / "bad.npz", arr_0=np.zeros((4, 16, 16), np.float32))
    assert main(["fid", str(tmp_path / "bad.npz"), "--real", str(cifar_small)]) == 2
    assert "expected uint8 images" in capsys.readouterr().err

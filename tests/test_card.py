"""The model card: cumulative training cost, the attention head and FID slots (filled only from
real results of this checkpoint, "not measured" / "not computed" otherwise), `diffprobe card`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffprobe.backbones.adm import ADMUNet
from diffprobe.backbones.adm_config import architecture_from_flags, normalize_flags
from diffprobe.cli import main
from diffprobe.data import open_dataset, stratified_split
from diffprobe.errors import DiffprobeError
from diffprobe.generate.card import refresh_card, training_facts
from diffprobe.generate.pretrain import export_weights, training_segments

TINY = {"image_size": 16, "num_channels": 32, "channel_mult": "1,2", "num_res_blocks": 1,
        "attention_resolutions": "8", "num_head_channels": 32, "diffusion_steps": 100}  # fmt: skip
SOURCE = {"path": "ckpt/ema.pt", "sha256": "ab" * 32, "step": 1397,
          "training": [{"steps": 1397, "batch_size": 64, "images_seen": 89408, "hours": 1.72, "hardware": "CPU A"}]}  # fmt: skip


def test_training_cost_adds_up_across_a_warm_start():
    config = {"batch_size": 128, "init_from": SOURCE}
    state = {"step": 1397 + 500, "wall_seconds": 3000.0, "window_seconds": 600.0, "hardware": ["GPU B, bf16"]}
    segments = training_segments(config, state)
    assert [(s["steps"], s["images_seen"]) for s in segments] == [(1397, 89408), (500, 64000)]
    assert segments[1]["hours"] == pytest.approx(1.0) and segments[1]["warm_start"]["step"] == 1397
    facts = training_facts(segments, train_rows=45000)
    assert facts["steps"] == "1897 (3.41 epochs)"
    assert facts["images seen"] == "89,408 (1397 steps × batch 64) + 64,000 (500 steps × batch 128) = 153,408"
    assert facts["wall time"] == "2.72 h of training" and facts["hardware"] == "CPU A; then GPU B, bf16"
    assert "warm start from ckpt/ema.pt, sha256 abababababab…, at step 1397: fresh AdamW" in facts["training segments"]
    # A source whose sidecar only gave its step count: its images are unknown, and the card says so.
    old = {**SOURCE, "training": [{"steps": 1397, "batch_size": None, "images_seen": None, "hours": None, "hardware": None}]}
    facts = training_facts(training_segments({**config, "init_from": old}, state), train_rows=45000)
    assert facts["steps"] == "1897" and "unknown (1397 steps of unrecorded batch size)" in facts["images seen"]
    assert "not recorded" in facts["wall time"] and facts["hardware"] == "not recorded; then GPU B, bf16"


def _checkpoint(folder, cifar_small):
    """A checkpoint folder as `diffprobe export` writes it, with made-up probe numbers (no probe is run here)."""
    folder.mkdir()
    model = ADMUNet(architecture_from_flags(TINY))
    training = [{"steps": 40, "batch_size": 8, "images_seen": 320, "hours": 0.01, "hardware": "test CPU"}]
    export_weights(model, normalize_flags(TINY), folder / "ema.pt", 40, training=training)
    side = json.loads((folder / "ema.json").read_text())
    (folder / "ema.json").write_text(json.dumps({**side, "stored_dtype": "float32"}))
    (folder / "loss.csv").write_text("step,loss,grad_norm,lr,img_per_s\n40,0.5,1.0,0.001,10.0\n")
    data = open_dataset(cifar_small)
    config = {"flags": TINY, "batch_size": 8, "lr": 1e-3, "warmup_steps": 2, "weight_decay": 0.0, "grad_clip": 1.0,
              "ema_decay": 0.99, "hflip": True, "seed": 0, "val_fraction": 0.1, "split_seed": 0,
              "data_fingerprint": data.fingerprint(), "train_rows": 270}  # fmt: skip
    probe = {"data": "cifar", "rows": 300, "best": {"t": 10, "block": 5, "pool": 2, "top1": 30.0, "top5": 70.0},
             "controls": {"random_weights": {"top1": 20.0}, "pixels": {"top1": 18.0}}}  # fmt: skip
    (folder / "card.json").write_text(json.dumps({"config": config, "training": training, "probe": probe, "notes": ""}))
    return data


def test_card_says_not_measured_then_takes_the_demo_and_fid_of_this_checkpoint(cifar_small, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))  # no Inception weights here
    ckpt = tmp_path / "ckpt"
    data = _checkpoint(ckpt, cifar_small)
    assert main(["card", str(ckpt)]) == 0
    card = json.loads((ckpt / "card.json").read_text())
    assert card["attention"] is None and card["fid"] is None
    assert card["facts"]["attention head (validation split)"].startswith("not measured yet")
    assert card["facts"]["FID (validation split)"] == "not computed: no Inception weights available offline"
    assert card["facts"]["images seen"] == "320 (40 steps × batch 8)" and "| wall time | 0.01 h of training |" in (ckpt / "MODEL_CARD.md").read_text()

    demo = {"checkpoint": str(ckpt / "ema.pt"), "data": "cifar",
            "sweep": {"rows": 300, "val_fraction": 0.1, "split_seed": 0, "best": {"t": 10, "block": 5, "pool": 2},
                      "heads": {"attention": {"top1": 33.3, "top5": 80.0, "run": "runs/demo/sweep/head-attention"}}}}  # fmt: skip
    (tmp_path / "demo.json").write_text(json.dumps(demo))
    samples = tmp_path / "samples"
    samples.mkdir()
    (samples / "samples.json").write_text(json.dumps({"source": f"adm:{ckpt / 'ema.pt'}", "sampler": "ddim", "steps": 100, "seed": 0}))
    fid = {"fid": 42.5, "samples": str(samples / "samples.npz"), "num_samples": 1000, "real": "cifar",
           "real_fingerprint": data.fingerprint(), "real_split": {"split": "validation", "val_fraction": 0.1, "split_seed": 0},
           "num_real": 30, "inception_weights": "inception.pth",
           "samples_info": json.loads((samples / "samples.json").read_text())}  # fmt: skip
    (tmp_path / "fid.json").write_text(json.dumps(fid))
    assert main(["card", str(ckpt), "--demo", str(tmp_path / "demo.json"), "--fid", str(tmp_path / "fid.json")]) == 0
    facts = json.loads((ckpt / "card.json").read_text())["facts"]
    assert facts["attention head (validation split)"].startswith("33.30% top-1 (80.00% top-5), t=10 block 5, its map pooled to 2×2 (4 tokens)")
    assert facts["FID (validation split)"].startswith("42.50: 1000 samples, DDIM 100 steps, seed 0 vs 30 images of the validation split")
    assert "33.30%" in (ckpt / "MODEL_CARD.md").read_text()

    # Results of another checkpoint, or against other images, are refused, naming why.
    other = tmp_path / "other.pt"
    other.write_bytes((ckpt / "ema.pt").read_bytes() + b"x")
    (tmp_path / "demo2.json").write_text(json.dumps({**demo, "checkpoint": str(other)}))
    with pytest.raises(DiffprobeError, match="was made with .*other.pt, not this checkpoint's ema.pt"):
        refresh_card(ckpt, demo=tmp_path / "demo2.json")
    (tmp_path / "fid2.json").write_text(json.dumps({**fid, "real_split": {"split": "all"}}))
    with pytest.raises(DiffprobeError, match="not against the checkpoint's validation split.*--val-only"):
        refresh_card(ckpt, fid=tmp_path / "fid2.json")
    assert json.loads((ckpt / "card.json").read_text())["fid"]["fid"] == 42.5  # a refused update leaves the card as it was

    # The probe figures of a sweep under the three roles: the reported score and its interval, never a selection score.
    interval = {"estimate": 41.2, "low": 36.0, "high": 46.4, "rows": 300}
    sweep = {"backbone": f"adm:{ckpt / 'ema.pt'}", "data": "cifar", "rows": 2000, "val_fraction": 0.1, "split_seed": 0,
             "roles": {"train": 1400, "select": 300, "report": 300},
             "best": {"t": 10, "block": 5, "pool": 1, "select_top1": 44.0, "report": interval},
             "controls": {"random_weights": {"select_top1": 30.0, "report": {**interval, "estimate": 28.1}},
                          "pixels": {"select_top1": 25.0, "report": {**interval, "estimate": 24.0}}}}  # fmt: skip
    (tmp_path / "summary.json").write_text(json.dumps(sweep))
    assert main(["card", str(ckpt), "--probe", str(tmp_path / "summary.json")]) == 0
    facts = json.loads((ckpt / "card.json").read_text())["facts"]
    assert facts["probe (validation split)"].startswith("logistic regression on 1400 training images, best t=10 block 5 pool 1 "
                                                        "chosen on 300 selection images (44.00%): 41.20% top-1 [36.00, 46.40] on 300 report images")  # fmt: skip
    assert facts["controls"].startswith("random weights 28.10% top-1 [36.00, 46.40]")
    selection_only = {**sweep, "best": {k: v for k, v in sweep["best"].items() if k != "report"}}
    (tmp_path / "summary2.json").write_text(json.dumps(selection_only))
    with pytest.raises(DiffprobeError, match="has no report rows"):
        refresh_card(ckpt, probe=tmp_path / "summary2.json")
    (tmp_path / "summary3.json").write_text(json.dumps({**sweep, "backbone": f"adm:{other}"}))
    with pytest.raises(DiffprobeError, match="not this checkpoint's ema.pt"):
        refresh_card(ckpt, probe=tmp_path / "summary3.json")


def test_fid_against_the_validation_split_reads_only_those_images(cifar_small, tmp_path, monkeypatch):
    from diffprobe.generate import fid as F

    seen = []
    monkeypatch.setattr(F, "inception_fid", lambda weights: object())  # the wiring only: no Inception network here
    monkeypatch.setattr(F, "dataset_batches", lambda data, rows, batch_size: seen.append(rows) or [])
    monkeypatch.setattr(F, "compute_fid", lambda metric, fake, real, count, batch_size: (list(real), 0.0)[1])
    np.savez(tmp_path / "s.npz", arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    data = open_dataset(cifar_small)
    result = F.fid_of_samples(tmp_path / "s.npz", data, val_split=(0.1, 0))
    val = set(np.flatnonzero(stratified_split(data.labels, 0.1, 0)))
    assert set(seen[0]) == val and result["num_real"] == len(val) == 30
    assert result["real_split"] == {"split": "validation", "val_fraction": 0.1, "split_seed": 0, "limit": None}
    F.fid_of_samples(tmp_path / "s.npz", data, real_limit=10, val_split=(0.1, 0))
    assert len(seen[1]) == 10 and set(seen[1]) <= val


def test_export_of_a_warm_started_run_counts_from_the_source(cifar_small, tmp_path, monkeypatch):
    """pretrain → export → pretrain --init-from → export: the second card sums both trainings
    (the probes and samples are stubbed: this is about the card's bookkeeping)."""
    import diffprobe.generate.sample as sample_module
    import diffprobe.studies.sweep as sweep_module
    from diffprobe.generate.card import export_run
    from diffprobe.generate.pretrain import pretrain

    def fake_grid(backbone, out, num, steps, compute):
        out.mkdir(parents=True, exist_ok=True)
        (out / "grid.png").write_bytes(b"png")
        return out / "grid.png"

    probe = {"data": "cifar", "rows": 300, "best": {"t": 10, "block": 3, "pool": 1, "top1": 30.0, "top5": 70.0},
             "controls": {"random_weights": {"top1": 20.0}, "pixels": {"top1": 18.0}}}  # fmt: skip
    monkeypatch.setattr(sweep_module, "sweep", lambda *a, **k: probe)
    monkeypatch.setattr(sample_module, "sample_grid", fake_grid)
    data = open_dataset(cifar_small)
    settings = dict(batch_size=8, lr=1e-3, warmup_steps=2, save_every=3, log_every=1)
    pretrain(data, tmp_path / "run1", TINY, 3, **settings)
    export_run(tmp_path / "run1", tmp_path / "ckpt1", data, hardware="machine A")
    pretrain(data, tmp_path / "run2", {}, 5, init_from=tmp_path / "ckpt1" / "ema.pt", **{**settings, "batch_size": 16})
    card = export_run(tmp_path / "run2", tmp_path / "ckpt2", data, hardware="machine B")
    facts = card["facts"]
    assert card["summary"].endswith("5 steps") and facts["steps"].startswith("5 (")
    assert facts["images seen"] == "24 (3 steps × batch 8) + 32 (2 steps × batch 16) = 56"
    assert facts["hardware"] == "machine A; then machine B"
    assert "warm start from" in facts["training segments"] and str(tmp_path / "ckpt1" / "ema.pt") in facts["training segments"]
    side = json.loads((tmp_path / "ckpt2" / "ema.json").read_text())
    assert side["step"] == 5 and [s["steps"] for s in side["training"]] == [3, 2]
    assert facts["attention head (validation split)"].startswith("not measured yet")
    # The card's loss curve covers both runs: the source folder's rows up to the warm start, then the new run's.
    steps = lambda folder: [int(r.split(",")[0]) for r in (folder / "loss.csv").read_text().splitlines()[1:]]  # noqa: E731
    assert steps(tmp_path / "ckpt2") == [1, 2, 3, 4, 5] and (tmp_path / "ckpt2" / "loss.png").is_file()
    # Exported over the folder it was warm-started from (how the shipped checkpoint is refreshed): still whole.
    pretrain(data, tmp_path / "run3", {}, 7, init_from=tmp_path / "ckpt2" / "ema.pt", **settings)
    card = export_run(tmp_path / "run3", tmp_path / "ckpt2", data, hardware="machine C")
    assert steps(tmp_path / "ckpt2") == [1, 2, 3, 4, 5, 6, 7] and card["facts"]["steps"].startswith("7 (")


def test_objective_names_the_weighting_and_earlier_segments_that_differ():
    from diffprobe.generate.card import objective_fact

    uniform = {"steps": 1397, "batch_size": 64}  # a segment recorded before weightings existed trained uniformly
    snr = {"loss_weighting": "min-snr", "snr_gamma": 5.0}
    assert objective_fact({}, [uniform]) == "ε-prediction, simple MSE"
    assert objective_fact(snr, [uniform, {**uniform, **snr}]) == (
        "ε-prediction, MSE weighted min(SNR, 5)/SNR (Min-SNR-γ) (segments before the last: ε-prediction, simple MSE)")
    assert objective_fact(snr, [{**uniform, **snr}, {**uniform, **snr}]) == "ε-prediction, MSE weighted min(SNR, 5)/SNR (Min-SNR-γ)"

"""Pre-training: exact resume, the exported checkpoint loads as a backbone, the held-out split, the VLB."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from diffprobe.backbones import load_backbone
from diffprobe.data import open_dataset, stratified_split
from diffprobe.errors import DiffprobeError
from diffprobe.features.noise import NoiseSchedule
from diffprobe.generate.pretrain import pretrain, training_rows, PretrainConfig
from diffprobe.generate.vlb import learned_range_vlb, posterior_terms

# A small ADM at 16×16 that still has every part: attention, dropout, two levels.
TINY = {"image_size": 16, "num_channels": 32, "channel_mult": "1,2", "num_res_blocks": 1,
        "attention_resolutions": "8", "num_head_channels": 32, "dropout": 0.1, "diffusion_steps": 100}  # fmt: skip
SETTINGS = dict(batch_size=8, lr=1e-3, warmup_steps=2, ema_decay=0.99, seed=3)


def _run(data, out, steps, flags=TINY, **extra):
    return pretrain(data, out, flags, steps, save_every=3, log_every=1, **{**SETTINGS, **extra})


def test_resume_is_exact(cifar_small, tmp_path):
    data = open_dataset(cifar_small)
    straight = _run(data, tmp_path / "straight", 6)
    _run(data, tmp_path / "resumed", 3)
    resumed = _run(data, tmp_path / "resumed", 6)  # a new process would do the same: all state is on disk
    a = [r["loss"] for r in straight.state.history]
    b = [r["loss"] for r in resumed.state.history]
    assert len(a) == 6 and a == b  # the same loss curve, bit for bit
    ema_a, ema_b = torch.load(tmp_path / "straight" / "ema.pt"), torch.load(tmp_path / "resumed" / "ema.pt")
    assert all(torch.equal(ema_a[k], ema_b[k]) for k in ema_a)
    assert (tmp_path / "resumed" / "loss.png").is_file() and (tmp_path / "resumed" / "loss.csv").is_file()


def test_resume_with_other_settings_is_refused(cifar_small, tmp_path):
    data = open_dataset(cifar_small)
    _run(data, tmp_path / "run", 1)
    with pytest.raises(DiffprobeError, match="lr: checkpoint 0.001 vs now 0.0005"):
        _run(data, tmp_path / "run", 2, lr=5e-4)


def test_training_lowers_the_loss_and_exports_a_backbone(cifar_small, tmp_path):
    data = open_dataset(cifar_small)
    trainer = _run(data, tmp_path / "run", 40, flags={**TINY, "dropout": 0.0})
    losses = [r["loss"] for r in trainer.state.history]
    assert losses[0] == pytest.approx(1.0, abs=0.15)  # zero-initialised output: predicts ε = 0
    assert np.mean(losses[-10:]) < 0.75 * np.mean(losses[:3])
    side = json.loads((tmp_path / "run" / "ema.json").read_text())
    assert side["step"] == 40 and side["flags"]["num_channels"] == 32
    # No flags needed: the sidecar names the architecture.
    backbone = load_backbone(f"adm:{tmp_path / 'run' / 'ema.pt'}")
    assert backbone.image_size == 16 and backbone.schedule.num_timesteps == 100
    x = torch.zeros(2, 3, 16, 16)
    feats = backbone.forward_features(x, torch.tensor([10, 10]), blocks=(3,))
    assert feats[3].shape[:2] == (2, 32)


def test_held_out_images_are_the_probes_validation_split(cifar_small, tmp_path):
    data = open_dataset(cifar_small)
    config = PretrainConfig(flags=TINY)
    rows = training_rows(data.labels, config)
    val = np.flatnonzero(stratified_split(data.labels, 0.1, 0))
    assert len(rows) + len(val) == len(data) and not set(rows) & set(val)
    # A feature store of any subset of the dataset validates on exactly the held-out images.
    from diffprobe.features.extract import extract
    from diffprobe.features.plan import FeaturePlan

    backbone = load_backbone("adm:random", **{k: v for k, v in TINY.items()})
    store = extract(backbone, data, FeaturePlan(t=[10], blocks=[3], pools=[1]), tmp_path / "store", limit=120, batch_size=40)
    is_val = store.split(0.1, 0)
    assert set(store.indices[is_val]) == set(store.indices) & set(val)
    assert set(store.indices[~is_val]) <= set(rows)


def test_learned_sigma_trains(cifar_small, tmp_path):
    data = open_dataset(cifar_small)
    trainer = _run(data, tmp_path / "run", 2, flags={**TINY, "learn_sigma": True})
    assert all(np.isfinite(r["loss"]) for r in trainer.state.history)
    backbone = load_backbone(f"adm:{tmp_path / 'run' / 'ema.pt'}")
    assert backbone.model.arch.out_channels == 6


def test_vlb_is_zero_for_the_true_posterior():
    schedule = NoiseSchedule.named("linear", 100)
    torch.manual_seed(0)
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    eps = torch.randn_like(x0)
    t = torch.tensor([1, 10, 50, 99])
    abar = torch.from_numpy(schedule.alphas_cumprod).float()[t].view(-1, 1, 1, 1)
    x_t = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    # v = -1 selects the posterior variance β̃_t: with the true ε the model's Gaussian is q's.
    vlb = learned_range_vlb(schedule, x0, x_t, t, eps, -torch.ones_like(x0))
    assert vlb.abs().max() < 1e-3
    worse = learned_range_vlb(schedule, x0, x_t, t, eps + 0.5, -torch.ones_like(x0))
    assert (worse > 1e-2).all()
    # t = 0 is the decoder's NLL in bits: positive, finite.
    nll = learned_range_vlb(schedule, x0, x_t, torch.zeros(4, dtype=torch.long), eps, torch.zeros_like(x0))
    assert torch.isfinite(nll).all() and (nll > 0).all()
    terms = posterior_terms(schedule)
    assert np.isfinite(terms["log_var_clipped"].numpy()).all()


def _loss_rows(run_dir):
    """loss.csv as text, without img_per_s (wall-clock throughput, never reproducible)."""
    import csv

    with open(run_dir / "loss.csv") as f:
        return [{k: v for k, v in row.items() if k != "img_per_s"} for row in csv.DictReader(f)]


def test_kill_off_the_log_interval_resumes_to_the_same_loss_csv(cifar_small, tmp_path):
    import os
    import signal
    import subprocess
    import sys

    from conftest import ROOT

    data = open_dataset(cifar_small)
    settings = dict(save_every=4, log_every=5, **SETTINGS)
    pretrain(data, tmp_path / "straight", TINY, 12, **settings)
    # kill -9 right after the checkpoint of step 8: two steps past a logged row, in a process of its own.
    script = (
        "import json, os, signal, sys\n"
        "from diffprobe.data import open_dataset\n"
        "from diffprobe.generate import pretrain as P\n"
        "save = P.Trainer.save\n"
        "def save_then_die(self):\n"
        "    save(self)\n"
        "    if self.state.step == 8:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        "P.Trainer.save = save_then_die\n"
        "P.pretrain(open_dataset(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3]), 12, **json.loads(sys.argv[4]))\n"
    )
    killed = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", script, str(cifar_small), str(killed), json.dumps(TINY), json.dumps(settings)],
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())},
                          cwd=ROOT)  # the same threads as this process: CPU sums split by thread count round apart (torch 2.11 does)
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(killed / "training-state.pt", weights_only=True)["state"]["step"] == 8
    pretrain(data, killed, TINY, 12, **settings)
    # A run stopped by its own --steps off the interval (it writes a short row at step 7), then continued.
    pretrain(data, tmp_path / "continued", TINY, 7, **settings)
    assert [r["step"] for r in _loss_rows(tmp_path / "continued")] == ["5", "7"]
    pretrain(data, tmp_path / "continued", TINY, 12, **settings)
    straight = _loss_rows(tmp_path / "straight")
    assert [r["step"] for r in straight] == ["5", "10", "12"]
    assert _loss_rows(killed) == straight
    assert _loss_rows(tmp_path / "continued") == straight


# ------------------------------------------------------------------------------ warm start (--init-from)


def _shipped(data, tmp_path):
    """A 3-step run's EMA, stored as `diffprobe export` ships it (float16, flags in ema.json)."""
    import shutil

    _run(data, tmp_path / "src", 3)
    weights = {k: v.half() if v.is_floating_point() else v for k, v in torch.load(tmp_path / "src" / "ema.pt").items()}
    (tmp_path / "ship").mkdir()
    torch.save(weights, tmp_path / "ship" / "ema.pt")
    shutil.copy(tmp_path / "src" / "ema.json", tmp_path / "ship" / "ema.json")
    return tmp_path / "ship" / "ema.pt", weights


def test_warm_start_begins_from_the_source_ema_and_records_it(cifar_small, tmp_path, monkeypatch):
    import hashlib

    from diffprobe.generate.pretrain import Trainer

    data = open_dataset(cifar_small)
    shipped, weights = _shipped(data, tmp_path)
    first: dict = {}
    loss = Trainer.loss

    def spy(self, step):
        if not first:
            first.update(step=step, n=int(self.ema.n_averaged), model={k: v.clone() for k, v in self.model.state_dict().items()},
                         ema={k: v.clone() for k, v in self.ema.module.state_dict().items()})  # fmt: skip
        return loss(self, step)

    monkeypatch.setattr(Trainer, "loss", spy)
    trainer = pretrain(data, tmp_path / "warm", {}, 5, save_every=3, log_every=1, init_from=shipped, **SETTINGS)
    # The first step runs on the source's weights, online and EMA alike, and continues its step count.
    assert first["step"] == 3 and first["n"] == 3
    assert all(torch.equal(first["model"][k], weights[k].float()) for k in weights)
    assert all(torch.equal(first["ema"][k], weights[k].float()) for k in weights)
    # A fresh optimiser: the learning rate warms up again (warmup_steps=2).
    assert [r["lr"] for r in trainer.state.history] == [pytest.approx(1e-3), pytest.approx(1e-3)]
    assert trainer.scheduler.last_epoch == 2 and trainer.optimizer.state_dict()["state"][0]["step"] == 2
    # The run's config names the source; ema.json counts steps and images across the warm start.
    config = json.loads((tmp_path / "warm" / "config.json").read_text())
    assert config["init_from"]["path"] == str(shipped) and config["init_from"]["step"] == 3
    assert config["init_from"]["sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()
    assert config["flags"] == json.loads((tmp_path / "ship" / "ema.json").read_text())["flags"]
    side = json.loads((tmp_path / "warm" / "ema.json").read_text())
    assert side["step"] == 5 and [(s["steps"], s["images_seen"]) for s in side["training"]] == [(3, 24), (2, 16)]
    assert side["training"][1]["warm_start"]["sha256"] == config["init_from"]["sha256"] and side["training"][1]["hardware"]


def test_warm_started_run_resumes_exactly_and_refusals(cifar_small, tmp_path):
    data = open_dataset(cifar_small)
    shipped, _ = _shipped(data, tmp_path)
    straight = pretrain(data, tmp_path / "straight", {}, 7, save_every=3, log_every=1, init_from=shipped, **SETTINGS)
    pretrain(data, tmp_path / "resumed", {}, 5, save_every=3, log_every=1, init_from=shipped, **SETTINGS)
    # The same command with more steps resumes from the run's own training state (--init-from is not reapplied),
    # and so does the command without --init-from.
    pretrain(data, tmp_path / "resumed", {}, 6, save_every=3, log_every=1, init_from=shipped, **SETTINGS)
    resumed = pretrain(data, tmp_path / "resumed", {}, 7, save_every=3, log_every=1, **SETTINGS)
    assert [r["loss"] for r in resumed.state.history] == [r["loss"] for r in straight.state.history]
    assert json.loads((tmp_path / "resumed" / "ema.json").read_text())["training"][-1]["steps"] == 4
    with pytest.raises(DiffprobeError, match=r"warm-started from .*ship/ema.pt .*src/ema.pt differs\): drop --init-from"):
        pretrain(data, tmp_path / "resumed", {}, 8, init_from=tmp_path / "src" / "ema.pt", **SETTINGS)
    with pytest.raises(DiffprobeError, match="already holds a training state .* that was not warm-started"):
        pretrain(data, tmp_path / "src", {}, 8, init_from=shipped, **SETTINGS)
    with pytest.raises(DiffprobeError, match="was trained with other flags .num_channels: checkpoint 32 vs given 64"):
        pretrain(data, tmp_path / "resumed", {"num_channels": 64}, 8, **SETTINGS)
    with pytest.raises(DiffprobeError, match="at step 3 and --steps counts those steps too: pass more than 3"):
        pretrain(data, tmp_path / "short", {}, 3, init_from=shipped, **SETTINGS)
    with pytest.raises(DiffprobeError, match="training state: to continue that run exactly, pass its folder as --out"):
        pretrain(data, tmp_path / "x", {}, 8, init_from=tmp_path / "src" / "training-state.pt", **SETTINGS)


def test_warm_start_with_another_architecture_says_what_differs(cifar_small, tmp_path, capsys):
    from diffprobe.cli import main

    data = open_dataset(cifar_small)
    shipped, weights = _shipped(data, tmp_path)
    common = ["pretrain", "--data", str(cifar_small), "--out", str(tmp_path / "run"), "--steps", "5", "--batch-size", "8",
              "--init-from", str(shipped)]  # fmt: skip
    capsys.readouterr()
    assert main([*common, "-o", "num_channels=16", "-o", "dropout=0.0"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "num_channels: checkpoint 32 vs given 16" in err and "dropout" not in err
    # Weights that do not fit the flags (here: no .json beside them, so the flags given describe the network).
    torch.save(weights, tmp_path / "bare.pt")
    with pytest.raises(DiffprobeError) as e:
        pretrain(data, tmp_path / "bare", {**TINY, "num_channels": 64}, 5, init_from=tmp_path / "bare.pt", **SETTINGS)
    assert "\n" not in str(e.value) and "shapes differ" in str(e.value)
    assert "input_blocks.0.0.weight: checkpoint [32, 3, 3, 3], model [64, 3, 3, 3]" in str(e.value)
    assert not (tmp_path / "run").exists() and not (tmp_path / "bare" / "training-state.pt").exists()
    # The CLI's warm start takes the flags from ema.json: no -o needed.
    assert main([*common, "--save-every", "5"]) == 0
    assert json.loads((tmp_path / "run" / "ema.json").read_text())["step"] == 5


def test_min_snr_weights_each_sample_by_its_timestep(tmp_path):
    from diffprobe.generate.pretrain import Trainer, snr_weights

    abar = torch.from_numpy(NoiseSchedule.named("linear", 100).alphas_cumprod).float()
    assert snr_weights(abar, "uniform", 5.0) is None
    w = snr_weights(abar, "min-snr", 5.0)
    snr = abar / (1 - abar)
    assert torch.allclose(w[snr <= 5], torch.ones_like(w[snr <= 5]))  # noisy steps keep the plain weight
    assert torch.allclose(w[snr > 5], 5 / snr[snr > 5]) and w[0] < 0.05  # nearly clean steps count less

    images = torch.randint(0, 256, (16, 3, 16, 16), dtype=torch.uint8)
    flags = {**TINY, "dropout": 0.0}
    plain = Trainer(PretrainConfig(flags=flags, **SETTINGS), images, tmp_path / "a", precision="fp32")
    weighted = Trainer(PretrainConfig(flags=flags, loss_weighting="min-snr", **SETTINGS), images, tmp_path / "b", precision="fp32")
    for trainer in (plain, weighted):  # the same non-zero network in both, so only the weighting differs
        torch.manual_seed(0)
        for p in trainer.model.parameters():
            torch.nn.init.normal_(p, std=0.02)
    weighted.model.load_state_dict(plain.model.state_dict())
    # Recompute step 0's per-sample errors by hand: the weighted loss is their min-SNR-weighted mean.
    from diffprobe.data import to_model_range
    from diffprobe.generate.pretrain import batch_rows, step_generator

    gen = step_generator(3, 0, 1)
    x0 = to_model_range(images[batch_rows(16, 8, 3, 0)])
    flip = torch.rand(8, generator=gen) < 0.5
    x0 = torch.where(flip.view(-1, 1, 1, 1), x0.flip(-1), x0)
    t = torch.randint(0, 100, (8,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    assert w[t].min() < 0.5  # step 0 draws a low-noise sample, so the two losses must differ
    a = abar[t].view(-1, 1, 1, 1)
    with torch.no_grad():
        per_sample = (plain.model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t).float() - eps).square().mean(dim=(1, 2, 3))
        assert plain.loss(0).item() == pytest.approx(per_sample.mean().item(), rel=1e-4)
        assert weighted.loss(0).item() == pytest.approx((w[t] * per_sample).mean().item(), rel=1e-4)
    with pytest.raises(DiffprobeError, match="loss weighting 'snr'"):
        Trainer(PretrainConfig(flags=flags, loss_weighting="snr", **SETTINGS), images, tmp_path / "c")


def test_runs_saved_before_loss_weighting_resume(cifar_small, tmp_path):
    """A training state written before the weighting settings existed resumes (it trained uniformly)."""
    data = open_dataset(cifar_small)
    _run(data, tmp_path / "run", 3)
    state = tmp_path / "run" / "training-state.pt"
    blob = torch.load(state, weights_only=True)
    for key in ("loss_weighting", "snr_gamma"):
        del blob["config"][key]
    torch.save(blob, state)
    assert _run(data, tmp_path / "run", 4).state.step == 4
    with pytest.raises(DiffprobeError, match="loss_weighting: checkpoint 'uniform' vs now 'min-snr'"):
        _run(data, tmp_path / "run", 5, loss_weighting="min-snr")


def test_a_width_groupnorm_cannot_take_is_one_line(cifar_small, tmp_path, capsys):
    from diffprobe.cli import main

    capsys.readouterr()
    args = ["pretrain", "--data", str(cifar_small), "--out", str(tmp_path / "run"), "--steps", "1", "-o", "num_channels=16"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "num_channels 16" in err and "16, 32 channels" in err and "multiple of 32" in err
    assert not (tmp_path / "run" / "training-state.pt").exists()

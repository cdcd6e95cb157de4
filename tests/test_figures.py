"""Each figure kind drawn from the cases that used to break it (conftest checks, as every figure
is saved, that no text leaves the canvas): narrow heatmaps with long titles, CKA over hundreds of
settings, head bars with a reference line, confusion matrices, curves, a one-row loss, sample grids."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from diffprobe import report

LONG_TITLE = "adm:diffprobe-cifar10/ema.pt on cifar10-train: logistic regression top-1 (selection rows), pool 2×2"


@pytest.mark.parametrize("columns", [1, 2, 3, 12])
def test_a_narrow_heatmap_keeps_its_whole_title(tmp_path, columns):
    path = tmp_path / "h.png"
    report.heatmap(path, np.random.default_rng(0).uniform(10, 90, (6, columns)), [4, 8, 13, 16, 18, 20],
                   [10 * (i + 1) for i in range(columns)], LONG_TITLE, best=(2, 0))  # fmt: skip
    assert Image.open(path).size[0] < 2000


def test_cka_over_many_settings_stays_a_readable_size_on_a_fixed_scale(tmp_path):
    keys = [f"t{t:04d}_b{b:02d}_p{p}" for t in (10, 50, 150) for b in range(1, 40) for p in (1, 2)]  # 234 settings
    values = np.random.default_rng(0).uniform(0.2, 0.6, (len(keys), len(keys)))
    report.heatmap(tmp_path / "cka.png", values, keys, keys, "linear CKA (minibatch, 6000 images)", xlabel="B", ylabel="A",
                   colorbar="linear CKA", limits=(0, 1), fmt="{:.2f}")  # fmt: skip
    width, height = Image.open(tmp_path / "cka.png").size
    assert width <= 2200 and height <= 1800, (width, height)  # was 6348 × 2330 px


def test_head_bars_and_transfer_bars(tmp_path):
    rows = [{"head": "logistic regression (L-BFGS)", "recipe": "-", "top1": 41.0, "low": 35.0, "high": 47.0}]
    rows += [{"head": h, "recipe": r, "top1": 41.0 + i, "low": 35.0 + i, "high": 47.0 + i}
             for i, (h, r) in enumerate([(h, r) for h in ("linear", "mlp", "attention", "fusion") for r in ("modern", "paper")])]  # fmt: skip
    report.head_bars(tmp_path / "heads.png", rows, "heads on t0010_b20_p1 (fusion: + t0100), top-1 on 300 report rows")
    report.transfer_bars(tmp_path / "transfer.png", [{"dataset": "a/train", "top1": 50.0, "low": 40.0, "high": 60.0,
                                                     "random_weights_top1": 30.0, "pixels_top1": 20.0}], LONG_TITLE)  # fmt: skip


def test_confusion_curves_and_a_one_row_loss(tmp_path):
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    matrix = np.random.default_rng(0).integers(0, 20, (10, 10))
    report.confusion_matrix_plot(tmp_path / "confusion.png", matrix, classes, "attention head, top-1 41.00% [35.00, 47.00]")
    history = [{"epoch": e, "train_loss": 2 - e / 10, "select_loss": 2.1 - e / 12, "train_top1": 10 + 5 * e, "select_top1": 10 + 4 * e}
               for e in range(1, 11)]  # fmt: skip
    report.training_curves(tmp_path / "curves.png", history, LONG_TITLE, chosen_epoch=7)
    report.loss_curve(tmp_path / "loss.png", [{"step": 10, "loss": 0.5}])
    # the single point is drawn: the image is not one flat colour inside the axes
    pixels = np.asarray(Image.open(tmp_path / "loss.png").convert("L"))
    assert len(np.unique(pixels[100:300, 150:600])) > 2


def test_a_grid_of_small_samples_is_enlarged_sharply(tmp_path):
    import torch

    from diffprobe.generate.sample import GRID_MIN_PIXELS, save_samples

    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    save_samples(images, tmp_path, {})
    grid = Image.open(tmp_path / "grid.png")
    assert grid.size[0] >= GRID_MIN_PIXELS
    first = np.asarray(grid)[:, :, :3]
    scale = grid.size[0] // 133
    assert (first[scale : 2 * scale, scale : 2 * scale] == first[scale, scale]).all()  # nearest: one sample pixel, one block


def test_titles_name_the_checkpoint_folder_not_just_ema_pt():
    assert report.short_source("adm:runs/pretrain/c10/ema.pt") == "adm:c10/ema.pt"
    assert report.short_source("adm:/x/256x256_diffusion_uncond.pt") == "adm:256x256_diffusion_uncond.pt"
    assert report.short_source("diffusers:stabilityai/stable-diffusion-2-1") == "diffusers:stable-diffusion-2-1"

"""Datasets, image modes, corrupt files, archives, transform and splits."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
from PIL import Image

from diffprobe import DiffprobeError
from diffprobe.data import (
    TransformedImages,
    model_transform,
    open_dataset,
    stratified_split,
    stratified_subset,
    to_rgb,
)


def test_image_folder_from_real_cifar(cifar_small):
    data = open_dataset(cifar_small)
    assert len(data) == 300 and data.classes[:3] == ["airplane", "automobile", "bird"]
    assert np.bincount(data.labels).tolist() == [30] * 10
    assert data.load(0).mode == "RGB" and data.load(0).size == (32, 32)
    assert data.fingerprint() == open_dataset(cifar_small).fingerprint()


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "LA", "CMYK", "I;16", "1"])
def test_every_image_mode_becomes_rgb(mode, tmp_path):
    image = Image.new("RGB", (12, 7), (200, 30, 90))
    if mode == "P":
        image = image.convert("P")
        image.info["transparency"] = 0
    elif mode == "I;16":
        image = Image.new("I;16", (12, 7), 3000)
    else:
        image = image.convert(mode)
    out = to_rgb(image)
    assert out.mode == "RGB" and out.size == (12, 7)


def test_transparent_pixels_become_white():
    image = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    assert to_rgb(image).getpixel((0, 0)) == (255, 255, 255)


def test_transform_any_size_to_the_model_square():
    tf = model_transform(32)
    x = tf(Image.new("RGB", (90, 41), (255, 0, 0)))
    assert x.shape == (3, 32, 32)
    assert x[0].min().item() == pytest.approx(1.0) and x[1].max().item() == pytest.approx(-1.0)


def test_corrupt_image_is_reported_by_path(tmp_path):
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / cls / "ok.png")
    (tmp_path / "b" / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    data = open_dataset(tmp_path)
    bad = [i for i in range(len(data)) if data.describe(i).endswith("broken.jpg")][0]
    with pytest.raises(DiffprobeError, match="cannot read image .*broken.jpg"):
        data.load(bad)
    x, label, index, error = TransformedImages(data, model_transform(8), 8)[bad]
    assert "broken.jpg" in error and label == -1 and x.shape == (3, 8, 8)


def test_empty_or_missing_folders(tmp_path):
    with pytest.raises(DiffprobeError, match="dataset not found"):
        open_dataset(tmp_path / "missing")
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DiffprobeError, match="no images in"):
        open_dataset(tmp_path / "empty")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(DiffprobeError, match="not a .tar"):
        open_dataset(tmp_path / "file.txt")


def test_archive_is_unpacked_once_and_wrappers_skipped(cifar_small, tmp_path, isolated_cache):
    archive = tmp_path / "mini.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(cifar_small, arcname="mini/train")
    data = open_dataset(archive)
    assert len(data) == 300 and data.classes[0] == "airplane"
    unpacked = list((isolated_cache / "archives").glob("mini-*"))
    assert len(unpacked) == 1
    stamp = unpacked[0].stat().st_mtime_ns
    assert len(open_dataset(archive)) == 300
    assert unpacked[0].stat().st_mtime_ns == stamp
    assert data.fingerprint() == open_dataset(cifar_small).fingerprint()


def test_broken_archive(tmp_path):
    bad = tmp_path / "bad.tar.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(DiffprobeError, match="cannot unpack"):
        open_dataset(bad)


def test_torchvision_dataset_offline_is_a_clear_error(tmp_path):
    with pytest.raises(DiffprobeError, match="not found under .*--download"):
        open_dataset("torchvision:CIFAR10", root=tmp_path)
    with pytest.raises(DiffprobeError, match="unknown torchvision dataset"):
        open_dataset("torchvision:MNISTX", root=tmp_path)


def test_stratified_split_and_subset_are_fixed_by_seed():
    labels = np.repeat(np.arange(10), 50)
    val = stratified_split(labels, 0.1, seed=0)
    assert np.bincount(labels[val]).tolist() == [5] * 10
    assert np.array_equal(val, stratified_split(labels, 0.1, seed=0))
    assert not np.array_equal(val, stratified_split(labels, 0.1, seed=1))
    subset = stratified_subset(labels, 100, seed=0)
    assert len(subset) == 100 and np.bincount(labels[subset]).tolist() == [10] * 10
    assert np.all(np.diff(subset) > 0)

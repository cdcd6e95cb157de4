"""Shared test data: the ADM fixture, a small ImageFolder cut from the shared CIFAR-10 archive."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DIFFPROBE_SHARED") or ROOT.parent / "shared")  # elsewhere, e.g. .gpu/shared on a GPU machine
FIXTURE_DIR = SHARED / "fixtures" / "adm"
FIXTURE_CKPT = FIXTURE_DIR / "adm_uncond_tiny.pt"
CIFAR_TAR = SHARED / "data" / "cifar10-train.tar.gz"
FIXTURE_SPEC = f"adm:{FIXTURE_CKPT}"

# Tests never touch the network; set before huggingface_hub is first imported (it reads this once).
os.environ["HF_HUB_OFFLINE"] = "1"

if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two pytest-xdist workers on a 2-core machine: one thread each, so they share the cores
    # instead of fighting over them (a worker's torchrun children already run on one thread).
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def isolated_cache(tmp_path_factory):
    """Unpacked archives go to a per-session cache, never the user's ~/.cache."""
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("DIFFPROBE_CACHE")
    os.environ["DIFFPROBE_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("DIFFPROBE_CACHE", None)
    else:
        os.environ["DIFFPROBE_CACHE"] = old


def _cut_cifar(dest: Path, per_class: int, skip: int = 0) -> Path:
    """`per_class` images of each class of the shared archive (after the first `skip`), as an ImageFolder."""
    counts: dict[str, int] = {}
    skipped: dict[str, int] = {}
    with tarfile.open(CIFAR_TAR) as tar:
        for member in tar:
            parts = Path(member.name).parts
            if not member.isfile() or len(parts) < 2:
                continue
            cls = parts[-2]
            if skipped.get(cls, 0) < skip:
                skipped[cls] = skipped.get(cls, 0) + 1
                continue
            if counts.get(cls, 0) >= per_class:
                continue
            counts[cls] = counts.get(cls, 0) + 1
            out = dest / cls / parts[-1]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(tar.extractfile(member).read())
    assert len(counts) == 10, counts
    return dest


@pytest.fixture(scope="session")
def cifar_small(tmp_path_factory) -> Path:
    """30 real CIFAR-10 images per class (300 in all)."""
    return _cut_cifar(tmp_path_factory.mktemp("cifar_small") / "cifar", 30)


@pytest.fixture(scope="session")
def cifar_with_test(cifar_small, tmp_path_factory) -> Path:
    """A dataset with two splits: train/ (cifar_small's 300 images) and test/ (8 other images a class)."""
    import shutil

    root = tmp_path_factory.mktemp("cifar_split") / "cifar"
    shutil.copytree(cifar_small, root / "train")
    _cut_cifar(root / "test", 8, skip=30)
    return root


@pytest.fixture(scope="session")
def fixture_backbone():
    from diffprobe import load_backbone

    return load_backbone(FIXTURE_SPEC)


def png_bytes(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(autouse=True)
def figures_keep_their_text_on_the_canvas(monkeypatch):
    """Every figure any test makes is checked as it is saved: nothing (a title, a legend, a tick
    label) may reach past the canvas, where the PNG would cut it off."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    original = Figure.savefig

    def checked_savefig(self, fname, *args, **kwargs):
        box = self.get_tightbbox(self.canvas.get_renderer())  # in inches, like the figure's size
        width, height = self.get_size_inches()
        slack = 0.02
        assert box.x0 >= -slack and box.y0 >= -slack and box.x1 <= width + slack and box.y1 <= height + slack, (
            f"{fname}: drawn area {box.x0:.2f}..{box.x1:.2f} × {box.y0:.2f}..{box.y1:.2f} in leaves the "
            f"{width:.2f} × {height:.2f} in canvas"
        )
        return original(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", checked_savefig)

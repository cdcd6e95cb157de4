"""`pip install .` works as well as the editable install (issue 23): the wheel carries the shipped
checkpoint, and an installed diffprobe finds it from any folder."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

from conftest import ROOT


def test_a_wheel_install_finds_the_shipped_checkpoint(tmp_path):
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels)],
                   check=True, capture_output=True)  # fmt: skip
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    inner = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    # torch and the rest come from this environment (no downloads here); diffprobe itself only from the wheel
    Path(inner, "borrowed.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    wheel = next(wheels.glob("diffprobe-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--prefix", str(venv), str(wheel)],
                   check=True, capture_output=True)  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DIFFPROBE_CHECKPOINT")}
    found = subprocess.run([str(python), "-c", "import diffprobe, diffprobe.studies.demo as d; print(diffprobe.__file__); print(d.default_checkpoint())"],
                           cwd=elsewhere, env=env, check=True, capture_output=True, text=True).stdout.split()  # fmt: skip
    assert found[0].startswith(str(venv)) and found[1] == str(venv / "share" / "diffprobe" / "checkpoints" / "diffprobe-cifar10" / "ema.pt")
    blocks = subprocess.run([str(python), "-m", "diffprobe", "blocks", f"adm:{found[1]}"], cwd=elsewhere, env=env,
                            capture_output=True, text=True)  # fmt: skip
    assert blocks.returncode == 0 and "middle_block" in blocks.stdout


def test_no_checkpoint_anywhere_is_one_line(tmp_path, monkeypatch):
    import pytest

    from diffprobe import DiffprobeError
    from diffprobe.studies import demo

    monkeypatch.delenv("DIFFPROBE_CHECKPOINT", raising=False)
    monkeypatch.setattr(demo, "PACKAGE_ROOT", tmp_path)
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    with pytest.raises(DiffprobeError, match="the default checkpoint is in none of .*pass --checkpoint FILE, set \\$DIFFPROBE_CHECKPOINT"):
        demo.default_checkpoint()
    monkeypatch.setenv("DIFFPROBE_CHECKPOINT", str(tmp_path / "mine.pt"))
    assert demo.default_checkpoint() == tmp_path / "mine.pt"

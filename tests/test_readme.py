"""The README's "From Python" block runs as written (on the shipped checkpoint and the shared archive)."""

from __future__ import annotations

import os
import re

from conftest import CIFAR_TAR, ROOT


def test_readme_python_block_runs(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## From Python"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "checkpoints").symlink_to(ROOT / "checkpoints")
    monkeypatch.chdir(tmp_path)
    block = block.replace("../shared/data/cifar10-train.tar.gz", str(CIFAR_TAR))
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert os.path.isfile(tmp_path / "runs/py/linear/head.pt")
    assert namespace["labels"] and all(label in namespace["store"].classes for label in namespace["labels"])

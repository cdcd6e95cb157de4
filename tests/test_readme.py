"""The README's "From Python" block runs as written, on the shipped checkpoint, with the shared
archive's path pointing at a 300-image cut of it and the subset shrunk to 200 (as the shell
commands' sizes shrink in test_readme_commands.py)."""

from __future__ import annotations

import os
import re

from conftest import ROOT


def test_readme_python_block_runs(tmp_path, monkeypatch, cifar_small):
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## From Python"):]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    (tmp_path / "checkpoints").symlink_to(ROOT / "checkpoints")
    monkeypatch.chdir(tmp_path)
    assert "../shared/data/cifar10-train.tar.gz" in block and "limit=1000" in block
    block = block.replace("../shared/data/cifar10-train.tar.gz", str(cifar_small)).replace("limit=1000", "limit=200")
    namespace: dict = {}
    exec(compile(block, "README.md", "exec"), namespace)
    assert os.path.isfile(tmp_path / "runs/py/linear/head.pt")
    assert namespace["labels"] and all(label in namespace["store"].classes for label in namespace["labels"])

"""The README's shell examples stay true: every `diffprobe` command in a ```bash block parses with
today's CLI, and each one whose inputs a user could have offline runs, in README order, in a temp
folder holding the shipped checkpoint as `model.pt`, a small CIFAR-10 cut as `cifar.tar.gz` and one
`photo.jpg`. Only sizes shrink (steps, epochs, images), so the run fits the suite; flags and paths
are the README's own."""

from __future__ import annotations

import re
import shlex
import tarfile
import time
from pathlib import Path

import pytest

from conftest import ROOT

PATH_SUFFIXES = (".pt", ".pth", ".gz", ".tar", ".jpg", ".png", ".npz", ".json", ".safetensors")
NEEDS_NETWORK = ("torchvision:", "timm:", "hf:")
# Sizes a user picks for real work, shrunk so the whole walk takes seconds per command.
SHRINK = {"--epochs": "1", "--num": "4", "--augment-views": "2", "--limit": "60"}
# Commands whose sizes have defaults the README leaves out: the same shrinking, as flags.
SIZE_FLAGS = {"pretrain": ["--batch-size", "4"], "sweep": ["--head-epochs", "1"]}


def readme_commands() -> list[list[str]]:
    """Each `diffprobe …` / `torchrun … -m diffprobe …` line of the README's bash blocks, as the
    argument list after `diffprobe`, shell variables set earlier in the block filled in."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        variables: dict[str, str] = {}
        for line in block.replace("\\\n", " ").splitlines():
            line = re.split(r"\s#", line)[0].strip()
            if not line or line.startswith("#"):
                continue
            assignments = re.findall(r"(\w+)=(\S+?)(?:;|$)", line)
            if assignments and re.fullmatch(r"(\w+=\S+?;?\s*)+", line):
                variables.update(assignments)
                continue
            for name, value in variables.items():
                line = line.replace("$" + name, value)
            words = shlex.split(line.replace("[", "").replace("]", ""))  # `[--json]`: optional, checked too
            if words[0] == "torchrun":
                words = words[words.index("-m") + 2 :]
            elif words[0] == "diffprobe":
                words = words[1:]
            else:
                continue  # make, curl, huggingface-cli
            commands.append(words)
    return commands


def test_every_readme_command_parses():
    from diffprobe.cli import build_parser

    parser = build_parser()
    commands = readme_commands()
    assert len(commands) > 30, "the README's examples were not found"
    failures = []
    for words in commands:
        try:
            parser.parse_args(words)
        except SystemExit:
            failures.append(" ".join(words))
    assert not failures, "README commands the CLI does not accept:\n" + "\n".join(failures)


def _inputs(words: list[str]) -> list[str]:
    """The files and folders a command reads (its --out is what it writes)."""
    names = []
    for previous, word in zip([""] + words, words):
        if word.startswith("-") or previous == "--out":
            continue
        if word.isupper():  # a placeholder such as STORE: nothing a user has under that name
            names.append(word)
            continue
        for part in word.split(","):
            if re.match(r"^(adm|diffusers|baseline):", part):  # a model spec names a file, a folder or a hub id
                names.append(part.split(":", 1)[1])
            elif "/" in part or part.endswith(PATH_SUFFIXES):
                names.append(part)
    return names


# Commands whose README form another test runs end to end (test_pipeline: pretrain -> export -> demo on
# the exported checkpoint, the same flags): parsed here, not run twice (the suite stays under 10 minutes).
RUN_ELSEWHERE = ("export", "demo")


def _offline(words: list[str]) -> bool:
    return not any(w.startswith(NEEDS_NETWORK) or any(f",{p}" in w for p in NEEDS_NETWORK) for w in words)


def _shrunk(words: list[str], later: list[list[str]]) -> list[str]:
    """Sizes shrunk; a search list (`--blocks all`, five timesteps) keeps its first setting and
    those the later commands that read this one's output ask for: the same paths, fewer cells."""
    out = list(words) + [w for w in SIZE_FLAGS.get(words[0], []) if w not in words]
    made = words[words.index("--out") + 1].rstrip("/") if "--out" in words else None
    readers = [w for w in later if made and any(word == made or word.startswith(made + "/") for word in w)]
    for i, word in enumerate(out[:-1]):
        if word == "--steps":  # two steps past where training starts (a warm start counts its checkpoint's steps)
            out[i + 1] = str(_start_step(words) + 2)
        elif word in SHRINK:
            out[i + 1] = SHRINK[word]
        elif word in ("--t", "--blocks") and (out[i + 1] == "all" or out[i + 1].count(",") > 1):
            wanted = {v for r in readers for flag, value in zip(r, r[1:]) if flag == word for v in value.split(",")}
            values = ["20"] + sorted(wanted) if out[i + 1] == "all" else out[i + 1].split(",")
            out[i + 1] = ",".join(dict.fromkeys(v for n, v in enumerate(values) if n == 0 or v in wanted))
    return out


def _start_step(words: list[str]) -> int:
    import json

    if "--init-from" not in words:
        return 0
    checkpoint = Path(words[words.index("--init-from") + 1])
    return json.loads(checkpoint.with_suffix(".json").read_text())["step"]


@pytest.fixture
def user_folder(tmp_path, cifar_small, monkeypatch):
    shipped = ROOT / "checkpoints" / "diffprobe-cifar10"
    (tmp_path / "model.pt").symlink_to(shipped / "ema.pt")
    (tmp_path / "model.json").symlink_to(shipped / "ema.json")
    (tmp_path / "checkpoints").mkdir()  # the shipped folder, as a clone has it; what the README exports goes beside it
    (tmp_path / "checkpoints" / "diffprobe-cifar10").symlink_to(shipped)
    with tarfile.open(tmp_path / "cifar.tar.gz", "w:gz") as tar:
        for cls in sorted(cifar_small.iterdir()):
            for image in sorted(cls.iterdir())[:8]:
                tar.add(image, arcname=f"cifar/{cls.name}/{image.name}")
    (tmp_path / "photo.jpg").write_bytes(_jpeg(next((cifar_small / "cat").iterdir())))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _jpeg(png: Path) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.open(png).convert("RGB").save(buffer, "JPEG")
    return buffer.getvalue()


def test_readme_commands_run_offline(user_folder):
    from diffprobe.cli import main

    ran, skipped = [], []
    commands = readme_commands()
    for n, words in enumerate(commands):
        missing = [name for name in _inputs(words) if not (user_folder / name).exists()]
        if missing or not _offline(words) or words[0] in RUN_ELSEWHERE:
            skipped.append(words)
            continue
        command = _shrunk(words, commands[n + 1 :])
        start = time.perf_counter()
        assert main(command) == 0, "README command failed: diffprobe " + " ".join(command)
        print(f"{time.perf_counter() - start:6.1f} s  diffprobe {' '.join(command)}")
        ran.append(words[0])
    # What a user with the shipped checkpoint and an image folder can try at once, all of it run here.
    for expected in ("presets", "blocks", "sweep", "probe", "predict", "baseline", "extract", "cka", "pretrain", "sample"):
        assert expected in ran, f"`diffprobe {expected}` from the README was not run (skipped: {skipped})"

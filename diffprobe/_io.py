"""Writing output files: atomically, and with one clear error when the output place is unusable.

Every file diffprobe writes goes through `atomic_write`: the bytes land under a temporary name
in the same folder and are renamed into place, so a reader (or a rerun after kill -9) sees the
old file or the new one, never half of one. `output_dir` is the one place that turns an
OSError on an output path (read-only, not a folder, disk full) into a DiffprobeError.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np

from .errors import DiffprobeError


def cache_dir() -> Path:
    """Where re-creatable things live (unpacked archives, encoded prompts): $DIFFPROBE_CACHE or ~/.cache/diffprobe."""
    return Path(os.environ.get("DIFFPROBE_CACHE", Path.home() / ".cache" / "diffprobe"))


def describe_os_error(path: str | Path, error: OSError, what: str = "write") -> str:
    reason = error.strerror or type(error).__name__
    return f"cannot {what} {path}: {reason}"


@contextlib.contextmanager
def output_errors(path: str | Path, what: str = "output") -> Iterator[None]:
    """Turn an OSError raised while writing under `path` into one clear DiffprobeError."""
    try:
        yield
    except OSError as e:
        where = e.filename or path
        blocker = _file_in_the_way(Path(path))
        reason = f"cannot write {path}: {blocker} is a file, not a folder" if blocker else describe_os_error(where, e)
        if e.errno == errno.ENOSPC:  # a full disk: the place itself is fine
            raise DiffprobeError(f"{reason}: free space, or choose another {what} location, and rerun the same command") from None
        raise DiffprobeError(f"{reason}: choose another {what} location (a writable folder)") from None


def _file_in_the_way(path: Path) -> Path | None:
    """The nearest existing ancestor of path (or path itself) when it is a file, not a folder."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def output_dir(path: str | Path, what: str = "--out") -> Path:
    """Create (if needed) and return an output folder; unwritable or not-a-folder is a clear error."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DiffprobeError(f"{what} {path} is a file, not a folder: choose a folder path")
    with output_errors(path, what):
        path.mkdir(parents=True, exist_ok=True)
        probe = Path(tempfile.mkstemp(prefix=".write-check-", dir=path)[1])
        probe.unlink()
    return path


RUN_MARK = ".diffprobe-run"  # which command made an output folder: one kind of run per folder
# Runs from before the mark, known by a file: a sweep by its table or its store (an interrupted one), a probe by its metrics.
SIGNATURES = {"sweep": ("sweep.csv", "features"), "probe": ("metrics.json",)}


def claim_output(path: str | Path, kind: str, *, resumable: bool = False, overwrite: bool = False, what: str = "--out") -> Path:
    """An output folder for one `kind` of run. A folder holding another kind of run, or files
    diffprobe did not write, is refused (their files would mix). A finished run of the same kind is
    continued where the command resumes (`resumable`), else refused unless `overwrite`, which
    removes it first. The folder is marked with its kind."""
    path = output_dir(path, what)
    mark = path / RUN_MARK
    found = mark.read_text().strip() if mark.is_file() else None
    contents = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    if found is None and contents:
        found = next((k for k, names in SIGNATURES.items() if any(n in contents for n in names)), None)
        if found is None:
            raise DiffprobeError(f"{what} {path} holds other files ({', '.join(contents[:3])}{', ...' if len(contents) > 3 else ''}): "
                                 f"choose an empty or new folder for this {kind} run")  # fmt: skip
    if found is not None and found != kind:
        raise DiffprobeError(f"{what} {path} holds a {found} run: a {kind} run there would mix its files with it; choose another folder")
    if found == kind and contents and not resumable:
        if not overwrite:
            raise DiffprobeError(f"{what} {path} already holds a {kind} run: choose another folder, or pass --overwrite to replace it")
        for name in contents:
            target = path / name
            shutil.rmtree(target) if target.is_dir() and not target.is_symlink() else target.unlink()
    if not mark.is_file():
        write_text(mark, kind + "\n")
    return path


def atomic_write(path: str | Path, write: Callable[[str], None], *, exclusive: bool = False) -> bool:
    """Write a file through `write(temporary_path)`, then move it into place.

    exclusive=True links it into place only if no file is there yet (concurrent creators, such
    as several ranks creating one store, then all see the first one's file); returns whether
    this call's file was the one kept.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600: colleagues on a shared disk could not read it
    try:
        write(tmp)
        if not exclusive:
            os.replace(tmp, final)
            return True
        try:
            os.link(tmp, final)
            return True
        except FileExistsError:
            return False
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text(path: str | Path, text: str, **kw: Any) -> bool:
    return atomic_write(path, lambda p: Path(p).write_text(text), **kw)


def write_json(path: str | Path, data: Any, **kw: Any) -> bool:
    return write_text(path, json.dumps(data, indent=1, default=float) + "\n", **kw)


def save_npy(path: str | Path, array: np.ndarray, **kw: Any) -> bool:
    def write(p: str) -> None:
        with open(p, "wb") as f:  # a file object, so numpy does not append ".npy" to the temp name
            np.save(f, array)

    return atomic_write(path, write, **kw)


def write_csv(path: str | Path, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return

    def write(p: str) -> None:
        with open(p, "w", newline="") as f:
            fields = list(dict.fromkeys(k for row in rows for k in row))  # rows may add columns (e.g. a comparison)
            writer = csv.DictWriter(f, fieldnames=fields)
            writer.writeheader()
            writer.writerows(rows)

    atomic_write(path, write)


def torch_save(obj: Any, path: str | Path) -> None:
    import torch

    atomic_write(path, lambda p: torch.save(obj, p))


# ---------------------------------------------------------------- folders built aside, then renamed

def temp_sibling_dir(final: str | Path, tag: str) -> Path:
    """An empty folder beside `final` to build it in: `.NAME.TAG-PID-XXXX` (the pid lets a later
    run tell a folder abandoned by a killed process from one another process is still filling).
    Abandoned `TAG` folders beside it are removed first."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_abandoned(final.parent, tag)
    folder = Path(tempfile.mkdtemp(prefix=f".{final.name}.{tag}-{os.getpid()}-", dir=final.parent))
    folder.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700; the published folder keeps these bits
    return folder


def current_umask() -> int:
    """The process's umask. Linux reports it in /proc/self/status; elsewhere os.umask can only read it
    by setting it (set straight back), which other threads creating files at that instant would see."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def remove_abandoned(parent: Path, tag: str) -> None:
    """Delete `.*.TAG-PID-*` folders whose process is gone (left by kill -9); others are in use."""
    import re
    import shutil

    pattern = re.compile(rf"^\..+\.{re.escape(tag)}-(\d+)-")
    for path in parent.glob(f".*.{tag}-*"):
        match = pattern.match(path.name)
        if match and path.is_dir() and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)


def publish_dir(tmp: Path, final: str | Path) -> bool:
    """Rename a finished folder into place. False (and `tmp` removed) if another process got there
    first: `final` then holds their folder, which the caller opens instead."""
    import shutil

    try:
        os.rename(tmp, final)  # replaces an empty folder; fails on a non-empty one
        return True
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if Path(final).is_dir() and any(Path(final).iterdir()):
            return False
        raise DiffprobeError(f"{describe_os_error(final, e)}: choose another output location (a writable folder)") from None


def read_json_object(path: str | Path, fix: str) -> dict[str, Any]:
    """A JSON object from a file, or one DiffprobeError naming the file and `fix` (a hand-edited,
    truncated or missing file is the user's to repair, never a traceback)."""
    try:
        value = json.loads(Path(path).read_text())
    except OSError as e:
        raise DiffprobeError(f"{describe_os_error(path, e, 'read')}: {fix}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise DiffprobeError(f"{path} is not valid JSON ({e}): {fix}") from None
    if not isinstance(value, dict):
        raise DiffprobeError(f"{path} holds a JSON {type(value).__name__}, not an object: {fix}")
    return value

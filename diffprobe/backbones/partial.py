"""Loading a stacked transformer only as deep as a probe reads it.

A probe of FLUX.1-dev's block 10 needs a fraction of its 12B parameters. `load_up_to` builds the
transformer on the meta device (no memory), reads from the safetensors shards only the tensors
of the modules that run up to the deepest block (safe_open reads one tensor at a time), and
drops the later blocks and the output head, so nothing past that block is ever materialised.
`weights_hash` hashes those files' bytes as stored, streamed, so a partial and a full load of
the same files have one fingerprint (and share stores).

diffusers' own loaders materialise every weight; accelerate's empty-weights context is not a
dependency here; so this small reader is written by hand on safetensors' public API.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from ..errors import DiffprobeError

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def weight_files(folder: Path) -> list[Path]:
    """The denoiser's safetensors files: one file, or the shards its index names."""
    index = folder / f"{WEIGHTS_NAME}.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [folder / name for name in shards]
    if (folder / WEIGHTS_NAME).is_file():
        return [folder / WEIGHTS_NAME]
    raise DiffprobeError(f"{folder} has no {WEIGHTS_NAME} (or its sharded index): loading up to a block reads safetensors only")


def _later(name: str, dropped: Sequence[str]) -> bool:
    return any(name == d or name.startswith(d + ".") for d in dropped)


def load_up_to(cls: Any, target: str, local: bool, up_to_block: Any, chain: Sequence[str], tail: Sequence[str]) -> tuple[nn.Module, int]:
    """`cls` from `target`/transformer/ as deep as block `up_to_block` and no deeper; and that block.

    Block 1 is the embedding; blocks 2, 3, ... run the ModuleLists named in `chain`, in order.
    Every tensor outside the later blocks and the `tail` (the output head) is read from disk,
    float32 as diffusers loads it; the later blocks and the tail are never built."""
    from safetensors import safe_open

    if not local:
        raise DiffprobeError(f"up_to_block reads a local folder's safetensors: download {target} first "
                             f"(`huggingface-cli download {target} --local-dir DIR`) and pass diffusers:DIR")  # fmt: skip
    folder = Path(target) / "transformer"
    with torch.device("meta"):
        model = cls.from_config(cls.load_config(folder))
    lengths = [len(getattr(model, name)) for name in chain]
    try:
        deepest = int(up_to_block)
    except (TypeError, ValueError):
        raise DiffprobeError(f"up_to_block must be a block number, got {up_to_block!r}") from None
    if not 1 <= deepest <= 1 + sum(lengths):
        raise DiffprobeError(f"up_to_block={deepest}: this model has blocks 1..{1 + sum(lengths)}")
    keep, left = [], deepest - 1  # how many of each chained list's blocks run up to `deepest`
    for length in lengths:
        keep.append(min(length, left))
        left -= keep[-1]
    dropped = [f"{name}.{i}" for name, length, k in zip(chain, lengths, keep) for i in range(k, length)] + list(tail)
    tensors: dict[str, torch.Tensor] = {}
    for file in weight_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                if not _later(key, dropped):
                    tensor = f.get_tensor(key)
                    tensors[key] = tensor.float() if tensor.is_floating_point() else tensor
    missing, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    missing = [k for k in missing if not _later(k, dropped)]
    if missing or unexpected:
        raise DiffprobeError(f"{folder} does not fit its config: missing {', '.join(missing[:5]) or 'nothing'}; "
                             f"unexpected {', '.join(unexpected[:5]) or 'nothing'}")  # fmt: skip
    for name, k in zip(chain, keep):
        setattr(model, name, nn.ModuleList(list(getattr(model, name))[:k]))
    for name in tail:
        setattr(model, name, None)
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise DiffprobeError(f"loading {folder} up to a block left {', '.join(still_meta[:5])} unread: load it whole (drop up_to_block)")
    return model.eval(), deepest


def weights_hash(files: Sequence[Path]) -> str:
    """The safetensors files' bytes, read in 8 MiB pieces (never mapped: a hash must not hold the
    model in memory), in name order."""
    h = hashlib.sha256()
    for file in sorted(files, key=lambda p: p.name):
        h.update(file.name.encode())
        with open(file, "rb") as f:
            while piece := f.read(8 << 20):
                h.update(piece)
    return h.hexdigest()


def depth_table(model: nn.Module, blocks: list, tail: Sequence[str]) -> dict[int, int]:
    """Every block's weights_to, from a meta copy of `model` (its config; no memory)."""
    from .base import weights_to

    with torch.device("meta"):
        meta = type(model).from_config(model.config)
    return {b.index: weights_to(meta, blocks, tail, b.index) for b in blocks}


def finish_depth(backbone: Any, local: bool, target: str, deepest: int | None) -> None:
    """What a stacked transformer read from safetensors records: its files (the fingerprint hashes
    them as stored, so a partial and a whole load agree), how deep it was loaded, and what each
    depth needs (kept from the full config when later blocks were never built)."""
    if local:
        try:
            backbone.weight_files = weight_files(Path(target) / "transformer")
        except DiffprobeError:  # a .bin folder: the fingerprint hashes the loaded tensors instead
            backbone.weight_files = None
    if deepest is not None:
        backbone.loaded_to = deepest
        backbone.depth_weights = depth_table(backbone.model, backbone.blocks, backbone.tail_modules)

"""Encoded prompts, computed once: a rerun, a resume or another timestep never loads a text encoder again.

An encoded prompt is data, like a latent: the tensors a pipeline's `encode_prompt` returns, saved
as safetensors under $DIFFPROBE_CACHE/prompts/, keyed by what decides them:
- the text encoders' and tokenizers' identity: for a local folder every file's name, size and
  modification time (what `make` trusts; hashing T5-XXL's 9 GB to build a key would cost more
  than encoding); for a hub id the snapshot's commit, which names its content;
- the prompt, and the options that change the encoding (T5 left out, sequence length, zeros for
  the empty prompt), and the encoding code's version.
Where no identity can be read (a hub id not downloaded yet), the prompt is encoded and cached after.
The encoded prompt is also part of the backbone's fingerprint, so a store knows what it was read with.
"""

from __future__ import annotations

import gc
import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .._io import atomic_write, cache_dir

log = logging.getLogger(__name__)
VERSION = 1  # bump when an encoding changes for the same encoders and prompt


def _folder_identity(target: str, local: bool, subs: Sequence[str]) -> list | None:
    if local:
        files = []
        for sub in subs:
            folder = Path(target) / sub
            for path in sorted(p for p in folder.rglob("*") if p.is_file()):
                stat = path.stat()
                files.append([str(path.relative_to(target)), stat.st_size, stat.st_mtime_ns])
        return [str(Path(target).resolve()), files]
    from huggingface_hub import try_to_load_from_cache

    commits = set()
    for sub in subs:
        for name in ("config.json", "tokenizer_config.json"):
            found = try_to_load_from_cache(target, f"{sub}/{name}")
            if isinstance(found, str):  # .../snapshots/<commit>/<sub>/<name>
                commits.add(Path(found).parent.parent.name)
                break
        else:
            return None
    return [target, sorted(commits)] if len(commits) == 1 else None


def cached_prompt(target: str, local: bool, subs: Sequence[str], settings: dict[str, Any],
                  encode: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:  # fmt: skip
    """`encode()` (which loads the text encoders and frees them), or its tensors from an earlier call
    with the same encoders (the pipeline folders `subs`), prompt and `settings`."""
    from safetensors.torch import load_file, save_file

    def key() -> str | None:
        identity = _folder_identity(target, local, subs)
        if identity is None:
            return None
        text = json.dumps({"v": VERSION, "encoders": identity, **settings}, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    folder = cache_dir() / "prompts"
    name = key()
    if name is not None and (folder / f"{name}.safetensors").is_file():
        try:
            return load_file(str(folder / f"{name}.safetensors"))
        except Exception as e:  # a damaged cache entry: encode again (and replace it)
            log.warning("encoded-prompt cache %s is unreadable (%s): encoding again", folder / f"{name}.safetensors", e)
    tensors = {k: v.contiguous() for k, v in encode().items()}
    name = name or key()
    if name is not None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write(folder / f"{name}.safetensors", lambda p: save_file(tensors, p))
        except OSError as e:  # a read-only cache costs only the next encoding
            log.warning("could not cache the encoded prompt in %s (%s); set $DIFFPROBE_CACHE to a writable folder", folder, e)
    return tensors


def encoded_prompt(target: str, local: bool, what: str, parts: dict[str, Any], settings: dict[str, Any],
                   encode: Callable[[dict[str, Any]], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:  # fmt: skip
    """`encode(loaded parts)` through the cache above, keyed by these parts' folders. `parts` names each
    pipeline folder a prompt needs with its class (text encoders, tokenizers; None: left out, passed
    as None); on a miss they are loaded once, without transformers' bars, and freed after encoding."""
    from .pipeline_parts import load_part, no_transformers_bars

    def load_and_encode() -> dict[str, torch.Tensor]:
        with no_transformers_bars():
            loaded = {sub: None if cls is None else load_part(cls, target, local, sub, what) for sub, cls in parts.items()}
        with torch.no_grad():
            tensors = encode(loaded)
        loaded.clear()
        gc.collect()  # the text encoders are not needed again: their memory goes back now
        return tensors

    return cached_prompt(target, local, [sub for sub, cls in parts.items() if cls is not None], settings, load_and_encode)

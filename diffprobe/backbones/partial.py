"""Reading a stacked transformer only as deep as a probe reads it.

A probe of FLUX.1-dev's block 10 needs a fraction of its 12B parameters. `load_transformer` builds
the transformer on the meta device (no memory) and reads from the safetensors shards only its
embeddings; each block is read (safe_open reads one tensor at a time) the first time a pass runs
it, and the output head when sampling first needs it. Memory grows with the depth read; a probe of
block N never holds a block past N. `up_to_block=N` caps the depth (deeper blocks and sampling are
refused). `weights_hash` hashes the files' bytes as stored, streamed, so every depth read has one
fingerprint (and shares stores).

diffusers' own loaders materialise every weight; accelerate's empty-weights context is not a
dependency here; so this small reader is written by hand on safetensors' public API.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, Iterator, Sequence

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


def transformer_folder(target: str, local: bool) -> Path:
    """The folder holding the denoiser's config and safetensors: a local pipeline's transformer/, or
    the hub's cached copy of just that folder (the lazy reader needs files, not a loaded model)."""
    if local:
        return Path(target) / "transformer"
    from huggingface_hub import snapshot_download

    from .pipeline_parts import offline_error

    try:
        return Path(snapshot_download(target, allow_patterns=["transformer/*"])) / "transformer"
    except Exception as e:  # offline, gated, missing: one line that says what to do
        raise offline_error(target, e) from None


class LazyDepth:
    """A stacked transformer's blocks and output head, read from safetensors the first time a pass
    needs them, so memory grows with the depth read and the output head exists only for sampling.

    Block 1 is the embedding (always read); blocks 2, 3, ... run the ModuleLists named in `chain`, in
    order. Unread modules wait here, built on the meta device (no memory), outside the model, so
    moving or copying the model never touches them. A block read later is placed as the model's
    read parts are (device; the number format of its Linear weights, which Precision.prepare casts).
    """

    def __init__(self, folder: Path, chain: Sequence[str], tail: Sequence[str], meta: nn.Module):
        from safetensors import safe_open

        self.folder = folder
        self.where: dict[str, Path] = {}  # tensor name -> the shard holding it (headers only are read)
        for file in weight_files(folder):
            with safe_open(str(file), framework="pt") as f:
                self.where.update(dict.fromkeys(f.keys(), file))
        self.waiting = [(name, module) for name in chain for module in getattr(meta, name)]  # in run order
        self.chain, self.tail = list(chain), {name: getattr(meta, name) for name in tail}

    @classmethod
    def load(cls, model_class: Any, folder: Path, chain: Sequence[str], tail: Sequence[str]) -> tuple[nn.Module, "LazyDepth"]:
        """The model with its embeddings read and no block or output head yet; and what reads the rest."""
        with parameters_on_meta():
            meta = model_class.from_config(model_class.load_config(folder))
        lazy = cls(folder, chain, tail, meta)
        for name in chain:
            setattr(meta, name, nn.ModuleList())
        for name in tail:
            setattr(meta, name, None)
        names = _tensor_names(meta, persistent_only=True)
        stray = [k for k in lazy.where if k not in names and not _later(k, [*chain, *tail])]
        if stray:
            raise DiffprobeError(f"{folder} does not fit its config: it holds {', '.join(sorted(stray)[:5])}, which the config does not build")
        lazy._fill(meta, "", names, None)
        return meta.eval(), lazy

    def read_count(self, model: nn.Module) -> int:
        """Blocks read so far (not counting the embedding)."""
        return sum(len(getattr(model, name)) for name in self.chain)

    def read_to(self, model: nn.Module, block: int) -> None:
        """Read every block up to `block` (1-based, the embedding first) that is not read yet."""
        while self.waiting and 1 + self.read_count(model) < block:
            name, module = self.waiting[0]
            self._fill(module, f"{name}.{len(getattr(model, name))}.", _tensor_names(module, persistent_only=True), model)
            self.waiting.pop(0)  # only once read: a read that fails (out of memory) is retried whole
            getattr(model, name).append(module.eval())

    def read_all(self, model: nn.Module) -> None:
        """Every block and the output head (sampling runs the whole denoiser)."""
        self.read_to(model, 1 + self.read_count(model) + len(self.waiting))
        for name in list(self.tail):
            module = self.tail.pop(name)
            self._fill(module, f"{name}.", _tensor_names(module, persistent_only=True), model)
            setattr(model, name, module.eval())

    def _fill(self, target: nn.Module, prefix: str, names: set[str], model: nn.Module | None) -> None:
        """Read `target`'s tensors (`names`, stored under `prefix`) from the shards, assigned, float32 as
        diffusers loads them, then placed as `model`'s read parts are; a tensor the files lack, or hold in
        a shape the config does not, is one line."""
        from safetensors import safe_open

        missing = sorted(n for n in names if prefix + n not in self.where)
        if missing:
            raise DiffprobeError(f"{self.folder} does not fit its config: it lacks {', '.join(prefix + n for n in missing[:5])}")
        device, dtype = _placement(model)
        # A pass may run under inference_mode: weights made there could never join autograd later.
        with torch.inference_mode(False), torch.no_grad():
            tensors: dict[str, torch.Tensor] = {}
            for file in sorted({self.where[prefix + n] for n in names}):
                with safe_open(str(file), framework="pt") as f:
                    for name in (n for n in names if self.where[prefix + n] == file):
                        tensor = f.get_tensor(prefix + name)
                        tensors[name] = (tensor.float() if tensor.is_floating_point() else tensor).to(device)
            try:
                target.load_state_dict(tensors, strict=False, assign=True)
            except RuntimeError as e:  # a shape that does not fit the config
                raise DiffprobeError(f"{self.folder} does not fit its config: {str(e).strip().splitlines()[-1].strip()}") from None
            target.requires_grad_(False).to(device)  # frozen; the buffers the files do not store were computed on the CPU
            if dtype is not None and dtype != torch.float32:
                for m in target.modules():
                    if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
                        m.to(dtype)


def _tensor_names(module: nn.Module, persistent_only: bool) -> set[str]:
    """What a saved state dict holds for `module`: parameters and persistent buffers."""
    return set(module.state_dict(keep_vars=True)) if persistent_only else {n for n, _ in module.named_parameters()}


@contextlib.contextmanager
def parameters_on_meta() -> Iterator[None]:
    """Build a model whose parameters take no memory (meta device) but whose buffers are computed as
    usual: buffers a checkpoint does not store (DiT's sin-cos position table) cannot be read later.
    Parameters move to meta as each module registers them, before their initialisation runs."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def _placement(model: nn.Module | None) -> tuple[torch.device, torch.dtype | None]:
    """Where the model's read parts live, and the number format of its Linear weights."""
    if model is None:
        return torch.device("cpu"), None
    first = next(model.parameters())
    linear = next((m.weight.dtype for m in model.modules() if isinstance(m, nn.Linear)), None)
    return first.device, linear


def load_transformer(cls: Any, target: str, local: bool, up_to_block: Any, chain: Sequence[str], tail: Sequence[str],
                     what: str) -> tuple[nn.Module, LazyDepth | None, int | None]:  # fmt: skip
    """The pipeline's transformer with its embeddings read and its blocks and output head waiting
    (a LazyDepth); and the deepest block a caller may read (`up_to_block`; None: any). A folder of
    .bin weights (no safetensors) loads whole, as diffusers loads it."""
    from .pipeline_parts import load_part

    folder = transformer_folder(target, local)
    try:
        weight_files(folder)
    except DiffprobeError:
        if up_to_block is not None:
            raise
        return load_part(cls, target, local, "transformer", what, low_cpu_mem_usage=False), None, None
    model, lazy = LazyDepth.load(cls, folder, chain, tail)
    if up_to_block is None:
        return model, lazy, None
    total = 1 + len(lazy.waiting)
    try:
        deepest = int(up_to_block)
    except (TypeError, ValueError):
        raise DiffprobeError(f"up_to_block must be a block number, got {up_to_block!r}") from None
    if not 1 <= deepest <= total:
        raise DiffprobeError(f"up_to_block={deepest}: this model has blocks 1..{total}")
    return model, lazy, deepest


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


def finish_depth(backbone: Any, lazy: LazyDepth | None, deepest: int | None) -> None:
    """What a lazily read stacked transformer records: what reads its blocks, its files (the
    fingerprint hashes them as stored, so every depth read shares one identity and one store), the
    deepest block it may read (up_to_block), and what each depth needs (from its full config)."""
    if lazy is None:
        return
    backbone.lazy = lazy
    backbone.weight_files = sorted(set(lazy.where.values()))
    backbone.loaded_to = deepest
    backbone.depth_weights = depth_table(backbone.model, backbone.blocks, backbone.tail_modules)

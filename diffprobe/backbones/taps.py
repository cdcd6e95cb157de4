"""Any activation by name: a tap is a module path inside the denoiser (`up_blocks.1.attentions.0`,
`transformer_blocks.13.ff`), caught with a forward hook during the family's own block walk.

What each module gives, and in which block it runs, comes from one pass on the meta device (no
weights, no arithmetic) over a weightless copy of the backbone: every module that runs in a feature
pass is listed in execution order with its output. Outputs become maps as block outputs do:
[B, C, H, W] stays, image tokens [B, N, D] become [B, D, √N, √N] (row-major, as patch embeddings
and U-Net attention lay them out; guided-diffusion's channels-first [B, C, N] likewise); a tuple gives its image-token element (joint blocks return text
and image streams). Text tokens, vectors and scalars are not maps and cannot be tapped.

Early exit: once every tapped module has fired, and no block number asked for lies deeper, the
hook raises StopPass, so nothing after the last tap runs.
"""

from __future__ import annotations

import copy
import difflib
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable

import torch
from torch import nn

from ..errors import DiffprobeError
from .tokens import tokens_to_map

if TYPE_CHECKING:
    from .base import Backbone


class StopPass(Exception):
    """Raised from a hook once the last tapped module has given its output."""


@dataclass(frozen=True)
class TapInfo:
    path: str
    order: int  # position in the pass (first call)
    block: int  # the block number whose computation runs this module
    shape: tuple[tuple[int, ...], ...]  # every tensor the module returns, batch of 1
    element: int | None  # which returned tensor is the map; None: none is (or the module runs more than once)
    runs: int = 1  # how often the module runs in one pass
    channels: int = 0
    resolution: int = 0
    key_tokens: int | None = None  # an attention module's encoder_hidden_states length (cross-attention); None: self
    attention: str | None = None  # "one sequence" (diffusers Attention, self or cross), "joint" (text and image streams), None
    probs: bool = False  # the tap is PATH+probs: the module's attention probabilities, averaged over heads

    @property
    def tappable(self) -> bool:
        return self.element is not None

    def describe_output(self) -> str:
        return " + ".join("[" + ", ".join(map(str, s)) + "]" for s in self.shape) or "nothing"


class _BlockRecorder(dict):
    """The dict a walk fills with block outputs: remembers how many modules had run when each block finished."""

    def __init__(self, calls: list[str]):
        super().__init__()
        self.calls, self.done_at = calls, {}

    def __setitem__(self, block: int, value: Any) -> None:
        self.done_at.setdefault(block, len(self.calls))
        super().__setitem__(block, value)


def _tensors(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [o for o in output if isinstance(o, torch.Tensor)]
    if hasattr(output, "to_tuple"):  # diffusers' BaseOutput
        return _tensors(output.to_tuple())
    return []


def _pick_map(shapes: list[tuple[int, ...]], text_shaped: list[bool], image_tokens: set[int]) -> int | None:
    """Which returned tensor is a map: a square [B, C, H, W], or image tokens [B, N, D] with N a map's
    cell count; a tensor shaped by the prompt's length (text tokens, or text and image tokens in one
    sequence) is not."""
    for i, s in enumerate(shapes):
        if len(s) == 4 and s[-1] == s[-2] and not text_shaped[i]:
            return i
    for i, s in enumerate(shapes):
        if len(s) == 3 and s[1] in image_tokens and not text_shaped[i]:
            return i
    for i, s in enumerate(shapes):  # channels first, [B, C, N] (guided-diffusion's attention, conv1d)
        if len(s) == 3 and s[2] in image_tokens and not text_shaped[i]:
            return i
    return None


def weightless_copy(backbone: "Backbone") -> "Backbone":
    """The backbone with every weight and buffer on the meta device, its lazily read blocks and output
    head in place (backbones/partial.py): same code, no memory."""
    memo: dict[int, Any] = {}
    for tensor in [*backbone.parameters(), *backbone.buffers()]:
        empty = torch.empty_like(tensor, device="meta")
        memo[id(tensor)] = nn.Parameter(empty, requires_grad=False) if isinstance(tensor, nn.Parameter) else empty
    for name in ("_prepared", "_prepared_from", "_prepared_for", "_run"):  # set-up copies and compiled code stay behind
        if name in backbone.__dict__:
            memo[id(backbone.__dict__[name])] = None
    twin = copy.deepcopy(backbone, memo)
    if twin.lazy is not None:
        for name, module in twin.lazy.waiting:
            getattr(twin.model, name).append(module)
        for name, module in twin.lazy.tail.items():
            setattr(twin.model, name, module)
        twin.lazy = None
    twin.loaded_to = None
    for module in twin.modules():  # hooks a caller put on the model must not see the meta pass
        module._forward_hooks.clear()
        module._forward_pre_hooks.clear()
    return twin.to("meta")


def _meta_pass(backbone: "Backbone", longer_prompt: bool) -> tuple[list[str], dict[str, list[tuple[int, ...]]], dict[int, int], dict[str, int], dict[str, int], dict[str, str | None]]:
    """(modules in the order they first run, each one's output shapes, {block: modules run when it
    finished}, how often each ran, the context length each got, which are attention modules) from a pass through every block on a weightless copy. longer_prompt: every encoded
    prompt one token longer, so outputs shaped by the prompt show themselves."""
    twin = weightless_copy(backbone)
    if longer_prompt:
        buffers = dict(twin.named_buffers(recurse=False))
        lengths = {b.shape[1] for b in buffers.values() if b.ndim == 3}  # encoded prompts [1, tokens, width]
        for name, buffer in buffers.items():
            if buffer.ndim == 3:
                setattr(twin, name, torch.empty(1, buffer.shape[1] + 1, buffer.shape[2], device="meta", dtype=buffer.dtype))
            elif buffer.ndim == 2 and buffer.shape[1] in lengths and buffer.dtype in (torch.long, torch.bool):  # its mask
                setattr(twin, name, torch.ones(1, buffer.shape[1] + 1, device="meta", dtype=buffer.dtype))
    calls: list[str] = []
    outputs: dict[str, list[tuple[int, ...]]] = {}
    runs: dict[str, int] = {}
    keys: dict[str, int] = {}

    def record(name: str):
        def hook(module: nn.Module, args: Any, kwargs: dict, output: Any) -> None:
            runs[name] = runs.get(name, 0) + 1
            if name not in outputs:
                outputs[name] = [tuple(t.shape) for t in _tensors(output)]
                calls.append(name)
                context = kwargs.get("encoder_hidden_states")
                if isinstance(context, torch.Tensor) and context.ndim == 3:
                    keys[name] = context.shape[1]

        return hook

    handles = [m.register_forward_hook(record(name), with_kwargs=True) for name, m in twin.model.named_modules() if name]
    attention = {name: _attention_kind(m) for name, m in twin.model.named_modules() if name}
    blocks = _BlockRecorder(calls)
    x = torch.zeros(1, *backbone.model_shape, device="meta")
    t = torch.full((1,), backbone.schedule.num_train_timesteps // 2, device="meta")
    conditional = backbone.num_classes is not None and backbone.default_class_label is None
    y = torch.zeros(1, dtype=torch.long, device="meta") if conditional else None
    try:
        with torch.no_grad():
            twin.run(x, t, y, tuple(range(1, backbone.num_blocks + 1)), out=blocks)
    finally:
        for h in handles:
            h.remove()
    return calls, outputs, blocks.done_at, runs, keys, attention


def _attention_kind(module: nn.Module) -> str | None:
    if not (hasattr(module, "to_q") and hasattr(module, "to_k") and hasattr(module, "heads")):
        return None
    joint = getattr(module, "add_q_proj", None) is not None or getattr(module, "spatial_norm", None) is not None
    return "joint" if joint else "one sequence"


def build_table(backbone: "Backbone") -> dict[str, TapInfo]:
    """Every module that runs in a feature pass through the last block, in execution order, with
    its output and block; from two passes on the meta device (the second with a longer prompt)."""
    calls, outputs, done_at, runs, keys, attention = _meta_pass(backbone, longer_prompt=False)
    prompted = any(b.ndim == 3 for b in backbone.buffers(recurse=False))
    longer = _meta_pass(backbone, longer_prompt=True)[1] if prompted else outputs
    image_tokens = {b.resolution**2 for b in backbone.blocks}
    side = backbone.model_shape[-1]
    while side >= 1:  # every level a U-Net or a patch embedding can reach
        image_tokens.add(side * side)
        side //= 2
    finished = sorted(done_at.items(), key=lambda kv: kv[1])
    table = {}
    for order, name in enumerate(calls):
        block = next((b for b, at in finished if order < at), backbone.num_blocks)
        shapes = outputs[name]
        text_shaped = [name not in longer or i >= len(longer[name]) or longer[name][i] != s for i, s in enumerate(shapes)]
        # A module that runs more than once in a pass (a shared activation) has no one output to tap.
        element = _pick_map(shapes, text_shaped, image_tokens) if runs[name] == 1 else None
        channels = resolution = 0
        if element is not None:
            s = shapes[element]
            if len(s) == 4:
                channels, resolution = s[1], s[-1]
            elif s[1] in image_tokens:
                channels, resolution = s[2], math.isqrt(s[1])
            else:
                channels, resolution = s[1], math.isqrt(s[2])
        table[name] = TapInfo(name, order, block, tuple(shapes), element, runs[name], channels, resolution, keys.get(name), attention[name])
    return table


PROBS = "+probs"  # PATH+probs: an attention module's probabilities, averaged over heads


def check_path(backbone: "Backbone", path: str, table: dict[str, TapInfo]) -> TapInfo:
    """The tap for a module path, or one line: no such module (the nearest names), a module the
    feature pass does not run, or one whose output is not a map. PATH+probs: the attention module's
    probabilities [B, queries, keys] as a map [B, keys, √queries, √queries] (keys: the prompt's tokens
    for cross-attention, every image token for self-attention)."""
    if path.endswith(PROBS):
        return _check_probs(backbone, path, table)
    if path not in table:
        names = [n for n, _ in backbone.model.named_modules() if n] + [n for n in table]
        if not any(n == path for n in names):
            near = difflib.get_close_matches(path, sorted(set(names)), n=3, cutoff=0.5)
            hint = f"; nearest: {', '.join(near)}" if near else ""
            raise DiffprobeError(f"no module {path!r} in this {backbone.family} model{hint} "
                                 f"(`diffprobe blocks {backbone.spec} --all` lists every tappable module)")  # fmt: skip
        raise DiffprobeError(f"module {path!r} does not run in a feature pass (the output head runs only when sampling): "
                             f"`diffprobe blocks {backbone.spec} --all` lists what does")  # fmt: skip
    info = table[path]
    if info.runs > 1:
        raise DiffprobeError(f"module {path!r} runs {info.runs} times in one pass (a shared module): tap the module that "
                             "calls it, or one of its own children")  # fmt: skip
    if not info.tappable:
        raise DiffprobeError(f"module {path!r} gives {info.describe_output()}: not a map [B, C, H, W] or image tokens "
                             "[B, H·W, D] (text tokens and vectors cannot be pooled into features)")  # fmt: skip
    return info


def _check_probs(backbone: "Backbone", path: str, table: dict[str, TapInfo]) -> TapInfo:
    base = check_path(backbone, path[: -len(PROBS)], table)
    if base.attention is None:
        raise DiffprobeError(f"{path}: {base.path} is not an attention module (diffusers' Attention)")
    if base.attention == "joint" or len(base.shape[base.element]) != 3:
        raise DiffprobeError(f"{path}: +probs reads attention over one token sequence (self- or cross-attention); "
                             f"{base.path} mixes text and image streams or runs on maps: tap its output instead")  # fmt: skip
    keys = base.key_tokens or base.resolution**2
    return TapInfo(path, base.order, base.block, base.shape, base.element, base.runs, keys, base.resolution, base.key_tokens,
                   base.attention, probs=True)  # fmt: skip


def attention_probs(attn: nn.Module, args: tuple, kwargs: dict) -> torch.Tensor:
    """Softmax(q·kᵀ·scale) of a diffusers Attention call, averaged over heads: [B, queries, keys].
    The steps of its processors up to the probabilities (group norm, cross norm, q/k norms, mask)."""
    h = kwargs.get("hidden_states", args[0] if args else None)
    context = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
    mask = kwargs.get("attention_mask", args[2] if len(args) > 2 else None)
    batch = h.shape[0]
    if attn.group_norm is not None:
        h = attn.group_norm(h.transpose(1, 2)).transpose(1, 2)
    if context is None:
        context = h
    elif attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)
    query, key = attn.to_q(h), attn.to_k(context)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    scores = (query.float() @ key.float().transpose(-1, -2)) * attn.scale
    if mask is not None:
        mask = attn.prepare_attention_mask(mask, key.shape[2], batch)
        scores = scores + mask.view(batch, -1, *mask.shape[-2:]).float()
    return scores.softmax(dim=-1).mean(dim=1)


def as_map(output: Any, info: TapInfo) -> torch.Tensor:
    """The tapped module's output as a map [B, C, H, W]."""
    tensor = _tensors(output)[info.element]
    if tensor.ndim == 4:
        return tensor
    side = info.resolution
    if tensor.shape[1] == side * side and tensor.shape[2] == info.channels:  # [B, N, D] image tokens
        return tokens_to_map(tensor, side)
    return tensor.reshape(tensor.shape[0], info.channels, side, side)  # guided-diffusion's [B, C, N]


class TapHooks:
    """Forward hooks on the tapped modules of `model` for one pass: each catches its module's first
    output as a map; with `stop`, the last one to fire ends the pass (StopPass)."""

    def __init__(self, model: nn.Module, infos: Iterable[TapInfo], stop: bool):
        self.infos = {info.path: info for info in infos}
        self.maps: dict[str, torch.Tensor] = {}
        self.stop = stop
        self.handles = [model.get_submodule(path[: -len(PROBS)] if info.probs else path).register_forward_hook(self._catch(path), with_kwargs=True)
                        for path, info in self.infos.items()]  # fmt: skip

    def _catch(self, path: str):
        info = self.infos[path]

        def hook(module: nn.Module, args: Any, kwargs: dict, output: Any) -> None:
            if path not in self.maps:
                if info.probs:
                    probs = attention_probs(module, args, kwargs).to(_tensors(output)[0].dtype)
                    self.maps[path] = probs.transpose(1, 2).reshape(probs.shape[0], probs.shape[2], info.resolution, info.resolution)
                else:
                    self.maps[path] = as_map(output, info)
                if self.stop and len(self.maps) == len(self.infos):
                    raise StopPass

        return hook

    def __enter__(self) -> "TapHooks":
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self.handles:
            h.remove()

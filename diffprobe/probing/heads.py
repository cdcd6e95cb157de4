"""Classification heads on frozen features: plain `nn.Module`s.

Every head takes the features as the store holds them: a batch of flattened pooled maps
[B, C·p·p] (channel-major, as `adaptive_avg_pool2d(...).flatten(1)` lays them out), plus the
map's shape (C, p) where it needs the spatial layout. `FusionHead` takes a list of such inputs,
one per (block, timestep).
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch
from torch import nn


class LinearHead(nn.Module):
    """A linear classifier, optionally after BatchNorm without affine parameters (MAE's probe)."""

    def __init__(self, in_features: int, num_classes: int, batchnorm: bool = False):
        super().__init__()
        self.norm = nn.BatchNorm1d(in_features, affine=False) if batchnorm else nn.Identity()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.norm(x))


class MLPHead(nn.Module):
    """Linear → BatchNorm → ReLU (→ Dropout) for each hidden size, then a linear classifier."""

    def __init__(self, in_features: int, num_classes: int, hidden: Sequence[int] = (1024,), dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.BatchNorm1d(h), nn.ReLU(inplace=True)]
            if dropout:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def as_map(x: torch.Tensor, channels: int, pool: int) -> torch.Tensor:
    """[B, C·p·p] → [B, C, p, p]."""
    return x.reshape(x.shape[0], channels, pool, pool)


class CNNHead(nn.Module):
    """Two 3×3 conv → BatchNorm → ReLU layers over the p×p map, global average pool, linear."""

    def __init__(self, channels: int, pool: int, num_classes: int, width: int = 256):
        super().__init__()
        self.channels, self.pool = channels, pool
        self.body = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.Conv2d(width, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(as_map(x, self.channels, self.pool)))


class AttentionTrunk(nn.Module):
    """The paper's attention head without its classifier: the CLS token's final state.

    LayerNorm over channels, 1×1 conv to width d, the p·p positions as tokens plus a learned
    CLS token (no positional embedding, as in the public code), `depth` pre-norm transformer
    blocks (MLP ratio 4, GELU), final LayerNorm.
    """

    def __init__(self, channels: int, pool: int, width: int = 256, depth: int = 2, heads: int = 8, dropout: float = 0.0):
        super().__init__()
        self.channels, self.pool = channels, pool
        self.norm_in = nn.LayerNorm(channels)
        self.proj = nn.Conv2d(channels, width, 1)
        self.cls = nn.Parameter(torch.zeros(1, 1, width))
        nn.init.trunc_normal_(self.cls, std=0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout, activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        self.norm_out = nn.LayerNorm(width)
        self.width = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = as_map(x, self.channels, self.pool)
        fmap = self.norm_in(fmap.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        tokens = self.proj(fmap).flatten(2).transpose(1, 2)  # [B, p·p, d]
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), tokens], dim=1)
        return self.norm_out(self.blocks(tokens)[:, 0])


class AttentionHead(nn.Module):
    def __init__(self, channels: int, pool: int, num_classes: int, width: int = 256, depth: int = 2, heads: int = 8,
                 dropout: float = 0.0):  # fmt: skip
        super().__init__()
        self.trunk = AttentionTrunk(channels, pool, width, depth, heads, dropout)
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.trunk(x))


class FusionHead(nn.Module):
    """DifFormer: one attention trunk per (block, timestep) input, CLS outputs concatenated."""

    def __init__(self, shapes: Sequence[tuple[int, int]], num_classes: int, width: int = 256, depth: int = 2,
                 heads: int = 8, dropout: float = 0.0):  # fmt: skip
        super().__init__()
        self.trunks = nn.ModuleList(AttentionTrunk(c, p, width, depth, heads, dropout) for c, p in shapes)
        self.fc = nn.Linear(width * len(shapes), num_classes)

    def forward(self, xs: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.fc(torch.cat([trunk(x) for trunk, x in zip(self.trunks, xs)], dim=1))


HEADS = ("linear", "mlp", "cnn", "attention", "fusion")
# The options each head takes, with their defaults (the CLI offers them all; each head keeps its own).
HEAD_OPTIONS: dict[str, dict[str, object]] = {
    "linear": {"batchnorm": False},
    "mlp": {"hidden": (1024,)},
    "cnn": {"width": 256},
    "attention": {"width": 256, "depth": 2, "heads": 8},
    "fusion": {"width": 256, "depth": 2, "heads": 8},
    "diffeed": {"width": 256, "depth": 2, "heads": 8},  # online only: an attention head on the fed-back block's map
}


def head_options(kind: str, **given: object) -> dict[str, object]:
    """Every option of head `kind`: from `given` where set (not None), else its default, checked.

    A name no head takes is refused (a typo must not become a silent default); another head's
    option, when set, is ignored with a warning (the CLI offers every head's flags)."""
    from ..errors import DiffprobeError
    from ..validate import known_keywords

    if kind not in HEAD_OPTIONS:
        raise DiffprobeError(f"unknown head {kind!r}; expected one of {', '.join(HEAD_OPTIONS)}")
    known_keywords(given, {name for options in HEAD_OPTIONS.values() for name in options}, "head option(s)")
    ignored = sorted(name for name, value in given.items() if value is not None and name not in HEAD_OPTIONS[kind])
    if ignored:
        logging.getLogger("diffprobe").warning("the %s head takes no %s: ignored", kind, ", ".join(ignored))
    chosen = {name: default if given.get(name) is None else given[name] for name, default in HEAD_OPTIONS[kind].items()}
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in _checked(chosen).items()}


def _checked(options: dict[str, object]) -> dict[str, object]:
    """Option values a head can be built with, or one error naming the option."""
    from ..errors import DiffprobeError
    from ..validate import positive_int

    out = dict(options)
    for name in ("width", "depth", "heads"):
        if name in out:
            out[name] = positive_int(out[name], f"head option {name}")
    if "hidden" in out:
        hidden = out["hidden"]
        sizes = [hidden] if isinstance(hidden, int) else hidden
        if isinstance(sizes, (str, bytes)) or not hasattr(sizes, "__iter__"):
            raise DiffprobeError(f"head option hidden: expected hidden sizes (e.g. [1024] or [1024, 512]), got {hidden!r}")
        out["hidden"] = tuple(positive_int(h, "head option hidden (each size)") for h in sizes)
    if "batchnorm" in out and not isinstance(out["batchnorm"], bool):
        raise DiffprobeError(f"head option batchnorm: expected True or False, got {out['batchnorm']!r}")
    if "heads" in out and out["width"] % out["heads"]:
        raise DiffprobeError(f"the attention width {out['width']} must be divisible by its {out['heads']} heads "
                             "(set --width to a multiple of --heads)")  # fmt: skip
    return out


def build_head(kind: str, shapes: Sequence[tuple[int, int]], num_classes: int, **options) -> nn.Module:
    """A head for inputs of the given (channels, pool) shapes; `fusion` takes several."""
    from ..errors import DiffprobeError

    if kind not in HEADS:
        raise DiffprobeError(f"unknown head {kind!r}; expected one of {', '.join(HEADS)}")
    if kind != "fusion" and len(shapes) != 1:
        raise DiffprobeError(f"the {kind} head takes one (block, timestep) input; use the fusion head for {len(shapes)}")
    channels, pool = shapes[0]
    if kind == "linear":
        return LinearHead(channels * pool * pool, num_classes, **options)
    if kind == "mlp":
        return MLPHead(channels * pool * pool, num_classes, **options)
    if kind == "cnn":
        return CNNHead(channels, pool, num_classes, **options)
    if kind == "attention":
        return AttentionHead(channels, pool, num_classes, **options)
    return FusionHead(shapes, num_classes, **options)

"""DifFeed (the ECCV 2024 paper's feedback head): decoder features fed back into the encoder.

A first pass of the frozen U-Net gives the decoder blocks' outputs. Each goes through a 1×1
conv + BatchNorm + ReLU to the channels of its mirror encoder block (block b pairs with
num_blocks + 1 - b across the skip connections: 38 - b in the paper's ADM) and is added to that
block's output in a second pass. A head reads the chosen block of the second pass. Only the
feedback adapters and the head learn; gradients reach the adapters through the frozen second
pass (the backbone's weights never change).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..backbones.base import Backbone
from ..errors import DiffprobeError
from ..features.featurize import pool_features


def mirror(backbone: Backbone, block: int) -> int:
    return backbone.num_blocks + 1 - block


def _ranges(numbers: Sequence[int]) -> str:
    """[21, 22, 23, 25] -> '21-23, 25'."""
    parts, start = [], None
    for i, n in enumerate(numbers):
        start = n if start is None else start
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            parts.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ", ".join(parts) or "none"


class DifFeed(nn.Module):
    def __init__(self, backbone: Backbone, feedback_blocks: Sequence[int], read_block: int, pool: int, head: nn.Module):
        super().__init__()
        if not backbone.supports_feedback:
            raise DiffprobeError(f"DifFeed needs a backbone that takes feedback (ADM U-Nets); {backbone.source} does not")
        blocks = backbone.resolve_blocks(feedback_blocks)
        bottom = backbone.bottleneck_block or (backbone.num_blocks + 1) // 2
        adapters = {}
        for b in blocks:
            target = mirror(backbone, b)
            if b <= bottom or target >= bottom:
                raise DiffprobeError(f"DifFeed feeds decoder blocks back (after block {bottom}); block {b} is not one")
            src, dst = backbone.blocks[b - 1], backbone.blocks[target - 1]
            if src.resolution != dst.resolution:
                valid = [d for d in range(bottom + 1, backbone.num_blocks + 1)
                         if backbone.blocks[d - 1].resolution == backbone.blocks[mirror(backbone, d) - 1].resolution]  # fmt: skip
                raise DiffprobeError(f"block {b} ({src.resolution}×{src.resolution}) and its mirror {target} "
                                     f"({dst.resolution}×{dst.resolution}) differ in size: --feedback-blocks can be "
                                     f"{_ranges(valid)} on this model")  # fmt: skip
            adapters[str(b)] = nn.Sequential(nn.Conv2d(src.channels, dst.channels, 1), nn.BatchNorm2d(dst.channels), nn.ReLU())
        self.adapters = nn.ModuleDict(adapters)
        self.feedback_blocks, self.read_block, self.pool, self.head = blocks, read_block, pool, head
        self.backbone = [backbone]  # a list: not a submodule, so its frozen weights stay out of state_dict and optimisers

    def feedback(self, first: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
        """{mirror encoder block: adapter(decoder block output)}."""
        backbone = self.backbone[0]
        return {mirror(backbone, b): self.adapters[str(b)](first[b].float()) for b in self.feedback_blocks}

    def read(self, x_t: torch.Tensor, t: int | torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """The read block's map in the second pass, [B, C, H, W]."""
        backbone = self.backbone[0]
        with torch.no_grad():  # the first pass needs no gradients
            first = backbone.forward_features(x_t, t, self.feedback_blocks, y=y)
        second = backbone.forward_features(x_t, t, [self.read_block], y=y, inject=self.feedback(first))
        return second[self.read_block]

    def forward(self, x_t: torch.Tensor, t: int | torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(pool_features(self.read(x_t, t, y), self.pool))

"""What the token transformers share (DiT, PixArt, SD3, FLUX): image tokens as maps, and the walk
over a list of blocks that stops after the deepest wanted one."""

from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

from .base import BlockInfo


def tokens_to_map(tokens: torch.Tensor, rows: int, cols: int | None = None) -> torch.Tensor:
    """[B, rows·cols, D] image tokens, row-major as patch embeddings lay them out -> a map [B, D, rows, cols]."""
    return tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], rows, rows if cols is None else cols)


def walk_blocks(blocks: Iterable[torch.nn.Module], h: torch.Tensor, wanted: tuple[int, ...], out: dict, rows: int,
                run_block: Callable[[torch.nn.Module, torch.Tensor], torch.Tensor], cols: int | None = None) -> dict:  # fmt: skip
    """Blocks 2, 3, ... (block 1 is the embedding) through `run_block(block, h) -> h`, each wanted
    one's tokens into `out` as a map, stopping after the deepest wanted block."""
    last = max(wanted)
    for index, block in enumerate(blocks, start=2):
        if index > last:
            break
        h = run_block(block, h)
        if index in wanted:
            out[index] = tokens_to_map(h, rows, cols)
    return out


def stacked_blocks(embedding: str, chains: Sequence[tuple[str, int]], width: int, side: int) -> list[BlockInfo]:
    """The block table of a stacked transformer: 1 = the embedding, then each list's blocks in order
    (FLUX: transformer_blocks, then single_transformer_blocks), all `width` × side × side."""
    names = [embedding] + [f"{chain}.{i}" for chain, length in chains for i in range(length)]
    return [BlockInfo(index, name, width, side) for index, name in enumerate(names, start=1)]

"""Top-k selection blocks from the compression branch's block scores."""

from __future__ import annotations

import torch
from meshforge.kernels.ssa.blocks import SSALayout
from torch import Tensor


def topk_blocks(scores: Tensor, layout: SSALayout) -> Tensor:
    """The ``topk`` best selection blocks per query tile and GQA group.

    ``scores[T, G, W]``: per tile, group and local selection-block index of the tile's sequence
    (``W`` = the most blocks of any sequence; slots past a sequence's own count are ignored).
    Returns ``[T, G, topk]`` global selection-block ids in ascending order (neighbouring blocks
    are neighbouring rows, which helps the cache), padded with -1 when a sequence has fewer blocks.
    """
    n_tiles, groups, width = scores.shape
    topk = layout.cfg.topk
    if n_tiles == 0:
        return torch.empty(0, groups, topk, dtype=torch.int64, device=scores.device)
    n_blocks = layout.slc_cu.diff()[layout.tile_seq][:, None, None]
    slots = torch.arange(width, device=scores.device)
    scores = scores.masked_fill(slots >= n_blocks, float("-inf"))
    idx = scores.topk(min(topk, width), dim=-1).indices
    valid = idx < n_blocks  # real blocks outrank the -inf padding, so the invalid ones come last
    last = torch.iinfo(torch.int64).max
    blocks = torch.where(valid, idx + layout.slc_cu[layout.tile_seq][:, None, None], last).sort(-1).values
    blocks = blocks.masked_fill(blocks == last, -1)
    return torch.nn.functional.pad(blocks, (0, topk - blocks.shape[-1]), value=-1)

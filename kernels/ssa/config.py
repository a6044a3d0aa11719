"""The one configuration of Spatial Sparse Attention (block sizes, top-k, window, query tiling)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SSAConfig:
    """Direct3D-S2's released defaults: m_cmp 4, m_slc 8, top-k 8, m_win 8.

    ``query_tile``: queries are taken in tiles of this many consecutive tokens of the block order
    (tokens sorted by selection block, blocks in Morton order), and the tokens of one tile share one
    top-k selection per GQA group, chosen by the summed compression probabilities of all of the
    tile's queries and the group's heads. This is what lets the selection kernel run dense
    ``tile x block`` matrix products; with ``query_tile`` 1 it would be the paper's per-token
    selection, which no tensor core can run efficiently. It is also the kernels' query block size,
    so it must be a power of two >= 16.
    """

    block_cmp: int = 4  # m_cmp: voxels per side of a compression block
    block_slc: int = 8  # m_slc: voxels per side of a selection block (a multiple of m_cmp)
    topk: int = 8  # selection blocks attended per query tile and GQA group
    window: int = 8  # m_win: voxels per side of the local attention window
    shift: int = 0  # window offset (window // 2 on alternate layers), as in shifted-window attention
    query_tile: int = 64
    scale: float | None = None  # softmax scale; head_dim ** -0.5 when None

    def __post_init__(self) -> None:
        for name in ("block_cmp", "block_slc", "topk", "window"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.block_slc % self.block_cmp:
            raise ValueError(f"block_slc {self.block_slc} must be a multiple of block_cmp {self.block_cmp}")
        if not 0 <= self.shift < self.window:
            raise ValueError(f"shift must be in [0, window), got {self.shift}")
        if self.query_tile < 16 or self.query_tile & (self.query_tile - 1):
            raise ValueError(f"query_tile must be a power of two >= 16, got {self.query_tile}")

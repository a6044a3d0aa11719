"""Index plans: how each SSA branch becomes one call of the range-attention kernels.

All three branches are the same computation, *a query tile attends to a list of key row ranges*:

=========== ============================== ===================================================
branch      key ranges of query tile t      key tiles (dK/dV) and who reads them
=========== ============================== ===================================================
compression the sequence's compressed rows  chunks of the sequence's compressed rows; all its tiles
selection   the top-k blocks of (t, group)  chunks of each block; the tiles that chose it (per group)
window      the windows of t's rows, with   chunks of each window; the tiles holding its rows
            a per-element window-id mask
=========== ============================== ===================================================

Forward and dQ walk the ranges of a query tile; dK/dV walks, for one key tile, the reverse list
of query tiles that read it, so every gradient is written by exactly one program (no atomics;
a long walk is cut into pieces whose partial sums one program adds, see :mod:`~meshforge.kernels.ssa.range_attn`).
Ranges are CSR arrays: tile t of group g owns ``rng_ptr[g * rng_gstride + t] ..`` (``rng_gstride``
0 when all groups share them); likewise ``rev_ptr[g * rev_gstride + kv_list[j]]`` for key tile j.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from meshforge.kernels.ssa.blocks import SSALayout
from meshforge.kernels.utils import concat_ranges, group_ids, offsets_of
from torch import Tensor


@dataclass(frozen=True)
class AttnPlan:
    tile_start: Tensor  # int32 [T]: query rows of each tile
    tile_end: Tensor
    rng_ptr: Tensor  # int32 CSR over (group, tile)
    rng_start: Tensor  # int32 [R]: key rows of each range
    rng_end: Tensor
    rng_gstride: int
    kv_start: Tensor  # int32 [J]: key tiles of at most block_n rows
    kv_end: Tensor
    kv_list: Tensor  # int32 [J]: which reverse list a key tile reads
    rev_ptr: Tensor  # int32 CSR over (group, list)
    rev: Tensor  # int32: query tiles
    rev_gstride: int
    block_n: int
    win_q: Tensor | None = None  # int32 window id of each query / key row: attend only within one
    win_k: Tensor | None = None
    score_slot: Tensor | None = None  # int32 [keys]: column of each key in the block-score rows
    score_width: int = 0
    # What is derived from the plan once and reused by every layer that runs it (the compression and
    # window plans are shared by all layers of a model): e.g. the dK/dV schedule.
    cache: dict = field(default_factory=dict, compare=False, repr=False)


def _i32(*tensors: Tensor) -> tuple[Tensor, ...]:
    return tuple(t.to(torch.int32).contiguous() for t in tensors)


def key_tiles(offsets: Tensor, block_n: int) -> tuple[Tensor, Tensor, Tensor]:
    """Split each group ``offsets[i]:offsets[i + 1]`` into tiles of <= block_n rows: (start, end, group)."""
    sizes = offsets.diff()
    chunks = (sizes + block_n - 1) // block_n
    group = group_ids(chunks)
    start = concat_ranges(torch.zeros_like(chunks), chunks) * block_n + offsets[group]
    return start, torch.minimum(start + block_n, offsets[group + 1]), group


def compression_plan(layout: SSALayout, block_n: int) -> AttnPlan:
    """Queries in block order against the compressed tokens (in compression-block order)."""
    seq = layout.tile_seq
    kv_start, kv_end, kv_seq = key_tiles(layout.cmp_cu, block_n)
    n_tiles = len(seq)
    cmp_seq = group_ids(layout.cmp_cu.diff())
    slot = layout.cmp_slc - layout.slc_cu[cmp_seq]
    (tile_start, tile_end, rng_ptr, rng_start, rng_end, kv_start, kv_end, kv_list, rev_ptr, rev, slot) = _i32(
        layout.tile_start, layout.tile_end, torch.arange(n_tiles + 1, device=seq.device),
        layout.cmp_cu[seq], layout.cmp_cu[seq + 1], kv_start, kv_end, kv_seq,
        layout.tile_cu, torch.arange(n_tiles, device=seq.device), slot,
    )  # fmt: skip
    width = int(layout.slc_cu.diff().max()) if layout.batch else 0
    return AttnPlan(tile_start, tile_end, rng_ptr, rng_start, rng_end, 0, kv_start, kv_end, kv_list,
                    rev_ptr, rev, 0, block_n, score_slot=slot, score_width=width)  # fmt: skip


def window_plan(layout: SSALayout, block_n: int) -> AttnPlan:
    """Queries and keys in window order; a tile spans whole windows and masks the others' keys."""
    sizes = layout.win_offsets.diff()
    win_row = group_ids(sizes)
    n_tiles = len(layout.tile_seq)
    rng_start = layout.win_offsets[win_row[layout.tile_start]]
    rng_end = layout.win_offsets[win_row[layout.tile_end - 1] + 1]
    kv_start, kv_end, kv_win = key_tiles(layout.win_offsets, block_n)
    # Window w's rows fall in the contiguous run of tiles from its first row's to its last row's.
    seq = group_ids(layout.cu_seqlens.diff())
    rows = torch.arange(len(seq), device=sizes.device)
    tile_of_row = layout.tile_cu[seq] + (rows - layout.cu_seqlens[seq]) // layout.cfg.query_tile
    first, last = tile_of_row[layout.win_offsets[:-1]], tile_of_row[layout.win_offsets[1:] - 1]
    rev = concat_ranges(first, last - first + 1)
    (tile_start, tile_end, rng_ptr, rng_start, rng_end, kv_start, kv_end, kv_list, rev_ptr, rev, win) = _i32(
        layout.tile_start, layout.tile_end, torch.arange(n_tiles + 1, device=sizes.device), rng_start, rng_end,
        kv_start, kv_end, kv_win, offsets_of(last - first + 1), rev, win_row,
    )  # fmt: skip
    return AttnPlan(tile_start, tile_end, rng_ptr, rng_start, rng_end, 0, kv_start, kv_end, kv_list,
                    rev_ptr, rev, 0, block_n, win_q=win, win_k=win)  # fmt: skip


def selection_plan(layout: SSALayout, selection: Tensor, block_n: int) -> AttnPlan:
    """Queries and keys in block order; tile t of group g reads its selected blocks ``selection[t, g]``.

    Built with fixed-size arrays only (no data-dependent shapes, so no device-host sync): every
    (group, tile) owns ``topk`` range slots, an unused one (-1) being the empty range [0, 0).
    """
    n_tiles, groups, topk = selection.shape
    n_blocks = len(layout.slc_offsets) - 1
    blocks = selection.permute(1, 0, 2).flatten()  # CSR order is (group, tile, slot)
    valid = blocks >= 0
    start = torch.where(valid, layout.slc_offsets[blocks.clamp(min=0)], 0)
    end = torch.where(valid, layout.slc_offsets[blocks.clamp(min=0) + 1], 0)
    kv_start, kv_end, kv_block = key_tiles(layout.slc_offsets, block_n)
    # Reverse lists: for (group, block), the tiles that chose it; unused slots sort last, unread.
    slots = torch.arange(len(blocks), device=blocks.device)
    group, tile = slots // (n_tiles * topk), slots // topk % n_tiles
    owner = torch.where(valid, group * n_blocks + blocks, groups * n_blocks)
    order = torch.argsort(owner, stable=True)
    counts = torch.bincount(owner, minlength=groups * n_blocks + 1)[:-1]
    (tile_start, tile_end, rng_ptr, rng_start, rng_end, kv_start, kv_end, kv_list, rev_ptr, rev) = _i32(
        layout.tile_start, layout.tile_end, torch.arange(groups * n_tiles + 1, device=blocks.device) * topk,
        start, end, kv_start, kv_end, kv_block, offsets_of(counts), tile[order],
    )  # fmt: skip
    return AttnPlan(tile_start, tile_end, rng_ptr, rng_start, rng_end, n_tiles, kv_start, kv_end, kv_list,
                    rev_ptr, rev, n_blocks, block_n)  # fmt: skip

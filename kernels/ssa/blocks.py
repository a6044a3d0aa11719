"""Token bookkeeping of Spatial Sparse Attention: which tokens form which block, in which order.

SSA sees a variable-length batch of sparse voxels (``coords[N, 3]`` per-sequence voxel indices,
sequence ``b`` owning rows ``cu_seqlens[b]:cu_seqlens[b + 1]``) and groups them three ways:

- compression blocks: the voxels of one ``m_cmp^3`` cube (pooled into one key/value token);
- selection blocks: the voxels of one ``m_slc^3`` cube, a union of ``(m_slc / m_cmp)^3`` compression blocks;
- windows: the voxels of one ``m_win^3`` cube after shifting by ``shift``.

The kernels want every group contiguous in memory, so tokens are sorted into *block order*: by
sequence, then selection block in Morton (Z-curve) order, then compression block inside it. Each
compression and selection block is then a row range given by an offsets array (the paper's block
start index C), and consecutive blocks are close in space, so a query tile of consecutive tokens
(``query_tile`` rows, never across sequences) is spatially compact. Windows get their own *window
order* unless they coincide with the selection blocks (``window == block_slc`` and no shift).

Nothing here depends on features: a model builds one :class:`SSALayout` per coordinate set and
reuses it in every layer (two when alternate layers shift their windows).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from meshforge.kernels.ssa.config import SSAConfig
from meshforge.kernels.utils import group_ids, offsets_of, sequence_ids
from torch import Tensor

MORTON_BITS = 16  # block coordinates up to 65535 per axis


def morton3(cells: Tensor) -> Tensor:
    """Z-curve index of non-negative int ``cells[N, 3]`` (each < 2**16), as int64.

    Sorting by it keeps every aligned ``2^k`` cube of cells contiguous, and neighbours in the
    order are neighbours in space far more often than in row-major order.
    """
    code = torch.zeros(len(cells), dtype=torch.int64, device=cells.device)
    c = cells.long()
    for bit in range(MORTON_BITS):
        for axis in range(3):
            code |= ((c[:, axis] >> bit) & 1) << (3 * bit + axis)
    return code


def _runs(sorted_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Offsets [R + 1] of the runs of equal values in ``sorted_ids``, and each element's run index."""
    _, run_of, counts = torch.unique_consecutive(sorted_ids, return_inverse=True, return_counts=True)
    return offsets_of(counts), run_of


def _per_sequence(owner_seq: Tensor, batch: int) -> Tensor:
    """Cumulative counts [B + 1] of groups per sequence, from each group's (sorted) sequence index."""
    bounds = torch.arange(batch + 1, device=owner_seq.device)
    return torch.searchsorted(owner_seq, bounds)


@dataclass(eq=False)
class SSALayout:
    """Orders and block ranges of one coordinate set (all int64, on the coordinates' device).

    Per token of the caller's order: ``cmp_block``, ``slc_block``, ``window``, ``tile`` (global ids)
    and ``cmp_pos`` (index of the voxel inside its compression cube, for intra-block position
    encoding). Block order: ``perm`` (block-order row -> caller's row) and ``inv_perm``;
    ``cmp_offsets``/``slc_offsets`` are row ranges of the blocks in it; ``cmp_slc`` is each
    compression block's selection block; ``*_cu`` count blocks/tiles per sequence cumulatively.
    Window order: ``win_perm``/``win_inv``, ``win_offsets``. Query tiles ``tile_start``/``tile_end``
    are row ranges, the same numbers in block and window order (both keep sequences in place).
    """

    cfg: SSAConfig
    cu_seqlens: Tensor
    perm: Tensor
    inv_perm: Tensor
    cmp_block: Tensor
    slc_block: Tensor
    window: Tensor
    tile: Tensor
    cmp_pos: Tensor
    cmp_offsets: Tensor
    cmp_slc: Tensor
    cmp_cu: Tensor
    slc_offsets: Tensor
    slc_cu: Tensor
    win_perm: Tensor
    win_inv: Tensor
    win_offsets: Tensor
    tile_start: Tensor
    tile_end: Tensor
    tile_seq: Tensor
    tile_cu: Tensor
    shared_order: bool  # windows are the selection blocks: window order is block order
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)  # kernel index plans

    @property
    def batch(self) -> int:
        return len(self.cu_seqlens) - 1

    @property
    def num_tokens(self) -> int:
        return len(self.perm)


def build_layout(coords: Tensor, cu_seqlens: Tensor, cfg: SSAConfig) -> SSALayout:
    """The :class:`SSALayout` of ``coords`` ([N, 3], or [N, 4] with a leading batch column) per sequence."""
    if coords.dim() != 2 or coords.shape[1] not in (3, 4):
        raise ValueError(f"coords must be [N, 3] or [N, 4], got {tuple(coords.shape)}")
    xyz = coords[:, -3:].long()
    cu = cu_seqlens.to(device=xyz.device, dtype=torch.int64)
    n, batch = len(xyz), len(cu) - 1
    if int(cu[-1]) != n or bool((cu.diff() < 0).any()):
        raise ValueError(f"cu_seqlens must be non-decreasing from 0 to {n}, got {cu.tolist()}")
    if n and int(xyz.min()) < 0:
        raise ValueError("coords must be non-negative")
    seq = sequence_ids(cu)
    rows = torch.arange(n, device=xyz.device)
    ratio = cfg.block_slc // cfg.block_cmp

    # Block order: dense rank of (sequence, Morton code of the selection block), then the
    # compression block inside it, then the caller's order (a stable sort keeps runs deterministic).
    slc_key = (seq << 3 * MORTON_BITS) | morton3(xyz // cfg.block_slc)
    slc_unique, slc_rank = torch.unique(slc_key, return_inverse=True)
    sub = xyz // cfg.block_cmp % ratio
    cmp_key = slc_rank * ratio**3 + (sub[:, 0] * ratio + sub[:, 1]) * ratio + sub[:, 2]
    cmp_key_sorted, perm = torch.sort(cmp_key, stable=True)
    cmp_offsets, cmp_of_row = _runs(cmp_key_sorted)
    slc_block = slc_rank  # unique() ranks are already in block order
    slc_offsets, _ = _runs(slc_rank[perm])
    cmp_slc = slc_rank[perm][cmp_offsets[:-1]]
    slc_seq = slc_unique >> 3 * MORTON_BITS

    inv_perm = torch.empty_like(perm)
    inv_perm[perm] = rows
    cmp_block = cmp_of_row[inv_perm]
    local = xyz % cfg.block_cmp
    cmp_pos = (local[:, 0] * cfg.block_cmp + local[:, 1]) * cfg.block_cmp + local[:, 2]

    if cfg.window == cfg.block_slc and cfg.shift == 0:
        win_perm, win_inv, win_offsets, window = perm, inv_perm, slc_offsets, slc_block
    else:
        win_key = (seq << 3 * MORTON_BITS) | morton3((xyz + cfg.shift) // cfg.window)
        win_key_sorted, win_perm = torch.sort(win_key, stable=True)
        win_offsets, win_of_row = _runs(win_key_sorted)
        win_inv = torch.empty_like(win_perm)
        win_inv[win_perm] = rows
        window = win_of_row[win_inv]

    # Query tiles: consecutive rows of one sequence, query_tile at a time.
    tiles_per_seq = (cu.diff() + cfg.query_tile - 1) // cfg.query_tile
    tile_cu = offsets_of(tiles_per_seq)
    tile_seq = group_ids(tiles_per_seq)
    tile_start = (
        cu[tile_seq] + (torch.arange(len(tile_seq), device=xyz.device) - tile_cu[tile_seq]) * cfg.query_tile
    )
    tile_end = torch.minimum(tile_start + cfg.query_tile, cu[tile_seq + 1])
    tile_of_row = tile_cu[seq] + (rows - cu[seq]) // cfg.query_tile  # rows of block order
    tile = tile_of_row[inv_perm]

    return SSALayout(
        cfg=cfg,
        cu_seqlens=cu,
        perm=perm,
        inv_perm=inv_perm,
        cmp_block=cmp_block,
        slc_block=slc_block,
        window=window,
        tile=tile,
        cmp_pos=cmp_pos,
        cmp_offsets=cmp_offsets,
        cmp_slc=cmp_slc,
        cmp_cu=_per_sequence(slc_seq[cmp_slc], batch),
        slc_offsets=slc_offsets,
        slc_cu=_per_sequence(slc_seq, batch),
        win_perm=win_perm,
        win_inv=win_inv,
        win_offsets=win_offsets,
        tile_start=tile_start,
        tile_end=tile_end,
        tile_seq=tile_seq,
        tile_cu=tile_cu,
        shared_order=win_perm is perm,
    )

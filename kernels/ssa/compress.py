"""Compression of keys/values: one token per ``m_cmp^3`` block (the compression branch's keys).

Direct3D-S2 computes ``k_cmp = delta(k + PE(k))``: an intra-block position encoding, then a sparse
3D convolution and a mean over the block. The split in meshforge: the learnable parts (the position
table and the sparse convolution) belong to the attention layer that owns the parameters; this op
does the bookkeeping and the pooling, ``mean over the block of (x + pe[position in block])``, and
:func:`spatial_sparse_attention` accepts the layer's own ``k_cmp``/``v_cmp`` instead (rows in
compression-block order, :attr:`SSALayout.cmp_offsets`). Pooling is a segmented mean in PyTorch:
it moves ``N x G x D`` values once, a rounding error next to the attention kernels.
"""

from __future__ import annotations

import torch
from meshforge.kernels.ssa.blocks import SSALayout
from torch import Tensor


def position_shares(layout: SSALayout) -> Tensor:
    """``[C, m_cmp^3]`` float32: the share of each intra-block position among each compression block's
    tokens (1 / block size where the block has a voxel there), cached on the layout."""
    if "position_shares" not in layout.cache:
        sizes = layout.cmp_offsets.diff().float()
        shares = torch.zeros(len(sizes), layout.cfg.block_cmp**3, device=sizes.device)
        shares[layout.cmp_block, layout.cmp_pos] = 1.0 / sizes[layout.cmp_block]  # one voxel per position
        layout.cache["position_shares"] = shares
    return layout.cache["position_shares"]


def pool_sorted(x: Tensor, layout: SSALayout, pe: Tensor | None = None) -> Tensor:
    """Mean of block-ordered ``x[N, G, D]`` (+ ``pe[m_cmp^3, G, D]`` by intra-block position) per block.

    Returns ``[C, G, D]`` in ``x``'s dtype, accumulated in float32; differentiable in ``x`` and ``pe``.
    The mean of ``x + pe[position]`` is the mean of ``x`` plus each block's mean of its positions'
    encodings, a ``[C, m_cmp^3] @ [m_cmp^3, G D]`` product. Gathering ``pe`` onto all N tokens instead
    has an index backward that adds each position's ~N / m_cmp^3 duplicates one after another on CUDA;
    the reference SS-DiT step's profile at 123k tokens on an H200 (``direct3d_scale.py --profile``)
    spent 0.16 s of 3.9 s in indexing backward, these gathers among its calls.
    """
    # Blocks are row ranges in block order: a segmented mean, no atomics.
    pooled = torch.segment_reduce(x.float(), "mean", offsets=layout.cmp_offsets, axis=0)
    if pe is not None:
        pooled = pooled + (position_shares(layout) @ pe.float().flatten(1)).view(-1, *pe.shape[1:])
    return pooled.to(x.dtype)


def pool_blocks(x: Tensor, layout: SSALayout, pe: Tensor | None = None) -> Tensor:
    """:func:`pool_sorted` of ``x`` given in the caller's token order."""
    return pool_sorted(x[layout.perm], layout, pe)


def compress_kv(
    k: Tensor, v: Tensor, layout: SSALayout, pe_k: Tensor | None = None, pe_v: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Block keys and values ``[C, G, D]`` for the compression branch (see the module docstring)."""
    return pool_blocks(k, layout, pe_k), pool_blocks(v, layout, pe_v)

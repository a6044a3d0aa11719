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


def pool_sorted(x: Tensor, layout: SSALayout, pe: Tensor | None = None) -> Tensor:
    """Mean of block-ordered ``x[N, G, D]`` (+ ``pe[m_cmp^3, G, D]`` by intra-block position) per block.

    Returns ``[C, G, D]`` in ``x``'s dtype, accumulated in float32; differentiable in ``x`` and ``pe``.
    """
    if pe is not None:
        x = x + pe[layout.cmp_pos[layout.perm]]
    # Blocks are row ranges in block order: a segmented mean, no atomics.
    return torch.segment_reduce(x.float(), "mean", offsets=layout.cmp_offsets, axis=0).to(x.dtype)


def pool_blocks(x: Tensor, layout: SSALayout, pe: Tensor | None = None) -> Tensor:
    """:func:`pool_sorted` of ``x`` given in the caller's token order."""
    return pool_sorted(x[layout.perm], layout, pe)


def compress_kv(
    k: Tensor, v: Tensor, layout: SSALayout, pe_k: Tensor | None = None, pe_v: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Block keys and values ``[C, G, D]`` for the compression branch (see the module docstring)."""
    return pool_blocks(k, layout, pe_k), pool_blocks(v, layout, pe_v)

"""Spatial Sparse Attention (Direct3D-S2): Triton kernels for CUDA, a pure-PyTorch reference beside them.

``spatial_sparse_attention(q, k, v, gates, coords, cu_seqlens, cfg)`` is the op; ``build_layout``
precomputes the coordinate bookkeeping for reuse across layers; ``compress_kv`` is the default
block pooling. Triton is imported only when the kernel path runs.
"""

from meshforge.kernels.ssa.blocks import SSALayout, build_layout
from meshforge.kernels.ssa.compress import compress_kv, pool_blocks, pool_sorted
from meshforge.kernels.ssa.config import SSAConfig
from meshforge.kernels.ssa.reference import ssa_reference
from meshforge.kernels.ssa.ssa import spatial_sparse_attention

__all__ = [
    "SSAConfig",
    "SSALayout",
    "build_layout",
    "compress_kv",
    "pool_blocks",
    "pool_sorted",
    "spatial_sparse_attention",
    "ssa_reference",
]

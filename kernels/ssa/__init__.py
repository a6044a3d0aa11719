"""Spatial Sparse Attention (Direct3D-S2): Triton kernels for CUDA, PyTorch forms beside them.

``spatial_sparse_attention(q, k, v, gates, coords, cu_seqlens, cfg, backend="auto")`` is the op;
``build_layout`` precomputes the coordinate bookkeeping for reuse across layers; ``compress_kv`` is
the default block pooling. Forms: ``reference.py`` (the definition, dense masks, O(n^2)),
``gathered.py`` (PyTorch, memory linear in the tokens: the CPU path) and ``triton_path.py`` (the
range-attention kernels of ``range_attn.py`` over the index plans of ``plans.py``, the gated sum of
``mix.py``: the CUDA path).
Triton is imported only when the kernel path runs.
"""

from __future__ import annotations

from meshforge.kernels.ssa.blocks import SSALayout, build_layout
from meshforge.kernels.ssa.compress import compress_kv, pool_blocks, pool_sorted
from meshforge.kernels.ssa.config import SSAConfig
from meshforge.kernels.ssa.gathered import ssa_gathered
from meshforge.kernels.ssa.reference import ssa_reference
from meshforge.kernels.utils import Backend, resolve_backend
from torch import Tensor


def spatial_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: Tensor,
    coords: Tensor,
    cu_seqlens: Tensor,
    cfg: SSAConfig,
    k_cmp: Tensor | None = None,
    v_cmp: Tensor | None = None,
    *,
    layout: SSALayout | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """Direct3D-S2's Spatial Sparse Attention over a variable-length batch of sparse voxel tokens.

    ``q[N, H, D]``, ``k, v[N, G, D]`` (G divides H: grouped-query heads), ``gates[N, H, 3]`` the
    (already sigmoid-ed) weights of the compression, selection and window branches, ``coords``
    ``[N, 3]`` (or ``[N, 4]`` with a leading batch column) voxel indices, ``cu_seqlens[B + 1]``.
    ``k_cmp, v_cmp[C, G, D]`` replace the default mean-pooled block tokens (rows in
    compression-block order of ``layout``; see :mod:`meshforge.kernels.ssa.compress`).
    Keys and values are cast to ``q``'s dtype. Returns ``[N, H, D]`` in ``q``'s dtype.
    """
    n, heads, head_dim = q.shape
    if k.shape != v.shape or k.shape[0] != n or k.shape[2] != head_dim or heads % k.shape[1]:
        raise ValueError(
            f"need q [N, H, D] and k, v [N, G, D] with G | H; got {tuple(q.shape)}, {tuple(k.shape)}"
        )
    if gates.shape != (n, heads, 3):
        raise ValueError(f"gates must be [N, H, 3] = [{n}, {heads}, 3], got {tuple(gates.shape)}")
    if head_dim > 128:
        raise ValueError(f"head dim {head_dim} > 128 is not supported")
    layout = layout if layout is not None else build_layout(coords, cu_seqlens, cfg)
    if layout.cfg != cfg or layout.num_tokens != n:
        raise ValueError("layout was built for another config or token count")
    # One dtype for the kernels' matrix products (under autocast, normalised keys may be float32).
    k, v = k.to(q.dtype), v.to(q.dtype)
    if k_cmp is not None:
        k_cmp, v_cmp = k_cmp.to(q.dtype), v_cmp.to(q.dtype)
    form = resolve_backend("spatial_sparse_attention", backend, q.is_cuda)
    if form == "triton":
        from meshforge.kernels.ssa.triton_path import ssa_triton  # imports Triton: only where it runs

        return ssa_triton(q, k, v, gates, layout, k_cmp, v_cmp)[0]
    if form == "reference":
        if k_cmp is None:
            k_cmp, v_cmp = compress_kv(k, v, layout)
        return ssa_reference(q, k, v, gates, layout, k_cmp, v_cmp)[0]
    return ssa_gathered(q, k, v, gates, layout, k_cmp, v_cmp)[0]


__all__ = [
    "SSAConfig",
    "SSALayout",
    "build_layout",
    "compress_kv",
    "pool_blocks",
    "pool_sorted",
    "spatial_sparse_attention",
    "ssa_gathered",
    "ssa_reference",
]

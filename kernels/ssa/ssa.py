"""The public SSA op: layout, compression, top-k selection, three branch kernels, gated mix.

``spatial_sparse_attention`` runs the Triton kernels on CUDA and the gathered PyTorch form
(:mod:`meshforge.kernels.ssa.gathered`, memory linear in the tokens) on CPU; any of them, or the
dense reference, can be forced with ``backend`` (the Triton path runs on CPU under
``TRITON_INTERPRET=1``, which the tests use). The Triton path, per call:

1. tokens go to block order (one gather of q, k, v; the window branch gets its own order when the
   windows are shifted or differ from the selection blocks);
2. compression branch kernel: attention to the sequence's block tokens, plus the block scores;
3. ``topk`` over the scores per query tile and group (:func:`topk_blocks`) -> the selection plan;
4. selection and window branch kernels; gated sum back in the caller's order.

Layouts and the compression/window plans depend only on the coordinates: pass ``layout`` (from
:func:`build_layout`) to reuse them across layers.
"""

from __future__ import annotations

from typing import Literal

import torch
from meshforge.kernels.ssa.blocks import SSALayout, build_layout
from meshforge.kernels.ssa.compress import compress_kv, pool_sorted
from meshforge.kernels.ssa.config import SSAConfig
from meshforge.kernels.ssa.gathered import ssa_gathered
from meshforge.kernels.ssa.reference import ssa_reference
from meshforge.kernels.ssa.select import topk_blocks
from torch import Tensor

Backend = Literal["auto", "triton", "torch", "reference"]


BLOCK_N = 64  # key rows per kernel step (and per dK/dV key tile)


class _Permute(torch.autograd.Function):
    """``x[perm]`` whose backward is the inverse gather (a scatter-add would be slower)."""

    @staticmethod
    def forward(ctx, x: Tensor, perm: Tensor, inverse: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(inverse)
        return x[perm]

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (inverse,) = ctx.saved_tensors
        return grad[inverse], None, None


def _plans(layout: SSALayout, block_n: int):
    from meshforge.kernels.ssa.plans import compression_plan, window_plan

    key = ("plans", block_n)
    if key not in layout.cache:
        layout.cache[key] = (compression_plan(layout, block_n), window_plan(layout, block_n))
    return layout.cache[key]


def ssa_triton(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    gates: Tensor,
    layout: SSALayout,
    k_cmp: Tensor | None = None,
    v_cmp: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The kernel path; returns ``(out, selection)`` like :func:`ssa_reference` (mean pooling by default)."""
    from meshforge.kernels.ssa.plans import selection_plan
    from meshforge.kernels.ssa.range_attn import RangeAttention

    cfg = layout.cfg
    scale = cfg.scale if cfg.scale is not None else q.shape[-1] ** -0.5
    cmp_plan, win_plan = _plans(layout, BLOCK_N)
    n_tiles, groups = len(layout.tile_start), k.shape[1]

    def to_block(x: Tensor) -> Tensor:
        return _Permute.apply(x, layout.perm, layout.inv_perm)

    qs, ks, vs = to_block(q), to_block(k), to_block(v)
    if k_cmp is None:
        k_cmp, v_cmp = pool_sorted(ks, layout), pool_sorted(vs, layout)
    score = torch.zeros(n_tiles, groups, cmp_plan.score_width, dtype=torch.float32, device=q.device)
    o_cmp = RangeAttention.apply(qs, k_cmp, v_cmp, cmp_plan, cfg.query_tile, scale, score)
    selection = topk_blocks(score, layout)
    slc_plan = selection_plan(layout, selection, BLOCK_N)
    o_slc = RangeAttention.apply(qs, ks, vs, slc_plan, cfg.query_tile, scale, None)
    if layout.shared_order:
        o_win = RangeAttention.apply(qs, ks, vs, win_plan, cfg.query_tile, scale, None)
    else:
        qw, kw, vw = (_Permute.apply(x, layout.win_perm, layout.win_inv) for x in (q, k, v))
        o_win = RangeAttention.apply(qw, kw, vw, win_plan, cfg.query_tile, scale, None)
        # window order -> block order in one gather: block row r is window row win_inv[perm[r]]
        o_win = _Permute.apply(o_win, layout.win_inv[layout.perm], layout.inv_perm[layout.win_perm])
    # Mix in block order (gates move there once), then one gather back to the caller's order.
    g = to_block(gates).to(q.dtype)
    mixed = o_cmp * g[..., 0:1] + o_slc * g[..., 1:2] + o_win * g[..., 2:3]
    return _Permute.apply(mixed, layout.inv_perm, layout.perm), selection


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
    if backend == "triton" or (backend == "auto" and q.is_cuda):
        return ssa_triton(q, k, v, gates, layout, k_cmp, v_cmp)[0]
    if backend == "reference":
        if k_cmp is None:
            k_cmp, v_cmp = compress_kv(k, v, layout)
        return ssa_reference(q, k, v, gates, layout, k_cmp, v_cmp)[0]
    return ssa_gathered(q, k, v, gates, layout, k_cmp, v_cmp)[0]

"""The Triton path of SSA: layout, compression, top-k selection, three branch kernels, gated mix.

What :func:`meshforge.kernels.ssa.spatial_sparse_attention` runs on CUDA (and on a CPU under
``TRITON_INTERPRET=1``, which the tests use), per call:

1. tokens go to block order (one gather of q, k, v; the window branch gets its own order when the
   windows are shifted or differ from the selection blocks);
2. compression branch kernel: attention to the sequence's block tokens, plus the block scores;
3. ``topk`` over the scores per query tile and group (:func:`topk_blocks`) -> the selection plan;
4. selection and window branch kernels; the gated sum, written in the caller's order by one kernel
   (:mod:`~meshforge.kernels.ssa.mix`).

Layouts and the compression/window plans depend only on the coordinates (:func:`branch_plans`
caches them on the layout, so layers sharing a layout share them). Each stage is a function of its
own, so that a benchmark can time the stages of the very path the op runs.
"""

from __future__ import annotations

import torch
from meshforge.kernels.ssa.blocks import SSALayout
from meshforge.kernels.ssa.compress import pool_sorted
from meshforge.kernels.ssa.mix import gated_sum
from meshforge.kernels.ssa.plans import AttnPlan, compression_plan, selection_plan, window_plan
from meshforge.kernels.ssa.range_attn import RangeAttention
from meshforge.kernels.ssa.select import topk_blocks
from torch import Tensor

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


def branch_plans(layout: SSALayout, block_n: int | None = None) -> tuple[AttnPlan, AttnPlan]:
    """The compression and window branches' plans (coordinates only), cached on ``layout``;
    ``block_n`` key rows per kernel step, :data:`BLOCK_N` by default."""
    block_n = block_n or BLOCK_N
    key = ("plans", block_n)
    if key not in layout.cache:
        layout.cache[key] = (compression_plan(layout, block_n), window_plan(layout, block_n))
    return layout.cache[key]


def softmax_scale(layout: SSALayout, q: Tensor) -> float:
    return layout.cfg.scale if layout.cfg.scale is not None else q.shape[-1] ** -0.5


def to_block_order(x: Tensor, layout: SSALayout) -> Tensor:
    """Rows of ``x`` (the caller's token order) in block order; differentiable."""
    return _Permute.apply(x, layout.perm, layout.inv_perm)


def compression_branch(qs: Tensor, k_cmp: Tensor, v_cmp: Tensor, layout: SSALayout,
                       block_n: int | None = None) -> tuple[Tensor, Tensor]:
    """Block-ordered queries over the block tokens: the branch output and the selection-block scores
    ``[tiles, groups, width]`` (float32) that :func:`topk_blocks` ranks."""
    cmp_plan, _ = branch_plans(layout, block_n)
    score = torch.zeros(len(layout.tile_start), k_cmp.shape[1], cmp_plan.score_width, dtype=torch.float32,
                        device=qs.device)  # fmt: skip
    out = RangeAttention.apply(qs, k_cmp, v_cmp, cmp_plan, layout.cfg.query_tile, softmax_scale(layout, qs), score)
    return out, score


def selection_branch(qs: Tensor, ks: Tensor, vs: Tensor, layout: SSALayout, selection: Tensor,
                     block_n: int | None = None) -> Tensor:
    """Block-ordered queries over the tokens of their tile's selected blocks (``selection`` from :func:`topk_blocks`)."""
    plan = selection_plan(layout, selection, block_n or BLOCK_N)
    return RangeAttention.apply(qs, ks, vs, plan, layout.cfg.query_tile, softmax_scale(layout, qs), None)


def window_branch(q: Tensor, k: Tensor, v: Tensor, qs: Tensor, ks: Tensor, vs: Tensor, layout: SSALayout,
                  block_n: int | None = None) -> Tensor:
    """Each token over its own window, in block order: ``qs, ks, vs`` when the windows are the
    selection blocks, else ``q, k, v`` (the caller's order) go to window order and back."""
    _, win_plan = branch_plans(layout, block_n)
    tile, scale = layout.cfg.query_tile, softmax_scale(layout, qs)
    if layout.shared_order:
        return RangeAttention.apply(qs, ks, vs, win_plan, tile, scale, None)
    qw, kw, vw = (_Permute.apply(x, layout.win_perm, layout.win_inv) for x in (q, k, v))
    o_win = RangeAttention.apply(qw, kw, vw, win_plan, tile, scale, None)
    # window order -> block order in one gather: block row r is window row win_inv[perm[r]]
    return _Permute.apply(o_win, layout.win_inv[layout.perm], layout.inv_perm[layout.win_perm])


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
    qs, ks, vs = (to_block_order(x, layout) for x in (q, k, v))
    if k_cmp is None:
        k_cmp, v_cmp = pool_sorted(ks, layout), pool_sorted(vs, layout)
    o_cmp, score = compression_branch(qs, k_cmp, v_cmp, layout)
    selection = topk_blocks(score, layout)
    o_slc = selection_branch(qs, ks, vs, layout, selection)
    o_win = window_branch(q, k, v, qs, ks, vs, layout)
    return gated_sum(o_cmp, o_slc, o_win, gates, layout.perm), selection

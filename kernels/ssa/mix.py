"""The gated sum of the three SSA branches as one Triton kernel each way, back in the caller's order.

``out[perm[n], h] = sum_b gates[perm[n], h, b] * o_b[n, h]`` for the branch outputs ``o_b`` in
block order (``perm``: the caller's row of each block row, so the final gather to the caller's
order and the gather of the gates into block order happen inside the kernel). In PyTorch this is
five elementwise ops and two gathers forward, and in backward a product and a reduction over the
head dim per branch, each a pass over ``[N, H, D]``; fused, the forward reads the three outputs
once and writes one, the backward reads them and ``dout`` once and writes the three gradients.
Arithmetic is float32 whatever the inputs' dtype, rounded once on the store.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_R = 64  # (token, head) rows per program


@triton.jit
def _tile(GATES, perm, n_rows, n_heads, head_dim, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's ``BLOCK_R`` (token, head) rows: offsets of their values in block order (``at``)
    and in the caller's order (``out_at``), the caller's rows, masks, and the three gates (float32)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < n_rows
    dst = tl.load(perm + r // n_heads, mask=r_ok, other=0).to(tl.int64) * n_heads + r % n_heads
    d = tl.arange(0, BLOCK_D)
    ok = r_ok[:, None] & (d < head_dim)[None, :]
    at = r.to(tl.int64)[:, None] * head_dim + d[None, :]
    out_at = dst[:, None] * head_dim + d[None, :]
    g0 = tl.load(GATES + dst * 3, mask=r_ok, other=0.0).to(tl.float32)
    g1 = tl.load(GATES + dst * 3 + 1, mask=r_ok, other=0.0).to(tl.float32)
    g2 = tl.load(GATES + dst * 3 + 2, mask=r_ok, other=0.0).to(tl.float32)
    return at, out_at, dst, ok, r_ok, g0, g1, g2


@triton.jit
def _mix_fwd(
    O_CMP, O_SLC, O_WIN, GATES, OUT, perm, n_rows, n_heads, head_dim,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    at, out_at, _, ok, _, g0, g1, g2 = _tile(GATES, perm, n_rows, n_heads, head_dim, BLOCK_R, BLOCK_D)
    out = g0[:, None] * tl.load(O_CMP + at, mask=ok, other=0.0).to(tl.float32)
    out += g1[:, None] * tl.load(O_SLC + at, mask=ok, other=0.0).to(tl.float32)
    out += g2[:, None] * tl.load(O_WIN + at, mask=ok, other=0.0).to(tl.float32)
    tl.store(OUT + out_at, out.to(OUT.dtype.element_ty), mask=ok)


@triton.jit
def _branch_bwd(O, DO, DGATES, b, dout, g, at, dst, ok, r_ok):
    """One branch's gradients: ``dO_b = g_b * dout`` (block order), ``dg_b = <dout, o_b>`` (caller's)."""
    o = tl.load(O + at, mask=ok, other=0.0).to(tl.float32)
    tl.store(DO + at, (g[:, None] * dout).to(DO.dtype.element_ty), mask=ok)
    tl.store(DGATES + dst * 3 + b, tl.sum(dout * o, 1).to(DGATES.dtype.element_ty), mask=r_ok)


@triton.jit
def _mix_bwd(
    O_CMP, O_SLC, O_WIN, GATES, DOUT, DO_CMP, DO_SLC, DO_WIN, DGATES, perm, n_rows, n_heads, head_dim,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    at, out_at, dst, ok, r_ok, g0, g1, g2 = _tile(GATES, perm, n_rows, n_heads, head_dim, BLOCK_R, BLOCK_D)
    dout = tl.load(DOUT + out_at, mask=ok, other=0.0).to(tl.float32)
    _branch_bwd(O_CMP, DO_CMP, DGATES, 0, dout, g0, at, dst, ok, r_ok)
    _branch_bwd(O_SLC, DO_SLC, DGATES, 1, dout, g1, at, dst, ok, r_ok)
    _branch_bwd(O_WIN, DO_WIN, DGATES, 2, dout, g2, at, dst, ok, r_ok)


def _launch(n_rows: int, head_dim: int) -> tuple[tuple[int], dict]:
    return (triton.cdiv(n_rows, BLOCK_R),), {"BLOCK_R": BLOCK_R, "BLOCK_D": triton.next_power_of_2(head_dim)}


class GatedSum(torch.autograd.Function):
    """``gated_sum(o_cmp, o_slc, o_win, gates, perm)``: branch outputs ``[N, H, D]`` in block order,
    ``gates[N, H, 3]`` and the result in the caller's order (``perm[block row]`` = caller's row).
    The result has the branch outputs' dtype, the gates' gradient the gates' dtype."""

    @staticmethod
    def forward(ctx, o_cmp: Tensor, o_slc: Tensor, o_win: Tensor, gates: Tensor, perm: Tensor) -> Tensor:  # type: ignore[override]
        branches = [o.contiguous() for o in (o_cmp, o_slc, o_win)]
        gates, perm = gates.contiguous(), perm.to(torch.int32).contiguous()
        n, heads, head_dim = o_cmp.shape
        out = torch.empty_like(branches[0])
        if n:
            grid, meta = _launch(n * heads, head_dim)
            _mix_fwd[grid](*branches, gates, out, perm, n * heads, heads, head_dim, **meta)
        ctx.save_for_backward(*branches, gates, perm)
        return out

    @staticmethod
    def backward(ctx, dout: Tensor):  # type: ignore[override]
        o_cmp, o_slc, o_win, gates, perm = ctx.saved_tensors
        n, heads, head_dim = o_cmp.shape
        grads = [torch.empty_like(o) for o in (o_cmp, o_slc, o_win)]
        dgates = torch.empty_like(gates)
        if n:
            grid, meta = _launch(n * heads, head_dim)
            _mix_bwd[grid](o_cmp, o_slc, o_win, gates, dout.contiguous(), *grads, dgates, perm, n * heads, heads,
                           head_dim, **meta)  # fmt: skip
        return *grads, dgates, None


def gated_sum(o_cmp: Tensor, o_slc: Tensor, o_win: Tensor, gates: Tensor, perm: Tensor) -> Tensor:
    """The SSA output in the caller's order from the block-ordered branch outputs (see :class:`GatedSum`)."""
    return GatedSum.apply(o_cmp, o_slc, o_win, gates, perm)

"""Triton kernels of SSA: block-sparse softmax attention of query tiles over lists of key row ranges.

One kernel family serves all three branches (:mod:`meshforge.kernels.ssa.plans` says how): a
program owns a query tile of ``BLOCK_M`` rows and one head and walks its key ranges ``BLOCK_N`` rows
at a time, with the online softmax of FlashAttention in base 2 (``exp2`` of log2e-scaled logits;
the saved log-sum-exp is base 2 too). Backward is FlashAttention-2's split: one kernel for dQ over
the same ranges, one for dK/dV per key tile over the reverse list of query tiles that read it, all
heads of the GQA group in one program, so every gradient row has a single writer. Where that makes
too few programs to fill the GPU (few KV heads, few key tiles), each is split into parts over its
(head, query tile) steps whose float32 partial sums are added afterwards (:func:`dkdv_split`).

Masked logits are a large finite negative rather than -inf: a row whose first key chunk is
entirely masked (window branch) then accumulates junk with weight 1, which the rescale factor
``exp2(-1e30 - m)`` = 0 wipes as soon as a real key arrives; every real row has one.

The compression branch also scores selection blocks: after its forward pass, a second pass over
the same keys recomputes the normalised probabilities and adds their column sums over the tile into
``score[tile, group, selection block of the key]`` (the paper's summed compression scores).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from meshforge.kernels.ssa.plans import AttnPlan
from torch import Tensor

LOG2E = 1.4426950408889634
NEG = tl.constexpr(-1.0e30)  # masked logit (see the module docstring)
SLOT_END = tl.constexpr(2**30)  # slot of the columns past a range: above every real one


@triton.jit
def _load_rows(ptr, rows, row_ok, head, stride_n, stride_h, d, d_ok):
    offs = rows.to(tl.int64)[:, None] * stride_n + head * stride_h + d[None, :]
    return tl.load(ptr + offs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)


@triton.jit
def _segmented_add(sum_a, slot_a, sum_b, slot_b):
    """Scan operator of per-slot running sums over ascending slots: restart where the slot changes."""
    return tl.where(slot_a == slot_b, sum_a + sum_b, sum_b), slot_b


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, SCORE,
    tile_start, tile_end, rng_ptr, rng_start, rng_end, rng_gstride,
    win_q, win_k, score_slot, score_width,
    stride_qn, stride_qh, stride_kn, stride_kh, stride_on, stride_oh,
    n_heads, n_groups, qk_scale, head_dim,
    HPG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_WIN: tl.constexpr, SCORE_ON: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    h = tl.program_id(1)
    g = h // HPG
    rows = tl.load(tile_start + t) + tl.arange(0, BLOCK_M)
    row_ok = rows < tl.load(tile_end + t)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q = _load_rows(Q, rows, row_ok, h, stride_qn, stride_qh, d, d_ok)
    if MASK_WIN:
        wq = tl.load(win_q + rows, mask=row_ok, other=-1)
    m_i = tl.full([BLOCK_M], NEG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    r_lo = tl.load(rng_ptr + g * rng_gstride + t)
    r_hi = tl.load(rng_ptr + g * rng_gstride + t + 1)
    for r in range(r_lo, r_hi):
        ke = tl.load(rng_end + r)
        for n0 in range(tl.load(rng_start + r), ke, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < ke
            k = _load_rows(K, cols, col_ok, g, stride_kn, stride_kh, d, d_ok)
            v = _load_rows(V, cols, col_ok, g, stride_kn, stride_kh, d, d_ok)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            valid = col_ok[None, :]
            if MASK_WIN:
                valid = valid & (wq[:, None] == tl.load(win_k + cols, mask=col_ok, other=-2)[None, :])
            s = tl.where(valid, s, NEG)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
    l_i = tl.where(l_i > 0.0, l_i, 1.0)
    out = acc / l_i[:, None]
    o_offs = rows.to(tl.int64)[:, None] * stride_on + h * stride_oh + d[None, :]
    tl.store(O + o_offs, out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = m_i + tl.log2(l_i)
    tl.store(LSE + rows.to(tl.int64) * n_heads + h, lse, mask=row_ok)

    if SCORE_ON:
        score_row = SCORE + (t * n_groups + g).to(tl.int64) * score_width
        for r in range(r_lo, r_hi):
            ke = tl.load(rng_end + r)
            for n0 in range(tl.load(rng_start + r), ke, BLOCK_N):
                cols = n0 + tl.arange(0, BLOCK_N)
                col_ok = cols < ke
                k = _load_rows(K, cols, col_ok, g, stride_kn, stride_kh, d, d_ok)
                s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
                p = tl.where(row_ok[:, None] & col_ok[None, :], tl.exp2(s - lse[:, None]), 0.0)
                # Keys arrive in block order, so a chunk's slots ascend: a segmented scan sums the
                # columns of each run of equal slots, and the run's last lane adds it to the score
                # row, one atomic per slot rather than BLOCK_N colliding ones.
                slot = tl.load(score_slot + cols, mask=col_ok, other=SLOT_END)
                # The chunk's last column ends its run too: the next chunk adds its own part.
                in_chunk = (cols + 1 < ke) & (tl.arange(0, BLOCK_N) < BLOCK_N - 1)
                following = tl.load(score_slot + cols + 1, mask=in_chunk, other=SLOT_END)
                run_sum, _ = tl.associative_scan((tl.sum(p, 0), slot), 0, _segmented_add)
                tl.atomic_add(score_row + slot, run_sum, mask=col_ok & (following != slot))


@triton.jit
def _attn_bwd_dq(
    Q, K, V, O, DO, DQ, LSE, DELTA,
    tile_start, tile_end, rng_ptr, rng_start, rng_end, rng_gstride, win_q, win_k,
    stride_qn, stride_qh, stride_kn, stride_kh,
    n_heads, qk_scale, sm_scale, head_dim,
    HPG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_WIN: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # Q, O, DO and DQ share one layout (contiguous [N, H, D]), K and V another.
    t = tl.program_id(0)
    h = tl.program_id(1)
    g = h // HPG
    rows = tl.load(tile_start + t) + tl.arange(0, BLOCK_M)
    row_ok = rows < tl.load(tile_end + t)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    q = _load_rows(Q, rows, row_ok, h, stride_qn, stride_qh, d, d_ok)
    do = _load_rows(DO, rows, row_ok, h, stride_qn, stride_qh, d, d_ok)
    lse = tl.load(LSE + rows.to(tl.int64) * n_heads + h, mask=row_ok, other=0.0)
    # FlashAttention-2's rowsum(dO * O), computed here and saved for the dK/dV kernel that follows.
    o = _load_rows(O, rows, row_ok, h, stride_qn, stride_qh, d, d_ok)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    tl.store(DELTA + rows.to(tl.int64) * n_heads + h, delta, mask=row_ok)
    if MASK_WIN:
        wq = tl.load(win_q + rows, mask=row_ok, other=-1)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    r_lo = tl.load(rng_ptr + g * rng_gstride + t)
    r_hi = tl.load(rng_ptr + g * rng_gstride + t + 1)
    for r in range(r_lo, r_hi):
        ke = tl.load(rng_end + r)
        for n0 in range(tl.load(rng_start + r), ke, BLOCK_N):
            cols = n0 + tl.arange(0, BLOCK_N)
            col_ok = cols < ke
            k = _load_rows(K, cols, col_ok, g, stride_kn, stride_kh, d, d_ok)
            v = _load_rows(V, cols, col_ok, g, stride_kn, stride_kh, d, d_ok)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
            valid = row_ok[:, None] & col_ok[None, :]
            if MASK_WIN:
                valid = valid & (wq[:, None] == tl.load(win_k + cols, mask=col_ok, other=-2)[None, :])
            p = tl.where(valid, tl.exp2(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    offs = rows.to(tl.int64)[:, None] * stride_qn + h * stride_qh + d[None, :]
    tl.store(DQ + offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA,
    tile_start, tile_end, kv_start, kv_end, kv_list, rev_ptr, rev, rev_gstride, win_q, win_k, work,
    stride_qn, stride_qh, stride_kn, stride_kh, part_stride,
    n_heads, n_groups, n_parts, qk_scale, sm_scale, head_dim,
    HPG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_WIN: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # K, V, DK and DV share one layout (contiguous [M, G, D]); Q and DO another. With n_parts > 1,
    # DK and DV are float32 [n_parts, M, G, D] partial sums, ``part_stride`` apart.
    p = tl.program_id(0)
    item = tl.load(work + p // n_parts)  # (key tile, group) pairs, longest reverse list first
    part = p % n_parts
    j = item // n_groups
    g = item % n_groups
    cols = tl.load(kv_start + j) + tl.arange(0, BLOCK_N)
    col_ok = cols < tl.load(kv_end + j)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < head_dim
    k = _load_rows(K, cols, col_ok, g, stride_kn, stride_kh, d, d_ok)
    v = _load_rows(V, cols, col_ok, g, stride_kn, stride_kh, d, d_ok)
    if MASK_WIN:
        wk = tl.load(win_k + cols, mask=col_ok, other=-2)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lid = tl.load(kv_list + j)
    i_lo = tl.load(rev_ptr + g * rev_gstride + lid)
    n_rev = tl.load(rev_ptr + g * rev_gstride + lid + 1) - i_lo
    # The item's steps are (head of the group, query tile of the reverse list) pairs, head-major;
    # part ``part`` takes an equal share of them (all of them when n_parts is 1).
    steps = HPG * n_rev
    for f in range(part * steps // n_parts, (part + 1) * steps // n_parts):
        h = g * HPG + f // n_rev
        t = tl.load(rev + i_lo + f % n_rev)
        rows = tl.load(tile_start + t) + tl.arange(0, BLOCK_M)
        row_ok = rows < tl.load(tile_end + t)
        q = _load_rows(Q, rows, row_ok, h, stride_qn, stride_qh, d, d_ok)
        do = _load_rows(DO, rows, row_ok, h, stride_qn, stride_qh, d, d_ok)
        lse = tl.load(LSE + rows.to(tl.int64) * n_heads + h, mask=row_ok, other=0.0)
        delta = tl.load(DELTA + rows.to(tl.int64) * n_heads + h, mask=row_ok, other=0.0)
        st = tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale  # [BLOCK_N, BLOCK_M]
        valid = col_ok[:, None] & row_ok[None, :]
        if MASK_WIN:
            valid = valid & (wk[:, None] == tl.load(win_q + rows, mask=row_ok, other=-1)[None, :])
        pt = tl.where(valid, tl.exp2(st - lse[None, :]), 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    offs = (
        cols.to(tl.int64)[:, None] * stride_kn + g * stride_kh + d[None, :] + part.to(tl.int64) * part_stride
    )
    mask = col_ok[:, None] & d_ok[None, :]
    tl.store(DK + offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
    tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=mask)


# Launch options per kernel and padded head dim (16..64 share one entry): key rows per step
# (BLOCK_N; None means the plan's key-tile size, which dK/dV must use), warps, pipeline stages.
# benchmarks/ssa_vs_dense.py --sweep measures the alternatives on the GPU at hand.
LAUNCH: dict[str, dict[int, dict]] = {
    "fwd": {
        64: {"BLOCK_N": None, "num_warps": 4, "num_stages": 3},
        128: {"BLOCK_N": None, "num_warps": 8, "num_stages": 2},
    },
    "dq": {
        64: {"BLOCK_N": None, "num_warps": 4, "num_stages": 2},
        128: {"BLOCK_N": None, "num_warps": 8, "num_stages": 2},
    },
    "dkdv": {64: {"num_warps": 4, "num_stages": 3}, 128: {"num_warps": 8, "num_stages": 2}},
}


def _launch_options(kernel: str, head_dim: int, plan: AttnPlan) -> dict:
    block_d = max(16, triton.next_power_of_2(head_dim))
    options = dict(LAUNCH[kernel][max(64, block_d)])
    if options.get("BLOCK_N") is None:
        options["BLOCK_N"] = plan.block_n
    return {"BLOCK_D": block_d, **options}


def _precision(dtype: torch.dtype) -> str:
    # float32 inputs get exact float32 products (they are the precision reference); 16-bit ones
    # run on the tensor cores in any case.
    return "ieee" if dtype == torch.float32 else "tf32"


def _window_ids(plan: AttnPlan, like: Tensor) -> tuple[Tensor, Tensor]:
    if plan.win_q is None:
        return like, like  # never read: MASK_WIN is off
    return plan.win_q, plan.win_k


def attention_forward(
    q: Tensor, k: Tensor, v: Tensor, plan: AttnPlan, block_m: int, scale: float, score: Tensor | None
) -> tuple[Tensor, Tensor]:
    """``(out[N, H, D], base-2 lse[N, H])``; adds block scores into ``score`` when given (compression)."""
    n, heads, head_dim = q.shape
    groups = k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(n, heads, dtype=torch.float32, device=q.device)
    n_tiles = len(plan.tile_start)
    if n_tiles == 0:
        return out, lse
    win_q, win_k = _window_ids(plan, plan.tile_start)
    _attn_fwd[(n_tiles, heads)](
        q, k, v, out, lse, score if score is not None else lse,
        plan.tile_start, plan.tile_end, plan.rng_ptr, plan.rng_start, plan.rng_end, plan.rng_gstride,
        win_q, win_k, plan.score_slot if score is not None else plan.tile_start, plan.score_width,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), out.stride(0), out.stride(1),
        heads, groups, scale * LOG2E, head_dim,
        HPG=heads // groups, BLOCK_M=block_m, MASK_WIN=plan.win_q is not None, SCORE_ON=score is not None,
        PRECISION=_precision(q.dtype), **_launch_options("fwd", head_dim, plan),
    )  # fmt: skip
    return out, lse


def _longest_first(plan: AttnPlan, groups: int) -> Tensor:
    """dK/dV work items ``tile * groups + group`` by decreasing reverse-list length.

    Selection lists are skewed (a block many tiles chose has a long one); blocks are scheduled in
    launch order, so starting the longest first keeps them from forming a tail.
    """
    list_ids = (
        torch.arange(groups, device=plan.kv_list.device)[None, :] * plan.rev_gstride + plan.kv_list[:, None]
    )
    lengths = (plan.rev_ptr[list_ids + 1] - plan.rev_ptr[list_ids]).flatten()
    return torch.argsort(lengths, descending=True, stable=True).to(torch.int32)


# dK/dV programs per SM to aim for. One program per (key tile, KV head) leaves an H100/H200 mostly
# idle when KV heads are few: the compression branch at 123k tokens with 2 KV heads launches 128
# programs on 132 SMs, each over 8 heads x 1,930 query tiles. With 16 KV heads the same branch
# launches 1,024 programs (~8 per SM) of 1,930 steps and runs at ~280 TFLOP/s (PERF.md); splitting
# the 2-head items into 8 parts restores exactly that launch.
DKDV_PROGRAMS_PER_SM = 8
# Parts per dK/dV work item; None: dkdv_split chooses (tests and benchmarks set it).
DKDV_SPLIT: int | None = None


def dkdv_split(items: int, device: torch.device) -> int:
    """Parts per dK/dV work item: as many as keep ``items * parts`` within ``DKDV_PROGRAMS_PER_SM``
    programs per SM on CUDA (1 for launches already that large), 2 in the interpreter (so that the
    CPU tests run the split path); :data:`DKDV_SPLIT` overrides."""
    if DKDV_SPLIT is not None:
        return DKDV_SPLIT
    if device.type != "cuda":
        return 2
    target = DKDV_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, target // items)


def attention_backward(
    q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, dout: Tensor, plan: AttnPlan, block_m: int,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:  # fmt: skip
    heads, head_dim = q.shape[1], q.shape[2]
    groups = k.shape[1]
    dout = dout.contiguous()
    delta = torch.empty_like(lse)  # written by the dQ kernel
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    win_q, win_k = _window_ids(plan, plan.tile_start)
    common = {
        "HPG": heads // groups,
        "BLOCK_M": block_m,
        "MASK_WIN": plan.win_q is not None,
        "PRECISION": _precision(q.dtype),
    }
    if len(plan.tile_start):
        _attn_bwd_dq[(len(plan.tile_start), heads)](
            q, k, v, out, dout, dq, lse, delta,
            plan.tile_start, plan.tile_end, plan.rng_ptr, plan.rng_start, plan.rng_end, plan.rng_gstride,
            win_q, win_k, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            heads, scale * LOG2E, scale, head_dim, **common, **_launch_options("dq", head_dim, plan),
        )  # fmt: skip
    items = len(plan.kv_start) * groups
    if items:
        parts = dkdv_split(items, q.device)
        # Parts write float32 partial sums [parts, M, G, D], added afterwards in PyTorch rather than
        # by atomics: the gradient stays deterministic, and the buffers stay small: a key tile holds
        # <= BLOCK_N rows, so M * G <= items * BLOCK_N and parts * M * G <= target * BLOCK_N rows
        # (1,056 x 64 rows of D 64: 35 MB for dK and dV together on 132 SMs).
        dk_parts, dv_parts = (
            (dk, dv) if parts == 1 else (x.new_empty(parts, *x.shape, dtype=torch.float32) for x in (k, v))
        )
        _attn_bwd_dkdv[(items * parts,)](
            q, k, v, dout, dk_parts, dv_parts, lse, delta,
            plan.tile_start, plan.tile_end, plan.kv_start, plan.kv_end, plan.kv_list, plan.rev_ptr, plan.rev,
            plan.rev_gstride, win_q, win_k, _longest_first(plan, groups), q.stride(0), q.stride(1), k.stride(0),
            k.stride(1), k.numel(), heads, groups, parts, scale * LOG2E, scale, head_dim, **common,
            **_launch_options("dkdv", head_dim, plan),
        )  # fmt: skip
        if parts > 1:
            dk, dv = dk_parts.sum(0).to(k.dtype), dv_parts.sum(0).to(v.dtype)
    return dq, dk, dv


class RangeAttention(torch.autograd.Function):
    """Autograd wrapper: ``q[N, H, D]`` attends ``k, v[M, G, D]`` as ``plan`` says; contiguous inputs."""

    @staticmethod
    def forward(ctx, q, k, v, plan: AttnPlan, block_m: int, scale: float, score: Tensor | None):  # type: ignore[override]
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = attention_forward(q, k, v, plan, block_m, scale, score)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.plan, ctx.block_m, ctx.scale = plan, block_m, scale
        return out

    @staticmethod
    def backward(ctx, dout):  # type: ignore[override]
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = attention_backward(q, k, v, out, lse, dout, ctx.plan, ctx.block_m, ctx.scale)
        return dq, dk, dv, None, None, None, None

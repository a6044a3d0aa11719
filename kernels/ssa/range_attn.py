"""Triton kernels of SSA: block-sparse softmax attention of query tiles over lists of key row ranges.

One kernel family serves all three branches (:mod:`meshforge.kernels.ssa.plans` says how): a
program owns a query tile of ``BLOCK_M`` rows and one head and walks its key ranges ``BLOCK_N`` rows
at a time, with the online softmax of FlashAttention in base 2 (``exp2`` of log2e-scaled logits;
the saved log-sum-exp is base 2 too). Backward is FlashAttention-2's split: one kernel for dQ over
the same ranges, one for dK/dV per work item (key tile, KV head) over the reverse list of query
tiles that read it and all heads of the GQA group, so every gradient row has a single writer. Work items
differ widely in length (few KV heads make long ones; a selection block many tiles chose has a long
reverse list), so :func:`dkdv_schedule` cuts the long ones into pieces of at most ``cap`` (head,
query tile) steps; a split item's pieces write float32 partial sums that a second kernel adds in a
fixed order (deterministic, no atomics).

Masked logits are a large finite negative rather than -inf: a row whose first key chunk is
entirely masked (window branch) then accumulates junk with weight 1, which the rescale factor
``exp2(-1e30 - m)`` = 0 wipes as soon as a real key arrives; every real row has one.

The compression branch also scores selection blocks: after its forward pass, a second pass over
the same keys recomputes the normalised probabilities and adds their column sums over the tile into
``score[tile, group, selection block of the key]`` (the paper's summed compression scores).
"""

from __future__ import annotations

from dataclasses import dataclass

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
    Q, K, V, DO, DK, DV, PART_DK, PART_DV, LSE, DELTA,
    tile_start, tile_end, kv_start, kv_end, kv_list, rev_ptr, rev, rev_gstride, win_q, win_k,
    piece_item, piece_lo, piece_hi, piece_slot,
    stride_qn, stride_qh, stride_kn, stride_kh,
    n_heads, n_groups, qk_scale, sm_scale, head_dim,
    HPG: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    MASK_WIN: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # K, V, DK and DV share one layout (contiguous [M, G, D]); Q and DO another. PART_DK and PART_DV
    # are float32 [slots, BLOCK_N, head_dim]: the partial sums of split items (DkdvSchedule).
    p = tl.program_id(0)
    item = tl.load(piece_item + p)  # (key tile, group) pair
    if item < 0:
        return  # past the last piece: the launch is an upper bound on their number
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
    # this piece takes the run piece_lo .. piece_hi of them.
    for f in range(tl.load(piece_lo + p), tl.load(piece_hi + p)):
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
    mask = col_ok[:, None] & d_ok[None, :]
    slot = tl.load(piece_slot + p)
    if slot < 0:  # the item's only piece: the gradient itself
        offs = cols.to(tl.int64)[:, None] * stride_kn + g * stride_kh + d[None, :]
        tl.store(DK + offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=mask)
        tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=mask)
    else:
        offs = (slot.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N))[:, None] * head_dim + d[None, :]
        tl.store(PART_DK + offs, dk, mask=mask)
        tl.store(PART_DV + offs, dv, mask=mask)


@triton.jit
def _dkdv_reduce(
    DK, DV, PART_DK, PART_DV, kv_start, kv_end, split_item, split_slot, split_pieces,
    stride_kn, stride_kh, n_groups, sm_scale, head_dim,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One split item: the sum of its pieces' partials, in piece order, scaled and cast into dK/dV."""
    s = tl.program_id(0)
    item = tl.load(split_item + s)
    if item < 0:
        return  # past the last split item
    j = item // n_groups
    g = item % n_groups
    cols = tl.load(kv_start + j) + tl.arange(0, BLOCK_N)
    d = tl.arange(0, BLOCK_D)
    mask = (cols < tl.load(kv_end + j))[:, None] & (d < head_dim)[None, :]
    part_rows = tl.load(split_slot + s).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    part = part_rows[:, None] * head_dim + d[None, :]
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for _piece in range(tl.load(split_pieces + s)):
        dk += tl.load(PART_DK + part, mask=mask, other=0.0)
        dv += tl.load(PART_DV + part, mask=mask, other=0.0)
        part += BLOCK_N * head_dim
    offs = cols.to(tl.int64)[:, None] * stride_kn + g * stride_kh + d[None, :]
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


# dK/dV programs per SM to aim for. One program per (key tile, KV head) leaves an H100/H200 mostly
# idle when KV heads are few: the compression branch at 123k tokens with 2 KV heads has 128 work
# items on 132 SMs, each over 8 heads x 1,930 query tiles. With 16 KV heads the same branch launches
# 1,024 programs (~8 per SM) of 1,930 steps and runs at ~280 TFLOP/s (PERF.md); a cap of total
# steps / (8 x SMs) restores about that launch whatever the KV heads, and evens out skewed lists.
DKDV_PROGRAMS_PER_SM = 8
# Fewest steps a cap allows. A split item's piece pays a round trip of float32 partials (dK and dV
# written and read back: 4 x BLOCK_N x D x 4 bytes, 64 KB at 64 x 64, the Q/dO loads of 4 steps)
# and a second K/V load; pieces are equal shares of their item, so under a cap of >= 32 each has more
# than 16 steps, keeping that overhead a small part of its work; items of <= 32 steps are never
# split, however small the launch.
DKDV_MIN_STEPS = 32
# A fixed cap (steps per piece) instead of the computed one, for tests and comparisons; it costs
# one host sync per call (the launch size needs the total steps).
DKDV_CAP: int | None = None
DKDV_NO_SPLIT = 2**40  # a cap above every item's steps: one program per work item (for comparisons)


@dataclass(frozen=True)
class DkdvSchedule:
    """The dK/dV launch: pieces (runs of a work item's steps), longest first, and the split items.

    Work item ``j * groups + g`` is key tile j of KV group g; its steps are (head of the group,
    query tile of its reverse list) pairs. The arrays have fixed sizes, upper bounds on the counts,
    so building them needs no device-host sync; entries past the real ones hold item -1 and their
    programs exit at once.
    """

    cap: Tensor  # 0-d int64: most steps of a piece
    piece_item: Tensor  # int32 [P]: the piece's work item, -1 past the last piece
    piece_lo: Tensor  # int32 [P]: its steps lo .. hi of the item
    piece_hi: Tensor
    piece_slot: Tensor  # int32 [P]: its row block of the partial sums; -1: the item's only piece
    split_item: Tensor  # int32 [S]: the items of several pieces, -1 past the last
    split_slot: Tensor  # int32 [S]: their first slot (an item's pieces hold consecutive ones)
    split_pieces: Tensor  # int32 [S]
    n_slots: int  # partial-sum slots to allocate

    def counts(self) -> dict[str, int]:
        """Cap, pieces and split items as numbers (a host sync: for reports)."""
        return {"cap": int(self.cap), "pieces": int((self.piece_item >= 0).sum()),
                "split_items": int((self.split_item >= 0).sum())}  # fmt: skip


def _sm_count(device: torch.device) -> int:
    # The interpreter runs one program at a time: one SM.
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def dkdv_steps(plan: AttnPlan, groups: int, heads_per_group: int) -> Tensor:
    """int64 ``[key tiles * groups]``: steps of each dK/dV work item, heads of the group x reverse list."""
    list_ids = (
        torch.arange(groups, device=plan.kv_list.device)[None, :] * plan.rev_gstride + plan.kv_list[:, None]
    )
    return heads_per_group * (plan.rev_ptr[list_ids + 1] - plan.rev_ptr[list_ids]).flatten().long()


def dkdv_schedule(plan: AttnPlan, groups: int, heads_per_group: int, device: torch.device) -> DkdvSchedule:
    """Cut the dK/dV work items into pieces of at most ``cap`` steps, equal shares of their item.

    ``cap = max(DKDV_MIN_STEPS, ceil(total steps / (DKDV_PROGRAMS_PER_SM x SMs)))`` (:data:`DKDV_CAP`
    overrides it). Then ``sum(ceil(steps / cap)) <= items + total / cap <= items + target``: that
    many programs are launched; split items (> cap steps each) number < total / cap <= target and
    hold < 2 total / cap pieces. Pieces run longest first: blocks are scheduled in launch order, so
    the long ones do not form a tail.
    """
    steps = dkdv_steps(plan, groups, heads_per_group)
    items = len(steps)
    total = steps.sum()
    if DKDV_CAP is None:
        target = DKDV_PROGRAMS_PER_SM * _sm_count(device)
        cap = ((total + target - 1) // target).clamp(min=DKDV_MIN_STEPS)
        spare = target  # >= total / cap
    else:
        cap = torch.tensor(DKDV_CAP, device=steps.device)
        spare = -(-int(total) // DKDV_CAP)  # a host sync, for the override only
    pieces = ((steps + cap - 1) // cap).clamp(min=1)  # an item of no steps still writes its zeros
    ends = pieces.cumsum(0)
    owner = torch.searchsorted(ends, torch.arange(items + spare, device=steps.device), right=True)
    real = owner < items
    owner = owner.clamp(max=items - 1)
    n, s = pieces[owner], steps[owner]
    nth = torch.arange(items + spare, device=steps.device) - ends[owner] + n
    lo, hi = nth * s // n, (nth + 1) * s // n
    split = pieces > 1
    split_pieces = torch.where(split, pieces, 0)
    first_slot = split_pieces.cumsum(0) - split_pieces
    slot = torch.where(split[owner], first_slot[owner] + nth, -1)
    order = torch.argsort(torch.where(real, hi - lo, -1), descending=True, stable=True)
    split_ids = torch.argsort((~split).to(torch.uint8), stable=True)[: min(items, spare)]
    return DkdvSchedule(
        cap,
        *(x[order].to(torch.int32) for x in (torch.where(real, owner, -1), lo, hi, slot)),
        torch.where(split[split_ids], split_ids, -1).to(torch.int32),
        first_slot[split_ids].to(torch.int32),
        pieces[split_ids].to(torch.int32),
        spare + min(items, spare),
    )


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
    if len(plan.kv_start):
        # Every layer's backward runs the same compression and window plans: one schedule each.
        key = ("dkdv", groups, heads // groups, DKDV_CAP, DKDV_PROGRAMS_PER_SM)
        if key not in plan.cache:
            plan.cache[key] = dkdv_schedule(plan, groups, heads // groups, q.device)
        sched = plan.cache[key]
        options = _launch_options("dkdv", head_dim, plan)
        # Partial sums of split items, added by _dkdv_reduce rather than by atomics: the gradient
        # stays deterministic. < 2 x target slots of BLOCK_N rows: 2,112 x 64 rows of D 64 on 132
        # SMs, 69 MB for dK and dV together.
        part_dk, part_dv = (
            torch.empty(sched.n_slots, plan.block_n, head_dim, dtype=torch.float32, device=q.device)
            for _ in "kv"
        )
        _attn_bwd_dkdv[(len(sched.piece_item),)](
            q, k, v, dout, dk, dv, part_dk, part_dv, lse, delta,
            plan.tile_start, plan.tile_end, plan.kv_start, plan.kv_end, plan.kv_list, plan.rev_ptr, plan.rev,
            plan.rev_gstride, win_q, win_k, sched.piece_item, sched.piece_lo, sched.piece_hi, sched.piece_slot,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            heads, groups, scale * LOG2E, scale, head_dim, **common, **options,
        )  # fmt: skip
        _dkdv_reduce[(len(sched.split_item),)](
            dk, dv, part_dk, part_dv, plan.kv_start, plan.kv_end, sched.split_item, sched.split_slot,
            sched.split_pieces, k.stride(0), k.stride(1), groups, scale, head_dim,
            BLOCK_N=plan.block_n, BLOCK_D=options["BLOCK_D"],
        )  # fmt: skip
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

"""Split-K decoding attention in Triton (see :mod:`meshforge.kernels.decode_attention`).

One program per (sequence x head, slice of the key axis) reduces its slice, up to the valid length
read from memory, to a running max, a softmax denominator and a weighted value sum; a second
kernel merges the slices. Slices past the length store an empty partial and cost one load, so the
work follows the valid length, not the cache's size.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_N = 64  # keys per inner iteration
MIN_SPLIT = 256  # keys per slice at least: below that the merge costs more than the parallelism buys
MAX_SPLITS = 128  # slices per sequence x head at most (the merge kernel holds them all at once)

def split_size(max_len: int) -> int:
    """Keys per slice for caches of ``max_len`` positions: a multiple of BLOCK_N, at most MAX_SPLITS slices."""
    size = max(MIN_SPLIT, -(-max_len // MAX_SPLITS))
    return BLOCK_N * -(-size // BLOCK_N)


@triton.jit
def _partial_kernel(
    q_ptr, k_ptr, v_ptr, length_ptr, m_ptr, l_ptr, acc_ptr,
    n_heads, stride_qb, stride_qh, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn,
    n_splits, scale,
    SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
):
    seq_head = tl.program_id(0)
    split = tl.program_id(1)
    b = seq_head // n_heads
    h = seq_head % n_heads
    length = tl.load(length_ptr).to(tl.int32)
    start = split * SPLIT
    end = tl.minimum(start + SPLIT, length)

    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d, mask=d_ok, other=0.0).to(tl.float32) * scale
    k_base = k_ptr + b.to(tl.int64) * stride_kb + h * stride_kh
    v_base = v_ptr + b.to(tl.int64) * stride_vb + h * stride_vh
    # Running max and denominator as one-element blocks: loop-carried values keep one type.
    m = tl.full([1], -float("inf"), tl.float32)
    denom = tl.zeros([1], tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for key0 in range(start, end, BLOCK_N):
        keys = key0 + tl.arange(0, BLOCK_N)
        key_ok = keys < end
        tile_mask = key_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + keys[:, None] * stride_kn + d[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        logits = tl.where(key_ok, tl.sum(k * q[None, :], axis=1), -float("inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=0))
        p = tl.exp(logits - m_new)
        rescale = tl.exp(m - m_new)
        v = tl.load(v_base + keys[:, None] * stride_vn + d[None, :], mask=tile_mask, other=0.0).to(tl.float32)
        denom = denom * rescale + tl.sum(p, axis=0)
        acc = acc * rescale + tl.sum(p[:, None] * v, axis=0)
        m = m_new
    slot = seq_head * n_splits + split
    one = tl.arange(0, 1)
    tl.store(m_ptr + slot + one, m)
    tl.store(l_ptr + slot + one, denom)
    tl.store(acc_ptr + slot * HEAD_DIM + d, acc, mask=d_ok)


@triton.jit
def _merge_kernel(
    m_ptr, l_ptr, acc_ptr, out_ptr, n_heads, stride_ob, stride_oh, n_splits,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
):
    seq_head = tl.program_id(0)
    s = tl.arange(0, BLOCK_S)
    s_ok = s < n_splits
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    slots = seq_head * n_splits + s
    m = tl.load(m_ptr + slots, mask=s_ok, other=-float("inf"))
    weight = tl.exp(m - tl.max(m, axis=0))  # slice 0 always holds a key, so the max is finite
    denom = tl.sum(weight * tl.load(l_ptr + slots, mask=s_ok, other=0.0), axis=0)
    acc = tl.load(acc_ptr + slots[:, None] * HEAD_DIM + d[None, :], mask=s_ok[:, None] & d_ok[None, :], other=0.0)
    out = tl.sum(weight[:, None] * acc, axis=0) / denom
    b = seq_head // n_heads
    h = seq_head % n_heads
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def decode_attention_triton(q: Tensor, k_cache: Tensor, v_cache: Tensor, length: Tensor) -> Tensor:
    """Split-K decoding attention (module docstring); ``length`` is read by the kernel, not the host."""
    batch, heads, head_dim = q.shape
    max_len = k_cache.shape[2]
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1 or q.stride(-1) != 1:
        raise ValueError("decode_attention_triton needs a contiguous last (head) dimension")
    split = split_size(max_len)
    n_splits = -(-max_len // split)
    partial_m = torch.empty(batch * heads * n_splits, device=q.device, dtype=torch.float32)
    partial_l = torch.empty_like(partial_m)
    partial_acc = torch.empty(batch * heads * n_splits, head_dim, device=q.device, dtype=torch.float32)
    block_d = triton.next_power_of_2(head_dim)
    _partial_kernel[(batch * heads, n_splits)](
        q, k_cache, v_cache, length, partial_m, partial_l, partial_acc,
        heads, q.stride(0), q.stride(1), *k_cache.stride()[:3], *v_cache.stride()[:3],
        n_splits, head_dim**-0.5,
        SPLIT=split, BLOCK_N=BLOCK_N, HEAD_DIM=head_dim, BLOCK_D=block_d, num_warps=2,
    )
    out = torch.empty_like(q)
    _merge_kernel[(batch * heads,)](
        partial_m, partial_l, partial_acc, out, heads, out.stride(0), out.stride(1), n_splits,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=triton.next_power_of_2(n_splits), num_warps=2,
    )
    return out


__all__ = ["BLOCK_N", "decode_attention_triton", "split_size"]

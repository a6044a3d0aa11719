"""Triton forms of :mod:`meshforge.kernels.decode_step`: one program per (sequence, head).

A head's ``q, k`` are loaded as two halves, which is what the rotate-half rotation mixes; a
linear block's ``D x D`` state is read and written as the matching two row blocks.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _load_rotated(ptr, half, cos_lo, cos_hi, sin_lo, sin_hi, HALF: tl.constexpr):
    """The halves of ``x * cos + rotate_half(x) * sin`` at ``ptr``, rounded to the input's dtype."""
    lo = tl.load(ptr + half).to(tl.float32)
    hi = tl.load(ptr + HALF + half).to(tl.float32)
    dtype = ptr.dtype.element_ty
    return (lo * cos_lo - hi * sin_lo).to(dtype).to(tl.float32), (hi * cos_hi + lo * sin_hi).to(dtype).to(tl.float32)


@triton.jit
def _load_head(qkv_ptr, cos_ptr, sin_ptr, b, h, stride_b, stride_part, stride_h, HEAD_DIM: tl.constexpr, HALF: tl.constexpr):
    """Sequence ``b``, head ``h`` of ``qkv``: the rotated halves of q and k, and v (all float32)."""
    half = tl.arange(0, HALF)
    cos_lo, cos_hi = tl.load(cos_ptr + half), tl.load(cos_ptr + HALF + half)
    sin_lo, sin_hi = tl.load(sin_ptr + half), tl.load(sin_ptr + HALF + half)
    base = qkv_ptr + b * stride_b + h * stride_h
    q_lo, q_hi = _load_rotated(base, half, cos_lo, cos_hi, sin_lo, sin_hi, HALF)
    k_lo, k_hi = _load_rotated(base + stride_part, half, cos_lo, cos_hi, sin_lo, sin_hi, HALF)
    v = tl.load(base + 2 * stride_part + tl.arange(0, HEAD_DIM)).to(tl.float32)
    return q_lo, q_hi, k_lo, k_hi, v


@triton.jit
def _linear_step_kernel(
    qkv_ptr, cos_ptr, sin_ptr, decay_ptr, state_ptr, weight_ptr, out_ptr,
    n_heads, stride_b, stride_part, stride_h, scale, eps,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
):
    seq_head = tl.program_id(0)
    h = seq_head % n_heads
    half = tl.arange(0, HALF)
    d = tl.arange(0, HEAD_DIM)
    q_lo, q_hi, k_lo, k_hi, v = _load_head(
        qkv_ptr, cos_ptr, sin_ptr, seq_head // n_heads, h, stride_b, stride_part, stride_h, HEAD_DIM, HALF
    )
    decay = tl.load(decay_ptr + h)

    rows_lo = state_ptr + seq_head.to(tl.int64) * HEAD_DIM * HEAD_DIM + half[:, None] * HEAD_DIM + d[None, :]
    rows_hi = rows_lo + HALF * HEAD_DIM
    state_lo = decay * tl.load(rows_lo) + k_lo[:, None] * v[None, :]
    state_hi = decay * tl.load(rows_hi) + k_hi[:, None] * v[None, :]
    tl.store(rows_lo, state_lo)
    tl.store(rows_hi, state_hi)

    out = scale * (tl.sum(q_lo[:, None] * state_lo, axis=0) + tl.sum(q_hi[:, None] * state_hi, axis=0))
    out = out.to(out_ptr.dtype.element_ty).to(tl.float32)  # the reference normalises the step's rounded output
    inv_rms = 1.0 / tl.sqrt(tl.sum(out * out, axis=0) / HEAD_DIM + eps)
    normed = out * inv_rms * tl.load(weight_ptr + d).to(tl.float32)
    tl.store(out_ptr + seq_head * HEAD_DIM + d, normed.to(out_ptr.dtype.element_ty))


@triton.jit
def _kv_append_kernel(
    qkv_ptr, cos_ptr, sin_ptr, k_ptr, v_ptr, index_ptr, q_out_ptr,
    n_heads, stride_b, stride_part, stride_h, stride_cb, stride_ch, stride_cn,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
):
    seq_head = tl.program_id(0)
    b = seq_head // n_heads
    h = seq_head % n_heads
    half = tl.arange(0, HALF)
    d = tl.arange(0, HEAD_DIM)
    q_lo, q_hi, k_lo, k_hi, v = _load_head(qkv_ptr, cos_ptr, sin_ptr, b, h, stride_b, stride_part, stride_h, HEAD_DIM, HALF)

    slot = b.to(tl.int64) * stride_cb + h * stride_ch + tl.load(index_ptr).to(tl.int64) * stride_cn
    cache_dtype = k_ptr.dtype.element_ty
    tl.store(k_ptr + slot + half, k_lo.to(cache_dtype))
    tl.store(k_ptr + slot + HALF + half, k_hi.to(cache_dtype))
    tl.store(v_ptr + slot + d, v.to(cache_dtype))
    q_dtype = q_out_ptr.dtype.element_ty
    tl.store(q_out_ptr + seq_head * HEAD_DIM + half, q_lo.to(q_dtype))
    tl.store(q_out_ptr + seq_head * HEAD_DIM + HALF + half, q_hi.to(q_dtype))


def _check(qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[int, int, int]:
    batch, three, heads, head_dim = qkv.shape
    if three != 3 or qkv.stride(-1) != 1 or head_dim < 2 or head_dim & (head_dim - 1):
        raise ValueError(f"qkv must be [B, 3, H, D] with unit stride on D, a power of two; got {tuple(qkv.shape)}")
    if cos.numel() != head_dim or sin.numel() != head_dim or cos.dtype != torch.float32 or sin.dtype != torch.float32:
        raise ValueError("rotary tables must hold one float32 row of the head width")
    return batch, heads, head_dim


def linear_decode_step_triton(
    qkv: Tensor, cos: Tensor, sin: Tensor, decay: Tensor, state: Tensor, norm_weight: Tensor, eps: float
) -> Tensor:
    batch, heads, head_dim = _check(qkv, cos, sin)
    if state.shape != (batch, heads, head_dim, head_dim) or state.dtype != torch.float32 or not state.is_contiguous():
        raise ValueError(f"state must be a contiguous float32 [B, H, D, D] = {(batch, heads, head_dim, head_dim)}")
    out = torch.empty(batch, heads, head_dim, device=qkv.device, dtype=qkv.dtype)
    _linear_step_kernel[(batch * heads,)](
        qkv, cos.contiguous(), sin.contiguous(), decay.contiguous(), state, norm_weight.contiguous(), out,
        heads, qkv.stride(0), qkv.stride(1), qkv.stride(2), head_dim**-0.5, eps,
        HEAD_DIM=head_dim, HALF=head_dim // 2,
    )  # fmt: skip
    return out


def rotary_kv_append_triton(
    qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, index: Tensor
) -> Tensor:
    batch, heads, head_dim = _check(qkv, cos, sin)
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("k and v caches must share one [B, H, L_max, D] layout with unit stride on D")
    if k_cache.shape[:2] != (batch, heads) or k_cache.shape[-1] != head_dim:
        raise ValueError(f"caches {tuple(k_cache.shape)} do not match qkv {tuple(qkv.shape)}")
    q = torch.empty(batch, heads, head_dim, device=qkv.device, dtype=qkv.dtype)
    _kv_append_kernel[(batch * heads,)](
        qkv, cos.contiguous(), sin.contiguous(), k_cache, v_cache, index, q,
        heads, qkv.stride(0), qkv.stride(1), qkv.stride(2), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        HEAD_DIM=head_dim, HALF=head_dim // 2,
    )  # fmt: skip
    return q

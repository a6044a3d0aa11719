"""A fused projection's ``qkv`` -> rotated ``q, k`` and ``v``, contiguous, in one Triton kernel each way.

Eagerly, :func:`meshforge.kernels.rotary.rotate_qk_reference` launches 5 kernels forward (the float32
copy, the negated half, their concatenation, two products with the rounding back) and ~10 backward,
and the linear-attention kernels then copy the strided ``q, k, v`` slices of ``qkv`` into contiguous
tensors: host time that a host-bound training step at short lengths
pays in every block. Here a program takes ``ROWS`` tokens, all heads, both halves of each head:

    forward:   q1 = x1 c1 - x2 s1,  q2 = x2 c2 + x1 s2   (the same for k; v copied)
    backward:  dx1 = dq1 c1 + dq2 s2,  dx2 = dq2 c2 - dq1 s1   (the transpose; dv copied)

with ``c1, c2`` / ``s1, s2`` the halves of the full-width tables, in float32, rounded once to the
output's dtype as the reference rounds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

ELEMENTS_PER_PROGRAM = 2048  # of one half-head tile: ROWS * BLOCK_H * BLOCK_HALF


@triton.jit
def _rotate_pair(src_ptr, dst_ptr, src_offsets, dst_offsets, tile, c1, c2, s1, s2, HALF: tl.constexpr,
                 TRANSPOSE: tl.constexpr):  # fmt: skip
    x1 = tl.load(src_ptr + src_offsets, mask=tile, other=0.0).to(tl.float32)
    x2 = tl.load(src_ptr + src_offsets + HALF, mask=tile, other=0.0).to(tl.float32)
    if TRANSPOSE:
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(dst_ptr + dst_offsets, y1.to(dst_ptr.dtype.element_ty), mask=tile)
    tl.store(dst_ptr + dst_offsets + HALF, y2.to(dst_ptr.dtype.element_ty), mask=tile)


@triton.jit
def _copy_pair(src_ptr, dst_ptr, src_offsets, dst_offsets, tile, HALF: tl.constexpr):
    tl.store(dst_ptr + dst_offsets, tl.load(src_ptr + src_offsets, mask=tile), mask=tile)
    tl.store(dst_ptr + dst_offsets + HALF, tl.load(src_ptr + src_offsets + HALF, mask=tile), mask=tile)


@triton.jit
def _rotary_kernel(
    src_q, src_k, src_v, dst_q, dst_k, dst_v, cos_ptr, sin_ptr, n_tokens, seq_len, src_stride, dst_stride,
    HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, ROWS: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr, TRANSPOSE: tl.constexpr,
):  # fmt: skip
    HALF = HEAD_DIM // 2
    tokens = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    rows_in = (tokens < n_tokens)[:, None, None] & (cols < HALF)[None, None, :]
    tile = rows_in & (heads < HEADS)[None, :, None]
    token64 = tokens.to(tl.int64)[:, None, None]
    within = heads[None, :, None] * HEAD_DIM + cols[None, None, :]
    src_offsets = token64 * src_stride + within
    dst_offsets = token64 * dst_stride + within
    table = (tokens % seq_len).to(tl.int64)[:, None, None] * HEAD_DIM + cols[None, None, :]
    c1 = tl.load(cos_ptr + table, mask=rows_in, other=0.0)
    c2 = tl.load(cos_ptr + table + HALF, mask=rows_in, other=0.0)
    s1 = tl.load(sin_ptr + table, mask=rows_in, other=0.0)
    s2 = tl.load(sin_ptr + table + HALF, mask=rows_in, other=0.0)
    _rotate_pair(src_q, dst_q, src_offsets, dst_offsets, tile, c1, c2, s1, s2, HALF, TRANSPOSE)
    _rotate_pair(src_k, dst_k, src_offsets, dst_offsets, tile, c1, c2, s1, s2, HALF, TRANSPOSE)
    _copy_pair(src_v, dst_v, src_offsets, dst_offsets, tile, HALF)


def _launch(sources: tuple[Tensor, ...], targets: tuple[Tensor, ...], cos: Tensor, sin: Tensor,
            src_stride: int, dst_stride: int, shape: torch.Size, transpose: bool) -> None:  # fmt: skip
    batch, seq_len, heads, head_dim = shape
    n_tokens = batch * seq_len
    block_h, block_half = triton.next_power_of_2(heads), triton.next_power_of_2(head_dim // 2)
    rows = max(1, min(ELEMENTS_PER_PROGRAM // (block_h * block_half), triton.next_power_of_2(n_tokens)))
    _rotary_kernel[(triton.cdiv(n_tokens, rows),)](
        *sources, *targets, cos, sin, n_tokens, seq_len, src_stride, dst_stride,
        HEADS=heads, HEAD_DIM=head_dim, ROWS=rows, BLOCK_H=block_h, BLOCK_HALF=block_half, TRANSPOSE=transpose,
    )  # fmt: skip


def _split(qkv: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Views of ``qkv [B, T, 3, H, D]``'s three parts: the kernels take their pointers, ``qkv``'s strides."""
    return qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]


class _RotateQK(torch.autograd.Function):
    """An autograd.Function, not a custom op: only eager code runs it (a custom op's dispatch costs
    the host ~3x more, see :mod:`meshforge.kernels.rms_norm.fused`); compiled code runs the reference."""

    @staticmethod
    def forward(ctx, qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        batch, seq_len, _, heads, head_dim = qkv.shape
        shape = torch.Size((batch, seq_len, heads, head_dim))
        outputs = tuple(torch.empty(shape, device=qkv.device, dtype=qkv.dtype) for _ in range(3))
        _launch(_split(qkv), outputs, cos, sin, 3 * heads * head_dim, heads * head_dim, shape, transpose=False)
        ctx.save_for_backward(cos, sin)
        ctx.shape, ctx.dtype = shape, qkv.dtype
        return outputs

    @staticmethod
    def backward(ctx, dq: Tensor, dk: Tensor, dv: Tensor) -> tuple[Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        batch, seq_len, heads, head_dim = ctx.shape
        grads = tuple(torch.zeros(ctx.shape, device=cos.device, dtype=ctx.dtype) if g is None else g.contiguous()
                      for g in (dq, dk, dv))  # fmt: skip
        dqkv = torch.empty(batch, seq_len, 3, heads, head_dim, device=cos.device, dtype=ctx.dtype)
        _launch(grads, _split(dqkv), cos, sin, heads * head_dim, 3 * heads * head_dim, ctx.shape, transpose=True)
        return dqkv, None, None


def rotate_qk_triton(qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``qkv [B, T, 3, H, D]`` -> rotated ``q, k`` and ``v``, each ``[B, T, H, D]`` contiguous in
    ``qkv.dtype``; ``cos, sin [T, D]`` (float32, :class:`meshforge.models.layers.Rotary`'s tables)."""
    if qkv.ndim != 5 or qkv.shape[2] != 3 or qkv.shape[-1] % 2:
        raise ValueError(f"rotate_qk: qkv must be [B, T, 3, H, D] with D even, got {tuple(qkv.shape)}")
    if cos.shape != (qkv.shape[1], qkv.shape[-1]) or sin.shape != cos.shape:
        raise ValueError(f"rotate_qk: tables of {tuple(cos.shape)} / {tuple(sin.shape)} for {qkv.shape[1]} positions of {qkv.shape[-1]}")
    if qkv.numel() == 0:
        return tuple(qkv[:, :, i].contiguous() for i in range(3))
    return _RotateQK.apply(qkv.contiguous(), cos.float().contiguous(), sin.float().contiguous())


__all__ = ["rotate_qk_triton"]

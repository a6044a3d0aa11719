"""The decay-masked parallel form of linear attention, fused in Triton (see :mod:`meshforge.kernels.linear_attention`).

``O = scale * ((Q K^T) * W) V`` with ``W[t, j] = exp(-s_h (t - j))`` for ``j <= t``, else 0: a
FlashAttention-style forward without the softmax. One program per (query block, batch x head)
walks the key blocks up to the diagonal, so the ``[T, T]`` weights never reach memory and the
memory cost is ``O(T D)`` in forward and backward (the backward recomputes the scores, as
FlashAttention does). With no softmax there are no row statistics to keep: the backward is two
kernels, one per key block (``dK, dV``, walking the queries at and after it) and one per query block
(``dQ = ((dO V^T) * W) K``: the forward's own kernel, given ``dO, V, K`` for ``Q, K, V``).

The decay of a tile off the diagonal factorises around one position ``r`` between its queries and
keys, ``W[i, j] = 2^(-rate (i - r)) 2^(-rate (r - j))`` with both exponents >= 0 (``rate = s log2 e``;
no overflow, and a factor underflows only where the whole weight does): the key factor scales the
scores, the query factor (or in ``dK, dV`` the key factor) the accumulator once after the loop. An
off-diagonal tile thus costs ``BLOCK`` exponentials instead of ``BLOCK^2``; at head dim 32 the
``BLOCK^2`` exponentials of an unfactorised mask would take longer on the special-function units
than the tile's two matmuls on the tensor cores. Only the diagonal tile builds its mask in full.

Key blocks far behind a query block are skipped: a weight ``exp(-s d)`` with ``s d log2(e) > 126``
is below float32's smallest normal number (``2^-126``), so for head h only the last
``126 / (s_h log2 e)`` keys can contribute anything above underflow (123 positions for iFlame's
fastest head at 16 heads, 22k for its slowest). The fast-forgetting heads are therefore banded,
at no cost in accuracy.

Scores and the decay are float32; ``P`` is cast to the value dtype before ``P V`` (as
FlashAttention does with its probabilities), and every product accumulates in float32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK = 64  # queries and keys per tile (one tile size: the backward's loops start on the diagonal block)
UNDERFLOW_LOG2 = tl.constexpr(126.0)  # weights below 2^-126 (float32's smallest normal) are skipped
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _reach(rate, seq_len):
    """Largest distance whose weight ``2^(-rate d)`` can be a normal float32 (``rate`` in log2 units)."""
    # at most seq_len, also at rate 0
    return (1.0 / tl.maximum(rate / UNDERFLOW_LOG2, 1.0 / seq_len)).to(tl.int32)


@triton.jit
def _weights(rows, cols, rate):
    """The decay mask ``W[rows, cols]`` of a diagonal tile, float32."""
    distance = (rows[:, None] - cols[None, :]).to(tl.float32)
    # clamped: no inf above the diagonal, even where it is masked
    return tl.where(distance >= 0, tl.exp2(-rate * tl.maximum(distance, 0.0)), 0.0)


@triton.jit
def _decay(distance, rate):
    """``2^(-rate distance)`` for distances >= 0: at most 1."""
    return tl.exp2(-rate * distance.to(tl.float32))


@triton.jit
def _forward_kernel(
    q_ptr, k_ptr, v_ptr, o_ptr, slope_ptr, seq_len, n_heads, stride_b, stride_t, stride_h, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK
    bh = tl.program_id(1)
    h = bh % n_heads
    base = (bh // n_heads).to(tl.int64) * stride_b + h * stride_h
    rate = tl.load(slope_ptr + h).to(tl.float32) * LOG2E
    d = tl.arange(0, BLOCK_D)
    rows = start_m + tl.arange(0, BLOCK)
    row_tile = (rows[:, None] < seq_len) & (d[None, :] < HEAD_DIM)
    offsets = base + rows[:, None] * stride_t + d[None, :]
    q = tl.load(q_ptr + offsets, mask=row_tile, other=0.0)
    # Key blocks before the diagonal: W = 2^(-rate (i - m0)) 2^(-rate (m0 - j)), the query factor
    # applied once after the loop (see the module docstring).
    acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    lo = tl.maximum(start_m - _reach(rate, seq_len), 0) // BLOCK * BLOCK
    for start_n in range(lo, start_m, BLOCK):
        cols = start_n + tl.arange(0, BLOCK)
        col_offsets = base + cols[:, None] * stride_t + d[None, :]
        k = tl.load(k_ptr + col_offsets, mask=d[None, :] < HEAD_DIM, other=0.0)
        v = tl.load(v_ptr + col_offsets, mask=d[None, :] < HEAD_DIM, other=0.0)
        p = tl.dot(q, tl.trans(k)) * _decay(start_m - cols, rate)[None, :]
        acc += tl.dot(p.to(v.dtype), v)
    acc *= _decay(rows - start_m, rate)[:, None]
    k = tl.load(k_ptr + offsets, mask=row_tile, other=0.0)
    v = tl.load(v_ptr + offsets, mask=row_tile, other=0.0)
    p = tl.dot(q, tl.trans(k)) * _weights(rows, rows, rate)
    acc += tl.dot(p.to(v.dtype), v)
    tl.store(o_ptr + offsets, (acc * scale).to(o_ptr.dtype.element_ty), mask=row_tile)


@triton.jit
def _backward_dkdv_kernel(
    q_ptr, k_ptr, v_ptr, do_ptr, dk_ptr, dv_ptr, slope_ptr, seq_len, n_heads, stride_b, stride_t, stride_h, scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK: tl.constexpr,
):
    start_n = tl.program_id(0) * BLOCK
    bh = tl.program_id(1)
    h = bh % n_heads
    base = (bh // n_heads).to(tl.int64) * stride_b + h * stride_h
    rate = tl.load(slope_ptr + h).to(tl.float32) * LOG2E
    d = tl.arange(0, BLOCK_D)
    cols = start_n + tl.arange(0, BLOCK)
    col_tile = (cols[:, None] < seq_len) & (d[None, :] < HEAD_DIM)
    col_offsets = base + cols[:, None] * stride_t + d[None, :]
    k = tl.load(k_ptr + col_offsets, mask=col_tile, other=0.0)
    v = tl.load(v_ptr + col_offsets, mask=col_tile, other=0.0)
    # Query blocks after the diagonal: W = 2^(-rate (i - n1)) 2^(-rate (n1 - j)), n1 the block's
    # last key, the key factor applied once after the loop.
    last_key = start_n + BLOCK - 1
    dk = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    hi = tl.minimum(start_n + BLOCK + _reach(rate, seq_len), seq_len)
    for start_m in range(start_n + BLOCK, hi, BLOCK):
        rows = start_m + tl.arange(0, BLOCK)
        row_tile = (rows[:, None] < seq_len) & (d[None, :] < HEAD_DIM)
        row_offsets = base + rows[:, None] * stride_t + d[None, :]
        q = tl.load(q_ptr + row_offsets, mask=row_tile, other=0.0)
        do = tl.load(do_ptr + row_offsets, mask=row_tile, other=0.0)
        row_decay = _decay(rows - last_key, rate)[None, :]
        p_t = tl.dot(k, tl.trans(q)) * row_decay  # [keys, queries]
        dv += tl.dot(p_t.to(do.dtype), do)
        ds_t = tl.dot(v, tl.trans(do)) * row_decay
        dk += tl.dot(ds_t.to(q.dtype), q)
    key_decay = _decay(last_key - cols, rate)[:, None]
    dk *= key_decay
    dv *= key_decay
    q = tl.load(q_ptr + col_offsets, mask=col_tile, other=0.0)
    do = tl.load(do_ptr + col_offsets, mask=col_tile, other=0.0)
    weights_t = tl.trans(_weights(cols, cols, rate))
    p_t = tl.dot(k, tl.trans(q)) * weights_t
    dv += tl.dot(p_t.to(do.dtype), do)
    ds_t = tl.dot(v, tl.trans(do)) * weights_t
    dk += tl.dot(ds_t.to(q.dtype), q)
    tl.store(dk_ptr + col_offsets, (dk * scale).to(dk_ptr.dtype.element_ty), mask=col_tile)
    tl.store(dv_ptr + col_offsets, (dv * scale).to(dv_ptr.dtype.element_ty), mask=col_tile)


def _launch(kernel, tensors: tuple[Tensor, ...], slopes: Tensor, scale: float) -> None:
    batch, seq_len, heads, head_dim = tensors[0].shape
    kernel[(triton.cdiv(seq_len, BLOCK), batch * heads)](
        *tensors, slopes, seq_len, heads, *tensors[0].stride()[:3], scale,
        HEAD_DIM=head_dim, BLOCK_D=max(16, triton.next_power_of_2(head_dim)), BLOCK=BLOCK, num_warps=4,
    )  # fmt: skip


def _forward(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, scale: float) -> Tensor:
    out = torch.empty_like(q)
    _launch(_forward_kernel, (q, k, v, out), slopes, scale)
    return out


def _gradients(
    q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, grad_out: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _launch(_backward_dkdv_kernel, (q, k, v, grad_out, dk, dv), slopes, scale)
    # dQ = ((dO V^T) * W) K is the forward's product with (q, k, v) -> (dO, v, k): the same kernel.
    _launch(_forward_kernel, (grad_out, v, k, dq), slopes, scale)
    return dq, dk, dv


# Under torch.compile: custom ops, so that the compiled graph keeps the kernels whole (an opaque node
# with a known output shape) instead of tracing the launches or breaking the graph around them.
@torch.library.custom_op("meshforge::linear_attention_parallel", mutates_args=())
def _parallel_forward(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, scale: float) -> Tensor:
    return _forward(q, k, v, slopes, scale)


@_parallel_forward.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, scale: float) -> Tensor:
    return torch.empty_like(q)


@torch.library.custom_op("meshforge::linear_attention_parallel_backward", mutates_args=())
def _parallel_backward(
    q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, grad_out: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    return _gradients(q, k, v, slopes, grad_out, scale)


@_parallel_backward.register_fake
def _(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, grad_out: Tensor, scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save_for_backward(ctx, inputs: tuple, output: Tensor) -> None:
    q, k, v, slopes, scale = inputs
    ctx.save_for_backward(q, k, v, slopes)
    ctx.scale = scale


def _backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
    q, k, v, slopes = ctx.saved_tensors
    return *_parallel_backward(q, k, v, slopes, grad_out.contiguous(), ctx.scale), None, None


_parallel_forward.register_autograd(_backward, setup_context=_save_for_backward)


class _ParallelAttention(torch.autograd.Function):
    """Eagerly: the same kernels without the custom ops' dispatch (a host-bound short training step
    pays it in each of 18 linear layers, forward and backward)."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, scale: float) -> Tensor:
        _save_for_backward(ctx, (q, k, v, slopes, scale), None)
        return _forward(q, k, v, slopes, scale)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q, k, v, slopes = ctx.saved_tensors
        return *_gradients(q, k, v, slopes, grad_out.contiguous(), ctx.scale), None, None


def linear_attention_parallel_triton(q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, scale: float) -> Tensor:
    """``scale * ((Q K^T) * W) V`` for ``[B, T, H, D]`` inputs, ``slopes [H] >= 0``; output in ``q.dtype``.

    Differentiable in ``q, k, v``: an autograd.Function eagerly, custom ops under torch.compile. The
    kernels index one set of strides, so the inputs are made contiguous (a no-op for the model's eager
    CUDA q, k and v, which the fused rotation writes contiguous; compiled, they may be slices of qkv).
    """
    if not q.shape == k.shape == v.shape:
        shapes = ", ".join(str(tuple(x.shape)) for x in (q, k, v))
        raise ValueError(f"parallel linear attention needs q, k, v of one shape [B, T, H, D], got {shapes}")
    dtype = q.dtype
    inputs = (*(x.to(dtype).contiguous() for x in (q, k, v)), slopes.contiguous(), float(scale))
    if torch.compiler.is_compiling():
        return _parallel_forward(*inputs)
    return _ParallelAttention.apply(*inputs)


__all__ = ["BLOCK", "linear_attention_parallel_triton"]

"""Triton form of :func:`meshforge.kernels.decode_step.fused_linear`: a GEMM over a decoding step's few rows.

At decoding sizes (a handful of rows, weights of a few MB) a projection costs one launch and one
read of its weight, whatever else the kernel does; so the RMSNorm before it and the SwiGLU
activation or residual add after it ride along instead of being launches of their own.

One program per tile of ``BLOCK_N`` output columns (and ``BLOCK_M`` rows): narrow tiles spread a
small weight over many SMs, since at batch 1-16 the weight read is all the work there is. With a
norm, each program first reduces its rows' sums of squares over the whole ``K`` (the rows are a
few KB and stay in cache), then normalises each ``K`` slice on the fly and rounds it to the
activations' dtype before the dot product, where the reference rounds. With SwiGLU a program
accumulates the gate columns and the matching up columns (``N`` rows further down the weight) and
rounds gate, ``silu(gate)`` and the product where the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

BLOCK_N = 16  # output columns per program: the smallest a tensor-core dot takes
# A slice of K is one load of the weight tile per program: few, wide slices keep the whole tile in
# flight at once (what a launch-bound step waits on), capped so the row tile stays in registers.
MAX_BLOCK_K = 512
MAX_TILE = 8192  # BLOCK_M * BLOCK_K
_DOT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def _load_rows(x_ptr, rows, ks, stride_xm, M, K):
    mask = (rows < M)[:, None] & (ks < K)[None, :]
    return tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=mask, other=0.0)


@triton.jit
def _fused_linear_kernel(
    x_ptr, norm_ptr, w_ptr, res_ptr, out_ptr,
    M, N, K, stride_xm, stride_wn, stride_rm, stride_om, eps,
    HAS_NORM: tl.constexpr, SWIGLU: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dtype = x_ptr.dtype.element_ty
    if HAS_NORM:
        sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            row_slice = _load_rows(x_ptr, rows, k0 + tl.arange(0, BLOCK_K), stride_xm, M, K).to(tl.float32)
            sum_sq += tl.sum(row_slice * row_slice, axis=1)
        inv_rms = 1.0 / tl.sqrt(sum_sq / K + eps)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    w_mask_n = (cols < N)[None, :]
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x_slice = _load_rows(x_ptr, rows, ks, stride_xm, M, K)
        if HAS_NORM:
            gain = tl.load(norm_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
            x_slice = (x_slice.to(tl.float32) * inv_rms[:, None] * gain[None, :]).to(dtype)
        x_dot = x_slice.to(DOT_DTYPE)
        w_mask = (ks < K)[:, None] & w_mask_n
        w_tile = w_ptr + cols[None, :] * stride_wn + ks[:, None]  # [BLOCK_K, BLOCK_N]: W^T
        gate_w = tl.load(w_tile, mask=w_mask, other=0.0).to(DOT_DTYPE)
        acc = tl.dot(x_dot, gate_w, acc, input_precision=PRECISION)
        if SWIGLU:
            up_w = tl.load(w_tile + N * stride_wn, mask=w_mask, other=0.0).to(DOT_DTYPE)
            acc_up = tl.dot(x_dot, up_w, acc_up, input_precision=PRECISION)

    out = acc.to(dtype)
    if SWIGLU:
        gate = out.to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype)
        out = (silu.to(tl.float32) * acc_up.to(dtype).to(tl.float32)).to(dtype)
    out_mask = (rows < M)[:, None] & w_mask_n
    if HAS_RESIDUAL:
        residual = tl.load(res_ptr + rows[:, None] * stride_rm + cols[None, :], mask=out_mask, other=0.0)
        out = (residual.to(tl.float32) + out.to(tl.float32)).to(dtype)
    tl.store(out_ptr + rows[:, None] * stride_om + cols[None, :], out, mask=out_mask)


def fused_linear_triton(
    x: Tensor,
    weight: Tensor,
    norm_weight: Tensor | None = None,
    eps: float = 1e-6,
    residual: Tensor | None = None,
    swiglu: bool = False,
) -> Tensor:
    if x.ndim != 2 or weight.ndim != 2 or x.stride(-1) != 1 or not weight.is_contiguous():
        raise ValueError(
            f"x must be [M, K] with unit stride on K and weight a contiguous [N, K]; got "
            f"{tuple(x.shape)} and {tuple(weight.shape)}"
        )
    rows, k = x.shape
    if weight.shape[1] != k or weight.dtype != x.dtype:
        raise ValueError(
            f"weight {tuple(weight.shape)} {weight.dtype} does not take x {tuple(x.shape)} {x.dtype}"
        )
    if swiglu and weight.shape[0] % 2:
        raise ValueError(f"a SwiGLU weight stacks gate and up rows: an even count, got {weight.shape[0]}")
    n = weight.shape[0] // 2 if swiglu else weight.shape[0]
    if norm_weight is not None and norm_weight.shape != (k,):
        raise ValueError(f"norm weight {tuple(norm_weight.shape)} does not match the width {k}")
    if residual is not None and (
        residual.shape != (rows, n) or residual.stride(-1) != 1 or residual.dtype != x.dtype
    ):
        raise ValueError(f"residual must be [M, N] = {(rows, n)} in {x.dtype} with unit stride on N")
    out = torch.empty(rows, n, device=x.device, dtype=x.dtype)
    block_m = min(64, max(16, triton.next_power_of_2(rows)))
    block_k = min(MAX_BLOCK_K, MAX_TILE // block_m, max(16, triton.next_power_of_2(k)))
    grid = (triton.cdiv(n, BLOCK_N), triton.cdiv(rows, block_m))
    norm = x if norm_weight is None else norm_weight.contiguous()  # a placeholder pointer when unused
    res = out if residual is None else residual
    _fused_linear_kernel[grid](
        x, norm, weight, res, out,
        rows, n, k, x.stride(0), weight.stride(0), res.stride(0), out.stride(0), eps,
        HAS_NORM=norm_weight is not None, SWIGLU=swiglu, HAS_RESIDUAL=residual is not None,
        # Triton's interpreter multiplies bf16 operands as their raw bits; the product of two bf16
        # values is exact in float32, so a float32 dot of the same operands is the same sum there.
        PRECISION="ieee" if x.dtype == torch.float32 or not x.is_cuda else "tf32",
        DOT_DTYPE=tl.float32 if not x.is_cuda else _DOT_DTYPES[x.dtype],
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=block_k,
    )  # fmt: skip
    return out

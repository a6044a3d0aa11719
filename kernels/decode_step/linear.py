"""Triton form of :func:`meshforge.kernels.decode_step.fused_linear`: a GEMM over a decoding step's few rows.

At decoding sizes (a handful of rows, weights of a few MB) a projection costs one launch and one
read of its weight, whatever else the kernel does; so the RMSNorm before it and the SwiGLU
activation or residual add after it ride along instead of being launches of their own.

One program per tile of ``BLOCK_N`` output columns (and ``BLOCK_M`` rows): at batch 1-16 the weight
read is all the work there is, so the tiles are narrow enough to spread it over every SM. Two
forms of the tile product share the rest of the kernel (:class:`LinearConfig`):

- ``tl.dot`` (tensor cores) from ``GEMV_MAX_ROWS + 1`` rows on, the rows padded to a tile of at least 16;
- a GEMV for a few rows (batch 1 decoding): products summed in float32 with ``tl.sum``, which takes
  tiles of 1-8 columns, so the 512-column projections run as 128-256 programs instead of the
  32 that 16-column tiles give on 132 SMs.

With a norm, each program first reduces its rows' sums of squares over the whole ``K`` (the rows are
a few KB and stay in cache), then normalises each ``K`` slice on the fly and rounds it to the
activations' dtype before the product, where the reference rounds. With SwiGLU a program
accumulates the gate columns and the matching up columns (``N`` rows further down the weight) and
rounds gate, ``silu(gate)`` and the product where the reference does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

_DOT_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
# Rows a GEMV takes; more go to tensor cores, padded to 16. At 4 rows the GEMV still wins, narrowly (one
# H200 run, benchmarks/results/decode_linear.json: 19.7 against 20.3 us over the reference model's five projections).
GEMV_MAX_ROWS = 4
# A slice of K is one load of the weight tile per program: few, wide slices keep the whole tile in
# flight at once (what a launch-bound step waits on: the best 256-wide GEMV tiling lost to the best
# 512-wide one at every projection in decode_linear.json), capped so the tile stays in registers.
MAX_BLOCK_K = 512
MAX_TILE = 8192  # BLOCK_M * BLOCK_K (dot) or BLOCK_M * BLOCK_N * BLOCK_K (GEMV): what stays in registers
GEMV_PROGRAMS = 256  # programs a GEMV spreads its weight over: about two per SM on an H100/H200


@dataclass(frozen=True)
class LinearConfig:
    """One launch's tiling: the product's form, the tile (rows x columns x slice of K) and warps."""

    dot: bool
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4

    @classmethod
    def for_shape(cls, rows: int, n: int, k: int) -> LinearConfig:
        """The default tiling of ``rows x K`` times ``K x N``: the dot form in 16-column tiles (the
        narrowest a tensor-core dot takes), a GEMV in tiles as narrow as it takes to give about
        GEMV_PROGRAMS programs and at most 8 columns wide; slices of K up to MAX_BLOCK_K."""
        k_cover = max(16, triton.next_power_of_2(k))
        if rows > GEMV_MAX_ROWS:
            block_m = min(64, max(16, triton.next_power_of_2(rows)))
            return cls(dot=True, block_m=block_m, block_n=16, block_k=min(MAX_BLOCK_K, MAX_TILE // block_m, k_cover))
        block_m, block_n = triton.next_power_of_2(rows), 8
        while block_n > 1 and triton.cdiv(n, block_n) < GEMV_PROGRAMS:
            block_n //= 2
        return cls(dot=False, block_m=block_m, block_n=block_n,
                   block_k=min(MAX_BLOCK_K, MAX_TILE // (block_m * block_n), k_cover))  # fmt: skip


@triton.jit
def _load_rows(x_ptr, rows, ks, stride_xm, M, K):
    mask = (rows < M)[:, None] & (ks < K)[None, :]
    return tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=mask, other=0.0)


@triton.jit
def _input_slice(x_ptr, skip_ptr, scale, rows, ks, stride_xm, stride_km, M, K, HAS_SKIP: tl.constexpr):
    """Rows x ``ks`` of the GEMM's input: ``x``, or ``x + scale * skip`` rounded where PyTorch's two ops round."""
    x = _load_rows(x_ptr, rows, ks, stride_xm, M, K)
    if HAS_SKIP:
        scaled = (scale * _load_rows(skip_ptr, rows, ks, stride_km, M, K).to(tl.float32)).to(x.dtype)
        x = (x.to(tl.float32) + scaled.to(tl.float32)).to(x.dtype)
    return x


@triton.jit
def _tile_product(acc, x_slice, w_ptr, cols, ks, stride_wn, N, K, DOT: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr):
    """``acc + x_slice @ W[cols, ks]^T`` in float32, on tensor cores (DOT) or as a GEMV."""
    if DOT:
        w_mask = (ks < K)[:, None] & (cols < N)[None, :]
        w_tile = tl.load(w_ptr + cols[None, :] * stride_wn + ks[:, None], mask=w_mask, other=0.0)  # W^T
        return tl.dot(x_slice.to(DOT_DTYPE), w_tile.to(DOT_DTYPE), acc, input_precision=PRECISION)
    w_mask = (cols < N)[:, None] & (ks < K)[None, :]
    w_tile = tl.load(w_ptr + cols[:, None] * stride_wn + ks[None, :], mask=w_mask, other=0.0)  # [BLOCK_N, BLOCK_K]
    # A product of two bf16/fp16 values is exact in float32: only the order of the sum differs from a dot.
    return acc + tl.sum(x_slice.to(tl.float32)[:, None, :] * w_tile.to(tl.float32)[None, :, :], axis=2)


@triton.jit
def _fused_linear_kernel(
    x_ptr, norm_ptr, w_ptr, res_ptr, out_ptr, skip_ptr, scale_ptr, sum_ptr,
    M, N, K, stride_xm, stride_wn, stride_rm, stride_om, stride_km, stride_sm, eps,
    HAS_NORM: tl.constexpr, SWIGLU: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_SKIP: tl.constexpr,
    DOT: tl.constexpr, PRECISION: tl.constexpr, DOT_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    dtype = x_ptr.dtype.element_ty
    scale = 0.0
    if HAS_SKIP:
        scale = tl.load(scale_ptr).to(tl.float32)
    if HAS_NORM:
        sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            row_slice = _input_slice(x_ptr, skip_ptr, scale, rows, ks, stride_xm, stride_km, M, K, HAS_SKIP).to(tl.float32)
            sum_sq += tl.sum(row_slice * row_slice, axis=1)
        inv_rms = 1.0 / tl.sqrt(sum_sq / K + eps)

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        x_slice = _input_slice(x_ptr, skip_ptr, scale, rows, ks, stride_xm, stride_km, M, K, HAS_SKIP)
        if HAS_SKIP:  # noqa: SIM102 -- a compile-time branch around a runtime one: Triton keeps them apart
            if tl.program_id(0) == 0:  # the first column tile writes the summed rows: the block's residual stream
                inside = (rows < M)[:, None] & (ks < K)[None, :]
                tl.store(sum_ptr + rows[:, None] * stride_sm + ks[None, :], x_slice, mask=inside)
        if HAS_NORM:
            gain = tl.load(norm_ptr + ks, mask=ks < K, other=0.0).to(tl.float32)
            x_slice = (x_slice.to(tl.float32) * inv_rms[:, None] * gain[None, :]).to(dtype)
        acc = _tile_product(acc, x_slice, w_ptr, cols, ks, stride_wn, N, K, DOT, PRECISION, DOT_DTYPE)
        if SWIGLU:
            acc_up = _tile_product(acc_up, x_slice, w_ptr + N * stride_wn, cols, ks, stride_wn, N, K, DOT, PRECISION, DOT_DTYPE)

    out = acc.to(dtype)
    if SWIGLU:
        gate = out.to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(dtype)
        out = (silu.to(tl.float32) * acc_up.to(dtype).to(tl.float32)).to(dtype)
    out_mask = (rows < M)[:, None] & (cols < N)[None, :]
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
    skip: tuple[Tensor, Tensor] | None = None,
    skip_sum: Tensor | None = None,
    out: Tensor | None = None,
    config: LinearConfig | None = None,
) -> Tensor:
    """The fused GEMM; ``config`` (default :meth:`LinearConfig.for_shape`) sets its tiling."""
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
    if residual is not None and not _rows_of(residual, rows, n, x.dtype):
        raise ValueError(f"residual must be [M, N] = {(rows, n)} in {x.dtype} with unit stride on N")
    if out is not None and not _rows_of(out, rows, n, x.dtype):
        raise ValueError(f"out must be [M, N] = {(rows, n)} in {x.dtype} with unit stride on N")
    if skip is not None and not (
        skip[0].numel() == 1 and _rows_of(skip[1], rows, k, x.dtype) and skip_sum is not None
        and _rows_of(skip_sum, rows, k, x.dtype)
    ):  # fmt: skip
        raise ValueError(f"skip must be (a scale of one element, [M, K] = {(rows, k)} rows) with skip_sum like x")
    config = config or LinearConfig.for_shape(rows, n, k)
    out = torch.empty(rows, n, device=x.device, dtype=x.dtype) if out is None else out
    grid = (triton.cdiv(n, config.block_n), triton.cdiv(rows, config.block_m))
    # Placeholder pointers where an input is unused: the kernel never reads or writes them.
    norm = x if norm_weight is None else norm_weight.contiguous()
    res = out if residual is None else residual
    scale, other, summed = (x, x, x) if skip is None else (skip[0], skip[1], skip_sum)
    _fused_linear_kernel[grid](
        x, norm, weight, res, out, other, scale, summed,
        rows, n, k, x.stride(0), weight.stride(0), res.stride(0), out.stride(0), other.stride(0), summed.stride(0), eps,
        HAS_NORM=norm_weight is not None, SWIGLU=swiglu, HAS_RESIDUAL=residual is not None, HAS_SKIP=skip is not None,
        DOT=config.dot,
        # Triton's interpreter multiplies bf16 operands as their raw bits; the product of two bf16
        # values is exact in float32, so a float32 dot of the same operands is the same sum there.
        PRECISION="ieee" if x.dtype == torch.float32 or not x.is_cuda else "tf32",
        DOT_DTYPE=tl.float32 if not x.is_cuda else _DOT_DTYPES[x.dtype],
        BLOCK_M=config.block_m, BLOCK_N=config.block_n, BLOCK_K=config.block_k, num_warps=config.num_warps,
    )  # fmt: skip
    return out


def _rows_of(t: Tensor, rows: int, width: int, dtype: torch.dtype) -> bool:
    """Whether ``t`` is ``[rows, width]`` in ``dtype`` with unit stride on its width (rows may be strided)."""
    return t.shape == (rows, width) and t.stride(-1) == 1 and t.dtype == dtype

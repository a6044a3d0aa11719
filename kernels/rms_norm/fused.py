"""RMSNorm forward and backward as one Triton kernel each (see :mod:`meshforge.kernels.rms_norm`).

Rows ``x [N, D]``: a program normalises ``ROWS`` consecutive rows (``ROWS * BLOCK_D`` ~ 4k elements,
so rows of 32 come 128 to a program) and keeps each row's ``rstd`` (float32) for the backward,
which needs no second pass over anything but ``x`` and the incoming gradient::

    x_hat = x * rstd,   dx = rstd * (g w - x_hat * mean(x_hat * g w)),   dw = sum_rows g * x_hat

The gain's gradient is summed per program in float32 and the programs' partial sums once more in
float32 by PyTorch (``[programs, D]``, a few thousand rows at most).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

ELEMENTS_PER_PROGRAM = 4096


@triton.jit
def _forward_kernel(x_ptr, w_ptr, y_ptr, rstd_ptr, n_rows, dim, eps, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    tile = (rows[:, None] < n_rows) & (cols[None, :] < dim)
    offsets = rows[:, None].to(tl.int64) * dim + cols[None, :]
    x = tl.load(x_ptr + offsets, mask=tile, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < dim, other=0.0).to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(x * x, axis=1) / dim + eps)
    tl.store(y_ptr + offsets, (x * rstd[:, None] * w[None, :]).to(y_ptr.dtype.element_ty), mask=tile)
    tl.store(rstd_ptr + rows, rstd, mask=rows < n_rows)


@triton.jit
def _backward_kernel(
    grad_ptr, x_ptr, w_ptr, rstd_ptr, dx_ptr, dw_partial_ptr, n_rows, dim, ROWS: tl.constexpr, BLOCK_D: tl.constexpr
):
    program = tl.program_id(0)
    rows = program * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_D)
    tile = (rows[:, None] < n_rows) & (cols[None, :] < dim)
    offsets = rows[:, None].to(tl.int64) * dim + cols[None, :]
    g = tl.load(grad_ptr + offsets, mask=tile, other=0.0).to(tl.float32)
    x = tl.load(x_ptr + offsets, mask=tile, other=0.0).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < dim, other=0.0).to(tl.float32)
    rstd = tl.load(rstd_ptr + rows, mask=rows < n_rows, other=0.0)
    x_hat = x * rstd[:, None]
    gw = g * w[None, :]
    dx = rstd[:, None] * (gw - x_hat * (tl.sum(x_hat * gw, axis=1) / dim)[:, None])
    tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=tile)
    tl.store(dw_partial_ptr + program * BLOCK_D + cols, tl.sum(g * x_hat, axis=0))


def _grid(n_rows: int, dim: int) -> tuple[int, int, int]:
    """(programs, ROWS, BLOCK_D) for ``n_rows`` rows of ``dim``."""
    block_d = triton.next_power_of_2(dim)
    rows = max(1, min(ELEMENTS_PER_PROGRAM // block_d, triton.next_power_of_2(n_rows)))
    return triton.cdiv(n_rows, rows), rows, block_d


def _forward(x: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    n_rows, dim = x.shape
    y = torch.empty_like(x)
    rstd = torch.empty(n_rows, device=x.device, dtype=torch.float32)
    programs, rows, block_d = _grid(n_rows, dim)
    _forward_kernel[(programs,)](x, weight, y, rstd, n_rows, dim, eps, ROWS=rows, BLOCK_D=block_d)
    return y, rstd


def _backward(grad: Tensor, x: Tensor, weight: Tensor, rstd: Tensor) -> tuple[Tensor, Tensor]:
    n_rows, dim = x.shape
    programs, rows, block_d = _grid(n_rows, dim)
    dx = torch.empty_like(x)
    dw_partial = torch.empty(programs, block_d, device=x.device, dtype=torch.float32)
    _backward_kernel[(programs,)](grad, x, weight, rstd, dx, dw_partial, n_rows, dim, ROWS=rows, BLOCK_D=block_d)
    return dx, dw_partial[:, :dim].sum(0).to(weight.dtype)


# A plain autograd.Function, not a torch.library custom op: only eager code runs it (compiled code
# takes the reference, which inductor fuses), and a custom op's dispatch cost ~3x an autograd.Function's
# on the host (12.5 vs 3.8 us a forward call, CPU) in steps that are host-bound at short lengths.
class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, eps: float) -> Tensor:
        y, rstd = _forward(x, weight, eps)
        ctx.save_for_backward(x, weight, rstd)
        return y

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        x, weight, rstd = ctx.saved_tensors
        return *_backward(grad.contiguous(), x, weight, rstd), None


def rms_norm_triton(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``x [..., D]`` (any dtype; float32 inside) -> normalised times ``weight [D]``, in ``x.dtype``."""
    if weight.shape != (x.shape[-1],):
        raise ValueError(f"rms_norm: weight of shape {tuple(weight.shape)} for rows of {x.shape[-1]}")
    rows = x.reshape(-1, x.shape[-1]).contiguous()
    if rows.numel() == 0:  # no program to launch
        return x * weight.to(x.dtype)
    return _RMSNorm.apply(rows, weight.contiguous(), float(eps)).view(x.shape)


__all__ = ["rms_norm_triton"]

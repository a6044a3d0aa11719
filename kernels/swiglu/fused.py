"""``silu(gate) * up`` and its gradient as one Triton kernel each (see :mod:`meshforge.kernels.swiglu`).

Rows ``gate_up [N, 2 H]``; a program takes a tile of ``ROWS x BLOCK`` columns of both halves. With
``s = sigmoid(g)`` and ``silu(g) = g s``::

    h = silu(g) * u,   du = dh * silu(g),   dg = (dh * u) * s (1 + g (1 - s))

in float32, each value rounded to the input's dtype where PyTorch's ops round theirs: ``silu(g)``
(which its backward reuses), ``h``, ``du``, ``dh * u`` and ``dg``. The backward recomputes ``silu(g)``
from ``gate_up`` instead of keeping it: only ``gate_up`` is saved.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

ROWS = 8
BLOCK = 512


@triton.jit
def _tile(pid_rows, pid_cols, n_rows, hidden, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    rows = pid_rows * ROWS + tl.arange(0, ROWS)
    cols = pid_cols * BLOCK + tl.arange(0, BLOCK)
    mask = (rows < n_rows)[:, None] & (cols < hidden)[None, :]
    rows64 = rows.to(tl.int64)[:, None]
    return rows64 * (2 * hidden) + cols[None, :], rows64 * hidden + cols[None, :], mask


@triton.jit
def _forward_kernel(gate_up_ptr, out_ptr, n_rows, hidden, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    src, dst, mask = _tile(tl.program_id(0), tl.program_id(1), n_rows, hidden, ROWS, BLOCK)
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(gate_up_ptr + src, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + src + hidden, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + dst, (silu * up).to(dtype), mask=mask)


@triton.jit
def _backward_kernel(gate_up_ptr, grad_ptr, dgate_up_ptr, n_rows, hidden, ROWS: tl.constexpr, BLOCK: tl.constexpr):
    src, dst, mask = _tile(tl.program_id(0), tl.program_id(1), n_rows, hidden, ROWS, BLOCK)
    dtype = dgate_up_ptr.dtype.element_ty
    gate = tl.load(gate_up_ptr + src, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gate_up_ptr + src + hidden, mask=mask, other=0.0).to(tl.float32)
    grad = tl.load(grad_ptr + dst, mask=mask, other=0.0).to(tl.float32)
    sigmoid = 1.0 / (1.0 + tl.exp(-gate))
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)  # as the forward (and PyTorch) computes it
    grad_silu = (grad * up).to(dtype).to(tl.float32)
    grad_gate = grad_silu * sigmoid * (1.0 + gate * (1.0 - sigmoid))
    tl.store(dgate_up_ptr + src, grad_gate.to(dtype), mask=mask)
    tl.store(dgate_up_ptr + src + hidden, (grad * silu).to(dtype), mask=mask)


def _grid(n_rows: int, hidden: int) -> tuple[int, int]:
    return triton.cdiv(n_rows, ROWS), triton.cdiv(hidden, BLOCK)


class _SwiGLU(torch.autograd.Function):
    """An autograd.Function, not a custom op: only eager code runs it (a custom op's dispatch costs
    the host ~3x more, see :mod:`meshforge.kernels.rms_norm.fused`); compiled code runs the reference."""

    @staticmethod
    def forward(ctx, gate_up: Tensor) -> Tensor:
        n_rows, hidden = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty(n_rows, hidden, device=gate_up.device, dtype=gate_up.dtype)
        _forward_kernel[_grid(n_rows, hidden)](gate_up, out, n_rows, hidden, ROWS=ROWS, BLOCK=BLOCK)
        ctx.save_for_backward(gate_up)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        (gate_up,) = ctx.saved_tensors
        n_rows, hidden = gate_up.shape[0], gate_up.shape[1] // 2
        dgate_up = torch.empty_like(gate_up)
        _backward_kernel[_grid(n_rows, hidden)](gate_up, grad.contiguous(), dgate_up, n_rows, hidden, ROWS=ROWS, BLOCK=BLOCK)
        return dgate_up


def swiglu_triton(gate_up: Tensor) -> Tensor:
    """``gate_up [..., 2 H]`` -> ``silu(gate) * up`` ``[..., H]`` in ``gate_up.dtype``."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu: gate_up needs an even last axis (gate | up), got {tuple(gate_up.shape)}")
    rows = gate_up.reshape(-1, gate_up.shape[-1]).contiguous()
    if rows.numel() == 0:
        return gate_up[..., : gate_up.shape[-1] // 2].clone()
    return _SwiGLU.apply(rows).view(*gate_up.shape[:-1], gate_up.shape[-1] // 2)


__all__ = ["swiglu_triton"]

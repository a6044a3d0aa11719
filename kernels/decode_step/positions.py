"""Triton form of :func:`meshforge.kernels.decode_step.advance_position`: a decoding step's positions, one launch.

A step of the hourglass writes at the token level and, when a vertex / face completes, at the levels
above, each at the token position divided by 3 per level; its blocks need that index, the K/V length
after it and the rotary tables' rows. As PyTorch ops that is an add and two gathers a level, a
division per level up and the position's increment: ~5 launches a token at batch 1, each a few
microseconds of a launch-bound step. One program does all of it from the position on the device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _advance_position_kernel(
    pos_ptr, cos_ptr, sin_ptr, index_ptr, length_ptr, cos_out_ptr, sin_out_ptr,
    D, POOL: tl.constexpr, LEVELS: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    position = tl.load(pos_ptr)
    d = tl.arange(0, BLOCK_D)
    inside = d < D
    index = position
    for level in tl.static_range(LEVELS):
        tl.store(index_ptr + level, index)
        tl.store(length_ptr + level, index + 1)
        row = index * D + d
        tl.store(cos_out_ptr + level * D + d, tl.load(cos_ptr + row, mask=inside), mask=inside)
        tl.store(sin_out_ptr + level * D + d, tl.load(sin_ptr + row, mask=inside), mask=inside)
        index = index // POOL
    tl.store(pos_ptr, position + 1)


def advance_position_triton(
    position: Tensor, cos: Tensor, sin: Tensor, pool: int, levels: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    if position.shape != (1,) or position.dtype != torch.int64:
        raise ValueError(f"position must be [1] int64, got {tuple(position.shape)} {position.dtype}")
    if cos.shape != sin.shape or cos.ndim != 2 or not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError(f"rotary tables must be two contiguous [L, D] tables, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    dim = cos.shape[1]
    index = torch.empty(levels, device=position.device, dtype=torch.int64)
    length = torch.empty_like(index)
    cos_rows = torch.empty(levels, dim, device=cos.device, dtype=cos.dtype)
    sin_rows = torch.empty_like(cos_rows)
    _advance_position_kernel[(1,)](
        position, cos, sin, index, length, cos_rows, sin_rows,
        dim, POOL=pool, LEVELS=levels, BLOCK_D=triton.next_power_of_2(dim), num_warps=1,
    )  # fmt: skip
    return index, length, cos_rows, sin_rows


__all__ = ["advance_position_triton"]

"""Rotary position embedding, rotate-half convention: the one definition of the rotation.

``x * cos + rotate_half(x) * sin`` with full-width tables, where ``rotate_half`` maps the halves
``(x1, x2)`` of the last axis to ``(-x2, x1)``. Computed in float32 and returned in ``x.dtype``. The
tables come from :class:`meshforge.models.layers.Rotary`; the fused decoding kernels
(:mod:`meshforge.kernels.decode_step`) apply the same rotation in registers, and training's eager CUDA
steps split and rotate a fused projection's ``qkv`` in one kernel each way (:func:`rotate_qk`,
:mod:`meshforge.kernels.rotary.fused`).
"""

from __future__ import annotations

import torch
from meshforge.kernels.utils import Backend, resolve_backend
from torch import Tensor


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate ``x [B, T, ..., D]`` by tables ``cos, sin [T, D]`` (positions on axis 1, any head axes after it)."""
    table_shape = (x.shape[1],) + (1,) * (x.ndim - 3) + (x.shape[-1],)
    x_float = x.float()
    first, second = x_float.chunk(2, dim=-1)
    rotated_half = torch.cat((-second, first), dim=-1)
    return torch.addcmul(x_float * cos.view(table_shape), rotated_half, sin.view(table_shape)).to(x.dtype)


def rotate_qk_reference(qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``qkv [B, T, 3, H, D]`` (a fused projection's output) -> rotated ``q, k`` and ``v``, each ``[B, T, H, D]``
    (views into one tensor and into ``qkv``); q and k are rotated in one pass."""
    q, k = apply_rotary(qkv[:, :, :2], cos, sin).unbind(2)
    return q, k, qkv[:, :, 2]


def rotate_qk(qkv: Tensor, cos: Tensor, sin: Tensor, backend: Backend = "auto") -> tuple[Tensor, Tensor, Tensor]:
    """:func:`rotate_qk_reference`, differentiable in ``qkv``; on CUDA outside compiled code one Triton
    kernel each way (:mod:`meshforge.kernels.rotary.fused`), whose ``q, k, v`` are contiguous."""
    # Compiled code runs the PyTorch form, for inductor to fuse with its neighbours.
    eager_cuda = qkv.is_cuda and not torch.compiler.is_compiling()
    if resolve_backend("rotate_qk", backend, eager_cuda) == "triton":
        from meshforge.kernels.rotary.fused import rotate_qk_triton

        return rotate_qk_triton(qkv, cos, sin)
    return rotate_qk_reference(qkv, cos, sin)

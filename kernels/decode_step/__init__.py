"""One decoding position of a transformer block: its projections and what lies between them.

A decoding step of iFlame is launch-bound: at batch 1-16 a block's dozens of tiny kernels cost
more than their arithmetic. Two ops fuse everything between a block's ``qkv`` GEMM and its
output projection that does not need the whole K/V cache:

- :func:`linear_decode_step` (linear-attention blocks): rotate ``q, k``, advance the per-head state
  ``S <- exp(-s) S + k^T v`` in place, read ``scale * q S`` and apply the per-head output RMSNorm;
- :func:`rotary_kv_append` (full-attention blocks): rotate ``q, k``, write ``k, v`` into the static
  K/V cache at the step's position (read from the device) and return the rotated ``q`` for
  :func:`meshforge.kernels.decode_attention.decode_attention`.

A third, :func:`fused_linear`, carries the elementwise work around each of a block's four projections
into the GEMM itself: the pre-norm RMSNorm before ``qkv`` and ``gate_up``, the SwiGLU activation
after ``gate_up``, the residual add after ``proj`` and ``down`` (and the final norm before the head, and
the hourglass's skip add before a decoder's first ``qkv``); its output may go into a strided buffer,
the cache slot a stage's result is kept in.
A block's step is then 5 launches (linear attention) or 7 (full: append, split-K and merge) instead
of the unfused ops' 15 / 17 (:meth:`meshforge.models.iflame.Block.step`).

A fourth, :func:`advance_position`, gives a step its positions: every level's index, K/V length and
rotary rows from the device position (divided by 3 per level), which it advances, in one launch.

Each has a PyTorch reference (``*_reference`` in ``reference.py``: the CPU path, and the definition the tests hold the
fused form to) built from the same pieces the training forward pass uses, and a Triton kernel of
one program per (sequence, head) in :mod:`meshforge.kernels.decode_step.fused` (used on CUDA when
the head width is a power of two), or per tile of output columns in
:mod:`meshforge.kernels.decode_step.linear`. The fused kernels round where the references round (the
rotation and the attention output, the normed GEMM input, the GEMM output, ``silu(gate)`` and
the residual sum to the activations' dtype), so both agree up to the order of float32 sums.
Shapes: ``qkv [B, 3, H, D]`` (the GEMM output viewed as q, k, v), rotary tables ``cos, sin [1, D]``
float32, states ``[B, H, D, D]`` float32, caches ``[B, H, L_max, D]``; a linear's rows ``[B, K]``.
"""

from __future__ import annotations

from meshforge.kernels.decode_step.reference import (
    advance_position_reference,
    fused_linear_reference,
    linear_decode_step_reference,
    rotary_kv_append_reference,
)
from meshforge.kernels.utils import Backend, resolve_backend
from torch import Tensor

FORMS = ("triton", "reference")


def advance_position(
    position: Tensor, cos: Tensor, sin: Tensor, pool: int, levels: int, backend: Backend = "auto"
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`advance_position_reference`, as one Triton kernel on CUDA."""
    if resolve_backend("advance_position", backend, position.is_cuda, FORMS) == "triton":
        from meshforge.kernels.decode_step.positions import advance_position_triton

        return advance_position_triton(position, cos, sin, pool, levels)
    return advance_position_reference(position, cos, sin, pool, levels)


def fused_linear(
    x: Tensor,
    weight: Tensor,
    norm_weight: Tensor | None = None,
    eps: float = 1e-6,
    residual: Tensor | None = None,
    swiglu: bool = False,
    skip: tuple[Tensor, Tensor] | None = None,
    skip_sum: Tensor | None = None,
    out: Tensor | None = None,
    backend: Backend = "auto",
) -> Tensor:
    """:func:`fused_linear_reference`, as one Triton kernel on CUDA."""
    fusable = x.is_cuda and x.stride(-1) == 1 and weight.dtype == x.dtype and weight.is_contiguous()
    if skip is not None and skip_sum is None:
        raise ValueError("fused_linear: a skip input needs skip_sum, the buffer its sum is written to")
    if resolve_backend("fused_linear", backend, fusable, FORMS) == "triton":
        from meshforge.kernels.decode_step.linear import fused_linear_triton

        return fused_linear_triton(x, weight, norm_weight, eps, residual, swiglu, skip, skip_sum, out)
    return fused_linear_reference(x, weight, norm_weight, eps, residual, swiglu, skip, skip_sum, out)


def _fusable(qkv: Tensor) -> bool:
    """Whether the per-(sequence, head) kernels take ``qkv``: on CUDA, contiguous, a power-of-two head width."""
    head_dim = qkv.shape[-1]
    return qkv.is_cuda and head_dim >= 2 and head_dim & (head_dim - 1) == 0 and qkv.is_contiguous()


def linear_decode_step(
    qkv: Tensor, cos: Tensor, sin: Tensor, decay: Tensor, state: Tensor, norm_weight: Tensor, eps: float,
    backend: Backend = "auto",
) -> Tensor:
    """:func:`linear_decode_step_reference`, as one Triton kernel on CUDA."""
    if resolve_backend("linear_decode_step", backend, _fusable(qkv), FORMS) == "triton":
        from meshforge.kernels.decode_step.fused import linear_decode_step_triton

        return linear_decode_step_triton(qkv, cos, sin, decay, state, norm_weight, eps)
    return linear_decode_step_reference(qkv, cos, sin, decay, state, norm_weight, eps)


def rotary_kv_append(
    qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, index: Tensor, backend: Backend = "auto"
) -> Tensor:
    """:func:`rotary_kv_append_reference`, as one Triton kernel on CUDA."""
    if resolve_backend("rotary_kv_append", backend, _fusable(qkv), FORMS) == "triton":
        from meshforge.kernels.decode_step.fused import rotary_kv_append_triton

        return rotary_kv_append_triton(qkv, cos, sin, k_cache, v_cache, index)
    return rotary_kv_append_reference(qkv, cos, sin, k_cache, v_cache, index)


__all__ = [
    "advance_position",
    "advance_position_reference",
    "fused_linear",
    "fused_linear_reference",
    "linear_decode_step",
    "linear_decode_step_reference",
    "rotary_kv_append",
    "rotary_kv_append_reference",
]

"""The decoding-step ops by the training forward's own pieces: the CPU path and the tests' reference."""

from __future__ import annotations

import torch
from meshforge.kernels.linear_attention import linear_attention_step
from meshforge.kernels.rms_norm import rms_norm_reference
from meshforge.kernels.rotary import rotate_qk_reference
from torch import Tensor
from torch.nn import functional as F


def _rotated_qkv(qkv: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(t[:, 0] for t in rotate_qk_reference(qkv[:, None], cos, sin))  # one position: T = 1


def linear_decode_step_reference(
    qkv: Tensor, cos: Tensor, sin: Tensor, decay: Tensor, state: Tensor, norm_weight: Tensor, eps: float
) -> Tensor:
    """``qkv [B, 3, H, D]`` -> the block's normalised attention output ``[B, H, D]``; ``state`` advances in place."""
    q, k, v = _rotated_qkv(qkv, cos, sin)
    out = linear_attention_step(q, k, v, decay, state)
    return rms_norm_reference(out, norm_weight, eps)


def rotary_kv_append_reference(
    qkv: Tensor, cos: Tensor, sin: Tensor, k_cache: Tensor, v_cache: Tensor, index: Tensor
) -> Tensor:
    """Write the rotated ``k`` and ``v`` of ``qkv [B, 3, H, D]`` at position ``index`` (``[1]``); the rotated ``q [B, H, D]``."""
    q, k, v = _rotated_qkv(qkv, cos, sin)
    k_cache.index_copy_(2, index, k[:, :, None].to(k_cache.dtype))
    v_cache.index_copy_(2, index, v[:, :, None].to(v_cache.dtype))
    return q


def advance_position_reference(
    position: Tensor, cos: Tensor, sin: Tensor, pool: int, levels: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Where a decoding step writes at each of ``levels`` levels (the position ``position [1]`` at level
    0, divided by ``pool`` per level up), then ``position += 1`` in place: ``index [levels]``, the K/V
    ``length = index + 1``, and the rotary tables' rows ``cos, sin [levels, D]`` of the full tables
    ``cos, sin [L, D]``."""
    index = position // pool ** torch.arange(levels, device=position.device)
    position.add_(1)
    return index, index + 1, cos[index], sin[index]


def fused_linear_reference(
    x: Tensor,
    weight: Tensor,
    norm_weight: Tensor | None = None,
    eps: float = 1e-6,
    residual: Tensor | None = None,
    swiglu: bool = False,
    skip: tuple[Tensor, Tensor] | None = None,
    skip_sum: Tensor | None = None,
    out: Tensor | None = None,
) -> Tensor:
    """``x [M, K]`` -> ``[M, N]``: ``x + scale * other`` (with ``skip = (scale, other)``: the hourglass's skip
    connection, written to ``skip_sum [M, K]``, the block's residual stream from there on), ``RMSNorm`` of
    that (when ``norm_weight`` is given) times ``weight^T`` (``[N, K]``, or ``[2N, K]``: gate rows then up
    rows, with ``swiglu``), then ``silu(gate) * up`` (``swiglu``), then ``residual + ...`` (``residual [M, N]``),
    into ``out`` when given. The training forward's own ops, in its order."""
    if skip is not None:
        scale, other = skip
        x = x + scale * other
        skip_sum.copy_(x)
    if norm_weight is not None:
        x = rms_norm_reference(x, norm_weight, eps)
    result = F.linear(x, weight)
    if swiglu:
        gate, up = result.chunk(2, dim=-1)
        result = F.silu(gate) * up
    if residual is not None:
        result = residual + result
    return result if out is None else out.copy_(result)

"""Softmax attention for token models: causal self-attention over whole sequences and
one-query attention over a KV cache.

Tensors are ``[B, T, H, D]`` (the layout linear attention and flash-attn use). Whole sequences
go to flash-attn when it is installed and the inputs are half precision on CUDA, otherwise to
``torch.nn.functional.scaled_dot_product_attention(is_causal=True)``, which picks its own fused
kernel (flash / memory-efficient / math). flash-attn is imported on first use only: importing it is
slow and it is an optional dependency.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from meshforge.runtime import has_module


@cache
def _flash_attn_func() -> Callable[..., Tensor] | None:
    if not has_module("flash_attn"):
        return None
    from flash_attn import flash_attn_func

    return flash_attn_func


def causal_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal softmax attention, ``[B, T, H, D] -> [B, T, H, D]``, scale ``D ** -0.5``."""
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        flash = _flash_attn_func()
        if flash is not None:
            return flash(q, k, v, causal=True)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)


# Decoding attends over a new key length at every step. cuDNN's attention builds an execution plan
# per shape (tens of ms, cached per shape), which made a first generation ~8x slower on an H200; the
# flash and memory-efficient kernels take any length as it comes.
_DECODE_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def cached_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, length: int) -> Tensor:
    """One new query per sequence against the first ``length`` cached positions.

    ``q: [B, H, D]``, caches ``[B, H, L_max, D]`` (already holding the new position's key and
    value); returns ``[B, H, D]``. No mask is needed: every cached position is in the past.
    """
    with sdpa_kernel(_DECODE_BACKENDS):
        out = F.scaled_dot_product_attention(q[:, :, None], k_cache[:, :, :length], v_cache[:, :, :length])
    return out[:, :, 0]

"""Causal softmax attention over whole sequences for token models (decoding against a KV cache
is :mod:`meshforge.kernels.decode_attention`).

Tensors are ``[B, T, H, D]`` (the layout linear attention and flash-attn use). Whole sequences
go to flash-attn when it is installed and the inputs are half precision on CUDA, otherwise to
``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` restricted to its flash,
memory-efficient and math kernels. Not cuDNN's: it builds an execution plan for every new shape,
and training batches come in ~60 bucketed lengths; on an H200 that cost ~15 ms of host time per
full-attention call, half of a reference iFlame training step (``--profile-steps`` showed it).
flash-attn is imported on first use only: importing it is slow and it is an optional dependency.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from meshforge.runtime import has_module

_SDPA_BACKENDS = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


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
    with sdpa_kernel(_SDPA_BACKENDS):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
    return out.transpose(1, 2)

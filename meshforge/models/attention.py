"""Causal softmax attention over whole sequences for token models (decoding against a KV cache
is :mod:`meshforge.kernels.decode_attention`).

Tensors are ``[B, T, H, D]`` (the layout linear attention and flash-attn use). Whole sequences
go to flash-attn when it is installed and the inputs are half precision on CUDA, otherwise to
``torch.nn.functional.scaled_dot_product_attention(is_causal=True)`` without its cuDNN kernel
(:func:`meshforge.runtime.sdpa`): cuDNN builds an execution plan for every new shape, training
batches come in ~60 bucketed lengths, and on an H200 the plans took ~15 ms of host time per
full-attention call, half of a reference iFlame training step (``--profile-steps`` showed it).
flash-attn is imported on first use only: importing it is slow and it is an optional dependency.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
from torch import Tensor

from meshforge.runtime import has_module, sdpa


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
    return sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)

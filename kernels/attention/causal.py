"""Causal softmax attention over whole sequences of token models, ``[B, T, H, D]``.

flash-attn when it is installed and the inputs are half precision on CUDA, otherwise SDPA with
``is_causal`` and without its cuDNN kernel (:mod:`meshforge.kernels.attention.sdpa`): training
batches come in ~60 bucketed lengths, and on an H200 cuDNN's per-shape plans took ~15 ms of host
time per full-attention call, half of a reference iFlame training step (``--profile-steps`` showed
it). flash-attn is imported on first use only: importing it is slow and it is optional.
"""

from __future__ import annotations

from typing import Literal, get_args

import torch
from meshforge.kernels.attention.reference import causal_attention_reference
from meshforge.kernels.attention.sdpa import sdpa
from meshforge.kernels.utils import has_flash_attn
from torch import Tensor

# "auto", flash-attn's own kernels, the reference, or one of SDPA's kernel sets (SDPA_BACKENDS).
DenseBackend = Literal["auto", "flash_attn", "reference", "any", "flash", "cudnn", "efficient", "math"]
DENSE_BACKENDS: tuple[str, ...] = get_args(DenseBackend)


def flash_attn_runs(q: Tensor) -> bool:
    """Whether flash-attn's kernels take ``q``: half precision on CUDA, with the package installed."""
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and has_flash_attn()


def causal_attention(q: Tensor, k: Tensor, v: Tensor, backend: DenseBackend = "auto") -> Tensor:
    """Causal softmax attention, ``[B, T, H, D] -> [B, T, H, D]``, scale ``D ** -0.5``."""
    if backend not in DENSE_BACKENDS:
        raise ValueError(f"causal_attention: unknown backend {backend!r} (known: {', '.join(DENSE_BACKENDS)})")
    if backend == "flash_attn" or (backend == "auto" and flash_attn_runs(q)):
        from flash_attn import flash_attn_func

        return flash_attn_func(q, k, v, causal=True)
    if backend == "reference":
        return causal_attention_reference(q, k, v)
    sdpa_backend = "any" if backend == "auto" else backend
    return sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                backend=sdpa_backend).transpose(1, 2)  # fmt: skip

"""Softmax attention by its definition (float32 scores, explicit masks): what the tests hold the ops to."""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor


def causal_attention_reference(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Causal softmax attention of ``[B, T, H, D]`` tensors, scale ``D ** -0.5``, in ``q.dtype``."""
    seq_len = q.shape[1]
    scores = torch.einsum("bthd,bshd->bhts", q.float(), k.float()) / math.sqrt(q.shape[-1])
    future = torch.ones(seq_len, seq_len, dtype=torch.bool, device=q.device).triu(1)
    weights = scores.masked_fill(future, float("-inf")).softmax(-1)
    return torch.einsum("bhts,bshd->bthd", weights, v.float()).to(q.dtype)


def varlen_attention_reference(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor) -> Tensor:
    """Softmax attention within each sequence of ``[N, H, D]`` rows (``cu_seqlens[S + 1]``), one at a time."""
    out = torch.empty_like(q)
    for a, b in itertools.pairwise(cu_seqlens.tolist()):
        qs, ks, vs = (t[a:b].transpose(0, 1) for t in (q, k, v))  # [H, n, D]
        scores = qs @ ks.transpose(1, 2) / math.sqrt(q.shape[-1])
        out[a:b] = (scores.softmax(-1) @ vs).transpose(0, 1)
    return out

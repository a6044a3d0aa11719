"""Shifted-window self-attention over sparse voxels, and 3D absolute position encoding.

Voxels attend only to the voxels of their own ``window^3`` cube (:func:`window_partition`); with the
windows shifted by half a window on every other layer, information crosses window borders while
each layer stays linear in the number of voxels. Windows hold different numbers of voxels, so the
attention is variable-length: FlashAttention's varlen kernel on CUDA when it is installed (bf16 or
fp16 inputs), otherwise PyTorch's SDPA over windows padded to a common length with a key mask.
:func:`window_attention_reference` is the plain per-window loop both are tested against.
"""

from __future__ import annotations

import itertools
import math
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F

from meshforge.runtime import SdpaBackend, has_module, sdpa
from meshforge.sparse.tensor import SparseTensor, Windows


def sinusoidal_position_encoding(xyz: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """``[N, dim]`` sin/cos features of integer positions ``xyz[N, 3]``, one third of the channels per axis.

    Each axis gets ``2 * (dim // 6)`` channels with geometric frequencies from 1 down to
    ``1 / max_period`` (the Transformer's encoding per axis); leftover channels are zero.
    """
    half = dim // 6
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=xyz.device, dtype=torch.float32) / max(half, 1))
    angles = xyz.float()[:, :, None] * freqs  # [N, 3, half]
    enc = torch.cat([angles.sin(), angles.cos()], dim=-1).reshape(len(xyz), -1)
    return F.pad(enc, (0, dim - enc.shape[1]))


def _flash_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: Windows) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    cu = windows.cu_seqlens
    return flash_attn_varlen_func(q, k, v, cu, cu, windows.max_len, windows.max_len)


def _padded_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: Windows,
                 backend: SdpaBackend = "any") -> torch.Tensor:
    lengths = windows.cu_seqlens.diff().long()
    if windows.count * windows.max_len == len(q):
        # Windows of one length (a batch of one sequence): a plain reshape, and no mask, so that
        # every kernel (flash included) can take the call.
        shape = (windows.count, windows.max_len, *q.shape[1:])
        out = sdpa(*(t.view(shape).transpose(1, 2) for t in (q, k, v)), backend=backend)
        return out.transpose(1, 2).reshape(q.shape)
    slot = torch.arange(len(q), device=q.device) - windows.cu_seqlens[:-1].long()[windows.window_ids]
    shape = (windows.count, windows.max_len, *q.shape[1:])

    def pad(t: torch.Tensor) -> torch.Tensor:
        out = t.new_zeros(shape)
        out[windows.window_ids, slot] = t
        return out.transpose(1, 2)  # [W, H, L, D]

    valid = torch.arange(windows.max_len, device=q.device)[None, :] < lengths[:, None]
    # Padded query rows see their window's real keys (never an empty row), and are dropped below.
    out = sdpa(pad(q), pad(k), pad(v), attn_mask=valid[:, None, None, :], backend=backend)
    return out.transpose(1, 2)[windows.window_ids, slot]


def _sdpa_per_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: Windows,
                     backend: SdpaBackend) -> torch.Tensor:
    bounds = windows.cu_seqlens.tolist()
    outs = [sdpa(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)), backend=backend)[0].transpose(0, 1)
            for a, b in itertools.pairwise(bounds)]
    return torch.cat(outs) if outs else torch.empty_like(q)


# Up to this many windows of different lengths (full attention over the items of a batch), one call
# per window: without a padding mask SDPA can run its flash kernel, whereas a mask sends it to the
# memory-efficient one, which took 0.66 s forward per call at 123k tokens on an H200 (the profile in
# benchmarks/results/ss_dit_profile_before_fixes.json).
FEW_WINDOWS = 8

DenseBackend = Literal["auto", "any", "flash", "cudnn", "efficient", "math"]


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: Windows,
                     backend: DenseBackend = "auto") -> torch.Tensor:
    """Softmax attention within each window; ``q, k, v``: ``[N, heads, head_dim]`` in window order.

    ``auto``: FlashAttention's varlen kernel where it can run, else SDPA over the windows (one call
    each when there are few, else padded); any other ``backend`` is that SDPA kernel set
    (:data:`meshforge.runtime.SDPA_BACKENDS`).
    """
    if backend == "auto":
        if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and has_module("flash_attn"):
            return _flash_varlen(q, k, v, windows)
        backend = "any"
    if 1 < windows.count <= FEW_WINDOWS and windows.count * windows.max_len != len(q):
        return _sdpa_per_window(q, k, v, windows, backend)
    return _padded_sdpa(q, k, v, windows, backend)


def window_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, windows: Windows) -> torch.Tensor:
    """The definition, one window at a time (for tests)."""
    out = torch.empty_like(q)
    bounds = windows.cu_seqlens.tolist()
    for a, b in itertools.pairwise(bounds):
        qw, kw, vw = (t[a:b].transpose(0, 1) for t in (q, k, v))  # [H, n, D]
        scores = qw @ kw.transpose(1, 2) / math.sqrt(q.shape[-1])
        out[a:b] = (scores.softmax(-1) @ vw).transpose(0, 1)
    return out


class SparseWindowAttention(nn.Module):
    """Multi-head self-attention within ``window^3`` cubes, optionally shifted by ``window // 2``."""

    def __init__(self, dim: int, heads: int, window: int, shifted: bool = False) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by {heads} heads")
        self.heads, self.window = heads, window
        self.shift = window // 2 if shifted else 0
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: SparseTensor) -> SparseTensor:
        windows = x.windows(self.window, self.shift)
        n, dim = x.feats.shape
        q, k, v = self.qkv(x.feats)[windows.perm].view(n, 3, self.heads, dim // self.heads).unbind(1)
        grouped = window_attention(q, k, v, windows).reshape(n, dim)
        out = grouped.new_empty(n, dim)
        out[windows.perm] = grouped  # back to the tensor's own voxel order
        return x.replace(self.proj(out))

"""Shifted-window self-attention over sparse voxels, and 3D absolute position encoding.

Voxels attend only to the voxels of their own ``window^3`` cube (:func:`window_partition`); with the
windows shifted by half a window on every other layer, information crosses window borders while
each layer stays linear in the number of voxels. Windows hold different numbers of voxels, so the
attention is variable-length: :func:`meshforge.kernels.attention.varlen_attention` over the windows.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from meshforge.kernels.attention import varlen_attention
from meshforge.sparse.tensor import SparseTensor


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
        grouped = varlen_attention(q, k, v, windows.cu_seqlens, windows.max_len).reshape(n, dim)
        out = grouped.new_empty(n, dim)
        out[windows.perm] = grouped  # back to the tensor's own voxel order
        return x.replace(self.proj(out))

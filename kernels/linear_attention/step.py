"""One decoding position of decayed linear attention against a cached state (every device)."""

from __future__ import annotations

import torch
from meshforge.kernels.linear_attention.naive import default_scale
from torch import Tensor


def linear_attention_step(
    q: Tensor, k: Tensor, v: Tensor, decay: Tensor, state: Tensor, scale: float | None = None
) -> Tensor:
    """One decoding position: ``state <- decay * state + k^T v`` in place, returns ``scale * q state``.

    ``q, k: [B, H, D_k]``, ``v: [B, H, D_v]``, ``decay: [H]`` (``exp(-slopes)``), ``state:
    [B, H, D_k, D_v]`` float32. In-place updates on the caller's buffer keep the cache static
    (no allocation of state-sized tensors, capturable in a CUDA graph); for a single position this
    is the same three small batched GEMMs a fused recurrent kernel would do. Output in ``q.dtype``.
    """
    scale = default_scale(q, scale)
    q_dtype = q.dtype
    batch, heads, dk = q.shape
    flat = state.view(batch * heads, dk, -1)
    state.mul_(decay[:, None, None])
    q, k, v = (t.reshape(batch * heads, -1).float() for t in (q, k, v))
    flat.baddbmm_(k[:, :, None], v[:, None, :])
    out = torch.baddbmm(flat[:, :1], q[:, None, :], flat, beta=0, alpha=scale)  # scale * q S
    return out.view(batch, heads, -1).to(q_dtype)

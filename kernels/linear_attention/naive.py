"""Decayed causal linear attention by its definition: iFlame's decay rates and the recurrence, one position at a time."""

from __future__ import annotations

import torch
from torch import Tensor


def decay_slopes(n_heads: int) -> Tensor:
    """iFlame's per-head decay rates ``s_h = 2^(-8 (h + 1) / H)`` (float32, ``[H]``).

    Head 0 forgets fastest (per-step factor ``exp(-2^(-8/H))``), the last head slowest
    (``exp(-1/256)``, an effective window of a few hundred positions).
    """
    h = torch.arange(1, n_heads + 1, dtype=torch.float64)
    return torch.exp2(-8.0 * h / n_heads).float()


def default_scale(q: Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def state_or_zeros(state: Tensor | None, q: Tensor, v: Tensor) -> Tensor:
    """A float32 copy of ``state``, or zeros; ``q, v`` are ``[B, H, T, D]``."""
    if state is not None:
        return state.float().clone()
    return torch.zeros(*q.shape[:2], q.shape[-1], v.shape[-1], dtype=torch.float32, device=q.device)


def linear_attention_naive(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slopes: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    scale: float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The defining recurrence, position by position, in float32 (reference for tests only)."""
    scale = default_scale(q, scale)
    q, k, v = (x.float().transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    decay = torch.exp(-slopes.float().to(q.device))[:, None, None]
    state = state_or_zeros(initial_state, q, v)
    out = torch.empty_like(v)
    for t in range(q.shape[2]):
        state = decay * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        out[:, :, t] = scale * torch.einsum("bhk,bhkv->bhv", q[:, :, t], state)
    return out.transpose(1, 2), (state if output_final_state else None)

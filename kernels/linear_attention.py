"""Causal linear attention with a constant per-head decay (iFlame's "Lightning"-style layers).

For each head h with slope ``s_h > 0`` the layer keeps a ``d_k x d_v`` state and, per position t::

    S_t = exp(-s_h) * S_{t-1} + k_t^T v_t
    o_t = scale * q_t S_t

i.e. ``o_t = scale * sum_{j <= t} exp(-s_h (t - j)) (q_t . k_j) v_j``: attention without softmax whose
weights fade geometrically with distance. iFlame's slopes are the ALiBi ones,
``s_h = 2^(-8 (h + 1) / H)`` (:func:`decay_slopes`), identical in every layer.

Layout is ``[B, T, H, D]`` throughout (fla-core's), states are ``[B, H, D_k, D_v]`` in float32.
Three implementations of the same map:

- :func:`linear_attention_naive`: the recurrence above, one position at a time (the reference);
- :func:`linear_attention_chunked`: pure PyTorch, chunks of 64 positions: decay-masked attention
  inside a chunk plus the state carried in from the previous chunks (the CPU path);
- fla-core's Triton kernels on CUDA: ``chunk_simple_gla`` with ``g_gamma = -s`` (log-decay per head).

:func:`linear_attention` dispatches between the last two; :func:`linear_attention_step` advances
a cached state by one position in place (what decoding uses on every device).
"""

from __future__ import annotations

import torch
from torch import Tensor

CHUNK_SIZE = 64


def decay_slopes(n_heads: int) -> Tensor:
    """iFlame's per-head decay rates ``s_h = 2^(-8 (h + 1) / H)`` (float32, ``[H]``).

    Head 0 forgets fastest (per-step factor ``exp(-2^(-8/H))``), the last head slowest
    (``exp(-1/256)``, an effective window of a few hundred positions).
    """
    h = torch.arange(1, n_heads + 1, dtype=torch.float64)
    return torch.exp2(-8.0 * h / n_heads).float()


def _default_scale(q: Tensor, scale: float | None) -> float:
    return q.shape[-1] ** -0.5 if scale is None else scale


def _initial_state(state: Tensor | None, q: Tensor, v: Tensor) -> Tensor:
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
    scale = _default_scale(q, scale)
    q, k, v = (x.float().transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    decay = torch.exp(-slopes.float().to(q.device))[:, None, None]
    state = _initial_state(initial_state, q, v)
    out = torch.empty_like(v)
    for t in range(q.shape[2]):
        state = decay * state + k[:, :, t, :, None] * v[:, :, t, None, :]
        out[:, :, t] = scale * torch.einsum("bhk,bhkv->bhv", q[:, :, t], state)
    return out.transpose(1, 2), (state if output_final_state else None)


def linear_attention_chunked(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slopes: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    scale: float | None = None,
    chunk_size: int = CHUNK_SIZE,
) -> tuple[Tensor, Tensor | None]:
    """Chunk-parallel form of the recurrence in pure PyTorch (float32 inside, output in ``q.dtype``).

    Within a chunk of ``C`` positions starting with state ``S``, position ``i`` (0-based) sees::

        o_i = scale * ( (q_i gamma^(i+1)) S  +  sum_{j <= i} gamma^(i-j) (q_i . k_j) v_j )

    and the chunk hands on ``gamma^C S + sum_j gamma^(C-1-j) k_j^T v_j``. Exponents are never
    negative, so nothing overflows however fast a head decays; a short last chunk simply uses the
    leading rows of the decay tables.
    """
    scale = _default_scale(q, scale)
    out_dtype = q.dtype
    q, k, v = (x.float().transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    seq_len = q.shape[2]
    log_decay = -slopes.float().to(q.device)[:, None]  # [H, 1]
    steps = torch.arange(chunk_size + 1, device=q.device, dtype=torch.float32)
    decay_pow = torch.exp(log_decay * steps)  # gamma^0 .. gamma^C, [H, C+1]
    distance = steps[:chunk_size, None] - steps[None, :chunk_size]  # i - j
    intra = torch.exp(log_decay[:, :, None] * distance.clamp(min=0)) * (distance >= 0)  # [H, C, C]

    state = _initial_state(initial_state, q, v)
    out = torch.empty_like(v)
    for start in range(0, seq_len, chunk_size):
        n = min(chunk_size, seq_len - start)
        qc, kc, vc = (x[:, :, start : start + n] for x in (q, k, v))
        scores = (qc @ kc.transpose(-1, -2)) * intra[:, :n, :n]
        carried = (qc * decay_pow[:, 1 : n + 1, None]) @ state
        out[:, :, start : start + n] = scale * (carried + scores @ vc)
        k_to_end = kc * decay_pow[:, :n].flip(-1)[..., None]  # gamma^(n-1-j)
        state = decay_pow[:, n, None, None] * state + k_to_end.transpose(-1, -2) @ vc
    return out.transpose(1, 2).to(out_dtype), (state if output_final_state else None)


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slopes: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    scale: float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Decayed causal linear attention over whole sequences; fla-core's Triton kernel on CUDA.

    ``q, k: [B, T, H, D_k]``, ``v: [B, T, H, D_v]``, ``slopes: [H]`` (positive decay rates),
    ``initial_state: [B, H, D_k, D_v]``. ``scale`` defaults to ``D_k ** -0.5`` (fla's default too).
    Returns the output ``[B, T, H, D_v]`` in ``q.dtype`` and, when asked, the final state.
    """
    if q.is_cuda:
        from fla.ops.simple_gla import chunk_simple_gla  # Triton: imported only where it can run

        o, final = chunk_simple_gla(
            q, k, v, g_gamma=-slopes.float(), scale=_default_scale(q, scale),
            initial_state=initial_state, output_final_state=output_final_state,
        )
        return o, final
    return linear_attention_chunked(q, k, v, slopes, initial_state, output_final_state, scale)


def linear_attention_step(
    q: Tensor, k: Tensor, v: Tensor, decay: Tensor, state: Tensor, scale: float | None = None
) -> Tensor:
    """One decoding position: ``state <- decay * state + k^T v`` in place, returns ``scale * q state``.

    ``q, k: [B, H, D_k]``, ``v: [B, H, D_v]``, ``decay: [H]`` (``exp(-slopes)``), ``state:
    [B, H, D_k, D_v]`` float32. In-place updates on the caller's buffer keep the cache static
    (no allocation of state-sized tensors, capturable in a CUDA graph); for a single position this
    is the same three small batched GEMMs a fused recurrent kernel would do. Output in ``q.dtype``.
    """
    scale = _default_scale(q, scale)
    q_dtype = q.dtype
    batch, heads, dk = q.shape
    flat = state.view(batch * heads, dk, -1)
    state.mul_(decay[:, None, None])
    q, k, v = (t.reshape(batch * heads, -1).float() for t in (q, k, v))
    flat.baddbmm_(k[:, :, None], v[:, None, :])
    out = torch.baddbmm(flat[:, :1], q[:, None, :], flat, beta=0, alpha=scale)  # scale * q S
    return out.view(batch, heads, -1).to(q_dtype)


__all__ = [
    "CHUNK_SIZE",
    "decay_slopes",
    "linear_attention",
    "linear_attention_chunked",
    "linear_attention_naive",
    "linear_attention_step",
]

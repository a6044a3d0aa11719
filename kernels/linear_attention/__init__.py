"""Causal linear attention with a constant per-head decay (iFlame's "Lightning"-style layers).

For each head h with slope ``s_h > 0`` the layer keeps a ``d_k x d_v`` state and, per position t::

    S_t = exp(-s_h) * S_{t-1} + k_t^T v_t
    o_t = scale * q_t S_t

i.e. ``o_t = scale * sum_{j <= t} exp(-s_h (t - j)) (q_t . k_j) v_j``: attention without softmax whose
weights fade geometrically with distance. iFlame's slopes are the ALiBi ones,
``s_h = 2^(-8 (h + 1) / H)`` (:func:`decay_slopes`), identical in every layer.

Layout is ``[B, T, H, D]`` throughout (fla-core's), states are ``[B, H, D_k, D_v]`` in float32.
Implementations of the same map:

- :func:`linear_attention_naive`: the recurrence above, one position at a time (the reference);
- :func:`linear_attention_chunked`: pure PyTorch, chunks of 64 positions: decay-masked attention
  inside a chunk plus the state carried in from the previous chunks (the CPU path);
- :func:`linear_attention_parallel`: the same with one chunk spanning the sequence,
  ``O = scale ((Q K^T) * W) V`` with the decay mask ``W[t, j] = exp(-s (t - j))`` for ``j <= t``:
  quadratic in T, like softmax attention without the softmax (the reference of the next one);
- ``parallel_triton``: that parallel form fused in Triton, FlashAttention-style (the ``[T, T]``
  weights never reach memory, the backward recomputes them; memory ``O(T D)``); training on
  CUDA at short lengths;
- fla-core's Triton kernels on CUDA: ``chunk_simple_gla`` with ``g_gamma = -s`` (log-decay per head).

:func:`linear_attention` chooses by device and length (:func:`cuda_form`); :func:`linear_attention_step`
advances a cached state by one position in place (what decoding uses on every device).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

CHUNK_SIZE = 64
# Longest sequence the fused parallel kernel takes on CUDA; fla's chunked kernels take longer ones.
# The parallel form costs ~T^2 D FLOPs per head against the chunked form's ~T (C + D) D (C = 64),
# but fla launches several kernels per call (local cumsum, state passing, output; more backward)
# with fixed costs that dominate at iFlame's head dim 32 and short lengths. Memory is not the
# limit: the fused kernel never holds the [B, H, T, T] weights (unfused, at batch 48 and 16 heads
# they would take 1.0 GB in bf16 at T = 801, the face level of 800-face meshes, 8.9 GB at its
# vertex level and 80 GB at its token level, T = 7,209). 1024 covers the synth data's token level
# (~1.1k) and every coarser level; the lead sets it from benchmarks/linear_attention_forms.py's
# crossover on the H200 (the JSON's ``crossover_len``).
PARALLEL_MAX_LEN = 1024


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


def linear_attention_parallel(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slopes: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    scale: float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """The decay-masked quadratic form ``scale ((Q K^T) * W) V`` (+ the carried state), in PyTorch.

    The chunked form with a single chunk the length of the sequence: its ``[H, T, T]`` decay table
    is ``exp(-s relu(t - j))`` masked to ``j <= t``, which underflows to 0 far from the diagonal and
    never overflows. Float32 inside; keeps ``[B, H, T, T]`` scores for autograd, so it is a
    reference (of the fused kernel) rather than a path for long sequences.
    """
    return linear_attention_chunked(q, k, v, slopes, initial_state, output_final_state, scale, max(q.shape[1], 1))


Form = Literal["parallel", "chunked"]


def cuda_form(seq_len: int, stateful: bool) -> Form:
    """Which CUDA kernel :func:`linear_attention` runs: the fused parallel one up to PARALLEL_MAX_LEN
    positions when no state goes in or comes out (training's case), fla's chunked kernels otherwise."""
    return "parallel" if seq_len <= PARALLEL_MAX_LEN and not stateful else "chunked"


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slopes: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    scale: float | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Decayed causal linear attention over whole sequences; Triton kernels on CUDA (:func:`cuda_form`).

    ``q, k: [B, T, H, D_k]``, ``v: [B, T, H, D_v]``, ``slopes: [H]`` (positive decay rates),
    ``initial_state: [B, H, D_k, D_v]``. ``scale`` defaults to ``D_k ** -0.5`` (fla's default too).
    Returns the output ``[B, T, H, D_v]`` in ``q.dtype`` and, when asked, the final state.
    On CPU the chunked form runs at every length: up to 64 positions it is the parallel form, beyond
    it does fewer FLOPs, and there are no kernel launches to amortise.
    """
    if not q.is_cuda:
        return linear_attention_chunked(q, k, v, slopes, initial_state, output_final_state, scale)
    scale = _default_scale(q, scale)
    if cuda_form(q.shape[1], initial_state is not None or output_final_state) == "parallel":
        from meshforge.kernels.linear_attention.parallel_triton import linear_attention_parallel_triton

        return linear_attention_parallel_triton(q, k, v, slopes, scale), None
    from fla.ops.simple_gla import chunk_simple_gla  # Triton: imported only where it can run

    return chunk_simple_gla(
        q, k, v, g_gamma=-slopes.float(), scale=scale,
        initial_state=initial_state, output_final_state=output_final_state,
    )  # fmt: skip


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
    "PARALLEL_MAX_LEN",
    "cuda_form",
    "decay_slopes",
    "linear_attention",
    "linear_attention_chunked",
    "linear_attention_naive",
    "linear_attention_parallel",
    "linear_attention_step",
]

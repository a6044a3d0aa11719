"""The chunk-parallel PyTorch forms of decayed linear attention (the CPU path, and the fused kernel's reference)."""

from __future__ import annotations

import torch
from meshforge.kernels.linear_attention.naive import default_scale, state_or_zeros
from torch import Tensor

CHUNK_SIZE = 64


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
    scale = default_scale(q, scale)
    out_dtype = q.dtype
    q, k, v = (x.float().transpose(1, 2) for x in (q, k, v))  # [B, H, T, D]
    seq_len = q.shape[2]
    log_decay = -slopes.float().to(q.device)[:, None]  # [H, 1]
    steps = torch.arange(chunk_size + 1, device=q.device, dtype=torch.float32)
    decay_pow = torch.exp(log_decay * steps)  # gamma^0 .. gamma^C, [H, C+1]
    distance = steps[:chunk_size, None] - steps[None, :chunk_size]  # i - j
    intra = torch.exp(log_decay[:, :, None] * distance.clamp(min=0)) * (distance >= 0)  # [H, C, C]

    state = state_or_zeros(initial_state, q, v)
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

"""Causal linear attention with a constant per-head decay (iFlame's "Lightning"-style layers).

For each head h with slope ``s_h > 0`` the layer keeps a ``d_k x d_v`` state and, per position t::

    S_t = exp(-s_h) * S_{t-1} + k_t^T v_t
    o_t = scale * q_t S_t

i.e. ``o_t = scale * sum_{j <= t} exp(-s_h (t - j)) (q_t . k_j) v_j``: attention without softmax whose
weights fade geometrically with distance. iFlame's slopes are the ALiBi ones,
``s_h = 2^(-8 (h + 1) / H)`` (:func:`decay_slopes`), identical in every layer.

Layout is ``[B, T, H, D]`` throughout (fla-core's), states are ``[B, H, D_k, D_v]`` in float32.
Implementations of the same map:

- :func:`linear_attention_naive` (``naive.py``): the recurrence above, one position at a time (the reference);
- :func:`linear_attention_chunked` (``chunked.py``): pure PyTorch, chunks of 64 positions: decay-masked attention
  inside a chunk plus the state carried in from the previous chunks (the CPU path);
- :func:`linear_attention_parallel`: the same with one chunk spanning the sequence,
  ``O = scale ((Q K^T) * W) V`` with the decay mask ``W[t, j] = exp(-s (t - j))`` for ``j <= t``:
  quadratic in T, like softmax attention without the softmax (the reference of the next one);
- ``parallel_triton``: that parallel form fused in Triton, FlashAttention-style (the ``[T, T]``
  weights never reach memory, the backward recomputes them; memory ``O(T D)``); training on
  CUDA at short lengths;
- fla-core's Triton kernels on CUDA: ``chunk_simple_gla`` with ``g_gamma = -s`` (log-decay per head).

:func:`linear_attention` chooses by device and length (:func:`cuda_form`); :func:`linear_attention_step`
(``step.py``) advances a cached state by one position in place (what decoding uses on every device).
"""

from __future__ import annotations

import functools
import os
from typing import Literal

import torch
from meshforge.kernels.linear_attention.chunked import (
    CHUNK_SIZE,
    linear_attention_chunked,
    linear_attention_parallel,
)
from meshforge.kernels.linear_attention.fla_configs import apply_configs
from meshforge.kernels.linear_attention.naive import decay_slopes, default_scale, linear_attention_naive
from meshforge.kernels.linear_attention.step import linear_attention_step
from meshforge.kernels.utils import resolve_backend
from torch import Tensor

# Longest sequence the fused parallel kernel takes on CUDA; fla's chunked kernels take longer ones.
# The parallel form costs ~T^2 D FLOPs per head against the chunked form's ~T (C + D) D (C = 64),
# but fla launches several kernels per call (local cumsum, state passing, output; more backward)
# with fixed costs that dominate at iFlame's head dim 32 and short lengths. Memory is not the
# limit: the fused kernel never holds the [B, H, T, T] weights (unfused, at batch 48 and 16 heads
# they would take 1.0 GB in bf16 at T = 801, the face level of 800-face meshes, 8.9 GB at its
# vertex level and 80 GB at its token level, T = 7,209). The value is benchmarks/linear_attention_forms.py's
# crossover on the H200 (the JSON's ``crossover_len``: fwd+bwd 0.98 vs 1.59 ms at 1,792 positions,
# 1.22 vs 1.45 ms at 2,048, 3.79 vs 1.90 ms at 4,096); it covers the synth data's token level (~1.1k
# on average) and, under torch.compile, keeps fla's graph break out of all but long batches.
PARALLEL_MAX_LEN = 2048


Form = Literal["parallel", "chunked"]
# "triton" is the CUDA choice of cuda_form; "parallel_triton" / "chunk_triton" force one of its kernels.
LinearBackend = Literal["auto", "triton", "parallel_triton", "chunk_triton", "torch", "reference"]
FORMS = ("triton", "parallel_triton", "chunk_triton", "torch", "reference")


def cuda_form(seq_len: int, stateful: bool) -> Form:
    """Which CUDA kernel :func:`linear_attention` runs: the fused parallel one up to PARALLEL_MAX_LEN
    positions when no state goes in or comes out (training's case), fla's chunked kernels otherwise."""
    return "parallel" if seq_len <= PARALLEL_MAX_LEN and not stateful else "chunked"


def guard_cuda_forms(lengths: tuple[int, ...], device: torch.device) -> None:
    """Evaluate :func:`cuda_form` (stateless) for each length on CUDA, where the caller's compiled graph
    should guard on it: a model calls this in the frame torch.compile enters. Past PARALLEL_MAX_LEN
    fla's kernel breaks the graph inside a block, and dynamo keeps only the guards it traced before the
    call that broke; without these, the entry compiled for a long batch has no lower bound on the
    length and is also taken by every shorter batch, which then runs in pieces (seen on an H200)."""
    if device.type == "cuda":
        for length in lengths:
            cuda_form(length, stateful=False)


@functools.cache
def _fla_chunk_simple_gla():
    """fla's chunked kernel, imported on first use (Triton: only where it can run)."""
    # fla's kernels autotune over many configs on their first call in a process (most of the ~100 s
    # first step on a fresh machine, with compiling). The configs recorded on this GPU model skip that
    # on any machine (fla_configs); Triton's on-disk autotune cache keeps what is still tuned here,
    # so later processes on the machine neither re-time it nor pick differently.
    os.environ.setdefault("TRITON_CACHE_AUTOTUNING", "1")
    from fla.ops.simple_gla import chunk_simple_gla

    if torch.cuda.is_available():
        apply_configs(torch.cuda.get_device_name())
    return chunk_simple_gla


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slopes: Tensor,
    initial_state: Tensor | None = None,
    output_final_state: bool = False,
    scale: float | None = None,
    backend: LinearBackend = "auto",
) -> tuple[Tensor, Tensor | None]:
    """Decayed causal linear attention over whole sequences; Triton kernels on CUDA (:func:`cuda_form`).

    ``q, k: [B, T, H, D_k]``, ``v: [B, T, H, D_v]``, ``slopes: [H]`` (positive decay rates),
    ``initial_state: [B, H, D_k, D_v]``. ``scale`` defaults to ``D_k ** -0.5`` (fla's default too).
    Returns the output ``[B, T, H, D_v]`` in ``q.dtype`` and, when asked, the final state.
    On CPU the chunked form runs at every length: up to 64 positions it is the parallel form, beyond
    it does fewer FLOPs, and there are no kernel launches to amortise. ``backend``: ``torch`` is the
    chunked form, ``reference`` the recurrence (:mod:`.naive`), ``triton`` the CUDA choice,
    ``parallel_triton`` (no states) / ``chunk_triton`` one CUDA kernel whatever the length.
    """
    form = resolve_backend("linear_attention", backend, q.is_cuda, FORMS)
    stateful = initial_state is not None or output_final_state
    if form == "reference":
        return linear_attention_naive(q, k, v, slopes, initial_state, output_final_state, scale)
    if form == "torch":
        return _chunked_eager(q, k, v, slopes, initial_state, output_final_state, scale)
    scale = default_scale(q, scale)
    if form == "triton":
        form = "parallel_triton" if cuda_form(q.shape[1], stateful) == "parallel" else "chunk_triton"
    if form == "parallel_triton":
        if stateful:
            raise ValueError("linear_attention: the parallel Triton form takes and returns no state")
        from meshforge.kernels.linear_attention.parallel_triton import linear_attention_parallel_triton

        return linear_attention_parallel_triton(q, k, v, slopes, scale), None
    return _fla_chunk(q, k, v, slopes, scale, initial_state, output_final_state)


# Eager under torch.compile, behind a graph break: its loop over chunks makes the trace depend on
# the length, so a compiled model would recompile for every new length (and past the recompile limit
# fall back to compiling each module alone) instead of treating the length as dynamic.
_chunked_eager = torch.compiler.disable(linear_attention_chunked)


# Run eagerly under torch.compile, behind one graph break: where fla itself puts its kernel (fla 0.6.0
# marks chunk_simple_gla torch.compiler.disable). Dynamo would otherwise trace the loader above (it
# ignores functools.cache), and on the first call that ran fla's imports, whose version checks through
# packaging it cannot run: torch 2.11 stopped train-iflame --compile there on an H200.
@torch.compiler.disable
def _fla_chunk(
    q: Tensor, k: Tensor, v: Tensor, slopes: Tensor, scale: float,
    initial_state: Tensor | None, output_final_state: bool,
) -> tuple[Tensor, Tensor | None]:  # fmt: skip
    return _fla_chunk_simple_gla()(
        q, k, v, g_gamma=-slopes.float(), scale=scale,
        initial_state=initial_state, output_final_state=output_final_state,
    )  # fmt: skip


__all__ = [
    "CHUNK_SIZE",
    "FORMS",
    "PARALLEL_MAX_LEN",
    "LinearBackend",
    "cuda_form",
    "decay_slopes",
    "guard_cuda_forms",
    "linear_attention",
    "linear_attention_chunked",
    "linear_attention_naive",
    "linear_attention_parallel",
    "linear_attention_step",
]

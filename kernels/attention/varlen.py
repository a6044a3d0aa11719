"""Softmax attention within each of many variable-length sequences of ``[N, H, D]`` rows.

Sequence ``s`` owns rows ``cu_seqlens[s]:cu_seqlens[s + 1]`` (the windows of window attention, or the
items of a batch). FlashAttention's varlen kernel on CUDA when it is installed (bf16 or fp16 inputs),
otherwise PyTorch's SDPA: one call per sequence when there are few of different lengths, else one
call over the sequences padded to a common length with a key mask.
"""

from __future__ import annotations

import itertools

import torch
from meshforge.kernels.attention.causal import DENSE_BACKENDS, DenseBackend, flash_attn_runs
from meshforge.kernels.attention.reference import varlen_attention_reference
from meshforge.kernels.attention.sdpa import SdpaBackend, sdpa
from meshforge.kernels.utils import group_ids
from torch import Tensor

# Up to this many sequences of different lengths (full attention over the items of a batch), one call
# per sequence: without a padding mask SDPA can run its flash kernel, whereas a mask sends it to the
# memory-efficient one, which took 0.66 s forward per call at 123k tokens on an H200 (the profile in
# benchmarks/results/ss_dit_profile_before_fixes.json).
FEW_SEQUENCES = 8


def _flash_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int) -> Tensor:
    from flash_attn import flash_attn_varlen_func

    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen)


def _padded_sdpa(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                 backend: SdpaBackend = "any") -> Tensor:
    count = len(cu_seqlens) - 1
    shape = (count, max_seqlen, *q.shape[1:])
    if count * max_seqlen == len(q):
        # Sequences of one length (a batch of one item): a plain reshape, and no mask, so that
        # every kernel (flash included) can take the call.
        out = sdpa(*(t.view(shape).transpose(1, 2) for t in (q, k, v)), backend=backend)
        return out.transpose(1, 2).reshape(q.shape)
    lengths = cu_seqlens.diff().long()
    seq = group_ids(lengths, total=len(q))
    slot = torch.arange(len(q), device=q.device) - cu_seqlens[:-1].long()[seq]

    def pad(t: Tensor) -> Tensor:
        out = t.new_zeros(shape)
        out[seq, slot] = t
        return out.transpose(1, 2)  # [S, H, L, D]

    valid = torch.arange(max_seqlen, device=q.device)[None, :] < lengths[:, None]
    # Padded query rows see their sequence's real keys (never an empty row), and are dropped below.
    out = sdpa(pad(q), pad(k), pad(v), attn_mask=valid[:, None, None, :], backend=backend)
    return out.transpose(1, 2)[seq, slot]


def _sdpa_per_sequence(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, backend: SdpaBackend) -> Tensor:
    outs = [sdpa(*(t[a:b].transpose(0, 1)[None] for t in (q, k, v)), backend=backend)[0].transpose(0, 1)
            for a, b in itertools.pairwise(cu_seqlens.tolist())]
    return torch.cat(outs) if outs else torch.empty_like(q)


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, cu_seqlens: Tensor, max_seqlen: int,
                     backend: DenseBackend = "auto") -> Tensor:
    """Softmax attention within each sequence; ``q, k, v: [N, H, D]``, ``cu_seqlens[S + 1]`` int32.

    ``auto``: FlashAttention's varlen kernel where it can run, else SDPA over the sequences (one call
    each when there are few, else padded); ``flash_attn`` forces the former, ``reference`` the
    definition, and any other ``backend`` is that SDPA kernel set (:data:`meshforge.kernels.attention.SDPA_BACKENDS`).
    """
    if backend not in DENSE_BACKENDS:
        raise ValueError(f"varlen_attention: unknown backend {backend!r} (known: {', '.join(DENSE_BACKENDS)})")
    if backend == "flash_attn" or (backend == "auto" and flash_attn_runs(q)):
        return _flash_varlen(q, k, v, cu_seqlens, max_seqlen)
    if backend == "reference":
        return varlen_attention_reference(q, k, v, cu_seqlens)
    sdpa_backend = "any" if backend == "auto" else backend
    count = len(cu_seqlens) - 1
    if 1 < count <= FEW_SEQUENCES and count * max_seqlen != len(q):
        return _sdpa_per_sequence(q, k, v, cu_seqlens, sdpa_backend)
    return _padded_sdpa(q, k, v, cu_seqlens, max_seqlen, sdpa_backend)

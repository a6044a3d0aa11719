"""Decoding attention by SDPA over the valid prefix of the cache: the CPU path and the tests' reference."""

from __future__ import annotations

from meshforge.kernels.attention import sdpa
from torch import Tensor


def decode_attention_reference(q: Tensor, k_cache: Tensor, v_cache: Tensor, length: Tensor) -> Tensor:
    """The first ``length`` cached positions through SDPA (reads ``length`` on the host)."""
    n = int(length)
    # A new key length at every step: with cuDNN's per-shape plans a first generation ran ~8x slower (H200).
    return sdpa(q[:, :, None], k_cache[:, :, :n], v_cache[:, :, :n])[:, :, 0]

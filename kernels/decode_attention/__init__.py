"""One new query per sequence against a static K/V cache whose valid length lives on the device.

Decoding appends one key/value per step to buffers ``[B, H, L_max, D]`` allocated once. When the
number of valid positions is a device tensor rather than a Python int, a decoding step has the same
shapes and the same launches at every position and never waits on the host, so it can be captured
once as a CUDA graph and replayed for every token (:mod:`meshforge.sample.decoding`).

- :func:`decode_attention_reference` (``reference.py``): torch's ``scaled_dot_product_attention`` over the first
  ``length`` positions (the CPU path and the reference of the tests);
- ``split_k.decode_attention_triton``: split-K "flash-decoding" in Triton. The key axis is cut
  into slices; one program per (sequence x head, slice) reduces its slice, up to the valid
  length read from memory, to a running max, a softmax denominator and a weighted value sum, and a
  second kernel merges the slices. Slices past the length store an empty partial and cost one
  load, so the work follows the valid length, not ``L_max``;
- :func:`decode_attention`: the Triton form on CUDA, the reference elsewhere (``backend`` forces one). The Triton module is
  imported on first use (tests set ``TRITON_INTERPRET=1`` before it is, to run it on a CPU).

All forms: ``q: [B, H, D]``, caches ``[B, H, L_max, D]`` (the new position already written),
``length``: a one-element integer tensor, the same for every sequence (a batch decodes in lockstep);
the result is ``[B, H, D]`` in ``q.dtype``, softmax scale ``D ** -0.5``, accumulation in float32.
"""

from __future__ import annotations

from meshforge.kernels.decode_attention.reference import decode_attention_reference
from meshforge.kernels.utils import Backend, resolve_backend
from torch import Tensor


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, length: Tensor, backend: Backend = "auto") -> Tensor:
    """Decoding attention over the first ``length`` cached positions: Triton on CUDA, SDPA elsewhere."""
    if resolve_backend("decode_attention", backend, q.is_cuda, forms=("triton", "reference")) == "triton":
        from meshforge.kernels.decode_attention.split_k import decode_attention_triton

        return decode_attention_triton(q, k_cache, v_cache, length)
    return decode_attention_reference(q, k_cache, v_cache, length)


__all__ = ["decode_attention", "decode_attention_reference"]

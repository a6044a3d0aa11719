"""Dense softmax attention: the SDPA wrapper, causal attention over whole sequences, and attention
within variable-length sequences (windows, batch items). The sparse kinds are their own ops
(:mod:`meshforge.kernels.ssa`, :mod:`meshforge.kernels.decode_attention`).

Each op takes ``backend``: ``auto`` (flash-attn where it runs, else SDPA without cuDNN),
``flash_attn``, ``reference`` (:mod:`.reference`, the definition), or an SDPA kernel set
(:data:`SDPA_BACKENDS`).
"""

from meshforge.kernels.attention.causal import DENSE_BACKENDS, DenseBackend, causal_attention, flash_attn_runs
from meshforge.kernels.attention.reference import causal_attention_reference, varlen_attention_reference
from meshforge.kernels.attention.sdpa import SDPA_BACKENDS, SdpaBackend, sdpa
from meshforge.kernels.attention.varlen import FEW_SEQUENCES, varlen_attention

__all__ = [
    "DENSE_BACKENDS",
    "FEW_SEQUENCES",
    "SDPA_BACKENDS",
    "DenseBackend",
    "SdpaBackend",
    "causal_attention",
    "causal_attention_reference",
    "flash_attn_runs",
    "sdpa",
    "varlen_attention",
    "varlen_attention_reference",
]

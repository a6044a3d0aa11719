"""``torch.nn.functional.scaled_dot_product_attention`` on a named set of its kernels.

Every SDPA kernel but cuDNN's by default: cuDNN builds an execution plan for each new shape,
meshforge's attention sees a new shape at nearly every call (bucketed token lengths, sparse latents
and windows of varying sizes, a growing K/V length), and on an H200 a plan cost ~15 ms of host
time. A caller whose shapes repeat (one long sequence per step) may ask for one kernel by name.
"""

from __future__ import annotations

from typing import Literal

from torch import Tensor
from torch.nn import functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SDPA_BACKENDS: dict[str, list[SDPBackend]] = {
    "any": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "flash": [SDPBackend.FLASH_ATTENTION],
    "cudnn": [SDPBackend.CUDNN_ATTENTION],
    "efficient": [SDPBackend.EFFICIENT_ATTENTION],
    "math": [SDPBackend.MATH],
}
SdpaBackend = Literal["any", "flash", "cudnn", "efficient", "math"]


def sdpa(q: Tensor, k: Tensor, v: Tensor, *, backend: SdpaBackend = "any", **kwargs) -> Tensor:
    """``scaled_dot_product_attention(q, k, v, **kwargs)`` on the kernels of ``backend``.

    ``any`` (the default) is every kernel that takes any shape as it comes (not cuDNN); a named one
    is that kernel alone, and torch raises when it cannot run the call (flash takes no mask).
    """
    if backend not in SDPA_BACKENDS:
        raise ValueError(f"unknown SDPA backend {backend!r} (known: {', '.join(SDPA_BACKENDS)})")
    with sdpa_kernel(SDPA_BACKENDS[backend]):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)

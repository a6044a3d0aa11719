"""The SwiGLU gate: ``silu(gate) * up`` for a fused projection's ``gate_up = [gate | up]`` (last axis).

:func:`swiglu_reference` is the definition (PyTorch's ``silu`` and product, each rounded to the input's
dtype): the CPU path, what torch.compile fuses on its own, and what the tests hold the kernel to. On
CUDA, outside a compiled region, :func:`swiglu` runs one Triton kernel each way
(:mod:`meshforge.kernels.swiglu.fused`): eager PyTorch launches 2 kernels forward (the SiLU, the
product) and 4 backward (the product's two, SiLU's, and the halves' concatenation), in every block of
a host-bound training step. The kernel rounds where the reference rounds (the SiLU, the product; in
the backward each product and the gate's gradient), so both agree up to float32 rounding.
"""

from __future__ import annotations

from meshforge.kernels.utils import Backend, eager_cuda, resolve_backend
from torch import Tensor
from torch.nn import functional as F


def swiglu_reference(gate_up: Tensor) -> Tensor:
    """``gate_up [..., 2 H]`` -> ``silu(gate_up[..., :H]) * gate_up[..., H:]``, ``[..., H]``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(gate_up: Tensor, backend: Backend = "auto") -> Tensor:
    """:func:`swiglu_reference`, differentiable in ``gate_up``; the fused kernel on CUDA in eager mode."""
    if resolve_backend("swiglu", backend, eager_cuda(gate_up)) == "triton":
        from meshforge.kernels.swiglu.fused import swiglu_triton

        return swiglu_triton(gate_up)
    return swiglu_reference(gate_up)


__all__ = ["swiglu", "swiglu_reference"]

"""The SwiGLU gate: ``silu(gate) * up`` for a fused projection's ``gate_up = [gate | up]`` (last axis).

:func:`swiglu_reference` is the definition (PyTorch's ``silu`` and product, each rounded to the input's
dtype): the path "auto" takes everywhere, what torch.compile fuses on its own, and what the tests
hold the kernel to. ``backend="triton"`` runs one Triton kernel each way
(:mod:`meshforge.kernels.swiglu.fused`) where eager PyTorch launches 2 kernels forward (the SiLU, the
product) and 4 backward (the product's two, SiLU's, and the halves' concatenation). The kernel rounds
where the reference rounds (the SiLU, the product; in the backward each product and the gate's
gradient), so both agree up to float32 rounding.

It is not the default: at the short lengths where eager steps are host-bound two Triton launches
cost the host more than six aten ones (one H200 run, ``benchmarks/results/launch_overhead.json``: a
reference block's forward and backward took 333 us (full attention) / 178 us (linear) more with the
fused gate).
"""

from __future__ import annotations

from meshforge.kernels.utils import Backend, resolve_backend
from torch import Tensor
from torch.nn import functional as F


def swiglu_reference(gate_up: Tensor) -> Tensor:
    """``gate_up [..., 2 H]`` -> ``silu(gate_up[..., :H]) * gate_up[..., H:]``, ``[..., H]``."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def swiglu(gate_up: Tensor, backend: Backend = "auto") -> Tensor:
    """:func:`swiglu_reference`, differentiable in ``gate_up``; the fused kernel with ``backend="triton"``."""
    if resolve_backend("swiglu", backend, use_triton=False) == "triton":
        from meshforge.kernels.swiglu.fused import swiglu_triton

        return swiglu_triton(gate_up)
    return swiglu_reference(gate_up)


__all__ = ["swiglu", "swiglu_reference"]

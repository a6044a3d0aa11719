"""RMSNorm over the last axis with a learned gain: ``x * rsqrt(mean(x^2) + eps) * weight``, float32 inside.

:func:`rms_norm_reference` is the definition (PyTorch's ``rms_norm`` on float32 copies, the result
rounded to ``x.dtype``): the path "auto" takes everywhere, what torch.compile fuses on its own, and
what the tests hold the kernel to. ``backend="triton"`` runs one Triton kernel each way
(:mod:`meshforge.kernels.rms_norm.fused`): eager PyTorch runs the reference as three kernels (to
float32, the norm, back), and its norm kernel gives each row a thread block of its own, which at
iFlame's per-head norm on linear-attention outputs (rows of 32) ran at a third of the bandwidth.
The fused kernel reads ``x`` in its own dtype, takes many short rows per program and rounds where
the reference does (only the output), so both agree up to the order of float32 sums.

It is not the default because where eager steps are slow, at short lengths, the host is the
bottleneck, and there a Triton launch costs it more than the aten ops it replaces: in one H200 run
(``benchmarks/results/launch_overhead.json``) a norm's forward and backward took 280 us through the
kernels against 201 us through PyTorch, and a reference block's forward and backward 529 us (full
attention) / 542 us (linear) more with the fused norms.
"""

from __future__ import annotations

from meshforge.kernels.utils import Backend, resolve_backend
from torch import Tensor
from torch.nn import functional as F


def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``x [..., D]`` normalised over ``D`` in float32, times ``weight [D]``, in ``x.dtype``."""
    return F.rms_norm(x.float(), (x.shape[-1],), weight.float(), eps).to(x.dtype)


def rms_norm(x: Tensor, weight: Tensor, eps: float, backend: Backend = "auto") -> Tensor:
    """:func:`rms_norm_reference`, differentiable in ``x`` and ``weight``; the fused kernel with ``backend="triton"``."""
    if resolve_backend("rms_norm", backend, use_triton=False) == "triton":
        from meshforge.kernels.rms_norm.fused import rms_norm_triton

        return rms_norm_triton(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


__all__ = ["rms_norm", "rms_norm_reference"]

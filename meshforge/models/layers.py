"""Transformer building blocks shared by meshforge's token models: RMSNorm, SwiGLU, rotary embeddings."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from meshforge.kernels.rms_norm import rms_norm
from meshforge.kernels.swiglu import swiglu
from meshforge.kernels.utils import Backend


class RMSNorm(nn.Module):
    """Root-mean-square normalisation with a learned gain, computed in float32 (bf16-safe):
    :func:`meshforge.kernels.rms_norm.rms_norm` (PyTorch's; one fused kernel each way with "triton")."""

    # Its form (meshforge.kernels.rms_norm.rms_norm): benchmarks set it on a module to time both
    # forms in one process.
    backend: Backend = "auto"

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return rms_norm(x, self.weight, self.eps, self.backend)


def swiglu_hidden(dim: int, ratio: float, multiple_of: int = 64) -> int:
    """Hidden width of a SwiGLU MLP: ``ratio * dim`` rounded up to a GEMM-friendly multiple."""
    hidden = int(ratio * dim)
    return multiple_of * -(-hidden // multiple_of)


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))``; gate and up share one matmul, and the gate is
    :func:`meshforge.kernels.swiglu.swiglu` (PyTorch's; one fused kernel each way with "triton")."""

    # The gate's form: benchmarks set it on a module to time both forms in one process.
    backend: Backend = "auto"

    def __init__(self, dim: int, hidden: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.gate_up = nn.Linear(dim, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.down(swiglu(self.gate_up(x), self.backend)))


class Rotary(nn.Module):
    """Rotary position embedding tables for positions ``0 .. max_len-1`` (rotate-half convention).

    The rotation itself is :func:`meshforge.kernels.rotary.apply_rotary` (full-width tables, float32
    inside): rotate positions ``start .. start+T-1`` of ``x [B, T, ..., D]`` with
    ``apply_rotary(x, *rope.tables(start, T))``; a level of a decoding step looks its tables up once
    for all its blocks. The tables are buffers that are not saved with the weights: they are a pure
    function of the config.
    """

    def __init__(self, head_dim: int, max_len: int, base: float) -> None:
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"rotary embeddings need an even head dimension, got {head_dim}")
        inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq).repeat(1, 2)
        self.register_buffer("cos", angles.cos().float(), persistent=False)  # [max_len, D]
        self.register_buffer("sin", angles.sin().float(), persistent=False)

    @property
    def max_len(self) -> int:
        return self.cos.shape[0]

    def tables(self, start: int | Tensor, length: int) -> tuple[Tensor, Tensor]:
        """``cos, sin [length, D]`` of positions ``start .. start+length-1``.

        ``start`` may be a one-element integer tensor (decoding keeps its position on the device,
        so that a step never waits on the host); the tables are then gathered, not sliced.
        """
        if isinstance(start, Tensor):
            positions = start if length == 1 else start + torch.arange(length, device=start.device)
            return self.cos[positions], self.sin[positions]
        return self.cos[start : start + length], self.sin[start : start + length]

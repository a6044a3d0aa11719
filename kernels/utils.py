"""What every op folder shares: the ``backend`` argument and the sequence-indexing helpers.

Variable-length batches are flat rows with an offsets array (``cu_seqlens``-style: group ``i``
owns rows ``offsets[i]:offsets[i + 1]``); these helpers move between counts, offsets, per-row
group ids and the rows of a list of ranges, without a host sync.
"""

from __future__ import annotations

import importlib.util
from functools import cache
from typing import Literal

import torch
from torch import Tensor

# Every op takes ``backend``: "auto" picks the Triton form on CUDA and the PyTorch form elsewhere;
# a name forces that form ("triton" also runs on a CPU under TRITON_INTERPRET=1, which the tests use).
Backend = Literal["auto", "triton", "torch", "reference"]


def resolve_backend(op: str, backend: str, use_triton: bool, forms: tuple[str, ...] = ("triton", "torch", "reference")) -> str:
    """The form ``op`` runs: ``backend`` itself, or for "auto" Triton when ``use_triton`` else the torch form."""
    if backend == "auto":
        return "triton" if use_triton else ("torch" if "torch" in forms else "reference")
    if backend not in forms:
        raise ValueError(f"{op}: unknown backend {backend!r} (known: auto, {', '.join(forms)})")
    return backend


# A constant to torch.compile: traced, its find_spec is a function dynamo refuses to call (torch 2.11
# broke the graph there in every full-attention block on an H200, and the model ran as frames of its
# own per block and function: ~126 compiled-graph calls a step).
@cache
@torch.compiler.assume_constant_result  # inside the cache: dynamo unwraps functools' caches
def has_flash_attn() -> bool:
    """True when flash-attn is importable (checked without importing it: that is slow, and it is optional)."""
    try:
        return importlib.util.find_spec("flash_attn") is not None
    except (ImportError, ValueError):
        return False


def offsets_of(counts: Tensor) -> Tensor:
    """Offsets ``[n + 1]`` (int64, from 0) of consecutive groups of ``counts[n]`` rows."""
    offsets = torch.zeros(len(counts) + 1, dtype=torch.int64, device=counts.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return offsets


def group_ids(counts: Tensor, total: int | None = None) -> Tensor:
    """The group of every row, int64 ``[sum(counts)]``, for consecutive groups of ``counts[n]`` rows.

    ``total`` (the sum, when the caller knows it) spares the device-to-host copy of the sum.
    """
    return torch.repeat_interleave(torch.arange(len(counts), device=counts.device), counts, output_size=total)


def sequence_ids(cu_seqlens: Tensor) -> Tensor:
    """The sequence of every token, int64 ``[N]``, from ``cu_seqlens[B + 1]``."""
    return group_ids(cu_seqlens.diff())


def concat_ranges(first: Tensor, count: Tensor) -> Tensor:
    """Concatenation of ``first[i] .. first[i] + count[i] - 1`` over i."""
    base = torch.repeat_interleave(first - offsets_of(count)[:-1], count)
    return base + torch.arange(len(base), device=first.device)


def padded_rows(starts: Tensor, sizes: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Row indices ``[..., width]`` of ranges ``start + j`` (clamped to ``start``) and their validity."""
    j = torch.arange(width, device=starts.device)
    valid = j < sizes[..., None]
    return torch.where(valid, starts[..., None] + j, starts[..., None]), valid

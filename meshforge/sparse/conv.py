"""Sparse 3D convolution and resampling on :class:`SparseTensor`.

Two convolutions cover what meshforge's sparse models need:

* :class:`SparseSubMConv3d`: submanifold convolution (odd kernel), output voxels = input voxels;
* :class:`SparseConv3d`: non-overlapping strided convolution (kernel = stride = factor), output
  voxels = the distinct ``coords // factor``, i.e. a learned downsampling.

Both own their parameters in spconv's layout (weight ``[out, k, k, k, in]``, the same on every
device) and run on a backend chosen per module:

* ``"spconv"`` (default): spconv 2.x driven with meshforge's parameters, its implicit-GEMM
  algorithms on CUDA and ``ConvAlgo.Native`` on the CPU, where the others do not exist; always in
  the weights' dtype, outside autocast (see :meth:`_SparseConv._run_spconv`). Rulebooks are cached
  on the tensor, so the convolutions of one level build theirs once.
* ``"torch"``: a pure-PyTorch gather/scatter over a neighbour table built with sorted keys. It is
  the reference the tests compare spconv against and runs wherever torch runs; a further backend
  (torchsparse, a Triton kernel) is one more branch of :meth:`_SparseConv.forward`.

Past spconv's int32 limit (its implicit-GEMM kernels address features with 32-bit offsets and
assert above 2^31 bytes: two shapes at R 512, one at R 1024 in a VAE's finest levels) a convolution
runs over slabs of voxels (:func:`conv_slabs`): a sparse convolution is local, so the outputs whose
x lies in a slab depend only on the inputs within the kernel's reach of it. Each slab convolves its
inputs (the slab plus a halo of ``k // 2`` planes each side for a submanifold conv; exactly its
children for a strided one) and keeps its own outputs; the slabs' rulebooks are cached on the
tensor like the whole tensor's. Gradients flow through the gathers and the concatenation.

:func:`avg_pool` and :class:`SparseUpsample` move between octree levels without any dense grid.
"""

from __future__ import annotations

import math
import os
from typing import Literal

import torch
from torch import nn

from meshforge.sparse.tensor import (
    SparseTensor,
    child_offsets,
    children,
    coarse_shape,
    coord_keys,
    lookup,
)

Backend = Literal["spconv", "torch"]
BACKENDS: tuple[str, ...] = ("spconv", "torch")

# Feature bytes (rows x channels x element size of the input or the output, whichever is larger)
# above which a spconv convolution runs in slabs. spconv's limit is 2^31; a slab is sized to half
# of this so that its halo fits too. MESHFORGE_SPCONV_SLAB_BYTES lowers it should another of
# spconv's buffers reach the limit first; tests lower it to force slabs at tiny sizes.
MAX_FEATURE_BYTES = int(os.environ.get("MESHFORGE_SPCONV_SLAB_BYTES", str(2**31 - 1)))


def conv_slabs(x: SparseTensor, channels: int, element_size: int, stride: int = 1) -> list[tuple[int, int]] | None:
    """Ranges ``[x0, x1)`` of output x coordinates (in units of the output grid) covering every voxel
    of ``x``, each with at most ~half :data:`MAX_FEATURE_BYTES` of features; None when one range would do.

    ``stride``: output x of an input voxel is ``x // stride`` (a strided conv's outputs).
    """
    row_bytes = channels * element_size
    if len(x) * row_bytes <= MAX_FEATURE_BYTES:
        return None
    per_plane = torch.bincount(x.coords[:, 1].long() // stride).tolist()
    target = max(MAX_FEATURE_BYTES // (2 * row_bytes), 1)
    slabs, start, rows = [], 0, 0
    for plane, count in enumerate(per_plane):
        if rows and rows + count > target:
            slabs.append((start, plane))
            start, rows = plane, 0
        rows += count
    slabs.append((start, len(per_plane)))
    return slabs


class _SparseConv(nn.Module):
    """Parameters and backend dispatch shared by the two convolutions."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, bias: bool, backend: Backend) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"unknown sparse conv backend {backend!r} (known: {', '.join(BACKENDS)})")
        self.in_channels, self.out_channels, self.kernel_size, self.backend = in_channels, out_channels, kernel_size, backend
        self.weight = nn.Parameter(torch.empty(out_channels, kernel_size, kernel_size, kernel_size, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        # nn.Conv3d's initialisation: uniform in +-1/sqrt(fan_in) for weights and biases alike.
        bound = 1 / math.sqrt(in_channels * kernel_size**3)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)
        self._engines: dict[str, object] = {}  # spconv's per-device convolution objects (no parameters)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, backend={self.backend}"

    def kernel_matrices(self) -> torch.Tensor:
        """The weight as ``[k^3, in, out]``, offsets in x-major order (as :func:`kernel_offsets`)."""
        return self.weight.permute(1, 2, 3, 4, 0).reshape(-1, self.in_channels, self.out_channels)

    def forward(self, x: SparseTensor) -> SparseTensor:
        # Subclasses define _forward_spconv and _forward_torch.
        if x.channels != self.in_channels:
            raise ValueError(f"{type(self).__name__} expects {self.in_channels} channels, got {x.channels}")
        if self.backend == "spconv" and len(x):
            return self._forward_spconv(x)
        # spconv rejects a tensor without voxels (its CUDA rulebooks and its strided CPU kernel
        # assert), which a decoder that pruned everything produces; the torch path handles it.
        return self._forward_torch(x)

    def _engine(self, device: torch.device, subm: bool, stride: int, indice_key: str | None):
        """spconv's convolution machinery configured like this module, without parameters of its own."""
        if device.type not in self._engines:
            import spconv.pytorch as spconv
            from spconv.pytorch.conv import SparseConvolutionBase

            algo = None if device.type == "cuda" else spconv.ConvAlgo.Native  # implicit GEMM needs CUDA
            self._engines[device.type] = SparseConvolutionBase(
                3, self.in_channels, self.out_channels, self.kernel_size, stride=stride,
                subm=subm, indice_key=indice_key, algo=algo,
            )
        return self._engines[device.type]

    def _run_spconv(self, x: SparseTensor, subm: bool, stride: int, indice_key: str | None):
        import spconv.pytorch as spconv
        from spconv import constants

        engine = self._engine(x.device, subm, stride, indice_key)
        # Under CUDA autocast spconv would cast to float16 (it has no bfloat16 kernels) and, at
        # these widths, accumulate in float16: the per-voxel gradients of a loss averaged over
        # 1e5-1e6 voxels (~1e-7) underflow there, and no loss scaler runs. So it runs outside
        # autocast in the weights' dtype, on TF32 tensor cores where torch allows them for
        # float32 matmuls (the trainer does on CUDA).
        constants.SPCONV_ALLOW_TF32 = torch.get_float32_matmul_precision() != "highest"
        with torch.autocast(x.device.type, enabled=False):
            sp = spconv.SparseConvTensor(
                x.feats.to(self.weight.dtype).contiguous(), x.coords, list(x.spatial_shape), x.batch_size,
                indice_dict=x.cache.get("spconv_rulebooks", {}),
            )
            # spconv's "training" flag means: build backward indices and add the bias outside the
            # kernel. Its CPU kernels cannot fuse the bias, and eval-mode modules may still need gradients.
            needs_grad = torch.is_grad_enabled() and (x.feats.requires_grad or self.weight.requires_grad)
            return engine._conv_forward(needs_grad or x.device.type == "cpu", sp, self.weight, self.bias)


def kernel_offsets(kernel_size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Offsets ``(dx, dy, dz)`` of a centred odd kernel, x-major (the order of the weight's k dims)."""
    return child_offsets(kernel_size, device) - kernel_size // 2


def neighbour_table(x: SparseTensor, kernel_size: int) -> torch.Tensor:
    """int64 [k^3, N]: row of the voxel at ``coords + offset`` for each kernel offset, -1 where inactive."""

    def make() -> torch.Tensor:
        offsets = kernel_offsets(kernel_size, x.device)
        shifted = x.coords[None, :, 1:] + offsets[:, None, :]  # [K, N, 3]
        bounds = torch.tensor(x.spatial_shape, device=x.device, dtype=torch.int32)
        inside = ((shifted >= 0) & (shifted < bounds)).all(-1)
        query = torch.cat([x.coords[None, :, :1].expand(len(offsets), -1, -1), shifted], -1).reshape(-1, 4)
        rows = lookup(x.keys, coord_keys(query, x.spatial_shape)).view(len(offsets), -1)
        return torch.where(inside, rows, torch.full_like(rows, -1))  # keys alias outside the grid

    return x._cached(("neighbours", kernel_size), make)


class SparseSubMConv3d(_SparseConv):
    """Submanifold convolution: ``out[p] = b + sum_o W[o] in[p + o]`` over active ``p + o`` only."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, bias: bool = True,
                 backend: Backend = "spconv") -> None:
        if kernel_size % 2 == 0:
            raise ValueError(f"submanifold convolution needs an odd kernel, got {kernel_size}")
        super().__init__(in_channels, out_channels, kernel_size, bias, backend)

    def _forward_spconv(self, x: SparseTensor) -> SparseTensor:
        slabs = conv_slabs(x, max(self.in_channels, self.out_channels), self.weight.element_size())
        if slabs is None:
            return x.replace(self._subm_spconv(x))
        radius = self.kernel_size // 2
        parts = x.cache.setdefault(("subm_slabs", radius, tuple(slabs)), {})
        outputs, rows = [], []
        for lo, hi in slabs:
            if (lo, hi) not in parts:
                px = x.coords[:, 1]
                inputs = ((px >= lo - radius) & (px < hi + radius)).nonzero().squeeze(1)
                own = ((px[inputs] >= lo) & (px[inputs] < hi)).nonzero().squeeze(1)
                # The slab's own tensor cache holds its rulebooks for the level's other convolutions.
                parts[(lo, hi)] = (inputs, own, {})
            inputs, own, cache = parts[(lo, hi)]
            slab = SparseTensor(x.feats[inputs], x.coords[inputs], x.spatial_shape, x.batch_size, cache)
            outputs.append(self._subm_spconv(slab)[own])
            rows.append(inputs[own])
        order = torch.empty_like(x.item_ids)
        order[torch.cat(rows)] = torch.arange(len(x), device=x.device)
        return x.replace(torch.cat(outputs)[order])

    def _subm_spconv(self, x: SparseTensor) -> torch.Tensor:
        # A submanifold rulebook depends only on the voxels and the kernel: one key per kernel size.
        out = self._run_spconv(x, subm=True, stride=1, indice_key=f"subm{self.kernel_size}")
        x.cache["spconv_rulebooks"] = out.indice_dict
        return out.features

    def _forward_torch(self, x: SparseTensor) -> SparseTensor:
        table = neighbour_table(x, self.kernel_size)
        weights = self.kernel_matrices()
        out = x.feats.new_zeros(len(x), self.out_channels)
        for k in range(len(weights)):
            rows = table[k]
            active = (rows >= 0).nonzero().squeeze(1)
            out = out.index_add(0, active, (x.feats[rows[active]] @ weights[k]).to(out.dtype))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return x.replace(out)


class SparseConv3d(_SparseConv):
    """Strided convolution with kernel = stride = ``factor``: each output voxel ``q`` sums
    ``W[p - factor q] in[p]`` over its active children ``p``. Output voxels are ordered as
    :func:`meshforge.sparse.tensor.coarsen` orders them, whatever the backend.
    """

    def __init__(self, in_channels: int, out_channels: int, factor: int = 2, bias: bool = True,
                 backend: Backend = "spconv") -> None:
        super().__init__(in_channels, out_channels, factor, bias, backend)

    def _coarse(self, x: SparseTensor) -> tuple[torch.Tensor, torch.Tensor]:
        if any(s % self.kernel_size for s in x.spatial_shape):
            raise ValueError(f"spatial shape {x.spatial_shape} is not divisible by the stride {self.kernel_size}")
        return x.coarsen(self.kernel_size)

    def _forward_spconv(self, x: SparseTensor) -> SparseTensor:
        coarse, _ = self._coarse(x)
        shape = coarse_shape(x.spatial_shape, self.kernel_size)
        slabs = conv_slabs(x, max(self.in_channels, self.out_channels), self.weight.element_size(), self.kernel_size)
        features, indices = [], []
        # Outputs never share inputs (kernel = stride): a slab is exactly the children of its outputs.
        for lo, hi in slabs or [(0, shape[0])]:
            if slabs is None:
                part = x
            else:
                ox = x.coords[:, 1] // self.kernel_size
                rows = ((ox >= lo) & (ox < hi)).nonzero().squeeze(1)
                part = SparseTensor(x.feats[rows], x.coords[rows], x.spatial_shape, x.batch_size)
            out = self._run_spconv(part, subm=False, stride=self.kernel_size, indice_key=None)
            features.append(out.features)
            indices.append(out.indices)
        order = lookup(coord_keys(torch.cat(indices), shape), coord_keys(coarse, shape))
        return SparseTensor(torch.cat(features)[order], coarse, shape, x.batch_size)

    def _forward_torch(self, x: SparseTensor) -> SparseTensor:
        coarse, parent = self._coarse(x)
        f = self.kernel_size
        local = x.coords[:, 1:] % f
        offset_id = (local[:, 0] * f + local[:, 1]) * f + local[:, 2]  # x-major, as kernel_matrices()
        weights = self.kernel_matrices()
        out = x.feats.new_zeros(len(coarse), self.out_channels)
        for k in range(len(weights)):
            rows = (offset_id == k).nonzero().squeeze(1)
            out = out.index_add(0, parent[rows], (x.feats[rows] @ weights[k]).to(out.dtype))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return SparseTensor(out, coarse, coarse_shape(x.spatial_shape, f), x.batch_size)


def avg_pool(x: SparseTensor, factor: int = 2) -> SparseTensor:
    """Mean of the active children of each ``coords // factor`` voxel (3D average pooling, sparse)."""
    coarse, parent = x.coarsen(factor)
    sums = x.feats.new_zeros(len(coarse), x.channels).index_add_(0, parent, x.feats)
    counts = torch.bincount(parent, minlength=len(coarse)).clamp_(min=1).to(sums.dtype)
    return SparseTensor(sums / counts[:, None], coarse, coarse_shape(x.spatial_shape, factor), x.batch_size)


class SparseUpsample(nn.Module):
    """Each voxel to chosen children of its ``factor^3``, child j's features ``W_j parent + b_j``.

    This is the transposed convolution with kernel = stride = ``factor``, evaluated only for the
    children that are kept: a decoder that prunes never materialises the others.
    """

    def __init__(self, in_channels: int, out_channels: int, factor: int = 2) -> None:
        super().__init__()
        self.factor = factor
        self.weight = nn.Parameter(torch.empty(factor**3, in_channels, out_channels))
        self.bias = nn.Parameter(torch.empty(factor**3, out_channels))
        bound = 1 / math.sqrt(in_channels)
        nn.init.uniform_(self.weight, -bound, bound)
        nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: SparseTensor, keep: torch.Tensor | None = None) -> SparseTensor:
        """``keep``: bool ``[N * factor^3]`` over :func:`children` order (None keeps all of them)."""
        n_children = self.factor**3
        rows = torch.arange(len(x) * n_children, device=x.device) if keep is None else keep.nonzero().squeeze(1)
        parent, child = rows.div(n_children, rounding_mode="floor"), rows % n_children
        out = x.feats.new_empty(len(rows), self.weight.shape[-1])
        for j in range(n_children):
            sel = (child == j).nonzero().squeeze(1)
            out[sel] = torch.addmm(self.bias[j], x.feats[parent[sel]], self.weight[j]).to(out.dtype)
        coords = children(x.coords, self.factor)[rows]
        shape = tuple(s * self.factor for s in x.spatial_shape)
        return SparseTensor(out, coords, shape, x.batch_size)  # type: ignore[arg-type]

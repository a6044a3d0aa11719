"""The one sparse voxel tensor of meshforge, and the coordinate bookkeeping sparse layers share.

A :class:`SparseTensor` is a batch of sparse voxel grids: ``feats[N, C]`` for the N active voxels,
``coords[N, 4]`` int32 as ``(batch, x, y, z)``, the grid's ``spatial_shape`` and ``batch_size``.
Voxels are grouped by batch item (``coords[:, 0]`` is non-decreasing), so item ``b`` owns the rows
``batch_offsets[b]:batch_offsets[b + 1]``, like the ``cu_seqlens`` of variable-length attention.

Everything here works on integer keys: a voxel's ``(b, x, y, z)`` packed into one int64 in
row-major order of ``(batch_size, *spatial_shape)``. Sorting keys groups voxels by batch item first,
``searchsorted`` on sorted keys is a hash table that runs on any device, and unique keys of
``coords // 2`` give the coarser level of an octree. No dense ``R^3`` array is ever made.

Derived structures (neighbour tables, attention windows, spconv rulebooks) depend only on the
coordinates, so a tensor carries a ``cache`` that :meth:`SparseTensor.replace` shares with every
tensor of the same coordinates: the layers of one resolution level compute them once.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import torch

Shape3 = tuple[int, int, int]


# ---------------------------------------------------------------------------------------------
# Keys: (batch, x, y, z) <-> one int64


def coord_keys(coords: torch.Tensor, spatial_shape: Shape3) -> torch.Tensor:
    """Row-major int64 keys of ``(b, x, y, z)`` coordinates: ordering keys orders by batch first."""
    c = coords.long()
    x, y, z = spatial_shape
    return ((c[:, 0] * x + c[:, 1]) * y + c[:, 2]) * z + c[:, 3]


def keys_to_coords(keys: torch.Tensor, spatial_shape: Shape3) -> torch.Tensor:
    """Inverse of :func:`coord_keys`, as int32 ``(b, x, y, z)``."""
    x, y, z = spatial_shape
    keys, cz = keys.div(z, rounding_mode="floor"), keys % z
    keys, cy = keys.div(y, rounding_mode="floor"), keys % y
    b, cx = keys.div(x, rounding_mode="floor"), keys % x
    return torch.stack([b, cx, cy, cz], dim=1).int()


def lookup(table: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """Row of each ``query`` key in the key array ``table`` (unique keys, any order), -1 where absent."""
    if table.numel() == 0:
        return torch.full_like(query, -1)
    order = torch.argsort(table)
    ordered = table[order]
    pos = torch.searchsorted(ordered, query).clamp_(max=len(ordered) - 1)
    return torch.where(ordered[pos] == query, order[pos], torch.full_like(pos, -1))


# ---------------------------------------------------------------------------------------------
# Octree levels


def coarse_shape(spatial_shape: Shape3, factor: int = 2) -> Shape3:
    return tuple(-(-s // factor) for s in spatial_shape)  # type: ignore[return-value]


def coarsen(coords: torch.Tensor, spatial_shape: Shape3, factor: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The coarser level's voxels ``coords // factor`` (unique, sorted by key) and each voxel's parent row."""
    shape = coarse_shape(spatial_shape, factor)
    parent = coords.clone()
    parent[:, 1:] = coords[:, 1:].div(factor, rounding_mode="floor")
    unique, inverse = torch.unique(coord_keys(parent, shape), return_inverse=True)
    return keys_to_coords(unique, shape), inverse


def child_offsets(factor: int = 2, device: torch.device | str = "cpu") -> torch.Tensor:
    """The ``factor^3`` child offsets ``(dx, dy, dz)`` in x-major order, int32 [factor^3, 3]."""
    r = torch.arange(factor, device=device)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3).int()


def children(coords: torch.Tensor, factor: int = 2) -> torch.Tensor:
    """All ``factor^3`` children of each voxel, parent-major: row ``i * factor^3 + j`` is child j of voxel i.

    Parent-major order keeps the children of batch item b together, after those of item b - 1.
    """
    base = coords.clone()
    base[:, 1:] *= factor
    kids = base[:, None, :].repeat(1, factor**3, 1)
    kids[:, :, 1:] += child_offsets(factor, coords.device)
    return kids.reshape(-1, 4)


# ---------------------------------------------------------------------------------------------
# Attention windows


@dataclass(frozen=True)
class Windows:
    """Voxels grouped into cubic windows: ``feats[perm]`` lists window after window.

    Window ``w`` holds rows ``cu_seqlens[w]:cu_seqlens[w + 1]`` of the permuted order;
    ``window_ids`` gives each permuted row its window. Windows never span two batch items.
    """

    perm: torch.Tensor  # int64 [N]
    cu_seqlens: torch.Tensor  # int32 [W + 1]
    window_ids: torch.Tensor  # int64 [N], of the permuted rows
    max_len: int

    @property
    def count(self) -> int:
        return len(self.cu_seqlens) - 1


def window_partition(coords: torch.Tensor, spatial_shape: Shape3, window: int, shift: int = 0) -> Windows:
    """Group voxels by ``floor((xyz + shift) / window)`` per batch item (Swin's shifted windows, in 3D).

    Shifting alternate layers by ``window // 2`` moves the window borders, so information crosses
    them in two layers without any layer attending beyond a ``window^3`` block.
    """
    grid = tuple(-(-(s + shift) // window) for s in spatial_shape)
    cells = coords.clone()
    cells[:, 1:] = (coords[:, 1:] + shift).div(window, rounding_mode="floor")
    keys = coord_keys(cells, grid)
    keys_sorted, perm = torch.sort(keys, stable=True)
    _, window_ids, counts = torch.unique_consecutive(keys_sorted, return_inverse=True, return_counts=True)
    cu = torch.zeros(len(counts) + 1, dtype=torch.int32, device=coords.device)
    torch.cumsum(counts, 0, out=cu[1:])
    max_len = int(counts.max()) if len(counts) else 0
    return Windows(perm=perm, cu_seqlens=cu, window_ids=window_ids, max_len=max_len)


# ---------------------------------------------------------------------------------------------
# Per-item values on the rows


class _ItemRows(torch.autograd.Function):
    """``values[item]`` whose backward sums each item's rows with one GEMM.

    Indexing's own backward (``index_put_`` with ``accumulate``) adds the duplicates of one index
    serially on CUDA (pytorch/pytorch#41162): with every row of a 123,552-token latent pointing at one
    item it took 75 ms per call on an H200, 87% of an SS-DiT step, and a DiT block broadcasts six
    AdaLN vectors (``benchmarks/results/ss_dit_profile_before_fixes.json``). The one-hot ``[N, B]``
    GEMM is the same sum, run in parallel.
    """

    @staticmethod
    def forward(ctx, values: torch.Tensor, item: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(item)
        ctx.items = values.shape[0]
        return values[item]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        (item,) = ctx.saved_tensors
        one_hot = (item[:, None] == torch.arange(ctx.items, device=item.device)).to(grad.dtype)
        flat = grad.reshape(len(item), -1)
        return (one_hot.T @ flat).view(ctx.items, *grad.shape[1:]), None


# ---------------------------------------------------------------------------------------------
# The tensor


@dataclass(eq=False)
class SparseTensor:
    """Features on the active voxels of ``batch_size`` grids of ``spatial_shape``; rows grouped by batch.

    ``cache`` holds coordinate-derived structures; it travels with :meth:`replace` (same coordinates)
    and is dropped by anything that changes the coordinates or their device.
    """

    feats: torch.Tensor  # [N, C]
    coords: torch.Tensor  # int32 [N, 4]: (batch, x, y, z)
    spatial_shape: Shape3
    batch_size: int
    cache: dict[Any, Any] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if self.coords.dim() != 2 or self.coords.shape[1] != 4:
            raise ValueError(f"coords must be [N, 4] (batch, x, y, z), got {tuple(self.coords.shape)}")
        if self.feats.shape[0] != self.coords.shape[0]:
            raise ValueError(f"{self.feats.shape[0]} feature rows for {self.coords.shape[0]} voxels")
        if self.coords.dtype != torch.int32:
            self.coords = self.coords.int()
        self.spatial_shape = tuple(int(s) for s in self.spatial_shape)  # type: ignore[assignment]

    @classmethod
    def from_items(cls, coords: list[torch.Tensor], feats: list[torch.Tensor], spatial_shape: Shape3) -> SparseTensor:
        """Batch per-item ``coords[N_i, 3]`` and ``feats[N_i, C]`` (item i becomes batch index i)."""
        batch = [torch.full((len(c), 1), i, dtype=torch.int32, device=c.device) for i, c in enumerate(coords)]
        stacked = torch.cat([torch.cat([b, c.int()], 1) for b, c in zip(batch, coords)])
        return cls(torch.cat(feats), stacked, spatial_shape, len(coords))

    # -- plain tensor behaviour -------------------------------------------------------------------

    def __len__(self) -> int:
        return self.coords.shape[0]

    @property
    def device(self) -> torch.device:
        return self.feats.device

    @property
    def dtype(self) -> torch.dtype:
        return self.feats.dtype

    @property
    def channels(self) -> int:
        return self.feats.shape[1]

    def replace(self, feats: torch.Tensor) -> SparseTensor:
        """Same voxels (and cache), new features."""
        if feats.shape[0] != len(self):
            raise ValueError(f"{feats.shape[0]} feature rows for {len(self)} voxels")
        return SparseTensor(feats, self.coords, self.spatial_shape, self.batch_size, self.cache)

    def to(self, *args: Any, **kwargs: Any) -> SparseTensor:
        """Like ``Tensor.to`` for the features; coordinates follow the device and stay int32."""
        feats = self.feats.to(*args, **kwargs)
        if feats.device == self.coords.device:
            return SparseTensor(feats, self.coords, self.spatial_shape, self.batch_size, self.cache)
        return SparseTensor(feats, self.coords.to(feats.device), self.spatial_shape, self.batch_size)

    # -- derived structures (cached) ----------------------------------------------------------------

    def _cached(self, key: Any, make: Any) -> Any:
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    @property
    def batch_offsets(self) -> torch.Tensor:
        """int32 [batch_size + 1]: item b owns rows ``batch_offsets[b]:batch_offsets[b + 1]``."""

        def make() -> torch.Tensor:
            bounds = torch.arange(self.batch_size + 1, device=self.coords.device, dtype=torch.int32)
            return torch.searchsorted(self.coords[:, 0].contiguous(), bounds).int()

        return self._cached("batch_offsets", make)

    @property
    def keys(self) -> torch.Tensor:
        """int64 [N] keys of the voxels (:func:`coord_keys`)."""
        return self._cached("keys", lambda: coord_keys(self.coords, self.spatial_shape))

    @property
    def item_ids(self) -> torch.Tensor:
        """int64 [N]: the batch item of every row."""
        return self._cached("item_ids", lambda: self.coords[:, 0].long())

    def per_row(self, values: torch.Tensor) -> torch.Tensor:
        """Per-item ``values [batch_size, ...]`` repeated onto the rows, ``[N, ...]`` (differentiable)."""
        return _ItemRows.apply(values, self.item_ids)

    def windows(self, window: int, shift: int = 0) -> Windows:
        return self._cached(("windows", window, shift), lambda: window_partition(self.coords, self.spatial_shape, window, shift))

    def coarsen(self, factor: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
        """(coarse coords, parent row of each voxel), as :func:`coarsen`."""
        return self._cached(("coarsen", factor), lambda: coarsen(self.coords, self.spatial_shape, factor))

    def items(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per batch item ``(coords[N_b, 3], feats[N_b, C])``."""
        offsets = self.batch_offsets.tolist()
        return [(self.coords[a:b, 1:], self.feats[a:b]) for a, b in itertools.pairwise(offsets)]

"""Sparse voxel computing: the one :class:`SparseTensor`, sparse convolution (spconv backend),
shifted-window sparse attention, and marching cubes on sparse SDF grids."""

from meshforge.sparse.tensor import SparseTensor

__all__ = ["SparseTensor"]

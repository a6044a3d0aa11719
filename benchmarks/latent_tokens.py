"""Voxel token sets of the benchmarks (``ssa_vs_dense.py``, ``ssa_selection.py``, ``direct3d_scale.py``): real sparse
latents (synth meshes voxelised at a latent resolution, a 1-voxel band) and uniformly random voxels.

Imported by the benchmark scripts beside it (a script's own folder is on ``sys.path``).
"""

from __future__ import annotations

import math

import torch

from meshforge.data.canonical import normalize_vertices
from meshforge.data.sdf import voxelize
from meshforge.data.synth import synth_mesh


def surface_tokens(family: str, resolution: int, device: torch.device) -> torch.Tensor:
    """Voxel coordinates ``[N, 3]`` of the surface band of synth mesh ``family`` (seed 0) at ``resolution``."""
    vertices, faces = synth_mesh(family, seed=0, index=0)
    sdf = voxelize(normalize_vertices(vertices) * 0.9, faces, resolution, band=1.0, device=device)
    return sdf.coords.to(device).long()


def random_tokens(n: int, occupancy: float, seed: int, device: torch.device) -> torch.Tensor:
    """``n`` distinct random voxels ``[n, 3]`` filling ``occupancy`` of the smallest cube that holds them."""
    side = math.ceil((n / occupancy) ** (1 / 3))
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(side**3, generator=g)[:n].sort().values
    return torch.stack([flat // side**2, flat // side % side, flat % side], 1).to(device)

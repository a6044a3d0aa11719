"""Iso-surfaces of sparse voxel grids: marching tetrahedra on the cubes whose 8 corners all exist.

The sample points are voxel centres: voxel ``(x, y, z)`` of an ``R^3`` grid sits at
``((x, y, z) + 0.5) / R - 0.5`` in normalised space (the sparse SDF convention). A *cube* is
spanned by 8 voxels ``base + {0,1}^3``; only cubes whose 8 corners are all present are
triangulated, so the grid never has to be dense and no ``R^3`` array is ever made. Corners are found
by binary search in the sorted int64 voxel keys, which runs on any device.

Why marching tetrahedra rather than the 256-case marching-cubes table: every cube is cut into the
same 6 tetrahedra around its main diagonal, so the cut of a shared cube face is the same seen from
either side and the surface is watertight by construction (classic marching cubes needs extra
disambiguation for that). The table has 16 cases, built below from two rules instead of being
typed in. The price is about twice as many triangles as marching cubes.

Vertices lie on grid edges (cube edges, face diagonals, the main diagonal) and are named by the
edge: ``8 * key(lower end) + direction``, every tetrahedron edge running from a corner to one whose
offsets are all >= (0 < direction < 8). A crossing exactly on a grid point is named by the point
itself (direction 0), as is one within ``SNAP`` of it. Equal names mean equal vertices, so shared vertices merge with ``unique``;
interpolation always runs from the lower end, so merged copies are bit-identical.

A point is *inside* when its value is below ``level``. Triangles are wound so that normals point
from inside to outside (towards larger values): outward for an SDF that is negative inside.
"""

from __future__ import annotations

import numpy as np
import torch

# Cube corner k sits at offset ((k >> 0) & 1, (k >> 1) & 1, (k >> 2) & 1).
CORNER_OFFSETS = torch.tensor([[(k >> i) & 1 for i in range(3)] for k in range(8)])
# The 6 tetrahedra of a cube: monotone paths 0 -> a -> b -> 7 along the cube's edges.
TETRAHEDRA = torch.tensor(
    [[0, 1, 3, 7], [0, 3, 2, 7], [0, 2, 6, 7], [0, 6, 4, 7], [0, 4, 5, 7], [0, 5, 1, 7]]
)
# Crossings closer than this (a fraction of the grid edge) to a grid point snap onto it.
SNAP = 0.01
# Triangles of less (twice the area, in voxels^2) have no surface to speak of: dropped.
MIN_AREA2 = 1e-6
# The 6 edges of a tetrahedron as pairs of its local corners (0..3).
TET_EDGES = ((0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3))


def _case_table() -> torch.Tensor:
    """[16, 2, 3] tetrahedron-edge indices of up to 2 triangles per inside-mask, -1 where unused.

    One corner on its own side of the surface: the triangle cuts its 3 edges. Two and two: the
    quad through the 4 edges joining the sides, split in two triangles. Winding is fixed later.
    """
    edge_id = {frozenset(e): i for i, e in enumerate(TET_EDGES)}
    table = torch.full((16, 2, 3), -1, dtype=torch.long)
    for mask in range(16):
        inside = [k for k in range(4) if mask >> k & 1]
        outside = [k for k in range(4) if not mask >> k & 1]
        alone = inside if len(inside) == 1 else outside if len(outside) == 1 else None
        if alone is not None:
            k = alone[0]
            table[mask, 0] = torch.tensor([edge_id[frozenset((k, j))] for j in range(4) if j != k])
        elif len(inside) == 2:
            (a, b), (c, d) = inside, outside
            ring = [edge_id[frozenset(e)] for e in ((a, c), (a, d), (b, d), (b, c))]
            table[mask, 0] = torch.tensor(ring[:3])
            table[mask, 1] = torch.tensor([ring[0], ring[2], ring[3]])
    return table


CASES = _case_table()


def grid_keys(coords: torch.Tensor, resolution: int) -> torch.Tensor:
    """Row-major int64 key of integer coordinates [N, 3] on an ``R^3`` grid."""
    c = coords.long()
    return (c[:, 0] * resolution + c[:, 1]) * resolution + c[:, 2]


def complete_cubes(coords: torch.Tensor, resolution: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The cubes whose 8 corners are all voxels of ``coords`` [N, 3].

    Returns ``base`` int64 [M, 3] (each cube's lowest corner) and ``corners`` int64 [M, 8], the
    rows of ``coords`` at the cube's corners in :data:`CORNER_OFFSETS` order.
    """
    coords = coords.long()
    keys = grid_keys(coords, resolution)
    order = torch.argsort(keys)
    sorted_keys = keys[order]
    offsets = CORNER_OFFSETS.to(coords.device)
    rows = torch.empty((len(coords), 8), dtype=torch.long, device=coords.device)
    found = torch.ones(len(coords), dtype=torch.bool, device=coords.device)
    for k in range(8):
        corner = coords + offsets[k]
        in_grid = (corner < resolution).all(1)
        query = grid_keys(corner.clamp(max=resolution - 1), resolution)
        pos = torch.searchsorted(sorted_keys, query).clamp(max=max(len(keys) - 1, 0))
        found &= in_grid & (sorted_keys[pos] == query)
        rows[:, k] = order[pos]
    return coords[found], rows[found]


def marching_cubes(
    coords: np.ndarray | torch.Tensor,
    values: np.ndarray | torch.Tensor,
    resolution: int,
    level: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Triangle mesh of the ``level`` iso-surface of a sparse grid, in normalised space.

    ``coords`` int [N, 3] voxel indices in ``[0, R)`` (unique), ``values`` float [N]. Runs on the
    device of ``values`` when it is a tensor. Returns ``vertices`` float32 [V, 3] and ``faces``
    int64 [F, 3]; empty arrays when no complete cube crosses the level.
    """
    values = torch.as_tensor(values)
    coords = torch.as_tensor(coords, device=values.device)
    if coords.ndim != 2 or coords.shape[1] != 3 or values.shape != (len(coords),):
        raise ValueError(
            f"expected coords [N, 3] and values [N], got {tuple(coords.shape)} and {tuple(values.shape)}"
        )
    values = values.to(torch.float32 if values.dtype != torch.float64 else torch.float64)
    device = values.device

    base, rows = complete_cubes(coords, resolution)
    corner_values = values[rows]  # [M, 8]
    inside = corner_values < level
    crossing = inside.any(1) & ~inside.all(1)
    base, rows, corner_values, inside = (
        base[crossing],
        rows[crossing],
        corner_values[crossing],
        inside[crossing],
    )

    tets = TETRAHEDRA.to(device)
    tet_inside = inside[:, tets]  # [M, 6, 4]
    mask = (tet_inside.long() << torch.arange(4, device=device)).sum(-1)
    triangles = CASES.to(device)[mask]  # [M, 6, 2, 3] tetrahedron-edge ids
    cube, tet, slot = torch.nonzero(triangles[..., 0] >= 0, as_tuple=True)
    if len(cube) == 0:
        return np.zeros((0, 3), np.float32), np.zeros((0, 3), np.int64)
    edge_ids = triangles[cube, tet, slot]  # [T, 3]

    # Cube-local corners of each triangle vertex's edge; the lower end has the subset of offset bits.
    tet_edges = torch.tensor(TET_EDGES, device=device)
    ends = tets[tet][:, None, :].expand(-1, 3, -1).gather(2, tet_edges[edge_ids])  # [T, 3, 2]
    lo, hi = ends.min(-1).values, ends.max(-1).values  # corner index order = offset-bit subset order
    cube3 = cube[:, None].expand(-1, 3)
    value_lo, value_hi = corner_values[cube3, lo], corner_values[cube3, hi]
    t = ((level - value_lo) / (value_hi - value_lo)).clamp(0, 1)
    # A crossing within SNAP of a grid point is put on it: values that sit on the level up to
    # rounding (a network's bf16 outputs often do) would otherwise fan out slivers of ~zero area
    # around the point. On the point, they share its name and collapse (removed below).
    t = torch.where(t < SNAP, 0.0, torch.where(t > 1 - SNAP, 1.0, t))
    offsets = CORNER_OFFSETS.to(device)
    point_lo = (base[cube3] + offsets[lo]).to(values.dtype)
    point_hi = (base[cube3] + offsets[hi]).to(values.dtype)
    points = point_lo + t[..., None] * (point_hi - point_lo)  # grid units, [T, 3, 3]

    key_lo = grid_keys(point_lo.long().reshape(-1, 3), resolution).view(-1, 3)
    key_hi = grid_keys(point_hi.long().reshape(-1, 3), resolution).view(-1, 3)
    name = torch.where(t == 0, key_lo * 8, torch.where(t == 1, key_hi * 8, key_lo * 8 + (lo ^ hi)))
    unique, inverse = torch.unique(name.reshape(-1), return_inverse=True)
    vertices = torch.zeros((len(unique), 3), dtype=values.dtype, device=device)
    vertices[inverse] = points.reshape(-1, 3)  # copies of one vertex are bit-identical
    faces = inverse.view(-1, 3)

    # Wind each triangle so its normal points from the tetrahedron's inside corners to its outside ones.
    tet_points = (base[cube][:, None, :] + offsets[tets[tet]]).to(values.dtype)  # [T, 4, 3]
    tet_in = tet_inside[cube, tet].to(values.dtype)[..., None]
    towards_outside = (tet_points * (1 - tet_in)).sum(1) / (1 - tet_in).sum(1) - (tet_points * tet_in).sum(
        1
    ) / tet_in.sum(1)
    normal = torch.linalg.cross(points[:, 1] - points[:, 0], points[:, 2] - points[:, 0])
    flip = (normal * towards_outside).sum(-1) < 0
    faces = torch.where(flip[:, None], faces[:, [0, 2, 1]], faces)
    # A crossing on a grid point collapses the triangles around it; where the level grazes a
    # grid edge (both ends on it up to SNAP), a triangle can also fall onto that edge: zero area.
    keep = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
    keep &= normal.double().norm(dim=-1) > MIN_AREA2
    faces = faces[keep]

    used, faces = torch.unique(faces.reshape(-1), return_inverse=True)
    vertices = (vertices[used] + 0.5) / resolution - 0.5
    return vertices.float().cpu().numpy(), faces.view(-1, 3).cpu().numpy().astype(np.int64)

"""Geometry kernels of the sparse SDF voxeliser (:mod:`meshforge.data.sdf` explains the method).

Torch, any device, memory bounded by a chunk size in elements. Vectors are component-first,
``[3, ...]``: each coordinate is a contiguous row, so a dot product is five elementwise operations
instead of a reduction over a trailing axis of size 3, which is several times faster on CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from meshforge.sparse.marching_cubes import grid_keys

WELD_TOLERANCE = 1e-6  # normalised units: vertices closer than this are one vertex for edge adjacency


def _dot(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return u[0] * v[0] + u[1] * v[1] + u[2] * v[2]


def _cross(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.stack([u[1] * v[2] - u[2] * v[1], u[2] * v[0] - u[0] * v[2], u[0] * v[1] - u[1] * v[0]])


def point_segment_distance2(p: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared distance from points ``p`` [3, ...] to segments ``a``-``b`` [3, ...] (broadcast)."""
    ab, ap = b - a, p - a
    t = (_dot(ap, ab) / _dot(ab, ab).clamp_min(1e-30)).clamp(0, 1)
    d = ap - t * ab
    return _dot(d, d)


def point_triangle_distance2(
    p: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor
) -> torch.Tensor:
    """Squared distance from points ``p`` [3, ...] to triangles ``abc`` (each [3, ...], broadcast):
    the plane distance when the projection falls inside, else the nearest edge (which also covers
    degenerate triangles)."""
    n = _cross(b - a, c - a)
    nn = _dot(n, n)
    inside = (
        (_dot(_cross(b - a, p - a), n) >= 0)
        & (_dot(_cross(c - b, p - b), n) >= 0)
        & (_dot(_cross(a - c, p - c), n) >= 0)
        & (nn > 1e-20)
    )
    plane = _dot(p - a, n).square() / nn.clamp_min(1e-30)
    edges = torch.minimum(
        torch.minimum(point_segment_distance2(p, a, b), point_segment_distance2(p, b, c)),
        point_segment_distance2(p, c, a),
    )
    return torch.where(inside, plane, edges)


def winding_numbers(points: torch.Tensor, triangles: torch.Tensor, chunk: int) -> torch.Tensor:
    """Generalised winding number of ``triangles`` [F, 3, 3] at ``points`` [N, 3], in chunks of
    ``chunk`` point-triangle pairs (Van Oosterom-Strackee solid angle of each triangle)."""
    v = triangles.permute(1, 2, 0)[..., None, :]  # [vertex, xyz, 1, F]
    p = points.T[:, :, None]  # [xyz, N, 1]
    out = torch.empty(len(points), dtype=points.dtype, device=points.device)
    step = max(1, chunk // max(1, len(triangles)))
    for s in range(0, len(points), step):
        a, b, c = v[0] - p[:, s : s + step], v[1] - p[:, s : s + step], v[2] - p[:, s : s + step]
        la, lb, lc = _dot(a, a).sqrt(), _dot(b, b).sqrt(), _dot(c, c).sqrt()
        det = _dot(a, _cross(b, c))
        den = la * lb * lc + _dot(a, b) * lc + _dot(a, c) * lb + _dot(b, c) * la
        out[s : s + step] = torch.atan2(det, den).sum(1) / (2 * math.pi)
    return out


def pcu_inside(points: torch.Tensor, triangles_vertices: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """``w > 0.5`` at ``points`` [N, 3] by point-cloud-utils' fast winding numbers of the mesh
    (``triangles_vertices`` [V, 3], ``faces`` [F, 3], same units as the points), on the CPU."""
    import point_cloud_utils as pcu

    def array(t: torch.Tensor, dtype: type) -> np.ndarray:
        return np.ascontiguousarray(t.detach().cpu().numpy(), dtype=dtype)  # pcu wants one memory order

    w = pcu.triangle_soup_fast_winding_number(
        array(triangles_vertices, np.float64), array(faces, np.int32), array(points, np.float64)
    )
    return torch.from_numpy(np.asarray(w) > 0.5).to(points.device)


def inside_band(
    coords: torch.Tensor,
    keys: torch.Tensor,
    distance: torch.Tensor,
    triangles: torch.Tensor,
    resolution: int,
    chunk: int,
    seed_stride: int = 2,
) -> torch.Tensor:
    """Which band voxels are inside (``w > 0.5``), computing winding numbers for few of them.

    ``keys`` are the voxels' sorted unique keys, ``distance`` their unsigned distance (voxel
    units), ``triangles`` the mesh in voxel units. Two face-adjacent voxels i, j with
    ``d_i + d_j > 1`` see no surface between them (a surface point at ``t`` along their unit
    segment would give ``d_i <= t`` and ``d_j <= 1 - t``), so they lie on the same side. Winding numbers are computed
    at seeds (voxels on every ``seed_stride``-th lattice point), signs spread along such pairs, and
    voxels that receive both signs (only possible near holes, where w is not piecewise constant) or
    none get their own winding number. For closed meshes this equals the winding-number sign
    everywhere, at about ``1 / seed_stride^3`` of its cost.
    """
    R = resolution
    sign = torch.zeros(len(keys), dtype=torch.int8, device=keys.device)

    def exact(rows: torch.Tensor) -> None:
        if len(rows):
            w = winding_numbers(coords[rows].to(triangles.dtype) + 0.5, triangles, chunk)
            sign[rows] = torch.where(w > 0.5, -1, 1).to(torch.int8)

    exact(torch.nonzero((coords % seed_stride == 0).all(1))[:, 0])
    steps = [(axis, delta) for axis in range(3) for delta in (-1, 1)]
    stride = torch.tensor([R * R, R, 1], device=keys.device)
    for _ in range(4 * seed_stride + 8):  # a path from a seed is a few strides long; the rest is exact
        rows = torch.nonzero(sign == 0)[:, 0]
        if len(rows) == 0:
            break
        votes = torch.zeros((len(rows), 2), dtype=torch.int32, device=keys.device)
        for axis, delta in steps:
            other = coords[rows, axis] + delta
            query = keys[rows] + delta * stride[axis]
            pos = torch.searchsorted(keys, query).clamp(max=len(keys) - 1)
            ok = (other >= 0) & (other < R) & (keys[pos] == query)
            ok &= distance[rows] + distance[pos] > 1 + 1e-4
            votes[:, 0] += ok & (sign[pos] < 0)
            votes[:, 1] += ok & (sign[pos] > 0)
        agreed = (votes > 0).sum(1) == 1
        sign[rows[agreed]] = torch.where(votes[agreed, 0] > 0, -1, 1).to(torch.int8)
        exact(rows[(votes > 0).all(1)])
        if not agreed.any():
            break
    exact(torch.nonzero(sign == 0)[:, 0])
    return sign < 0


def subdivide(triangles: torch.Tensor, max_edge: float) -> torch.Tensor:
    """Longest-edge bisection of ``triangles`` [T, 3, 3] until no edge exceeds ``max_edge``.

    Bisection (not 4-way splits) keeps slivers cheap: a 1000 x 1 triangle becomes ~100 pieces.
    """
    done = []
    while len(triangles):
        edge2 = (triangles.roll(-1, dims=1) - triangles).square().sum(-1)  # [T, 3]
        longest2, k = edge2.max(1)
        long = longest2 > max_edge * max_edge
        done.append(triangles[~long])
        t, k = triangles[long], k[long]
        # Rotate each long triangle so its longest edge runs from vertex 0 to vertex 1, then halve it.
        order = (k[:, None] + torch.arange(3, device=t.device)) % 3
        t = t.gather(1, order[..., None].expand(-1, -1, 3))
        mid = (t[:, 0] + t[:, 1]) / 2
        triangles = torch.cat(
            [torch.stack([t[:, 0], mid, t[:, 2]], 1), torch.stack([mid, t[:, 1], t[:, 2]], 1)]
        )
    return torch.cat(done)


def split_segments(segments: torch.Tensor, max_length: float) -> torch.Tensor:
    """Segments [E, 2, 3] cut into equal pieces no longer than ``max_length``."""
    length = (segments[:, 1] - segments[:, 0]).norm(dim=1)
    pieces = torch.ceil(length / max_length).long().clamp_min(1)
    owner = torch.repeat_interleave(torch.arange(len(segments), device=segments.device), pieces)
    index = torch.arange(len(owner), device=segments.device) - (torch.cumsum(pieces, 0) - pieces)[owner]
    a, step = segments[owner, 0], (segments[owner, 1] - segments[owner, 0]) / pieces[owner, None]
    return torch.stack([a + index[:, None] * step, a + (index[:, None] + 1) * step], 1)


def box_points(lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every integer point of the boxes ``[lo, hi]`` (inclusive, int64 [n, 3]; empty where lo > hi).

    Returns ``owner`` [M] (the box of each point) and ``points`` int64 [3, M] (component-first),
    box after box: a ragged ``arange`` with no padding, whatever the box sizes.
    """
    size = (hi - lo + 1).clamp_min(0)
    count = size.prod(1)
    owner = torch.repeat_interleave(torch.arange(len(lo), device=lo.device), count)
    # One gather of everything per box (lo, sizes, first index) instead of one per quantity.
    per_box = torch.cat([lo, size[:, 1:], (torch.cumsum(count, 0) - count)[:, None]], 1).T.contiguous()
    x0, y0, z0, sy, sz, first = per_box.index_select(1, owner)
    local = torch.arange(len(owner), device=lo.device) - first
    dz = local % sz
    dy = (local // sz) % sy
    dx = local // (sz * sy)
    return owner, torch.stack([x0 + dx, y0 + dy, z0 + dz])


def slab_points(
    anchor: torch.Tensor, normal: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, radius: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The points of the boxes ``[lo, hi]`` whose centres (point + 0.5) lie within ``radius`` of the
    plane through ``anchor`` [n, 3] with unit ``normal`` [n, 3] (zero: the whole box), as
    ``box_points`` returns them.

    Columns along each plane's dominant normal axis are enumerated first, then only the stretch
    of each column inside the slab: a tilted triangle costs its slab, not its bounding box.
    """
    axis = normal.abs().argmax(1)
    perm = torch.stack([(axis + 1) % 3, (axis + 2) % 3, axis], 1)  # (u, v, d): d along the normal
    lo_p, hi_p, n_p, a_p = (t.gather(1, perm) for t in (lo, hi, normal, anchor))
    flat = torch.zeros_like(lo_p[:, :1])
    col_owner, cols = box_points(torch.cat([lo_p[:, :2], flat], 1), torch.cat([hi_p[:, :2], flat], 1))
    nu, nv, nd = n_p.T.index_select(1, col_owner)
    au, av, ad = a_p.T.index_select(1, col_owner)
    lo_d, hi_d = lo_p[:, 2].index_select(0, col_owner), hi_p[:, 2].index_select(0, col_owner)
    degenerate = nd == 0  # a zero normal: keep the whole column
    nd = torch.where(degenerate, torch.ones_like(nd), nd)
    height = ad - (nu * (cols[0] + 0.5 - au) + nv * (cols[1] + 0.5 - av)) / nd
    half = radius / nd.abs()
    z_lo = torch.where(degenerate, lo_d, torch.maximum(torch.ceil(height - half - 0.5).long(), lo_d))
    z_hi = torch.where(degenerate, hi_d, torch.minimum(torch.floor(height + half - 0.5).long(), hi_d))
    zeros = torch.zeros_like(z_lo)
    z_owner, z = box_points(torch.stack([z_lo, zeros, zeros], 1), torch.stack([z_hi, zeros, zeros], 1))
    owner = col_owner[z_owner]
    permuted = torch.stack([cols[0][z_owner], cols[1][z_owner], z[0]])
    return owner, torch.empty_like(permuted).scatter_(0, perm.index_select(0, owner).T, permuted)


def _chunks_by_count(count: torch.Tensor, budget: int) -> list[tuple[int, int]]:
    """Consecutive index ranges whose summed ``count`` stays near ``budget`` (at least one item each)."""
    ends = torch.cumsum(count, 0)
    bounds, start = [], 0
    while start < len(count):
        before = int(ends[start - 1]) if start else 0
        stop = int(torch.searchsorted(ends, torch.tensor(before + budget, device=ends.device), right=True))
        stop = max(stop, start + 1)
        bounds.append((start, stop))
        start = stop
    return bounds


def near_voxels(
    primitives: torch.Tensor,
    distance2: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    radius: float,
    resolution: int,
    chunk: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Voxels whose centre is within ``radius`` (voxel units) of a set of primitives, and their
    minimum squared distance: keys int64 [N] sorted and unique, ``d2`` [N].

    ``primitives`` [P, k, 3] are triangles (k = 3) or segments (k = 2) already cut short;
    ``distance2(points [3, M], vertices [k, 3, M])`` measures each point against its primitive.
    """
    # Voxel i's centre is i + 0.5: the box of centres within ``radius`` of [min, max].
    lo = torch.ceil(primitives.amin(1) - radius - 0.5).long().clamp(0, resolution - 1)
    hi = torch.floor(primitives.amax(1) + radius - 0.5).long().clamp(-1, resolution - 1)
    # Spatially sorted primitives make each chunk a compact region: few duplicates across chunks.
    centre = ((lo + hi) // 2).clamp_min(0)
    order = torch.argsort(grid_keys(centre // 16, resolution))
    primitives, lo, hi = primitives[order], lo[order], hi[order]
    size = (hi - lo + 1).clamp_min(0)
    triangles = primitives.shape[1] == 3
    if triangles:
        normal = torch.linalg.cross(primitives[:, 1] - primitives[:, 0], primitives[:, 2] - primitives[:, 0])
        normal = normal / normal.norm(dim=1, keepdim=True).clamp_min(1e-30)  # degenerate: stays 0
        # A slab column along the dominant axis d holds at most 2 radius / |n_d| + 2 points,
        # |n_d| >= 1 / sqrt(3): a bound on each piece's points, to size the chunks.
        size_d = size.gather(1, normal.abs().argmax(1, keepdim=True))[:, 0]
        column = torch.where(normal.any(1), size_d.clamp(max=int(2 * math.sqrt(3) * radius) + 2), size_d)
        count = size.prod(1) // size_d.clamp_min(1) * column
    else:
        count = size.prod(1)
    keys_parts: list[torch.Tensor] = []
    d2_parts: list[torch.Tensor] = []
    pending = 0
    # Per-primitive vertices as rows, so one gather per chunk fetches them for every point.
    rows = primitives.permute(1, 2, 0).reshape(-1, len(primitives))  # [k * 3, P]
    for start, stop in _chunks_by_count(count, chunk):
        if triangles:
            piece = slice(start, stop)
            owner, voxels = slab_points(primitives[piece, 0], normal[piece], lo[piece], hi[piece], radius)
        else:
            owner, voxels = box_points(lo[start:stop], hi[start:stop])
        vertices = rows[:, start:stop].index_select(1, owner).view(-1, 3, len(owner))  # [k, 3, M]
        d2 = distance2(voxels.to(primitives.dtype) + 0.5, vertices)
        near = torch.nonzero(d2 < radius * radius)[:, 0]
        voxels = voxels[:, near]
        keys, inverse = torch.unique(
            (voxels[0] * resolution + voxels[1]) * resolution + voxels[2], return_inverse=True
        )
        keys_parts.append(keys)
        d2_parts.append(
            torch.full_like(keys, torch.inf, dtype=d2.dtype).scatter_reduce(0, inverse, d2[near], "amin")
        )
        pending += len(keys)
        if pending > 2 * chunk:  # compact, so the buffers hold about one copy of the band
            merged_keys, merged_d2 = _merge_min(keys_parts, d2_parts)
            keys_parts, d2_parts, pending = [merged_keys], [merged_d2], len(merged_keys)
    keys, d2 = _merge_min(keys_parts, d2_parts)
    return keys, d2


def _merge_min(keys: list[torch.Tensor], d2: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    all_keys, all_d2 = torch.cat(keys), torch.cat(d2)
    unique, inverse = torch.unique(all_keys, return_inverse=True)
    return unique, torch.full_like(unique, torch.inf, dtype=all_d2.dtype).scatter_reduce(
        0, inverse, all_d2, "amin"
    )


def triangle_distance2(points: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
    return point_triangle_distance2(points, vertices[0], vertices[1], vertices[2])


def segment_distance2(points: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
    return point_segment_distance2(points, vertices[0], vertices[1])


def sharp_edges(vertices: np.ndarray, faces: np.ndarray, angle_deg: float) -> np.ndarray:
    """Endpoints [E, 2, 3] of the sharp edges: dihedral angle above ``angle_deg``, boundary, or non-manifold.

    Vertices are welded first (files like STL repeat them per face, which would make every edge a
    boundary). Normals of the two faces are compared after flipping one when the faces run the
    edge the same way (inconsistent orientation), so a flipped flat patch is not called sharp.
    """
    v = np.asarray(vertices, np.float64)
    _, weld = np.unique(np.round(v / WELD_TOLERANCE).astype(np.int64), axis=0, return_inverse=True)
    f = weld.reshape(-1)[np.asarray(faces, np.int64)]
    f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])]
    if len(f) == 0:
        return np.zeros((0, 2, 3))
    representative = np.zeros((weld.max() + 1, 3))
    representative[weld.reshape(-1)] = v
    normal = np.cross(
        representative[f[:, 1]] - representative[f[:, 0]], representative[f[:, 2]] - representative[f[:, 0]]
    )
    normal /= np.maximum(np.linalg.norm(normal, axis=1, keepdims=True), 1e-300)

    start = f.reshape(-1)  # half-edge k of face i runs f[i, k] -> f[i, k+1]
    end = np.roll(f, -1, axis=1).reshape(-1)
    face = np.repeat(np.arange(len(f)), 3)
    lo, hi = np.minimum(start, end), np.maximum(start, end)
    order = np.lexsort((hi, lo))
    lo, hi, start, face = lo[order], hi[order], start[order], face[order]
    new = np.r_[True, (lo[1:] != lo[:-1]) | (hi[1:] != hi[:-1])]
    first = np.flatnonzero(new)
    count = np.diff(np.r_[first, len(lo)])
    sharp = count != 2  # boundary or non-manifold
    pair = first[count == 2]
    n0, n1 = normal[face[pair]], normal[face[pair + 1]]
    same_direction = start[pair] == start[pair + 1]
    cos = np.einsum("ij,ij->i", n0, np.where(same_direction[:, None], -n1, n1))
    sharp[count == 2] = cos < math.cos(math.radians(angle_deg))
    edges = np.stack([lo[first[sharp]], hi[first[sharp]]], 1)
    return representative[edges]

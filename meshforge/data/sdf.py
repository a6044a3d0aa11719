"""Narrow-band sparse signed distance fields: mesh -> sparse SDF dataset (``meshforge sdf-voxelize``).

A mesh becomes the voxels of an ``R^3`` grid whose centres lie within ``band`` voxels (tau) of its
surface, each with a signed distance (negative inside) and a flag for voxels near sharp edges,
the input of Direct3D-S2's SS-VAE. Everything is written in torch and runs unchanged on CPU and
CUDA; no step allocates anything of size ``R^3``, work is cut in chunks of a fixed number of
elements, so memory stays bounded at ``R = 1024``.

Frame. The mesh is normalised as the tokenizer does (:func:`normalize_vertices`: bounding box
centred, longest side 1) and then scaled by ``fill`` (< 1), so that the band around the extreme
faces stays inside the grid; without that margin the surface at the bounding box would have no
outside voxels and re-meshing would leave holes there. The dataset stores the mesh in this frame
next to its SDF, so a reconstruction can be compared with its input directly. Voxel ``i``'s
centre is ``(i + 0.5) / R - 0.5``; distances are in the same units.

Unsigned distance (exact). Triangles are cut by longest-edge bisection until no edge is longer
than ``SUBDIVIDE`` voxels. For each piece, the voxels whose centres lie within tau of its plane
and inside its bounding box grown by tau are enumerated (columns along the plane's dominant axis,
then each column's stretch inside the slab: ragged ``arange``s, no padding) and their exact
point-triangle distances computed; a per-voxel minimum over pieces gives the distance. Cutting
bounds the box of every piece, so the work is a small constant times the size of the band,
whatever the triangle sizes.

Sign: generalised winding number (Jacobson et al. 2013), ``w(p) = sum of the solid angles of the
triangles seen from p / 4 pi``, and ``p`` is inside when ``w > 0.5``. It is exact (1 inside,
0 outside) for closed meshes and degrades gracefully where they are not: overlapping parts
(ShapeNet-style furniture) add up (w >= 1, still inside), a small hole barely changes w, and
inconsistently oriented patches only move w near themselves. Flood fill from outside would need a
dense grid or a sparse BFS of up to R steps, and leaks through any hole wider than a voxel. A
solid angle per voxel and face is the dominant cost, so it is only evaluated at one voxel in 8
and carried to the others along segments that provably cross no surface (:func:`inside_band`),
which changes nothing for closed meshes; ``max_faces`` bounds the rest.

Closing holes. A hole narrower than about ``2 * band`` voxels lies entirely inside the band, so
the sign change across it is sampled and marching cubes caps it; wider openings stay open (no
band voxel lies in their middle). Re-meshing is watertight when ``band > sqrt(3)``: then all 8
corners of every cube that the surface crosses are band voxels.

On the CPU, where point-cloud-utils is installed, the sign is its fast winding number (Barill et
al. 2018: the same w, with far triangle clusters summed by a multipole expansion) at every band
voxel: ~50x cheaper than the solid angles here, with the same signs away from the surface
(tests/data/test_sdf.py). Distances stay this module's exact ones: point-cloud-utils'
``signed_distance_to_mesh`` is off by up to 0.4% of the distance on a closed torus and far more
near open triangles. The torch path remains the reference, and the path on CUDA.

Sharp voxels are band voxels within ``sharp_radius`` voxels of a sharp edge: an edge whose two
faces meet at a dihedral angle above ``sharp_angle_deg`` (normals compared after making the
faces' orientation agree), a boundary edge of an open mesh, or a non-manifold edge.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from meshforge.config import from_dict, load_yaml, save_config, to_dict
from meshforge.data.batch import BatchFailed, Skip, run_batch
from meshforge.data.canonical import normalize_vertices
from meshforge.data.labels import class_label, label_sources, mesh_category, read_labels_file, synset_classes
from meshforge.data.meshio import (
    RawMesh,
    is_collection,
    load_collection,
    load_mesh_file,
    scan_mesh_files,
)
from meshforge.data.names import file_names, mesh_name
from meshforge.data.shards import assign_splits, is_val, split_key, split_source
from meshforge.errors import READ_ERRORS, InputError, MeshforgeError
from meshforge.io import atomic_path, atomic_write_json, hash_path, remove_stale_temporaries
from meshforge.runtime import console, has_module
from meshforge.sparse.marching_cubes import CORNER_OFFSETS, complete_cubes, grid_keys

FORMAT = "meshforge-sparse-sdf/1"
SPLITS = ("train", "val")
SignBackend = Literal["auto", "torch", "pcu"]
SUBDIVIDE = 24.0  # longest edge (voxels) of the pieces whose boxes are enumerated
WELD_TOLERANCE = 1e-6  # normalised units: vertices closer than this are one vertex for edge adjacency
# Elements per chunk (voxel-triangle pairs and the like). Each element costs ~100-200 bytes of
# temporaries, so these bound the working memory at a few hundred MB on CPU, a few GB on GPU.
CHUNK = {"cpu": 1 << 21, "cuda": 1 << 24}


@dataclass
class SdfConfig:
    input: Path
    out: Path
    resolution: int = 64
    band: float = 3.0  # tau in voxels: voxels with |sdf| < band / resolution are kept
    sharp_angle_deg: float = 30.0  # dihedral angle above which an edge is sharp
    sharp_radius: float = 1.5  # voxels: band voxels this close to a sharp edge are flagged
    fill: float = 0.9  # the normalised mesh is scaled by this, leaving a margin for the band
    max_faces: int = 50_000  # winding numbers cost O(voxels x faces)
    val_fraction: float = 0.05
    resplit: bool = False  # split sources with their own train/val split by content hash too
    workers: int = 0  # CPU worker processes (0 = every core); the CUDA path runs in one process
    sign_backend: SignBackend = "auto"  # winding numbers: auto = point-cloud-utils on the CPU when installed

    def __post_init__(self) -> None:
        if not 8 <= self.resolution <= 4096:
            raise ValueError("resolution must be in [8, 4096]")
        if not 0 < self.band <= self.resolution / 4:
            raise ValueError("band must be positive and at most resolution / 4 voxels")
        if not 0 < self.sharp_angle_deg < 180:
            raise ValueError("sharp_angle_deg must be in (0, 180)")
        if self.sharp_radius < 0:
            raise ValueError("sharp_radius must be >= 0")
        if not 0 < self.fill <= 1:
            raise ValueError("fill must be in (0, 1]")
        if self.max_faces < 1:
            raise ValueError("max_faces must be at least 1")
        if not 0 <= self.val_fraction < 1:
            raise ValueError("val_fraction must be in [0, 1)")
        if self.sign_backend == "pcu" and not has_module("point_cloud_utils"):
            raise ValueError("sign_backend pcu needs point-cloud-utils (pip install 'meshforge[data]')")

    def geometry(self) -> dict:
        """The options that determine every output file: a dataset is only resumed with equal ones."""
        return {
            k: getattr(self, k)
            for k in (
                "resolution",
                "band",
                "sharp_angle_deg",
                "sharp_radius",
                "fill",
                "max_faces",
                "val_fraction",
            )
        }


@dataclass
class SparseSDF:
    """One sparse SDF: voxel ``coords`` int32 [N, 3] in ``[0, R)``, ``sdf`` float32 [N] in normalised
    units (negative inside), ``sharp`` bool [N]; ``band`` is tau in voxels."""

    coords: torch.Tensor
    sdf: torch.Tensor
    sharp: torch.Tensor
    resolution: int
    band: float

    def __len__(self) -> int:
        return len(self.coords)

    def to(self, device: torch.device | str) -> SparseSDF:
        return SparseSDF(
            self.coords.to(device), self.sdf.to(device), self.sharp.to(device), self.resolution, self.band
        )

    def centres(self) -> torch.Tensor:
        """Voxel centres in normalised space, float32 [N, 3]."""
        return (self.coords.float() + 0.5) / self.resolution - 0.5


# ---------------------------------------------------------------------------------------------
# Geometry kernels (torch, any device). Vectors are component-first, [3, ...]: each coordinate is a
# contiguous row, so a dot product is five elementwise operations instead of a reduction over a
# trailing axis of size 3, which is several times faster on CPU.


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


def use_pcu(sign_backend: SignBackend, device: torch.device) -> bool:
    if sign_backend == "auto":
        return device.type == "cpu" and has_module("point_cloud_utils")
    return sign_backend == "pcu"


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


def _triangle_distance2(points: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
    return point_triangle_distance2(points, vertices[0], vertices[1], vertices[2])


def _segment_distance2(points: torch.Tensor, vertices: torch.Tensor) -> torch.Tensor:
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


# ---------------------------------------------------------------------------------------------
# Mesh -> sparse SDF


def _chunk(device: torch.device) -> int:
    return CHUNK["cuda" if device.type == "cuda" else "cpu"]


def voxelize(
    vertices: np.ndarray,
    faces: np.ndarray,
    resolution: int,
    band: float = 3.0,
    *,
    sharp_angle_deg: float = 30.0,
    sharp_radius: float = 1.5,
    device: torch.device | str = "cpu",
    chunk: int | None = None,
    sign_backend: SignBackend = "auto",
) -> SparseSDF:
    """The narrow-band sparse SDF of a mesh whose ``vertices`` already lie in the grid's frame [-0.5, 0.5].

    Returns voxels sorted by key (x-major) on ``device``. ``sign_backend``: see the module docstring.
    """
    device = torch.device(device)
    chunk = chunk or _chunk(device)
    R = resolution
    v = torch.as_tensor((np.asarray(vertices, np.float64) + 0.5) * R, dtype=torch.float32, device=device)
    f = torch.as_tensor(np.asarray(faces, np.int64), device=device)
    triangles = v[f]  # [F, 3, 3], voxel units

    keys, d2 = near_voxels(subdivide(triangles, SUBDIVIDE), _triangle_distance2, band, R, chunk)
    coords = torch.stack([keys // (R * R), keys // R % R, keys % R], 1)
    distance = d2.sqrt()
    if use_pcu(sign_backend, device):
        inside = pcu_inside(coords.to(v.dtype) + 0.5, v, f)
    else:
        inside = inside_band(coords, keys, distance, triangles, R, chunk)
    sdf = torch.where(inside, -distance, distance) / R

    sharp = torch.zeros(len(keys), dtype=torch.bool, device=device)
    segments = torch.as_tensor((sharp_edges(vertices, faces, sharp_angle_deg) + 0.5) * R, dtype=torch.float32)
    if len(segments) and sharp_radius > 0:
        pieces = split_segments(segments.to(device), SUBDIVIDE)
        sharp_keys, _ = near_voxels(pieces, _segment_distance2, sharp_radius, R, chunk)
        pos = torch.searchsorted(sharp_keys, keys).clamp(max=max(len(sharp_keys) - 1, 0))
        sharp = (sharp_keys[pos] == keys) if len(sharp_keys) else sharp
    return SparseSDF(coords.int(), sdf, sharp, R, float(band))


def resample(sdf: SparseSDF, new_resolution: int, band: float | None = None) -> SparseSDF:
    """The same field on an ``new_resolution^3`` grid, by trilinear interpolation inside the band.

    A new voxel is kept when the 8 old voxels around its centre all exist (so it is interpolated,
    never extrapolated) and ``|sdf| < band`` new voxels (default: the old band in voxels); its
    sharp flag is the nearest old voxel's. Within the band the SDF is smooth except on the medial
    axis and at sharp features, so interpolation is accurate to a fraction of an old voxel. The
    band shrinks with the grid step: going down by a factor k keeps about ``band / k`` new voxels
    each side of the surface, so resample *down* from a dataset voxelised with a band k times
    wider, or re-voxelise the stored mesh (:meth:`SparseSDFDataset.mesh` + :func:`voxelize`),
    which is exact.
    """
    band = sdf.band if band is None else band
    R, S = sdf.resolution, new_resolution
    base, rows = complete_cubes(sdf.coords, R)
    # New voxel j's centre in old grid units is u = (j + 0.5) S' - 0.5 with S' = R / S; the new
    # voxels of the cube [b, b+1) (half-open, so each falls in exactly one cube) are those below.
    scale = R / S
    lo = torch.ceil((base + 0.5) / scale - 0.5).long()
    hi = torch.ceil((base + 1.5) / scale - 0.5).long() - 1
    owner, new = box_points(lo.clamp(0, S - 1), hi.clamp(-1, S - 1))
    new = new.T
    u = (new.double() + 0.5) * scale - 0.5 - base[owner]  # position inside the cube, [0, 1)
    corner_values = sdf.sdf[rows[owner]].double()  # [M, 8]
    corner = CORNER_OFFSETS.to(u.device).bool()
    weights = torch.where(corner, u[:, None, :], 1 - u[:, None, :]).prod(-1)  # trilinear, [M, 8]
    values = (weights * corner_values).sum(1).float()
    nearest = rows[owner].gather(1, weights.argmax(1, keepdim=True))[:, 0]
    keep = values.abs() < band / S
    return SparseSDF(new[keep].int(), values[keep], sdf.sharp[nearest[keep]], S, float(band))


# ---------------------------------------------------------------------------------------------
# Dataset folders


@dataclass
class MeshResult:
    """One mesh of the dataset, as recorded in the manifest."""

    name: str
    source: str
    split: Literal["train", "val"]
    key: str
    voxels: int
    sharp: int
    faces: int
    resumed: bool  # already on disk from an earlier run
    source_split: Literal["train", "val"] | None = None  # the split the source gave it (kept unless resplit)
    category: str | None = None  # the category the source gave it


def _mesh_path(out: Path, split: str, name: str) -> Path:
    return out / split / f"{name}.npz"


_DAMAGED = (*READ_ERRORS, KeyError)  # an .npz cut short may also lack a member


def _finished(out: Path, name: str, source: str, digest: str) -> MeshResult | None:
    """The record of a mesh an earlier run already wrote from the same input bytes, if any."""
    for split in SPLITS:
        path = _mesh_path(out, split, name)
        if path.is_file():
            try:
                with np.load(path) as data:
                    if str(data["source_hash"]) != digest:
                        return None  # the input changed since: voxelise it again
                    return MeshResult(
                        name,
                        source,
                        split,
                        str(data["split_key"]),
                        len(data["sdf"]),
                        int(data["sharp"].sum()),
                        len(data["faces"]),
                        resumed=True,
                    )
            except _DAMAGED:
                return None  # damaged on disk since it was written (writes are atomic): redo it
    return None


def _voxelize_mesh(
    raw: RawMesh, name: str, source: str, digest: str, cfg: SdfConfig, device: torch.device
) -> MeshResult:
    if len(raw.faces) > cfg.max_faces:
        raise InputError(source, f"{len(raw.faces)} faces, more than max_faces={cfg.max_faces}")
    try:
        vertices = (normalize_vertices(raw.vertices) * cfg.fill).astype(np.float32)
    except ValueError as exc:
        raise InputError(source, str(exc)) from None
    faces = raw.faces.astype(np.int32)
    # The key of the stored float32 mesh, so a resumed run recomputing it agrees with this one.
    key = split_key(vertices, faces)
    split = "val" if is_val(key, cfg.val_fraction) else "train"
    grid = voxelize(
        vertices,
        faces,
        cfg.resolution,
        cfg.band,
        sharp_angle_deg=cfg.sharp_angle_deg,
        sharp_radius=cfg.sharp_radius,
        device=device,
        sign_backend=cfg.sign_backend,
    )
    with atomic_path(_mesh_path(cfg.out, split, name)) as tmp, open(tmp, "wb") as fh:
        np.savez(
            fh,
            coords=grid.coords.cpu().numpy().astype(np.int16),
            sdf=grid.sdf.cpu().numpy().astype(np.float16),
            sharp=grid.sharp.cpu().numpy(),
            resolution=np.int64(cfg.resolution),
            band=np.float64(cfg.band),
            vertices=vertices,
            faces=faces,
            split_key=np.str_(key),
            source_hash=np.str_(digest),
        )
        fh.flush()
        os.fsync(fh.fileno())
    # An earlier version of this mesh (its input has changed) may sit in the other split.
    _mesh_path(cfg.out, "train" if split == "val" else "val", name).unlink(missing_ok=True)
    return MeshResult(name, source, split, key, len(grid), int(grid.sharp.sum()), len(faces), resumed=False)


@dataclass
class FileResult:
    meshes: list[MeshResult]
    skipped: list[Skip]


def voxelize_file(path: Path, name: str, cfg: SdfConfig, device: str, threads: int) -> FileResult:
    """Voxelise every mesh of one input file not already on disk (runs in a worker process)."""
    if threads:
        torch.set_num_threads(threads)
    dev = torch.device(device)
    digest = hash_path(path)
    if not is_collection(path):
        done = _finished(cfg.out, name, str(path), digest)
        return FileResult(
            [done or _voxelize_mesh(load_mesh_file(path), name, str(path), digest, cfg, dev)], []
        )
    members, problems = load_collection(path, strict=False)
    results, skipped = [], [Skip(f"{path}#{member}", problem) for member, problem in problems]
    for raw in members:
        where = f"{path}#{raw.name.split('/', 1)[1]}" if "/" in raw.name else str(path)
        member = mesh_name(name, raw.name)
        try:
            done = _finished(cfg.out, member, where, digest)
            result = done or _voxelize_mesh(raw, member, where, digest, cfg, dev)
            result.source_split = None if cfg.resplit else raw.split
            result.category = raw.category
            results.append(result)
        except InputError as exc:
            skipped.append(Skip(where, exc.problem))
    if not results:
        first = skipped[0].reason if skipped else "empty"
        raise InputError(
            path, f"no usable mesh among {len(members) + len(problems)} in the collection (first: {first})"
        )
    return FileResult(results, skipped)


def _check_resumable(cfg: SdfConfig) -> None:
    """An existing output folder is resumed only when it was made with the same geometry options."""
    previous = cfg.out / "config.yaml"
    if not previous.is_file():
        if cfg.out.exists() and any(cfg.out.iterdir()):
            raise MeshforgeError(f"{cfg.out}: exists and is not a sparse SDF dataset; choose another --out")
        return
    recorded = load_yaml(previous)
    recorded.pop("device", None)  # recorded by meshforge before the device moved to the run context
    old = from_dict(SdfConfig, recorded).geometry()
    changed = {k: (old[k], v) for k, v in cfg.geometry().items() if old[k] != v}
    if changed:
        detail = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in changed.items())
        raise MeshforgeError(f"{cfg.out}: was written with other settings ({detail}); choose another --out")


def _balance_splits(meshes: list[MeshResult], cfg: SdfConfig) -> None:
    """Apply the tokenizer's split rule (:func:`assign_splits`) to the whole set: each mesh was
    written to its hash's split, and the rule moves the meshes whose source gave them another split,
    and may move one so that neither split is empty."""
    fixed = [m.source_split for m in meshes]
    for mesh, split in zip(meshes, assign_splits([m.key for m in meshes], cfg.val_fraction, fixed)):
        if mesh.split != split:
            target = _mesh_path(cfg.out, split, mesh.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(_mesh_path(cfg.out, mesh.split, mesh.name), target)
            mesh.split = split


def voxelize_folder(cfg: SdfConfig, device: torch.device | str = "cpu") -> dict:
    """Voxelise every mesh under ``cfg.input`` into the dataset folder ``cfg.out`` on ``device``
    (one process on CUDA, ``cfg.workers`` processes on the CPU); returns a summary.

    Each mesh is written as soon as it is done (atomically), and a re-run skips meshes already on
    disk from the same input bytes (each file records its input's hash), so an interrupted run
    resumes where it stopped and an edited input (or a damaged output) is redone. ``manifest.json``
    is written last and lists exactly the meshes of the current inputs. A failure that is not about
    an input (a full disk) stops the run with a one-line error and no manifest, keeping every mesh
    finished so far for the next run.
    """
    started = time.perf_counter()
    root = Path(cfg.input)
    if not root.exists():
        raise InputError(root, "no such file or folder")
    base = root if root.is_dir() else root.parent
    scan = scan_mesh_files(root)
    files = scan.files
    if not files:
        raise MeshforgeError(f"{root}: no mesh files found")
    labels = read_labels_file(base)
    device = torch.device(device)
    _check_resumable(cfg)
    cfg.out.mkdir(parents=True, exist_ok=True)
    # Until this run writes its own, the folder is unfinished: a manifest of an earlier run would
    # vouch for files this run may replace or move before it fails.
    (cfg.out / "manifest.json").unlink(missing_ok=True)
    remove_stale_temporaries(cfg.out)  # left by a writer that was killed (they can fill a disk)
    save_config(cfg, cfg.out / "config.yaml")

    # CUDA work stays in this process (one GPU, no fork after CUDA init); CPU work is spread over
    # processes of one torch thread each, which beats torch's intra-op threads on many small meshes.
    workers = 1 if device.type == "cuda" else cfg.workers
    import trimesh  # noqa: F401  (imported before the pool forks, so no worker pays for it again)

    threads = 1 if workers != 1 else 0
    fn = partial(_voxelize_item, names=file_names(files, base), cfg=cfg, device=str(device), threads=threads)
    try:
        batch = run_batch(
            files, fn, workers=workers, description=f"sdf-voxelize R={cfg.resolution} ({device.type})"
        )
    except BatchFailed as exc:
        raise MeshforgeError(
            f"{exc}; meshes finished so far are kept in {cfg.out}: re-run to resume"
        ) from exc
    skipped = [*scan.skipped, *batch.skipped]
    meshes: list[MeshResult] = []
    for _, result in batch.done:
        meshes += result.meshes
        skipped += result.skipped
    skipped.sort(key=lambda s: s.path)
    if not meshes:
        reasons = "; ".join(f"{n}x {r}" for r, n in Counter(s.reason for s in skipped).most_common(3))
        raise MeshforgeError(f"{root}: no usable mesh among {len(files)} files ({reasons})")
    _balance_splits(meshes, cfg)
    source_categories = any(m.category is not None for m in meshes)
    for m in meshes:
        m.category = mesh_category(Path(m.source.split("#", 1)[0]).relative_to(base), labels, m.category)
    classes = sorted({class_label(m.category) for m in meshes if m.category is not None})

    seconds = time.perf_counter() - started
    computed = [m for m in meshes if not m.resumed]
    counts = {
        "files": len(files),
        "meshes": len(meshes),
        "train": sum(m.split == "train" for m in meshes),
        "val": sum(m.split == "val" for m in meshes),
        "computed": len(computed),
        "resumed": len(meshes) - len(computed),
        "skipped": len(skipped),
        "voxels": sum(m.voxels for m in meshes),
    }
    manifest = {
        "format": FORMAT,
        "resolution": cfg.resolution,
        "band": cfg.band,
        "fill": cfg.fill,
        "sharp_angle_deg": cfg.sharp_angle_deg,
        "sharp_radius": cfg.sharp_radius,
        "device": str(device),
        "counts": counts,
        "classes": classes,
        "label_source": label_sources(labels, source_categories),
        "synsets": synset_classes(m.category for m in meshes),
        "split_source": split_source([m.source_split for m in meshes]),
        "meshes": {split: sorted(m.name for m in meshes if m.split == split) for split in SPLITS},
        "records": [
            {
                "name": m.name,
                "source": m.source,
                "split": m.split,
                "label": class_label(m.category),
                "voxels": m.voxels,
                "sharp": m.sharp,
                "faces": m.faces,
            }
            for m in sorted(meshes, key=lambda m: m.name)
        ],
        "skipped": [{"path": s.path, "reason": s.reason} for s in skipped],
        "config": to_dict(cfg),
    }
    atomic_write_json(cfg.out / "manifest.json", manifest)

    line = (
        f"voxelised {len(meshes)} meshes at R={cfg.resolution} (train {counts['train']}, val {counts['val']}; "
        f"{len(computed)} computed, {counts['resumed']} already done) in {seconds:.1f}s on {device.type}"
    )
    if skipped:
        top = "; ".join(f"{n}x {r}" for r, n in Counter(s.reason for s in skipped).most_common(3))
        line += f"; skipped {len(skipped)} (see manifest.json): {top}"
    console.print(line, markup=False, highlight=False)
    return {
        **counts,
        "meshes_per_s": round(len(computed) / seconds, 2) if computed else None,
        "seconds": round(seconds, 2),
        "out": str(cfg.out),
    }


def _voxelize_item(
    path: Path, names: dict[Path, str], cfg: SdfConfig, device: str, threads: int
) -> FileResult:
    return voxelize_file(path, names[path], cfg, device, threads)


class SparseSDFDataset:
    """One split of a dataset written by :func:`voxelize_folder`; items are :class:`SparseSDF` on CPU."""

    def __init__(self, root: Path, split: Literal["train", "val"] = "train"):
        self.root = Path(root)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        path = self.root / "manifest.json"
        if not path.is_file():
            # config.yaml is written first and manifest.json last: with only the first, a run stopped.
            unfinished = (self.root / "config.yaml").is_file()
            hint = (
                "re-run `meshforge sdf-voxelize` to finish it"
                if unfinished
                else "make one with `meshforge sdf-voxelize`"
            )
            raise InputError(self.root, f"not a finished sparse SDF dataset (no manifest.json; {hint})")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise InputError(
                path, f"unsupported dataset format {self.manifest.get('format')!r} (expected {FORMAT})"
            )
        self.split = split
        self.names: list[str] = self.manifest["meshes"][split]
        self.resolution: int = self.manifest["resolution"]
        self.band: float = self.manifest["band"]

    def __len__(self) -> int:
        return len(self.names)

    def _read(self, i: int, keys: tuple[str, ...]) -> list[np.ndarray]:
        path = _mesh_path(self.root, self.split, self.names[i])
        try:
            with np.load(path) as data:
                return [data[k] for k in keys]
        except _DAMAGED as exc:
            # A re-run of sdf-voxelize redoes exactly the damaged files (see _finished).
            raise InputError(
                path,
                f"missing or damaged ({type(exc).__name__}: {exc}); re-run `meshforge sdf-voxelize` to redo it",
            ) from None

    def __getitem__(self, i: int) -> SparseSDF:
        coords, sdf, sharp, resolution, band = self._read(i, ("coords", "sdf", "sharp", "resolution", "band"))
        return SparseSDF(
            coords=torch.from_numpy(coords.astype(np.int32)),
            sdf=torch.from_numpy(sdf.astype(np.float32)),
            sharp=torch.from_numpy(sharp),
            resolution=int(resolution),
            band=float(band),
        )

    def mesh(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The mesh in the SDF's frame: ``vertices`` float32 [V, 3], ``faces`` int32 [F, 3]."""
        vertices, faces = self._read(i, ("vertices", "faces"))
        return vertices, faces

"""Canonical quantised meshes: the one geometry convention every token model shares.

A mesh becomes canonical by (following MeshGPT/PolyGen, as iFlame trains):

1. normalising: bounding-box centre at 0, longest side 1, so coordinates lie in [-0.5, 0.5];
2. optionally augmenting (training only): a random per-axis scale, re-normalising, then a random
   per-axis shift clamped so the mesh stays inside the unit cube;
3. quantising every coordinate to ``2**bits`` levels (bin ``floor((c + 0.5) * 2**bits)``);
4. merging vertices that land in the same cell and dropping unreferenced ones;
5. dropping degenerate faces (a repeated vertex, or zero area on the integer grid) and duplicate
   faces (the same three vertices, whatever the winding);
6. ordering: vertices sorted by (z, y, x); each face rotated (keeping its winding) so its lowest
   index comes first; faces sorted by their index triples.

Steps 4-6 are :func:`from_quantized`, which the detokeniser reuses, so decoding a canonical
token sequence reproduces the canonical mesh exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from meshforge.errors import InputError


@dataclass(frozen=True)
class Augment:
    """Random per-axis scale and shift applied before quantisation (MeshGPT's ranges by default).

    ``scale_min``/``scale_max`` bound the per-axis scale factors; ``shift`` bounds the per-axis
    translation in normalised units (clamped so that the mesh stays in [-0.5, 0.5]).
    """

    scale_min: float = 0.75
    scale_max: float = 1.25
    shift: float = 0.1

    def __post_init__(self) -> None:
        if not 0 < self.scale_min <= self.scale_max:
            raise ValueError(
                f"augment scale range [{self.scale_min}, {self.scale_max}] must be positive and ordered"
            )
        if not 0 <= self.shift <= 0.5:
            raise ValueError(f"augment shift {self.shift} must be in [0, 0.5]")


@dataclass(eq=False)
class CanonicalMesh:
    """Quantised canonical mesh: ``vertices`` int64 [V,3] (x, y, z) in ``[0, 2**bits)``, ``faces`` int64 [F,3].

    ``face_source`` (when known) gives, for each face, the index of the input face it came from;
    the tokenizer uses it to store exactly the geometry that survives canonicalisation.
    """

    vertices: np.ndarray
    faces: np.ndarray
    bits: int = 7
    face_source: np.ndarray | None = None

    @property
    def num_faces(self) -> int:
        return len(self.faces)

    def float_vertices(self) -> np.ndarray:
        """Vertex positions (cell centres) in normalised space [-0.5, 0.5], float64."""
        return dequantize(self.vertices, self.bits)


def normalize_vertices(vertices: np.ndarray) -> np.ndarray:
    """Centre the bounding box at 0 and scale its longest side to 1 (coordinates in [-0.5, 0.5])."""
    v = np.asarray(vertices, dtype=np.float64)
    lo, hi = v.min(axis=0), v.max(axis=0)
    extent = float((hi - lo).max())
    if not np.isfinite(extent) or extent <= 0:
        raise ValueError("cannot normalise vertices with zero or non-finite extent")
    return (v - (lo + hi) / 2) / extent


def quantize(vertices: np.ndarray, bits: int) -> np.ndarray:
    """Normalised coordinates in [-0.5, 0.5] -> integer cells ``0 .. 2**bits - 1``."""
    levels = 1 << bits
    return np.clip(np.floor((vertices + 0.5) * levels), 0, levels - 1).astype(np.int64)


def dequantize(cells: np.ndarray, bits: int) -> np.ndarray:
    """Integer cells -> cell centres in normalised space."""
    return (np.asarray(cells, dtype=np.float64) + 0.5) / (1 << bits) - 0.5


def augment_vertices(vertices: np.ndarray, augment: Augment, rng: np.random.Generator) -> np.ndarray:
    """Scale each axis, re-normalise, shift each axis within the room the unit cube leaves."""
    v = normalize_vertices(vertices * rng.uniform(augment.scale_min, augment.scale_max, size=3))
    shift = rng.uniform(-augment.shift, augment.shift, size=3)
    # The longest axis fills [-0.5, 0.5] after normalising, so it never moves; the others move
    # at most as far as keeps them inside the cube (MeshGPT's clamp).
    return v + np.clip(shift, -0.5 - v.min(axis=0), 0.5 - v.max(axis=0))


def valid_face_mask(cells: np.ndarray, faces: np.ndarray) -> np.ndarray:
    """Faces with three distinct vertices and non-zero area on the integer grid (exact arithmetic)."""
    a, b, c = faces[:, 0], faces[:, 1], faces[:, 2]
    distinct = (a != b) & (b != c) & (a != c)
    p = cells[faces]
    cross = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    return distinct & np.any(cross != 0, axis=1)


def from_quantized(cells: np.ndarray, faces: np.ndarray, bits: int) -> CanonicalMesh:
    """Merge, clean and order a quantised mesh (steps 4-6 above). May return a mesh with no faces."""
    cells = np.asarray(cells, dtype=np.int64)
    faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    levels = 1 << bits
    # One integer key per cell whose numeric order is (z, y, x) order: np.unique then merges
    # coinciding vertices, drops unreferenced ones and sorts, all in one pass.
    keys = (cells[:, 2] * levels + cells[:, 1]) * levels + cells[:, 0]
    unique_keys, inverse = np.unique(keys[faces].ravel(), return_inverse=True)
    vertices = np.stack(
        [unique_keys % levels, unique_keys // levels % levels, unique_keys // (levels * levels)], 1
    )
    faces = inverse.reshape(-1, 3)
    source = np.arange(len(faces))

    keep = valid_face_mask(vertices, faces)
    faces, source = faces[keep], source[keep]

    # Rotate (not sort) each face so its lowest index leads: the winding, hence the normal, is kept.
    first = np.argmin(faces, axis=1)[:, None]
    faces = np.take_along_axis(faces, (first + np.arange(3)) % 3, axis=1)

    # Duplicates are the same vertex set with either winding; keep the first in sorted order.
    order = np.lexsort((faces[:, 2], faces[:, 1], faces[:, 0]))
    faces, source = faces[order], source[order]
    vertex_sets = np.sort(faces, axis=1)
    _, first_of_set = np.unique(vertex_sets, axis=0, return_index=True)
    kept = np.sort(first_of_set)
    faces, source = faces[kept], source[kept]

    # Faces may now reference fewer vertices than before (dropped faces); re-index so that every
    # vertex is used, which keeps the vertex order and makes decoding exact.
    used, faces_compact = np.unique(faces.ravel(), return_inverse=True)
    return CanonicalMesh(
        vertices=vertices[used], faces=faces_compact.reshape(-1, 3), bits=bits, face_source=source
    )


def canonicalize(
    vertices: np.ndarray,
    faces: np.ndarray,
    bits: int = 7,
    augment: Augment | None = None,
    *,
    rng: np.random.Generator | None = None,
    name: str = "mesh",
) -> CanonicalMesh:
    """Normalise, (augment), quantise, merge, clean and order a triangle mesh.

    ``rng`` drives augmentation (a fresh unseeded generator when omitted); ``name`` labels errors.
    Raises :class:`InputError` when the mesh has no extent or no face survives.
    """
    faces = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    if len(faces) == 0:
        raise InputError(name, "no faces")
    try:
        v = normalize_vertices(vertices)
    except ValueError as exc:
        raise InputError(name, str(exc)) from None
    if augment is not None:
        v = augment_vertices(v, augment, rng if rng is not None else np.random.default_rng())
    mesh = from_quantized(quantize(v, bits), faces, bits)
    if mesh.num_faces == 0:
        raise InputError(name, f"no face survives quantisation to {bits} bits (all degenerate)")
    return mesh

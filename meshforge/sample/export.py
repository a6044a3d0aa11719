"""Sampled meshes to files: mesh files (OBJ/PLY/GLB), ``stats.json`` and a ``grid.png`` preview.

Every file is written atomically; ``stats.json`` is written last, so its presence marks a complete
folder. Statistics per mesh:

* ``valid``: the mesh has faces, finite vertices, in-range indices and no degenerate face (a
  repeated vertex or zero area); ``problem`` says what is wrong otherwise.
* ``watertight``: valid, and every edge is shared by exactly two faces once vertices at equal
  positions are merged (a closed surface; the winding is not required to be consistent).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from meshforge.data.canonical import CanonicalMesh
from meshforge.data.synth import mesh_bytes
from meshforge.errors import MeshforgeError
from meshforge.io import atomic_write_bytes, atomic_write_json
from meshforge.render import Mesh, render_grid
from meshforge.runtime import track

FORMATS = ("obj", "ply", "glb")
STATS = "stats.json"
GRID = "grid.png"


def mesh_from_canonical(mesh: CanonicalMesh) -> Mesh:
    """Float geometry of a canonical (already merged and cleaned) mesh: cell centres in [-0.5, 0.5]."""
    return mesh.float_vertices(), np.asarray(mesh.faces, dtype=np.int64)


def postprocess(mesh: Mesh, simplify: int | None = None, fill_holes: bool = False) -> Mesh:
    """The clean-up the released Direct3D-S2 pipeline gives its meshes: holes filled (trimesh's
    boundary-loop fans), then quadric decimation to at most ``simplify`` faces (fast-simplification,
    optional: ``pip install 'meshforge[post]'``). Marching cubes at 1024^3 makes millions of faces."""
    vertices, faces = mesh
    if fill_holes and len(faces):
        import trimesh

        filled = trimesh.Trimesh(vertices, faces, process=True)
        trimesh.repair.fill_holes(filled)
        vertices, faces = np.asarray(filled.vertices), np.asarray(filled.faces)
    if simplify is not None and len(faces) > simplify:
        try:
            import fast_simplification
        except ImportError:
            raise MeshforgeError("--simplify needs fast-simplification: pip install 'meshforge[post]'") from None
        vertices, faces = fast_simplification.simplify(np.asarray(vertices, np.float32), faces, target_count=simplify)
    return np.asarray(vertices, np.float32), np.asarray(faces, np.int64)


def mesh_problem(vertices: np.ndarray, faces: np.ndarray) -> str | None:
    """Why a mesh is not valid (see the module docstring), or None when it is."""
    if len(faces) == 0:
        return "no faces"
    if not np.isfinite(vertices).all():
        return "non-finite vertices"
    if faces.min() < 0 or faces.max() >= len(vertices):
        return "face index out of range"
    tri = vertices[faces]
    area2 = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    extent = float(np.ptp(vertices[faces.ravel()], axis=0).max())
    # Zero area up to rounding, relative to the mesh's size (quantised meshes have exact zeros).
    degenerate = int(np.count_nonzero(area2 <= 1e-12 * max(extent, 1e-300) ** 2))
    return f"{degenerate} degenerate faces" if degenerate else None


def is_watertight(vertices: np.ndarray, faces: np.ndarray) -> bool:
    """Every undirected edge used by exactly two faces, after merging vertices at equal positions."""
    if len(faces) == 0:
        return False
    _, ids = np.unique(vertices, axis=0, return_inverse=True)
    f = ids.reshape(-1)[faces].astype(np.int64)
    edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    # One int64 key per edge: a 1-D unique is a plain sort, many times faster than unique(axis=0)
    # on the million-edge meshes of marching cubes at R 256 and more.
    keys = edges[:, 0] * (int(f.max()) + 1) + edges[:, 1]
    _, counts = np.unique(keys, return_counts=True)
    return bool((counts == 2).all())


def mesh_stats(vertices: np.ndarray, faces: np.ndarray) -> dict[str, Any]:
    """``faces``, ``vertices``, ``valid``, ``watertight`` and ``problem`` of one mesh."""
    v = np.asarray(vertices, dtype=np.float64).reshape(-1, 3)
    f = np.asarray(faces, dtype=np.int64).reshape(-1, 3)
    problem = mesh_problem(v, f)
    return {
        "faces": len(f),
        "vertices": len(v),
        "valid": problem is None,
        "watertight": problem is None and is_watertight(v, f),
        "problem": problem,
    }


def faces_of(mesh: Mesh, part: Mesh) -> np.ndarray:
    """Boolean mask over ``mesh``'s faces: those whose three corners (as a set of positions) are a
    face of ``part`` too (a completion's prompt faces: decoding re-sorts faces, so position is the key)."""
    def keys(vertices: np.ndarray, faces: np.ndarray) -> np.ndarray:
        corners = np.asarray(vertices, dtype=np.float64)[np.asarray(faces, dtype=np.int64).reshape(-1, 3)]
        order = np.lexsort(corners.transpose(2, 0, 1)[::-1], axis=-1)  # corners sorted x, then y, then z
        return np.take_along_axis(corners, order[..., None], axis=1).reshape(len(corners), 9)

    ours, theirs = keys(*mesh), keys(*part)
    if len(ours) == 0 or len(theirs) == 0:
        return np.zeros(len(ours), dtype=bool)
    return (ours[:, None, :] == theirs[None, :, :]).all(-1).any(-1)


def prompt_name(name: str) -> str:
    return f"{name}_prompt"


def sample_files(out_dir: Path) -> list[list[Path]]:
    """Per sample, its mesh files (one per format, and its prompt's when it had one) in a folder
    :func:`write_samples` wrote, from its stats."""
    stats = json.loads((Path(out_dir) / STATS).read_text())
    names = [[m["name"], *([prompt_name(m["name"])] if "prompt_faces" in m else [])] for m in stats["meshes"]]
    return [[Path(out_dir) / f"{n}.{fmt}" for n in group for fmt in stats["formats"]] for group in names]


def _remove_previous(out_dir: Path, keep: set[str]) -> None:
    """Delete the mesh files of an earlier ``write_samples`` into ``out_dir`` that this one will not replace,
    so the folder never mixes two runs (a smaller ``n`` would otherwise leave old samples behind)."""
    if not (out_dir / STATS).is_file():
        return
    try:
        previous = sample_files(out_dir)
    except (OSError, ValueError, KeyError, TypeError):
        return  # not our stats file: leave everything alone
    for path in (p for files in previous for p in files):
        if path.name not in keep:
            path.unlink(missing_ok=True)
    (out_dir / STATS).unlink()  # until the new one is written, the folder is not complete


def write_samples(
    meshes: Sequence[Mesh],
    out_dir: Path,
    formats: Sequence[str] = ("obj",),
    names: Sequence[str] | None = None,
    extra_stats: dict[str, Any] | None = None,
    prompts: Sequence[Mesh] | None = None,
) -> dict[str, Any]:
    """Write ``NAME.FORMAT`` for every mesh and format (names default to ``sample_000`` ...),
    ``grid.png`` and ``stats.json``; returns the stats.

    The stats hold totals (``count``, ``valid`` and ``watertight`` counts, face and vertex
    figures), the ``extra_stats`` (such as ``time_s``, ``tokens_per_s``) and ``meshes``: one
    :func:`mesh_stats` record per mesh with its ``name``. With ``prompts`` (one per mesh, the
    meshes being their completions) each prompt is written beside its completion as
    ``NAME_prompt.FORMAT``, its face count is the record's ``prompt_faces``, and the grid draws
    the completion's prompt faces in green.
    """
    if not meshes:
        raise ValueError("write_samples needs at least one mesh")
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ValueError(f"formats must be among {', '.join(FORMATS)} (got {list(formats)})")
    names = list(names) if names is not None else [f"sample_{i:03d}" for i in range(len(meshes))]
    if len(names) != len(meshes) or len(set(names)) != len(names):
        raise ValueError(f"need {len(meshes)} distinct names, got {names}")
    if any(not n or "/" in n or "\\" in n or n.startswith(".") for n in names):
        raise ValueError(f"names must be plain file names, got {names}")
    if prompts is not None and len(prompts) != len(meshes):
        raise ValueError(f"{len(prompts)} prompts for {len(meshes)} meshes")
    records = [{"name": name, **mesh_stats(v, f)} for name, (v, f) in zip(names, meshes)]
    files = list(zip(names, meshes))
    if prompts is not None:
        for record, (_, faces) in zip(records, prompts):
            record["prompt_faces"] = len(np.asarray(faces).reshape(-1, 3))
        files += [(prompt_name(name), prompt) for name, prompt in zip(names, prompts)]
    face_counts = [r["faces"] for r in records]
    totals = {
        "count": len(records),
        "valid": sum(r["valid"] for r in records),
        "watertight": sum(r["watertight"] for r in records),
        "faces_total": int(sum(face_counts)),
        "faces_mean": round(float(np.mean(face_counts)), 2),
        "faces_max": int(max(face_counts)),
        "vertices_total": int(sum(r["vertices"] for r in records)),
        "formats": list(formats),
    }
    clash = sorted(set(extra_stats or {}) & {*totals, "meshes"})
    if clash:
        raise ValueError(f"extra_stats may not redefine {clash}")
    stats = {**totals, **(extra_stats or {}), "meshes": records}

    out_dir = Path(out_dir)
    _remove_previous(out_dir, keep={f"{name}.{fmt}" for name, _ in files for fmt in formats})
    for name, (vertices, faces) in track(files, "export"):
        for fmt in formats:
            atomic_write_bytes(
                out_dir / f"{name}.{fmt}", mesh_bytes(np.asarray(vertices), np.asarray(faces), fmt)
            )
    labels = [
        f"{r['name']}: {r['faces']} faces" + (f" ({r['prompt_faces']} prompt)" if "prompt_faces" in r else "")
        + ("" if r["valid"] else " (invalid)")
        for r in records
    ]
    highlights = [faces_of(mesh, prompt) for mesh, prompt in zip(meshes, prompts)] if prompts is not None else None
    render_grid(meshes, out_dir / GRID, labels=labels, highlights=highlights)
    atomic_write_json(out_dir / STATS, stats)
    return stats

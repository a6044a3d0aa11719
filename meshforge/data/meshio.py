"""Reading meshes from user folders: single-mesh files and MeshGPT-style collections.

Every loader returns plain triangle soups (:class:`RawMesh`) and turns every way a file can be
bad into an :class:`~meshforge.errors.InputError` naming the problem, so batch jobs can record it
and move on. Canonicalisation (normalising, quantising, ordering) lives in
:mod:`meshforge.data.canonical`.

Supported inputs
----------------
* ``.obj .off .ply .stl .glb .gltf`` through trimesh; scenes are flattened with their node
  transforms applied and polygons are triangulated.
* MeshGPT-style processed data (``.pkl``/``.pickle``/``.npz``) holding many meshes:
  a list of ``{"vertices", "faces"[, "name"]}`` dicts; a dict of parallel lists
  ``{"vertices": [...], "faces": [...][, "name" or "names": [...]]}`` (MeshGPT's own layout, where
  faces may be n-gons); a dict holding one mesh as ``[V,3]``/``[F,k]`` arrays; or an ``.npz`` with
  ``vertices_0, faces_0, vertices_1, ...`` or object arrays ``vertices``/``faces``.
  Pickles are read with an unpickler that only admits builtin containers and numpy arrays, so a
  downloaded dataset cannot run code on load.
"""

from __future__ import annotations

import io
import logging
import pickle
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from meshforge.errors import InputError

MESH_SUFFIXES = (".obj", ".off", ".ply", ".stl", ".glb", ".gltf")
COLLECTION_SUFFIXES = (".pkl", ".pickle", ".npz")
SUPPORTED_SUFFIXES = MESH_SUFFIXES + COLLECTION_SUFFIXES

# Guards against files that would exhaust memory long before they could be useful as training data
# (the token models see at most a few thousand faces).
MAX_RAW_FACES = 2_000_000


@dataclass
class RawMesh:
    """A triangle mesh as read from disk: ``vertices`` float64 [V,3], ``faces`` int64 [F,3].

    ``name`` is the file's stem, or ``stem/member`` for a mesh inside a collection file.
    """

    name: str
    vertices: np.ndarray
    faces: np.ndarray


def visible_files(root: Path) -> list[Path]:
    """``root`` itself if a file, else every file under it not inside a hidden path, sorted.

    Hidden paths hold temp files of atomic writes, ``.git`` and editor droppings, never data.
    """
    root = Path(root)
    if root.is_file():
        return [root]
    return sorted(
        p
        for p in root.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts)
    )


def iter_mesh_files(root: Path) -> list[Path]:
    """Every supported file under ``root`` (recursively; hidden files and folders excluded), sorted."""
    return [p for p in visible_files(root) if p.suffix.lower() in SUPPORTED_SUFFIXES]


def load_meshes(path: Path) -> list[RawMesh]:
    """All meshes in ``path`` (one for a mesh file, many for a collection), validated.

    A collection whose members are individually broken raises for the first broken one; use
    :func:`load_collection` with ``strict=False`` to skip members instead.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in MESH_SUFFIXES:
        return [load_mesh_file(path)]
    if suffix in COLLECTION_SUFFIXES:
        return load_collection(path, strict=True)[0]
    raise InputError(path, f"unsupported file type {suffix or '(none)'!r}")


@contextmanager
def _quiet_trimesh() -> Iterator[None]:
    """trimesh logs a full traceback for a texture it cannot open (``unable to load image``) and
    warns about other materials; geometry is all meshforge reads, so those are noise to the user."""
    logger = logging.getLogger("trimesh")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def load_mesh_file(path: Path) -> RawMesh:
    import trimesh  # heavy import (~0.3 s); only loaders need it

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    if path.stat().st_size == 0:
        raise InputError(path, "empty file")
    try:
        # process=False: trimesh's own merging/cleaning would be redone (and differ) in
        # canonicalisation; force="mesh" flattens scenes with their transforms applied.
        with _quiet_trimesh():
            loaded = trimesh.load(path, force="mesh", process=False)
    except Exception as exc:  # noqa: BLE001  (trimesh raises anything from IndexError to KeyError)
        raise InputError(path, f"unreadable ({type(exc).__name__}: {_first_line(exc)})") from None
    if not isinstance(loaded, trimesh.Trimesh):
        raise InputError(path, f"not a surface mesh (loaded a {type(loaded).__name__})")
    return validate_mesh(path, path.stem, loaded.vertices, loaded.faces)


def validate_mesh(where: Path | str, name: str, vertices: Any, faces: Any) -> RawMesh:
    """Check and convert one mesh; ``faces`` may be [F,k] polygons or a ragged list of n-gons.

    ``where`` names the mesh in errors (a file, or ``file#member`` inside a collection).
    """
    try:
        v = np.asarray(vertices, dtype=np.float64)
    except (TypeError, ValueError):
        raise InputError(where, "vertices are not numeric") from None
    if v.size == 0:
        raise InputError(where, "empty mesh (no vertices)")
    if v.ndim != 2 or v.shape[1] != 3:
        raise InputError(where, f"vertices have shape {v.shape}, expected [V, 3]")
    if not np.isfinite(v).all():
        raise InputError(where, "vertices contain NaN or infinite coordinates")
    f = triangulate(where, faces)
    if len(f) == 0:
        raise InputError(where, "no faces (not a surface mesh)")
    if len(f) > MAX_RAW_FACES:
        raise InputError(where, f"{len(f)} faces, more than the loader limit of {MAX_RAW_FACES}")
    if f.min() < 0 or f.max() >= len(v):
        raise InputError(where, f"face indices out of range for {len(v)} vertices")
    tri = v[f]
    area2 = np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    extent = float(np.ptp(v[f.ravel()], axis=0).max())
    # Relative test: a mesh is flat-out degenerate when every face is tiny against its own size.
    if extent == 0 or area2.max() <= 1e-12 * extent * extent:
        raise InputError(where, "zero surface area (all faces degenerate)")
    return RawMesh(name=name, vertices=v, faces=f)


def triangulate(where: Path | str, faces: Any) -> np.ndarray:
    """Polygons -> triangles by fans around each polygon's first vertex (int64 [F,3])."""
    if isinstance(faces, np.ndarray) and faces.dtype != object:
        polys = [faces] if faces.ndim == 2 else None
    else:
        try:
            groups: dict[int, list[Any]] = {}
            for face in faces:
                groups.setdefault(len(face), []).append(face)
        except TypeError:
            raise InputError(where, "faces are not a list of index lists") from None
        polys = [np.asarray(g) for _, g in sorted(groups.items())]
    if polys is None:
        raise InputError(where, f"faces have shape {np.shape(faces)}, expected [F, k]")
    triangles = []
    for p in polys:
        if p.size == 0:
            continue
        integral = np.issubdtype(p.dtype, np.integer) or (
            np.issubdtype(p.dtype, np.number) and bool(np.all(np.mod(p, 1) == 0))
        )
        if not integral:
            raise InputError(where, "face indices are not integers")
        p = p.astype(np.int64)
        k = p.shape[1]
        if k < 3:
            raise InputError(where, f"faces with {k} vertices (need at least 3)")
        for j in range(1, k - 1):
            triangles.append(np.stack([p[:, 0], p[:, j], p[:, j + 1]], axis=1))
    return np.concatenate(triangles) if triangles else np.zeros((0, 3), np.int64)


# --- MeshGPT-style collections -------------------------------------------------------------------


class _SafeUnpickler(pickle.Unpickler):
    """Admits builtin containers/scalars and numpy arrays; anything else is refused, not executed."""

    _ALLOWED = {
        ("builtins", n)
        for n in (
            "list",
            "dict",
            "tuple",
            "set",
            "frozenset",
            "str",
            "int",
            "float",
            "bool",
            "bytes",
            "bytearray",
            "complex",
            "slice",
        )
    } | {
        ("collections", "OrderedDict"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._ALLOWED or (module == "numpy" and name.endswith("DType")):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} (only lists, dicts and numpy arrays)")


def _safe_unpickle(fh: Any) -> Any:
    return _SafeUnpickler(fh).load()


def _read_npz(path: Path) -> dict[str, Any]:
    """An .npz as a dict; object arrays go through the safe unpickler instead of ``allow_pickle``."""
    out = {}
    with zipfile.ZipFile(path) as zf:
        for member in zf.namelist():
            if not member.endswith(".npy"):
                continue
            with zf.open(member) as raw:
                fh = io.BytesIO(raw.read())
            version = np.lib.format.read_magic(fh)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            _, _, dtype = read_header(fh)
            if dtype.hasobject:
                value = _safe_unpickle(fh)
            else:
                fh.seek(0)
                value = np.lib.format.read_array(fh, allow_pickle=False)
            out[member[: -len(".npy")]] = value
    return out


def _collection_members(path: Path, data: Any) -> list[tuple[str, Any, Any]]:
    """(name, vertices, faces) for every mesh in one of the supported collection layouts."""
    if isinstance(data, (list, tuple)):
        if not all(isinstance(d, dict) and "vertices" in d and "faces" in d for d in data):
            raise InputError(path, "a list that is not of {'vertices', 'faces'} dicts")
        return [(str(d.get("name", f"{i:06d}")), d["vertices"], d["faces"]) for i, d in enumerate(data)]
    if not isinstance(data, dict):
        raise InputError(path, f"holds a {type(data).__name__}, not meshes")
    if "vertices" in data and "faces" in data:
        verts, faces = data["vertices"], data["faces"]
        single = isinstance(verts, np.ndarray) and verts.dtype != object and verts.ndim == 2
        if single:
            return [(path.stem, verts, faces)]
        names = data.get("name", data.get("names"))
        if len(verts) != len(faces) or (names is not None and len(names) != len(verts)):
            raise InputError(path, "vertices, faces and names lists differ in length")
        names = [str(n) for n in names] if names is not None else [f"{i:06d}" for i in range(len(verts))]
        return list(zip(names, verts, faces))
    numbered = sorted(
        (int(k.split("_", 1)[1]), k)
        for k in data
        if k.startswith("vertices_") and k.split("_", 1)[1].isdigit()
    )
    if numbered:
        names = data.get("names")
        members = []
        for i, key in numbered:
            if f"faces_{i}" not in data:
                raise InputError(path, f"{key} has no matching faces_{i}")
            name = str(names[i]) if names is not None and i < len(names) else f"{i:06d}"
            members.append((name, data[key], data[f"faces_{i}"]))
        return members
    raise InputError(path, f"no 'vertices'/'faces' (keys: {', '.join(sorted(map(str, data))[:8])})")


def load_collection(path: Path, strict: bool = False) -> tuple[list[RawMesh], list[tuple[str, str]]]:
    """Meshes of a MeshGPT-style file and, when not ``strict``, (member, problem) for broken members."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "no such file")
    if path.stat().st_size == 0:
        raise InputError(path, "empty file")
    try:
        if path.suffix.lower() == ".npz":
            data = _read_npz(path)
        else:
            with open(path, "rb") as fh:
                data = _safe_unpickle(fh)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001  (corrupt pickles/zips raise arbitrary exceptions)
        raise InputError(path, f"unreadable ({type(exc).__name__}: {_first_line(exc)})") from None
    members = _collection_members(path, data)
    if not members:
        raise InputError(path, "empty collection (no meshes)")
    meshes, problems = [], []
    seen: set[str] = set()
    for name, verts, faces in members:
        if name in seen:
            name = f"{name}_{len(seen):06d}"  # names key the dataset; keep them unique
        seen.add(name)
        single = len(members) == 1 and name == path.stem
        where, full_name = (path, name) if single else (f"{path}#{name}", f"{path.stem}/{name}")
        try:
            meshes.append(validate_mesh(where, full_name, verts, faces))
        except InputError as exc:
            if strict:
                raise
            problems.append((name, exc.problem))
    return meshes, problems


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no details"

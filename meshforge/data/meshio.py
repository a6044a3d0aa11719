"""Reading meshes from user folders: single-mesh files and collections of many meshes.

Every loader returns plain triangle soups (:class:`RawMesh`) and turns every way a file can be
bad into an :class:`~meshforge.errors.InputError` naming the problem, so batch jobs can record it
and move on. Canonicalisation (normalising, quantising, ordering) lives in
:mod:`meshforge.data.canonical`. :func:`scan_mesh_files` is the one way stages find their inputs.

Supported inputs (any of them may also be gzipped: ``chair.obj.gz``, ``processed_data.pkl.gz``)
-------------------------------------------------------------------------------------------
* ``.obj .off .ply .stl .glb .gltf`` through trimesh; scenes are flattened with their node
  transforms applied and polygons are triangulated.
* Collections (``.pkl``/``.pickle``/``.npz``) holding many meshes, in the layouts of the datasets
  mesh-generation work trains on:

  - MeshGPT's processed ShapeNet (``processed_data.pkl``, the data iFlame trains on): a dict of
    ``name_train``, ``vertices_train``, ``faces_train`` and the same for ``val``, parallel lists
    with names ``<synset>_<id>`` and faces as lists of n-gons. Each mesh keeps its split and
    its ShapeNet synset as its category.
  - MeshAnything V2's ``train.npz``: an object array ``npz_list`` of ``{"vertices", "faces"}`` dicts.
  - a list of ``{"vertices", "faces"[, "name"]}`` dicts; a dict of parallel lists
    ``{"vertices": [...], "faces": [...][, "name" or "names": [...]]}`` (faces may be n-gons); a
    dict holding one mesh as ``[V,3]``/``[F,k]`` arrays; an ``.npz`` with
    ``vertices_0, faces_0, vertices_1, ...`` or object arrays ``vertices``/``faces``.

  Pickles are read with an unpickler that only admits builtin containers and numpy arrays, so a
  downloaded dataset cannot run code on load.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import logging
import os
import pickle
import re
import stat
import struct
import warnings
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal, NamedTuple

import numpy as np

from meshforge.data.batch import Skip
from meshforge.errors import InputError

MESH_SUFFIXES = (".obj", ".off", ".ply", ".stl", ".glb", ".gltf")
COLLECTION_SUFFIXES = (".pkl", ".pickle", ".npz")
SUPPORTED_SUFFIXES = MESH_SUFFIXES + COLLECTION_SUFFIXES
GZIP_SUFFIX = ".gz"
# Files that accompany meshes (materials, textures, glTF buffers) or describe a folder (labels.json,
# synth's config); a scan passes over them without recording them as skipped inputs.
COMPANION_SUFFIXES = (".mtl", ".png", ".jpg", ".jpeg", ".tga", ".bmp", ".tif", ".tiff", ".bin", ".yaml", ".json")
SPLITS = ("train", "val")
# A gzipped input is inflated in memory; past this it is not a mesh worth training on (or a zip bomb).
MAX_GUNZIPPED_BYTES = 1 << 30

# Guards against files that would exhaust memory long before they could be useful as training data
# (the token models see at most a few thousand faces).
MAX_RAW_FACES = 2_000_000


@dataclass
class RawMesh:
    """A triangle mesh as read from disk: ``vertices`` float64 [V,3], ``faces`` int64 [F,3].

    ``name`` is the file's stem, or ``stem/member`` for a mesh inside a collection file. ``split``
    and ``category`` are what the source itself says (MeshGPT's train/val lists and synset
    prefixes); ``None`` where it says nothing.
    """

    name: str
    vertices: np.ndarray
    faces: np.ndarray
    split: Literal["train", "val"] | None = None
    category: str | None = None


# --- Finding inputs ------------------------------------------------------------------------------


def format_suffix(path: Path) -> str:
    """The lower-case suffix naming a file's format, looking under ``.gz`` (``chair.obj.gz``: ``.obj``)."""
    name = Path(path).name.lower()
    return Path(name.removesuffix(GZIP_SUFFIX)).suffix if name.endswith(GZIP_SUFFIX) else Path(name).suffix


def is_gzipped(path: Path) -> bool:
    return Path(path).name.lower().endswith(GZIP_SUFFIX)


def mesh_stem(path: Path) -> str:
    """A file's name without its format suffix (and ``.gz``): what names its meshes."""
    name = Path(path).name
    return Path(name[: -len(GZIP_SUFFIX)] if is_gzipped(path) else name).stem


def is_collection(path: Path) -> bool:
    return format_suffix(path) in COLLECTION_SUFFIXES


@dataclass
class MeshScan:
    """What a scan of an input folder found: mesh files to read, and paths it cannot use, with why."""

    files: list[Path] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)


def _walk(root: Path) -> Iterator[tuple[Path, str | None]]:
    """(path, problem) for everything under ``root`` not inside a hidden path, in sorted order;
    ``problem`` is None for a regular file. Folder links are followed, each real folder once, so a
    symlink loop ends the walk of that branch instead of recursing forever."""
    seen: set[tuple[int, int]] = set()

    def walk(folder: Path) -> Iterator[tuple[Path, str | None]]:
        info = folder.stat()
        if (info.st_dev, info.st_ino) in seen:
            yield folder, f"symlink to a folder already scanned (a loop, or a second link to {folder.resolve()})"
            return
        seen.add((info.st_dev, info.st_ino))
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            yield folder, f"unreadable folder ({type(exc).__name__}: {exc.strerror or exc})"
            return
        for entry in entries:
            # Hidden paths hold temp files of atomic writes, .git and editor droppings, never data.
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                target = os.stat(path)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    yield path, "symlink loop"
                elif entry.is_symlink():
                    yield path, f"broken symlink (its target {os.readlink(path)} does not exist)"
                else:
                    yield path, f"unreadable ({type(exc).__name__}: {exc.strerror or exc})"
                continue
            if stat.S_ISDIR(target.st_mode):
                if format_suffix(path) in SUPPORTED_SUFFIXES:
                    yield path, "a folder named like a mesh file (its contents are scanned)"
                yield from walk(path)
            elif stat.S_ISREG(target.st_mode):
                yield path, None
            else:
                yield path, "not a regular file (a device, socket or pipe)"

    yield from walk(Path(root))


def scan_mesh_files(root: Path) -> MeshScan:
    """Every supported file under ``root`` (or ``root`` itself, a file), sorted, and every other
    path there that is not a companion file (materials, textures, labels) with the reason it is not
    read: unsupported types, broken links and symlink loops, folders named like mesh files."""
    root = Path(root)
    scan = MeshScan()
    for path, problem in _walk(root) if root.is_dir() else [(root, None)]:
        suffix = format_suffix(path)
        if problem is not None:
            scan.skipped.append(Skip(str(path), problem))
        elif suffix in SUPPORTED_SUFFIXES:
            scan.files.append(path)
        elif suffix not in COMPANION_SUFFIXES or is_gzipped(path):
            kind = "".join(Path(path.name.lower()).suffixes[-2 if is_gzipped(path) else -1 :])
            scan.skipped.append(Skip(str(path), f"not a mesh file (unsupported type {kind or 'without suffix'})"))
    return scan


def iter_mesh_files(root: Path) -> list[Path]:
    """The mesh files of :func:`scan_mesh_files` (for callers that report nothing about the rest)."""
    return scan_mesh_files(root).files


def visible_files(root: Path) -> list[Path]:
    """``root`` itself if a file, else every regular file under it not inside a hidden path, sorted."""
    root = Path(root)
    return [root] if not root.is_dir() else [p for p, problem in _walk(root) if problem is None]


# --- Reading -------------------------------------------------------------------------------------


def load_meshes(path: Path) -> list[RawMesh]:
    """All meshes in ``path`` (one for a mesh file, many for a collection), validated.

    A collection whose members are individually broken raises for the first broken one; use
    :func:`load_collection` with ``strict=False`` to skip members instead.
    """
    path = Path(path)
    suffix = format_suffix(path)
    if suffix in MESH_SUFFIXES:
        return [load_mesh_file(path)]
    if suffix in COLLECTION_SUFFIXES:
        return load_collection(path, strict=True)[0]
    raise InputError(path, f"unsupported file type {suffix or '(none)'!r}")


@contextlib.contextmanager
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


def _check_file(path: Path) -> None:
    if not path.is_file():
        raise InputError(path, "no such file")
    if path.stat().st_size == 0:
        raise InputError(path, "empty file")


def _gunzip(path: Path) -> bytes:
    try:
        with gzip.open(path, "rb") as fh:
            data = fh.read(MAX_GUNZIPPED_BYTES + 1)
    except (OSError, EOFError, zlib.error) as exc:
        raise InputError(path, f"gzip data is corrupt/truncated ({type(exc).__name__}: {_first_line(exc)})") from None
    if len(data) > MAX_GUNZIPPED_BYTES:
        raise InputError(path, f"gzip data inflates to more than {MAX_GUNZIPPED_BYTES >> 20} MiB")
    if not data:
        raise InputError(path, "empty file (inside the gzip)")
    return data


def _open_source(path: Path) -> Path | IO[bytes]:
    """The path itself, or the inflated bytes of a gzipped file."""
    return io.BytesIO(_gunzip(path)) if is_gzipped(path) else path


def _binary(source: Path | IO[bytes]) -> contextlib.AbstractContextManager[IO[bytes]]:
    return open(source, "rb") if isinstance(source, Path) else contextlib.nullcontext(source)


def _stl_truncation(fh: IO[bytes]) -> str | None:
    """Why an STL is cut short, or None (trimesh reads a truncated STL as an empty mesh)."""
    size = fh.seek(0, io.SEEK_END)
    fh.seek(0)
    head = fh.read(84)
    count = struct.unpack("<I", head[80:84])[0] if size >= 84 else None
    if count is not None and 84 + 50 * count == size:
        return None  # binary, complete
    # ASCII files start with "solid"; so do the headers of some binary files, whose triangle count
    # then holds a NUL byte (fewer than 2**24 triangles).
    if head.lstrip()[:5].lower() == b"solid" and b"\0" not in head:
        fh.seek(max(0, size - 512))
        return None if b"endsolid" in fh.read().lower() else "truncated STL: ASCII file without its closing 'endsolid'"
    if count is None:
        return f"truncated STL: {size} bytes, shorter than the 84-byte binary header"
    if size < 84 + 50 * count:
        return f"truncated STL: the header announces {count} triangles ({84 + 50 * count} bytes), the file has {size}"
    return None


def _load_scene(source: Path | IO[bytes], file_type: str) -> Any:
    import trimesh  # heavy import (~0.3 s); only loaders need it

    # process=False: trimesh's own merging/cleaning would be redone (and differ) in canonicalisation.
    # force="scene" (not load_scene, which trimesh 4 before 4.6 lacks) keeps every geometry apart, so
    # point clouds and paths can be told from meshes before flattening.
    with _quiet_trimesh():
        return trimesh.load(source, file_type=file_type, force="scene", process=False)


def load_mesh_file(path: Path) -> RawMesh:
    import trimesh

    path = Path(path)
    _check_file(path)
    suffix = format_suffix(path)
    source = _open_source(path)
    if suffix == ".stl":
        with _binary(source) as fh:
            problem = _stl_truncation(fh)
        if problem:
            raise InputError(path, problem)
        if not isinstance(source, Path):
            source.seek(0)
    try:
        scene = _load_scene(source, suffix.lstrip("."))
    except Exception as exc:  # noqa: BLE001  (trimesh raises anything from IndexError to KeyError)
        raise InputError(path, f"unreadable ({type(exc).__name__}: {_first_line(exc)})") from None
    geometry = list(scene.geometry.values())
    if not any(isinstance(g, trimesh.Trimesh) and len(g.faces) for g in geometry):
        # trimesh flattens all of these to an empty mesh; say what the file holds instead.
        if any(isinstance(g, trimesh.PointCloud) or (isinstance(g, trimesh.Trimesh) and len(g.vertices)) for g in geometry):
            raise InputError(path, "point cloud (no faces)")
        kinds = sorted({type(g).__name__ for g in geometry if not isinstance(g, trimesh.Trimesh)})
        if kinds:
            raise InputError(path, f"not a surface mesh (holds {', '.join(kinds)})")
    # to_mesh flattens the scene with its node transforms applied.
    mesh = scene.to_mesh()
    return validate_mesh(path, mesh_stem(path), mesh.vertices, mesh.faces)


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


# --- Collections ---------------------------------------------------------------------------------


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


def _read_npz(source: Path | IO[bytes]) -> dict[str, Any]:
    """An .npz as a dict; object arrays go through the safe unpickler instead of ``allow_pickle``."""
    out = {}
    with zipfile.ZipFile(source) as zf:
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


class Member(NamedTuple):
    name: str
    vertices: Any
    faces: Any
    split: Literal["train", "val"] | None = None
    category: str | None = None


# ShapeNet synset ids are 8 digits; MeshGPT names each mesh <synset>_<model id>.
_SYNSET_NAME = re.compile(r"(\d{8})_")


def _dict_members(path: Path, items: Any) -> list[Member]:
    items = list(items)
    if not all(isinstance(d, dict) and "vertices" in d and "faces" in d for d in items):
        raise InputError(path, "a list that is not of {'vertices', 'faces'} dicts")
    return [Member(str(d.get("name", f"{i:06d}")), d["vertices"], d["faces"]) for i, d in enumerate(items)]


def _meshgpt_members(path: Path, data: dict[str, Any]) -> list[Member]:
    """MeshGPT's processed ShapeNet: per split, parallel ``name_``/``vertices_``/``faces_`` lists."""
    members = []
    for split in SPLITS:
        verts, faces = data.get(f"vertices_{split}", []), data.get(f"faces_{split}", [])
        names = data.get(f"name_{split}", [f"{split}_{i:06d}" for i in range(len(verts))])
        if not len(verts) == len(faces) == len(names):
            raise InputError(
                path, f"name_{split}, vertices_{split} and faces_{split} differ in length "
                f"({len(names)}, {len(verts)}, {len(faces)})"
            )
        for name, v, f in zip(names, verts, faces):
            synset = _SYNSET_NAME.match(str(name))
            members.append(Member(str(name), v, f, split, synset.group(1) if synset else None))
    return members


def _collection_members(path: Path, data: Any) -> list[Member]:
    """Every mesh in one of the supported collection layouts (see the module docstring)."""
    if isinstance(data, (list, tuple)):
        return _dict_members(path, data)
    if not isinstance(data, dict):
        raise InputError(path, f"holds a {type(data).__name__}, not meshes")
    if "npz_list" in data:  # MeshAnything V2
        return _dict_members(path, data["npz_list"])
    if any(f"vertices_{split}" in data for split in SPLITS):
        return _meshgpt_members(path, data)
    if "vertices" in data and "faces" in data:
        verts, faces = data["vertices"], data["faces"]
        single = isinstance(verts, np.ndarray) and verts.dtype != object and verts.ndim == 2
        if single:
            return [Member(mesh_stem(path), verts, faces)]
        names = data.get("name", data.get("names"))
        if len(verts) != len(faces) or (names is not None and len(names) != len(verts)):
            raise InputError(path, "vertices, faces and names lists differ in length")
        names = [str(n) for n in names] if names is not None else [f"{i:06d}" for i in range(len(verts))]
        return [Member(n, v, f) for n, v, f in zip(names, verts, faces)]
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
            members.append(Member(name, data[key], data[f"faces_{i}"]))
        return members
    raise InputError(path, f"no 'vertices'/'faces' (keys: {', '.join(sorted(map(str, data))[:8])})")


def _read_collection(path: Path) -> Any:
    source = _open_source(path)
    try:
        if format_suffix(path) == ".npz":
            return _read_npz(source)
        with _binary(source) as fh:
            return _safe_unpickle(fh)
    except Exception as exc:  # noqa: BLE001  (corrupt pickles/zips raise arbitrary exceptions)
        raise InputError(path, f"unreadable ({type(exc).__name__}: {_first_line(exc)})") from None


def load_collection(path: Path, strict: bool = False) -> tuple[list[RawMesh], list[tuple[str, str]]]:
    """Meshes of a collection file and, when not ``strict``, (member, problem) for broken members."""
    path = Path(path)
    _check_file(path)
    members = _collection_members(path, _read_collection(path))
    if not members:
        raise InputError(path, "empty collection (no meshes)")
    meshes, problems = [], []
    seen: set[str] = set()
    stem = mesh_stem(path)
    for member in members:
        name = member.name
        if name in seen:
            name = f"{name}_{len(seen):06d}"  # names key the dataset; keep them unique
        seen.add(name)
        single = len(members) == 1 and name == stem
        where, full_name = (path, name) if single else (f"{path}#{name}", f"{stem}/{name}")
        try:
            mesh = validate_mesh(where, full_name, member.vertices, member.faces)
        except InputError as exc:
            if strict:
                raise
            problems.append((name, exc.problem))
            continue
        mesh.split, mesh.category = member.split, member.category
        meshes.append(mesh)
    return meshes, problems


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else "no details"

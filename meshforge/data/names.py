"""Dataset names of input meshes: readable, safe as file paths, unique, and the same on every run.

A mesh's name is its input path relative to the input folder, without suffix (``chair/chair_001``),
or ``FILE/MEMBER`` for a member of a collection file. Names become file paths in datasets that
store one file per mesh (``sdf-voxelize``), so each path component is reduced to ``[A-Za-z0-9._-]``
without leading dots or dashes and cut to :data:`MAX_PART` characters. Different inputs can
reduce alike (``a b.obj`` and ``a_b.obj``; two CJK names both reduce to ``_``; ``chair.obj`` and
``chair.ply``), so a name that had to be changed, or that several inputs share, gets a suffix
``-`` + 8 hex digits of the SHA-256 of its full input path. The suffix depends only on that path,
never on file contents or order, so re-runs give every input the same name (resuming relies on
it), and an input whose name is already clean and its own keeps its plain name.
"""

from __future__ import annotations

import hashlib
import re
from collections import Counter
from pathlib import Path

from meshforge.data.meshio import COLLECTION_SUFFIXES
from meshforge.errors import MeshforgeError

# Far below the 255 bytes most file systems allow per component, leaving room for the hash
# suffix and the ``.npz`` of the stored file.
MAX_PART = 100
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _tag(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:8]


def _clean(name: str) -> str:
    """``name`` (``/``-separated) with every component reduced to safe characters."""
    parts = []
    for part in name.split("/"):
        part = _UNSAFE.sub("_", part).lstrip(".-").rstrip(".")[:MAX_PART] or "_"
        parts.append(part)
    return "/".join(parts)


def _unique(readable: str, original: str, identity: str, shared: bool) -> str:
    return readable if readable == original and not shared else f"{readable}-{_tag(identity)}"


def file_names(files: list[Path], base: Path) -> dict[Path, str]:
    """The dataset name of every input file under ``base`` (see the module docstring).

    A collection file's name is also the folder of its members, so it counts as shared when
    another input's name lies inside that folder.
    """
    rel = {p: Path(p).relative_to(base) for p in files}
    plain = {p: r.with_suffix("").as_posix() for p, r in rel.items()}
    cleaned = {p: _clean(name) for p, name in plain.items()}
    # Only files that differ by suffix alone share a plain name; a changed name is suffixed anyway.
    counts = Counter(plain.values())
    folders = {name.rsplit("/", 1)[0] for name in cleaned.values() if "/" in name}
    out = {}
    for p in files:
        name = cleaned[p]
        shared = counts[plain[p]] > 1 or (p.suffix.lower() in COLLECTION_SUFFIXES and name in folders)
        out[p] = _unique(name, plain[p], rel[p].as_posix(), shared)
    # Only a file literally named like another's suffixed name (or a hash collision) gets here.
    first: dict[str, Path] = {}
    for p, name in out.items():
        if first.setdefault(name, p) != p:
            raise MeshforgeError(f"{p}: has the dataset name {name!r} of {first[name]}; rename one of them")
    return out


def member_name(file_name: str, member: str) -> str:
    """The name of collection member ``member`` of the file named ``file_name``.

    Members are unique within their file (the loader renames repeats), so only a member whose name
    had to be changed gets a suffix, hashed from the member's original name.
    """
    readable = _clean(member.replace("/", "_"))
    return f"{file_name}/{_unique(readable, member, member, shared=False)}"


def mesh_name(file_name: str, loaded_name: str) -> str:
    """The name of a mesh the loader called ``loaded_name`` (``stem`` for a file's one mesh,
    ``stem/member`` inside a collection) in the file named ``file_name``."""
    if "/" not in loaded_name:
        return file_name
    return member_name(file_name, loaded_name.split("/", 1)[1])

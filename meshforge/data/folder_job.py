"""One job over a folder of meshes: the runner shared by ``tokenize`` and ``sdf-voxelize``.

:func:`discover_meshes` finds the input files (:func:`~meshforge.data.meshio.scan_mesh_files`),
their labels and their dataset names (:mod:`meshforge.data.names`: unique and the same on every
run, which resuming relies on). :meth:`MeshFolder.run` maps a per-file function over them on the
worker processes of :func:`~meshforge.data.batch.run_batch`, with a progress bar; the function
calls :func:`file_meshes`, which hands each mesh of the file (the file's one mesh, or every member
of a collection) to the job's per-mesh function. Every unusable input (a file, a collection
member, an unsupported path found by the scan) becomes a :class:`~meshforge.data.batch.Skip` with
its reason; only an :class:`~meshforge.errors.InputError` is a skip: any other failure stops the
job with one line (:class:`~meshforge.data.batch.BatchFailed`) saying what became of the output.
The job then labels its meshes (:mod:`meshforge.data.labels`) and prints its one summary line.

Resuming is the job's: a per-mesh function may return what an earlier run already wrote without
loading the mesh (:attr:`MeshInput.load` is lazy for a file's one mesh).
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from meshforge.data.batch import BatchFailed, Skip, run_batch
from meshforge.data.labels import class_label, label_sources, mesh_category, read_labels_file, synset_classes
from meshforge.data.meshio import (
    SUPPORTED_SUFFIXES,
    RawMesh,
    is_collection,
    load_collection,
    load_mesh_file,
    scan_mesh_files,
)
from meshforge.data.names import file_names, mesh_name
from meshforge.errors import InputError, MeshforgeError
from meshforge.runtime import console


class LabelledMesh(Protocol):
    """What a job's per-mesh result carries for the runner: where it came from, its category."""

    source: str  # the input file, or FILE#MEMBER
    category: str | None


M = TypeVar("M", bound=LabelledMesh)


@dataclass
class MeshInput:
    """One mesh of an input file, as a job's per-mesh function gets it."""

    name: str  # its dataset name (unique, deterministic)
    source: str  # the input file, or FILE#MEMBER for a member of a collection
    load: Callable[[], RawMesh]
    split: str | None = None  # the split its source gave it (a collection's train/val lists)
    category: str | None = None  # the category its source gave it


@dataclass
class FileMeshes(Generic[M]):
    meshes: list[M]
    skipped: list[Skip]  # broken members of a collection file


def file_meshes(path: Path, name: str, process: Callable[[MeshInput], M]) -> FileMeshes[M]:
    """``process`` over every mesh of input file ``path`` (named ``name``); runs in a worker.

    A collection member that is broken, or for which ``process`` raises :class:`InputError`, is
    skipped; a collection without any usable member is itself an :class:`InputError`.
    """
    if not is_collection(path):
        return FileMeshes([process(MeshInput(name, str(path), partial(load_mesh_file, path)))], [])
    members, problems = load_collection(path, strict=False)
    meshes, skipped = [], [Skip(f"{path}#{member}", problem) for member, problem in problems]
    for raw in members:
        # A collection of one mesh named like the file is that file's mesh (the loader names it so).
        source = f"{path}#{raw.name.split('/', 1)[1]}" if "/" in raw.name else str(path)
        mesh = MeshInput(mesh_name(name, raw.name), source, partial(_loaded, raw), raw.split, raw.category)
        try:
            meshes.append(process(mesh))
        except InputError as exc:
            skipped.append(Skip(source, exc.problem))
    if not meshes:
        first = skipped[0].reason if skipped else "empty"
        total = len(members) + len(problems)
        raise InputError(path, f"no usable mesh among {total} in the collection (first: {first})")
    return FileMeshes(meshes, skipped)


def _loaded(raw: RawMesh) -> RawMesh:
    return raw


def _named(per_file: Callable[[Path, str], FileMeshes[M]], names: dict[Path, str], path: Path) -> FileMeshes[M]:
    return per_file(path, names[path])


def top_reasons(skipped: Iterable[Skip]) -> str:
    """The three most common skip reasons with their counts, for a one-line message."""
    return "; ".join(f"{n}x {reason}" for reason, n in Counter(s.reason for s in skipped).most_common(3))


@dataclass
class MeshFolder:
    """The inputs of a job: mesh files under ``root`` (``base``: the folder names are relative to)."""

    root: Path
    base: Path
    files: list[Path]
    names: dict[Path, str]  # the dataset name of every file
    labels: dict[str, str]  # labels.json of the input folder
    skipped: list[Skip]  # paths the scan found and cannot read
    started: float  # perf_counter at discovery: the job's wall time starts there

    def run(
        self,
        per_file: Callable[[Path, str], FileMeshes[M]],
        *,
        workers: int,
        description: str,
        on_failure: str,
    ) -> MeshRun[M]:
        """``per_file(path, name)`` over every file (picklable: a module-level function or a partial).

        A failure that is not about an input stops the job with one line ending in ``on_failure``
        (what became of the output). The meshes come back in input order, labelled.
        """
        import trimesh  # noqa: F401  (imported before the pool forks, so no worker pays for it again)

        try:
            batch = run_batch(self.files, partial(_named, per_file, self.names), workers=workers,
                              description=description)
        except BatchFailed as exc:
            raise MeshforgeError(f"{exc}; {on_failure}") from exc
        skipped = [*self.skipped, *batch.skipped]
        meshes: list[M] = []
        for _, result in batch.done:
            meshes += result.meshes
            skipped += result.skipped
        skipped.sort(key=lambda s: s.path)
        source_categories = any(m.category is not None for m in meshes)
        for m in meshes:
            m.category = mesh_category(Path(m.source.split("#", 1)[0]).relative_to(self.base), self.labels, m.category)
        return MeshRun(self, meshes, skipped, source_categories)


def discover_meshes(root: Path) -> MeshFolder:
    """The mesh files under ``root`` (a folder, or one file), their names and labels."""
    started = time.perf_counter()
    root = Path(root)
    if not root.exists():
        raise InputError(root, "no such file or folder")
    base = root if root.is_dir() else root.parent
    scan = scan_mesh_files(root)
    if not scan.files:
        raise MeshforgeError(f"{root}: no mesh files found ({', '.join(SUPPORTED_SUFFIXES)}, optionally .gz)")
    names = file_names(scan.files, base)
    return MeshFolder(root, base, scan.files, names, read_labels_file(base), list(scan.skipped), started)


@dataclass
class MeshRun(Generic[M]):
    """What a job's workers made: every mesh (labelled) and every skipped input, sorted by path."""

    folder: MeshFolder
    meshes: list[M]
    skipped: list[Skip]
    source_categories: bool  # whether the source itself gave categories (before labels.json)

    def skip(self, more: Iterable[Skip]) -> None:
        """Record inputs the job itself set aside (duplicates), keeping the list sorted by path."""
        self.skipped = sorted([*self.skipped, *more], key=lambda s: s.path)

    def require_meshes(self, meshes: list[M]) -> None:
        """Fail in one line when nothing usable is left."""
        if not meshes:
            raise MeshforgeError(
                f"{self.folder.root}: no usable mesh among {len(self.folder.files)} files "
                f"({top_reasons(self.skipped)})"
            )

    def label_manifest(self, meshes: list[M]) -> dict:
        """The manifest's ``classes``, ``label_source`` and ``synsets`` of the kept ``meshes``."""
        return {
            "classes": sorted({class_label(m.category) for m in meshes if m.category is not None}),
            "label_source": label_sources(self.folder.labels, self.source_categories),
            "synsets": synset_classes(m.category for m in meshes),
        }

    def seconds(self) -> float:
        return time.perf_counter() - self.folder.started

    def report(self, line: str) -> None:
        """Print the job's summary ``line``, with the skips and their commonest reasons."""
        if self.skipped:
            line += f"; skipped {len(self.skipped)} (see manifest.json): {top_reasons(self.skipped)}"
        console.print(line, markup=False, highlight=False)

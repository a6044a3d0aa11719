"""``meshforge tokenize``: a folder of meshes -> a token dataset (see :mod:`meshforge.data.shards`).

Files are loaded and canonicalised in parallel; every file or collection member that cannot be
used is recorded with its reason in the dataset's manifest, and the run fails only when nothing
usable is left. Identical canonical meshes are kept once (the later copies are recorded as
duplicates). A source with its own train/val split (MeshGPT's processed ShapeNet) keeps it unless
``resplit``; every other mesh's split follows its content hash, so adding files never moves an
existing mesh to the other split. Class labels follow :mod:`meshforge.data.labels`.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from meshforge.config import save_config, to_dict
from meshforge.data.batch import BatchFailed, Skip, run_batch
from meshforge.data.canonical import Augment, canonicalize, normalize_vertices
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
from meshforge.data.shards import FORMAT, MeshRecord, assign_splits, split_key, split_source, write_split
from meshforge.data.tokens import Vocab, encode_mesh
from meshforge.errors import InputError, MeshforgeError
from meshforge.io import atomic_path, atomic_write_json
from meshforge.runtime import console


@dataclass
class TokenizeConfig:
    input: Path = field(
        metadata={
            "help": "Folder (or file) of meshes: obj/off/ply/stl/glb/gltf (or .gz), MeshGPT/MeshAnything "
            "pkl/npz."
        },
    )
    out: Path = field(
        metadata={
            "help": "Dataset folder to write (default: ./meshforge-data/tokens/NAME, NAME the input folder's "
            "name)."
        },
    )
    bits: int = field(
        default=7,
        metadata={"help": "Quantisation bits per coordinate (vocabulary 2**bits + 3)."},
    )
    max_faces: int = field(
        default=800,
        metadata={"help": "Skip meshes with more faces after canonicalisation."},
    )
    val_fraction: float = field(
        default=0.05,
        metadata={
            "help": "Fraction of meshes (by content hash) in the val split, for sources without their own."
        },
    )
    workers: int = field(default=0, metadata={"help": "Worker processes (0 = all cores)."})  # 0 = every core
    dedupe: bool = field(default=True, metadata={"help": "Keep identical canonical meshes once."})
    resplit: bool = field(  # split sources with their own train/val split by content hash too
        default=False,
        metadata={
            "help": "Split by content hash even a source with its own train/val split (MeshGPT's pickle)."
        },
    )
    # Augmentation the training loader applies (stored in the manifest; tokens are un-augmented).
    augment_scale_min: float = field(
        default=0.75,
        metadata={"help": "Training augmentation: smallest per-axis scale."},
    )
    augment_scale_max: float = field(
        default=1.25,
        metadata={"help": "Training augmentation: largest per-axis scale."},
    )
    augment_shift: float = field(
        default=0.1,
        metadata={"help": "Training augmentation: largest per-axis shift (normalised units)."},
    )

    def __post_init__(self) -> None:
        Vocab(self.bits)  # validates the range
        if self.max_faces < 1:
            raise ValueError("max_faces must be at least 1")
        if not 0 <= self.val_fraction < 1:
            raise ValueError("val_fraction must be in [0, 1)")
        self.augmentation()  # validates the ranges

    def augmentation(self) -> Augment:
        return Augment(self.augment_scale_min, self.augment_scale_max, self.augment_shift)


@dataclass
class FileResult:
    records: list[MeshRecord]
    skipped: list[Skip]  # broken members of a collection file


def tokenize_mesh(raw: RawMesh, bits: int, max_faces: int, where: str) -> MeshRecord:
    """Canonicalise one mesh and keep exactly the geometry its tokens describe."""
    first = canonicalize(raw.vertices, raw.faces, bits, name=where)
    # Keep the faces that survived (dropping degenerate slivers and duplicates) and only their
    # vertices, normalised; the stored tokens are then recomputed from this float32 geometry so
    # that the loader re-canonicalising it gets exactly these tokens.
    faces = raw.faces[first.face_source]
    used, inverse = np.unique(faces.ravel(), return_inverse=True)
    vertices = normalize_vertices(raw.vertices[used]).astype(np.float32)
    faces = inverse.reshape(-1, 3).astype(np.int32)
    canon = canonicalize(vertices, faces, bits, name=where)
    if canon.num_faces > max_faces:
        raise InputError(
            where, f"{canon.num_faces} faces after canonicalisation, more than max_faces={max_faces}"
        )
    vocab = Vocab(bits)
    return MeshRecord(
        name=raw.name,
        source=where,
        vertices=vertices,
        faces=faces,
        tokens=encode_mesh(canon).astype(vocab.storage_dtype),
        split_key=split_key(vertices, faces),
        source_split=raw.split,
        category=raw.category,
    )


def tokenize_file(path: Path, bits: int, max_faces: int) -> FileResult:
    """All records of one input file (runs in a worker process)."""
    if not is_collection(path):
        return FileResult([tokenize_mesh(load_mesh_file(path), bits, max_faces, str(path))], [])
    meshes, problems = load_collection(path, strict=False)
    records, skipped = [], [Skip(f"{path}#{name}", problem) for name, problem in problems]
    for raw in meshes:
        where = f"{path}#{raw.name.split('/', 1)[-1]}"
        try:
            records.append(tokenize_mesh(raw, bits, max_faces, where))
        except InputError as exc:
            skipped.append(Skip(where, exc.problem))
    if not records:
        total = len(meshes) + len(problems)
        raise InputError(path, f"no usable mesh among {total} in the collection (first: {skipped[0].reason})")
    return FileResult(records, skipped)


def tokenize_folder(cfg: TokenizeConfig) -> dict:
    """Tokenise every mesh under ``cfg.input`` into the dataset folder ``cfg.out``; returns a summary."""
    started = time.perf_counter()
    root = Path(cfg.input)
    if not root.exists():
        raise InputError(root, "no such file or folder")
    base = root if root.is_dir() else root.parent
    scan = scan_mesh_files(root)
    files, skipped = scan.files, list(scan.skipped)
    if not files:
        raise MeshforgeError(f"{root}: no mesh files found ({', '.join(SUPPORTED_SUFFIXES)}, optionally .gz)")
    labels = read_labels_file(base)
    vocab = Vocab(cfg.bits)

    import trimesh  # noqa: F401  (imported before the pool forks, so no worker pays for it again)

    try:
        batch = run_batch(
            files,
            partial(tokenize_file, bits=cfg.bits, max_faces=cfg.max_faces),
            workers=cfg.workers,
            description="tokenize",
        )
    except BatchFailed as exc:
        raise MeshforgeError(f"{exc}; {cfg.out} is left unchanged") from exc
    skipped += batch.skipped
    names = file_names(files, base)
    records: list[MeshRecord] = []
    seen: dict[str, str] = {}
    duplicates = 0
    source_categories = False
    for path, result in batch.done:
        rel = path.relative_to(base)
        skipped += result.skipped
        for rec in result.records:
            rec.name = mesh_name(names[path], rec.name)
            source_categories |= rec.category is not None
            rec.category = mesh_category(rel, labels, rec.category)
            rec.label = class_label(rec.category)
            digest = hashlib.sha256(rec.tokens.tobytes()).hexdigest()
            if cfg.dedupe and digest in seen:
                skipped.append(Skip(rec.source, f"duplicate of {seen[digest]} (identical canonical mesh)"))
                duplicates += 1
                continue
            seen[digest] = rec.name
            records.append(rec)
    skipped.sort(key=lambda s: s.path)

    if not records:
        reasons = Counter(s.reason for s in skipped).most_common(3)
        detail = "; ".join(f"{n}x {reason}" for reason, n in reasons)
        raise MeshforgeError(f"{root}: no usable mesh among {len(files)} files ({detail})")

    fixed = [None if cfg.resplit else r.source_split for r in records]
    splits = assign_splits([r.split_key for r in records], cfg.val_fraction, fixed)
    classes = sorted({r.label for r in records if r.label is not None})
    with atomic_path(cfg.out) as tmp:
        tmp.mkdir(parents=True)
        counts = {
            name: write_split(tmp / name, [r for r, s in zip(records, splits) if s == name], vocab)
            for name in ("train", "val")
        }
        manifest = {
            "format": FORMAT,
            "bits": cfg.bits,
            "max_faces": cfg.max_faces,
            "vocab": {"size": vocab.size, "pad": vocab.pad, "start": vocab.start, "end": vocab.end},
            "augment": to_dict(cfg.augmentation()),
            "classes": classes,
            "label_source": label_sources(labels, source_categories),
            "synsets": synset_classes(r.category for r in records),
            "split_source": split_source(fixed),
            "counts": {
                "files": len(files),
                "meshes": len(records),
                "train": counts["train"]["meshes"],
                "val": counts["val"]["meshes"],
                "train_tokens": counts["train"]["tokens"],
                "val_tokens": counts["val"]["tokens"],
                "skipped": len(skipped),
                "duplicates": duplicates,
            },
            "skipped": [{"path": s.path, "reason": s.reason} for s in skipped],
            "config": to_dict(cfg),
        }
        atomic_write_json(tmp / "manifest.json", manifest)
        save_config(cfg, tmp / "config.yaml")

    seconds = time.perf_counter() - started
    summary = {
        **manifest["counts"],
        "classes": len(classes),
        "seconds": round(seconds, 2),
        "out": str(cfg.out),
    }
    line = (
        f"tokenized {len(records)} meshes (train {summary['train']}, val {summary['val']}) "
        f"from {len(files)} files in {seconds:.1f}s"
    )
    if skipped:
        top = "; ".join(f"{n}x {r}" for r, n in Counter(s.reason for s in skipped).most_common(3))
        line += f"; skipped {len(skipped)} (see manifest.json): {top}"
    console.print(line, markup=False, highlight=False)
    return summary

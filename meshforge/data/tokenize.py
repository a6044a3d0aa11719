"""``meshforge tokenize``: a folder of meshes -> a token dataset (see :mod:`meshforge.data.shards`).

Files are loaded and canonicalised in parallel; every file or collection member that cannot be
used is recorded with its reason in the dataset's manifest, and the run fails only when nothing
usable is left. Identical canonical meshes are kept once (the later copies are recorded as
duplicates), and the train/val split follows each mesh's content hash, so adding files never
moves an existing mesh to the other split.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from meshforge.config import save_config, to_dict
from meshforge.data.batch import BatchFailed, Skip, run_batch
from meshforge.data.canonical import Augment, canonicalize, normalize_vertices
from meshforge.data.meshio import (
    COLLECTION_SUFFIXES,
    SUPPORTED_SUFFIXES,
    RawMesh,
    load_collection,
    load_mesh_file,
    visible_files,
)
from meshforge.data.names import file_names, mesh_name
from meshforge.data.shards import FORMAT, MeshRecord, assign_splits, split_key, write_split
from meshforge.data.tokens import Vocab, encode_mesh
from meshforge.errors import InputError, MeshforgeError
from meshforge.io import atomic_path, atomic_write_json
from meshforge.runtime import console

LABELS_FILE = "labels.json"
# Files that accompany meshes (materials, textures, glTF buffers) or record how a folder was made;
# they are not counted as skipped inputs.
COMPANION_SUFFIXES = (".mtl", ".png", ".jpg", ".jpeg", ".tga", ".bmp", ".tif", ".tiff", ".bin", ".yaml")


@dataclass
class TokenizeConfig:
    input: Path
    out: Path
    bits: int = 7
    max_faces: int = 800
    val_fraction: float = 0.05
    workers: int = 0  # 0 = every core
    dedupe: bool = True
    # Augmentation the training loader applies (stored in the manifest; tokens are un-augmented).
    augment_scale_min: float = 0.75
    augment_scale_max: float = 1.25
    augment_shift: float = 0.1

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
    )


def tokenize_file(path: Path, bits: int, max_faces: int) -> FileResult:
    """All records of one input file (runs in a worker process)."""
    if path.suffix.lower() not in COLLECTION_SUFFIXES:
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


def _labels(root: Path) -> dict[str, str]:
    path = root / LABELS_FILE
    if not path.is_file():
        return {}
    try:
        labels = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise InputError(path, f"invalid JSON ({exc})") from None
    if not isinstance(labels, dict):
        raise InputError(path, "expected a mapping of relative file path -> class label")
    return {str(k): str(v) for k, v in labels.items()}


def _label_for(rel: Path, labels: dict[str, str]) -> str | None:
    """``labels.json`` when present; otherwise the top-level folder (ShapeNet's category folders)."""
    if labels:
        return labels.get(rel.as_posix())
    return rel.parts[0] if len(rel.parts) > 1 else None


def _scan(root: Path) -> tuple[list[Path], list[Skip]]:
    """Supported files to read, and unsupported non-companion files recorded as skipped."""
    files, ignored = [], []
    for path in visible_files(root):
        suffix = path.suffix.lower()
        if suffix in SUPPORTED_SUFFIXES:
            files.append(path)
        elif suffix not in COMPANION_SUFFIXES and path != root / LABELS_FILE:
            ignored.append(
                Skip(str(path), f"not a mesh file (unsupported type {suffix or 'without suffix'})")
            )
    return files, ignored


def tokenize_folder(cfg: TokenizeConfig) -> dict:
    """Tokenise every mesh under ``cfg.input`` into the dataset folder ``cfg.out``; returns a summary."""
    started = time.perf_counter()
    root = Path(cfg.input)
    if not root.exists():
        raise InputError(root, "no such file or folder")
    base = root if root.is_dir() else root.parent
    files, skipped = _scan(root)
    if not files:
        raise MeshforgeError(f"{root}: no mesh files found ({', '.join(SUPPORTED_SUFFIXES)})")
    labels = _labels(base)
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
    for path, result in batch.done:
        rel = path.relative_to(base)
        skipped += result.skipped
        for rec in result.records:
            rec.name = mesh_name(names[path], rec.name)
            rec.label = _label_for(rel, labels)
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

    splits = assign_splits([r.split_key for r in records], cfg.val_fraction)
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
            "label_source": "labels.json" if labels else "top-level folders",
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

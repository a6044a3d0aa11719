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
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from meshforge.config import save_config, to_dict
from meshforge.data.batch import Skip
from meshforge.data.canonical import Augment, canonicalize, normalize_vertices
from meshforge.data.folder_job import FileMeshes, MeshInput, discover_meshes, file_meshes
from meshforge.data.labels import class_label
from meshforge.data.meshio import RawMesh
from meshforge.data.shards import FORMAT, MeshRecord, assign_splits, split_key, split_source, write_split
from meshforge.data.tokens import Vocab, encode_mesh
from meshforge.errors import InputError
from meshforge.io import atomic_path, atomic_write_json


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
    workers: int = field(default=0, metadata={"help": "Worker processes (0 = all cores)."})
    dedupe: bool = field(default=True, metadata={"help": "Keep identical canonical meshes once."})
    resplit: bool = field(
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


def _tokenize_input(mesh: MeshInput, bits: int, max_faces: int) -> MeshRecord:
    record = tokenize_mesh(mesh.load(), bits, max_faces, mesh.source)
    record.name = mesh.name
    return record


def tokenize_file(path: Path, name: str, bits: int, max_faces: int) -> FileMeshes[MeshRecord]:
    """All records of one input file (runs in a worker process)."""
    return file_meshes(path, name, partial(_tokenize_input, bits=bits, max_faces=max_faces))


def tokenize_folder(cfg: TokenizeConfig) -> dict:
    """Tokenise every mesh under ``cfg.input`` into the dataset folder ``cfg.out``; returns a summary."""
    folder = discover_meshes(cfg.input)
    vocab = Vocab(cfg.bits)
    run = folder.run(
        partial(tokenize_file, bits=cfg.bits, max_faces=cfg.max_faces),
        workers=cfg.workers,
        description="tokenize",
        on_failure=f"{cfg.out} is left unchanged",
    )
    records: list[MeshRecord] = []
    duplicates: list[Skip] = []
    seen: dict[str, str] = {}
    for rec in run.meshes:
        rec.label = class_label(rec.category)
        digest = hashlib.sha256(rec.tokens.tobytes()).hexdigest()
        if cfg.dedupe and digest in seen:
            duplicates.append(Skip(rec.source, f"duplicate of {seen[digest]} (identical canonical mesh)"))
            continue
        seen[digest] = rec.name
        records.append(rec)
    run.skip(duplicates)
    run.require_meshes(records)

    fixed = [None if cfg.resplit else r.source_split for r in records]
    splits = assign_splits([r.split_key for r in records], cfg.val_fraction, fixed)
    labelled = run.label_manifest(records)
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
            **labelled,
            "split_source": split_source(fixed),
            "counts": {
                "files": len(folder.files),
                "meshes": len(records),
                "train": counts["train"]["meshes"],
                "val": counts["val"]["meshes"],
                "train_tokens": counts["train"]["tokens"],
                "val_tokens": counts["val"]["tokens"],
                "skipped": len(run.skipped),
                "duplicates": len(duplicates),
            },
            "skipped": [{"path": s.path, "reason": s.reason} for s in run.skipped],
            "config": to_dict(cfg),
        }
        atomic_write_json(tmp / "manifest.json", manifest)
        save_config(cfg, tmp / "config.yaml")

    seconds = run.seconds()
    summary = {
        **manifest["counts"],
        "classes": len(labelled["classes"]),
        "seconds": round(seconds, 2),
        "out": str(cfg.out),
    }
    run.report(
        f"tokenized {len(records)} meshes (train {summary['train']}, val {summary['val']}) "
        f"from {len(folder.files)} files in {seconds:.1f}s"
    )
    return summary

"""``meshforge sdf-voxelize``: a folder of meshes -> a sparse SDF dataset (:mod:`meshforge.data.sdf_dataset`).

The folder job of :mod:`meshforge.data.folder_job` with one voxelisation (:func:`meshforge.data.sdf.voxelize`)
per mesh, written as soon as it is done, so the job resumes: each file records the hash of the
input bytes it came from, and a re-run with the same geometry options keeps every mesh whose input
is unchanged and whose file is intact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from meshforge.config import from_dict, load_yaml, save_config, to_dict
from meshforge.data.canonical import normalize_vertices
from meshforge.data.folder_job import FileMeshes, MeshInput, discover_meshes, file_meshes
from meshforge.data.labels import class_label
from meshforge.data.meshio import RawMesh
from meshforge.data.sdf import SignBackend, voxelize
from meshforge.data.sdf_dataset import DAMAGED, FORMAT, SPLITS, mesh_path
from meshforge.data.shards import assign_splits, is_val, split_key, split_source
from meshforge.errors import InputError, MeshforgeError
from meshforge.io import atomic_path, atomic_write_json, hash_path, remove_stale_temporaries
from meshforge.runtime import has_module


@dataclass
class SdfConfig:
    input: Path = field(
        metadata={
            "help": "Folder (or file) of meshes: obj/off/ply/stl/glb/gltf (or .gz), MeshGPT/MeshAnything "
            "pkl/npz."
        },
    )
    out: Path = field(
        metadata={"help": "Dataset folder to write (an unfinished one with the same settings is resumed)."},
    )
    resolution: int = field(default=64, metadata={"help": "Grid resolution R (voxels per side)."})
    band: float = field(
        default=3.0,
        metadata={
            "help": "Narrow band tau in voxels: keep voxels with |sdf| < tau / R (> sqrt(3) for watertight "
            "re-meshing)."
        },
    )
    sharp_angle_deg: float = field(
        default=30.0,
        metadata={"help": "Dihedral angle (degrees) above which an edge is sharp."},
    )
    sharp_radius: float = field(
        default=1.5,
        metadata={"help": "Flag band voxels within this many voxels of a sharp edge."},
    )
    fill: float = field(
        default=0.9,
        metadata={
            "help": "Scale of the normalised mesh inside the grid (the margin keeps the band inside it)."
        },
    )
    max_faces: int = field(
        default=50_000,
        metadata={"help": "Skip meshes with more faces (the sign test costs voxels x faces)."},
    )
    val_fraction: float = field(
        default=0.05,
        metadata={"help": "Fraction of meshes (by content hash, as tokenize) in the val split."},
    )
    resplit: bool = field(
        default=False,
        metadata={
            "help": "Split by content hash even a source with its own train/val split (MeshGPT's pickle)."
        },
    )
    workers: int = field(
        default=0,
        metadata={"help": "CPU worker processes (0 = all cores); the CUDA path uses one process."},
    )
    sign_backend: SignBackend = field(
        default="auto",
        metadata={
            "help": "Winding numbers: torch (the reference), pcu (point-cloud-utils' fast winding numbers, "
            "CPU), auto (pcu on the CPU when installed)."
        },
    )

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


def finished_mesh(out: Path, name: str, source: str, digest: str) -> MeshResult | None:
    """The record of a mesh an earlier run already wrote from the same input bytes, if any."""
    for split in SPLITS:
        path = mesh_path(out, split, name)
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
            except DAMAGED:
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
    with atomic_path(mesh_path(cfg.out, split, name)) as tmp, open(tmp, "wb") as fh:
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
    mesh_path(cfg.out, "train" if split == "val" else "val", name).unlink(missing_ok=True)
    return MeshResult(name, source, split, key, len(grid), int(grid.sharp.sum()), len(faces), resumed=False)


def _voxelize_input(mesh: MeshInput, digest: str, cfg: SdfConfig, device: torch.device) -> MeshResult:
    result = finished_mesh(cfg.out, mesh.name, mesh.source, digest) or _voxelize_mesh(
        mesh.load(), mesh.name, mesh.source, digest, cfg, device
    )
    result.source_split = None if cfg.resplit else mesh.split
    result.category = mesh.category
    return result


def voxelize_file(path: Path, name: str, cfg: SdfConfig, device: str, threads: int) -> FileMeshes[MeshResult]:
    """Voxelise every mesh of one input file not already on disk (runs in a worker process)."""
    if threads:
        torch.set_num_threads(threads)
    digest = hash_path(path)
    return file_meshes(path, name, partial(_voxelize_input, digest=digest, cfg=cfg, device=torch.device(device)))


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
            target = mesh_path(cfg.out, split, mesh.name)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.replace(mesh_path(cfg.out, mesh.split, mesh.name), target)
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
    folder = discover_meshes(cfg.input)
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
    threads = 1 if workers != 1 else 0
    run = folder.run(
        partial(voxelize_file, cfg=cfg, device=str(device), threads=threads),
        workers=workers,
        description=f"sdf-voxelize R={cfg.resolution} ({device.type})",
        on_failure=f"meshes finished so far are kept in {cfg.out}: re-run to resume",
    )
    meshes = run.meshes
    run.require_meshes(meshes)
    _balance_splits(meshes, cfg)

    seconds = run.seconds()
    computed = [m for m in meshes if not m.resumed]
    counts = {
        "files": len(folder.files),
        "meshes": len(meshes),
        "train": sum(m.split == "train" for m in meshes),
        "val": sum(m.split == "val" for m in meshes),
        "computed": len(computed),
        "resumed": len(meshes) - len(computed),
        "skipped": len(run.skipped),
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
        **run.label_manifest(meshes),
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
        "skipped": [{"path": s.path, "reason": s.reason} for s in run.skipped],
        "config": to_dict(cfg),
    }
    atomic_write_json(cfg.out / "manifest.json", manifest)
    run.report(
        f"voxelised {len(meshes)} meshes at R={cfg.resolution} (train {counts['train']}, val {counts['val']}; "
        f"{len(computed)} computed, {counts['resumed']} already done) in {seconds:.1f}s on {device.type}"
    )
    return {
        **counts,
        "meshes_per_s": round(len(computed) / seconds, 2) if computed else None,
        "seconds": round(seconds, 2),
        "out": str(cfg.out),
    }

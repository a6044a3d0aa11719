"""Sparse latent datasets: a sparse SDF dataset encoded by a trained SS-VAE, what the SS-DiT trains on.

Layout of a dataset folder (written by ``encode_dataset``, which ``train-dit`` runs on a sparse SDF dataset)::

    manifest.json   {"format": "meshforge-latents/1", "vae_checkpoint", "vae_step", "source",
                     "resolution" (latent grid G = R / f), "data_resolution" (R), "factor" (f),
                     "latent_channels", "mean" / "std" (per channel, over the train split's latents),
                     "classes" (sorted labels), "views", "image_size", "counts"}
    train/, val/    the splits of the source dataset, each with
      coords.npy    int16 [T, 3] latent voxel indices in [0, G), all shapes end to end, each in key order
      feats.npy     float32 [T, C] the posterior mean of each voxel's latent (not normalised)
      index.npy     int64 [N, 2] (row offset, row count) of each shape
      names.json    [N] the source dataset's mesh names
      labels.json   [N] class label of each shape, or null
      images.npy    uint8 [N, V, S, S, 4] RGBA renders of each mesh (only when views > 0)

Every array is memory-mappable. Labels are those the sparse SDF dataset records for its meshes
(:mod:`meshforge.data.labels`, the same rule as ``meshforge tokenize``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from meshforge.data.sdf_dataset import SPLITS, SparseSDFDataset
from meshforge.errors import READ_ERRORS, InputError, MeshforgeError

FORMAT = "meshforge-latents/1"
MANIFEST = "manifest.json"


@dataclass
class LatentItem:
    coords: np.ndarray  # int16 [N, 3]
    feats: np.ndarray  # float32 [N, C]
    label: int  # index into the dataset's classes, -1 when unlabelled
    name: str


def is_latent_dataset(root: Path) -> bool:
    path = Path(root) / MANIFEST
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == FORMAT
    except json.JSONDecodeError:
        return False


class LatentDataset:
    """One split of a latent dataset; arrays are memory-mapped."""

    def __init__(self, root: Path, split: Literal["train", "val"] = "train") -> None:
        self.root = Path(root)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not is_latent_dataset(self.root):
            raise InputError(self.root, "not a latent dataset (`train-dit --data SDF_DATASET --vae VAE` encodes one first)")
        self.manifest = json.loads((self.root / MANIFEST).read_text())
        folder = self.root / split
        try:
            self.coords = np.load(folder / "coords.npy", mmap_mode="r")
            self.feats = np.load(folder / "feats.npy", mmap_mode="r")
            self.index = np.load(folder / "index.npy")
            self.names: list[str] = json.loads((folder / "names.json").read_text())
            self.labels: list[str | None] = json.loads((folder / "labels.json").read_text())
            self.images = np.load(folder / "images.npy", mmap_mode="r") if self.views else None
        except READ_ERRORS as exc:
            raise InputError(folder, f"incomplete or damaged latent dataset split ({type(exc).__name__}: {exc})") from None

    @property
    def resolution(self) -> int:
        return int(self.manifest["resolution"])

    @property
    def latent_channels(self) -> int:
        return int(self.manifest["latent_channels"])

    @property
    def classes(self) -> list[str]:
        return list(self.manifest["classes"])

    @property
    def views(self) -> int:
        return int(self.manifest["views"])

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> LatentItem:
        start, count = (int(v) for v in self.index[i])
        label = self.labels[i]
        return LatentItem(
            coords=np.asarray(self.coords[start : start + count]),
            feats=np.asarray(self.feats[start : start + count], dtype=np.float32),
            label=self.classes.index(label) if label is not None else -1,
            name=self.names[i],
        )

    def image(self, i: int, view: int) -> np.ndarray:
        """uint8 RGBA [S, S, 4] render ``view`` of shape ``i``."""
        if self.images is None:
            raise MeshforgeError(f"{self.root} holds no renders (encode it with views > 0 for image conditioning)")
        return np.asarray(self.images[i, view])


def mesh_labels(sdf: SparseSDFDataset) -> dict[str, str | None]:
    """Class label of every mesh of a sparse SDF dataset, by name (see the module docstring)."""
    records = sdf.manifest["records"]
    if records and "label" not in records[0]:
        raise InputError(sdf.root, "records no class labels (written by an older meshforge): run "
                         "`meshforge sdf-voxelize` on it again, which reuses every finished mesh")
    return {record["name"]: record["label"] for record in records}


def write_split(folder: Path, coords: list[np.ndarray], feats: list[np.ndarray], names: list[str],
                 labels: list[str | None]) -> None:
    counts = np.array([len(c) for c in coords], dtype=np.int64)
    index = np.stack([np.concatenate([[0], np.cumsum(counts)[:-1]]), counts], axis=1) if len(counts) else np.zeros((0, 2), np.int64)
    channels = feats[0].shape[1] if feats else 0
    np.save(folder / "coords.npy", np.concatenate(coords).astype(np.int16) if coords else np.zeros((0, 3), np.int16))
    np.save(folder / "feats.npy", np.concatenate(feats).astype(np.float32) if feats else np.zeros((0, channels), np.float32))
    np.save(folder / "index.npy", index)
    (folder / "names.json").write_text(json.dumps(names) + "\n")
    (folder / "labels.json").write_text(json.dumps(labels) + "\n")

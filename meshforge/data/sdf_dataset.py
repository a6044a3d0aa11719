"""A sparse SDF dataset folder (written by ``meshforge sdf-voxelize``, :mod:`meshforge.data.sdf_voxelize`).

Layout: ``config.yaml`` (written first), ``train/NAME.npz`` and ``val/NAME.npz`` (one per mesh,
each written atomically as soon as it is done) and ``manifest.json`` (written last: a folder
without it is unfinished). Each ``.npz`` holds the SDF (``coords`` int16, ``sdf`` float16,
``sharp``, ``resolution``, ``band``), the mesh in the SDF's frame (``vertices``, ``faces``), its
``split_key`` and the ``source_hash`` of the input bytes it came from (what resuming compares).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from meshforge.data.sdf import SparseSDF
from meshforge.errors import READ_ERRORS, InputError

FORMAT = "meshforge-sparse-sdf/1"
SPLITS = ("train", "val")
DAMAGED = (*READ_ERRORS, KeyError)  # an .npz cut short may also lack a member


def mesh_path(root: Path, split: str, name: str) -> Path:
    return root / split / f"{name}.npz"


class SparseSDFDataset:
    """One split of a dataset written by :func:`~meshforge.data.sdf_voxelize.voxelize_folder`; items are :class:`SparseSDF` on CPU."""

    def __init__(self, root: Path, split: Literal["train", "val"] = "train"):
        self.root = Path(root)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        path = self.root / "manifest.json"
        if not path.is_file():
            # config.yaml is written first and manifest.json last: with only the first, a run stopped.
            unfinished = (self.root / "config.yaml").is_file()
            hint = (
                "re-run `meshforge sdf-voxelize` to finish it"
                if unfinished
                else "make one with `meshforge sdf-voxelize`"
            )
            raise InputError(self.root, f"not a finished sparse SDF dataset (no manifest.json; {hint})")
        self.manifest = json.loads(path.read_text())
        if self.manifest.get("format") != FORMAT:
            raise InputError(
                path, f"unsupported dataset format {self.manifest.get('format')!r} (expected {FORMAT})"
            )
        self.split = split
        self.names: list[str] = self.manifest["meshes"][split]
        self.resolution: int = self.manifest["resolution"]
        self.band: float = self.manifest["band"]

    def __len__(self) -> int:
        return len(self.names)

    def _read(self, i: int, keys: tuple[str, ...]) -> list[np.ndarray]:
        path = mesh_path(self.root, self.split, self.names[i])
        try:
            with np.load(path) as data:
                return [data[k] for k in keys]
        except DAMAGED as exc:
            # A re-run of sdf-voxelize redoes exactly the damaged files (see sdf_voxelize.finished_mesh).
            raise InputError(
                path,
                f"missing or damaged ({type(exc).__name__}: {exc}); re-run `meshforge sdf-voxelize` to redo it",
            ) from None

    def __getitem__(self, i: int) -> SparseSDF:
        coords, sdf, sharp, resolution, band = self._read(i, ("coords", "sdf", "sharp", "resolution", "band"))
        return SparseSDF(
            coords=torch.from_numpy(coords.astype(np.int32)),
            sdf=torch.from_numpy(sdf.astype(np.float32)),
            sharp=torch.from_numpy(sharp),
            resolution=int(resolution),
            band=float(band),
        )

    def mesh(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """The mesh in the SDF's frame: ``vertices`` float32 [V, 3], ``faces`` int32 [F, 3]."""
        vertices, faces = self._read(i, ("vertices", "faces"))
        return vertices, faces

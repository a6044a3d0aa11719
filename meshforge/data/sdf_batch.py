"""Batches of sparse SDF shapes, as the SS-VAE reads them (training, evaluation, encoding)."""

from __future__ import annotations

from typing import Any

import torch

from meshforge.data.sdf import SparseSDF
from meshforge.errors import MeshforgeError
from meshforge.sparse.tensor import SparseTensor


def collate(items: list[SparseSDF], band: float) -> dict[str, Any]:
    """Shapes on one common grid as a batch: int32 ``(b, x, y, z)`` coords, SDF in band units
    (``sdf * R / band``, clipped to [-1, 1]), sharp flags."""
    resolution = items[0].resolution
    if any(item.resolution != resolution for item in items):
        raise MeshforgeError("a batch needs one resolution; resample its shapes first")
    batch = [torch.full((len(item), 1), i, dtype=torch.int32) for i, item in enumerate(items)]
    sdf = torch.cat([item.sdf.float() for item in items])
    return {
        "coords": torch.cat([torch.cat([b, item.coords.int()], 1) for b, item in zip(batch, items)]),
        "sdf": (sdf * resolution / band).clamp(-1.0, 1.0),
        "sharp": torch.cat([item.sharp.bool() for item in items]),
        "resolution": resolution,
        "batch_size": len(items),
    }


def batch_tensor(batch: dict[str, Any]) -> SparseTensor:
    """The model's input: the SDF (band units) as a one-channel sparse tensor."""
    r = batch["resolution"]
    return SparseTensor(batch["sdf"][:, None], batch["coords"], (r, r, r), batch["batch_size"])

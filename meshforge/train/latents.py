"""Encoding a sparse SDF dataset with a trained SS-VAE into a latent dataset (:mod:`meshforge.data.latents`),
the data the SS-DiT trains on (``meshforge train-dit --data SDF_DATASET --vae VAE`` does it first)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from meshforge.checkpoints import resolve_checkpoint
from meshforge.data.latents import FORMAT, MANIFEST, mesh_labels, write_split
from meshforge.data.sdf_batch import batch_tensor, collate
from meshforge.data.sdf_dataset import SPLITS, SparseSDFDataset
from meshforge.errors import MeshforgeError
from meshforge.io import atomic_path, atomic_write_json
from meshforge.models.conditioning import render_views
from meshforge.models.registry import load_model
from meshforge.models.ss_vae import SSVAE
from meshforge.runtime import console, to_device, track


@torch.no_grad()
def encode_dataset(
    vae_ckpt: Path,
    sdf_dataset: Path,
    out: Path,
    device: torch.device | str = "cpu",
    *,
    views: int = 0,
    image_size: int = 224,
    batch_size: int = 8,
    seed: int = 0,
) -> dict:
    """Encode every shape of a sparse SDF dataset with the SS-VAE at ``vae_ckpt`` (posterior mean)
    into a latent dataset at ``out``, with ``views`` RGBA renders per mesh; returns a summary."""
    device = torch.device(device)
    vae_step = resolve_checkpoint(Path(vae_ckpt))
    _, vae, meta = load_model(vae_step, device, expect=SSVAE)
    splits = {split: SparseSDFDataset(sdf_dataset, split) for split in SPLITS}
    r = splits["train"].resolution
    factor = vae.config.factor
    if r % factor:
        raise MeshforgeError(f"{sdf_dataset}: resolution {r} is not a multiple of the VAE's downsampling factor {factor}")
    labels_by_name = mesh_labels(splits["train"])
    classes = sorted({label for label in labels_by_name.values() if label is not None})

    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        for split, data in splits.items():
            folder = tmp / split
            folder.mkdir()
            coords, feats = [], []
            images = None
            if views:
                images = np.lib.format.open_memmap(folder / "images.npy", mode="w+", dtype=np.uint8,
                                                   shape=(len(data), views, image_size, image_size, 4))
            for start in track(range(0, len(data), batch_size), f"encode {split}"):
                items = [data[i] for i in range(start, min(start + batch_size, len(data)))]
                for c, f in vae.encode(batch_tensor(to_device(collate(items, data.band), device))).items():
                    coords.append(c.cpu().numpy())
                    feats.append(f.float().cpu().numpy())
                if images is not None:
                    for i in range(start, start + len(items)):
                        vertices, faces = data.mesh(i)
                        images[i] = render_views(vertices, faces, views, image_size, np.random.default_rng([seed, i]))
            if images is not None:
                images.flush()
                del images
            write_split(folder, coords, feats, list(data.names), [labels_by_name.get(name) for name in data.names])
            if split == "train":
                if not feats:
                    raise MeshforgeError(f"{sdf_dataset}: the train split is empty")
                train_feats = np.concatenate(feats)
                mean, std = train_feats.mean(axis=0), train_feats.std(axis=0)
        manifest = {
            "format": FORMAT,
            "vae_checkpoint": str(vae_step.resolve()),
            "vae_step": meta.get("step"),
            "source": str(Path(sdf_dataset).resolve()),
            "resolution": r // factor,
            "data_resolution": r,
            "factor": factor,
            "latent_channels": vae.config.latent_channels,
            "mean": [float(v) for v in mean],
            "std": [float(max(v, 1e-6)) for v in std],
            "classes": classes,
            "views": views,
            "image_size": image_size,
            "counts": {split: len(data) for split, data in splits.items()},
        }
        atomic_write_json(tmp / MANIFEST, manifest)
    console.print(f"encoded {sum(manifest['counts'].values())} shapes to {manifest['resolution']}^3 latents in {out}",
                  highlight=False)
    return manifest

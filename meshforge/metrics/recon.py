"""Reconstruction quality of an SS-VAE checkpoint: ``meshforge eval --metric recon``.

Each shape of a sparse SDF split is encoded (posterior mean), decoded with the decoder's own
pruning and meshed by sparse marching cubes, then compared with the input mesh the dataset stores
in the SDF's frame (:meth:`SparseSDFDataset.mesh`). The figures therefore include what the
voxelisation at the data's resolution loses; ``input_sdf_*`` gives that floor: the same metrics
for the marching-cubes mesh of the input SDF itself. Metrics (:mod:`meshforge.metrics.geometry`):
Chamfer distance (sum of mean squared nearest distances), F-score at ``tau`` and normal
consistency, on ``points`` area-uniform samples per surface, averaged over the shapes. A shape
whose reconstruction has no surface counts in ``failed`` and is left out of the means.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from meshforge.data.sdf_batch import batch_tensor, collate
from meshforge.data.sdf_dataset import SparseSDFDataset
from meshforge.errors import MeshforgeError
from meshforge.metrics.geometry import FSCORE_TAU, reconstruction_metrics
from meshforge.models.registry import load_model
from meshforge.models.ss_vae import SSVAE
from meshforge.render import render_grid
from meshforge.runtime import to_device, track
from meshforge.sample.export import write_samples

METRICS = ("chamfer", "fscore", "normal_consistency")


def evaluate_reconstruction(
    checkpoint: Path,
    data: Path,
    split: Literal["train", "val"] = "val",
    n: int | None = None,
    device: torch.device | str = "cpu",
    out: Path | None = None,
    points: int = 20_000,
    tau: float = FSCORE_TAU,
    seed: int = 0,
    ema: bool = True,
) -> dict[str, Any]:
    """Mean Chamfer, F-score@``tau`` and normal consistency over the first ``n`` shapes of ``split``
    (with the checkpoint's EMA weights when it has them and ``ema`` is on).

    With ``out``, writes the reconstructions (``recon_000.obj`` ..., ``grid.png``, ``stats.json``)
    and ``compare.png`` (reference and reconstruction side by side) there.
    """
    device = torch.device(device)
    kind, model, meta = load_model(checkpoint, device, ema=ema, expect=SSVAE)
    dataset = SparseSDFDataset(data, split)
    count = len(dataset) if n is None else min(n, len(dataset))
    if count == 0:
        raise MeshforgeError(f"{data}: the {split} split is empty")
    amp = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()

    references, reconstructions, rows = [], [], []
    for i in track(range(count), "recon"):
        batch = to_device(collate([dataset[i]], model.config.band), device)
        x = batch_tensor(batch)
        with torch.no_grad(), amp:
            sdf = model.reconstruct(x)
        reference = dataset.mesh(i)
        (input_surface,) = model.to_meshes(x)
        (recon,) = model.to_meshes(sdf)
        references.append(reference)
        reconstructions.append(recon)
        row: dict[str, Any] = {"index": i, "input_voxels": len(x), "output_voxels": len(sdf), "faces": len(recon[1])}
        if len(recon[1]):
            row.update(reconstruction_metrics(recon, reference, n_points=points, seed=seed + i, tau=tau))
        if len(input_surface[1]):
            floor = reconstruction_metrics(input_surface, reference, n_points=points, seed=seed + i, tau=tau)
            row.update({f"input_sdf_{name}": value for name, value in floor.items()})
        rows.append(row)

    scored = [r for r in rows if "chamfer" in r]
    result: dict[str, Any] = {
        "kind": kind,
        "step": meta.get("step"),
        "checkpoint": meta["path"],
        "weights": meta["weights"],
        "meshes": count,
        "failed": count - len(scored),
        **{name: mean(scored, name) for name in METRICS},
        **{f"input_sdf_{name}": mean(rows, f"input_sdf_{name}") for name in METRICS},
        "fscore_tau": tau,
        "points": points,
        "resolution": dataset.resolution,
        "per_mesh": rows,
    }
    if out is not None:
        out = Path(out)
        write_samples(reconstructions, out, names=[f"recon_{i:03d}" for i in range(count)],
                      extra_stats={name: result[name] for name in METRICS})
        pairs = [mesh for pair in zip(references, reconstructions) for mesh in pair]
        labels = [f"{i}: {what}" for i in range(count) for what in ("input mesh", "reconstruction")]
        render_grid(pairs, out / "compare.png", cols=2, labels=labels)
    return result


def evaluate_checkpoint(cfg: Any, device: torch.device, seed: int) -> dict[str, Any]:
    """``meshforge eval --metric recon``: :func:`evaluate_reconstruction` of ``cfg.checkpoint`` on ``cfg.data``."""
    return evaluate_reconstruction(cfg.checkpoint, cfg.data, split=cfg.split, n=cfg.n, device=device, seed=seed, ema=cfg.ema)


def mean(rows: list[dict[str, Any]], key: str) -> float | None:
    """Mean of ``key`` over the rows that have it (None when none does: JSON has no NaN)."""
    values = [r[key] for r in rows if key in r]
    return float(np.mean(values)) if values else None

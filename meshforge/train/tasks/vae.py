"""The SS-VAE training task: sparse SDF reconstruction with the losses of Direct3D-S2 (eq. 1-3).

Each step draws its global batch with :func:`global_batch` and one resolution R from the configured
set (the same on every rank, a pure function of ``(seed, step)``); every shape is brought to R
(multi-resolution training, paper section 3.3) and its SDF expressed in band units. Above the data's
resolution the SDF is interpolated (:func:`resample`); below it the stored mesh is voxelised again at
R, on the current CUDA device when there is one, because interpolating down by k keeps only
``band / k`` voxels each side of the surface (0.75 of 3 from 1024 to 256). The loss is

    w_in L_in + w_extra L_extra + w_sharp L_sharp + w_kl L_kl + w_prune L_prune

with the terms of :func:`meshforge.models.ss_vae.loss_terms`, each a mean over the global batch.
Each item's posterior sample draws its noise from the item's own seed
(:func:`meshforge.runtime.item_seeds`), so ``--gpus N`` follows the loss curve of one process.
Evaluation runs the same teacher-forced pass on the val split at the data's resolution and
reports the voxel IoU of an unguided reconstruction (pruning by the predicted existence).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from meshforge.config import load_yaml
from meshforge.data.sdf import SparseSDF, resample, voxelize
from meshforge.data.sdf_batch import batch_tensor, collate
from meshforge.data.sdf_dataset import SparseSDFDataset
from meshforge.data.sdf_voxelize import SdfConfig
from meshforge.errors import ConfigError
from meshforge.models.ss_vae import SSVAE, SSVAEConfig, loss_terms
from meshforge.runtime import item_seeds, to_device
from meshforge.sparse.tensor import SparseTensor
from meshforge.train.config import TrainOptions
from meshforge.train.distributed import check_train_size, global_batch, global_mean, rank_slice

LOSS_TERMS = ("in", "extra", "sharp", "kl", "prune")


@dataclass(kw_only=True)
class VaeTaskConfig(TrainOptions):
    """Options of ``meshforge train-vae``: the trainer's options plus data, model and loss weights.

    The model is the nested ``model`` section (``--set model.channels=[32,64,128]`` or a ``model:``
    mapping in ``--config``); its ``band`` is taken from the dataset.
    """

    data: Path = field(metadata={"help": "Sparse SDF dataset folder (from `meshforge sdf-voxelize`)."})
    model: SSVAEConfig = field(default_factory=SSVAEConfig)
    resolutions: list[int] | None = field(
        default=None,
        metadata={
            "help": "Grid resolutions drawn at random per step, e.g. 256,384,512 (default: the data's); each "
            "a multiple of the model's downsampling factor."
        },
    )
    weight_in: float = field(default=1.0, metadata={"help": "Weight of the SDF MSE on the input voxels."})
    weight_extra: float = field(
        default=1.0,
        metadata={"help": "Weight of the SDF MSE on extra (predicted, not in the input) voxels."},
    )
    weight_sharp: float = field(  # on top of weight_in: sharp voxels count (weight_in + weight_sharp) times
        default=1.0,
        metadata={"help": "Extra weight of the SDF MSE on voxels near sharp edges."},
    )
    weight_kl: float = field(default=1e-5, metadata={"help": "Weight of the KL divergence of the latent."})
    weight_prune: float = field(
        default=1.0,
        metadata={"help": "Weight of the BCE of the decoder's voxel-existence (pruning) logits."},
    )
    eval_meshes: int = field(default=8, metadata={"help": "Val shapes per evaluation (0: all)."})
    batch_size: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.resolutions is not None:
            bad = [r for r in self.resolutions if r < 1 or r % self.model.factor]
            if not self.resolutions or bad:
                raise ValueError(
                    f"resolutions must be positive multiples of the model's factor {self.model.factor}, got {self.resolutions}"
                )
        weights = {k: getattr(self, f"weight_{k}") for k in LOSS_TERMS}
        if any(w < 0 for w in weights.values()):
            raise ValueError(f"loss weights must be non-negative, got {weights}")
        if self.eval_meshes < 0:
            raise ValueError(f"eval_meshes must be non-negative, got {self.eval_meshes}")


class VAETask:
    name = "ss-vae"

    def __init__(self, cfg: VaeTaskConfig) -> None:
        self.config = cfg
        self.train_set = SparseSDFDataset(cfg.data, "train")
        self.val_set = SparseSDFDataset(cfg.data, "val")
        check_train_size(len(self.train_set), cfg.batch_size, cfg.data)
        self.band = float(self.train_set.band)
        # The sharp-edge settings the data was made with, for shapes voxelised again at a lower R.
        made_with = load_yaml(Path(cfg.data) / "config.yaml") if (Path(cfg.data) / "config.yaml").is_file() else {}
        self.sharp_angle_deg = float(made_with.get("sharp_angle_deg", SdfConfig.sharp_angle_deg))
        self.sharp_radius = float(made_with.get("sharp_radius", SdfConfig.sharp_radius))
        data_resolution = int(self.train_set.resolution)
        self.resolutions = list(cfg.resolutions or [data_resolution])
        if data_resolution % cfg.model.factor and cfg.resolutions is None:
            raise ConfigError(
                f"the data's resolution {data_resolution} is not a multiple of the model's downsampling factor "
                f"{cfg.model.factor}; set --resolutions or use fewer model levels"
            )
        self._model_config = dataclasses.replace(cfg.model, band=self.band)

    def model_config(self) -> SSVAEConfig:
        return self._model_config

    def build_model(self) -> nn.Module:
        return SSVAE(self._model_config)

    def resolution_at(self, seed: int, step: int) -> int:
        """The step's training resolution, the same on every rank."""
        return self.resolutions[int(np.random.default_rng([seed, step, 1]).integers(len(self.resolutions)))]

    def batches(self, rank: int, world_size: int, seed: int, start_step: int) -> Iterator[dict[str, Any]]:
        part = rank_slice(self.config.batch_size, rank, world_size)
        for step in itertools.count(start_step):
            indices, _ = global_batch(len(self.train_set), self.config.batch_size, seed, step)
            r = self.resolution_at(seed, step)
            batch = collate([self.item_at(self.train_set, int(i), r) for i in indices[part]], self.band)
            yield {**batch, "seeds": item_seeds(seed, step, self.config.batch_size)[part]}

    def item_at(self, data: SparseSDFDataset, i: int, resolution: int) -> SparseSDF:
        """Shape ``i`` of ``data`` on the ``resolution^3`` grid, with the data's band (see the module docstring)."""
        item = data[i]
        if resolution == item.resolution:
            return item
        if resolution > item.resolution:
            return resample(item, resolution)
        vertices, faces = data.mesh(i)
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
        return voxelize(vertices, faces, resolution, self.band, sharp_angle_deg=self.sharp_angle_deg,
                        sharp_radius=self.sharp_radius, device=device).to("cpu")

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        x = batch_tensor(batch)
        terms = {name: global_mean(total, count) for name, (total, count) in loss_terms(x, batch["sharp"], model(x, seeds=batch["seeds"])).items()}
        loss = sum(getattr(self.config, f"weight_{name}") * terms[name] for name in LOSS_TERMS)
        # ``tokens`` (summed over ranks, logged as tokens_per_s) counts input voxels here.
        return loss, {**{name: value.detach() for name, value in terms.items()}, "tokens": float(len(x))}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        count = len(self.val_set) if self.config.eval_meshes == 0 else min(self.config.eval_meshes, len(self.val_set))
        if count == 0:
            return {}
        device = next(model.parameters()).device
        sums: dict[str, float] = {}
        for i in range(count):
            batch = to_device(collate([self.val_set[i]], self.band), device)
            x = batch_tensor(batch)
            terms = loss_terms(x, batch["sharp"], model(x, sample=False))
            values = {name: float(total / count_.clamp(min=1)) for name, (total, count_) in terms.items()}
            values["voxel_iou"] = voxel_iou(model.reconstruct(x), x)
            for name, value in values.items():
                sums[name] = sums.get(name, 0.0) + value / count
        return sums


def voxel_iou(pred: SparseTensor, target: SparseTensor) -> float:
    """Intersection over union of two voxel sets on the same grid."""
    both = int(torch.isin(pred.keys, target.keys).sum())
    return both / max(len(pred) + len(target) - both, 1)

"""The SS-DiT training task: rectified flow on sparse latents, structure and features together.

Each step draws its global batch with :func:`global_batch` from a latent dataset
(:mod:`meshforge.data.latents`), with for image conditioning one of each shape's renders, picked by
``(seed, step, index)``. The loss is

    L_latent + structure_weight * L_structure

each the mean squared error of the predicted velocity ``eps - x_0`` at logit-normal timesteps
(:mod:`meshforge.models.ss_dit`), over the global batch. The condition of each item is replaced by
the null condition with probability ``cond_dropout``, which is what classifier-free guidance needs.
Each item's timesteps, dropout and noise come from its own seed, a function of ``(seed, step,
position in the global batch)`` (:func:`meshforge.runtime.item_seeds`), so ``--gpus N`` trains on
exactly the randomness of one process and follows its loss curve.
Evaluation reports both losses on the val split at fixed times and noise, so they are comparable
from one evaluation to the next.

The checkpoint (kind ``ss-dit``) holds the conditioner with the two flows, and its model config
names the SS-VAE that decodes its latents, the latent statistics and the class names.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from meshforge.checkpoints import resolve_checkpoint
from meshforge.data.latents import LatentDataset, LatentItem, is_latent_dataset
from meshforge.errors import ConfigError, InputError
from meshforge.models.conditioning import CONDITIONERS, read_encoder_checkpoint, vit_config_from_state
from meshforge.models.ss_dit import LatentFlow, LatentFlowConfig, flow_loss_terms, logit_normal_timesteps
from meshforge.runtime import console, item_seeds, to_device
from meshforge.train.config import TrainOptions
from meshforge.train.distributed import check_train_size, global_batch, global_mean, process_env, rank_slice
from meshforge.train.latents import encode_dataset

LATENTS_POLL_S = 1.0  # how often a waiting rank looks for rank 0's encoded latents


@dataclass(kw_only=True)
class DiTTaskConfig(TrainOptions):
    """Options of ``meshforge train-dit``: the trainer's options plus data, model and flow settings.

    ``data`` is a latent dataset, or a sparse SDF dataset that is first encoded with ``vae`` into
    ``OUT/latents``. The model is the nested ``model`` section (``--set model.dit.depth=12``,
    ``--set model.cond.kind=class``); its latent space is taken from the data.
    """

    data: Path = field(
        metadata={"help": "Latent dataset, or a sparse SDF dataset to encode with --vae first."},
    )
    out: Path = field(  # TrainOptions' field, with this stage's help
        metadata={
            "help": "Run folder: checkpoints/, metrics.csv, curves.png, config.yaml, summary.json (and "
            "latents/)."
        },
    )
    vae: Path | None = field(
        default=None,
        metadata={
            "help": "SS-VAE checkpoint that encodes the data and decodes samples (default: the one the "
            "latents name)."
        },
    )
    model: LatentFlowConfig = field(default_factory=LatentFlowConfig)
    cond_dropout: float = field(
        default=0.1,
        metadata={
            "help": "Probability of training an item on the null condition (classifier-free guidance)."
        },
    )
    t_mean: float = field(  # logit-normal timesteps: sigmoid(t_mean + t_std * N(0, 1))
        default=0.0,
        metadata={"help": "Logit-normal timesteps: mean of the normal before the sigmoid."},
    )
    t_std: float = field(
        default=1.0,
        metadata={"help": "Logit-normal timesteps: standard deviation of the normal before the sigmoid."},
    )
    structure_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the structure (occupancy) flow's loss."},
    )
    views: int = field(default=4, metadata={"help": "Renders per mesh when encoding for image conditioning."})
    eval_meshes: int = field(default=16, metadata={"help": "Val shapes per evaluation (0: all)."})
    batch_size: int = 8
    ema_decay: float = 0.999  # diffusion models are sampled from their EMA weights

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.cond_dropout < 1:
            raise ValueError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if self.t_std <= 0 or self.structure_weight < 0:
            raise ValueError("t_std must be positive and structure_weight non-negative")
        if self.views < 1 or self.eval_meshes < 0:
            raise ValueError("views must be at least 1 and eval_meshes non-negative")


def needs_encoding(cfg: DiTTaskConfig) -> bool:
    """True for a sparse SDF dataset with a VAE to encode it, False for a latent dataset; anything
    else is a one-line error (cheap: a launcher checks before starting its workers)."""
    data = Path(cfg.data)
    if is_latent_dataset(data):
        return False
    if not (data / "manifest.json").is_file():
        raise InputError(data, "neither a latent dataset nor a sparse SDF dataset (from `meshforge sdf-voxelize`)")
    if cfg.vae is None:
        raise ConfigError(f"{data} is a sparse SDF dataset: pass --vae VAE_CKPT to encode it to latents first")
    return True


def prepare_data(cfg: DiTTaskConfig, device: torch.device, seed: int = 0) -> DiTTaskConfig:
    """``cfg`` reading a latent dataset: a sparse SDF dataset is encoded with ``cfg.vae`` into
    ``OUT/latents`` first (kept and reused while its source, VAE and renders still match).

    Under torchrun (``--gpus N``, or several nodes sharing ``OUT``) rank 0 encodes while the other
    ranks wait for its finished dataset to appear: the data is encoded once, never by racing ranks.
    The wait is on the file rather than a collective, which would time out (NCCL: 10 minutes) on a
    large dataset; if rank 0 fails, torchrun stops the waiting ranks.
    """
    if not needs_encoding(cfg):
        return cfg
    data, out = Path(cfg.data), Path(cfg.out) / "latents"
    views = cfg.views if cfg.model.cond.kind == "image" else 0
    wanted = {"source": str(data.resolve()), "vae_checkpoint": str(resolve_checkpoint(cfg.vae).resolve()), "views": views}
    if views:
        wanted["image_size"] = cfg.model.cond.image_size

    def ready() -> bool:
        existing = LatentDataset(out).manifest if is_latent_dataset(out) else {}
        return all(existing.get(k) == v for k, v in wanted.items())

    env = process_env()
    if env.is_main:
        if ready():
            console.print(f"reusing the latents in {out}", highlight=False)
        else:
            encode_dataset(cfg.vae, data, out, device, views=views, image_size=cfg.model.cond.image_size, seed=seed)
    else:
        if env.local_rank == 0:  # once per node
            console.print(f"rank {env.rank}: waiting for rank 0 to encode {data} into {out}", highlight=False)
        while not ready():
            time.sleep(LATENTS_POLL_S)
    return dataclasses.replace(cfg, data=out)


def collate(items: list[LatentItem], condition: torch.Tensor | None) -> dict[str, Any]:
    """Latents of a batch: int32 ``(b, x, y, z)`` coords, raw features, and the raw condition."""
    coords = [np.concatenate([np.full((len(it.coords), 1), b), it.coords], axis=1) for b, it in enumerate(items)]
    return {
        "coords": torch.from_numpy(np.concatenate(coords).astype(np.int32)),
        "feats": torch.from_numpy(np.concatenate([it.feats for it in items])),
        "batch_size": len(items),
        "condition": condition,
    }


class DiTTask:
    name = "ss-dit"

    def __init__(self, cfg: DiTTaskConfig) -> None:
        self.config = cfg
        self.train_set = LatentDataset(cfg.data, "train")
        self.val_set = LatentDataset(cfg.data, "val")
        check_train_size(len(self.train_set), cfg.batch_size, cfg.data)
        manifest = self.train_set.manifest
        vae = resolve_checkpoint(cfg.vae) if cfg.vae is not None else Path(manifest["vae_checkpoint"])
        if cfg.vae is not None and vae.resolve() != Path(manifest["vae_checkpoint"]).resolve():
            console.print(f"[yellow]{cfg.data} was encoded with {manifest['vae_checkpoint']}; decoding with {vae}[/yellow]")
        cond = cfg.model.cond
        if cond.kind not in CONDITIONERS:
            raise ConfigError(f"model.cond.kind: unknown conditioner {cond.kind!r} (known: {', '.join(sorted(CONDITIONERS))})")
        self.data_field = CONDITIONERS[cond.kind].data
        if self.data_field == "label":
            if not self.train_set.classes:
                raise ConfigError(f"{cfg.data} has no class labels (labels.json or category folders) for model.cond.kind=class")
            cond = dataclasses.replace(cond, classes=self.train_set.classes)
        if self.data_field == "image":
            if not self.train_set.views:
                raise ConfigError(f"{cfg.data} holds no renders: encode the SDF dataset again with model.cond.kind=image")
            if cond.encoder == "dinov2":
                if cond.encoder_checkpoint is None:
                    raise ConfigError("model.cond.encoder=dinov2 needs model.cond.encoder_checkpoint (a local DINOv2 state dict)")
                cond = dataclasses.replace(cond, vit=vit_config_from_state(read_encoder_checkpoint(cond.encoder_checkpoint)))
        if self.train_set.resolution % cfg.model.structure_patch:
            raise ConfigError(f"the latent grid {self.train_set.resolution} is not a multiple of model.structure_patch "
                              f"{cfg.model.structure_patch}")
        self._model_config = dataclasses.replace(
            cfg.model, cond=cond, latent_channels=self.train_set.latent_channels, resolution=self.train_set.resolution,
            latent_mean=list(manifest["mean"]), latent_std=list(manifest["std"]), vae_checkpoint=str(vae.resolve()),
        )

    def model_config(self) -> LatentFlowConfig:
        return self._model_config

    def build_model(self) -> nn.Module:
        model = LatentFlow(self._model_config)
        cond = self._model_config.cond
        if self.data_field == "image" and cond.encoder == "dinov2":
            model.conditioner.load_encoder(cond.encoder_checkpoint)
        return model

    def condition(self, data: LatentDataset, indices: list[int], items: list[LatentItem],
                  views: list[int]) -> torch.Tensor | None:
        """The raw condition of a batch: class ids, or uint8 RGBA renders ``[B, 4, S, S]`` (view ``views[i]``)."""
        if self.data_field == "label":
            return torch.tensor([it.label for it in items], dtype=torch.long)
        if self.data_field == "image":
            return torch.from_numpy(np.stack([data.image(i, v) for i, v in zip(indices, views)])).permute(0, 3, 1, 2)
        return None

    def batches(self, rank: int, world_size: int, seed: int, start_step: int) -> Iterator[dict[str, Any]]:
        part = rank_slice(self.config.batch_size, rank, world_size)
        views = max(self.train_set.views, 1)
        for step in itertools.count(start_step):
            indices, _ = global_batch(len(self.train_set), self.config.batch_size, seed, step)
            chosen = [int(i) for i in indices[part]]
            picks = [int(np.random.default_rng([seed, step, i]).integers(views)) for i in chosen]
            items = [self.train_set[i] for i in chosen]
            yield {**collate(items, self.condition(self.train_set, chosen, items, picks)),
                   **self.item_randomness(item_seeds(seed, step, self.config.batch_size)[part])}

    def item_randomness(self, seeds: list[int]) -> dict[str, Any]:
        """Each item's timesteps ``t [B, 2]`` (latent, structure), condition dropout and noise seed,
        drawn from the item's own seed: the same however the global batch is split over ranks."""
        cfg = self.config
        times, drop = [], []
        for s in seeds:
            # A stream of its own: the seed itself also seeds the item's noise (in the model).
            generator = torch.Generator().manual_seed(int(np.random.default_rng(s).integers(2**62)))
            times.append(logit_normal_timesteps(2, cfg.t_mean, cfg.t_std, generator=generator))
            drop.append(bool(torch.rand((), generator=generator) < cfg.cond_dropout))
        return {"t": torch.stack(times), "drop": torch.tensor(drop), "seeds": seeds}

    @staticmethod
    def raw_condition(batch: dict[str, Any]) -> torch.Tensor | None:
        condition = batch["condition"]
        return condition.float() / 255.0 if condition is not None and condition.dtype == torch.uint8 else condition

    def loss(self, model: nn.Module, batch: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg, b, t = self.config, batch["batch_size"], batch["t"]
        terms = model(batch["coords"], batch["feats"], b, self.raw_condition(batch), batch["drop"], t[:, 0], t[:, 1],
                      seeds=batch["seeds"])
        latent, structure = global_mean(*terms["latent"]), global_mean(*terms["structure"])
        loss = latent + cfg.structure_weight * structure
        # ``tokens`` (summed over ranks, logged as tokens_per_s) counts latent voxels.
        return loss, {"latent": latent.detach(), "structure": structure.detach(), "tokens": float(len(batch["feats"]))}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Both flow losses on the val split, at times spread evenly over (0, 1) and seeded noise."""
        count = len(self.val_set) if self.config.eval_meshes == 0 else min(self.config.eval_meshes, len(self.val_set))
        if count == 0:
            return {}
        device = next(model.parameters()).device
        generator = torch.Generator(device=device).manual_seed(0)
        sums = {"latent": 0.0, "structure": 0.0}
        totals = {"latent": 0.0, "structure": 0.0}
        for start in range(0, count, self.config.batch_size):
            chosen = list(range(start, min(start + self.config.batch_size, count)))
            items = [self.val_set[i] for i in chosen]
            batch = to_device(collate(items, self.condition(self.val_set, chosen, items, [0] * len(chosen))), device)
            b = batch["batch_size"]
            cond = model.conditioner(self.raw_condition(batch), torch.zeros(b, dtype=torch.bool, device=device))
            t = (torch.tensor(chosen, device=device, dtype=torch.float32) + 0.5) / count
            latents = model.latent_tensor(batch["coords"], model.normalize(batch["feats"]), b)
            structure = model.structure_tensor(batch["coords"], b)
            for name, denoiser, x in (("latent", model.dit, latents), ("structure", model.structure, structure)):
                eps = torch.randn(x.feats.shape, generator=generator, device=device)
                total, n = flow_loss_terms(denoiser, x, t, cond, eps)
                sums[name] += float(total)
                totals[name] += float(n)
        return {name: sums[name] / totals[name] for name in sums}

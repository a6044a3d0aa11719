"""The iFlame training task: next-token prediction over face-token sequences.

Each step's global batch is drawn from the train split by :func:`global_batch` and re-canonicalised
with the dataset's random scale/shift augmentation, seeded per item by ``(seed, epoch, index)``;
the loss is cross-entropy over non-PAD targets. Evaluation reports the val split's face accuracy
and perplexity (:mod:`meshforge.metrics.tokens`).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from meshforge.data.canonical import Augment
from meshforge.data.shards import TokenDataset, read_manifest
from meshforge.data.tokens import TOKENS_PER_FACE, collate_tokens
from meshforge.errors import ConfigError
from meshforge.metrics.tokens import token_metrics
from meshforge.models.iflame import IFlame, IFlameConfig
from meshforge.train.config import TrainOptions
from meshforge.train.distributed import check_train_size, global_batch, global_mean, rank_slice


@dataclass(kw_only=True)
class TrainIFlameConfig(TrainOptions):
    """Options of ``meshforge train-iflame``: the trainer's options plus data, model and evaluation.

    The model is the nested ``model`` section (``--config FILE.yaml`` with a ``model:`` mapping,
    or ``--set model.dim=256``); its vocabulary must match the dataset's quantisation bits.
    """

    data: Path = field(
        metadata={
            "help": "Token dataset folder (from `meshforge tokenize`; default: the newest under "
            "./meshforge-data/tokens)."
        },
    )
    out: Path = field(  # TrainOptions' field, with this stage's help
        metadata={
            "help": "Run folder: checkpoints/, metrics.csv, curves.png, config.yaml, summary.json (default: "
            "the next free ./runs/iflame-N; with --resume the newest iFlame run)."
        },
    )
    model: IFlameConfig = field(default_factory=IFlameConfig)
    augment: bool = field(  # the dataset's random per-axis scale/shift, re-drawn every epoch
        default=True,
        metadata={"help": "Random per-axis scale/shift at load time (the dataset's ranges)."},
    )
    max_faces: int | None = field(
        default=None,
        metadata={"help": "Train on at most this many leading faces of each mesh."},
    )
    eval_meshes: int = field(default=256, metadata={"help": "Val meshes per evaluation (0: all)."})
    eval_batch_size: int = field(default=16, metadata={"help": "Batch size of evaluation."})
    length_groups: int = field(
        default=16,
        metadata={
            "help": "Draw this many batches at once and form them of meshes of similar length, so batches "
            "pad little (1: plain shuffled batches)."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.max_faces is not None and self.max_faces < 1:
            raise ValueError(f"max_faces must be at least 1, got {self.max_faces}")
        if self.eval_meshes < 0 or self.eval_batch_size < 1 or self.length_groups < 1:
            raise ValueError("eval_meshes must be >= 0, eval_batch_size and length_groups >= 1")


class IFlameTask:
    name = "iflame"

    def __init__(self, cfg: TrainIFlameConfig) -> None:
        self.config = cfg
        manifest = read_manifest(cfg.data)
        self.augment = Augment(**manifest["augment"]) if cfg.augment else None
        self.val_set = TokenDataset(cfg.data, "val")
        check_train_size(len(TokenDataset(cfg.data, "train")), cfg.batch_size, cfg.data)
        self.vocab = self.val_set.vocab
        if cfg.model.vocab_size != self.vocab.size:
            raise ConfigError(
                f"model.vocab_size {cfg.model.vocab_size} does not match the dataset's {self.vocab.size} tokens "
                f"({self.vocab.bits}-bit coordinates); set model.vocab_size={self.vocab.size}"
            )
        longest = TOKENS_PER_FACE * ((cfg.max_faces or int(manifest["max_faces"])) + 1)
        # Batches round their length up to a bucket (<= 12.5% padding); the model's length caps
        # that padding, not the meshes, once every mesh fits.
        self.max_len = longest if cfg.max_faces else cfg.model.max_seq_len
        if longest > cfg.model.max_seq_len:
            raise ConfigError(
                f"sequences of up to {longest} tokens do not fit model.max_seq_len {cfg.model.max_seq_len}; "
                f"raise model.max_seq_len or train on fewer faces with --max-faces"
            )

    def model_config(self) -> IFlameConfig:
        return self.config.model

    def build_model(self) -> nn.Module:
        return IFlame(self.config.model)

    def batches(self, rank: int, world_size: int, seed: int, start_step: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        train_set = TokenDataset(self.config.data, "train", augment=self.augment, seed=seed)
        part = rank_slice(self.config.batch_size, rank, world_size)
        faces = train_set.face_counts()
        if self.config.max_faces:
            faces = np.minimum(faces, self.config.max_faces)
        for step in itertools.count(start_step):
            indices, epochs = global_batch(
                len(train_set), self.config.batch_size, seed, step, lengths=faces, groups=self.config.length_groups
            )
            sequences = [train_set.tokens(int(i), epoch=int(e)) for i, e in zip(indices[part], epochs[part])]
            yield collate_tokens(sequences, self.vocab, max_len=self.max_len)

    def loss(self, model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, dict[str, Any]]:
        inputs, targets = batch
        logits = model(inputs).float()
        keep = targets != self.vocab.pad
        count = keep.sum()
        total = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=self.vocab.pad, reduction="sum")
        correct = ((logits.argmax(-1) == targets) & keep).sum().float()
        return global_mean(total, count), {"acc": global_mean(correct, count), "tokens": count}

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        if len(self.val_set) == 0:
            return {}
        metrics = token_metrics(
            model, self.val_set, batch_size=self.config.eval_batch_size,
            max_meshes=self.config.eval_meshes or None, max_len=self.max_len,
        )
        return {key: metrics[key] for key in ("loss", "face_acc", "perplexity")}

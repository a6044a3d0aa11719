"""A tiny next-token task for testing the trainer without any real model or dataset."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from meshforge.models.registry import ModelSpec, register_model
from meshforge.train.config import TrainConfig
from meshforge.train.distributed import global_batch, global_mean, rank_slice


@dataclass
class ToyConfig:
    vocab: int = 13
    width: int = 16


class ToyModel(nn.Module):
    """Embedding -> two hidden linears -> norm -> tied head: every parameter kind the optimisers split."""

    def __init__(self, cfg: ToyConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab, cfg.width)
        self.fc1 = nn.Linear(cfg.width, 4 * cfg.width)
        self.fc2 = nn.Linear(4 * cfg.width, cfg.width)
        self.norm = nn.LayerNorm(cfg.width)
        self.head = nn.Linear(cfg.width, cfg.vocab, bias=False)
        self.head.weight = self.embed.weight
        nn.init.normal_(self.embed.weight, std=0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(self.norm(h))


register_model(ModelSpec("toy", ToyConfig, ToyModel))


def toy_config(**overrides) -> TrainConfig:
    """A short CPU run that logs every step (for step-by-step comparisons)."""
    base = {"steps": 40, "batch_size": 8, "lr": 3e-3, "warmup_steps": 5, "log_every": 1,
            "checkpoint_every": 10, "eval_every": 20, "keep_checkpoints": 2, "precision": "fp32"}
    return TrainConfig(**{**base, **overrides})


class ToyTask:
    """Sequences x[t+1] = (5 x[t] + 3) mod vocab: a token-wise rule the model can learn quickly.

    ``nan_at`` multiplies the loss of that step by NaN; ``interrupt_at`` raises KeyboardInterrupt
    when the batch of that step is requested (a Ctrl-C between steps).
    """

    name = "toy"

    def __init__(self, batch_size: int, n_items: int = 48, length: int = 10, nan_at: int | None = None,
                 interrupt_at: int | None = None, pad_fraction: float = 0.3):
        self.cfg = ToyConfig()
        self.batch_size = batch_size
        self.nan_at, self.interrupt_at = nan_at, interrupt_at
        g = torch.Generator().manual_seed(1234)
        v = self.cfg.vocab
        x0 = torch.randint(0, v, (n_items, 1), generator=g)
        seq = [x0]
        for _ in range(length - 1):
            seq.append((5 * seq[-1] + 3) % v)
        self.data = torch.cat(seq, 1)
        # Variable lengths (-100 = ignored target) make per-rank target counts differ, which is
        # what global_mean has to get right for 1 and N processes to agree.
        lengths = length - (torch.rand(n_items, generator=g) < pad_fraction).long() * torch.randint(
            1, length // 2, (n_items,), generator=g)
        self.targets = self.data.clone()
        self.targets[torch.arange(length)[None, :] >= lengths[:, None]] = -100
        self.val = self.data[:8]
        self.step = 0

    def build_model(self) -> nn.Module:
        return ToyModel(self.cfg)

    def model_config(self) -> ToyConfig:
        return self.cfg

    def batches(self, rank: int, world_size: int, seed: int, start_step: int) -> Iterator[tuple]:
        part = rank_slice(self.batch_size, rank, world_size)
        for step in itertools.count(start_step):
            if step == self.interrupt_at:
                raise KeyboardInterrupt
            idx, _ = global_batch(len(self.data), self.batch_size, seed, step)
            idx = torch.from_numpy(idx[part])
            yield self.data[idx], self.targets[idx], step

    def loss(self, model: nn.Module, batch: tuple) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        x, y, step = batch
        logits = model(x[:, :-1]).float()
        target = y[:, 1:]
        total = F.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100,
                                reduction="sum")
        mask = target != -100
        count = mask.sum()
        correct = ((logits.argmax(-1) == target) & mask).sum().float()
        loss = global_mean(total, count)
        if step == self.nan_at:
            loss = loss * float("nan")
        return loss, {"acc": global_mean(correct, count), "tokens": count}

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        logits = model(self.val[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), self.val[:, 1:].reshape(-1))
        return {"loss": float(loss)}

"""Trainer configuration, shared by every training stage (iFlame, SS-VAE, SS-DiT).

``TrainSettings`` are the trainer's own settings; ``TrainOptions`` adds the run folder (``out``) and
``resume``, and is what every training stage's config extends, so each gets ``--out``, ``--resume``,
``--steps``, ``--batch-size``, ``--lr`` ... from one place. ``TrainConfig`` is what the trainer runs
on: the settings and the seed, which the CLI supplies through its global ``--seed``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal


@dataclass(kw_only=True)
class TrainSettings:
    steps: int = field(
        default=1000,
        metadata={"help": "Optimizer steps in total (a resumed run continues up to this many)."},
    )
    batch_size: int = field(  # global: split evenly over the processes, so 1 and N GPUs see the same batch
        default=16,
        metadata={"help": "Global batch size, split evenly over the --gpus processes."},
    )
    lr: float = field(  # peak; Muon's update is rescaled to match AdamW's RMS, so one lr serves both
        default=1e-3,
        metadata={"help": "Peak learning rate (Muon and AdamW alike)."},
    )
    weight_decay: float = field(
        default=0.1,
        metadata={"help": "Decoupled weight decay of matrices (not of norms, biases, scalars)."},
    )
    warmup_steps: int = field(default=100, metadata={"help": "Linear warm-up steps before the cosine decay."})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "The cosine ends at lr times this."})
    grad_clip: float = field(
        default=1.0,
        metadata={"help": "Clip the global gradient norm to this (0: no clipping)."},
    )
    optimizer: Literal["muon", "adamw"] = field(
        default="muon",
        metadata={"help": "muon: Muon for hidden matrices + AdamW for the rest; adamw: AdamW for all."},
    )
    adam_betas: tuple[float, float] = field(
        default=(0.9, 0.95),
        metadata={"help": "AdamW betas, e.g. 0.9,0.95."},
    )
    muon_momentum: float = field(default=0.95, metadata={"help": "Muon's Nesterov momentum."})
    checkpoint_every: int = field(
        default=500,
        metadata={"help": "Checkpoint every N steps (and at the end, and on Ctrl-C)."},
    )
    keep_checkpoints: int = field(default=3, metadata={"help": "Keep the newest N checkpoints."})
    log_every: int = field(
        default=10,
        metadata={"help": "Write a metrics.csv row every N steps (averages over them)."},
    )
    eval_every: int = field(
        default=500,
        metadata={"help": "Evaluate on the val split every N steps (0: only at the end)."},
    )
    compile: bool = field(default=False, metadata={"help": "torch.compile the model."})
    precision: Literal["auto", "fp32", "bf16"] = field(
        default="auto",
        metadata={"help": "auto: bf16 autocast on CUDA, fp32 on CPU."},
    )
    gpus: int = field(
        default=1,
        metadata={
            "help": "Processes on this node, one per GPU, launched by torchrun; needs that many CUDA devices "
            "unless --device cpu is given (then CPU processes over gloo)."
        },
    )
    time_limit_min: float = field(
        default=0.0,
        metadata={
            "help": "Stop after this many minutes of training (counted from the end of the first step, which "
            "compiles kernels), as at the last step (checkpoint, evaluation, curves); --resume "
            "continues the schedule. 0: no limit."
        },
    )
    profile_steps: int = field(  # torch.profiler over this many steps after a warm-up (see meshforge.train.profiling)
        default=0,
        metadata={
            "help": "Profile this many steps (after 10 warm-up steps) on every rank: OUT/profile/ holds each "
            "rank's trace (Perfetto), top operators and a summary (step time, GPU busy fraction, "
            "kernel launches, phases)."
        },
    )
    ema_decay: float = field(  # keep an EMA of the weights with this decay (0: none), see meshforge.train.ema
        default=0.0,
        metadata={
            "help": "Keep an exponential moving average of the weights with this decay (warmed up as "
            "min(decay, (1+t)/(10+t))), saved in each checkpoint; sample and eval use it unless "
            "--no-ema. 0: none."
        },
    )

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints", "gpus"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "grad_clip", "weight_decay", "time_limit_min", "profile_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be non-negative, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if not all(0 <= b < 1 for b in self.adam_betas):
            raise ValueError(f"adam_betas must lie in [0, 1), got {self.adam_betas}")
        if not 0 <= self.muon_momentum < 1:
            raise ValueError(f"muon_momentum must be in [0, 1), got {self.muon_momentum}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1) (0: no EMA), got {self.ema_decay}")


@dataclass(kw_only=True)
class TrainOptions(TrainSettings):
    out: Path = field(
        metadata={"help": "Run folder: checkpoints/, metrics.csv, curves.png, config.yaml, summary.json."},
    )
    resume: bool = field(
        default=False,
        metadata={"help": "Continue from OUT/checkpoints/latest (same loss curve as an uninterrupted run)."},
    )


@dataclass(kw_only=True)
class TrainConfig(TrainSettings):
    seed: int = 0

    @classmethod
    def from_options(cls, options: TrainSettings, seed: int) -> TrainConfig:
        """The trainer's config from a stage config that extends :class:`TrainOptions`."""
        names = [f.name for f in dataclasses.fields(TrainSettings)]
        return cls(**{name: getattr(options, name) for name in names}, seed=seed)

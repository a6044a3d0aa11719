"""Optimisers and the learning-rate schedule.

iFlame trains with Muon (momentum orthogonalised by a Newton-Schulz iteration) on the hidden 2-D
weight matrices and AdamW on everything else: embeddings and output heads (whose rows are looked
up or read out one token at a time, so orthogonalising them makes no sense), norms, biases and
scalars.

:class:`Muon` is ``torch.optim.Muon(..., nesterov=True, adjust_lr_fn="match_rms_adamw")`` computed
per *shape* rather than per matrix: the matrices of one shape are stacked and orthogonalised by
batched GEMMs, and the momentum and weight updates go through ``torch._foreach`` ops. torch's
version loops over the matrices (96 of 4 shapes in the reference iFlame), a couple of dozen small
kernels each. On an H200 the switch took a reference iFlame step from ~4,350 to ~2,400 kernel
launches and the optimizer's host time from 62-68 to 8-13 ms (``--profile-steps``;
``benchmarks/results/iflame_ddp_profiles_before_fixes.json`` and ``iflame_ddp.json``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable

import torch
from torch import nn

from meshforge.train.config import TrainSettings

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic, the one torch ships
NS_STEPS = 5
# Modules whose weights are token look-ups or read-outs rather than hidden transforms.
_ADAMW_MODULE_WORDS = ("embed", "head")


def zeropower_newton_schulz(g: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonal matrices with the singular vectors of ``g`` (``[A, B]`` or a stack
    ``[N, A, B]``, each matrix on its own; singular values ~ 1), in bf16."""
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16().reshape(-1, *g.shape[-2:])
    tall = g.size(-2) > g.size(-1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)  # spectral <= Frobenius <= 1
    for _ in range(steps):
        gram = torch.bmm(x, x.mT)
        x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b G + c G^2) x
    return (x.mT if tall else x).reshape(g.shape)


class Muon(torch.optim.Optimizer):
    """Muon with Nesterov momentum and AdamW-matched update RMS (``0.2 * sqrt(max(A, B))``), one
    batched Newton-Schulz per parameter shape. The state (``momentum_buffer`` per matrix) is
    ``torch.optim.Muon``'s, so checkpoints of either load into the other."""

    def __init__(self, params: Iterable, lr: float, weight_decay: float, momentum: float) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            by_shape: dict[torch.Size, list[nn.Parameter]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is not None:
                    if p.grad.ndim != 2:
                        raise ValueError(f"Muon takes matrices, got a parameter of shape {tuple(p.shape)}")
                    by_shape[p.shape].append(p)
            for shape, params in by_shape.items():
                grads = [p.grad for p in params]
                buffers = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
                torch._foreach_lerp_(buffers, grads, 1 - mu)
                nesterov = torch._foreach_lerp(grads, buffers, mu)
                updates = zeropower_newton_schulz(torch.stack(nesterov)).unbind(0)
                torch._foreach_mul_(params, 1 - lr * wd)
                torch._foreach_add_(params, updates, alpha=-lr * 0.2 * math.sqrt(max(shape)))


def _uses_adamw(module_name: str, module: nn.Module) -> bool:
    last = module_name.rsplit(".", 1)[-1].lower()
    return isinstance(module, nn.Embedding) or any(word in last for word in _ADAMW_MODULE_WORDS)


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter], list[nn.Parameter]]:
    """(Muon matrices, AdamW with weight decay, AdamW without weight decay), each parameter once.

    Muon takes the 2-D weights of hidden ``nn.Linear`` layers. Embeddings and heads (a module
    whose name contains "embed" or "head") go to AdamW with decay, like any other tensor of 2 or
    more dimensions (conv kernels); vectors and scalars (norm gains, biases, skip weights) go to
    AdamW without decay.
    """
    muon_ids: set[int] = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and not _uses_adamw(name, module):
            muon_ids.add(id(module.weight))
    muon, decay, no_decay = [], [], []
    for p in model.parameters():  # deduplicated: tied weights appear once
        if not p.requires_grad:
            continue
        if id(p) in muon_ids:
            muon.append(p)
        elif p.ndim >= 2:
            decay.append(p)
        else:
            no_decay.append(p)
    return muon, decay, no_decay


def build_optimizers(model: nn.Module, cfg: TrainSettings) -> list[torch.optim.Optimizer]:
    """Muon + AdamW (``optimizer="muon"``) or AdamW alone, all at the peak lr (see :func:`set_lr`)."""
    muon, decay, no_decay = split_parameters(model)
    if cfg.optimizer == "adamw":
        decay, muon = decay + muon, []
    fused = next(model.parameters()).is_cuda
    adam_groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    optimizers: list[torch.optim.Optimizer] = [
        torch.optim.AdamW([g for g in adam_groups if g["params"]], lr=cfg.lr, betas=cfg.adam_betas, fused=fused)
    ]
    if muon:
        optimizers.append(Muon(muon, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum))
    return optimizers


def lr_factor(step: int, cfg: TrainSettings) -> float:
    """Linear warm-up over ``warmup_steps``, then a cosine from 1 down to ``min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizers: list[torch.optim.Optimizer], step: int, cfg: TrainSettings) -> float:
    """Apply the schedule for ``step``; returns the lr. Being a pure function of the step, the
    schedule needs no state of its own in a checkpoint."""
    lr = cfg.lr * lr_factor(step, cfg)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
    return lr

"""Optimisers and the learning-rate schedule.

iFlame trains with Muon (momentum orthogonalised by a Newton-Schulz iteration) on the hidden 2-D
weight matrices and AdamW on everything else: embeddings and output heads (whose rows are looked
up or read out one token at a time, so orthogonalising them makes no sense), norms, biases and
scalars. ``torch.optim.Muon`` (torch >= 2.9) is used when present; :class:`NewtonSchulzMuon` is the
same algorithm for older torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from meshforge.train.config import TrainOptions

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic, the one torch ships
NS_STEPS = 5
# Modules whose weights are token look-ups or read-outs rather than hidden transforms.
_ADAMW_MODULE_WORDS = ("embed", "head")


def zeropower_newton_schulz(g: torch.Tensor, steps: int = NS_STEPS, eps: float = 1e-7) -> torch.Tensor:
    """An approximately orthogonal matrix with ``g``'s singular vectors (singular values ~ 1), in bf16."""
    a, b, c = NS_COEFFICIENTS
    x = g.bfloat16()
    tall = g.size(0) > g.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1: inside the basin
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b G + c G^2) x
    return x.T if tall else x


class NewtonSchulzMuon(torch.optim.Optimizer):
    """Muon with Nesterov momentum and AdamW-matched update RMS (``0.2 * sqrt(max(A, B))``).

    Equivalent to ``torch.optim.Muon(..., adjust_lr_fn="match_rms_adamw")``; used only where torch
    does not provide it.
    """

    def __init__(self, params: Iterable, lr: float, weight_decay: float, momentum: float) -> None:
        super().__init__(params, {"lr": lr, "weight_decay": weight_decay, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p.grad))
                buf.lerp_(p.grad, 1 - mu)
                update = zeropower_newton_schulz(p.grad.lerp(buf, mu))
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))


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


def build_optimizers(model: nn.Module, cfg: TrainOptions) -> list[torch.optim.Optimizer]:
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
        if hasattr(torch.optim, "Muon"):
            optimizers.append(
                torch.optim.Muon(muon, lr=cfg.lr, weight_decay=cfg.weight_decay, momentum=cfg.muon_momentum,
                                 nesterov=True, adjust_lr_fn="match_rms_adamw")
            )
        else:
            optimizers.append(NewtonSchulzMuon(muon, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                               momentum=cfg.muon_momentum))
    return optimizers


def lr_factor(step: int, cfg: TrainOptions) -> float:
    """Linear warm-up over ``warmup_steps``, then a cosine from 1 down to ``min_lr_ratio`` at ``steps``."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    span = max(cfg.steps - cfg.warmup_steps, 1)
    progress = min((step - cfg.warmup_steps) / span, 1.0)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def set_lr(optimizers: list[torch.optim.Optimizer], step: int, cfg: TrainOptions) -> float:
    """Apply the schedule for ``step``; returns the lr. Being a pure function of the step, the
    schedule needs no state of its own in a checkpoint."""
    lr = cfg.lr * lr_factor(step, cfg)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = lr
    return lr

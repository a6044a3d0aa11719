"""An exponential moving average of a model's weights, kept beside training and saved with it.

After every optimizer step ``t`` (0-based) each float parameter's average moves towards it::

    ema <- decay_t * ema + (1 - decay_t) * param,   decay_t = min(decay, (1 + t) / (10 + t))

The warm-up ``(1 + t) / (10 + t)`` (0.1 at the first step, 0.9 at step 80, 0.99 at step 890) lets
the average forget the random initialisation in short runs; long runs reach ``decay`` itself. One
``torch._foreach_lerp_`` over the parameter list does the update (a few fused launches, not one
per tensor). The average is float32 whatever autocast does, as the parameters are.

Under DDP every rank holds identical parameters after each step (gradients are all-reduced, the
optimizers are identical), so every rank updates its own identical average: no communication, and
any rank could save it (rank 0 does, with the rest of the checkpoint).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def ema_decay_at(decay: float, step: int) -> float:
    """The decay applied by the update after optimizer step ``step`` (0-based), warm-up included."""
    return min(decay, (1 + step) / (10 + step))


class EMA:
    """The average of ``model``'s floating-point parameters, by name (tied parameters once)."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        named = [(name, p) for name, p in model.named_parameters() if p.is_floating_point()]
        self.names = [name for name, _ in named]
        self.params = [p for _, p in named]
        self.averages = [p.detach().float().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Fold in the parameters as they are after optimizer step ``step`` (0-based)."""
        weight = 1.0 - ema_decay_at(self.decay, step)
        torch._foreach_lerp_(self.averages, [p.detach().float() for p in self.params], weight)

    def state_dict(self) -> dict[str, Tensor]:
        """Parameter name -> averaged tensor (what :func:`meshforge.checkpoints.save_checkpoint` stores)."""
        return dict(zip(self.names, self.averages))

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        missing = sorted(set(self.names) - set(state))
        if missing:
            raise KeyError(f"EMA state lacks {missing[0]}")
        for name, average in zip(self.names, self.averages):
            average.copy_(state[name])


__all__ = ["EMA", "ema_decay_at"]

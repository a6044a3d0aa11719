"""The iFlame training step and timing helpers shared by ``iflame_vs_full.py`` and ``linear_attention_forms.py``
(the step their figures come from). Imported by the scripts beside it (a script's folder is on ``sys.path``)."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import nullcontext
from typing import Any

import torch
from meshforge.kernels.linear_attention import LinearBackend
from torch.nn import functional as F

from meshforge.data.tokens import TOKENS_PER_FACE, Vocab
from meshforge.models.iflame import Attention, IFlame, IFlameConfig

VOCAB = Vocab(7)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def timed(fn: Callable[[], None], device: torch.device, warmup: int, repeat: int) -> float:
    """Seconds per call of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeat


def train_step(cfg: IFlameConfig, device: torch.device, batch: int, faces: int, steps: int,
               operators_free: bool = False, linear_backend: LinearBackend = "auto",
               warmup: int = 2, compile_backend: str | None = None) -> dict[str, Any]:
    """Seconds and peak memory of a training step (forward + backward + AdamW, bf16 autocast on CUDA) on
    random tokens of ``faces`` faces, the mean of ``steps`` after ``warmup`` untimed ones; the peak
    covers them all (AdamW's state exists from the first step's end, so a warm-up step makes it the
    steady one). ``operators_free``: with the attention operators passing their values through
    (:attr:`Attention.operator_free`); ``linear_backend``: the linear blocks' form; ``compile_backend``:
    ``torch.compile`` the model with that backend, as the trainer's ``--compile`` does (inductor)."""
    torch.manual_seed(0)
    model = IFlame(cfg).to(device)
    for layer in model.modules():
        if isinstance(layer, Attention):
            layer.operator_free, layer.linear_backend = operators_free, linear_backend
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = torch.compile(model, backend=compile_backend) if compile_backend else model
    x = torch.randint(0, VOCAB.levels, (batch, TOKENS_PER_FACE * (faces + 1)), device=device)

    def step() -> None:
        with autocast(device):
            logits = forward(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), x.roll(-1, 1).flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        seconds = timed(step, device, warmup=warmup, repeat=steps)
    except torch.cuda.OutOfMemoryError:
        return {"step_s": None, "peak_bytes": None, "peak_gb": None, "oom": True}
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"step_s": seconds, "peak_bytes": peak, "peak_gb": None if peak is None else peak / 1e9, "oom": False}

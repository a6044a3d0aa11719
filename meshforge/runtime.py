"""Process-wide runtime helpers: device choice, seeding and generator states, progress bars, optional backends."""

from __future__ import annotations

import importlib.util
import os
import platform
import random
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from meshforge.errors import MeshforgeError

T = TypeVar("T")

console = Console(stderr=True)


def resolve_device(device: str) -> torch.device:
    """``auto`` picks CUDA when available; asking for CUDA on a machine without it is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MeshforgeError(f"device {device!r} requested but CUDA is not available (use --device cpu)")
    if device != "cpu" and not device.startswith("cuda"):
        raise MeshforgeError(f"unknown device {device!r} (expected cpu, cuda or auto)")
    return torch.device(device)


def device_name(device: torch.device) -> str:
    """The name results record their speeds under: the GPU model, or ``cpu``."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def capture_rng() -> dict[str, Any]:
    """Python, NumPy, torch (and this process's CUDA device) generator states, as tensors/ints."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # int64: pickling a uint32 tensor (all_gather_object does) fails in torch.
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    version, internal, *rest = state["python"]
    random.setstate((version, tuple(internal), *rest))
    name, keys, *np_rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *np_rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def item_seeds(seed: int, step: int, count: int) -> list[int]:
    """One seed per position of a step's global batch, a pure function of ``(seed, step, position)``.

    Noise drawn from them (:func:`seeded_normals`) is the same for an item however the batch is
    split over processes, so 1 and N data-parallel processes train on the same noise.
    """
    return [int(np.random.default_rng([seed, step, j]).integers(2**62)) for j in range(count)]


def seeded_normals(seeds: list[int], blocks: list[tuple[torch.Tensor, int]], device: torch.device,
                   dtype: torch.dtype = torch.float32) -> list[torch.Tensor]:
    """Standard normal noise for batched rows, item by item from the item's own seed.

    Each block is ``(offsets [B + 1], channels)``: item ``b`` owns rows ``offsets[b]:offsets[b + 1]``.
    Item ``b``'s rows of every block are drawn, block after block, from one generator seeded by
    ``seeds[b]``, so they depend on the item alone, not on which other items share its batch.
    """
    bounds = [offsets.tolist() for offsets, _ in blocks]
    parts: list[list[torch.Tensor]] = [[] for _ in blocks]
    for b, seed in enumerate(seeds):
        generator = torch.Generator(device=device).manual_seed(seed)
        for k, (_, channels) in enumerate(blocks):
            rows = bounds[k][b + 1] - bounds[k][b]
            parts[k].append(torch.randn(rows, channels, generator=generator, device=device, dtype=dtype))
    return [torch.cat(p) for p in parts]


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (also inside tuples, lists and dicts) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


# Inductor's mix-order reduction (RMSNorm's backward: row sums for the input's gradient, column sums for
# the weight's) decides by size thresholds whether to fuse, and on a dynamic length each threshold is a
# guard: on an H200 the training lengths fell into ranges (320..959, 960..2,048 tokens) that each
# recompiled the whole model (~20 s a step at first). Its non-strict mode fuses without those checks
# ("helpful to avoid recompilations", says inductor's config); it picks kernels, not numerics.
NON_STRICT_MIX_ORDER = "mix_order_reduction_non_strict_mode"


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile(model)`` for training over many sequence lengths: inductor, with mix-order
    reduction non-strict where this torch has the option (older ones compile as before)."""
    import torch._inductor.config as inductor_config

    has_option = hasattr(inductor_config.triton, NON_STRICT_MIX_ORDER)
    return torch.compile(model, options={f"triton.{NON_STRICT_MIX_ORDER}": True} if has_option else None)


def has_module(name: str) -> bool:
    """True when ``name`` is importable, without importing it (flash-attn is slow and optional)."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def progress_enabled() -> bool:
    return os.environ.get("MESHFORGE_NO_PROGRESS", "") == "" and (sys.stderr.isatty() or bool(os.environ.get("MESHFORGE_PROGRESS")))


def make_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not progress_enabled(),
        transient=False,
    )


def track(items: Iterable[T], description: str, total: int | None = None) -> Iterator[T]:
    """A rich progress bar over ``items`` (silent when stderr is not a terminal)."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    with make_progress() as progress:
        task = progress.add_task(description, total=total)
        for item in items:
            yield item
            progress.advance(task)


def cpu_model() -> str:
    """The processor's model name (for benchmark records), e.g. 'Intel(R) Xeon(R) Processor'."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()

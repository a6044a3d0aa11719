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


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (also inside tuples, lists and dicts) moved to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


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

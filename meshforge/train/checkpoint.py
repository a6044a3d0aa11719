"""Checkpoints: atomic step folders, a ``latest`` pointer, and a registry that rebuilds models.

Layout under a run's output folder::

    checkpoints/
      step_0000500/
        model.safetensors   weights (tied tensors stored once)
        ema.safetensors     the weights' moving average by parameter name (runs with --ema-decay)
        meta.json           {"kind", "model_config", "step", "task", "train_config", "metrics"}
        state.pt            optimizers, RNG states of every rank, data position
      latest                "step_0000500"

A step folder is written under a temporary name and renamed into place, and ``latest`` is
rewritten only afterwards, so a crash at any moment leaves the previous checkpoint intact.
``state.pt`` holds only tensors and plain containers and is loaded with ``weights_only=True``.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_file as save_safetensors_file
from safetensors.torch import save_model as save_safetensors_model
from torch import nn

from meshforge.config import from_dict
from meshforge.errors import InputError, MeshforgeError
from meshforge.io import atomic_path, atomic_write_text

CHECKPOINTS = "checkpoints"
LATEST = "latest"
WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
META = "meta.json"
STATE = "state.pt"


def step_name(step: int) -> str:
    return f"step_{step:07d}"


# ---------------------------------------------------------------------------------------------
# Random number generators


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


# ---------------------------------------------------------------------------------------------
# Writing and finding checkpoints


def save_checkpoint(
    out_dir: Path,
    *,
    step: int,
    model: nn.Module,
    meta: dict[str, Any],
    state: dict[str, Any],
    keep: int,
    ema: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``OUT/checkpoints/step_XXXXXXX`` atomically, point ``latest`` at it, prune old ones.
    ``ema`` (parameter name -> averaged tensor) goes to its own ``ema.safetensors``.

    Refuses weights that are not finite: a checkpoint is only ever a good one.
    """
    tensors = {**model.state_dict(), **{f"ema {name}": t for name, t in (ema or {}).items()}}
    bad = [name for name, p in tensors.items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise MeshforgeError(f"refusing to checkpoint step {step}: non-finite values in {bad[0]}")
    root = Path(out_dir) / CHECKPOINTS
    final = root / step_name(step)
    with atomic_path(final) as tmp:
        tmp.mkdir()
        # Plain writes are fine inside the temporary folder: it becomes visible in one rename.
        save_safetensors_model(model, str(tmp / WEIGHTS))
        if ema is not None:
            save_safetensors_file({name: t.detach().cpu().contiguous() for name, t in ema.items()}, str(tmp / EMA_WEIGHTS))
        (tmp / META).write_text(json.dumps({**meta, "step": step}, indent=2, default=str) + "\n")
        torch.save({**state, "step": step}, tmp / STATE)
    atomic_write_text(root / LATEST, final.name + "\n")
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The step folder ``OUT/checkpoints/latest`` names, or None when there is none yet."""
    pointer = Path(out_dir) / CHECKPOINTS / LATEST
    if not pointer.is_file():
        return None
    step_dir = pointer.parent / pointer.read_text().strip()
    if not (step_dir / STATE).is_file():
        raise InputError(pointer, f"names {step_dir.name}, which is missing or incomplete")
    return step_dir


def resolve_checkpoint(path: Path) -> Path:
    """A step folder from a step folder, a ``checkpoints`` folder, or a run's output folder."""
    path = Path(path)
    if (path / META).is_file():
        return path
    found = latest_checkpoint(path.parent if path.name == CHECKPOINTS else path)
    if found is not None:
        return found
    if not path.exists():
        raise InputError(path, "no such checkpoint")
    raise InputError(path, "not a checkpoint (expected a step folder, a checkpoints folder or a run folder)")


def load_state(step_dir: Path) -> dict[str, Any]:
    """``state.pt`` of a step folder (optimizers, RNG, data position)."""
    return torch.load(Path(step_dir) / STATE, map_location="cpu", weights_only=True)


def load_weights(model: nn.Module, step_dir: Path) -> None:
    """Load ``model.safetensors`` into ``model`` in place (strict: every tensor must match)."""
    device = next(model.parameters()).device
    try:
        load_safetensors_model(model, str(Path(step_dir) / WEIGHTS), device=str(device))
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise InputError(step_dir, f"weights do not fit the model ({first})") from None


def load_ema(step_dir: Path) -> dict[str, torch.Tensor] | None:
    """The moving average a step folder holds (CPU tensors by parameter name), None when it has none."""
    path = Path(step_dir) / EMA_WEIGHTS
    if not path.is_file():
        return None
    try:
        return load_safetensors_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise InputError(path, f"unreadable EMA weights ({str(exc).strip().splitlines()[0]})") from None


@torch.no_grad()
def apply_ema(model: nn.Module, ema: dict[str, torch.Tensor], where: Path) -> None:
    """Overwrite ``model``'s floating-point parameters with their averages (buffers stay the model's)."""
    for name, param in model.named_parameters():
        if not param.is_floating_point():
            continue
        if name not in ema or ema[name].shape != param.shape:
            raise InputError(where, f"EMA weights do not fit the model (parameter {name})")
        param.copy_(ema[name])


def read_meta(step_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((Path(step_dir) / META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(Path(step_dir) / META, f"unreadable checkpoint metadata ({exc})") from None


# ---------------------------------------------------------------------------------------------
# Model registry


@dataclass(frozen=True)
class ModelEntry:
    config_cls: type
    model_cls: type  # called as model_cls(config)


_REGISTRY: dict[str, ModelEntry] = {}


def register_model(kind: str, config_cls: type, model_cls: type) -> None:
    """Declare how to rebuild checkpoints of ``kind`` (called by each training task module)."""
    _REGISTRY[kind] = ModelEntry(config_cls, model_cls)


def _lookup(kind: str) -> ModelEntry:
    failed: list[str] = []
    if kind not in _REGISTRY:
        # Tasks register their models on import; import them all once before giving up.
        from meshforge.train import tasks

        for info in pkgutil.iter_modules(tasks.__path__):
            try:
                importlib.import_module(f"{tasks.__name__}.{info.name}")
            except ImportError as exc:
                failed.append(f"{info.name}: {exc}")
    if kind not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        broken = f"; tasks that failed to import: {'; '.join(failed)}" if failed else ""
        raise MeshforgeError(f"unknown model kind {kind!r} (known: {known}){broken}")
    return _REGISTRY[kind]


def load_model(
    path: Path, device: torch.device | str = "cpu", ema: bool = True
) -> tuple[str, nn.Module, dict[str, Any]]:
    """(kind, model in eval mode on ``device``, meta) from any path :func:`resolve_checkpoint` accepts.

    The weights are the checkpoint's moving average when it has one and ``ema`` is on, else the
    trained weights; ``meta["weights"]`` says which (``"ema"`` or ``"model"``).
    """
    step_dir = resolve_checkpoint(Path(path))
    meta = read_meta(step_dir)
    kind = meta.get("kind")
    if not isinstance(kind, str):
        raise InputError(step_dir / META, "has no model kind")
    entry = _lookup(kind)
    model = entry.model_cls(from_dict(entry.config_cls, meta["model_config"])).to(device)
    load_weights(model, step_dir)
    averages = load_ema(step_dir) if ema else None
    if averages is not None:
        apply_ema(model, averages, step_dir / EMA_WEIGHTS)
    weights = "ema" if averages is not None else "model"
    return kind, model.eval(), {**meta, "path": str(step_dir), "weights": weights}

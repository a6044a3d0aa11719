"""Checkpoints: atomic step folders and a ``latest`` pointer; writing, verifying, finding and reading them.

Layout under a run's output folder::

    checkpoints/
      step_0000500/
        model.safetensors   weights (tied tensors stored once)
        ema.safetensors     the weights' moving average by parameter name (runs with --ema-decay)
        meta.json           {"kind", "model_config", "step", "task", "train_config", "metrics", "files"}
        state.pt            optimizers, RNG states of every rank, data position
      latest                "step_0000500"

A step folder is written under a temporary name and renamed into place, and ``latest`` is
rewritten only afterwards, so a crash at any moment leaves the previous checkpoint intact.
``state.pt`` holds only tensors and plain containers and is loaded with ``weights_only=True``.

``meta.json`` is written last and records the size and content hash of every other file of the
folder (``files``), whatever its name, so a file damaged after the write (a truncating copy, a
full disk on a sync, a bad sector) is detected before anything is loaded: resuming falls back to
the newest intact step folder, and loading for sample/eval fails with one line naming the file.

The model a step folder holds is rebuilt by :func:`meshforge.models.registry.load_model`; what
goes into ``state.pt`` is the trainer's (:mod:`meshforge.train.trainer`).
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file as load_safetensors_file
from safetensors.torch import load_model as load_safetensors_model
from safetensors.torch import save_file as save_safetensors_file
from safetensors.torch import save_model as save_safetensors_model
from torch import nn

from meshforge.errors import InputError, MeshforgeError
from meshforge.io import atomic_path, atomic_write_text, hash_path

CHECKPOINTS = "checkpoints"
LATEST = "latest"
WEIGHTS = "model.safetensors"
EMA_WEIGHTS = "ema.safetensors"
META = "meta.json"
STATE = "state.pt"
FILES = "files"  # meta.json key: {relative path: {"bytes", "hash" (io.hash_path)}} of every other file


def step_name(step: int) -> str:
    return f"step_{step:07d}"


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

    Refuses weights that are not finite: a checkpoint is only ever a good one. A failed write
    (a full disk) raises a one-line :class:`MeshforgeError` and leaves earlier checkpoints as they were.
    """
    tensors = {**model.state_dict(), **{f"ema {name}": t for name, t in (ema or {}).items()}}
    bad = [name for name, p in tensors.items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise MeshforgeError(f"refusing to checkpoint step {step}: non-finite values in {bad[0]}")
    root = Path(out_dir) / CHECKPOINTS
    final = root / step_name(step)
    try:
        with atomic_path(final) as tmp:
            tmp.mkdir()
            # Plain writes are fine inside the temporary folder: it becomes visible in one rename.
            save_safetensors_model(model, str(tmp / WEIGHTS))
            if ema is not None:
                save_safetensors_file({name: t.detach().cpu().contiguous() for name, t in ema.items()},
                                      str(tmp / EMA_WEIGHTS))
            torch.save({**state, "step": step}, tmp / STATE)
            record = {**meta, "step": step, FILES: _file_records(tmp)}
            (tmp / META).write_text(json.dumps(record, indent=2, default=str) + "\n")
        atomic_write_text(root / LATEST, final.name + "\n")
    except OSError as exc:
        raise MeshforgeError(f"could not write checkpoint {final} ({exc}); earlier checkpoints are intact") from exc
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _file_records(step_dir: Path) -> dict[str, dict[str, Any]]:
    # The files are hashed by reading them back right after writing, from the page cache, rather
    # than while writing: safetensors and torch.save write to a path themselves, and hashing their
    # bytes on the way would mean serialising multi-GB models to memory first. SHA-256 (the hash of
    # io.hash_path) runs at ~1 GB/s with the SHA instructions of current CPUs (measured 0.96 GB/s,
    # blake2b 0.60 GB/s, on a shared 2-core machine), so a 2 GB checkpoint costs ~2 s per save and one
    # extra read when verified: small against the minutes between saves and the load itself. The
    # size alone would catch truncation but not a corrupted or overwritten block.
    return {
        p.relative_to(step_dir).as_posix(): {"bytes": p.stat().st_size, "hash": hash_path(p)}
        for p in sorted(step_dir.rglob("*"))
        if p.is_file() and p.name != META
    }


def checkpoint_problem(step_dir: Path) -> str | None:
    """Why the step folder cannot be trusted (a missing, truncated or changed file), or None.

    Checks the size and hash of every file ``meta.json`` recorded. Folders written before files
    were recorded are only checked for their weights and state being present.
    """
    step_dir = Path(step_dir)
    try:
        meta = json.loads((step_dir / META).read_text())
    except FileNotFoundError:
        return f"{META} is missing"
    except (OSError, ValueError) as exc:
        return f"{META} is unreadable ({type(exc).__name__}: {exc})"
    files = meta.get(FILES) if isinstance(meta, dict) else None
    if not isinstance(files, dict):
        missing = [name for name in (WEIGHTS, STATE) if not (step_dir / name).is_file()]
        return f"{missing[0]} is missing" if missing else None
    for name, expected in files.items():
        path = step_dir / name
        if not isinstance(expected, dict) or not {"bytes", "hash"} <= expected.keys():
            return f"{META} has a malformed record of {name}"
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["bytes"]:
            return f"{name} has {size} bytes, {expected['bytes']} were written (truncated or overwritten)"
        if hash_path(path) != expected["hash"]:
            return f"{name} does not match the hash recorded when it was written (corrupted)"
    return None


def verify_checkpoint(step_dir: Path) -> None:
    """Raise a one-line :class:`InputError` when :func:`checkpoint_problem` finds one."""
    problem = checkpoint_problem(step_dir)
    if problem is not None:
        raise InputError(step_dir, f"damaged checkpoint: {problem}")


def resumable_checkpoint(out_dir: Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest intact step folder of a run (None when it has none yet), and the damaged step
    folders newer than it with their problems, for the caller to report and remove.

    Raises a one-line :class:`MeshforgeError` when checkpoints exist but none of them is intact.
    """
    root = Path(out_dir) / CHECKPOINTS
    steps = sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)
    damaged: list[tuple[Path, str]] = []
    for step_dir in steps:
        problem = checkpoint_problem(step_dir)
        if problem is None:
            return step_dir, damaged
        damaged.append((step_dir, problem))
    if damaged:
        detail = "; ".join(f"{d.name}: {problem}" for d, problem in damaged)
        raise MeshforgeError(f"{root}: no intact checkpoint to resume from ({detail}); start afresh without --resume")
    if (root / LATEST).is_file():
        raise MeshforgeError(f"{root / LATEST}: names {(root / LATEST).read_text().strip()}, which is gone; "
                             "start afresh without --resume")
    return None, damaged


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else 'no details'}"


def load_state(step_dir: Path) -> dict[str, Any]:
    """``state.pt`` of a step folder (optimizers, RNG, data position)."""
    path = Path(step_dir) / STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError) as exc:
        # What a damaged file raises when its folder has no recorded hashes to catch it first.
        raise InputError(path, f"unreadable training state ({_first_line(exc)})") from None


def load_weights(model: nn.Module, step_dir: Path) -> None:
    """Load ``model.safetensors`` into ``model`` in place (strict: every tensor must match)."""
    device = next(model.parameters()).device
    path = Path(step_dir) / WEIGHTS
    try:
        load_safetensors_model(model, str(path), device=str(device))
    except RuntimeError as exc:
        # torch's first line only names the model class; the first mismatch is what helps.
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        first = next((line for line in lines[1:] if "mismatch" in line or "key" in line), lines[0])
        raise InputError(step_dir, f"weights do not fit the model ({first.rstrip('.')})") from None
    except (OSError, SafetensorError) as exc:
        raise InputError(path, f"unreadable weights ({_first_line(exc)})") from None


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

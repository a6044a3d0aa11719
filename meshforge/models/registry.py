"""The model registry: how a checkpoint of each kind is rebuilt, sampled and evaluated.

Each model module registers its :class:`ModelSpec` beside the model (``register_model(ModelSpec(
"iflame", IFlameConfig, IFlame, ...))`` at the end of :mod:`meshforge.models.iflame`), as torchtitan
registers its train specs. :func:`load_model` rebuilds the model a step folder holds
(:mod:`meshforge.checkpoints`) from the kind and model config in its ``meta.json``, and, given
``expect``, refuses a checkpoint of another model with one line naming it.

A spec names its sampler (``meshforge sample``) and its evaluator (``meshforge eval``) as
``"module:function"``, imported when asked for: they live above the models (:mod:`meshforge.sample`,
:mod:`meshforge.metrics`), which import this module, and their dependencies may be heavy or absent.
The callers then take what the spec names instead of dispatching on kind strings. Signatures:

- sampler ``(loaded: LoadedModel, cfg: SampleStageConfig, device, seed) -> (meshes, stats, prompts)``
  (see :mod:`meshforge.sample.run`);
- evaluator ``(cfg, device, seed) -> dict`` where ``cfg`` has the fields of ``meshforge eval``
  (``checkpoint``, ``data``, ``split``, ``n``, ``max_faces``, ``batch_size``, ``ema``); the result holds
  each of the spec's ``metrics`` under its name with ``_`` for ``-``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, NamedTuple, TypeVar, overload

import torch
from torch import nn

from meshforge.checkpoints import (
    EMA_WEIGHTS,
    META,
    apply_ema,
    load_ema,
    load_weights,
    read_meta,
    resolve_checkpoint,
    verify_checkpoint,
)
from meshforge.config import from_dict
from meshforge.errors import InputError, MeshforgeError

M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True)
class ModelSpec:
    """A checkpoint kind: its model config and class (``model_cls(config)``), and what uses it."""

    kind: str
    config_cls: type
    model_cls: type[nn.Module]
    sampler: str | None = None  # "module:function" that samples meshes from a loaded model
    evaluator: str | None = None  # "module:function" that scores a checkpoint
    metrics: tuple[str, ...] = ()  # the `meshforge eval --metric` names its evaluator reports

    def build(self, config: Any) -> nn.Module:
        return self.model_cls(config)

    def sample_function(self) -> Callable[..., Any]:
        if self.sampler is None:
            raise MeshforgeError(f"a {self.kind!r} checkpoint does not sample meshes (kinds that do: "
                                 f"{', '.join(s.kind for s in specs() if s.sampler) or 'none'})")
        return _resolve(self.sampler)

    def evaluate_function(self) -> Callable[..., Any]:
        if self.evaluator is None:
            raise MeshforgeError(f"a {self.kind!r} checkpoint has no evaluator")
        return _resolve(self.evaluator)


class LoadedModel(NamedTuple, Generic[M]):
    """What :func:`load_model` returns; unpacks as ``kind, model, meta``."""

    kind: str
    model: M  # in eval mode
    meta: dict[str, Any]  # meta.json, plus "path" (the step folder) and "weights" ("ema" or "model")

    @property
    def spec(self) -> ModelSpec:
        return model_spec(self.kind)


_REGISTRY: dict[str, ModelSpec] = {}
_import_failures: list[str] = []  # "module: error" of model modules that could not be imported
_imported = False


def register_model(spec: ModelSpec) -> ModelSpec:
    """Declare how to rebuild checkpoints of ``spec.kind`` (called by each model module on import)."""
    _REGISTRY[spec.kind] = spec
    return spec


def _import_models() -> None:
    """Models register on import; import every model module once, remembering those that fail."""
    global _imported
    if _imported:
        return
    _imported = True
    from meshforge import models

    for info in pkgutil.iter_modules(models.__path__):
        try:
            importlib.import_module(f"{models.__name__}.{info.name}")
        except ImportError as exc:
            _import_failures.append(f"{info.name}: {exc}")


def specs() -> list[ModelSpec]:
    """Every registered spec, by kind."""
    _import_models()
    return [_REGISTRY[kind] for kind in sorted(_REGISTRY)]


def model_spec(kind: str) -> ModelSpec:
    """The spec of ``kind``; a one-line :class:`MeshforgeError` naming the known kinds otherwise."""
    if kind not in _REGISTRY:
        _import_models()
    if kind not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "none"
        broken = f"; model modules that failed to import: {'; '.join(_import_failures)}" if _import_failures else ""
        raise MeshforgeError(f"unknown model kind {kind!r} (known: {known}){broken}")
    return _REGISTRY[kind]


def spec_for_metric(metric: str) -> ModelSpec | None:
    """The spec whose evaluator reports ``metric`` (None: a metric of samples, not of a checkpoint)."""
    return next((spec for spec in specs() if metric in spec.metrics), None)


def checkpoint_kind(path: Path) -> str:
    """The model kind of the checkpoint at ``path`` (any path :func:`resolve_checkpoint` accepts)."""
    step_dir = resolve_checkpoint(Path(path))
    kind = read_meta(step_dir).get("kind")
    if not isinstance(kind, str):
        raise InputError(step_dir / META, "has no model kind")
    return kind


@overload
def load_model(path: Path, device: torch.device | str = ..., ema: bool = ..., *, expect: type[M]) -> LoadedModel[M]: ...
@overload
def load_model(path: Path, device: torch.device | str = ..., ema: bool = ..., *, expect: None = ...) -> LoadedModel[nn.Module]: ...
def load_model(path: Path, device: torch.device | str = "cpu", ema: bool = True, *,
               expect: type[nn.Module] | None = None) -> LoadedModel[Any]:
    """The model (in eval mode on ``device``) of any path :func:`resolve_checkpoint` accepts.

    The weights are the checkpoint's moving average when it has one and ``ema`` is on, else the
    trained weights; ``meta["weights"]`` says which (``"ema"`` or ``"model"``). With ``expect`` (a
    model class), a checkpoint of another model is refused before its weights are read.
    """
    step_dir = resolve_checkpoint(Path(path))
    verify_checkpoint(step_dir)
    meta = read_meta(step_dir)
    kind = meta.get("kind")
    if not isinstance(kind, str):
        raise InputError(step_dir / META, "has no model kind")
    spec = model_spec(kind)
    if expect is not None and not issubclass(spec.model_cls, expect):
        wanted = next((s.kind for s in specs() if issubclass(s.model_cls, expect)), expect.__name__)
        raise InputError(path, f"is a {kind!r} checkpoint; expected {wanted!r}")
    model = spec.build(from_dict(spec.config_cls, meta["model_config"])).to(device)
    load_weights(model, step_dir)
    averages = load_ema(step_dir) if ema else None
    if averages is not None:
        apply_ema(model, averages, step_dir / EMA_WEIGHTS)
    weights = "ema" if averages is not None else "model"
    return LoadedModel(kind, model.eval(), {**meta, "path": str(step_dir), "weights": weights})


def _resolve(target: str) -> Callable[..., Any]:
    module, _, name = target.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as exc:
        raise MeshforgeError(f"{target} is not available ({exc})") from None

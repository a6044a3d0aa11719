"""The stage plugin protocol and its registry.

A stage is one step of a meshforge run (``tokenize``, ``train-iflame``, ...). Packages declare
stages under the ``meshforge.stages`` entry-point group; each entry point names a :class:`Stage`.
The CLI turns a stage's config dataclass into command-line options, and the recipe runner
(:mod:`meshforge.runs`) chains stages from YAML. Stages are thin: they call the library.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

ENTRY_POINT_GROUP = "meshforge.stages"


@dataclass
class RunContext:
    """What every stage gets besides its own config: global options shared by all stages.

    ``device`` is the option as given (recorded, and passed on to data-parallel workers);
    :attr:`torch_device` is the device it resolves to, resolved once, when a stage first asks:
    stages that run no model never fail on a ``--device cuda`` without CUDA.
    """

    device: str = "auto"  # "cpu", "cuda" or "auto"
    seed: int = 0
    verbose: int = 0

    @functools.cached_property
    def torch_device(self) -> torch.device:
        from meshforge.runtime import resolve_device

        return resolve_device(self.device)


@dataclass(frozen=True)
class Stage:
    """A CLI/recipe stage: a config dataclass and a function that runs it.

    ``positional`` fields become positional CLI arguments, ``inputs`` are path fields whose
    content is hashed into the manifest (a change re-runs the stage), ``outputs`` are path fields
    the stage writes. ``run`` returns a JSON-able summary that goes into the manifest. Each option's
    help is its config field's ``field(metadata={"help": ...})``.
    """

    name: str
    help: str
    config: type
    run: Callable[[Any, RunContext], dict[str, Any] | None]
    positional: tuple[str, ...] = ()
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    # Fields the CLI fills from the workspace convention (:mod:`meshforge.workspace`) when the user
    # leaves them out, in this order; each function gets the options known so far.
    workspace: dict[str, Callable[[dict[str, Any]], Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = {f.name for f in dataclasses.fields(self.config)}
        for group in (self.positional, self.inputs, self.outputs, tuple(self.workspace)):
            for name in group:
                if name not in names:
                    raise ValueError(f"stage {self.name}: {name!r} is not a field of {self.config.__name__}")

    def output_paths(self, cfg: Any) -> list[Path]:
        return [Path(getattr(cfg, name)) for name in self.outputs if getattr(cfg, name) is not None]

    def input_paths(self, cfg: Any) -> list[Path]:
        return [Path(getattr(cfg, name)) for name in self.inputs if getattr(cfg, name) is not None]


CONTEXT_FIELDS = ("device", "seed")


def with_context_defaults(stage: Stage, options: dict[str, Any], ctx: RunContext) -> dict[str, Any]:
    """Config fields named like a global option (``device``, ``seed``) default to the run's value."""
    names = {f.name for f in dataclasses.fields(stage.config)}
    merged = dict(options)
    for name in CONTEXT_FIELDS:
        if name in names and merged.get(name) is None:
            merged[name] = getattr(ctx, name)
    return merged


@dataclass
class LoadedStages:
    stages: dict[str, Stage]
    failures: dict[str, str]  # entry-point name -> error, for plugins that failed to import


def discover_stages() -> LoadedStages:
    """Load every stage declared under the entry-point group; a broken plugin never hides the rest."""
    stages: dict[str, Stage] = {}
    failures: dict[str, str] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            stage = ep.load()
            if not isinstance(stage, Stage):
                raise TypeError(f"{ep.value} is a {type(stage).__name__}, not a meshforge Stage")
        except KeyboardInterrupt:
            raise
        except SystemExit as exc:  # a plugin calling sys.exit at import must not end the whole CLI
            failures[ep.name] = f"called sys.exit({exc.code!r}) at import"
            continue
        except BaseException as exc:  # noqa: BLE001 - any import-time failure of a third-party plugin
            failures[ep.name] = f"{type(exc).__name__}: {exc}"
            continue
        if stage.name != ep.name:
            failures[ep.name] = f"entry point name differs from stage name {stage.name!r}"
            continue
        stages.setdefault(stage.name, stage)
    return LoadedStages(stages=dict(sorted(stages.items())), failures=failures)


def save_stage_record(stage: Stage, cfg: Any, ctx: RunContext) -> None:
    """Save the resolved config beside every output: ``DIR/meshforge-stage.yaml`` or ``FILE.stage.yaml``."""
    import yaml

    from meshforge.config import to_dict
    from meshforge.io import atomic_write_text

    record = yaml.safe_dump(
        {"stage": stage.name, "config": to_dict(cfg), "device": ctx.device, "seed": ctx.seed}, sort_keys=False
    )
    for path in stage.output_paths(cfg):
        if path.is_dir():
            atomic_write_text(path / "meshforge-stage.yaml", record)
        elif path.exists():
            atomic_write_text(path.with_name(path.name + ".stage.yaml"), record)

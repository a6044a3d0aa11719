"""Recipe runs: chains of stages from YAML, validated up front, recorded, skipped when unchanged.

A recipe is a YAML file::

    seed: 0
    device: auto
    steps:
      - stage: synth
        out: data/synth          # output paths are relative to the run directory
        n: 240
      - stage: tokenize
        input: ${synth.out}      # ${STEP_ID.FIELD} is a resolved field of an earlier step
        out: data/tokens

Each step's ``id`` defaults to its stage name. ``meshforge run RECIPE --out RUN_DIR`` validates the
whole recipe (stages, option names and types, references, inputs) before anything runs, then runs
the steps in order. ``RUN_DIR/manifests/ID.json`` records each step: config hash, input hashes,
package versions, git commit, seed, wall time and outputs. A step whose config and inputs are
unchanged and whose outputs are still there is skipped; a failed step leaves earlier outputs intact
and is retried (training stages resume from their checkpoint) by running the recipe again.

Built-in recipes (``quickstart``, ...) live in the repository's ``recipes/`` folder and are installed
with the package (``meshforge.recipes``), so ``meshforge run quickstart`` works in any install.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import platform
import re
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import yaml

from meshforge.config import ConfigError, config_hash, from_dict, parse_override, to_dict
from meshforge.errors import MeshforgeError
from meshforge.io import atomic_write_json, atomic_write_text, hash_path
from meshforge.runtime import console
from meshforge.stages import RunContext, Stage, discover_stages, save_stage_record, with_context_defaults

REFERENCE = re.compile(r"\$\{([A-Za-z0-9_-]+)\.([A-Za-z0-9_]+)\}")
LOCK_FILE = "run.lock"
RECIPE_KEYS = {"seed", "device", "steps", "name", "description"}
RECIPE_SUFFIX = ".yaml"


@dataclass
class Step:
    id: str
    stage: Stage
    options: dict[str, Any]  # raw options, references unresolved
    line: int
    option_lines: dict[str, int] = field(default_factory=dict)
    overridden: dict[str, str] = field(default_factory=dict)  # option -> the --set text that set it
    config: Any = None  # the resolved, typed config


@dataclass
class Recipe:
    path: Path
    seed: int
    device: str
    steps: list[Step]


def builtin_recipes() -> dict[str, Path]:
    """The built-in recipes by name (file stem), sorted.

    A wheel installs them as package data beside the package (``meshforge/recipes``); in a checkout
    (editable install) they are the repository's top-level ``recipes/`` folder.
    """
    package = Path(__file__).resolve().parent
    for folder in (package / "recipes", package.parent / "recipes"):
        if folder.is_dir():
            return {p.stem: p for p in sorted(folder.glob(f"*{RECIPE_SUFFIX}"))}
    return {}


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A recipe file: ``name_or_path`` itself when it exists, else the built-in recipe of that name
    (``quickstart`` or ``quickstart.yaml``; a path with folders in it is never taken for a name)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    builtin = builtin_recipes()
    name = path.name.removesuffix(RECIPE_SUFFIX)
    if path.parent == Path(".") and name in builtin:
        return builtin[name]
    known = ", ".join(builtin) or "none installed"
    problem = "is a folder, not a recipe file" if path.is_dir() else "no such recipe file"
    raise ConfigError(f"{path}: {problem} (built-in recipes, run by name: {known})")


def recipe_description(path: Path) -> str:
    """A recipe's ``description`` key, or "" when it has none or cannot be read."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return ""
    return str(data.get("description", "")) if isinstance(data, dict) else ""


def _node_lines(path: Path, text: str) -> list[tuple[int, dict[str, int]]]:
    """Line numbers of each step and of each of its keys, for error messages."""
    root = yaml.compose(text)
    lines: list[tuple[int, dict[str, int]]] = []
    if not isinstance(root, yaml.MappingNode):
        return lines
    for key_node, value_node in root.value:
        if key_node.value == "steps" and isinstance(value_node, yaml.SequenceNode):
            for item in value_node.value:
                keys = {}
                if isinstance(item, yaml.MappingNode):
                    keys = {k.value: k.start_mark.line + 1 for k, _ in item.value}
                lines.append((item.start_mark.line + 1, keys))
    return lines


def load_recipe(path: Path, overrides: list[str] | None = None, stages: dict[str, Stage] | None = None) -> Recipe:
    """Parse and validate a recipe; every error names the file, the line and the key."""
    path = Path(path)
    try:
        text = path.read_text()
        data = yaml.safe_load(text)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such recipe") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict) or not isinstance(data.get("steps"), list) or not data["steps"]:
        raise ConfigError(f"{path}: a recipe is a mapping with a non-empty 'steps' list")
    unknown = sorted(set(data) - RECIPE_KEYS)
    if unknown:
        raise ConfigError(f"{path}: unknown top-level key '{unknown[0]}' (known: {', '.join(sorted(RECIPE_KEYS))})")
    if stages is None:
        stages = discover_stages().stages
    lines = _node_lines(path, text)

    steps: list[Step] = []
    for i, raw in enumerate(data["steps"]):
        line, key_lines = lines[i] if i < len(lines) else (0, {})
        where = f"{path}:{line}"
        if not isinstance(raw, dict) or "stage" not in raw:
            raise ConfigError(f"{where}: each step is a mapping with a 'stage' key")
        options = dict(raw)
        name = options.pop("stage")
        step_id = str(options.pop("id", name))
        if name not in stages:
            raise ConfigError(f"{where}: unknown stage '{name}' (known: {', '.join(stages)})")
        if any(s.id == step_id for s in steps):
            raise ConfigError(f"{where}: duplicate step id '{step_id}' (give the step an explicit 'id')")
        steps.append(Step(step_id, stages[name], options, line, key_lines))

    by_id = {s.id: s for s in steps}
    for text_override in overrides or []:
        keys, value = parse_override(text_override)
        if len(keys) < 2 or keys[0] not in by_id:
            raise ConfigError(f"--set {text_override}: expected STEP_ID.OPTION=VALUE with a step id of {list(by_id)}")
        step = by_id[keys[0]]
        step.overridden[keys[1]] = text_override
        target = step.options
        for k in keys[1:-1]:
            target = target.setdefault(k, {})
        target[keys[-1]] = value

    return Recipe(path=path, seed=int(data.get("seed", 0)), device=str(data.get("device", "auto")), steps=steps)


def _resolve_references(value: Any, done: dict[str, Step], where: str) -> Any:
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            step_id, field_name = match.groups()
            if step_id not in done:
                raise ConfigError(f"{where}: ${{{step_id}.{field_name}}} refers to no earlier step")
            cfg = done[step_id].config
            if not hasattr(cfg, field_name):
                raise ConfigError(f"{where}: step '{step_id}' has no option '{field_name}'")
            return str(getattr(cfg, field_name))

        return REFERENCE.sub(substitute, value)
    if isinstance(value, list):
        return [_resolve_references(v, done, where) for v in value]
    if isinstance(value, dict):
        return {k: _resolve_references(v, done, where) for k, v in value.items()}
    return value


def _key_named(message: str, options: dict[str, Any]) -> str:
    """The option a config error is about: its ``key:`` prefix, or else (a range check of
    ``__post_init__``, prefixed by the class name) the first option the message names."""
    head = message.split(":", 1)[0].split(".")[0].split("[")[0]
    if head in options:
        return head
    named = [(m.start(), key) for key in options if (m := re.search(rf"\b{re.escape(key)}\b", message))]
    return min(named)[1] if named else head


def resolve(recipe: Recipe, run_dir: Path, device: str | None = None) -> None:
    """Type every step's config, resolve references and paths, and check every input exists."""
    done: dict[str, Step] = {}
    produced: list[Path] = []
    for step in recipe.steps:
        options = {}
        for key, value in step.options.items():
            where = f"{recipe.path}:{step.option_lines.get(key, step.line)}: {step.id}.{key}"
            options[key] = _resolve_references(value, done, where)
        for name in step.stage.outputs:
            if name in options and not Path(str(options[name])).is_absolute():
                options[name] = str(run_dir / str(options[name]))
            elif name not in options:
                options[name] = str(run_dir / step.id)
        ctx = RunContext(device=device or recipe.device, seed=recipe.seed)
        try:
            step.config = from_dict(step.stage.config, with_context_defaults(step.stage, options, ctx))
        except ConfigError as exc:
            key = _key_named(str(exc), options)
            # "step.key: problem", or for a range check "step: ClassName: problem" -> "step: problem"
            what = f"{step.id}.{exc}" if str(exc).startswith(key) else f"{step.id}: {str(exc).split(': ', 1)[-1]}"
            if key in step.overridden:
                raise ConfigError(f"--set {step.overridden[key]}: {what}") from None
            line = step.option_lines.get(key, step.line)
            raise ConfigError(f"{recipe.path}:{line}: {what}") from None
        for name in step.stage.inputs:
            value = getattr(step.config, name)
            if value is None:
                continue
            p = Path(value).resolve()
            if not p.exists() and not any(p == q or q in p.parents for q in produced):
                line = step.option_lines.get(name, step.line)
                raise ConfigError(f"{recipe.path}:{line}: {step.id}.{name}: input {value} does not exist")
        produced.extend(p.resolve() for p in step.stage.output_paths(step.config))
        done[step.id] = step


def environment_record() -> dict[str, Any]:
    versions = {"python": platform.python_version()}
    for pkg in ("meshforge", "torch", "numpy", "triton", "spconv-cu121", "fla-core", "trimesh"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    commit = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, check=False,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    return {"versions": versions, "git_commit": commit, "host": platform.node()}


def _input_hashes(stage: Stage, cfg: Any) -> dict[str, str]:
    return {str(p): hash_path(p) for p in stage.input_paths(cfg) if p.exists()}


def _manifest_path(run_dir: Path, step: Step) -> Path:
    return run_dir / "manifests" / f"{step.id}.json"


def _up_to_date(manifest: dict[str, Any], cfg_hash: str, inputs: dict[str, str], stage: Stage, cfg: Any) -> bool:
    return (
        manifest.get("status") == "done"
        and manifest.get("config_hash") == cfg_hash
        and manifest.get("inputs") == inputs
        and all(p.exists() for p in stage.output_paths(cfg))
    )


def run_recipe(recipe: Recipe, run_dir: Path, force: bool = False, device: str | None = None) -> list[dict[str, Any]]:
    """Run every step of a validated recipe in ``run_dir``; returns one summary row per step."""
    run_dir = Path(run_dir).resolve()
    ctx_device = device or recipe.device
    resolve(recipe, run_dir, ctx_device)
    with run_lock(run_dir):
        return _run_steps(recipe, run_dir, force, ctx_device)


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One ``meshforge run`` per run folder at a time: a second fails at once, naming the holder.

    An ``flock`` on ``RUN_DIR/run.lock``: the kernel releases it when its process ends, however it
    ends, so a lock left by a dead run is simply taken over. The file (only the holder's pid, for
    the message) is written in place: it is never an output, and the lock, not its content, counts.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise MeshforgeError(
                f"{path}: run folder in use by process {holder} (another `meshforge run`); "
                "wait for it to finish or pass another --out"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _run_steps(recipe: Recipe, run_dir: Path, force: bool, ctx_device: str) -> list[dict[str, Any]]:
    resolved = {
        "recipe": str(recipe.path),
        "seed": recipe.seed,
        "device": ctx_device,
        "steps": [{"id": s.id, "stage": s.stage.name, "config": to_dict(s.config)} for s in recipe.steps],
    }
    atomic_write_text(run_dir / "resolved.yaml", yaml.safe_dump(resolved, sort_keys=False))
    env = environment_record()
    rows = []
    for step in recipe.steps:
        ctx = RunContext(device=ctx_device, seed=recipe.seed)
        cfg = step.config
        mpath = _manifest_path(run_dir, step)
        previous = json.loads(mpath.read_text()) if mpath.exists() else {}
        # The seed and device shape every output, so they are part of what must be unchanged.
        cfg_hash = config_hash({"config": to_dict(cfg), "seed": recipe.seed, "device": ctx_device})
        inputs = _input_hashes(step.stage, cfg)
        if not force and _up_to_date(previous, cfg_hash, inputs, step.stage, cfg):
            console.print(f"[dim]skip[/dim] {step.id} (config and inputs unchanged)")
            rows.append({"id": step.id, "status": "skipped", "wall_time_s": previous.get("wall_time_s")})
            continue
        if previous.get("status") in ("failed", "running") and any(
            f.name == "resume" for f in dataclasses.fields(cfg)
        ):
            # An interrupted training step picks up from its last checkpoint.
            cfg = dataclasses.replace(cfg, resume=True)
        console.print(f"[bold]run[/bold] {step.id} ({step.stage.name})")
        manifest = {
            "id": step.id,
            "stage": step.stage.name,
            "config": to_dict(cfg),
            "config_hash": cfg_hash,
            "inputs": inputs,
            "seed": recipe.seed,
            "device": ctx_device,
            **env,
            "status": "running",
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        atomic_write_json(mpath, manifest)
        start = time.perf_counter()
        try:
            summary = step.stage.run(cfg, ctx) or {}
        except BaseException as exc:
            manifest.update(status="failed", error=f"{type(exc).__name__}: {exc}",
                            wall_time_s=round(time.perf_counter() - start, 3))
            atomic_write_json(mpath, manifest)
            if isinstance(exc, MeshforgeError):
                raise MeshforgeError(f"step '{step.id}' failed: {exc}") from exc
            raise
        save_stage_record(step.stage, cfg, ctx)
        manifest.update(
            status="done",
            wall_time_s=round(time.perf_counter() - start, 3),
            outputs={str(p): hash_path(p) for p in step.stage.output_paths(cfg) if p.exists()},
            summary=summary,
        )
        atomic_write_json(mpath, manifest)
        rows.append({"id": step.id, "status": "done", "wall_time_s": manifest["wall_time_s"]})
    return rows

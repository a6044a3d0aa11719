"""The ``meshforge`` command line.

Stages come from the ``meshforge.stages`` entry points: each stage's config dataclass becomes its
options (``max_faces`` -> ``--max-faces``), a ``--config FILE.yaml`` of the same options and
``--set key.sub=value`` for nested fields. Global options: ``--device``, ``--seed``, ``-v``.
Errors print as one line; ``-v`` adds the traceback.
"""

from __future__ import annotations

import dataclasses
import inspect
import sys
import types
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import typer
from rich.markup import escape
from rich.table import Table

from meshforge.config import field_help, field_types, from_dict, load_stage_yaml, parse_override, set_path
from meshforge.errors import ConfigError, MeshforgeError
from meshforge.runtime import console
from meshforge.stages import RunContext, Stage, discover_stages, save_stage_record, with_context_defaults


def global_options(
    ctx: typer.Context,
    device: str = typer.Option("auto", "--device", help="cpu, cuda or auto (CUDA when available)."),
    seed: int = typer.Option(0, "--seed", help="Seed for every random choice of the run."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More output; tracebacks on errors."),
) -> None:
    ctx.obj = RunContext(device=device, seed=seed, verbose=verbose)


def _cli_type(tp: Any) -> Any:
    """The type Typer parses; the config loader does the real validation afterwards."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        return _cli_type(inner[0]) if len(inner) == 1 else str
    if origin is Literal or origin in (list, tuple):
        return str
    if tp in (int, float, bool, str, Path):
        return tp
    return str


def _describe(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(str(a) for a in get_args(tp))
    if get_origin(tp) in (list, tuple):
        return "comma-separated list"
    return ""


def _metavar(tp: Any) -> str:
    """How a value is typed on the command line: ``INT``, ``PATH``, ``A|B``, ``X,Y``."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        inner = [a for a in get_args(tp) if a is not type(None)]
        return _metavar(inner[0]) if len(inner) == 1 else "TEXT"
    if origin is Literal:
        return "|".join(str(a) for a in get_args(tp))
    if origin in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis]
        item = _metavar(args[0]) if args else "TEXT"
        return ",".join([item] * len(args)) if origin is tuple and Ellipsis not in get_args(tp) else f"{item},..."
    return {int: "INT", float: "FLOAT", str: "TEXT", Path: "PATH", bool: ""}.get(tp, "TEXT")


def _show(value: Any) -> str:
    """A default as the user would type it (``obj``, ``0.9,0.95``, ``cuda``)."""
    if isinstance(value, (list, tuple)):
        return ",".join(_show(v) for v in value)
    if isinstance(value, bool):
        return "on" if value else "off"
    return "none" if value is None else str(value)


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _ordered_fields(stage: Stage) -> list[dataclasses.Field]:
    """Positional, then what the user must or usually gives (inputs, outputs, in the order the stage
    names them, then other required fields), then tuning knobs: not the order of the fields, which
    puts a config's inherited fields (the trainer's, the samplers') before its own."""
    named = [*stage.positional, *stage.inputs, *stage.outputs]

    def rank(f: dataclasses.Field) -> tuple[int, int]:
        if f.name in named:
            return 0, named.index(f.name)
        return (1 if _default(f) is dataclasses.MISSING or f.name in stage.workspace else 2), 0

    return sorted(dataclasses.fields(stage.config), key=rank)


def _config_reference(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(name, type, default, help) of every field of ``cls``, nested sections flattened as ``section.key``."""
    rows = []
    types_ = field_types(cls)
    for f in dataclasses.fields(cls):
        tp, name = types_[f.name], prefix + f.name
        if dataclasses.is_dataclass(tp):
            rows += _config_reference(tp, prefix=f"{name}.")
            continue
        default = _default(f)
        shown = "(required)" if default is dataclasses.MISSING else _show(default)
        rows.append((name, _metavar(tp) or "on|off", shown, field_help(cls, f.name) or _describe(tp)))
    return rows


def _help_config_option(stage: Stage) -> inspect.Parameter:
    def show(value: bool) -> None:
        if not value:
            return
        rows = [("option", "type", "default", "help"), *_config_reference(stage.config)]
        widths = [max(len(row[i]) for row in rows) for i in range(3)]
        typer.echo(f"{stage.name}: every option, as --NAME (top level), --set NAME=VALUE or a --config mapping\n")
        for row in rows:
            typer.echo("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])
        raise typer.Exit(0)

    return inspect.Parameter(
        "help_config", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
        default=typer.Option(False, "--help-config", is_eager=True, callback=show,
                             help="List every option, nested model fields included, with type and default."))


def _parameters(stage: Stage) -> list[inspect.Parameter]:
    params = []
    own = {f.name for f in dataclasses.fields(stage.config)}
    types_ = field_types(stage.config)
    for f in _ordered_fields(stage):
        tp = types_[f.name]
        if dataclasses.is_dataclass(tp):
            continue  # nested sections: --config or --set section.key=value (listed by --help-config)
        default = _default(f)
        if f.name in stage.workspace:
            note = ""  # its help says where the workspace default comes from
        elif default is dataclasses.MISSING:
            note = "[required]"
        elif default is None or default == "":
            note = ""
        else:
            note = f"[default: {_show(default)}]"
        help_text = " ".join(x for x in (field_help(stage.config, f.name), _describe(tp), note) if x)
        if f.name in stage.positional:
            param_default = typer.Argument(None, help=help_text, show_default=False, metavar=f.name.upper())
        else:
            names = [f"--{f.name.replace('_', '-')}", *f.metadata.get("cli", ())]
            if _cli_type(tp) is bool:
                names = [f"{names[0]}/--no-{f.name.replace('_', '-')}"]
            param_default = typer.Option(None, *names, help=help_text, show_default=False,
                                         metavar=_metavar(tp) or None)
        params.append(
            inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=param_default,
                              annotation=Optional[_cli_type(tp)])
        )
    params += [
        inspect.Parameter("config_file", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[Path],
                          default=typer.Option(None, "--config", metavar="FILE.yaml",
                                               help="YAML file of this stage's options (a training run's config.yaml too).")),
        inspect.Parameter("overrides", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[list[str]],
                          default=typer.Option(None, "--set", metavar="KEY=VALUE",
                                               help="Override any option, nested keys with dots (model.dim=256).")),
        _help_config_option(stage),
        inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, annotation=int,
                          default=typer.Option(0, "--verbose", "-v", count=True, show_default=False,
                                               help="More output; tracebacks.")),
    ]
    # A stage whose config has its own `device`/`seed` field uses that as the option.
    if "device" not in own:
        params.append(inspect.Parameter(
            "device", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
            default=typer.Option(None, "--device", metavar="cpu|cuda|auto",
                                 help="Overrides the global --device.")))
    if "seed" not in own:
        params.append(inspect.Parameter(
            "seed", inspect.Parameter.KEYWORD_ONLY, annotation=Optional[int],
            default=typer.Option(None, "--seed", metavar="INT", help="Overrides the global --seed.")))
    return params


def build_config(
    stage: Stage, given: dict[str, Any], config_file: Path | None, overrides: list[str], ctx: RunContext
) -> Any:
    """Defaults < global --device/--seed < --config file < options on the command line < --set;
    paths still missing then come from the workspace convention (``stage.workspace``)."""
    data = load_stage_yaml(config_file) if config_file else {}
    for name, value in given.items():
        if value is not None:
            data[name] = value
    for text in overrides:
        keys, value = parse_override(text)
        set_path(data, keys, value)
    for name in stage.positional:
        if data.get(name) is None:
            raise ConfigError(f"missing argument {name.upper()} (see meshforge {stage.name} --help)")
    for name, pick in stage.workspace.items():
        if data.get(name) is None:
            data[name] = pick(data)
            if data[name] is not None:
                console.print(f"{stage.name}: --{name.replace('_', '-')} {data[name]} (workspace default)", highlight=False)
    return from_dict(stage.config, with_context_defaults(stage, data, ctx))


def _make_command(stage: Stage):
    def command(ctx: typer.Context, **kwargs: Any) -> None:
        parent: RunContext = ctx.obj or RunContext()
        device, seed = kwargs.get("device"), kwargs.get("seed")
        if not any(f.name == "device" for f in dataclasses.fields(stage.config)):
            kwargs.pop("device")
        if not any(f.name == "seed" for f in dataclasses.fields(stage.config)):
            kwargs.pop("seed")
        run_ctx = RunContext(
            device=device or parent.device,
            seed=parent.seed if seed is None else seed,
            verbose=max(kwargs.pop("verbose"), parent.verbose),
        )
        kwargs.pop("help_config")
        config_file, overrides = kwargs.pop("config_file"), kwargs.pop("overrides") or []
        cfg = build_config(stage, kwargs, config_file, overrides, run_ctx)
        summary = stage.run(cfg, run_ctx)
        save_stage_record(stage, cfg, run_ctx)
        if summary and run_ctx.verbose:
            console.print(summary)

    ctx_param = inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)
    command.__signature__ = inspect.Signature([ctx_param, *_parameters(stage)])  # type: ignore[attr-defined]
    command.__doc__ = stage.help
    command.__name__ = stage.name.replace("-", "_")
    return command


def run_command(
    ctx: typer.Context,
    recipe: str = typer.Argument(..., help="Recipe YAML file, or a built-in recipe's name (meshforge recipes)."),
    out: Path = typer.Option(..., "--out", help="Run directory (outputs, manifests, resolved config)."),
    overrides: list[str] | None = typer.Option(None, "--set", help="STEP_ID.OPTION=VALUE override."),
    force: bool = typer.Option(False, "--force", help="Redo steps even when config and inputs are unchanged."),
) -> None:
    from meshforge.runs import load_recipe, resolve_recipe, run_recipe

    parent: RunContext = ctx.obj or RunContext()
    loaded = load_recipe(resolve_recipe(recipe), overrides or [])
    device = parent.device if parent.device != "auto" else None
    rows = run_recipe(loaded, out, force=force, device=device)
    table = Table(title=f"run {out}")
    for column in ("step", "status", "seconds"):
        table.add_column(column)
    for row in rows:
        table.add_row(row["id"], row["status"], f"{row['wall_time_s'] or 0:.1f}")
    console.print(table)


def recipes_command() -> None:
    from meshforge.runs import builtin_recipes, recipe_description

    table = Table()
    table.add_column("recipe")
    table.add_column("description")
    for name, path in builtin_recipes().items():
        table.add_row(name, recipe_description(path))
    console.print(table)


def stages_command() -> None:
    loaded = discover_stages()
    table = Table()
    table.add_column("stage")
    table.add_column("description")
    for name, stage in loaded.stages.items():
        table.add_row(name, stage.help.splitlines()[0])
    console.print(table)
    for name, error in loaded.failures.items():
        console.print(f"[red]failed[/red] {name}: {error}")


_VERBOSE = [False]


def _error(message: str) -> None:
    """One line on stderr, however long (a wrapped message would read as several errors)."""
    console.print(f"[red]error:[/red] {escape(message)}", highlight=False, soft_wrap=True)


def build_app() -> typer.Typer:
    """A fresh app with the built-in commands and every stage found through entry points."""
    app = typer.Typer(
        name="meshforge",
        help="Fast, reproducible 3D mesh generation: iFlame and Direct3D-S2, train and sample.",
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )
    app.callback()(global_options)
    app.command("run", help="Run a recipe: a YAML chain of stages, validated first, resumable, recorded.")(
        run_command
    )
    app.command("stages", help="List the installed stages and any plugin that failed to load.")(stages_command)
    app.command("recipes", help="List the built-in recipes (meshforge run NAME --out DIR runs one).")(recipes_command)
    loaded = discover_stages()
    for name, error in loaded.failures.items():
        console.print(f"[yellow]warning:[/yellow] plugin stage '{name}' failed to load ({error}); other stages work")
    for stage in loaded.stages.values():
        app.command(stage.name, help=stage.help, short_help=stage.help.splitlines()[0])(_make_command(stage))
    return app


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv) or ["--help"]  # bare `meshforge`: the overview
    _VERBOSE[0] = any(a in ("-v", "--verbose") or (a.startswith("-v") and set(a[1:]) == {"v"}) for a in argv)
    try:
        build_app()(args=argv, prog_name="meshforge", standalone_mode=False)
    except MeshforgeError as exc:
        if _VERBOSE[0]:
            console.print_exception()
        _error(str(exc))
        return 1
    except KeyboardInterrupt:
        console.print("[red]interrupted[/red]")
        return 130
    except typer.Exit as exc:
        return exc.exit_code
    except typer.Abort:
        console.print("[red]aborted[/red]")
        return 1
    except typer.TyperException as exc:  # usage errors: unknown option, bad value, missing argument
        if _VERBOSE[0]:
            console.print_exception()
        command = getattr(getattr(exc, "ctx", None), "command_path", None)
        hint = f" (see {command} --help)" if command else ""
        _error(f"{exc.format_message()}{hint}")
        return getattr(exc, "exit_code", 2)
    except Exception as exc:  # noqa: BLE001 - a bug still ends as one line; -v shows where
        if _VERBOSE[0]:
            console.print_exception()
        _error(f"{type(exc).__name__}: {exc} (run with -v for the traceback)")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())


import sys

import pytest
from meshforge_plugins.cli import main

from tests.plugin_fixture import install_fake_plugin

STAGES = ("tokenize", "sdf-voxelize", "train-vae", "train-dit", "train-iflame", "sample", "eval", "synth")


@pytest.fixture
def fake_plugin(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    install_fake_plugin(root)
    monkeypatch.syspath_prepend(str(root))
    yield root
    sys.modules.pop("mf_echo", None)


def test_help_lists_builtin_and_third_party_stages(fake_plugin, capsys):
    assert main(["--help"]) == 0
    out, err = capsys.readouterr()
    for name in (*STAGES, "echo", "run"):
        assert f" {name} " in out, name
    assert "Copy a text file, shouting." in out
    # The broken plugin is reported once, by name, and does not hide the others.
    assert "plugin stage 'broken' failed to load" in err


def test_stage_options_come_from_the_config(fake_plugin, tmp_path, capsys):
    assert main(["echo", "--help"]) == 0
    out = capsys.readouterr().out
    for option in ("--times", "--mode", "--fail", "--config", "--set", "--device", "--seed"):
        assert option in out
    assert "one of upper, lower" in out and "How often to repeat" in out


def test_stage_runs_with_yaml_cli_and_set_precedence(fake_plugin, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("ab")
    cfg = tmp_path / "echo.yaml"
    cfg.write_text("times: 5\nmode: lower\n")
    out = tmp_path / "out.txt"
    assert main(["--seed", "7", "echo", str(src), "--out", str(out), "--config", str(cfg), "--times", "2"]) == 0
    assert out.read_text() == "abab"  # CLI --times beats the file, the file's mode applies
    assert "stage: echo" in (tmp_path / "out.txt.stage.yaml").read_text()
    assert main(["echo", str(src), "--out", str(out), "--set", "times=3", "--mode", "upper"]) == 0
    assert out.read_text() == "ABABAB"
    import mf_echo

    assert mf_echo.CALLS[0][1].seed == 7


def test_errors_are_one_line(fake_plugin, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("x")
    assert main(["echo", str(src), "--out", str(tmp_path / "o"), "--mode", "shout"]) == 1
    err = capsys.readouterr().err
    assert "error: mode: 'shout' is not one of 'upper', 'lower'" in err
    assert "Traceback" not in err
    assert main(["echo", str(src), "--out", str(tmp_path / "o"), "--fail"]) == 1
    assert "error: asked to fail" in capsys.readouterr().err
    assert main(["echo", str(src), "--out", str(tmp_path / "o"), "--fail", "-v"]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_unknown_device_is_a_clear_error():
    from meshforge.errors import MeshforgeError
    from meshforge.runtime import resolve_device

    with pytest.raises(MeshforgeError, match="unknown device 'tpu'"):
        resolve_device("tpu")


def test_recipes_lists_the_builtin_recipes_and_run_takes_their_names(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["recipes"]) == 0
    listing = capsys.readouterr().err
    assert "quickstart" in listing and "Both models end to end" in listing
    assert main(["run", "no-such-recipe", "--out", str(tmp_path / "run")]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "error: no-such-recipe: no such recipe file" in err and "quickstart" in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["tokenize", "--bogus"], "error: No such option: --bogus"),
        (["synth", "--n", "abc"], "error: Invalid value for '--n'"),
        (["no-such-command"], "error: No such command 'no-such-command'"),
    ],
)
def test_usage_errors_are_one_line_and_nonzero(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert main([*argv, "-v"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_error_handling_needs_no_click(tmp_path):
    """typer 0.29 vendors its click core: the CLI must not import the `click` distribution anywhere."""
    import subprocess

    script = (
        "import sys\n"
        "sys.modules['click'] = None  # any `import click` now raises ImportError\n"
        "from meshforge_plugins.cli import main\n"
        "codes = [main(a) for a in (['tokenize', '--bogus'], ['synth', '--n', 'abc'], ['eval', '--metric', 'x'])]\n"
        "print(codes)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[2, 2, 1]"  # usage errors 2, a config error 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("error: ") for line in lines), done.stderr


def test_a_plugin_that_exits_at_import_leaves_the_cli_working(tmp_path, monkeypatch, capsys):
    from tests.plugin_fixture import install_exiting_plugins

    install_exiting_plugins(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        assert main(["--help"]) == 0
    finally:
        for name in ("mf_exits", "mf_base"):
            sys.modules.pop(name, None)
    out, err = capsys.readouterr()
    assert " tokenize " in out
    assert "plugin stage 'exits' failed to load (called sys.exit(3) at import)" in err


def test_help_puts_paths_first_and_shows_defaults_as_typed(capsys):
    assert main(["train-iflame", "--help"]) == 0
    out = capsys.readouterr().out
    listing = out.split("Options:", 1)[1]
    options = [line.split()[0] for line in listing.splitlines() if line.startswith("  --")]
    assert options[:2] == ["--data", "--out"], options  # before the ~20 trainer knobs
    flat = " ".join(out.split())
    assert "[default: 0.9,0.95]" in flat and "--adam-betas FLOAT,FLOAT" in flat and "--optimizer muon|adamw" in flat
    assert "default: (" not in flat and "<" not in flat and "(required)" not in flat
    assert "--set KEY=VALUE" in flat and "--help-config" in flat
    assert main(["sample", "--help"]) == 0
    assert "[default: obj]" in " ".join(capsys.readouterr().out.split())
    assert main(["tokenize", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "INPUT" in out and "--bits INT" in out


def test_help_config_lists_nested_model_fields():
    from meshforge_plugins.cli import build_app
    from typer.testing import CliRunner

    result = CliRunner().invoke(build_app(), ["train-iflame", "--help-config"])
    assert result.exit_code == 0
    rows = {line.split()[0]: line.split()[1:3] for line in result.output.splitlines()[2:] if line.strip()}
    assert rows["model.dim"] == ["INT", "512"] and rows["model.blocks"] == ["INT,...", "4,4,8,4,4"]
    assert rows["data"] == ["PATH", "(required)"] and rows["adam_betas"] == ["FLOAT,FLOAT", "0.9,0.95"]


def test_a_missing_positional_argument_is_named(capsys):
    assert main(["tokenize"]) == 1
    assert capsys.readouterr().err == "error: missing argument INPUT (see meshforge tokenize --help)\n"


def test_every_builtin_option_has_help_from_its_config_field(capsys):
    """Help lives on the config dataclasses (``field(metadata={"help": ...})``), one source for
    --help, --help-config and the docs; a new option without help fails here."""
    import dataclasses

    from meshforge.config import field_help, field_types
    from meshforge.stages import discover_stages

    stages = discover_stages().stages
    for name in STAGES:
        config = stages[name].config
        types_ = field_types(config)
        for f in dataclasses.fields(config):
            if not dataclasses.is_dataclass(types_[f.name]):  # nested sections are listed per field
                assert field_help(config, f.name), f"{name}: --{f.name} has no help"
    assert main(["sdf-voxelize", "--help"]) == 0
    assert "Grid resolution R (voxels per side)." in " ".join(capsys.readouterr().out.split())
    # A subclass that only changes a default keeps its base class's help.
    assert main(["train-dit", "--help"]) == 0
    assert "Global batch size, split evenly over the --gpus processes. [default: 8]" in " ".join(
        capsys.readouterr().out.split()
    )

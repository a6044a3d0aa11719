import json
import sys
from pathlib import Path

import pytest

from meshforge.errors import ConfigError, MeshforgeError
from meshforge.runs import builtin_recipes, load_recipe, resolve, resolve_recipe, run_recipe
from tests.plugin_fixture import install_fake_plugin

RECIPE = """\
seed: 3
steps:
  - stage: echo
    id: first
    input: {src}
    out: first.txt
    times: 2
  - stage: echo
    id: second
    input: ${{first.out}}
    out: second.txt
    mode: lower
"""


@pytest.fixture
def recipe(tmp_path, monkeypatch):
    root = tmp_path / "site"
    root.mkdir()
    install_fake_plugin(root)
    monkeypatch.syspath_prepend(str(root))
    src = tmp_path / "src.txt"
    src.write_text("Hi")
    path = tmp_path / "r.yaml"
    path.write_text(RECIPE.format(src=src))
    yield path
    sys.modules.pop("mf_echo", None)


def test_run_chains_steps_and_records_manifests(recipe, tmp_path):
    run_dir = tmp_path / "run"
    rows = run_recipe(load_recipe(recipe), run_dir)
    assert [r["status"] for r in rows] == ["done", "done"]
    assert (run_dir / "first.txt").read_text() == "HIHI"
    assert (run_dir / "second.txt").read_text() == "hihi"
    manifest = json.loads((run_dir / "manifests" / "second.json").read_text())
    assert manifest["status"] == "done" and manifest["seed"] == 3
    assert str(run_dir / "first.txt") in manifest["inputs"]
    assert manifest["versions"]["torch"] and len(manifest["config_hash"]) == 16
    assert manifest["summary"]["chars"] == 4
    assert "steps" in (run_dir / "resolved.yaml").read_text()


def test_rerun_skips_unchanged_and_redoes_changed(recipe, tmp_path):
    run_dir = tmp_path / "run"
    run_recipe(load_recipe(recipe), run_dir)
    rows = run_recipe(load_recipe(recipe), run_dir)
    assert [r["status"] for r in rows] == ["skipped", "skipped"]
    rows = run_recipe(load_recipe(recipe, ["second.mode=upper"]), run_dir)
    assert [r["status"] for r in rows] == ["skipped", "done"]
    assert (run_dir / "second.txt").read_text() == "HIHI"
    (tmp_path / "src.txt").write_text("Yo")  # a changed input re-runs its step and what follows
    rows = run_recipe(load_recipe(recipe, ["second.mode=upper"]), run_dir)
    assert [r["status"] for r in rows] == ["done", "done"]
    recipe.write_text(recipe.read_text().replace("seed: 3", "seed: 4"))  # the seed is part of the config
    rows = run_recipe(load_recipe(recipe, ["second.mode=upper"]), run_dir)
    assert [r["status"] for r in rows] == ["done", "done"]
    rows = run_recipe(load_recipe(recipe, ["second.mode=upper"]), run_dir, force=True)
    assert [r["status"] for r in rows] == ["done", "done"]


def test_failed_step_keeps_earlier_outputs_and_resumes(recipe, tmp_path):
    run_dir = tmp_path / "run"
    with pytest.raises(MeshforgeError, match="step 'second' failed: asked to fail"):
        run_recipe(load_recipe(recipe, ["second.fail=true"]), run_dir)
    assert (run_dir / "first.txt").read_text() == "HIHI"
    assert json.loads((run_dir / "manifests" / "second.json").read_text())["status"] == "failed"
    rows = run_recipe(load_recipe(recipe), run_dir)
    assert [r["status"] for r in rows] == ["skipped", "done"]
    # A retried step with a `resume` option resumes instead of starting over.
    assert json.loads((run_dir / "manifests" / "second.json").read_text())["summary"]["resume"] is True


@pytest.mark.parametrize(
    "override, message",
    [
        ("second.tims=2", r"--set second.tims=2: second.tims: unknown option"),
        ("second.times=lots", r"--set second.times=lots: second.times: expected an integer"),
        ("third.times=1", r"--set third.times=1: expected STEP_ID.OPTION=VALUE"),
    ],
)
def test_recipe_validation_names_line_and_key(recipe, tmp_path, override, message):
    with pytest.raises(ConfigError, match=message):
        run_recipe(load_recipe(recipe, [override]), tmp_path / "run")
    assert not (tmp_path / "run" / "first.txt").exists()  # nothing ran


def test_recipe_validation_catches_stage_and_input_errors(recipe, tmp_path):
    text = recipe.read_text()
    recipe.write_text(text.replace("times: 2", "times: two"))
    with pytest.raises(ConfigError, match=r"r.yaml:7: first.times: expected an integer, got 'two'"):
        run_recipe(load_recipe(recipe), tmp_path / "run")
    recipe.write_text(text.replace("stage: echo\n    id: second", "stage: ehco\n    id: second"))
    with pytest.raises(ConfigError, match=r"r.yaml:8: unknown stage 'ehco'"):
        load_recipe(recipe)
    recipe.write_text(text.replace("src.txt", "missing.txt"))
    with pytest.raises(ConfigError, match=r"r.yaml:\d+: first.input: input .*missing.txt does not exist"):
        run_recipe(load_recipe(recipe), tmp_path / "run")
    recipe.write_text(text.replace("${first.out}", "${zeroth.out}"))
    with pytest.raises(ConfigError, match=r"refers to no earlier step"):
        run_recipe(load_recipe(recipe), tmp_path / "run")


SHIPPED_RECIPES = sorted((Path(__file__).resolve().parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", SHIPPED_RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_validate(path, tmp_path):
    # Stages, option names and types, references and inputs: what a run checks before its first step
    # (the GPU recipes are only ever run on a machine this suite never sees).
    recipe = load_recipe(path)
    resolve(recipe, tmp_path, device="cpu")
    assert all(step.config is not None for step in recipe.steps)


def test_builtin_recipes_resolve_by_name(tmp_path, monkeypatch):
    assert builtin_recipes() == {p.stem: p for p in SHIPPED_RECIPES}
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here: names resolve to the built-in files
    assert resolve_recipe("quickstart") == resolve_recipe("quickstart.yaml") == builtin_recipes()["quickstart"]
    # An existing file wins over a built-in of the same name.
    (tmp_path / "quickstart.yaml").write_text("steps: []\n")
    assert resolve_recipe("quickstart.yaml") == Path("quickstart.yaml")
    with pytest.raises(ConfigError, match=r"^nope: no such recipe file \(built-in recipes, run by name: .*quickstart"):
        resolve_recipe("nope")
    # A path with folders is a file the user means, never a name.
    with pytest.raises(ConfigError, match="elsewhere/quickstart.yaml: no such recipe file"):
        resolve_recipe("elsewhere/quickstart.yaml")


def test_a_range_error_names_the_line_of_its_key(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"steps:\n  - stage: tokenize\n    input: {tmp_path}\n    out: tokens\n    bits: 99\n")
    with pytest.raises(ConfigError, match=r"r.yaml:5: tokenize: bits must be in \[2, 14\], got 99"):
        resolve(load_recipe(recipe), tmp_path / "run")


def test_a_second_run_into_the_same_folder_fails_naming_the_lock(recipe, tmp_path):
    import os
    import subprocess

    from meshforge.runs import run_lock

    run_dir = tmp_path / "run"
    held = rf"{run_dir / 'run.lock'}: run folder in use by process {os.getpid()}"
    with run_lock(run_dir), pytest.raises(MeshforgeError, match=held):
        run_recipe(load_recipe(recipe), run_dir)
    assert not (run_dir / "first.txt").exists()
    # A lock whose holder was killed is free again (the kernel dropped it), whatever the file still says.
    script = (f"import os, sys\nfrom pathlib import Path\nsys.path.insert(0, {str(Path(__file__).parents[1])!r})\n"
              f"from meshforge.runs import run_lock\nrun_lock(Path({str(run_dir)!r})).__enter__()\n"
              "os.kill(os.getpid(), 9)\n")
    killed = subprocess.run([sys.executable, "-c", script], check=False)
    assert killed.returncode == -9 and (run_dir / "run.lock").read_text().strip().isdigit()
    rows = run_recipe(load_recipe(recipe), run_dir)
    assert [r["status"] for r in rows] == ["done", "done"]

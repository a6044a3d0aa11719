"""The CPU smoke command a GPU recipe's header documents runs as written (tiny sizes, every stage)."""

import shlex
from pathlib import Path

import pytest
import yaml
from meshforge_plugins.cli import main

RECIPES = Path(__file__).resolve().parents[1] / "recipes"


def smoke_command(recipe: Path) -> list[str] | None:
    """The header's ``meshforge run ...`` command (its continued comment lines joined), as arguments."""
    lines = recipe.read_text().splitlines()
    header = [line[1:].strip() for line in lines[: next(i for i, line in enumerate(lines) if not line.startswith("#"))]]
    start = next((i for i, line in enumerate(header) if line.startswith("meshforge run") and "--set" in line), None)
    if start is None:
        return None
    command = []
    for line in header[start:]:
        command.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    return shlex.split(" ".join(command))


SMOKE = {p.stem: smoke_command(p) for p in sorted(RECIPES.glob("*.yaml")) if smoke_command(p)}


def test_the_gpu_recipes_document_a_cpu_smoke_command():
    assert {"direct3d_gpu", "direct3d_r256"} <= set(SMOKE)


@pytest.mark.parametrize("name", sorted(SMOKE))
def test_the_documented_smoke_command_runs(name, tmp_path, monkeypatch):
    args = SMOKE[name][1:]  # without the program name
    recipe, out = args.index(f"recipes/{name}.yaml"), args.index("--out") + 1
    args[recipe], args[out] = str(RECIPES / f"{name}.yaml"), str(tmp_path / "run")
    monkeypatch.chdir(tmp_path)
    assert main(["--device", "cpu", *args]) == 0
    steps = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())["steps"]
    assert len(list((tmp_path / "run" / "manifests").glob("*.json"))) == len(steps)  # every step ran
    assert (tmp_path / "run" / "samples" / "dit" / "grid.png").is_file()

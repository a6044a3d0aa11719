"""The built wheel holds every module and the built-in recipes (a non-editable install works)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# Source folder -> the name it installs as (pyproject.toml's package-dir).
INSTALLED_AS = {"meshforge": "meshforge", "kernels": "meshforge/kernels", "plugins": "meshforge_plugins"}


def _tree_files(folder: str, pattern: str) -> set[str]:
    root = REPO / folder
    return {
        f"{INSTALLED_AS.get(folder, 'meshforge/' + folder)}/{p.relative_to(root).as_posix()}"
        for p in root.rglob(pattern)
        if "__pycache__" not in p.parts
    }


def test_wheel_holds_every_module_and_the_recipes(tmp_path):
    # Built from a copy: setuptools' build/ folder would otherwise carry modules deleted since
    # an earlier build into the wheel, and parallel runs would share it.
    src = tmp_path / "src"
    for folder in (*INSTALLED_AS, "recipes"):
        shutil.copytree(REPO / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy(REPO / name, src / name)
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
        capture_output=True, text=True, timeout=300, check=False,
    )
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = tmp_path.glob("meshforge-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())

    expected = set().union(*(_tree_files(folder, "*.py") for folder in INSTALLED_AS))
    assert "meshforge/kernels/decode_step/fused.py" in expected
    assert expected - names == set()
    recipes = _tree_files("recipes", "*.yaml")
    assert "meshforge/recipes/quickstart.yaml" in recipes and recipes - names == set()
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "meshforge = meshforge_plugins.cli:main" in text and "tokenize = meshforge_plugins.tokenize:stage" in text

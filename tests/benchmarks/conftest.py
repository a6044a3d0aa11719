"""The benchmark scripts import their neighbours (``iflame_steps``) as top-level modules: a test
imports a script with ``benchmarks/`` on the path, as running it from there would."""

import importlib
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def benchmark_script(monkeypatch):
    def load(name: str):
        monkeypatch.syspath_prepend(str(BENCHMARKS))
        return importlib.import_module(name)

    return load

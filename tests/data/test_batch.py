import os
from pathlib import Path

import pytest

from meshforge.data.batch import failure_reason, resolve_workers, run_batch
from meshforge.errors import InputError


def _square_or_fail(path: Path) -> int:
    n = int(path.stem)
    if n % 5 == 0:
        raise InputError(path, "multiple of five\n(second line)")
    if n % 7 == 0:
        raise ZeroDivisionError("division by zero")
    return n * n


@pytest.mark.parametrize("workers", [1, 2])
def test_order_results_and_skips(workers):
    items = [Path(f"{i}.x") for i in range(1, 40)]
    result = run_batch(items, _square_or_fail, workers=workers, description="test")
    assert [p for p, _ in result.done] == [p for p in items if int(p.stem) % 5 and int(p.stem) % 7]
    assert all(value == int(p.stem) ** 2 for p, value in result.done)
    reasons = {s.path: s.reason for s in result.skipped}
    assert reasons["5.x"] == "multiple of five (second line)"  # InputError: its problem, one line
    assert reasons["7.x"] == "ZeroDivisionError: division by zero"
    assert len(result.done) + len(result.skipped) == len(items)


def test_helpers():
    assert resolve_workers(3) == 3
    assert resolve_workers(0) >= 1
    assert len(failure_reason(ValueError("x" * 1000))) <= 300


def _die_on_three(path: Path) -> str:
    if path.stem == "3":
        os._exit(1)  # a native crash: no exception, the worker process is simply gone
    return path.stem


def test_a_dying_worker_does_not_kill_the_batch():
    items = [Path(f"{i}.x") for i in range(8)]
    result = run_batch(items, _die_on_three, workers=2, description="test")
    assert len(result.done) + len(result.skipped) == len(items)
    assert "3.x" in {s.path for s in result.skipped}
    assert all("worker process died" in s.reason for s in result.skipped)

import errno
import os
from pathlib import Path

import pytest

from meshforge.data.batch import BatchFailed, failure_reason, resolve_workers, run_batch
from meshforge.errors import InputError


def _square_or_skip(path: Path) -> int:
    n = int(path.stem)
    if n % 5 == 0:
        raise InputError(path, "multiple of five\n(second line)")
    return n * n


@pytest.mark.parametrize("workers", [1, 2])
def test_order_results_and_skips(workers):
    items = [Path(f"{i}.x") for i in range(1, 40)]
    result = run_batch(items, _square_or_skip, workers=workers, description="test")
    assert [p for p, _ in result.done] == [p for p in items if int(p.stem) % 5]
    assert all(value == int(p.stem) ** 2 for p, value in result.done)
    reasons = {s.path: s.reason for s in result.skipped}
    assert reasons["5.x"] == "multiple of five (second line)"  # InputError: its problem, one line
    assert len(result.done) + len(result.skipped) == len(items)


def _full_disk_at_seven(path: Path) -> int:
    if path.stem == "7":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"out/{path.stem}.npz")
    return int(path.stem)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_failure_that_is_not_about_the_input_stops_the_batch(workers):
    items = [Path(f"{i}.x") for i in range(1, 40)]
    with pytest.raises(BatchFailed) as caught:
        run_batch(items, _full_disk_at_seven, workers=workers, description="test")
    assert caught.value.path == "7.x" and caught.value.finished == 6
    assert "No space left on device" in str(caught.value) and "\n" not in str(caught.value)


def test_helpers():
    assert resolve_workers(3) == 3
    assert resolve_workers(0) >= 1
    assert len(failure_reason(ValueError("x" * 1000))) <= 300


def _die_on_three(path: Path) -> str:
    if path.stem == "3":
        os._exit(1)  # a native crash: no exception, the worker process is simply gone
    return path.stem


def test_a_dying_worker_fails_the_batch_without_blaming_an_input():
    # Killed for memory or crashed in native code: which item it held is unknown, so no item may
    # be recorded as a bad input.
    items = [Path(f"{i}.x") for i in range(8)]
    with pytest.raises(BatchFailed, match="worker process died") as caught:
        run_batch(items, _die_on_three, workers=2, description="test")
    assert int(Path(caught.value.path).stem) <= 3

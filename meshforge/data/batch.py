"""Run one function over many files on all CPU cores, never dying on one bad file.

Data stages (``tokenize``, ``sdf-voxelize``) map a per-file function over thousands of user files,
some of which are broken. :func:`run_batch` turns an :class:`~meshforge.errors.InputError` raised
for an item (a problem of that file) into a :class:`Skip` with a one-line reason, shows a progress
bar, and returns results in input order whatever the scheduling, so outputs are deterministic.

Any other failure (a full disk while writing an output, a worker killed for memory, a bug) is a
failure of the job, not of the input: recording it as a skip would make a recipe mark the stage
done with meshes missing. The batch stops and raises :class:`BatchFailed`; outputs the items
finished so far wrote stay on disk for the next run to resume from.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Generic, TypeVar

from meshforge.errors import InputError, MeshforgeError
from meshforge.runtime import make_progress

T = TypeVar("T")

_MAX_REASON = 300


@dataclass(frozen=True)
class Skip:
    path: str
    reason: str


class BatchFailed(MeshforgeError):
    """An item failed for a reason that is not a problem of its input file."""

    def __init__(self, path: str, reason: str, finished: int):
        self.path, self.reason, self.finished = path, reason, finished
        super().__init__(
            f"{path}: {reason} (a failure of the job, not of this input; {finished} items had finished)"
        )


@dataclass
class BatchResult(Generic[T]):
    done: list[tuple[Path, T]] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)


def resolve_workers(workers: int) -> int:
    """``0`` (or negative) means every core this process may use."""
    if workers > 0:
        return workers
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def failure_reason(exc: BaseException) -> str:
    """A one-line reason: the problem of an ``InputError``, otherwise the exception type and message."""
    text = exc.problem if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
    line = " ".join(text.split()) or type(exc).__name__
    return line if len(line) <= _MAX_REASON else line[: _MAX_REASON - 3] + "..."


# What an item came to: its value, a skip (a bad input) or a failure of the job, with its reason.
_DONE, _SKIP, _FAIL = "done", "skip", "fail"


def _guarded(fn: Callable[[Path], T], item: Path) -> tuple[str, T | str]:
    # Runs in the worker: exceptions become values so that unpicklable exception objects never have
    # to cross the process boundary; the main process decides what each outcome means.
    try:
        return _DONE, fn(item)
    except InputError as exc:
        return _SKIP, failure_reason(exc)
    except Exception as exc:  # noqa: BLE001  (reported as a failure of the job in the main process)
        return _FAIL, failure_reason(exc)


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork starts workers in milliseconds and they inherit the imported modules; the workers only run
    # numpy/trimesh code, so torch's fork caveats (its intra-op thread pool) do not apply. Elsewhere
    # (macOS, Windows) fork is unsafe or missing and spawn is the only choice.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    return multiprocessing.get_context(method)


def _pool_results(
    pool: ProcessPoolExecutor,
    guarded: Callable[[Path], tuple[str, T | str]],
    items: list[Path],
    workers: int,
) -> Iterator[tuple[str, T | str]]:
    # Chunks amortise inter-process overhead on many small files while keeping the bar live.
    chunksize = max(1, min(32, len(items) // (workers * 8)))
    done = 0
    try:
        for result in pool.map(guarded, items, chunksize=chunksize):
            done += 1
            yield result
    except BrokenProcessPool as exc:
        # A worker died outright (killed for memory, a crash in native code). Which of the items in
        # flight it held is unknown, so none of them can be called a bad input: the job fails,
        # naming the first item that did not come back.
        yield (
            _FAIL,
            f"a worker process died while this or a following item was in flight ({failure_reason(exc)})",
        )


def run_batch(
    items: list[Path], fn: Callable[[Path], T], *, workers: int, description: str
) -> BatchResult[T]:
    """Apply ``fn`` to every item (in a process pool when ``workers > 1``; ``0`` = all cores).

    ``fn`` must be picklable (a module-level function or a ``functools.partial`` of one). Results
    come back in the order of ``items``; an item whose ``fn`` raises :class:`InputError` becomes a
    :class:`Skip`, any other exception stops the batch with :class:`BatchFailed` (queued items are
    dropped, running ones finish).
    """
    items = [Path(p) for p in items]
    workers = min(resolve_workers(workers), max(1, len(items)))
    guarded = partial(_guarded, fn)
    result: BatchResult[T] = BatchResult()
    with contextlib.ExitStack() as stack:
        results: Iterator[tuple[str, T | str]]
        if workers > 1:
            pool = stack.enter_context(ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()))
            # Fork every worker now, before the progress bar starts its refresh thread.
            pool.submit(int).result()
            # On Ctrl-C, drop the queued items instead of finishing them all before exiting.
            stack.callback(pool.shutdown, wait=True, cancel_futures=True)
            results = _pool_results(pool, guarded, items, workers)
        else:
            results = map(guarded, items)
        progress = stack.enter_context(make_progress())
        task = progress.add_task(description, total=len(items))
        for item, (outcome, value) in zip(items, results):
            if outcome == _FAIL:
                raise BatchFailed(str(item), str(value), finished=len(result.done) + len(result.skipped))
            if outcome == _DONE:
                result.done.append((item, value))  # type: ignore[arg-type]
            else:
                result.skipped.append(Skip(path=str(item), reason=str(value)))
            progress.advance(task)
    return result

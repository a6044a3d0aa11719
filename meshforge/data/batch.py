"""Run one function over many files on all CPU cores, never dying on one bad file.

Data stages (``tokenize``, ``sdf-voxelize``) map a per-file function over thousands of user files,
some of which are broken. :func:`run_batch` turns every exception raised for an item into a
:class:`Skip` with a one-line reason, shows a progress bar, and returns results in input order
whatever the scheduling, so outputs are deterministic.
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

from meshforge.errors import InputError
from meshforge.runtime import make_progress

T = TypeVar("T")

_MAX_REASON = 300


@dataclass(frozen=True)
class Skip:
    path: str
    reason: str


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


def _guarded(fn: Callable[[Path], T], item: Path) -> tuple[bool, T | str]:
    # Runs in the worker: exceptions become values so that one file never takes the pool down,
    # and unpicklable exception objects never have to cross the process boundary.
    try:
        return True, fn(item)
    except Exception as exc:  # noqa: BLE001  (any failure of one item is that item's skip)
        return False, failure_reason(exc)


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork starts workers in milliseconds and they inherit the imported modules; the workers only run
    # numpy/trimesh code, so torch's fork caveats (its intra-op thread pool) do not apply. Elsewhere
    # (macOS, Windows) fork is unsafe or missing and spawn is the only choice.
    method = "fork" if sys.platform.startswith("linux") else "spawn"
    return multiprocessing.get_context(method)


def _pool_results(
    pool: ProcessPoolExecutor,
    guarded: Callable[[Path], tuple[bool, T | str]],
    items: list[Path],
    workers: int,
) -> Iterator[tuple[bool, T | str]]:
    # Chunks amortise inter-process overhead on many small files while keeping the bar live.
    chunksize = max(1, min(32, len(items) // (workers * 8)))
    done = 0
    try:
        for result in pool.map(guarded, items, chunksize=chunksize):
            done += 1
            yield result
    except BrokenProcessPool as exc:
        # A worker died outright (segfault in a native loader, killed for memory): the items not
        # yet returned cannot be attributed, so each is recorded rather than silently dropped.
        for _ in items[done:]:
            yield False, f"worker process died before finishing this file ({failure_reason(exc)})"


def run_batch(
    items: list[Path], fn: Callable[[Path], T], *, workers: int, description: str
) -> BatchResult[T]:
    """Apply ``fn`` to every item (in a process pool when ``workers > 1``; ``0`` = all cores).

    ``fn`` must be picklable (a module-level function or a ``functools.partial`` of one). Results
    come back in the order of ``items``; an item whose ``fn`` raises becomes a :class:`Skip`.
    """
    items = [Path(p) for p in items]
    workers = min(resolve_workers(workers), max(1, len(items)))
    guarded = partial(_guarded, fn)
    result: BatchResult[T] = BatchResult()
    with contextlib.ExitStack() as stack:
        results: Iterator[tuple[bool, T | str]]
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
        for item, (ok, value) in zip(items, results):
            if ok:
                result.done.append((item, value))  # type: ignore[arg-type]
            else:
                result.skipped.append(Skip(path=str(item), reason=str(value)))
            progress.advance(task)
    return result

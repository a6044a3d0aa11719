"""A window of training steps under ``torch.profiler``, and what it says about where a step's time goes.

``--profile-steps N`` profiles N steps on every rank after ``PROFILE_SKIP`` steps of warm-up
(CUDA context, kernel compilation and autotuning) and one profiler warm-up step. Each rank writes
``OUT/profile/rank{R}.trace.json.gz`` (open it in Perfetto or ``chrome://tracing``),
``rank{R}.txt`` (the top operators by device and by host time) and ``rank{R}.json``, a summary
that answers the usual question of a slow step:

- ``step_s``: wall time per step; ``gpu_busy_s``: time per step with a kernel running (the union
  of kernel intervals, communication included) and ``gpu_busy_frac`` their ratio: near 1 the GPU is
  the bottleneck, well below 1 the host (kernel launches, Python, data) is;
- ``launches``: kernel launches per step (each costs several microseconds of host time);
- ``phases_s``: host time per step in the trainer's phases (data, forward, backward, clip+sync,
  optimizer), so a phase that launches too much stands out;
- ``comm_s``: time per step in NCCL kernels;
- ``top_operators``: the operators with the most self time per step (device time where kernels were
  recorded, host time otherwise) and their calls per step, which two runs' summaries can be compared
  on (``benchmarks/profile_diff.py``).
"""

from __future__ import annotations

import contextlib
import gzip
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function, schedule

from meshforge.io import atomic_path, atomic_write_json, atomic_write_text

PROFILE_DIR = "profile"
PROFILE_SKIP = 10  # steps before the profiler's own warm-up step: compilation and autotuning happen here
PHASES = ("data", "forward", "backward", "clip_sync", "optimizer")
TOP_OPERATORS = 40
_LAUNCH_CALLS = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx", "cudaGraphLaunch")
_STEP_EVENT = "ProfilerStep"  # "ProfilerStep#N", or "ProfilerStep*" in newer torch


class StepProfiler:
    """Profiles ``steps`` training steps (after a warm-up) and writes the rank's trace and summary.

    The trainer wraps each phase of a step in :meth:`phase` and calls :meth:`step` after each
    step; with ``steps == 0`` both are free (no profiler exists).
    """

    def __init__(self, out_dir: Path, rank: int, steps: int, device: torch.device, skip: int = PROFILE_SKIP) -> None:
        self.out_dir, self.rank = Path(out_dir) / PROFILE_DIR, rank
        self.summary: dict[str, Any] | None = None
        self._profiler: profile | None = None
        if steps > 0:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
            self._profiler = profile(
                activities=activities,
                schedule=schedule(skip_first=skip, wait=0, warmup=1, active=steps, repeat=1),
                on_trace_ready=self._write,
            )
            self._profiler.start()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        if self._profiler is None:
            yield
            return
        with record_function(f"phase:{name}"):
            yield

    def step(self) -> None:
        if self._profiler is not None:
            self._profiler.step()

    def close(self) -> None:
        """Stops profiling; a run that ended inside the window writes what it recorded."""
        if self._profiler is not None:
            self._profiler.stop()
            self._profiler = None

    def _write(self, prof: profile) -> None:
        stem = self.out_dir / f"rank{self.rank}"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(stem.with_suffix(".trace.json.gz")) as tmp:
            raw = tmp.with_name(tmp.name + ".json")
            prof.export_chrome_trace(str(raw))
            with open(raw, "rb") as src, gzip.open(tmp, "wb", compresslevel=5) as dst:
                shutil.copyfileobj(src, dst)
            raw.unlink()
        averages = prof.key_averages()
        tables = [
            averages.table(sort_by=key, row_limit=25, max_name_column_width=70)
            for key in (("self_device_time_total",) if _has_device_events(prof) else ()) + ("self_cpu_time_total",)
        ]
        atomic_write_text(stem.with_suffix(".txt"), "\n\n".join(tables) + "\n")
        self.summary = summarize(prof.events(), rank=self.rank)
        self.summary["top_operators"] = top_operators(averages, self.summary["steps"], _has_device_events(prof))
        atomic_write_json(stem.with_suffix(".json"), self.summary)


def top_operators(averages: Any, steps: int, device: bool, limit: int = TOP_OPERATORS) -> list[dict[str, Any]]:
    """The ``limit`` operators of ``prof.key_averages()`` with the most self time (device time when
    ``device``, else host time), per step of the window; ``phase:`` annotations and the step markers
    are not operators."""
    n = max(steps, 1)

    def self_us(row: Any) -> float:
        return row.self_device_time_total if device else row.self_cpu_time_total

    rows = [r for r in averages if not r.key.startswith(("phase:", _STEP_EVENT))]
    rows.sort(key=self_us, reverse=True)
    return [{"name": r.key, "self_s": self_us(r) / n / 1e6, "calls": r.count / n} for r in rows[:limit]]


def _has_device_events(prof: profile) -> bool:
    return any(e.device_type == DeviceType.CUDA for e in prof.events())


def _union_length(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop <= end:
            continue
        total += stop - max(start, end)
        end = stop
    return total


def summarize(events: Any, rank: int = 0) -> dict[str, Any]:
    """Per-step figures of a profiled window (see the module docstring), from ``prof.events()``."""
    forwards = [e.time_range.start for e in events if e.name == "phase:forward" and e.device_type == DeviceType.CPU]
    # A run stopped inside the window leaves a last, partial interval with no step in it.
    steps = [
        e for e in events
        if e.name.startswith(_STEP_EVENT) and e.device_type == DeviceType.CPU
        and any(e.time_range.start <= t < e.time_range.end for t in forwards)
    ]
    n = max(len(steps), 1)
    window_us = sum(e.time_range.elapsed_us() for e in steps)
    first, end = (min(e.time_range.start for e in steps), max(e.time_range.end for e in steps)) if steps else (0, 0)
    # Device-side events are kernels, copies and memsets, plus the GPU shadows of record_function
    # ranges (user annotations), which span whole phases and are not work.
    kernels = [
        e for e in events
        if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
        and first <= e.time_range.start < end
    ]
    phases = {name: 0.0 for name in PHASES}
    for e in events:
        if e.device_type == DeviceType.CPU and e.name.startswith("phase:"):
            name = e.name.removeprefix("phase:")
            phases[name] = phases.get(name, 0.0) + e.time_range.elapsed_us()
    busy_us = _union_length([(k.time_range.start, k.time_range.end) for k in kernels])
    return {
        "rank": rank,
        "steps": len(steps),
        "step_s": window_us / n / 1e6,
        "gpu_busy_s": busy_us / n / 1e6 if kernels else None,
        "gpu_busy_frac": busy_us / window_us if kernels and window_us else None,
        "kernel_time_s": sum(k.time_range.elapsed_us() for k in kernels) / n / 1e6 if kernels else None,
        "comm_s": sum(k.time_range.elapsed_us() for k in kernels if "nccl" in k.name.lower()) / n / 1e6 if kernels else None,
        "launches": sum(1 for e in events if e.device_type == DeviceType.CPU and e.name in _LAUNCH_CALLS) / n,
        "phases_s": {name: us / n / 1e6 for name, us in phases.items()},
    }

"""What the data-parallel benchmarks share (``iflame_ddp.py``, ``direct3d_ddp.py``): running a
training CLI afresh, reading its logged curve and throughput, comparing two curves, the PNG.

A run is the real CLI in a child process (``python -m meshforge_plugins.cli ... --gpus N``), so
what is measured is what a user runs: the launcher, torchrun, every rank's start-up.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import torch
from rich.table import Table

from meshforge.io import atomic_path
from meshforge.runtime import console, cpu_model
from meshforge.train.logs import read_csv

CLI = "meshforge_plugins.cli"


def child_env(device: str) -> dict[str, str]:
    """The environment of the training processes."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if device == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # one thread per process: N processes must not oversubscribe the cores
    else:
        # Batches change shape every step (padded sequences, sparse shapes of every size): growable
        # segments keep the 1-process run (the whole global batch on one GPU) from fragmenting into OOM.
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    return env


def device_name(device: str, processes: int) -> str:
    """Call after the runs: no CUDA context is held while they train."""
    if device == "cuda":
        return f"{torch.cuda.get_device_name(0)} x{processes}"
    return f"{cpu_model()} ({processes} gloo processes, 1 thread each)"


def run_training(command: list[str], out: Path, env: dict[str, str], cwd: Path) -> float:
    """Run one training command afresh into ``out`` (its output streams through); wall seconds.

    ``cwd`` should not be a checkout: ``python -m`` puts its working directory first on sys.path,
    where a repository would shadow an installed meshforge.
    """
    shutil.rmtree(out, ignore_errors=True)  # no stale metrics.csv can stand in for a failed run
    console.print(f"[bold]$ {' '.join(command)}[/bold]", highlight=False)
    start = time.perf_counter()
    done = subprocess.run(command, check=False, env=env, cwd=cwd)
    if done.returncode:
        raise SystemExit(f"training into {out} failed with exit code {done.returncode} (its output is above)")
    return time.perf_counter() - start


def read_curve(out: Path, log_every: int, skip_steps: range = range(0)) -> dict[str, Any]:
    """The logged train curve and throughput medians of one finished run, with its summary.

    The first row's window holds the warm-up (CUDA context, kernel compilation, NCCL set-up), and a
    row whose window holds a step of ``skip_steps`` (profiled ones) runs slower: both are left out
    of the medians.
    """
    rows = [r for r in read_csv(out / "metrics.csv") if "loss" in r]
    if len(rows) < 2:
        raise SystemExit(f"{out}: {len(rows)} logged rows; the throughput needs at least two (the first is warm-up)")
    steady = [r for r in rows[1:] if not any(int(r["step"]) - log_every < s <= int(r["step"]) for s in skip_steps)]
    summary = json.loads((out / "summary.json").read_text())
    return {
        "steps": [int(r["step"]) for r in rows],
        "loss": [r["loss"] for r in rows],
        "samples_per_s": statistics.median(r["samples_per_s"] for r in steady),
        "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady) if "tokens_per_s" in steady[0] else None,
        # Share of the time blocked at the step's host sync (CUDA only): ~0 means launch-bound.
        "sync_wait_frac": statistics.median(r["sync_wait_frac"] for r in steady) if "sync_wait_frac" in steady[0] else None,
        "final_loss": rows[-1]["loss"],
        "world_size": summary["world_size"],
        "train_wall_s": summary["wall_time_s"],
        "peak_memory_gib": summary.get("peak_memory_gib"),
        "summary": summary,
    }


def compare_curves(one: dict[str, Any], many: dict[str, Any], tolerance: float, spread: float = 0.0) -> dict[str, Any]:
    """How far the N-process curve is from the 1-process one, and whether that is within
    ``tolerance`` plus ``spread`` (the difference of two identical runs, the floor on a GPU)."""
    if one["steps"] != many["steps"]:
        raise SystemExit(f"the runs logged different steps: {one['steps']} and {many['steps']}")
    diffs = [abs(a - b) for a, b in zip(one["loss"], many["loss"])]
    return {
        "loss_max_abs_diff": max(diffs),
        "loss_mean_abs_diff": sum(diffs) / len(diffs),
        "curves_match": max(diffs) <= tolerance + spread,
    }


def scaling(one: dict[str, Any], many: dict[str, Any], processes: int) -> dict[str, float]:
    ratio = many["samples_per_s"] / one["samples_per_s"]
    return {"scaling_ratio": ratio, "scaling_efficiency": ratio / processes}


def plot(runs: dict[str, dict[str, Any]], path: Path, title: str, panels: dict[str, str] | None = None) -> None:
    """Loss curves and each one's absolute difference from the first, against the step (headless,
    atomic). ``panels`` (title: prefix of the run names) draws one such pair per group of runs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = panels or {"": ""}
    fig, axes = plt.subplots(len(groups), 2, figsize=(11, 4 * len(groups)), squeeze=False)
    for (group, prefix), (curves, diff) in zip(groups.items(), axes):
        (base_name, base), *others = [(n, r) for n, r in runs.items() if n.startswith(prefix)]
        curves.plot(base["steps"], base["loss"], label=base_name, linewidth=2)
        for name, run in others:
            curves.plot(run["steps"], run["loss"], label=name, linestyle="--", marker="o", markersize=3)
            diff.plot(base["steps"], [abs(a - b) for a, b in zip(base["loss"], run["loss"])], marker="o", markersize=3,
                      label=f"{name} vs {base_name}")
        curves.set_title(f"{group} train loss".strip())
        diff.set_title(f"|loss - loss of {base_name}|")
        for ax in (curves, diff):
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def comparison_table(title: str, one: dict[str, Any], many: dict[str, Any], labels: tuple[str, str],
                     rows: list[tuple[str, str, str, str]]) -> Table:
    """One row per ``(figure, key, format, "ratio" | "diff")`` of the two runs, with N against 1."""
    table = Table(title=title)
    for column in ("figure", *labels, "N vs 1"):
        table.add_column(column, justify="right")
    for name, key, fmt, compare in rows:
        a, b = one[key], many[key]
        if a is None or b is None:
            table.add_row(name, *("-" if v is None else format(v, fmt) for v in (a, b)), "-")
            continue
        versus = f"x{b / a:.2f}" if compare == "ratio" else f"{b - a:+.2e}"
        table.add_row(name, format(a, fmt), format(b, fmt), versus)
    return table

"""Where two profiled training runs differ: their step summaries side by side, then the operators
whose self time per step differs most.

    python benchmarks/profile_diff.py RUN_A RUN_B [--labels A B] [--rank 0] [--top 20] [--out JSON]

``RUN`` is a training run folder profiled with ``--profile-steps`` (its ``profile/rank{R}.json``,
:mod:`meshforge.train.profiling`) or that JSON itself. The summaries give step time, GPU busy
time and fraction, kernel time, launches and host time per phase; ``top_operators`` (device self
time on CUDA, host self time on a CPU) are matched by name, and an operator outside one run's top
list counts as 0 there (so a difference is at least the listed side's time minus the other list's
smallest entry: read small ones with care); ``listed_diff_s`` sums every matched difference, to hold
against the difference in step time. ``gpu_session.sh short-profile`` compares interleaved
with full attention at the synth data's lengths this way. Prints both tables; writes ``--out``
(default ``profile_diff.json`` beside RUN_A) and the operator table as a PNG beside it.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from rich.table import Table

from meshforge.errors import InputError
from meshforge.io import atomic_write_json, read_json
from meshforge.render import render_table_png
from meshforge.runtime import console
from meshforge.train.profiling import PROFILE_DIR

SUMMARY_FIGURES = ("step_s", "gpu_busy_s", "gpu_busy_frac", "kernel_time_s", "comm_s", "launches")


def load_profile(path: Path, rank: int) -> dict[str, Any]:
    """The rank's profile summary of a run folder, or the summary JSON ``path`` itself."""
    file = path if path.is_file() else path / PROFILE_DIR / f"rank{rank}.json"
    summary = read_json(file, "profile summary", "; was the run given --profile-steps?")
    if "top_operators" not in summary:
        raise InputError(file, "has no top_operators (profiled before they were recorded): profile the run again")
    return summary


def run_folder(path: Path) -> Path:
    """The run a profile belongs to: ``path`` itself, or the folder of ``RUN/profile/rank{R}.json``
    (of a copied ``rank{R}.json``, the folder holding it)."""
    if path.is_dir():
        return path
    return path.parent.parent if path.parent.name == PROFILE_DIR else path.parent


def compare(a: dict[str, Any], b: dict[str, Any], top: int) -> dict[str, Any]:
    """Summary figures and phases of both, and the ``top`` operators by absolute difference in self time."""
    figures = {name: {"a": a.get(name), "b": b.get(name)} for name in SUMMARY_FIGURES}
    phases = {name: {"a": a["phases_s"].get(name), "b": b["phases_s"].get(name)}
              for name in dict.fromkeys([*a["phases_s"], *b["phases_s"]])}  # fmt: skip
    ops_a = {op["name"]: op for op in a["top_operators"]}
    ops_b = {op["name"]: op for op in b["top_operators"]}
    operators = []
    for name in dict.fromkeys([*ops_a, *ops_b]):
        self_a = ops_a[name]["self_s"] if name in ops_a else 0.0
        self_b = ops_b[name]["self_s"] if name in ops_b else 0.0
        operators.append({"name": name, "self_s_a": self_a, "self_s_b": self_b, "diff_s": self_a - self_b,
                          "calls_a": ops_a.get(name, {}).get("calls", 0.0),
                          "calls_b": ops_b.get(name, {}).get("calls", 0.0)})  # fmt: skip
    operators.sort(key=lambda op: abs(op["diff_s"]), reverse=True)
    listed = sum(op["diff_s"] for op in operators)
    return {"figures": figures, "phases_s": phases, "operators": operators[:top],
            "listed_diff_s": listed}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs=2, metavar="RUN")
    parser.add_argument("--labels", nargs=2, metavar=("A", "B"), help="default: the runs' folder names")
    parser.add_argument("--rank", type=int, default=0)
    parser.add_argument("--top", type=int, default=20, help="operators shown, by absolute difference")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    labels = args.labels or [run_folder(run).name for run in args.runs]
    a, b = (load_profile(run, args.rank) for run in args.runs)
    result = {"benchmark": "profile_diff", "labels": labels, "runs": [str(run) for run in args.runs],
              "rank": args.rank, **compare(a, b, args.top)}  # fmt: skip
    out = args.out or run_folder(args.runs[0]).parent / "profile_diff.json"

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{1e3 * value:.2f}"

    steps = Table(title=f"profiled step: {labels[0]} vs {labels[1]} (rank {args.rank})")
    for column in ("figure", *labels):
        steps.add_column(column, justify="right")
    for name, pair in result["figures"].items():
        shown = (lambda v: "-" if v is None else f"{v:.2f}") if name in ("gpu_busy_frac", "launches") else ms
        steps.add_row(name if name in ("gpu_busy_frac", "launches") else name.replace("_s", " (ms)"),
                      shown(pair["a"]), shown(pair["b"]))
    for name, pair in result["phases_s"].items():
        steps.add_row(f"host {name} (ms)", ms(pair["a"]), ms(pair["b"]))
    console.print(steps)
    rows = [{"operator": op["name"][:60], f"{labels[0]} ms": ms(op["self_s_a"]), f"{labels[1]} ms": ms(op["self_s_b"]),
             "diff ms": ms(op["diff_s"]), f"{labels[0]} calls": f"{op['calls_a']:.0f}",
             f"{labels[1]} calls": f"{op['calls_b']:.0f}"} for op in result["operators"]]  # fmt: skip
    table = Table(title=f"self time per step, largest differences ({labels[0]} - {labels[1]})")
    for column in rows[0] if rows else ("operator",):
        table.add_column(column, justify="left" if column == "operator" else "right")
    for row in rows:
        table.add_row(*row.values())
    console.print(table)
    atomic_write_json(out, result)
    if rows:
        render_table_png(rows, out.with_suffix(".png"), f"self time per step: {labels[0]} - {labels[1]}")
    console.print(f"wrote {out}")


if __name__ == "__main__":
    main()

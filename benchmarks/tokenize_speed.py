"""Tokenisation throughput on the built-in data: synth N meshes, tokenise them on every core.

    python benchmarks/tokenize_speed.py [--meshes 2000] [--workers 0]

Prints a table and writes ``benchmarks/results/tokenize_speed.json`` naming the CPU. The issue's
target: 2,000 synth meshes in under 30 s on a 2-core machine.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from rich.table import Table

from meshforge.data.batch import resolve_workers
from meshforge.data.synth import FORMATS, generate
from meshforge.data.tokenize import TokenizeConfig, tokenize_folder
from meshforge.io import atomic_write_json
from meshforge.runtime import console, cpu_model

RESULT = Path(__file__).parent / "results" / "tokenize_speed.json"
TARGET_S = 30.0



def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meshes", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=0, help="0 = every core")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    workers = resolve_workers(args.workers)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        # All four formats, so the figure covers every loader the quickstart data can hit.
        generate(Path(tmp) / "synth", args.meshes, seed=0, formats=list(FORMATS))
        synth_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        summary = tokenize_folder(
            TokenizeConfig(input=Path(tmp) / "synth", out=Path(tmp) / "tokens", workers=workers)
        )
        seconds = time.perf_counter() - t0

    tokens = summary["train_tokens"] + summary["val_tokens"]
    result = {
        "benchmark": "tokenize_speed",
        "device": {"cpu": cpu_model(), "cores": os.cpu_count(), "workers": workers},
        "meshes": summary["meshes"],
        "skipped": summary["skipped"],
        "tokens": tokens,
        "seconds": round(seconds, 3),
        "meshes_per_s": round(summary["meshes"] / seconds, 1),
        "tokens_per_s": round(tokens / seconds),
        "synth_seconds": round(synth_s, 3),
        "target_seconds": TARGET_S,
        "meets_target": seconds < TARGET_S,
        "note": "wall time of tokenize_folder (scan, load, canonicalise, split, write), files in all four formats",
    }
    table = Table(
        title=f"tokenize: {args.meshes} synth meshes on {result['device']['cpu']} ({workers} workers)"
    )
    for column in ("meshes", "tokens", "seconds", "meshes/s", "tokens/s", f"target < {TARGET_S:.0f} s"):
        table.add_column(column, justify="right")
    table.add_row(
        str(result["meshes"]),
        f"{tokens:,}",
        f"{seconds:.2f}",
        f"{result['meshes_per_s']:.0f}",
        f"{result['tokens_per_s']:,}",
        "yes" if result["meets_target"] else "NO",
    )
    console.print(table)
    atomic_write_json(args.out, result)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

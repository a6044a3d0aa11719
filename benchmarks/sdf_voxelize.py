"""Voxelisation throughput: synth meshes -> narrow-band sparse SDF datasets, on CPU and CUDA.

    python benchmarks/sdf_voxelize.py [--meshes 16] [--cpu 64,128] [--cuda 256,512,1024] [--workers 0]

Runs ``voxelize_folder`` (load, normalise, distance, winding-number sign, sharp flags, write) at
each resolution: on the CPU with every core, once per sign backend (``torch``: the reference
solid angles; ``pcu``: point-cloud-utils' fast winding numbers, when installed), and on the GPU
when one is available. Prints a table and writes ``benchmarks/results/sdf_voxelize.json`` naming
the devices (each row names its CPU), and the table beside it as ``sdf_voxelize.png``. A run
without a GPU keeps the CUDA rows already in the file. The first CUDA run is preceded by a warm-up
mesh so that CUDA start-up is not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
from rich.table import Table

from meshforge.data.batch import resolve_workers
from meshforge.data.sdf_voxelize import SdfConfig, voxelize_folder
from meshforge.data.synth import generate
from meshforge.io import atomic_write_json
from meshforge.render import render_table_png
from meshforge.runtime import console, cpu_model, has_module

RESULT = Path(__file__).parent / "results" / "sdf_voxelize.json"


def resolutions(text: str) -> list[int]:
    return [int(r) for r in text.split(",") if r.strip()]


def measure(data: Path, out: Path, resolution: int, device: str, workers: int, sign: str = "torch") -> dict:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    summary = voxelize_folder(
        SdfConfig(
            input=data, out=out, resolution=resolution, workers=workers, val_fraction=0.0,
            sign_backend=sign,
        ),
        device,
    )
    seconds = time.perf_counter() - t0
    row = {
        "device": device,
        "sign": sign,
        "resolution": resolution,
        "meshes": summary["meshes"],
        "skipped": summary["skipped"],
        "seconds": round(seconds, 3),
        "meshes_per_s": round(summary["meshes"] / seconds, 3),
        "voxels_per_mesh": round(summary["voxels"] / max(1, summary["meshes"])),
    }
    if device == "cuda":
        row["peak_gpu_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    else:
        row |= {"cpu": cpu_model(), "cores": os.cpu_count(), "workers": workers}
    return row


def row_key(row: dict) -> tuple:
    return row["device"], row.get("cpu"), row.get("workers"), row.get("sign", "torch"), row["resolution"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meshes", type=int, default=16)
    parser.add_argument("--cpu", type=resolutions, default=[64, 128], help="CPU resolutions ('' to skip)")
    parser.add_argument("--cuda", type=resolutions, default=[256, 512, 1024], help="CUDA resolutions")
    parser.add_argument("--workers", type=int, default=0, help="CPU worker processes, 0 = every core")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    workers = resolve_workers(args.workers)
    has_cuda = torch.cuda.is_available()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "synth"
        generate(data, args.meshes, seed=0)
        signs = ["torch", "pcu"] if has_module("point_cloud_utils") else ["torch"]
        for r in args.cpu:
            for sign in signs:
                rows.append(measure(data, Path(tmp) / f"cpu{r}{sign}", r, "cpu", workers, sign))
        if has_cuda and args.cuda:
            warm = Path(tmp) / "warm"
            generate(warm, 1, seed=1)
            voxelize_folder(SdfConfig(input=warm, out=Path(tmp) / "warm_out", resolution=64), "cuda")
            for r in args.cuda:
                rows.append(measure(data, Path(tmp) / f"cuda{r}", r, "cuda", 1))

    gpu = torch.cuda.get_device_name() if has_cuda else None
    if args.out.is_file():  # keep the rows of other machines (a GPU host's CPU and GPU rows)
        earlier = json.loads(args.out.read_text())
        host = {k: earlier["device"][k] for k in ("cpu", "cores", "workers") if k in earlier.get("device", {})}
        measured = {row_key(row) for row in rows}
        for row in earlier.get("rows", []):
            row = {"sign": "torch", **(host if row["device"] == "cpu" else {}), **row}
            if row_key(row) not in measured and not (row["device"] == "cuda" and has_cuda and args.cuda):
                rows.append(row)
        if gpu is None and any(row["device"] == "cuda" for row in rows):
            gpu = earlier.get("device", {}).get("gpu")
    result = {
        "benchmark": "sdf_voxelize",
        "device": {"gpu": gpu, "torch": torch.__version__},
        "data": f"{args.meshes} synth meshes (seed 0), band 3 voxels, fill 0.9",
        "rows": rows,
        "note": "wall time of voxelize_folder: load, normalise, exact distance, winding-number sign "
        "(sign: torch solid angles or pcu fast winding numbers), sharp flags, npz writes; CUDA rows "
        "after a warm-up mesh; CPU rows name their CPU",
    }
    title = f"sdf-voxelize: {args.meshes} synth meshes"
    shown = [
        {
            "device": result["device"]["gpu"] if row["device"] == "cuda" else f"{row['cpu']} x{row['workers']}",
            "sign": row.get("sign", "torch"),
            "R": str(row["resolution"]),
            "meshes/s": f"{row['meshes_per_s']:.2f}",
            "seconds": f"{row['seconds']:.1f}",
            "voxels/mesh": f"{row['voxels_per_mesh']:,}",
            "peak GPU GB": str(row.get("peak_gpu_memory_gb", "-")),
        }
        for row in rows
    ]
    table = Table(title=title)
    for column in shown[0] if shown else ():
        table.add_column(column, justify="right")
    for row in shown:
        table.add_row(*row.values())
    console.print(table)
    atomic_write_json(args.out, result)
    if shown:
        png = render_table_png(shown, args.out.with_suffix(".png"), title)
        console.print(f"wrote {args.out} and {png}")
    else:
        console.print(f"wrote {args.out} (no resolutions ran)")


if __name__ == "__main__":
    main()

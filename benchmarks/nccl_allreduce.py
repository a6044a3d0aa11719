"""All-reduce bandwidth between the GPUs of one machine: what data-parallel training pays per step.

    python -m torch.distributed.run --nproc-per-node 2 benchmarks/nccl_allreduce.py [--sizes-mb 16 80 320] [--repeat 10]
    python -m torch.distributed.run --nproc-per-node 2 benchmarks/nccl_allreduce.py --device cpu  # smoke test (gloo)

Times ``dist.all_reduce`` (NCCL, float32) of buffers the size of a model's gradients (320 MB is
the reference iFlame's 80M float32 parameters) and reports the algorithm bandwidth (bytes / time)
and the bus bandwidth (x 2(n-1)/n, the figure nccl-tests report), with whether the GPUs can reach
each other's memory directly (peer access). Rank 0 prints a table and writes
``benchmarks/results/nccl_allreduce.json`` naming the devices, and the table as a PNG beside it.
``--device cpu`` runs the same over gloo between processes (a smoke test of the script, not a figure).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist

from meshforge.io import atomic_write_json
from meshforge.render import render_table_png

RESULT = Path(__file__).parent / "results" / "nccl_allreduce.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[16, 80, 320])
    parser.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    rank = int(os.environ["LOCAL_RANK"])
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.set_device(rank)
    dist.init_process_group("nccl" if cuda else "gloo")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    world = dist.get_world_size()
    rows = []
    for size_mb in args.sizes_mb:
        buffer = torch.ones(int(size_mb * 2**20) // 4, device=args.device)
        for _ in range(3):
            dist.all_reduce(buffer)
        sync()
        start = time.perf_counter()
        for _ in range(args.repeat):
            dist.all_reduce(buffer)
        sync()
        seconds = (time.perf_counter() - start) / args.repeat
        algbw = buffer.nbytes / seconds / 1e9
        rows.append({"size_mb": size_mb, "ms": 1000 * seconds, "algbw_gbps": algbw, "busbw_gbps": algbw * 2 * (world - 1) / world})
    if rank == 0:
        if cuda:
            peer = [[i == j or torch.cuda.can_device_access_peer(i, j) for j in range(world)] for i in range(world)]
            device, nccl = f"{torch.cuda.get_device_name(0)} x{world}", str(torch.cuda.nccl.version())
        else:
            peer, device, nccl = None, f"cpu x{world}", None
        backend = dist.get_backend()
        result = {"benchmark": "nccl_allreduce", "device": device, "world_size": world, "peer_access": peer,
                  "backend": backend, "nccl_version": nccl, "rows": rows}
        for row in rows:
            print(f"{row['size_mb']:>7.0f} MB  {row['ms']:8.2f} ms  algbw {row['algbw_gbps']:7.1f} GB/s  busbw {row['busbw_gbps']:7.1f} GB/s")
        print(f"peer access: {peer}")
        atomic_write_json(args.out, result)
        render_table_png(rows, args.out.with_suffix(".png"), title=f"all-reduce bandwidth, {device} ({backend})")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()

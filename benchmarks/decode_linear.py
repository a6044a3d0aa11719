"""The fused decoding GEMM's tilings at the reference iFlame's projections: which is fastest, by how much.

    python benchmarks/decode_linear.py [--batches 1 4 16] [--out benchmarks/results]
    TRITON_INTERPRET=1 python benchmarks/decode_linear.py --device cpu --tiny   # CPU smoke test (wall clock)

At batch 1 a decoding step is ~47 of these launches a token and they are most of its GPU time
(``decode_profile.json``). Each projection (``qkv``, ``proj``, ``gate_up`` with SwiGLU, ``down``,
the head: 512 wide, SwiGLU hidden 1408, bf16) is timed as decoding runs it: launches captured in a
CUDA graph, each on a weight of its own, with enough weights (>= 128 MB) that they come from HBM
and not from the 50-60 MB L2, as a generation's 150 MB of weights do. Per batch, the rows are

- ``reference``: :func:`fused_linear_reference` (cuBLAS and PyTorch's elementwise ops),
- ``default``: :meth:`LinearConfig.for_shape`, what the decoder runs,
- ``dot16``: the tensor-core tiling at 16 x 16 (at batch 1: the kernel before its GEMV form),
- at batch 1 only, every GEMV tiling of a grid (columns per program x slice of K x warps).

Writes ``decode_linear.json`` (device named; microseconds per launch) and ``decode_linear.png`` (the table).
On a CPU (``--tiny``: projections of a few dozen columns, a 4-tiling grid) the launches are timed by
the wall clock, one after another: a smoke test of the script, not a measurement.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from meshforge.kernels.decode_step import fused_linear_reference
from meshforge.kernels.decode_step.linear import LinearConfig, fused_linear_triton

from meshforge.io import atomic_write_json
from meshforge.render import render_table_png
from meshforge.runtime import console, device_name, resolve_device

RESULTS = Path(__file__).parent / "results"
# (name, K, N, what rides along): the reference model's projections (meshforge.models.iflame.Block.step).
PROJECTIONS = [
    ("qkv", 512, 1536, {"norm": True}),
    ("proj", 512, 512, {"residual": True}),
    ("gate_up", 512, 1408, {"norm": True, "swiglu": True}),
    ("down", 1408, 512, {"residual": True}),
    ("head", 512, 135, {"norm": True}),
]
GEMV_GRID = {"block_n": (1, 2, 4, 8), "block_k": (256, 512), "num_warps": (2, 4, 8)}
TINY_PROJECTIONS = [("qkv", 32, 48, {"norm": True}), ("gate_up", 32, 24, {"norm": True, "swiglu": True}),
                    ("down", 24, 32, {"residual": True})]  # fmt: skip
TINY_GEMV_GRID = {"block_n": (1, 4), "block_k": (16, 32), "num_warps": (4,)}
WEIGHT_BYTES = 128 * 2**20  # weights per graph: past any L2 of today's GPUs
REPLAYS = 20


def graph_time_us(launches: list[Callable[[], Any]]) -> float:
    """Microseconds per launch of ``launches`` captured as one CUDA graph, replayed ``REPLAYS`` times."""
    for launch in launches[:2]:  # compiled and loaded before the capture
        launch()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for launch in launches:
            launch()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPLAYS):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (REPLAYS * len(launches))


def wall_time_us(launches: list[Callable[[], Any]]) -> float:
    """Microseconds per launch by the wall clock, launches one after another (the CPU smoke test's timer)."""
    launches[0]()
    start = time.perf_counter()
    for launch in launches:
        launch()
    return (time.perf_counter() - start) * 1e6 / len(launches)


def projection_inputs(rows: int, k: int, n: int, extras: dict[str, bool], device: torch.device, copies: int):
    x = torch.randn(rows, k, device=device, dtype=torch.bfloat16)
    out_rows = 2 * n if extras.get("swiglu") else n
    weights = [torch.randn(out_rows, k, device=device, dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
    kwargs: dict[str, Any] = {"swiglu": extras.get("swiglu", False)}
    if extras.get("norm"):
        kwargs |= {"norm_weight": torch.ones(k, device=device), "eps": 1e-6}
    if extras.get("residual"):
        kwargs["residual"] = torch.randn(rows, n, device=device, dtype=torch.bfloat16)
    return x, weights, kwargs


def time_form(timer, x, weights, kwargs, config: LinearConfig | None, reference: bool = False) -> float | str:
    if reference:
        return timer([lambda w=w: fused_linear_reference(x, w, **kwargs) for w in weights])
    try:
        return timer([lambda w=w: fused_linear_triton(x, w, **kwargs, config=config) for w in weights])
    except Exception as error:  # noqa: BLE001 -- a tiling the compiler refuses (registers, shared memory): recorded
        return f"{type(error).__name__}: {str(error).splitlines()[0][:120]}"


def gemv_grid(grid: dict[str, tuple[int, ...]]) -> list[LinearConfig]:
    return [LinearConfig(dot=False, block_m=1, block_n=n, block_k=k, num_warps=w)
            for n, k, w in itertools.product(*grid.values())]  # fmt: skip


@torch.inference_mode()
def measure(batches: list[int], device: torch.device, tiny: bool) -> list[dict[str, Any]]:
    cuda = device.type == "cuda"
    timer = graph_time_us if cuda else wall_time_us
    rows_out = []
    for batch, (name, k, n, extras) in itertools.product(batches, TINY_PROJECTIONS if tiny else PROJECTIONS):
        torch.manual_seed(0)
        weight_rows = 2 * n if extras.get("swiglu") else n
        copies = max(8, min(512, WEIGHT_BYTES // (weight_rows * k * 2))) if cuda else 2
        x, weights, kwargs = projection_inputs(batch, k, n, extras, device, copies)
        default = LinearConfig.for_shape(batch, n, k)
        dot16 = LinearConfig(dot=True, block_m=16, block_n=16, block_k=512)
        row: dict[str, Any] = {
            "batch": batch, "projection": name, "k": k, "n": n, "weights": len(weights),
            "reference_us": time_form(timer, x, weights, kwargs, None, reference=True),
            "default": vars(default) | {"us": time_form(timer, x, weights, kwargs, default)},
            "dot16_us": time_form(timer, x, weights, kwargs, dot16),
        }  # fmt: skip
        if batch == 1:
            grid = gemv_grid(TINY_GEMV_GRID if tiny else GEMV_GRID)
            timed = [vars(c) | {"us": time_form(timer, x, weights, kwargs, c)} for c in grid]
            ok = [t for t in timed if isinstance(t["us"], float)]
            row["gemv_grid"] = timed
            row["best_gemv"] = min(ok, key=lambda t: t["us"]) if ok else None
        rows_out.append(row)
        console.print({key: value for key, value in row.items() if key != "gemv_grid"})
    return rows_out


def table_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def us(value: Any) -> Any:
        return round(value, 2) if isinstance(value, float) else "failed"

    table = []
    for row in rows:
        entry = {"batch": row["batch"], "projection": f"{row['projection']} {row['k']}->{row['n']}",
                 "reference us": us(row["reference_us"]), "default us": us(row["default"]["us"]),
                 "default tiling": "{}x{}x{} w{}{}".format(row["default"]["block_m"], row["default"]["block_n"],
                                                          row["default"]["block_k"], row["default"]["num_warps"],
                                                          " dot" if row["default"]["dot"] else ""),
                 "dot16 us": us(row["dot16_us"])}  # fmt: skip
        best = row.get("best_gemv")
        if best:
            entry |= {"best GEMV us": us(best["us"]), "best GEMV tiling": f"1x{best['block_n']}x{best['block_k']} w{best['num_warps']}"}
        table.append(entry)
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--tiny", action="store_true", help="small projections and grid: a smoke test")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    rows = measure(args.batches, device, args.tiny)
    timing = (f"CUDA graphs over {WEIGHT_BYTES} bytes of weights, {REPLAYS} replays" if device.type == "cuda"
              else "wall clock, launches one after another (a smoke test)")  # fmt: skip
    result = {"benchmark": "decode_linear", "device": device_name(device), "torch": torch.__version__,
              "timing": timing, "replays": REPLAYS, "weight_bytes_per_graph": WEIGHT_BYTES, "tiny": args.tiny,
              "rows": rows}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "decode_linear.json", result)
    png = render_table_png(table_rows(rows), args.out / "decode_linear.png",
                           title=f"Fused decoding GEMM, us per launch, {result['device']}")  # fmt: skip
    console.print(f"wrote {args.out / 'decode_linear.json'} and {png}")


if __name__ == "__main__":
    main()

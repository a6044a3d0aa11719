"""Host time per call of the ops an iFlame training step launches at short lengths.

    python benchmarks/launch_overhead.py [--out benchmarks/results] [--calls 300]
    python benchmarks/launch_overhead.py --device cpu   # CPU smoke test: the PyTorch rows only

At the synth data's lengths a training step is host-bound (``benchmarks/results/iflame_short_profile``:
the GPU busy 44-52 of ~150 ms profiled compiled steps), and the profile gave the interleaved model's
own Triton ops ~250 us of host time a call (``meshforge::linear_attention_parallel``: 260 us of CPU for
32 us of GPU) and fla's chunked kernel ~800 us, against ~20 us for an inductor-launched kernel. This
benchmark takes each layer of such a call apart at a size where the GPU work is negligible (one
sequence of 64 positions, 2 heads of 32), so that the host's time per call is what is measured:

- ``aten_add``: one elementwise aten op (the floor of an eager launch);
- ``rms_norm`` / ``rms_norm_fwd_bwd``: the model's RMSNorm (PyTorch's: a float32 round trip of aten ops),
  alone and with its backward; ``rms_norm_triton_fwd_bwd``: the fused kernels' (one each way);
- ``sdpa``: causal SDPA (flash) forward, the full-attention blocks' operator;
- ``triton_empty_1`` / ``triton_empty_12``: an empty ``@triton.jit`` kernel with 1 and 12 arguments,
  launched through ``kernel[grid](...)`` (Triton's JIT dispatch alone);
- ``parallel_raw``: the fused parallel linear-attention kernel launched directly, no custom op;
- ``triton_empty_12_runner`` / ``parallel_runner``: the same two kernels launched through the
  ``CompiledKernel`` their first launch returned (``compiled[grid](*args)``), skipping the JIT's
  argument binding, specialisation and cache lookup: what a cached launcher would save;
- ``parallel_op``: the same through its ``torch.library`` custom op (what compiled code calls);
- ``parallel_raw_fwd_bwd``: its forward and backward kernels launched directly, no autograd (the floor);
- ``parallel_op_fwd_bwd``: forward + backward through the custom ops' autograd;
- ``parallel_fwd_bwd``: forward + backward as the model calls it eagerly (an autograd.Function);
- ``sdpa_fwd_bwd``, ``fla_chunk``, ``fla_chunk_fwd_bwd``: forward (+ backward through autograd) of SDPA
  and fla's chunked form, as a training step calls them;
- ``block_full_fwd_bwd`` / ``block_linear_fwd_bwd``: one whole block of each kind of the reference model
  (512 wide, 16 heads) at 64 positions, forward + backward: the host's price of a linear block against a
  full one, everything in it counted (the default forms: on CUDA the fused q/k rotation, PyTorch's
  norms and gate); ``block_*_{triton_norm,reference_rotary,triton_swiglu}_fwd_bwd``: the same blocks
  with the other form of one op (what each fused kernel saves or costs a block; these and
  ``rms_norm_triton_fwd_bwd`` on CUDA only).

``host_us`` is the host's time per call over ``--calls`` calls issued back to back (the GPU is never
the bottleneck at this size; it is synchronised only at the end), ``wall_us`` the time per call until
the GPU finished them, both medians of 5 repeats taken in turn over all rows (``host_us_spread``: the
largest minus the smallest repeat). Writes ``launch_overhead.json`` (device and
versions named) and ``launch_overhead.png`` (the table).
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton
import triton.language as tl  # module level: the JIT resolves a kernel's annotations in its globals
from meshforge.kernels.attention import causal_attention
from meshforge.kernels.linear_attention import decay_slopes

from meshforge.io import atomic_write_json
from meshforge.models.iflame import Attention, Block, IFlameConfig
from meshforge.models.layers import RMSNorm, Rotary, SwiGLU
from meshforge.render import render_table_png
from meshforge.runtime import device_name

RESULTS = Path(__file__).parent / "results"
SHAPE = (1, 64, 2, 32)  # [B, T, H, D]: one tile of the parallel kernel per head
REPEATS = 5
# (row suffix, module type, attribute, form): one op of a block in its non-default form.
VARIANTS = (("triton_norm", RMSNorm, "backend", "triton"), ("reference_rotary", Attention, "rotary_backend", "torch"),
            ("triton_swiglu", SwiGLU, "backend", "triton"))


def warm(fn: Callable[[], object], device: torch.device) -> None:
    for _ in range(10):  # compile, plan, allocate
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()


def one_repeat_us(fn: Callable[[], object], calls: int, device: torch.device) -> tuple[float, float]:
    """Host and wall time per call of ``fn`` over ``calls`` back-to-back calls."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter()
    sync()
    done = time.perf_counter()
    return (issued - start) / calls * 1e6, (done - start) / calls * 1e6


def torch_ops(device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(SHAPE, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    norm = RMSNorm(SHAPE[-1]).to(device)
    grad = torch.ones(SHAPE, device=device, dtype=dtype)

    def sdpa_fwd_bwd() -> None:
        causal_attention(q, k, v).backward(grad)

    def norm_fwd_bwd(norm: RMSNorm) -> Callable[[], None]:
        return lambda: norm(q).backward(grad)

    # One block of each kind of the reference model (512 wide, 16 heads of 32) at SHAPE's 64 positions,
    # forward + backward as a training step runs it (bf16 autocast on CUDA): what a linear block costs
    # the host beyond a full one, its attention call, norm and copies included.
    config = IFlameConfig()
    rope = Rotary(config.head_dim, SHAPE[1], config.rope_base).to(device)
    x = torch.randn(1, SHAPE[1], config.dim, generator=g).to(device).requires_grad_()
    blocks = {kind: Block(config, full=kind == "full").to(device) for kind in ("linear", "full")}
    # On CUDA the same blocks with the other form of one op: the fused RMSNorm or SwiGLU gate, PyTorch's
    # q/k rotation (float32 round trips of aten ops, the copies of the strided q, k, v): what each fused
    # kernel saves or costs the host, in this process.
    variants = VARIANTS if device.type == "cuda" else ()
    for kind in ("linear", "full"):
        for variant, module_type, attribute, form in variants:
            blocks[f"{kind}_{variant}"] = other = copy.deepcopy(blocks[kind])
            for module in other.modules():
                if isinstance(module, module_type):
                    setattr(module, attribute, form)
    triton_norm = copy.deepcopy(norm)
    triton_norm.backend = "triton"
    amp = torch.autocast(device.type, torch.bfloat16, enabled=device.type == "cuda")

    def block_fwd_bwd(kind: str) -> Callable[[], None]:
        def run() -> None:
            with amp:
                out = blocks[kind](x, rope)
            out.float().sum().backward()

        return run

    return {
        "aten_add": lambda: q.detach().add(1.0),
        "rms_norm": lambda: norm(q.detach()),
        "rms_norm_fwd_bwd": norm_fwd_bwd(norm),
        **({"rms_norm_triton_fwd_bwd": norm_fwd_bwd(triton_norm)} if variants else {}),
        "sdpa": lambda: causal_attention(q.detach(), k.detach(), v.detach()),
        "sdpa_fwd_bwd": sdpa_fwd_bwd,
        "block_full_fwd_bwd": block_fwd_bwd("full"),
        "block_linear_fwd_bwd": block_fwd_bwd("linear"),
        **{f"block_{kind}_{variant[0]}_fwd_bwd": block_fwd_bwd(f"{kind}_{variant[0]}")
           for kind in ("full", "linear") for variant in variants},
    }


def first_launch_runner(launch: Callable[[], object], grid: tuple[int, int, int]) -> Callable[..., None]:
    """Launch through the runner of the ``CompiledKernel`` that ``launch()`` (a JIT launch) returns,
    made on the first call, so that a Triton version without that API fails inside the timed row."""
    runners: list[Callable[..., None]] = []

    def call(*args) -> None:
        if not runners:
            runners.append(launch()[grid])
        runners[0](*args)

    return call


def triton_ops(device: torch.device, dtype: torch.dtype) -> dict[str, Callable[[], object]]:
    from fla.ops.simple_gla import chunk_simple_gla
    from meshforge.kernels.linear_attention.parallel_triton import (
        _forward,
        _forward_kernel,
        _gradients,
        _launch,
        _parallel_forward,
        linear_attention_parallel_triton,
    )

    @triton.jit
    def empty_1(x_ptr):
        pass

    @triton.jit
    def empty_12(a, b, c, d, e, n0, n1, n2, n3, n4, n5, scale, BLOCK: tl.constexpr):
        pass

    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(SHAPE, generator=g).to(device, dtype).requires_grad_() for _ in range(3))
    qd, kd, vd = (t.detach() for t in (q, k, v))
    out = torch.empty_like(qd)
    slopes = decay_slopes(SHAPE[2]).to(device)
    gamma = -slopes.float()
    scale = SHAPE[-1] ** -0.5
    grad = torch.ones(SHAPE, device=device, dtype=dtype)

    T, H, D = SHAPE[1], SHAPE[2], SHAPE[3]
    empty_args = (qd, kd, vd, out, slopes, 1, 2, 3, 4, 5, 6, scale)
    parallel_args = (qd, kd, vd, out, slopes, T, H, *qd.stride()[:3], scale)
    parallel_meta = {"HEAD_DIM": D, "BLOCK_D": max(16, triton.next_power_of_2(D)), "BLOCK": 64}
    parallel_grid = (triton.cdiv(T, 64), SHAPE[0] * H)
    empty_runner = first_launch_runner(lambda: empty_12[(1,)](*empty_args, BLOCK=16), (1, 1, 1))
    parallel_runner = first_launch_runner(
        lambda: _forward_kernel[parallel_grid](*parallel_args, **parallel_meta, num_warps=4), (*parallel_grid, 1)
    )

    def parallel_raw_fwd_bwd() -> None:
        _gradients(qd, kd, vd, slopes, _forward(qd, kd, vd, slopes, scale), scale)

    def parallel_op_fwd_bwd() -> None:
        _parallel_forward(q, k, v, slopes, scale).backward(grad)

    def parallel_fwd_bwd() -> None:
        linear_attention_parallel_triton(q, k, v, slopes, scale).backward(grad)

    def fla_fwd_bwd() -> None:
        chunk_simple_gla(q, k, v, g_gamma=gamma, scale=scale)[0].backward(grad)

    return {
        "triton_empty_1": lambda: empty_1[(1,)](qd),
        "triton_empty_12": lambda: empty_12[(1,)](qd, kd, vd, out, slopes, 1, 2, 3, 4, 5, 6, scale, BLOCK=16),
        "parallel_raw": lambda: _launch(_forward_kernel, (qd, kd, vd, out), slopes, scale),
        # a compiled kernel's runner takes every argument, the constexprs' values too (as the JIT passes them)
        "triton_empty_12_runner": lambda: empty_runner(*empty_args, 16),
        "parallel_runner": lambda: parallel_runner(*parallel_args, *parallel_meta.values()),
        "parallel_op": lambda: _parallel_forward(qd, kd, vd, slopes, scale),
        "parallel_raw_fwd_bwd": parallel_raw_fwd_bwd,
        "parallel_op_fwd_bwd": parallel_op_fwd_bwd,
        "parallel_fwd_bwd": parallel_fwd_bwd,
        "fla_chunk": lambda: chunk_simple_gla(qd, kd, vd, g_gamma=gamma, scale=scale),
        "fla_chunk_fwd_bwd": fla_fwd_bwd,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    ops = torch_ops(device, dtype) | (triton_ops(device, dtype) if cuda else {})
    name = device_name(device)
    rows: list[dict] = []
    result = {
        "benchmark": "launch_overhead",
        "device": name,
        "software": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()},
        "setup": {"shape_bthd": list(SHAPE), "dtype": str(dtype), "calls": args.calls, "repeats": REPEATS,
                  "note": "host_us: host time per call issued back to back; wall_us: until the GPU finished"},
        "skipped": [] if cuda else ["the Triton and fla rows need CUDA"],
        "rows": rows,
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    errors: dict[str, str] = {}
    for op, fn in ops.items():
        try:
            warm(fn, device)
        except (AttributeError, TypeError, RuntimeError) as error:  # a launch path this Triton lacks: recorded
            errors[op] = f"{type(error).__name__}: {error}"[:200]
    times: dict[str, list[tuple[float, float]]] = {op: [] for op in ops if op not in errors}
    # Repeats go round the ops, so that a drift of the host's speed over the run (seen: rows measured
    # later ran up to 20% faster) is spread over every row instead of favouring the last ones.
    for _ in range(REPEATS):
        for op, repeats in times.items():
            repeats.append(one_repeat_us(ops[op], args.calls, device))
    for op in ops:
        if op in errors:
            rows.append({"op": op, "host_us": None, "wall_us": None, "error": errors[op]})
        else:
            host, wall = zip(*times[op])
            rows.append({"op": op, "host_us": round(statistics.median(host), 2), "wall_us": round(statistics.median(wall), 2),
                         "host_us_spread": round(max(host) - min(host), 2)})  # fmt: skip
        print(rows[-1], flush=True)
    atomic_write_json(args.out / "launch_overhead.json", result)
    render_table_png(rows, args.out / "launch_overhead.png", title=f"Host time per call, {name}")


if __name__ == "__main__":
    main()

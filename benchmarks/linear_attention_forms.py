"""Which linear-attention form is fastest at which length: the fused parallel kernel against fla's chunked one.

    python benchmarks/linear_attention_forms.py [--batch 32] [--lengths 128 256 ...] [--out benchmarks/results]
    python benchmarks/linear_attention_forms.py --quick   # CPU smoke test: tiny sizes, PyTorch forms only

One linear-attention call of iFlame's reference model (16 heads of dim 32, bf16, iFlame's decay
slopes), forward and forward + backward, at each length, for:

- ``parallel``: the fused decay-masked kernel (:mod:`meshforge.kernels.linear_attention.parallel_triton`);
- ``chunk``: fla-core's ``chunk_simple_gla`` (what ran at every length before);
- ``softmax``: the full-attention blocks' causal softmax attention (:func:`meshforge.kernels.attention.causal_attention`,
  flash-attn or SDPA), the reference point: the interleaved model should not be slower than it.

Lengths to read against the model: a mesh of F faces is ``9 (F + 1)`` tokens at the token level,
a third of that at the vertex level and a ninth at the face level (synth meshes: ~1.1k / 370 / 123).
Before timing, each length checks the parallel kernel's output against fla's (bf16 both, the
largest difference relative to the largest output is recorded). Ratios above 1 in
``chunk_over_parallel`` / ``softmax_over_parallel`` mean the parallel form is faster (forward +
backward). ``crossover_len`` is the longest
length up to which the parallel form won at every measured length: what
:data:`meshforge.kernels.linear_attention.PARALLEL_MAX_LEN` should be on this device. Times are
medians of ``triton.testing.do_bench`` on CUDA (means of a few calls on CPU).

The ``model`` section times a whole training step of the reference model (512 wide, 16 heads,
4/4/8/4/4, bf16 autocast, AdamW; ``iflame_vs_full.train_step``) on random tokens of
``--model-faces`` faces at ``--batch``: full attention, and interleaved with the linear form chosen
as shipped (``as_dispatched``: parallel up to PARALLEL_MAX_LEN), always fla's chunked kernels
(``chunk_only``, the behaviour before the parallel kernel) and always the parallel kernel
(``parallel_only``). The synth data's meshes average ~122 faces (~1.1k tokens). Writes
``linear_attention_forms.json`` (device named), ``linear_attention_forms.png`` (the kernel table) and
``linear_attention_forms_model.png`` (the model table).
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import torch
from iflame_steps import train_step  # the step iflame_vs_full.json's figures come from
from meshforge.kernels.attention import causal_attention
from meshforge.kernels.linear_attention import (
    PARALLEL_MAX_LEN,
    decay_slopes,
    linear_attention_chunked,
    linear_attention_parallel,
)
from torch import Tensor

from meshforge.io import atomic_write_json
from meshforge.models.iflame import IFlameConfig
from meshforge.render import render_table_png

RESULTS = Path(__file__).parent / "results"
# 1,280-1,792: between the last length where the parallel kernel had won (1,024: 0.41 vs 1.25 ms) and
# the first where it had lost (2,048: 1.21 vs 1.18 ms) on the H200 in the run before PARALLEL_MAX_LEN
# moved to 2,048 (where the next run put the crossover: 1.22 vs 1.45 ms there)
LENGTHS = (128, 256, 512, 1024, 1280, 1536, 1792, 2048, 4096, 8192)
QUICK_LENGTHS = (16, 64, 128)
MODEL_FACES = (122, 240)  # the synth mean (token level ~1.1k) and twice it (2,169 tokens, just past PARALLEL_MAX_LEN)
LINEAR_FORMS = {"as_dispatched": "auto", "chunk_only": "chunk_triton", "parallel_only": "parallel_triton"}

Attention = Callable[[Tensor, Tensor, Tensor], Tensor]


def cuda_forms(slopes: Tensor) -> dict[str, Attention]:
    from fla.ops.simple_gla import chunk_simple_gla
    from meshforge.kernels.linear_attention.parallel_triton import linear_attention_parallel_triton

    gamma = -slopes.float()
    return {
        "parallel": lambda q, k, v: linear_attention_parallel_triton(q, k, v, slopes, q.shape[-1] ** -0.5),
        "chunk": lambda q, k, v: chunk_simple_gla(q, k, v, g_gamma=gamma)[0],
        "softmax": causal_attention,
    }


def cpu_forms(slopes: Tensor) -> dict[str, Attention]:
    """The PyTorch forms: what the smoke test can run (the Triton ones need a GPU to mean anything)."""
    return {
        "parallel": lambda q, k, v: linear_attention_parallel(q, k, v, slopes)[0],
        "chunk": lambda q, k, v: linear_attention_chunked(q, k, v, slopes)[0],
        "softmax": causal_attention,
    }


def milliseconds(fn: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=10, rep=50)
    fn()
    start = time.perf_counter()
    for _ in range(3):
        fn()
    return (time.perf_counter() - start) / 3 * 1e3


def bench_length(forms: dict[str, Attention], shape: tuple[int, ...], dtype, device) -> dict:
    g = torch.Generator(device=device).manual_seed(shape[1])
    q, k, v = (torch.randn(shape, generator=g, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    grad_out = torch.randn(shape, generator=g, device=device, dtype=dtype)
    row: dict = {"T": shape[1]}
    with torch.no_grad():
        parallel, chunk = forms["parallel"](q, k, v).float(), forms["chunk"](q, k, v).float()
        row["parallel_vs_chunk_rel_diff"] = ((parallel - chunk).abs().max() / chunk.abs().max()).item()
    for name, attend in forms.items():
        with torch.no_grad():
            row[f"{name}_fwd_ms"] = milliseconds(lambda attend=attend: attend(q, k, v), device)
        row[f"{name}_fwd_bwd_ms"] = milliseconds(
            lambda attend=attend: torch.autograd.grad(attend(q, k, v), (q, k, v), grad_out), device
        )
    row["chunk_over_parallel"] = row["chunk_fwd_bwd_ms"] / row["parallel_fwd_bwd_ms"]
    row["softmax_over_parallel"] = row["softmax_fwd_bwd_ms"] / row["parallel_fwd_bwd_ms"]
    return row


def crossover(rows: list[dict]) -> int | None:
    """The longest length up to which the parallel form's forward + backward won at every length."""
    best = None
    for row in sorted(rows, key=lambda r: r["T"]):
        if row["parallel_fwd_bwd_ms"] > row["chunk_fwd_bwd_ms"]:
            break
        best = row["T"]
    return best


def model_steps(cfg: IFlameConfig, faces: int, batch: int, steps: int, device: torch.device) -> list[dict]:
    """Training-step time of the full and interleaved models, the latter with each linear form."""
    tokens = 9 * (faces + 1)
    rows = []
    for attention, forms in (("full", {"-": "auto"}), ("interleaved", LINEAR_FORMS)):
        for label, form in forms.items():
            # The forced forms are CUDA kernels; a CPU smoke test runs the PyTorch form under every label.
            backend = form if device.type == "cuda" else "auto"
            step = train_step(replace(cfg, attention=attention), device, batch, faces, steps, linear_backend=backend)
            samples = None if step["step_s"] is None else batch / step["step_s"]
            rows.append({"faces": faces, "tokens": tokens, "attention": attention, "linear_form": label,
                         "step_ms": None if step["step_s"] is None else step["step_s"] * 1e3,
                         "samples_per_s": samples, "peak_gb": step["peak_gb"]})  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--lengths", type=int, nargs="+", default=None)
    parser.add_argument("--model-faces", type=int, nargs="*", default=list(MODEL_FACES), help="none: skip the model steps")
    parser.add_argument("--model-steps", type=int, default=10, help="timed training steps per model setting")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="CPU smoke test: batch 2, 4 heads of 16, short lengths")
    args = parser.parse_args(argv)
    if args.quick:
        device, dtype = torch.device("cpu"), torch.float32
        args.batch, args.heads, args.head_dim = 2, 4, 16
        lengths, forms = args.lengths or QUICK_LENGTHS, cpu_forms(decay_slopes(4))
        device_name = f"cpu ({platform.processor() or platform.machine()})"
        model_cfg = IFlameConfig(dim=32, n_heads=2, blocks=(1, 1, 2, 1, 1))
        args.model_faces, args.model_steps = [4], 1
    elif torch.cuda.is_available():
        device, dtype = torch.device("cuda"), torch.bfloat16
        lengths, forms = args.lengths or LENGTHS, cuda_forms(decay_slopes(args.heads).cuda())
        device_name = torch.cuda.get_device_name()
        model_cfg = IFlameConfig()
    else:
        raise SystemExit("this benchmark needs a CUDA device (or --quick for the CPU smoke test)")

    rows = []
    for T in lengths:
        rows.append(bench_length(forms, (args.batch, T, args.heads, args.head_dim), dtype, device))
        print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()}, flush=True)
    model = [row for faces in args.model_faces
             for row in model_steps(model_cfg, faces, args.batch, args.model_steps, device)]  # fmt: skip
    result = {
        "benchmark": "linear_attention_forms",
        "device": device_name,
        "software": {"torch": torch.__version__, "python": platform.python_version()},
        "setup": {"batch": args.batch, "heads": args.heads, "head_dim": args.head_dim, "dtype": str(dtype),
                  "slopes": "iFlame's decay_slopes", "quick": args.quick,
                  "timing": "median of triton.testing.do_bench (CUDA), forward alone and forward + backward"},
        "crossover_len": crossover(rows),
        "crossover_note": "longest measured length up to which parallel fwd+bwd <= chunk fwd+bwd at every "
                          "measured length (null: chunk won at the shortest; the longest length: parallel won everywhere)",
        "parallel_max_len_in_code": PARALLEL_MAX_LEN,
        "rows": rows,
        "model": {"config": {k: v for k, v in asdict(model_cfg).items() if k != "attention"}, "batch": args.batch,
                  "timing": "iflame_vs_full.train_step: mean of --model-steps steps after 2 warm-up steps",
                  "rows": model},
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / "linear_attention_forms.json", result)
    render_table_png(
        rows,
        args.out / "linear_attention_forms.png",
        title=f"Linear attention forms, {device_name}, B{args.batch} H{args.heads} D{args.head_dim}, "
        f"crossover {result['crossover_len']}",
    )
    if model:
        render_table_png(model, args.out / "linear_attention_forms_model.png",
                         title=f"iFlame training step by linear form, {device_name}, batch {args.batch}")  # fmt: skip
    print(f"crossover_len {result['crossover_len']} (PARALLEL_MAX_LEN in code: {PARALLEL_MAX_LEN})")


if __name__ == "__main__":
    main()

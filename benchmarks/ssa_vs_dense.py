"""Spatial Sparse Attention vs dense attention (SDPA FlashAttention-2 and cuDNN), forward and backward.

    python benchmarks/ssa_vs_dense.py [--out benchmarks/results] [--quick] [--breakdown] [--sweep]
                                      [--kv-heads 16 2]

Token sets, one sequence each, 16 query heads of dim 64, bf16, the same q/k/v for every method:

- ``synth-*``: real sparse latents. Synth meshes (:mod:`meshforge.data.synth`) voxelised by the SDF
  voxeliser (:mod:`meshforge.data.sdf`) at the latent resolution of a 1024^3 grid under the SS-VAE's
  8x downsampling (R = 128, a 1-voxel band), and the table at other resolutions for the small and the
  largest sizes;
- ``random-*``: uniformly random voxels at 25% occupancy of a cube (blocks fuller than surfaces').

SSA runs with the released defaults (m_cmp 4, m_slc 8, top-k 8, m_win 8) on a prebuilt layout
(coordinates only, shared by every layer of a model), once per ``--kv-heads`` count: 16 (G = H) and
2 (the released DiT's GQA groups of 8); its forward includes pooling, top-k and the selection plan.
The dense methods are timed once per set with 16 K/V heads and shared by its rows: grouped K/V
cost them the same FLOPs. Backward is timed alone (autograd over a kept graph). Times are medians
of ``triton.testing.do_bench``. Writes ``ssa_vs_dense.json`` (device, per-size times and speedups)
and ``ssa_vs_dense.png`` (table); each row also gives every branch's dK/dV schedule (steps per
piece ``*_dkdv_cap``, ``*_dkdv_pieces``, ``*_dkdv_split_items``). ``--sweep`` times launch options
and dK/dV programs-per-SM targets (with an unsplit row) instead.
"""

from __future__ import annotations

import argparse
import platform
from pathlib import Path

import torch
import triton
from latent_tokens import random_tokens, surface_tokens
from meshforge.kernels.attention import sdpa
from meshforge.kernels.ssa import SSAConfig, build_layout, compress_kv, range_attn, spatial_sparse_attention
from meshforge.kernels.ssa.mix import gated_sum
from meshforge.kernels.ssa.plans import AttnPlan, selection_plan
from meshforge.kernels.ssa.range_attn import RangeAttention
from meshforge.kernels.ssa.select import topk_blocks
from meshforge.kernels.ssa.triton_path import BLOCK_N, branch_plans, compression_branch, to_block_order

from meshforge.io import atomic_write_json
from meshforge.render import render_table_png

RESULTS = Path(__file__).parent / "results"
HEADS, HEAD_DIM, DTYPE = 16, 64, torch.bfloat16
DKDV_TARGETS = (2, 4, 8, 16, 32)  # --sweep: dK/dV programs per SM (range_attn.DKDV_PROGRAMS_PER_SM)
LATENT_RES = 1024 // 8  # the SS-VAE's 8x downsampling of a 1024^3 grid
FAMILIES = ("chair", "cabinet", "shelf", "table")
TARGET = {"fwd_vs_fa2": 3.9, "bwd_vs_fa2": 9.6}  # the paper's figures at >= 100k tokens (floor)
AIM = {"fwd_vs_fa2": 12.2, "bwd_vs_fa2": 19.7}  # the authors' later release


def token_sets(quick: bool, device: torch.device) -> list[tuple[str, torch.Tensor]]:
    sets = [(f"synth-{f}-R{LATENT_RES}", surface_tokens(f, LATENT_RES, device)) for f in FAMILIES]
    table_res = (48, 64) if quick else (48, 64, 160)
    sets += [(f"synth-table-R{r}", surface_tokens("table", r, device)) for r in table_res]
    sizes = (16_384, 65_536) if quick else (16_384, 32_768, 65_536, 131_072, 196_608)
    sets += [(f"random-{n // 1024}k", random_tokens(n, 0.25, n, device)) for n in sizes]
    return sorted(sets, key=lambda s: len(s[1]))


def time_ms(fn) -> float:
    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def fwd_bwd_ms(forward, inputs: list[torch.Tensor]) -> tuple[float, float]:
    out = forward()
    grad = torch.randn_like(out)
    fwd = time_ms(forward)
    bwd = time_ms(lambda: torch.autograd.grad(out, inputs, grad, retain_graph=True))
    return fwd, bwd


def inputs_for(n: int, seed: int, device: torch.device, kv_heads: int = HEADS) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(seed)
    q, k, v = (
        torch.randn(n, h, HEAD_DIM, generator=g, device=device, dtype=DTYPE)
        for h in (HEADS, kv_heads, kv_heads)
    )
    gates = torch.rand(n, HEADS, 3, generator=g, device=device, dtype=DTYPE)
    return [t.requires_grad_() for t in (q, k, v, gates)]


def bench_dense(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str) -> tuple[float, float]:
    def forward():
        return sdpa(*(t.transpose(0, 1)[None] for t in (q, k, v)), backend=backend)

    return fwd_bwd_ms(forward, [q, k, v])


def dkdv_counts(plans: dict[str, AttnPlan], kv_heads: int, device: torch.device) -> dict[str, int]:
    """Each branch's computed dK/dV schedule: steps per piece, pieces, items split into several."""
    return {f"{name}_dkdv_{key}": value for name, plan in plans.items()
            for key, value in range_attn.dkdv_schedule(plan, kv_heads, HEADS // kv_heads, device).counts().items()}  # fmt: skip


def op_selection(inputs: list[torch.Tensor], layout) -> torch.Tensor:
    """The op's top-k block choice for these inputs (what its selection plan is built from)."""
    q, k, v, _ = inputs
    with torch.no_grad():
        _, score = compression_branch(to_block_order(q, layout), *compress_kv(k, v, layout), layout)
    return topk_blocks(score, layout)


def breakdown(
    coords: torch.Tensor, cfg: SSAConfig, device: torch.device, kv_heads: int
) -> dict[str, float | int]:
    """Milliseconds of each stage of the SSA forward and of each branch's backward (at the default
    key tiles also unsplit, ``*_unsplit``), and each branch's dK/dV schedule."""
    n = len(coords)
    cu = torch.tensor([0, n], device=device)
    q, k, v, _ = inputs_for(n, 1, device, kv_heads)
    times = {"layout": time_ms(lambda: build_layout(coords, cu, cfg))}
    layout = build_layout(coords, cu, cfg)
    times["pool"] = time_ms(lambda: compress_kv(k, v, layout))
    k_cmp, v_cmp = compress_kv(k, v, layout)
    times["permute_qkv"] = time_ms(lambda: [to_block_order(t, layout) for t in (q, k, v)])
    qs, ks, vs = (to_block_order(t, layout).detach().requires_grad_() for t in (q, k, v))
    times["cmp_fwd+score"] = time_ms(lambda: compression_branch(qs, k_cmp, v_cmp, layout))
    _, score = compression_branch(qs, k_cmp, v_cmp, layout)
    times["topk+plan"] = time_ms(lambda: selection_plan(layout, topk_blocks(score, layout), BLOCK_N))
    selection = topk_blocks(score, layout)
    mix_leaves = [qs.detach().requires_grad_(), torch.rand(n, HEADS, 3, device=device, requires_grad=True)]
    times["mix"], times["mix_bwd"] = fwd_bwd_ms(lambda: gated_sum(*mix_leaves[:1] * 3, mix_leaves[1], layout.perm),
                                                mix_leaves)  # fmt: skip
    # Each branch alone, forward and backward, at each key-tile size.
    for block_n in (32, 64, 128):
        cmp_plan, win_plan = branch_plans(layout, block_n)
        plans = {
            "cmp": (qs, k_cmp, v_cmp, cmp_plan),
            "slc": (qs, ks, vs, selection_plan(layout, selection, block_n)),
            "win": (qs, ks, vs, win_plan),
        }
        for name, (bq, bk, bv, plan) in plans.items():
            leaves = [t.detach().requires_grad_() for t in (bq, bk, bv)]
            fwd_ms, bwd_ms = branch_ms(leaves, plan, cfg)
            times[f"{name}_fwd_bn{block_n}"], times[f"{name}_bwd_bn{block_n}"] = fwd_ms, bwd_ms
            if block_n == BLOCK_N:  # the op's tiles: against one dK/dV program per work item too
                range_attn.DKDV_CAP = range_attn.DKDV_NO_SPLIT
                times[f"{name}_bwd_bn{block_n}_unsplit"] = branch_ms(leaves, plan, cfg)[1]
                range_attn.DKDV_CAP = None
        if block_n == BLOCK_N:
            times.update(dkdv_counts({name: entry[3] for name, entry in plans.items()}, kv_heads, device))
    return times


def branch_ms(leaves: list[torch.Tensor], plan, cfg: SSAConfig) -> tuple[float, float]:
    return fwd_bwd_ms(
        lambda: RangeAttention.apply(*leaves, plan, cfg.query_tile, HEAD_DIM**-0.5, None), leaves
    )


def sweep(coords: torch.Tensor, cfg: SSAConfig, device: torch.device, kv_heads: int) -> list[dict]:
    """Time the whole SSA forward/backward under alternative launch options of each kernel, and
    under each dK/dV programs-per-SM target (which sets the cap on a piece's steps) and unsplit."""
    n = len(coords)
    cu = torch.tensor([0, n], device=device)
    layout = build_layout(coords, cu, cfg)
    inputs = inputs_for(n, 2, device, kv_heads)
    rows = []

    def timed(kernel: str, option: dict) -> None:
        try:
            fwd, bwd = ssa_ms(inputs, layout)
        except (triton.runtime.errors.OutOfResources, triton.CompilationError) as exc:
            fwd = bwd = float("nan")
            print(f"  {kernel} {option}: {type(exc).__name__}")
        rows.append({"kernel": kernel, "kv_heads": kv_heads, **{k_: str(v_) for k_, v_ in option.items()},
                     "fwd_ms": fwd, "bwd_ms": bwd})  # fmt: skip
        print(rows[-1])

    candidates = {
        "fwd": [
            {"BLOCK_N": bn, "num_warps": w, "num_stages": s}
            for bn in (None, 128)
            for w in (4, 8)
            for s in (2, 3)
        ],
        "dq": [
            {"BLOCK_N": bn, "num_warps": w, "num_stages": s}
            for bn in (None, 128)
            for w in (4, 8)
            for s in (2, 3)
        ],
        "dkdv": [{"num_warps": w, "num_stages": s} for w in (4, 8) for s in (1, 2, 3)],
    }
    for kernel, options in candidates.items():
        default = range_attn.LAUNCH[kernel][64]
        for option in options:
            range_attn.LAUNCH[kernel][64] = option
            timed(kernel, option)
        range_attn.LAUNCH[kernel][64] = default
    default = range_attn.DKDV_PROGRAMS_PER_SM
    for per_sm in DKDV_TARGETS:
        range_attn.DKDV_PROGRAMS_PER_SM = per_sm
        timed("dkdv_programs_per_sm", {"programs_per_sm": per_sm})
    range_attn.DKDV_PROGRAMS_PER_SM = default
    range_attn.DKDV_CAP = range_attn.DKDV_NO_SPLIT
    timed("dkdv_programs_per_sm", {"programs_per_sm": "unsplit"})
    range_attn.DKDV_CAP = None
    return rows


def ssa_ms(inputs: list[torch.Tensor], layout) -> tuple[float, float]:
    q, k, v, gates = inputs
    return fwd_bwd_ms(
        lambda: spatial_sparse_attention(q, k, v, gates, None, layout.cu_seqlens, layout.cfg, layout=layout),
        inputs,
    )


def bench_set(name: str, coords: torch.Tensor, cfg: SSAConfig, skip_dense_above: int,
              kv_heads: list[int]) -> list[dict]:  # fmt: skip
    """One row per KV-head count: SSA's times, the dense methods' (timed once) and the speedups."""
    n = len(coords)
    cu = torch.tensor([0, n], device=coords.device)
    layout = build_layout(coords, cu, cfg)
    dense = {}
    if n <= skip_dense_above:
        q, k, v, _ = inputs_for(n, 0, coords.device)
        for label, backend in (("fa2", "flash"), ("cudnn", "cudnn")):
            dense[label] = bench_dense(q, k, v, backend)
    cmp_plan, win_plan = branch_plans(layout)
    rows = []
    for groups in kv_heads:
        inputs = inputs_for(n, 0, coords.device, groups)
        ssa_fwd, ssa_bwd = ssa_ms(inputs, layout)
        row = {"set": name, "tokens": n, "kv_heads": groups, "ssa_fwd_ms": ssa_fwd, "ssa_bwd_ms": ssa_bwd,
               "cmp_blocks": len(layout.cmp_offsets) - 1, "slc_blocks": len(layout.slc_offsets) - 1}  # fmt: skip
        slc_plan = selection_plan(layout, op_selection(inputs, layout), BLOCK_N)
        row.update(dkdv_counts({"cmp": cmp_plan, "slc": slc_plan, "win": win_plan}, groups, coords.device))
        for label, (fwd, bwd) in dense.items():
            row.update({f"{label}_fwd_ms": fwd, f"{label}_bwd_ms": bwd,
                        f"fwd_speedup_vs_{label}": fwd / ssa_fwd, f"bwd_speedup_vs_{label}": bwd / ssa_bwd})  # fmt: skip
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="small sizes only (a smoke test)")
    parser.add_argument("--breakdown", action="store_true", help="per-stage times on the table at R 128")
    parser.add_argument("--sweep", action="store_true", help="only a launch-option sweep (own JSON file)")
    parser.add_argument(
        "--skip-dense-above", type=int, default=10**9, help="skip dense baselines above N tokens"
    )
    parser.add_argument(
        "--kv-heads",
        type=int,
        nargs="+",
        default=[HEADS, 2],
        help=f"SSA's K/V head counts (dividing {HEADS})",
    )
    args = parser.parse_args()
    if any(HEADS % g for g in args.kv_heads):
        parser.error(f"--kv-heads must divide {HEADS}, got {args.kv_heads}")
    if not torch.cuda.is_available():
        raise SystemExit("this benchmark needs a CUDA device")
    device = torch.device("cuda")
    cfg = SSAConfig()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.sweep:
        coords = surface_tokens("table", LATENT_RES, device)
        rows = [row for groups in args.kv_heads for row in sweep(coords, cfg, device, groups)]
        atomic_write_json(args.out / "ssa_vs_dense_sweep.json", {"device": torch.cuda.get_device_name(),
                          "tokens": len(coords), "rows": rows})  # fmt: skip
        return
    sets = token_sets(args.quick, device)
    result: dict = {
        "benchmark": "ssa_vs_dense",
        "device": torch.cuda.get_device_name(),
        "software": {"torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version()},
        "setup": {"heads": HEADS, "kv_heads": args.kv_heads, "head_dim": HEAD_DIM, "dtype": "bf16", "batch": 1,
                  "ssa": {"block_cmp": cfg.block_cmp, "block_slc": cfg.block_slc, "topk": cfg.topk,
                          "window": cfg.window, "query_tile": cfg.query_tile},
                  "timing": "median of triton.testing.do_bench; backward alone; SSA on a prebuilt layout",
                  "dense": f"timed once per set with {HEADS} K/V heads, shared by the set's kv_heads rows"},
        "target_at_100k": TARGET,
        "aim_at_100k": AIM,
        "sizes": [],
    }  # fmt: skip
    for name, coords in sets:
        for row in bench_set(name, coords, cfg, args.skip_dense_above, args.kv_heads):
            result["sizes"].append(row)
            print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
        torch.cuda.empty_cache()

    result["at_100k_plus"] = {}
    for groups in args.kv_heads:
        big = [r for r in result["sizes"]
               if r["kv_heads"] == groups and r["tokens"] >= 100_000 and "fwd_speedup_vs_fa2" in r]  # fmt: skip
        if big:
            result["at_100k_plus"][f"kv_heads_{groups}"] = {
                "min_fwd_speedup_vs_fa2": min(r["fwd_speedup_vs_fa2"] for r in big),
                "min_bwd_speedup_vs_fa2": min(r["bwd_speedup_vs_fa2"] for r in big),
            }
    if args.breakdown:
        coords = dict(sets)[f"synth-table-R{LATENT_RES}"]
        result["breakdown_ms"] = [
            {"tokens": len(coords), "kv_heads": groups, **breakdown(coords, cfg, device, groups)}
            for groups in args.kv_heads
        ]
        print(result["breakdown_ms"])
    atomic_write_json(args.out / "ssa_vs_dense.json", result)
    columns = ("set", "tokens", "kv_heads", "ssa_fwd_ms", "ssa_bwd_ms", "fa2_fwd_ms", "fa2_bwd_ms", "cudnn_fwd_ms",
               "cudnn_bwd_ms", "fwd_speedup_vs_fa2", "bwd_speedup_vs_fa2", "fwd_speedup_vs_cudnn", "bwd_speedup_vs_cudnn")  # fmt: skip
    table = [{c: r.get(c) for c in columns} for r in result["sizes"]]
    render_table_png(
        table,
        args.out / "ssa_vs_dense.png",
        title=f"SSA vs dense attention, {result['device']}, bf16, H{HEADS} D{HEAD_DIM}",
    )
    for r in table:
        print(" | ".join(f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in columns))


if __name__ == "__main__":
    main()

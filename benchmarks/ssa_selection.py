"""What SSA's tile-shared top-k selection costs against the paper's per-token selection.

    python benchmarks/ssa_selection.py [--run DIT_RUN] [--quick] [--out benchmarks/results]

``SSAConfig.query_tile`` makes 64 consecutive queries of the block order share one top-k selection
per GQA group (what lets the selection kernel run dense tile x block products); the paper selects
per query token. For query tiles of 64, 32 and 16 this measures, on sampled whole tiles of queries
(:func:`meshforge.kernels.ssa.reference.tile_sharing_error`): the fraction of each query's own top-k
blocks that its tile's selection holds, and the relative error of the selection branch and of the
gated SSA output against per-token selection.

Two sources of queries and keys, both on real sparse latents:

- ``random``: synth shapes voxelised at the latent grid of a 1024^3 volume (R 128, as
  ``ssa_vs_dense.py``), unit-RMS random q/k/v (16 query heads, 2 KV heads, head dim 64) and
  gates 1/3: a baseline with no learned structure in the scores;
- ``dit``: with ``--run``, a ``train-dit`` run's own SS-DiT on its validation latents, noised to
  ``t`` in {0.25, 0.5, 0.75}: every SSA block's q/k/v and gates (captured with forward
  pre-hooks, through :meth:`SelfAttention.project` / :meth:`SelfAttention.ssa_operands`).

On CUDA it also times SSA (forward, backward) at each query tile on the largest set. Writes
``ssa_selection.json`` (device named) and a PNG of the summary table.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
from latent_tokens import surface_tokens  # the same real latents as the speed benchmark
from meshforge.kernels.ssa import SSAConfig, build_layout, spatial_sparse_attention
from meshforge.kernels.ssa.reference import compress_reference, tile_sharing_error

from meshforge.data.latents import LatentDataset
from meshforge.io import atomic_write_json
from meshforge.models.registry import load_model
from meshforge.models.ss_dit import LatentFlow, SelfAttention, interpolate
from meshforge.render import render_table_png
from meshforge.sparse.tensor import SparseTensor

TILES = (64, 32, 16)
FAMILIES = ("chair", "table")


def sample_rows(layout, tiles: int, seed: int) -> torch.Tensor:
    """Caller-order rows of ``tiles`` random whole query tiles of ``layout`` (the largest tile size)."""
    g = torch.Generator().manual_seed(seed)
    chosen = torch.randperm(len(layout.tile_start), generator=g)[:tiles].to(layout.tile.device)
    return torch.nonzero(torch.isin(layout.tile, chosen)).squeeze(1)


def layouts_for(coords: torch.Tensor, cu: torch.Tensor, cfg: SSAConfig) -> dict[int, object]:
    return {t: build_layout(coords, cu, dataclasses.replace(cfg, query_tile=t)) for t in TILES}


def random_rows(device: torch.device, tiles: int, latent_res: int) -> list[dict]:
    cfg = SSAConfig()
    rows = []
    for family in FAMILIES:
        coords = surface_tokens(family, latent_res, device)
        n = len(coords)
        cu = torch.tensor([0, n], device=device)
        layouts = layouts_for(coords, cu, cfg)
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(n, 16, 64, generator=g, device=device)
        k, v = (torch.randn(n, 2, 64, generator=g, device=device) for _ in range(2))
        gates = torch.full((n, 16, 3), 1 / 3, device=device)
        k_cmp, v_cmp = compress_reference(k, layouts[64]), compress_reference(v, layouts[64])
        picked = sample_rows(layouts[64], tiles, seed=0)
        for size, figures in tile_sharing_error(q, k, v, gates, layouts, picked, k_cmp, v_cmp).items():
            rows.append({"source": "random", "set": f"synth-{family}-R{latent_res}", "tokens": n, "layer": "-",
                         "t": "-", "query_tile": size, **figures})
    return rows


@torch.no_grad()
def dit_rows(run: Path, device: torch.device, tiles: int, shapes: int) -> list[dict]:
    model = load_model(run, device, expect=LatentFlow).model
    dit = model.dit
    if model.conditioner.data not in (None, "label"):
        raise SystemExit(f"{run}: the study runs unconditional and class-conditioned SS-DiTs only")
    if dit.config.attention != "ssa":
        raise SystemExit(f"{run}: this SS-DiT uses {dit.config.attention!r} attention, not SSA")
    captured: list[tuple[str, SelfAttention, SparseTensor]] = []
    for i, block in enumerate(dit.blocks):
        block.attn.register_forward_pre_hook(lambda mod, args, i=i: captured.append((f"block{i}", mod, args[0])))
    data = LatentDataset(run / "latents", "val")
    rows = []
    for index in range(min(shapes, len(data))):
        item = data[index]
        coords = torch.tensor(item.coords, dtype=torch.int64, device=device)
        feats = model.normalize(torch.tensor(item.feats, device=device))
        condition = torch.tensor([item.label], device=device) if model.conditioner.data == "label" else None
        cond = model.conditioner(condition, torch.zeros(1, dtype=torch.bool, device=device))
        for t in (0.25, 0.5, 0.75):
            g = torch.Generator(device=device).manual_seed(index)
            noise = torch.randn(feats.shape, generator=g, device=device)
            x = model.latent_tensor(torch.cat([torch.zeros_like(coords[:, :1]), coords], 1),
                                    interpolate(feats, noise, torch.full((len(feats),), t, device=device)), 1)
            captured.clear()
            dit(x, torch.full((1,), t, device=device), cond)
            for layer, attn, x_in in captured:
                q, k, v = attn.project(x_in)
                gates, _, k_cmp, v_cmp = attn.ssa_operands(k, v, x_in)
                layouts = layouts_for(x_in.coords, x_in.batch_offsets, attn.ssa)
                picked = sample_rows(layouts[64], tiles, seed=index)
                study = tile_sharing_error(q.float(), k.float(), v.float(), gates.float(), layouts, picked,
                                           k_cmp.float(), v_cmp.float())
                for size, figures in study.items():
                    rows.append({"source": "dit", "set": item.name, "tokens": len(x_in), "layer": layer, "t": t,
                                 "query_tile": size, **figures})
    return rows


def speed_rows(device: torch.device) -> list[dict]:
    """SSA forward and backward (ms, bf16, 16 query heads, 2 KV heads) at each query tile on the
    largest real latent set: what a smaller tile costs."""
    import triton

    coords = surface_tokens("table", 128, device)
    n = len(coords)
    cu = torch.tensor([0, n], device=device)
    g = torch.Generator(device=device).manual_seed(0)
    q = torch.randn(n, 16, 64, generator=g, device=device, dtype=torch.bfloat16).requires_grad_()
    k, v = (torch.randn(n, 2, 64, generator=g, device=device, dtype=torch.bfloat16).requires_grad_() for _ in range(2))
    gates = torch.rand(n, 16, 3, generator=g, device=device, dtype=torch.bfloat16).requires_grad_()
    rows = []
    for size in TILES:
        cfg = dataclasses.replace(SSAConfig(), query_tile=size)
        layout = build_layout(coords, cu, cfg)

        def forward(cfg=cfg, layout=layout):
            return spatial_sparse_attention(q, k, v, gates, coords, cu, cfg, layout=layout)

        out = forward()
        grad = torch.randn_like(out)

        def backward(out=out, grad=grad):
            return torch.autograd.grad(out, [q, k, v, gates], grad, retain_graph=True)

        fwd = triton.testing.do_bench(forward, warmup=10, rep=50, return_mode="median")
        bwd = triton.testing.do_bench(backward, warmup=10, rep=50, return_mode="median")
        rows.append({"set": "synth-table-R128", "tokens": n, "kv_heads": 2, "query_tile": size,
                     "fwd_ms": float(fwd), "bwd_ms": float(bwd)})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and worst figure per source and query tile."""
    out = []
    for source in dict.fromkeys(r["source"] for r in rows):
        for size in TILES:
            mine = [r for r in rows if r["source"] == source and r["query_tile"] == size]
            out.append({
                "source": source, "query_tile": size, "rows": len(mine),
                "overlap_mean": sum(r["overlap"] for r in mine) / len(mine),
                "overlap_min": min(r["overlap"] for r in mine),
                "slc_rel_err_mean": sum(r["slc_rel_err"] for r in mine) / len(mine),
                "out_rel_err_mean": sum(r["out_rel_err"] for r in mine) / len(mine),
                "out_rel_err_max": max(r["out_rel_err"] for r in mine),
            })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a train-dit run folder (its checkpoint and latents/)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tiles", type=int, default=32, help="query tiles of 64 sampled per layer and set")
    parser.add_argument("--shapes", type=int, default=4, help="validation latents of --run")
    parser.add_argument("--quick", action="store_true", help="small sets (a CPU smoke test)")
    args = parser.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rows = random_rows(device, 2 if args.quick else args.tiles, 32 if args.quick else 128)
    if args.run:
        rows += dit_rows(args.run, device, 2 if args.quick else args.tiles, 1 if args.quick else args.shapes)
    summary = summarise(rows)
    speed = speed_rows(device) if device.type == "cuda" else []
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "config": dataclasses.asdict(SSAConfig()),
        "dit_run": str(args.run) if args.run else None,
        "summary": summary,
        "speed": speed,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = "ssa_selection_quick" if args.quick else "ssa_selection"
    atomic_write_json(args.out / f"{name}.json", result)
    render_table_png(summary, args.out / f"{name}.png", title=f"SSA tile-shared vs per-token selection, {result['device']}")
    for r in summary + speed:
        print(" | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))


if __name__ == "__main__":
    main()

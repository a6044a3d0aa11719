"""What SSA's tile-shared top-k selection costs against the paper's per-token selection.

    python benchmarks/ssa_selection.py [--run DIT_RUN] [--quick] [--out benchmarks/results]
    python benchmarks/ssa_selection.py --ab 64=RUN_TILE64 16=RUN_TILE16   # the training A/B

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

``--ab`` compares ``train-dit`` runs that differ only in ``model.dit.ssa_query_tile`` (checked on
their ``config.yaml``): the loss at every logged step they share, the final validation losses, steps,
wall time and throughput. It goes under ``training_ab`` in ``ssa_selection.json`` (the other figures
there are kept) and to ``ssa_selection_ab.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

import torch
from latent_tokens import surface_tokens  # the same real latents as the speed benchmark
from meshforge.kernels.ssa import SSAConfig, build_layout, spatial_sparse_attention
from meshforge.kernels.ssa.reference import compress_reference, tile_sharing_error

from meshforge.config import load_yaml
from meshforge.data.latents import LatentDataset
from meshforge.errors import InputError
from meshforge.io import atomic_write_json
from meshforge.models.registry import load_model
from meshforge.models.ss_dit import LatentFlow, SelfAttention, interpolate
from meshforge.render import render_table_png
from meshforge.sparse.tensor import SparseTensor
from meshforge.train.logs import read_csv

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


# What may differ between the runs of the training A/B: the tile, and where each run lives.
AB_FREE = {("task_config", "model", "dit", "ssa_query_tile"), ("model", "dit", "ssa_query_tile"),
           ("task_config", "out"), ("train", "out")}


def _flat(tree: Any, prefix: tuple = ()) -> dict[tuple, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    return {k: v for key, sub in tree.items() for k, v in _flat(sub, (*prefix, key)).items()}


def training_ab(runs: dict[int, Path]) -> dict[str, Any]:
    """Runs of one DiT setup at different query tiles: losses at shared steps, validation, speed."""
    records = {tile: _flat(load_yaml(run / "config.yaml")) for tile, run in runs.items()}
    first_tile, first = next(iter(records.items()))
    for tile, record in records.items():
        differ = sorted(".".join(k) for k in set(first) | set(record)
                        if k not in AB_FREE and first.get(k) != record.get(k))
        if differ:
            raise InputError(runs[tile] / "config.yaml", f"differs from the tile-{first_tile} run in {differ[0]}: "
                             "the A/B needs runs that differ only in model.dit.ssa_query_tile")
    rows, curves = [], {}
    for tile, run in runs.items():
        summary = json.loads((run / "summary.json").read_text())
        logged = [r for r in read_csv(run / "metrics.csv") if "loss" in r]
        curves[tile] = {int(r["step"]): r["loss"] for r in logged}
        rows.append({"query_tile": tile, "steps": summary["last_step"], "wall_time_s": summary["wall_time_s"],
                     "samples_per_s": summary.get("samples_per_s"),
                     "loss_last_5_rows": statistics.fmean(r["loss"] for r in logged[-5:]),
                     "val_latent": summary.get("val_latent"), "val_structure": summary.get("val_structure")})
    shared = sorted(set.intersection(*(set(c) for c in curves.values())))
    return {"runs": {str(tile): str(run) for tile, run in runs.items()}, "rows": rows,
            "loss_at_shared_steps": [{"step": step, **{f"tile_{t}": c[step] for t, c in curves.items()}}
                                     for step in shared]}


def parse_ab(values: list[str]) -> dict[int, Path]:
    runs = {}
    for value in values:
        tile, _, run = value.partition("=")
        if not tile.isdigit() or not run:
            raise SystemExit(f"--ab takes TILE=RUN_DIR, got {value!r}")
        runs[int(tile)] = Path(run)
    if len(runs) < 2:
        raise SystemExit("--ab needs runs of at least two query tiles")
    return runs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a train-dit run folder (its checkpoint and latents/)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--tiles", type=int, default=32, help="query tiles of 64 sampled per layer and set")
    parser.add_argument("--shapes", type=int, default=4, help="validation latents of --run")
    parser.add_argument("--quick", action="store_true", help="small sets (a CPU smoke test)")
    parser.add_argument("--ab", nargs="+", metavar="TILE=RUN", help="only the training A/B of train-dit runs")
    args = parser.parse_args(argv)
    if args.ab:
        out = args.out / "ssa_selection.json"
        result = json.loads(out.read_text()) if out.is_file() else {}
        result["training_ab"] = ab = training_ab(parse_ab(args.ab))
        args.out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out, result)
        render_table_png(ab["rows"], args.out / "ssa_selection_ab.png", title="SS-DiT trained at each SSA query tile")
        for r in ab["rows"]:
            print(" | ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
        return
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

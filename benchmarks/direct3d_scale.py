"""Direct3D-S2 at its own scale on one GPU: SS-VAE steps at R 512 / 1024, the reference SS-DiT on
100k-token latents (SSA vs SDPA flash vs cuDNN), one 1024^3 sample, and the R 256 recipe's results.

    python benchmarks/direct3d_scale.py                                 # vae, dit, sample (H200: ~10 min)
    python benchmarks/direct3d_scale.py --sections dit --profile        # + top GPU operators of one SSA step
    python benchmarks/direct3d_scale.py --sections recipe_r256 --recipe-run runs/r256
    python benchmarks/direct3d_scale.py --quick                         # tiny sizes on the CPU (a minute)

Sections (each bounded by ``--budget-s`` seconds of timed steps, after one warm-up step):

``vae``     one trainer-equivalent SS-VAE step (the training task's batches and loss, bf16 autocast,
            AdamW) at R 512 batch 2, R 1024 batch 1, and with the VAE's gradient checkpointing at R 1024
            batch 1 and 2, on synth shapes voxelised at that R.
``dit``     one trainer-equivalent step (rectified-flow loss, backward, AdamW; bf16 autocast) of the
            reference SS-DiT of ``recipes/direct3d_reference.yaml``, unconditional, on the latent
            token sets of synth shapes at ~16k, ~64k and >= 100k tokens. The token sets are the
            sparse-SDF band voxels at the latent grid's resolution (R / 8): the voxels an 8x SS-VAE
            keeps, since the tokens (not the latent values) are what sets the speed; features are
            random. Dense rows (SDPA flash "fa2", cuDNN) run ``--dense-blocks`` blocks and scale the
            step to the model's depth (``estimated: true``).
``sample``  one shape from noise to mesh at R 1024, 30 Euler steps with CFG, untrained weights
            (timing only): the structure flow on its dense grid, the latent flow on a real shape's
            token set (an untrained structure flow leaves half the grid occupied), the SS-VAE
            decode and sparse marching cubes.
``recipe_r256``  read from a finished ``meshforge run recipes/direct3d_r256.yaml`` folder.

Writes ``benchmarks/results/direct3d_scale.json`` (``--quick``: ``direct3d_scale_quick.json``),
merging the sections run now into those already there, and the table beside it as ``.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from latent_tokens import surface_tokens

from meshforge.config import from_dict, load_yaml
from meshforge.data.sdf_voxelize import SdfConfig, voxelize_folder
from meshforge.data.synth import generate
from meshforge.io import atomic_write_json
from meshforge.models.ss_dit import SSDiT, SSDiTConfig, flow_loss_terms, occupancy_patches
from meshforge.models.ss_vae import SSVAE, SSVAEConfig
from meshforge.render import report_measures
from meshforge.runtime import console, cpu_model, resolve_device, seed_everything, to_device
from meshforge.sample.flow import guided_velocity, integrate
from meshforge.sparse.conv import MAX_FEATURE_BYTES
from meshforge.sparse.tensor import SparseTensor
from meshforge.train.config import TrainConfig
from meshforge.train.distributed import DistEnv
from meshforge.train.tasks.vae import VAETask, VaeTaskConfig
from meshforge.train.trainer import TrainingRun, autocast_dtype

CHECKOUT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
REFERENCE = CHECKOUT / "recipes" / "direct3d_reference.yaml"
LATENT_CHANNELS = 8
DENSE = {"fa2": "flash", "cudnn": "cudnn"}  # benchmark name -> SSDiTConfig.dense_backend


@dataclass
class Sizes:
    vae_rows: list[tuple[int, int, bool]]  # (resolution, batch, gradient checkpointing)
    vae_model: dict | None  # None: the reference recipe's
    dit_model: dict  # overrides of the reference recipe's SS-DiT
    dit_grids: list[int]  # latent grids G whose table token sets give ~16k, ~64k, >= 100k tokens
    dense: dict[str, str]  # attention name -> dense_backend
    sample_resolution: int
    max_faces: int


FULL = Sizes(vae_rows=[(512, 2, False), (1024, 1, False), (1024, 1, True), (1024, 2, True)], vae_model=None, dit_model={}, dit_grids=[48, 96, 128],
             dense=DENSE, sample_resolution=1024, max_faces=800)  # fmt: skip
QUICK = Sizes(
    vae_rows=[(32, 2, False), (64, 1, False), (64, 1, True)],
    vae_model={"channels": [8, 8, 8, 16], "res_blocks": 1, "attn_blocks": 1, "heads": 2, "window": 4},
    dit_model={"dim": 64, "depth": 2, "heads": 4, "kv_heads": 2, "ssa_block_cmp": 2, "ssa_block_slc": 4, "window": 4},
    dit_grids=[12, 16], dense={"dense-math": "math"}, sample_resolution=64, max_faces=60,
)  # fmt: skip


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({cpu_model()})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def reference_models() -> tuple[SSVAEConfig, SSDiTConfig, dict[str, Any]]:
    """The SS-VAE, the latent SS-DiT and the train-dit model section of the reference recipe."""
    steps = {step["stage"]: step for step in load_yaml(REFERENCE)["steps"]}
    dit_model = steps["train-dit"]["model"]
    return from_dict(SSVAEConfig, steps["train-vae"]["model"]), from_dict(SSDiTConfig, dit_model["dit"]), dit_model


def timed_steps(step: Callable[[], Any], device: torch.device, budget_s: float, max_steps: int = 5) -> list[float]:
    """Seconds of each ``step()`` after one warm-up (compilation), until ``budget_s`` or ``max_steps``."""
    step()
    sync(device)
    times: list[float] = []
    while len(times) < max_steps and sum(times) < budget_s:
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return times


def failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


# ---------------------------------------------------------------------------------------------
# vae


def vae_step(task: VAETask, cfg: VaeTaskConfig, device: torch.device, voxels: list[int]) -> Callable[[], None]:
    """One step as the trainer takes it (:meth:`TrainingRun.train_step`): the task's next batch, loss
    under autocast, backward, clipping, the non-finite check, AdamW."""
    run = TrainingRun(task, TrainConfig.from_options(cfg, seed=0), cfg.out, DistEnv(), device)
    model = run.model.train()
    batches = task.batches(0, 1, seed=0, start_step=0)

    def step() -> None:
        batch = to_device(next(batches), device)
        voxels.append(len(batch["sdf"]))
        run.train_step(model, batch)

    return step


def vae_section(sizes: Sizes, device: torch.device, work: Path, budget_s: float) -> list[dict]:
    model_cfg = sizes.vae_model or dataclasses.asdict(reference_models()[0])
    rows = []
    generate(work / "synth", 6, seed=0, max_faces=sizes.max_faces, families=["table", "stool", "cabinet"])
    for resolution, batch_size, recompute in sizes.vae_rows:
        data = work / f"sdf{resolution}"
        voxelize_folder(SdfConfig(input=work / "synth", out=data, resolution=resolution, val_fraction=0.25,
                                  workers=0), device)  # a later row of the same resolution finds it done
        cfg = from_dict(VaeTaskConfig, {"data": data, "out": work / f"vae{resolution}-b{batch_size}-{recompute}",
                                        "batch_size": batch_size, "model": model_cfg | {"grad_checkpoint": recompute},
                                        "optimizer": "adamw"})
        seed_everything(0)
        reset_peak(device)
        row: dict[str, Any] = {"resolution": resolution, "batch": batch_size, "grad_checkpoint": recompute}
        voxels: list[int] = []
        try:
            times = timed_steps(vae_step(VAETask(cfg), cfg, device, voxels), device, budget_s)
            row.update(input_voxels=round(statistics.mean(voxels)), step_s=round(statistics.median(times), 3),
                       steps_timed=len(times), peak_gib=peak_gib(device))
        except (RuntimeError, AssertionError) as exc:  # spconv's int32 assertion, out of memory
            row.update(error=failure(exc), peak_gib=peak_gib(device))
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# dit


def table_tokens(grid: int, device: torch.device) -> torch.Tensor:
    """int32 ``(0, x, y, z)`` band voxels of the synth table at resolution ``grid``: a latent token set."""
    xyz = surface_tokens("table", grid, device).int()
    return torch.cat([torch.zeros(len(xyz), 1, dtype=torch.int32, device=device), xyz], 1)


def dit_config(sizes: Sizes, attention: str, dense_backend: str, depth: int | None) -> SSDiTConfig:
    base = dataclasses.asdict(reference_models()[1]) | sizes.dit_model
    base |= {"attention": "ssa" if attention == "ssa" else "full", "dense_backend": dense_backend}
    if depth is not None:
        base["depth"] = depth
    return from_dict(SSDiTConfig, base)


def dit_step(cfg: SSDiTConfig, coords: torch.Tensor, grid: int, device: torch.device):
    """(model, one trainer-equivalent step) of an unconditional SS-DiT on one latent."""
    seed_everything(0)
    model = SSDiT(cfg, LATENT_CHANNELS, 0).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    amp = autocast_dtype("auto", device)
    feats = torch.randn(len(coords), LATENT_CHANNELS, device=device)

    def step() -> None:
        # A fresh tensor per step, as the trainer's batches are: layouts are rebuilt every step.
        x0 = SparseTensor(feats, coords, (grid,) * 3, 1)
        t = torch.rand(1, device=device)
        with torch.autocast(device.type, amp, enabled=amp is not None):
            total, count = flow_loss_terms(model, x0, t, None)
        (total / count).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return model, step


def dit_section(sizes: Sizes, device: torch.device, budget_s: float, dense_blocks: int) -> list[dict]:
    rows = []
    depth = dit_config(sizes, "ssa", "auto", None).depth
    for grid in sizes.dit_grids:
        coords = table_tokens(grid, device)
        for attention in ["ssa", *sizes.dense]:
            blocks = depth if attention == "ssa" else min(dense_blocks, depth)
            cfg = dit_config(sizes, attention, sizes.dense.get(attention, "auto"), blocks)
            reset_peak(device)
            row: dict[str, Any] = {"tokens": len(coords), "latent_grid": grid, "attention": attention}
            try:
                _, step = dit_step(cfg, coords, grid, device)
                times = timed_steps(step, device, budget_s / (len(sizes.dense) + 1) / len(sizes.dit_grids))
                measured = statistics.median(times)
                row.update(step_s=round(measured * depth / blocks, 3), peak_gib=peak_gib(device),
                           blocks_measured=blocks, estimated=blocks != depth, steps_timed=len(times))
            except (RuntimeError, AssertionError) as exc:
                row.update(error=failure(exc), blocks_measured=blocks, estimated=blocks != depth)
            rows.append(row)
    return rows


def dit_speedups(rows: list[dict]) -> dict[str, float]:
    """SSA's step speedup over each dense row at the largest token set measured."""
    largest = max(r["tokens"] for r in rows)
    at = {r["attention"]: r.get("step_s") for r in rows if r["tokens"] == largest}
    return {f"ssa_vs_{name}": round(s / at["ssa"], 2) for name, s in at.items() if name != "ssa" and s and at.get("ssa")}


def profile_dit(sizes: Sizes, device: torch.device, rows: int = 25) -> str:
    """Top operators (by device time on CUDA) of one SSA step at the largest token set."""
    from torch.profiler import ProfilerActivity, profile

    grid = sizes.dit_grids[-1]
    coords = table_tokens(grid, device)
    _, step = dit_step(dit_config(sizes, "ssa", "auto", None), coords, grid, device)
    step()
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        step()
        sync(device)
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows, max_name_column_width=70)


# ---------------------------------------------------------------------------------------------
# sample


def sample_section(sizes: Sizes, device: torch.device, steps: int = 30, cfg_scale: float = 7.0) -> dict:
    vae_cfg, _, dit_model = reference_models()
    if sizes.vae_model:
        vae_cfg = from_dict(SSVAEConfig, sizes.vae_model)
    r = sizes.sample_resolution
    grid = r // vae_cfg.factor
    patch = int(dit_model.get("structure_patch", 2))
    latent_cfg = dit_config(sizes, "ssa", "auto", None)
    structure_cfg = from_dict(SSDiTConfig, dit_model["structure"] | ({"dim": 32, "depth": 1, "heads": 2, "kv_heads": 2}
                                                                      if sizes.dit_model else {}))
    seed_everything(0)
    cond_dim = 16
    structure = SSDiT(structure_cfg, patch**3, cond_dim).to(device).eval()
    latent = SSDiT(latent_cfg, LATENT_CHANNELS, cond_dim).to(device).eval()
    vae = SSVAE(vae_cfg).to(device).eval()
    from meshforge.models.conditioning import Cond

    def cond(value: float) -> Cond:
        tokens = torch.full((1, 1, cond_dim), value, device=device)
        return Cond(tokens, torch.ones(1, 1, dtype=torch.bool, device=device), tokens[:, 0])

    generator = torch.Generator(device=device).manual_seed(0)
    coords = table_tokens(grid, device)
    amp = autocast_dtype("auto", device)
    reset_peak(device)
    seconds: dict[str, float] = {}
    with torch.no_grad(), torch.autocast(device.type, amp, enabled=amp is not None):
        sync(device)
        start = time.perf_counter()
        dense = occupancy_patches(coords, 1, grid, patch)
        noise = torch.randn(dense.feats.shape, generator=generator, device=device)
        integrate(guided_velocity(structure, dense, cond(1.0), cond(0.0), cfg_scale), noise, steps)
        sync(device)
        seconds["structure_flow"] = time.perf_counter() - start
        template = SparseTensor(torch.zeros(len(coords), LATENT_CHANNELS, device=device), coords, (grid,) * 3, 1)
        noise = torch.randn(template.feats.shape, generator=generator, device=device)
        feats = integrate(guided_velocity(latent, template, cond(1.0), cond(0.0), cfg_scale), noise, steps)
        sync(device)
        seconds["latent_flow"] = time.perf_counter() - seconds["structure_flow"] - start
        meshes = vae.decode_to_mesh(template.replace(feats))
        sync(device)
        seconds["decode_and_mesh"] = time.perf_counter() - sum(seconds.values()) - start
    return {"resolution": r, "latent_tokens": len(coords), "steps": steps, "cfg_scale": cfg_scale,
            "seconds": round(sum(seconds.values()), 2), **{f"{k}_s": round(v, 2) for k, v in seconds.items()},
            "peak_gib": peak_gib(device), "faces": len(meshes[0][1]), "weights": "untrained (timing only)"}


# ---------------------------------------------------------------------------------------------
# recipe_r256


# The run's small outputs, kept beside the JSON: run folders hold GBs of data and checkpoints.
RECIPE_KEEP = ("samples/dit/grid.png", "samples/dit/stats.json", "eval/*.json", "manifests/*.json",
               "vae/summary.json", "vae/metrics.csv", "vae/curves.png", "vae/config.yaml",
               "dit/summary.json", "dit/metrics.csv", "dit/curves.png", "dit/config.yaml")


def keep_recipe_outputs(run: Path, keep: Path) -> list[str]:
    """Copy :data:`RECIPE_KEEP` from ``run`` into ``keep`` (same relative paths); the copied paths."""
    copied = []
    for pattern in RECIPE_KEEP:
        for source in sorted(run.glob(pattern)):
            target = keep / source.relative_to(run)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
            copied.append(str(source.relative_to(run)))
    return copied


def recipe_section(run: Path, keep: Path) -> dict:
    """The R 256 recipe's figures from its run folder (the paths recipes/direct3d_r256.yaml writes),
    its small outputs copied into ``keep``."""

    def read(relative: str) -> dict:
        path = run / relative
        return json.loads(path.read_text()) if path.is_file() else {"missing": str(path)}

    manifests = sorted((run / "manifests").glob("*.json"))
    wall = {p.stem: json.loads(p.read_text()).get("wall_time_s") for p in manifests}
    recon = read("eval/recon.json")
    generation = read("eval/generation.json")
    keep_recon = ("chamfer", "fscore", "normal_consistency", "input_sdf_chamfer", "input_sdf_fscore",
                  "input_sdf_normal_consistency", "meshes", "failed")
    kept = keep_recipe_outputs(run, keep)
    # Paths inside the checkout are recorded relative to it, so the JSON reads the same on every machine.
    shown = keep.resolve().relative_to(CHECKOUT) if keep.resolve().is_relative_to(CHECKOUT) else keep
    return {
        "run": str(run),
        "kept_in": str(shown),
        "grid_png": str(shown / "samples" / "dit" / "grid.png") if "samples/dit/grid.png" in kept else None,
        "wall_time_s": wall,
        "total_wall_time_s": round(sum(v for v in wall.values() if v), 1),
        "recon": {k: recon.get(k) for k in keep_recon} if "missing" not in recon else recon,
        "generation": {k: v for k, v in generation.items() if isinstance(v, (int, float, str))},
    }


# ---------------------------------------------------------------------------------------------


def gib(value: float | None) -> str:
    return "n/a (CPU)" if value is None else f"{value} GiB"


def table_rows(result: dict) -> list[dict]:
    shown = []
    for row in result.get("vae", []):
        value = row.get("error") or f"{row['step_s']} s, {gib(row['peak_gib'])} ({row['input_voxels']:,} voxels)"
        recompute = ", checkpointed" if row.get("grad_checkpoint") else ""
        shown.append({"measure": f"SS-VAE step R={row['resolution']} batch {row['batch']}{recompute}", "value": value})
    for row in result.get("dit", []):
        est = f" (est. from {row['blocks_measured']} blocks)" if row.get("estimated") else ""
        value = row.get("error") or f"{row['step_s']} s, {gib(row['peak_gib'])}{est}"
        shown.append({"measure": f"SS-DiT step {row['tokens']:,} tokens {row['attention']}", "value": value})
    for name, value in result.get("dit_speedup_at_largest", {}).items():
        shown.append({"measure": name.replace("_", " "), "value": f"{value}x"})
    if "sample" in result:
        s = result["sample"]
        shown.append({"measure": f"sample R={s['resolution']} ({s['steps']} steps, CFG, untrained)",
                      "value": f"{s['seconds']} s, {gib(s['peak_gib'])}, {s['faces']:,} faces"})
    if "recipe_r256" in result:
        rec = result["recipe_r256"]
        shown.append({"measure": "recipe r256 wall time", "value": f"{rec['total_wall_time_s']} s"})
        recon = rec["recon"]
        if recon.get("fscore") is not None:
            shown.append({"measure": "recipe r256 recon (F@0.01 / input floor)",
                          "value": f"{recon['fscore']:.3f} / {recon['input_sdf_fscore']:.3f}"})
        numbers = {k: v for k, v in rec["generation"].items() if isinstance(v, float)}
        if numbers:
            shown.append({"measure": "recipe r256 samples vs val",
                          "value": ", ".join(f"{k} {v:.3g}" for k, v in numbers.items())})
    return shown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes on the CPU, to check the code path")
    parser.add_argument("--sections", default="vae,dit,sample", help="comma-separated: vae, dit, sample, recipe_r256")
    parser.add_argument("--recipe-run", type=Path, help="run folder of recipes/direct3d_r256.yaml (for recipe_r256)")
    parser.add_argument("--budget-s", type=float, default=60.0, help="seconds of timed steps per section")
    parser.add_argument("--dense-blocks", type=int, default=2, help="blocks the dense rows run (scaled to the depth)")
    parser.add_argument("--profile", action="store_true", help="print the top operators of one SSA DiT step")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    device = resolve_device("cpu" if args.quick else args.device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as the trainer does
    out = args.out or RESULTS / ("direct3d_scale_quick.json" if args.quick else "direct3d_scale.json")
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - {"vae", "dit", "sample", "recipe_r256"}
    if unknown:
        parser.error(f"unknown sections: {', '.join(sorted(unknown))}")
    if "recipe_r256" in sections and args.recipe_run is None:
        parser.error("--sections recipe_r256 needs --recipe-run RUN_DIR")

    result = json.loads(out.read_text()) if out.is_file() else {}
    result |= {"benchmark": "direct3d_scale", "device": device_name(device), "torch": torch.__version__,
               "quick": args.quick, "reference": str(REFERENCE.relative_to(REFERENCE.parents[1])),
               "spconv_slab_bytes": MAX_FEATURE_BYTES,
               "dit_tokens": "band voxels of sdf-voxelize at the latent grid R/8 (what an 8x SS-VAE keeps); "
                             "random features; unconditional; bf16 autocast on CUDA; the reference recipe's "
                             "grad_checkpoint (as set there) for every attention"}
    with tempfile.TemporaryDirectory() as tmp:
        if "vae" in sections:
            result["vae"] = vae_section(sizes, device, Path(tmp), args.budget_s)
        if "dit" in sections:
            result["dit"] = dit_section(sizes, device, args.budget_s, args.dense_blocks)
            result["dit_speedup_at_largest"] = dit_speedups(result["dit"])
        if "sample" in sections:
            result["sample"] = sample_section(sizes, device)
    if "recipe_r256" in sections:
        result["recipe_r256"] = recipe_section(args.recipe_run, out.parent / "direct3d_r256")
    atomic_write_json(out, result)

    shown = table_rows(result)
    title = f"Direct3D-S2 at scale on {result['device']}"
    png = report_measures(shown, out.with_suffix(".png"), title)
    console.print(f"wrote {out} and {png}")
    if args.profile:
        console.print(profile_dit(sizes, device))


if __name__ == "__main__":
    main()

"""Sparse SDF family on one GPU: voxelisation speed, SS-VAE training step, reconstruction quality.

    python benchmarks/sparse_vae.py            # GPU figures (H100: a few minutes)
    python benchmarks/sparse_vae.py --smoke    # the same code path, tiny, on the CPU (a minute)

1. ``sdf-voxelize`` throughput (meshes/s, voxels per mesh) of synth meshes at each ``--vox-res``.
2. SS-VAE training step at ``step_res`` (512^3-scale inputs): median step time and peak memory,
   bf16 autocast on CUDA, through the training task's own batches and loss.
3. A short training run (the one trainer) at ``train_res``, then ``eval --metric recon`` on
   the val split: Chamfer, F-score@0.01, normal consistency against the input meshes.

Prints a table and writes ``benchmarks/results/sparse_vae.json`` (``--smoke``: ``sparse_vae_smoke.json``)
naming the device, the table beside it as ``.png`` and the val inputs next to their
reconstructions as ``*_recon.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from meshforge.config import from_dict, to_dict
from meshforge.data.sdf_dataset import SparseSDFDataset
from meshforge.data.sdf_voxelize import SdfConfig, voxelize_folder
from meshforge.data.synth import generate
from meshforge.io import atomic_write_bytes, atomic_write_json
from meshforge.metrics.recon import evaluate_reconstruction
from meshforge.render import report_measures
from meshforge.runtime import console, cpu_model, resolve_device, to_device
from meshforge.train.config import TrainConfig
from meshforge.train.distributed import DistEnv
from meshforge.train.tasks.vae import VAETask, VaeTaskConfig
from meshforge.train.trainer import TrainingRun, train

RESULTS = Path(__file__).parent / "results"


@dataclass
class Sizes:
    meshes: int
    max_faces: int
    families: list[str] | None  # None: all of them
    vox_res: tuple[int, ...]
    step_res: int
    step_model: dict
    step_batch: int
    step_iters: int
    train_res: int
    train_model: dict
    train_steps: int
    train_minutes: float  # the trainer's time limit (0: none): ends the run early, as at its last step
    train_batch: int
    points: int


FULL = Sizes(
    meshes=16, max_faces=800, families=None, vox_res=(256, 512, 1024),
    step_res=512, step_model={"channels": [32, 64, 128, 256], "res_blocks": 1, "attn_blocks": 2, "window": 8, "heads": 4},
    step_batch=1, step_iters=10,  # two shapes at 512 overflow spconv's int32 feature offsets (2^31 bytes)
    train_res=256, train_model={"channels": [32, 64, 128], "res_blocks": 1, "attn_blocks": 2, "window": 8, "heads": 4},
    train_steps=300, train_minutes=1.5, train_batch=4, points=100_000,
)  # fmt: skip
SMOKE = Sizes(
    meshes=6, max_faces=60, families=["table", "stool", "cabinet"], vox_res=(16, 32),
    step_res=32, step_model={"channels": [8, 16], "res_blocks": 1, "attn_blocks": 1, "window": 4, "heads": 2},
    step_batch=2, step_iters=2,
    train_res=32, train_model={"channels": [8, 16], "res_blocks": 1, "attn_blocks": 1, "window": 4, "heads": 2},
    train_steps=4, train_minutes=0.0, train_batch=2, points=2_000,
)  # fmt: skip


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({cpu_model()})"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def voxelisation(synth: Path, root: Path, resolutions: tuple[int, ...], device: torch.device) -> list[dict]:
    rows = []
    for r in resolutions:
        sync(device)
        start = time.perf_counter()
        summary = voxelize_folder(SdfConfig(input=synth, out=root / f"sdf{r}", resolution=r, val_fraction=0.25,
                                            workers=0), device)
        seconds = time.perf_counter() - start
        rows.append({"resolution": r, "meshes": summary["meshes"], "seconds": round(seconds, 3),
                     "meshes_per_s": round(summary["meshes"] / seconds, 3),
                     "voxels_per_mesh": round(summary["voxels"] / summary["meshes"])})
    return rows


def train_step(data: Path, sizes: Sizes, device: torch.device, work: Path) -> dict:
    """Median time and peak memory of the trainer's step (forward, backward, clipping, the non-finite
    check, optimizer) at ``step_res``, on batches already on the device."""
    cfg = from_dict(VaeTaskConfig, {"data": data, "out": work, "batch_size": sizes.step_batch,
                                    "model": sizes.step_model, "optimizer": "adamw"})
    task = VAETask(cfg)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # as the trainer does: TF32 for float32 matmuls and convs
    train_cfg = TrainConfig.from_options(cfg, seed=0)
    run = TrainingRun(task, train_cfg, work, DistEnv(), device)  # the trainer's own model, optimizers and step
    model = run.model.train()
    amp = run.amp_dtype
    batches = task.batches(0, 1, seed=0, start_step=0)
    times, voxels = [], []
    warmup = 2
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(warmup + sizes.step_iters):
        batch = to_device(next(batches), device)
        sync(device)
        start = time.perf_counter()
        run.train_step(model, batch)
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
            voxels.append(len(batch["sdf"]))
    params = sum(p.numel() for p in model.parameters())
    return {
        "resolution": sizes.step_res,
        "batch_size": sizes.step_batch,
        "model": to_dict(task.model_config()),
        "parameters": params,
        "precision": str(amp).replace("torch.", "") if amp else "fp32",
        "sparse_conv_precision": "fp32, TF32 allowed" if device.type == "cuda" else "fp32",  # no autocast
        "step_ms_median": round(1000 * statistics.median(times), 1),
        "step_ms_min": round(1000 * min(times), 1),
        "input_voxels_per_step": round(statistics.mean(voxels)),
        "voxels_per_s": round(sum(voxels) / sum(times)),
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
    }


def short_training(data: Path, sizes: Sizes, device: torch.device, work: Path) -> dict:
    cfg = from_dict(VaeTaskConfig, {
        "data": data, "out": work / "run", "batch_size": sizes.train_batch, "model": sizes.train_model,
        "steps": sizes.train_steps, "warmup_steps": max(1, sizes.train_steps // 20), "lr": 1e-3,
        "log_every": max(1, sizes.train_steps // 10), "eval_every": 0, "checkpoint_every": sizes.train_steps,
        "time_limit_min": sizes.train_minutes,
    })  # fmt: skip
    summary = train(VAETask(cfg), TrainConfig.from_options(cfg, seed=0), cfg.out, device=str(device))
    recon = evaluate_reconstruction(cfg.out, data, split="val", device=device, out=work / "recon", points=sizes.points)
    keep = ("chamfer", "fscore", "normal_consistency", "input_sdf_chamfer", "input_sdf_fscore",
            "input_sdf_normal_consistency", "fscore_tau", "points", "meshes", "failed")
    return {
        "resolution": sizes.train_res, "steps": summary["last_step"], "planned_steps": sizes.train_steps,
        "time_limit_min": sizes.train_minutes, "batch_size": sizes.train_batch,
        "model": sizes.train_model, "wall_time_s": summary["wall_time_s"], "final_loss": summary.get("loss"),
        "train_meshes": len(SparseSDFDataset(data, "train")),
        **{k: recon[k] for k in keep},
    }  # fmt: skip


def metrics_text(recon: dict, prefix: str) -> str:
    values = [recon[f"{prefix}{name}"] for name in ("chamfer", "fscore", "normal_consistency")]
    if None in values:
        return "no surface"
    return f"CD {values[0]:.2e}  F {values[1]:.3f}  NC {values[2]:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU, to check the code path")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--meshes", type=int, help="synth meshes (default: 16, smoke 6)")
    parser.add_argument("--vox-res", type=int, nargs="+", help="voxelisation resolutions to time")
    parser.add_argument("--train-steps", type=int, help="steps of the short training run")
    args = parser.parse_args(argv)
    sizes = SMOKE if args.smoke else FULL
    overrides = {"meshes": args.meshes, "vox_res": tuple(args.vox_res or ()) or None, "train_steps": args.train_steps}
    sizes = dataclasses.replace(sizes, **{k: v for k, v in overrides.items() if v is not None})
    device = resolve_device("cpu" if args.smoke else args.device)
    out = args.out or RESULTS / ("sparse_vae_smoke.json" if args.smoke else "sparse_vae.json")

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        generate(work / "synth", sizes.meshes, seed=0, max_faces=sizes.max_faces, families=sizes.families)
        resolutions = tuple(sorted(set(sizes.vox_res) | {sizes.step_res, sizes.train_res}))
        vox = voxelisation(work / "synth", work, resolutions, device)
        step = train_step(work / f"sdf{sizes.step_res}", sizes, device, work / "step")
        recon = short_training(work / f"sdf{sizes.train_res}", sizes, device, work)
        # Inputs and reconstructions side by side, kept beside the results (the work folder goes).
        compare = out.with_name(f"{out.stem}_recon.png")
        atomic_write_bytes(compare, (work / "recon" / "compare.png").read_bytes())

    result = {
        "benchmark": "sparse_vae",
        "device": device_name(device),
        "torch": torch.__version__,
        "smoke": args.smoke,
        "voxelize": [row for row in vox if row["resolution"] in sizes.vox_res],
        "train_step": step,
        "reconstruction": recon,
    }
    atomic_write_json(out, result)

    shown = [
        *({"measure": f"voxelise R={row['resolution']}",
           "value": f"{row['meshes_per_s']} meshes/s ({row['voxels_per_mesh']:,} voxels/mesh)"}
          for row in result["voxelize"]),
        {"measure": f"train step R={step['resolution']} batch {step['batch_size']}",
         "value": f"{step['step_ms_median']} ms ({step['input_voxels_per_step']:,} voxels)"},
        {"measure": "peak memory",
         "value": f"{step['peak_memory_gib']} GiB" if step["peak_memory_gib"] is not None else "n/a (CPU)"},
        {"measure": f"recon after {recon['steps']} steps at R={recon['resolution']} "
                    f"({recon['failed']} failed)",
         "value": metrics_text(recon, "")},
        {"measure": f"input SDF floor (F@{recon['fscore_tau']})", "value": metrics_text(recon, "input_sdf_")},
    ]  # fmt: skip
    title = f"sparse SDF VAE on {result['device']}"
    png = report_measures(shown, out.with_suffix(".png"), title)
    console.print(f"wrote {out}, {png} and {compare}")


if __name__ == "__main__":
    main()

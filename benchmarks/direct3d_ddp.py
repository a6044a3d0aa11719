"""Data parallelism of ``train-vae --gpus N`` and ``train-dit --gpus N``: the same runs on 1 process and on N.

    python benchmarks/direct3d_ddp.py [--gpus 2] [--resolution 1024] [--meshes 16] [--batch-size 2]
        [--vae-steps 20] [--dit-steps 8] [--log-every 2] [--only vae dit] [--quick] [--out WORK] [--result JSON]

Synth meshes voxelised at ``--resolution`` (the reference recipe's 1024 by default), then the real CLI
four times: ``train-vae`` into ``WORK/vae_gpus1`` and ``WORK/vae_gpusN``, and ``train-dit`` into
``WORK/dit_gpus1`` (which encodes the SDF data with the 1-process VAE into its ``latents/``) and
``WORK/dit_gpusN`` (on those latents): same data, seed, global ``--batch-size`` and steps, at the model
sizes of ``recipes/direct3d_reference.yaml`` (the VAE's resolutions those of the recipe up to
``--resolution``). Every item's noise, timesteps and CFG dropout come from its own seed, so the two
curves differ only by the order of floating-point reductions (and, under bf16 autocast, the rounding
that order changes); ``--tolerance`` is what counts as matching.

Reports per model: the max and mean absolute difference of the logged losses, the throughput of 1 and
N processes (samples/s, tokens/s: input voxels for the VAE, latent tokens for the DiT; the median
over the logged rows after the first, whose window holds the warm-up), the scaling efficiency, and
every rank's peak CUDA memory (``summary.json``). Writes ``--result`` (JSON naming the device) and a
PNG of the curves beside it. ``--quick``: tiny models at R 16 on the CPU (N gloo processes), a smoke
test of seconds.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
from ddp_runs import (
    CLI,
    child_env,
    compare_curves,
    comparison_table,
    device_name,
    plot,
    read_curve,
    run_training,
    scaling,
)

from meshforge.config import load_yaml
from meshforge.io import atomic_write_json
from meshforge.runtime import console

RESULT = Path(__file__).parent / "results" / "direct3d_ddp.json"
REFERENCE = Path(__file__).parents[1] / "recipes" / "direct3d_reference.yaml"
# --quick: the CPU tests' sizes (tests/train/test_vae_task.py, test_dit_task.py).
QUICK_VAE = {"channels": [8, 16], "latent_channels": 4, "heads": 2, "window": 4, "attn_blocks": 1}
QUICK_DIT = {"dit": {"dim": 32, "depth": 2, "heads": 4, "kv_heads": 2, "attention": "window", "window": 4},
             "structure": {"dim": 32, "depth": 1, "heads": 2, "kv_heads": 2, "attention": "full"},
             "structure_patch": 2, "cond": {"kind": "class", "dim": 16}}


def flat_sets(section: dict[str, Any], prefix: str = "model") -> list[str]:
    """A nested model mapping as ``--set model.a.b=JSON`` arguments."""
    out: list[str] = []
    for key, value in section.items():
        if isinstance(value, dict):
            out += flat_sets(value, f"{prefix}.{key}")
        else:
            out += ["--set", f"{prefix}.{key}={json.dumps(value)}"]
    return out


def reference_steps() -> dict[str, dict[str, Any]]:
    return {step["stage"]: step for step in load_yaml(REFERENCE)["steps"]}


def make_data(args: argparse.Namespace, root: Path, env: dict[str, str]) -> Path:
    """``--meshes`` synth meshes voxelised at ``--resolution`` (resumed in ``root``), by the CLI in a
    child process: this one must hold no CUDA memory while the runs measure theirs."""
    from meshforge.data.synth import generate

    if not (root / "synth").is_dir():
        generate(root / "synth", args.meshes, args.seed, families=["table", "stool", "cabinet"])
    sdf = root / f"sdf{args.resolution}"
    command = [sys.executable, "-m", CLI, "--device", args.device, "sdf-voxelize", str(root / "synth"), "--out", str(sdf),
               "--resolution", str(args.resolution), "--val-fraction", str(args.val_fraction), "--workers", "1"]
    if args.quick:
        command += ["--band", "2.0"]  # the CPU tests' band at R 16
    if subprocess.run(command, check=False, env=env, cwd=root).returncode:
        raise SystemExit(f"sdf-voxelize into {sdf} failed (its output is above)")
    return sdf


def stage_command(args: argparse.Namespace, stage: str, out: Path, gpus: int, steps: int, extra: list[str]) -> list[str]:
    return [
        sys.executable, "-m", CLI, "--device", args.device, "--seed", str(args.seed), stage, "--out", str(out),
        "--gpus", str(gpus), "--steps", str(steps), "--batch-size", str(args.batch_size),
        "--log-every", str(args.log_every), "--warmup-steps", "1", "--optimizer", args.optimizer,
        # One evaluation and one checkpoint, both after the last logged row: no logged window pays for them.
        "--eval-every", "0", "--checkpoint-every", str(steps), "--eval-meshes", "1", *extra,
    ]  # fmt: skip


def compare(args: argparse.Namespace, name: str, commands: dict[int, list[str]], work: Path,
            env: dict[str, str]) -> dict[str, Any]:
    """Run the 1- and N-process commands of one model; their figures."""
    runs, wall = {}, {}
    for gpus, command in commands.items():
        out = work / f"{name}_gpus{gpus}"
        wall[gpus] = run_training(command, out, env, work)
        runs[gpus] = read_curve(out, args.log_every)
        runs[gpus].pop("summary")
    one, many = runs[1], runs[args.gpus]
    return {
        **compare_curves(one, many, args.tolerance),
        **scaling(one, many, args.gpus),
        "samples_per_s": {g: r["samples_per_s"] for g, r in runs.items()},
        "tokens_per_s": {g: r["tokens_per_s"] for g, r in runs.items()},
        "peak_memory_gib": {g: r["peak_memory_gib"] for g, r in runs.items()},
        "wall_s": wall,
        "commands": {g: " ".join(c) for g, c in commands.items()},
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--gpus", type=int, default=2, help="processes of the data-parallel runs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--resolution", type=int, default=1024, help="voxel grid of the data (the reference's 1024)")
    parser.add_argument("--meshes", type=int, default=16, help="synth meshes to voxelise")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--batch-size", type=int, default=2, help="global batch, split over the processes")
    parser.add_argument("--vae-steps", type=int, default=20)
    parser.add_argument("--dit-steps", type=int, default=8)
    parser.add_argument("--log-every", type=int, default=2, help="steps per metrics row (loss mean, throughput)")
    parser.add_argument("--optimizer", default="adamw", choices=("muon", "adamw"))
    parser.add_argument("--only", nargs="+", default=["vae", "dit"], choices=("vae", "dit"),
                        help="dit needs vae (its VAE encodes the data)")
    parser.add_argument("--tolerance", type=float, default=0.02, help="loss difference that counts as matching")
    parser.add_argument("--quick", action="store_true", help="tiny models at R 16 on the CPU: a smoke test")
    parser.add_argument("--out", type=Path, default=Path("runs/direct3d_ddp"), help="work folder of the runs")
    parser.add_argument("--result", type=Path, default=RESULT, help="JSON; the loss-curve PNG goes beside it")
    args = parser.parse_args(argv)
    if args.quick:
        args.device, args.resolution, args.meshes = "cpu", 16, 10
        args.vae_steps, args.dit_steps = min(args.vae_steps, 4), min(args.dit_steps, 4)
    if args.gpus < 2:
        parser.error("--gpus must be at least 2 (it is compared with one process)")
    if args.batch_size % args.gpus:
        parser.error(f"--batch-size {args.batch_size} must divide evenly over --gpus {args.gpus}")
    if min(args.vae_steps, args.dit_steps) < 2 * args.log_every:
        parser.error("--vae-steps and --dit-steps must be at least 2 x --log-every: the first logged row is warm-up")
    if args.device == "cuda" and torch.cuda.device_count() < args.gpus:
        parser.error(f"--gpus {args.gpus} but {torch.cuda.device_count()} CUDA devices are visible")
    if "dit" in args.only and "vae" not in args.only and not (args.out / "vae_gpus1" / "checkpoints").is_dir():
        parser.error(f"--only dit needs the VAE run {args.out / 'vae_gpus1'} of an earlier --only vae")

    work = args.out.resolve()  # children run from the work folder (see ddp_runs.run_training): absolute paths
    work.mkdir(parents=True, exist_ok=True)
    env = child_env(args.device)
    (work / "data").mkdir(exist_ok=True)
    sdf = make_data(args, work / "data", env)
    steps = reference_steps()
    vae_model = QUICK_VAE if args.quick else steps["train-vae"]["model"]
    dit_model = QUICK_DIT if args.quick else steps["train-dit"]["model"]
    resolutions = [args.resolution] if args.quick else [r for r in steps["train-vae"]["resolutions"] if r <= args.resolution]
    result: dict[str, Any] = {"benchmark": "direct3d_ddp", "processes": [1, args.gpus], "resolution": args.resolution,
                              "reference": None if args.quick else str(REFERENCE.relative_to(REFERENCE.parents[1]))}
    if "vae" in args.only:
        extra = ["--data", str(sdf), "--resolutions", ",".join(map(str, resolutions)), *flat_sets(vae_model)]
        result["vae"] = compare(args, "vae", {g: stage_command(args, "train-vae", work / f"vae_gpus{g}", g,
                                                               args.vae_steps, extra) for g in (1, args.gpus)}, work, env)
    if "dit" in args.only:
        latents = work / "dit_gpus1" / "latents"  # the 1-process run encodes; the N-process one reads the same latents
        extra = [*flat_sets(dit_model), "--cond-dropout", "0.1"]
        commands = {1: stage_command(args, "train-dit", work / "dit_gpus1", 1, args.dit_steps,
                                     ["--data", str(sdf), "--vae", str(work / "vae_gpus1"), *extra]),
                    args.gpus: stage_command(args, "train-dit", work / f"dit_gpus{args.gpus}", args.gpus, args.dit_steps,
                                             ["--data", str(latents), *extra])}
        result["dit"] = compare(args, "dit", commands, work, env)
    device = device_name(args.device, args.gpus)
    result = {"benchmark": "direct3d_ddp", "device": device, **result, "settings": vars(args) | {"data": str(sdf)},
              "throughput_method": "median over the metrics.csv rows after the first (the first window holds the warm-up)"}

    for name in ("vae", "dit"):
        if name not in result:
            continue
        r = result[name]
        one, many = r["runs"][1], r["runs"][args.gpus]
        for run in (one, many):
            run["peak_gib_max"] = max(run["peak_memory_gib"]) if run["peak_memory_gib"] else None
        table = comparison_table(f"train-{name} --gpus {args.gpus} vs 1 on {device}", one, many,
                                 ("1 process", f"{args.gpus} processes"), [
            ("final train loss", "final_loss", ".5f", "diff"),
            ("samples/s (median)", "samples_per_s", ",.2f", "ratio"),
            ("tokens/s (median)", "tokens_per_s", ",.0f", "ratio"),
            ("peak GiB (largest rank)", "peak_gib_max", ".2f", "ratio"),
        ])
        console.print(table)
        verdict = "[green]match[/green]" if r["curves_match"] else "[red]differ[/red]"
        console.print(f"train-{name}: loss curves max |diff| {r['loss_max_abs_diff']:.2e} -> {verdict} (tolerance "
                      f"{args.tolerance}); scaling x{r['scaling_ratio']:.2f} on {args.gpus} processes "
                      f"({100 * r['scaling_efficiency']:.0f}% efficiency)")
    atomic_write_json(args.result, result)
    png = args.result.with_suffix(".png")
    curves = {f"{name} {g} process{'es' if g > 1 else ''}": result[name]["runs"][g]
              for name in ("vae", "dit") if name in result for g in (1, args.gpus)}
    plot(curves, png, f"Direct3D-S2 at R {args.resolution}, 1 vs {args.gpus} processes ({device})",
         panels={f"train-{name}": name for name in ("vae", "dit") if name in result})
    console.print(f"wrote {args.result} and {png}")


if __name__ == "__main__":
    main()

"""Data parallelism of ``train-iflame --gpus N``: the same training run on 1 process and on N.

    python benchmarks/iflame_ddp.py [--gpus 2] [--device cuda] [--data TOKENS] [--steps 60]
        [--batch-size 32] [--model-dim 512] [--model-heads 16] [--model-blocks 4 4 8 4 4]
        [--max-faces 800] [--optimizer muon|adamw] [--profile-steps 3] [--set KEY=VALUE ...]
        [--out WORK] [--result JSON]

Runs the real CLI twice, ``python -m meshforge_plugins.cli --device D --seed S train-iflame ...``
into ``WORK/gpus1`` with ``--gpus 1`` and into ``WORK/gpusN`` with ``--gpus N``: same data, seed,
global ``--batch-size``, steps and model. Each global batch is a pure function of (seed, step) and
every rank trains on its slice of it with losses scaled to the global-batch mean, so both runs
follow one loss curve up to the order of floating-point reductions (the gradient all-reduce and,
under bf16 autocast on CUDA, per-rank bf16 rounding of the weight gradients); the difference of
the two curves measures how far that goes. On CUDA the 1-process run is also repeated: GPU
kernels (atomics in attention backward passes) are not bitwise reproducible, and the spread of two
identical runs is the floor against which the 1-vs-N difference is read (``--rerun``).

Reports, from both runs' ``metrics.csv``: the max and mean absolute difference of the logged train
losses (each row a mean over ``--log-every`` steps), the final train and val losses, and the training
throughput of 1 and N processes (samples/s and tokens/s: the median over the logged rows after the
first, whose window holds the warm-up: CUDA context, kernel compilation, NCCL set-up), with the
scaling ratio. With ``--profile-steps N`` every run also profiles N steps on every rank
(:mod:`meshforge.train.profiling`): the result holds each rank's summary (step time, GPU busy
fraction, kernel launches, host time per phase), which says whether a step is bound by the GPU or
by the host; the log row holding the profiled steps is left out of the throughput. Without
``--data`` it first writes ``--synth-meshes`` synth meshes and tokenises them
into ``WORK/data``. Prints a table; writes ``--result`` (JSON naming the device) and a PNG of both
loss curves beside it. ``--device cpu`` runs N gloo processes of one thread each: a smoke test.
"""

from __future__ import annotations

import argparse
import json
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
from rich.table import Table

from meshforge.data.tokens import TOKENS_PER_FACE
from meshforge.io import atomic_write_json
from meshforge.runtime import console
from meshforge.train.profiling import PROFILE_DIR, PROFILE_SKIP

RESULT = Path(__file__).parent / "results" / "iflame_ddp.json"


def make_data(root: Path, meshes: int, seed: int) -> Path:
    """Synth meshes tokenised into ``root/tokens`` (the quickstart's data, at the tokeniser's defaults)."""
    from meshforge.data.synth import generate
    from meshforge.data.tokenize import TokenizeConfig, tokenize_folder

    generate(root / "synth", meshes, seed)
    tokenize_folder(TokenizeConfig(input=root / "synth", out=root / "tokens"))
    return root / "tokens"


def train_command(args: argparse.Namespace, data: Path, out: Path, gpus: int) -> list[str]:
    model = {
        "dim": args.model_dim,
        "n_heads": args.model_heads,
        "blocks": "[" + ",".join(map(str, args.model_blocks)) + "]",
        "max_seq_len": TOKENS_PER_FACE * (args.max_faces + 1),
    }
    overrides = [f"model.{key}={value}" for key, value in model.items()] + args.set
    return [
        sys.executable, "-m", CLI, "--device", args.device, "--seed", str(args.seed), "train-iflame",
        "--data", str(data), "--out", str(out), "--gpus", str(gpus),
        "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--optimizer", args.optimizer,
        "--warmup-steps", str(args.warmup_steps), "--log-every", str(args.log_every),
        "--max-faces", str(args.max_faces), "--eval-meshes", str(args.eval_meshes),
        # One evaluation and one checkpoint, both after the last logged row: no logged window pays for them.
        "--eval-every", "0", "--checkpoint-every", str(args.steps), "--profile-steps", str(args.profile_steps),
        *(arg for text in overrides for arg in ("--set", text)),
    ]  # fmt: skip


def read_run(out: Path, log_every: int, profile_steps: int) -> dict[str, Any]:
    """The logged curve and throughput (:func:`ddp_runs.read_curve`), the validation figures and the profile."""
    # The profiler's warm-up step and the profiled ones run slower than the rest.
    profiled = range(PROFILE_SKIP + 1, PROFILE_SKIP + 2 + profile_steps) if profile_steps else range(0)
    run = read_curve(out, log_every, profiled)
    summary = run.pop("summary")
    return run | {
        "val_loss": summary.get("val_loss"),
        "val_face_acc": summary.get("val_face_acc"),
        "profile": [json.loads(p.read_text()) for p in sorted((out / PROFILE_DIR).glob("rank*.json"))],
    }


def profile_table(runs: dict[str, dict[str, Any]], label: dict[str, str]) -> Table:
    """Where each rank's profiled step goes: GPU busy share, launches and host time per phase."""
    phases = list(next(p for r in runs.values() for p in r["profile"])["phases_s"])
    table = Table(title="profiled steps (per step; phases are host time)")
    for column in ("run", "rank", "step ms", "GPU busy", "NCCL ms", "launches", *(f"{p} ms" for p in phases)):
        table.add_column(column, justify="right")
    for name, run in runs.items():
        for p in run["profile"]:
            busy = "-" if p["gpu_busy_frac"] is None else f"{p['gpu_busy_frac']:.0%}"
            comm = "-" if p["comm_s"] is None else f"{1e3 * p['comm_s']:.1f}"
            table.add_row(label[name], str(p["rank"]), f"{1e3 * p['step_s']:.1f}", busy, comm, f"{p['launches']:,.0f}",
                          *(f"{1e3 * p['phases_s'][ph]:.1f}" for ph in phases))
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--gpus", type=int, default=2, help="processes of the data-parallel run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data", type=Path, help="token dataset (default: synth meshes tokenised into OUT/data)")
    parser.add_argument("--synth-meshes", type=int, default=400, help="meshes to generate without --data")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32, help="global batch, split over the processes")
    parser.add_argument("--log-every", type=int, default=5, help="steps per metrics row (loss mean, throughput)")
    parser.add_argument("--warmup-steps", type=int, default=10, help="learning-rate warm-up")
    parser.add_argument("--optimizer", default="muon", choices=("muon", "adamw"))
    parser.add_argument("--model-dim", type=int, default=512)
    parser.add_argument("--model-heads", type=int, default=16)
    parser.add_argument("--model-blocks", type=int, nargs=5, default=[4, 4, 8, 4, 4], metavar="N")
    parser.add_argument("--max-faces", type=int, default=800, help="train on the first faces of each mesh")
    parser.add_argument("--eval-meshes", type=int, default=16, help="val meshes of the final evaluation")
    parser.add_argument("--profile-steps", type=int, default=3, help="steps profiled on every rank (0: none)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more train-iflame overrides")
    parser.add_argument("--tolerance", type=float, default=0.02,
                        help="loss difference that counts as matching, on top of the rerun's spread")
    parser.add_argument("--rerun", action=argparse.BooleanOptionalAction, default=None,
                        help="repeat the 1-process run to measure run-to-run spread (default: on CUDA)")
    parser.add_argument("--out", type=Path, default=Path("runs/iflame_ddp"), help="work folder of the runs")
    parser.add_argument("--result", type=Path, default=RESULT, help="JSON; the loss-curve PNG goes beside it")
    args = parser.parse_args(argv)
    # Checked here, before minutes of training, rather than by the second run's workers.
    if args.gpus < 2:
        parser.error("--gpus must be at least 2 (it is compared with one process)")
    if args.batch_size % args.gpus:
        parser.error(f"--batch-size {args.batch_size} must divide evenly over --gpus {args.gpus}")
    if args.steps < 2 * args.log_every:
        parser.error("--steps must be at least 2 x --log-every: the first logged row is warm-up")
    if args.device == "cuda" and torch.cuda.device_count() < args.gpus:
        parser.error(f"--gpus {args.gpus} but {torch.cuda.device_count()} CUDA devices are visible")

    # Children run from the work folder: `python -m` puts its working directory first on sys.path,
    # and a repository checkout there would shadow an installed meshforge (whose kernels and plugins
    # live elsewhere in the checkout). Hence absolute paths throughout.
    work = args.out.resolve()
    work.mkdir(parents=True, exist_ok=True)
    data = args.data.resolve() if args.data else make_data(work / "data", args.synth_meshes, args.seed)
    env = child_env(args.device)

    names = {1: "gpus1", args.gpus: f"gpus{args.gpus}"}
    schedule = [(1, "gpus1"), (args.gpus, f"gpus{args.gpus}")]
    if args.device == "cuda" if args.rerun is None else args.rerun:
        schedule.append((1, "gpus1_rerun"))
    commands, wall, runs = {}, {}, {}
    for gpus, name in schedule:
        commands[name] = train_command(args, data, work / name, gpus)
        wall[name] = run_training(commands[name], work / name, env, work)
        runs[name] = read_run(work / name, args.log_every, args.profile_steps)
    one, many = (runs[name] for name in names.values())
    spread = compare_curves(one, runs["gpus1_rerun"], 0.0)["loss_max_abs_diff"] if "gpus1_rerun" in runs else 0.0
    match = compare_curves(one, many, args.tolerance, spread)
    speed = scaling(one, many, args.gpus)
    device = device_name(args.device, args.gpus)

    result = {
        "benchmark": "iflame_ddp",
        "device": device,
        "processes": [1, args.gpus],
        **match,
        "rerun_max_abs_diff": spread if "gpus1_rerun" in runs else None,
        "final_loss": {name: r["final_loss"] for name, r in runs.items()},
        "val_loss": {name: r["val_loss"] for name, r in runs.items()},
        "samples_per_s": {name: r["samples_per_s"] for name, r in runs.items()},
        "tokens_per_s": {name: r["tokens_per_s"] for name, r in runs.items()},
        **speed,
        "peak_memory_gib": {name: r["peak_memory_gib"] for name, r in runs.items()},
        "throughput_method": "median over the metrics.csv rows after the first (the first window holds the warm-up)",
        "wall_s": wall,
        "settings": vars(args) | {"data": str(data)},
        "commands": {name: " ".join(command) for name, command in commands.items()},
        "runs": runs,
    }

    label = {name: f"{gpus} process{'es' if gpus > 1 else ''}" for gpus, name in names.items()} | {"gpus1_rerun": "1 process, again"}
    table = comparison_table(f"train-iflame --gpus {args.gpus} vs 1 on {device}", one, many,
                             (label[names[1]], label[names[args.gpus]]), [
        ("final train loss", "final_loss", ".5f", "diff"),
        ("val loss", "val_loss", ".5f", "diff"),
        ("samples/s (median)", "samples_per_s", ",.1f", "ratio"),
        ("tokens/s (median)", "tokens_per_s", ",.0f", "ratio"),
        ("time waiting at the sync", "sync_wait_frac", ".2f", "ratio"),
    ])
    table.add_row("wall time (s)", f"{wall[names[1]]:.1f}", f"{wall[names[args.gpus]]:.1f}", "")
    console.print(table)
    if any(r["profile"] for r in runs.values()):
        console.print(profile_table(runs, label))
    verdict = "[green]match[/green]" if result["curves_match"] else "[red]differ[/red]"
    console.print(
        f"loss curves over {len(one['loss'])} logged rows: max |diff| {match['loss_max_abs_diff']:.2e}, "
        f"mean {match['loss_mean_abs_diff']:.2e} (two 1-process runs: {spread:.2e}) -> {verdict} "
        f"(tolerance {args.tolerance} + that spread); scaling x{speed['scaling_ratio']:.2f} on {args.gpus} processes "
        f"({100 * speed['scaling_efficiency']:.0f}% efficiency)"
    )
    atomic_write_json(args.result, result)
    png = args.result.with_suffix(".png")
    plot({label[name]: r for name, r in runs.items()}, png, f"train-iflame loss, 1 vs {args.gpus} processes ({device})")
    console.print(f"wrote {args.result} and {png}")


if __name__ == "__main__":
    main()

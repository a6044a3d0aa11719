"""The first iFlame training step on a fresh machine: with and without fla's recorded kernel configs.

    python benchmarks/first_step.py --record   # on a GPU: tune fla's kernels at the usual training
                                               # shapes, write kernels/linear_attention/fla_configs/<GPU>.json
    python benchmarks/first_step.py            # time the first steps; benchmarks/results/first_step.json + PNG

A fresh machine has no Triton cache, so its first interleaved step compiles every kernel and
autotunes fla's chunked kernels (the ~100 s stall seen on the GPU recipe). Each timed step runs
in a new process with an empty ``TRITON_CACHE_DIR``, for the interleaved model with the recorded
configs (``fla_configs``) and without them (``MESHFORGE_FLA_CONFIGS=0``: fla autotunes), and for
full attention (no fla kernels); the steady step of the same process is timed after it. The model
is the reference iFlame (512 wide, 16 heads) at ``--batch`` x ``--faces`` (48 x 800 by default, the
``iflame_vs_full.py`` setting), bf16 autocast, AdamW, random tokens (``iflame_steps.train_step``).

``--record`` runs the training steps whose shapes users meet (the reference model at 48 x 800 and
at one 4,000-face sequence, ``recipes/iflame_gpu.yaml``'s model at its batch, and half of each
batch: one rank of two) so that fla's autotuners choose, then records their choices.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from iflame_steps import train_step  # the step iflame_vs_full.json's figures come from
from meshforge.kernels.linear_attention import fla_configs
from rich.console import Console

from meshforge.config import from_dict
from meshforge.data.tokens import TOKENS_PER_FACE
from meshforge.io import atomic_write_json
from meshforge.models.iflame import IFlameConfig
from meshforge.render import render_table_png
from meshforge.runtime import device_name

RESULT = Path(__file__).parent / "results" / "first_step.json"
RECIPE = Path(__file__).parents[1] / "recipes" / "iflame_gpu.yaml"
console = Console()


def reference(attention: str, faces: int, dim: int = 512, heads: int = 16) -> IFlameConfig:
    """The reference model as ``iflame_vs_full.py`` times it (gradient checkpointing on)."""
    return IFlameConfig(dim=dim, n_heads=heads, attention=attention, max_seq_len=TOKENS_PER_FACE * (faces + 1),
                        grad_checkpoint=True)


def recipe_shape() -> tuple[IFlameConfig, int, int]:
    """``recipes/iflame_gpu.yaml``'s iFlame config, batch and faces per sequence."""
    steps = yaml.safe_load(RECIPE.read_text())["steps"]
    stage = next(s for s in steps if s["stage"] == "train-iflame")
    return from_dict(IFlameConfig, stage.get("model", {})), stage["batch_size"], stage["max_faces"]


def shown_path(path: Path) -> str:
    """``path`` relative to the checkout when inside it, so the JSON reads the same on every machine."""
    checkout = Path(__file__).resolve().parents[1]
    return str(path.resolve().relative_to(checkout)) if path.resolve().is_relative_to(checkout) else str(path)


def record(device: torch.device) -> Path:
    """Tune fla's kernels at the shapes of the module docstring's ``--record``; write this GPU's table."""
    model, batch, faces = recipe_shape()
    shapes = [(reference("interleaved", 800), 48, 800), (reference("interleaved", 4000), 1, 4000), (model, batch, faces)]
    for cfg, batch, faces in shapes + [(cfg, max(1, b // 2), f) for cfg, b, f in shapes]:
        console.print(f"tuning at {batch} x {faces} faces, width {cfg.dim}, {cfg.n_heads} heads")
        train_step(cfg, device, batch, faces, steps=1, warmup=1)
    path = fla_configs.record_configs(torch.cuda.get_device_name(device))
    console.print(f"wrote {path}")
    return path


def child(args: argparse.Namespace) -> dict[str, Any]:
    """This process's first step (compiling and tuning included) and then its steady step."""
    device, batch, faces = torch.device(args.device), args.batch, args.faces
    cfg = reference(args.child, faces, args.dim, args.heads)
    first = train_step(cfg, device, batch, faces, steps=1, warmup=0)
    steady = train_step(cfg, device, batch, faces, steps=3, warmup=1)
    return {"first_step_s": first["step_s"], "steady_step_s": steady["step_s"]}


def timed_fresh(args: argparse.Namespace, attention: str, configs: bool) -> dict[str, Any]:
    """:func:`child` in a new process with an empty Triton cache."""
    with tempfile.TemporaryDirectory(prefix="triton-cache-") as cache:
        env = os.environ | {"TRITON_CACHE_DIR": cache, fla_configs.ENV_SWITCH: "1" if configs else "0"}
        command = [sys.executable, __file__, "--child", attention, "--device", args.device, "--batch", str(args.batch),
                   "--faces", str(args.faces), "--dim", str(args.dim), "--heads", str(args.heads)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the {attention} step failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help="tune and record this GPU's fla configs")
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--faces", type=int, default=800)
    parser.add_argument("--device", default="cuda", help="cpu: a smoke test of the script (nothing compiles there)")
    parser.add_argument("--dim", type=int, default=512, help="smaller for a smoke test")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--child", choices=["interleaved", "full"], help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args)))
        return
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("no CUDA GPU here (--device cpu runs a smoke test)")
    if args.record:
        if device.type != "cuda":
            parser.error("--record needs a CUDA GPU: fla's kernels only autotune there")
        record(device)
        return
    name = device_name(device)
    table = fla_configs.table_path(name)
    rows = []
    for attention, configs in (("interleaved", False), ("interleaved", True), ("full", False)):
        if configs and not table.is_file():
            console.print(f"[yellow]no recorded configs for {name} ({table}): run --record first[/yellow]")
            continue
        console.print(f"{attention}, fla configs {'recorded' if configs else 'autotuned'}: a fresh process")
        fla = ("recorded" if configs else "autotuned") if attention == "interleaved" else None  # full: no fla
        rows.append({"attention": attention, "fla_configs": fla,
                     **timed_fresh(args, attention, configs)})
    result = {"benchmark": "first_step", "device": name, "batch": args.batch, "faces": args.faces,
              "table": shown_path(table) if table.is_file() else None,
              "versions": fla_configs.versions(), "rows": rows}
    atomic_write_json(args.out, result)
    cells = [{"attention": r["attention"], "fla configs": r["fla_configs"] or "-",
              "first step (s)": f"{r['first_step_s']:.1f}", "steady step (s)": f"{r['steady_step_s']:.3f}"} for r in rows]
    png = render_table_png(cells, args.out.with_suffix(".png"), f"First training step, fresh Triton cache, {name}")
    for row in cells:
        console.print(row)
    console.print(f"wrote {args.out} and {png}")


if __name__ == "__main__":
    main()

"""iFlame (interleaved attention) against its full-attention baseline, same code and sizes, on one GPU.

    python benchmarks/iflame_vs_full.py [--batch 48] [--faces 800] [--decode-faces 4000]
        [--window-faces 10] [--windows 5] [--runs RUN_INTERLEAVED RUN_FULL]
    python benchmarks/iflame_vs_full.py --rescore-face-acc --runs RUN_INTERLEAVED RUN_FULL
    python benchmarks/iflame_vs_full.py --only decode [--decode-batches 1 16]

Measures, for both ``attention`` settings of the reference model (512 wide, 16 heads, 4/4/8/4/4):
training step time and peak memory (forward + backward + AdamW, bf16 autocast, random tokens of
``--faces`` faces), decoding throughput at batch 1 and 16, and the attention-cache bytes at
``--decode-faces``. The step is also timed with the attention operators free (they return their
values: what is left is projections, norms, MLPs, pooling), which bounds the step time and memory
ratios any cheaper attention could reach against this baseline. The cache is also compared with a plain 24-block full-attention transformer at
the token level (the comparison behind iFlame's "about 1/8"). With ``--runs`` (two ``train-iflame``
runs of the same steps, batch, seed and data, differing only in ``model.attention``) it adds their
val face accuracy, the trainer's final evaluation over the whole val split (``summary.json``);
``--rescore-face-acc`` replaces only those figures in an existing result (after retraining a run)
and records where they came from. Writes ``benchmarks/results/iflame_vs_full.json``
naming the device, and the results table as a PNG beside it; ``--device cpu`` with small sizes is a
smoke test. ``--only decode`` measures decoding and the caches alone (about two minutes on an H200)
and writes ``iflame_vs_full_decode.json`` unless ``--out`` says otherwise.

Decoding is timed in windows rather than over a whole generation (4 settings x 36,000 sequential
steps would take far too long). The cost of one ``IFlame.step`` depends only on its position: the
K/V buffers are allocated once at full size and attention reads the first ``position + 1`` of them,
linear blocks carry fixed-size states, and what the cache holds does not change the work. So
``--windows`` windows of ``--window-faces`` faces (9 steps each, greedy feedback: every step depends
on the previous one) are timed at starts spread evenly over ``[0, decode_faces - window_faces]``
faces, by ``cache.seek`` (to a multiple of 9, so the vertex and face stages keep their
phase), after one untimed warm-up window. The mean seconds per step over a whole generation is the
trapezoid-rule mean of the windows' seconds per step over their start positions (exact when the
cost grows linearly with the position, as the attention reads do: a window's mean is the cost at
its start plus a constant), and a generation's throughput is ``batch / mean step seconds``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path
from typing import Any

import torch
from iflame_steps import VOCAB, synchronize, train_step
from rich.table import Table

from meshforge.data.tokens import TOKENS_PER_FACE
from meshforge.errors import MeshforgeError
from meshforge.io import atomic_write_json
from meshforge.models.iflame import IFlame, IFlameConfig
from meshforge.render import render_table_png
from meshforge.runtime import console, resolve_device
from meshforge.sample.decoding import make_decoder

RESULT = Path(__file__).parent / "results" / "iflame_vs_full.json"
DECODE_RESULT = RESULT.with_name("iflame_vs_full_decode.json")
def window_starts(decode_faces: int, window_faces: int, windows: int) -> list[int]:
    """First faces of the timed windows: ``windows`` evenly spread over ``[0, decode_faces - window_faces]``
    (fewer when short generations round several onto one face)."""
    last = decode_faces - window_faces
    return sorted({round(i * last / (windows - 1)) for i in range(windows)})


def trapezoid_mean(x: list[float], y: list[float]) -> float:
    """Mean of the piecewise-linear function through ``(x, y)`` over ``[x[0], x[-1]]``."""
    if len(x) == 1:
        return y[0]
    area = sum((x1 - x0) * (y0 + y1) / 2 for x0, x1, y0, y1 in zip(x, x[1:], y, y[1:]))
    return area / (x[-1] - x[0])


@torch.inference_mode()
def decode(
    model: IFlame, device: torch.device, batch: int, faces: int, window_faces: int, windows: int, cuda_graphs: bool
) -> dict[str, Any]:
    """Tokens/s of cached decoding over a generation of ``faces`` faces, from timed windows (module docstring),
    with the sampler's decoder (:func:`meshforge.sample.decoding.make_decoder`)."""
    steps = TOKENS_PER_FACE * faces
    window = TOKENS_PER_FACE * window_faces
    decoder = make_decoder(model, batch, steps, device, cuda_graphs)
    token = torch.full((batch,), VOCAB.start, dtype=torch.long, device=device)

    def seconds_per_step(start_face: int) -> float:
        nonlocal token
        decoder.cache.seek(TOKENS_PER_FACE * start_face)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(window):
            token = decoder.step(token)[:, : VOCAB.levels].argmax(-1)
        synchronize(device)
        return (time.perf_counter() - start) / window

    starts = window_starts(faces, window_faces, windows)
    seconds_per_step(starts[-1])  # warm-up at the longest context: kernels loaded, allocator pools grown
    per_step = [seconds_per_step(face) for face in starts]
    positions = [TOKENS_PER_FACE * face for face in starts]
    mean_step = trapezoid_mean(positions, per_step)
    return {
        "tokens_per_s": batch / mean_step,
        "step_s": mean_step,
        "generation_s": mean_step * steps,
        "windows": [
            {"start_token": p, "step_s": s, "tokens_per_s": batch / s} for p, s in zip(positions, per_step)
        ],
        "cache_bytes": decoder.cache.nbytes(),
    }


def face_acc(runs: dict[str, Path]) -> tuple[dict[str, float], dict[str, Any]]:
    """Val face accuracy of each ``train-iflame`` run: its final evaluation (``summary.json``), which
    the trainer computes teacher-forced over the whole val split (the runs must use ``--eval-meshes 0``)
    after the same steps, batch and data order. Also the settings that make the two comparable."""
    import yaml

    accuracy, settings, wall_time = {}, {}, {}
    for kind, run in runs.items():
        summary = json.loads((run / "summary.json").read_text())
        config = yaml.safe_load((run / "config.yaml").read_text())
        task, train = config["task_config"], config["train"]
        if task["eval_meshes"] != 0 or summary["last_step"] != train["steps"]:
            raise MeshforgeError(f"{run}: needs a finished run evaluated on the whole val split (--eval-meshes 0)")
        accuracy[kind], wall_time[kind] = summary["val_face_acc"], summary["wall_time_s"]
        settings[kind] = {"steps": train["steps"], "batch_size": train["batch_size"], "seed": train["seed"],
                          "max_faces": task["max_faces"], "length_groups": task.get("length_groups"),
                          "data": task["data"], "attention": config["model"]["attention"]}
    first, second = ({k: v for k, v in s.items() if k != "attention"} for s in settings.values())
    if first != second:
        raise MeshforgeError(f"--runs differ in more than the attention: {settings}")
    return accuracy, first | {"wall_time_s": wall_time}


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--faces", type=int, default=800)
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--decode-faces", type=int, default=4000, help="length of the generation decoding is rated on")
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--window-faces", type=int, default=10, help="faces per timed decoding window")
    parser.add_argument("--windows", type=int, default=5, help="timed decoding windows over the generation")
    parser.add_argument("--dim", type=int, default=512, help="smaller for a smoke test")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--grad-checkpoint", action="store_true", help="recompute block activations in backward")
    parser.add_argument("--runs", type=Path, nargs=2, metavar=("INTERLEAVED", "FULL"))
    parser.add_argument("--only", choices=["decode"], help="decode: skip the training steps (and their bound)")
    parser.add_argument("--out", type=Path, help=f"JSON, the table PNG beside it (default {RESULT.name}, "
                        f"{DECODE_RESULT.name} with --only decode)")
    parser.add_argument("--rescore-face-acc", action="store_true",
                        help="only replace the face-acc figures of --out with those of --runs (after retraining them)")
    args = parser.parse_args()
    if args.out is None:
        args.out = DECODE_RESULT if args.only == "decode" else RESULT
    if args.rescore_face_acc:
        if not args.runs:
            parser.error("--rescore-face-acc needs --runs")
        rescore_face_acc(args.out, args.runs)
        return
    # Checked before any timing, so that a bad combination fails in seconds, not after the benchmark.
    if args.windows < 2 or not 1 <= args.window_faces <= args.decode_faces:
        parser.error("need --windows >= 2 and 1 <= --window-faces <= --decode-faces")
    if args.only and args.runs:
        parser.error("--runs compares trained runs: not with --only")
    accuracy, runs = face_acc(dict(zip(("interleaved", "full"), args.runs))) if args.runs else ({}, None)
    device = resolve_device(args.device)
    max_len = TOKENS_PER_FACE * (max(args.faces, args.decode_faces) + 1)
    base = {"dim": args.dim, "n_heads": args.heads, "max_seq_len": max_len, "grad_checkpoint": args.grad_checkpoint}
    configs = {kind: IFlameConfig(**base, attention=kind) for kind in ("interleaved", "full")}
    # Replayed CUDA graphs are how `meshforge sample` decodes on a GPU (the headline figures); eager
    # steps are kept for comparison.
    decode_modes = (True, False) if device.type == "cuda" else (False,)

    def decode_key(batch: int, graphs: bool) -> str:
        return f"decode_b{batch}" if graphs == decode_modes[0] else f"decode_eager_b{batch}"

    results: dict[str, dict[str, Any]] = {}
    for kind, cfg in configs.items():
        results[kind] = {}
        if args.only != "decode":
            console.print(f"[bold]{kind}[/bold]: training step at {args.batch} x {args.faces} faces")
            results[kind]["train"] = train_step(cfg, device, args.batch, args.faces, args.train_steps)
        torch.manual_seed(0)
        model = IFlame(cfg).to(device).eval()
        for batch, graphs in itertools.product(args.decode_batches, decode_modes):
            console.print(
                f"[bold]{kind}[/bold]: decoding at batch {batch} ({'CUDA graphs' if graphs else 'eager'}), "
                f"{args.windows} windows of {args.window_faces} faces over {args.decode_faces} faces"
            )
            results[kind][decode_key(batch, graphs)] = decode(
                model, device, batch, args.decode_faces, args.window_faces, args.windows, graphs
            )
        results[kind]["cache_bytes"] = model.init_cache(1, TOKENS_PER_FACE * args.decode_faces, device, torch.bfloat16).nbytes()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    free = None
    if args.only != "decode":
        console.print("[bold]bound[/bold]: training step with the attention operators free")
        free = train_step(configs["full"], device, args.batch, args.faces, args.train_steps, operators_free=True)
    plain = IFlame(IFlameConfig(**base, attention="full", blocks=(0, 0, 0, 0, 24))).to(device)
    plain_cache = plain.init_cache(1, TOKENS_PER_FACE * args.decode_faces, device, torch.bfloat16).nbytes()
    del plain

    inter, full = results["interleaved"], results["full"]
    # With --only decode there are no training figures: their ratios are None.
    train_i, train_f, bound = inter.get("train", {}), full.get("train", {}), free or {}

    def decode_ratio(batch: int) -> float | None:
        key = f"decode_b{batch}"
        return ratio(inter[key]["tokens_per_s"], full[key]["tokens_per_s"])

    summary = {
        "benchmark": "iflame_vs_full",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "train_step_time_ratio": ratio(train_i.get("step_s"), train_f.get("step_s")),
        "peak_memory_ratio": ratio(train_i.get("peak_bytes"), train_f.get("peak_bytes")),
        # The least any replacement of the attention operators could reach against this baseline.
        "train_step_time_ratio_bound": ratio(bound.get("step_s"), train_f.get("step_s")),
        "peak_memory_ratio_bound": ratio(bound.get("peak_bytes"), train_f.get("peak_bytes")),
        "attention_free_train": free,
        # At the first --decode-batches (batch 1 by default); every batch also has its own key.
        "decode_throughput_ratio": decode_ratio(args.decode_batches[0]),
        **{f"decode_throughput_ratio_b{batch}": decode_ratio(batch) for batch in args.decode_batches},
        "kv_cache_ratio": ratio(inter["cache_bytes"], full["cache_bytes"]),
        "kv_cache_ratio_vs_plain_transformer": ratio(inter["cache_bytes"], plain_cache),
        "face_acc_delta_pt": 100 * (accuracy["interleaved"] - accuracy["full"]) if accuracy else None,
        "face_acc": accuracy or None,
        "face_acc_runs": runs,
        "decode_method": (
            f"{args.windows} timed windows of {args.window_faces} faces ({TOKENS_PER_FACE * args.window_faces} "
            f"sequential greedy steps) at starts evenly spread over faces [0, {args.decode_faces - args.window_faces}] "
            "(cache.seek to the start), after one untimed warm-up window; tokens_per_s = batch / "
            f"trapezoid-rule mean over start positions of the windows' seconds per step, i.e. the throughput of a "
            f"whole {args.decode_faces}-face generation; generation_s = that mean x {TOKENS_PER_FACE * args.decode_faces} steps"
        ),
        "settings": vars(args) | {"runs": [str(r) for r in args.runs or []], "out": str(args.out)},
        "interleaved": inter,
        "full": full,
        "plain_transformer_cache_bytes": plain_cache,
    }

    write(summary, args.out)


def table_rows(summary: dict[str, Any]) -> list[dict[str, str]]:
    """The results table (figure, interleaved, full, ratio) of a summary."""
    inter, full, free = summary["interleaved"], summary["full"], summary["attention_free_train"]
    accuracy, settings = summary["face_acc"], summary["settings"]
    rows: list[dict[str, str]] = []

    def cell(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def row(name: str, a: float | None, b: float | None, fmt: str) -> None:
        rows.append({"figure": name, "interleaved": cell(a, fmt), "full": cell(b, fmt), "ratio": cell(ratio(a, b), ".3f")})

    if free is not None:  # not with --only decode
        row("train step (s)", inter["train"]["step_s"], full["train"]["step_s"], ".3f")
        row("train step, attention free (s)", free["step_s"], full["train"]["step_s"], ".3f")
        row("peak memory (GB)", inter["train"]["peak_gb"], full["train"]["peak_gb"], ".2f")
        row("peak memory, attention free (GB)", free["peak_gb"], full["train"]["peak_gb"], ".2f")
    for key in (k for k in inter if k.startswith("decode_")):
        batch = key.rsplit("_b", 1)[1]
        mode = " (eager)" if key.startswith("decode_eager") else ""
        row(f"decode tokens/s, batch {batch}{mode}", inter[key]["tokens_per_s"], full[key]["tokens_per_s"], ",.0f")
    row(f"cache MB at {settings['decode_faces']} faces", inter["cache_bytes"] / 1e6, full["cache_bytes"] / 1e6, ".1f")
    if accuracy:
        row("val face-acc", accuracy["interleaved"], accuracy["full"], ".4f")
    return rows


def write(summary: dict[str, Any], out: Path) -> None:
    """Print the table; write the JSON and the table's PNG beside it."""
    rows = table_rows(summary)
    title = f"iFlame interleaved vs full on {summary['device']}"
    table = Table(title=title)
    for column in rows[0]:
        table.add_column(column, justify="right")
    for r in rows:
        table.add_row(*r.values())
    console.print(table)
    atomic_write_json(out, summary)
    png = render_table_png(rows, out.with_suffix(".png"), title)
    console.print(f"wrote {out} and {png}")


def rescore_face_acc(out: Path, runs: list[Path]) -> None:
    """Replace the face-acc figures of the result ``out`` with those of ``runs`` (retrained); the
    timings stay as measured. The summary records which figures came later, and from where."""
    summary = json.loads(out.read_text())
    accuracy, run_settings = face_acc(dict(zip(("interleaved", "full"), runs)))
    summary.update(
        face_acc=accuracy,
        face_acc_delta_pt=100 * (accuracy["interleaved"] - accuracy["full"]),
        face_acc_runs=run_settings,
        face_acc_rescored_from=[str(r) for r in runs],
    )
    write(summary, out)


if __name__ == "__main__":
    main()

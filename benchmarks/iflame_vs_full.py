"""iFlame (interleaved attention) against its full-attention baseline, same code and sizes, on one GPU.

    python benchmarks/iflame_vs_full.py [--batch 48] [--faces 800] [--decode-faces 4000]
        [--window-faces 10] [--windows 5] [--long-faces 4000] [--long-batch B] [--runs RUN_INTERLEAVED RUN_FULL]
    python benchmarks/iflame_vs_full.py --rescore-face-acc [--runs RUN_INTERLEAVED RUN_FULL] [--time-runs RUN_I RUN_F]
    python benchmarks/iflame_vs_full.py --only decode [--decode-batches 1 16]
    python benchmarks/iflame_vs_full.py --only long [--long-faces 4000] [--long-batch B]
    python benchmarks/iflame_vs_full.py --collect   # the companion benchmarks' figures into --out

Measures, for both ``attention`` settings of the reference model (512 wide, 16 heads, 4/4/8/4/4):
training step time and peak memory (forward + backward + AdamW, bf16 autocast, random tokens of
``--faces`` faces), decoding throughput at batch 1 and 16, and the attention-cache bytes at
``--decode-faces``. The step is also timed with the attention operators free (they return their
values: what is left is projections, norms, MLPs, pooling), which bounds the step time and memory
ratios any cheaper attention could reach against this baseline. The cache is also compared with a plain 24-block full-attention transformer at
the token level (the comparison behind iFlame's "about 1/8"). With ``--runs`` (two ``train-iflame``
runs of the same steps, batch, seed and data, differing only in ``model.attention``) it adds their
val face accuracy, the trainer's final evaluation over the whole val split (``summary.json``);
``--time-runs`` adds the same comparison at equal wall time (``face_acc_equal_time``: two runs stopped by
the same ``--time-limit-min``, each after the steps it managed); ``--rescore-face-acc`` replaces only
those figures in an existing result (after retraining a run) and records where they came from. Writes ``benchmarks/results/iflame_vs_full.json``
naming the device, and the results table as a PNG beside it; ``--device cpu`` with small sizes is a
smoke test. ``--only decode`` measures decoding and the caches alone (about two minutes on an H200)
and writes ``iflame_vs_full_decode.json`` unless ``--out`` says otherwise.

The long setting (Objaverse-sized meshes, ``--long-faces`` 4,000: 36,009 tokens, where attention's
quadratic cost dominates the step) times both models' training steps again at one batch, by
default the largest both fit in: steps of 1 and 2 sequences give each model's peak memory as a
line in the batch, the batch is the largest at which both lines stay within 90% of the free GPU
memory, and it is halved while either model runs out of memory. Its figures go under
``long_sequences`` and ``train_step_time_ratio_4k`` / ``peak_memory_ratio_4k`` (the suffix names the
faces); ``--only long`` measures them alone and merges them into ``--out`` (a result of the same
device), keeping every other figure there.

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
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
from iflame_steps import VOCAB, synchronize, train_step
from meshforge.kernels.linear_attention import cuda_form
from rich.table import Table

from meshforge.data.tokens import TOKENS_PER_FACE
from meshforge.errors import InputError, MeshforgeError
from meshforge.io import atomic_write_json, read_json
from meshforge.models.iflame import IFlame, IFlameConfig
from meshforge.render import render_table_png
from meshforge.runtime import console, device_name, resolve_device
from meshforge.sample.decoding import make_decoder

RESULT = Path(__file__).parent / "results" / "iflame_vs_full.json"
DECODE_RESULT = RESULT.with_name("iflame_vs_full_decode.json")
# Of the free GPU memory a fitted batch plans on: the caching allocator's fragmentation comes on top
# of the allocated peak the fit is made from.
MEMORY_FRACTION = 0.9
# Untimed steps before the long setting's timed ones: the first compiles fla's kernels for the new
# lengths and grows the allocator's pools; at seconds a step, a second would buy nothing.
LONG_WARMUP = 1


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


def read_summary(run: Path) -> dict[str, Any]:
    """A ``train-iflame`` run's ``summary.json``, or a one-line error naming it."""
    return read_json(run / "summary.json", "run summary")


def face_acc(runs: dict[str, Path], equal: Literal["steps", "time"] = "steps") -> tuple[dict[str, float], dict[str, Any]]:
    """Val face accuracy of each ``train-iflame`` run: its final evaluation (``summary.json``), which
    the trainer computes teacher-forced over the whole val split (the runs must use ``--eval-meshes 0``).
    ``equal`` is what the two runs share besides batch, seed and data: ``"steps"`` (both finished the
    same ``--steps``) or ``"time"`` (both stopped by the same ``--time-limit-min``, each after the
    steps it managed). Also the settings that make the two comparable."""
    import yaml

    accuracy, settings, wall_time, steps = {}, {}, {}, {}
    for kind, run in runs.items():
        summary = read_summary(run)
        config = yaml.safe_load((run / "config.yaml").read_text())
        task, train = config["task_config"], config["train"]
        finished = summary["last_step"] == train["steps"]
        if task["eval_meshes"] != 0 or (finished if equal == "time" else not finished):
            wanted = "a run stopped by its time limit" if equal == "time" else "a finished run"
            raise MeshforgeError(f"{run}: needs {wanted}, evaluated on the whole val split (--eval-meshes 0)")
        accuracy[kind], wall_time[kind], steps[kind] = summary["val_face_acc"], summary["wall_time_s"], summary["last_step"]
        settings[kind] = {"batch_size": train["batch_size"], "seed": train["seed"], "max_faces": task["max_faces"],
                          "length_groups": task.get("length_groups"), "data": task["data"],
                          "attention": config["model"]["attention"], "compile": train.get("compile", False)}
        settings[kind] |= {"time_limit_min": train["time_limit_min"]} if equal == "time" else {"steps": train["steps"]}
    first, second = ({k: v for k, v in s.items() if k != "attention"} for s in settings.values())
    if first != second:
        raise MeshforgeError(f"--runs differ in more than the attention: {settings}")
    return accuracy, first | {"wall_time_s": wall_time} | ({"steps": steps} if equal == "time" else {})


def median_samples_per_s(run: Path) -> float:
    """A run's steady training throughput: the median over its logged windows but the first (which
    holds the first step: compiling, autotuning)."""
    import csv
    import statistics

    with (run / "metrics.csv").open(newline="") as f:
        rates = [float(r["samples_per_s"]) for r in csv.DictReader(f) if r.get("samples_per_s")]
    if len(rates) < 2:
        raise InputError(run / "metrics.csv", "needs at least two logged training windows")
    return statistics.median(rates[1:])


def equal_time_figures(runs: list[Path]) -> dict[str, Any]:
    """``face_acc_equal_time``: the val face accuracy of two runs given the same training time, and
    the training throughput each had (what the steps they reached come from)."""
    pair = dict(zip(("interleaved", "full"), runs))
    accuracy, settings = face_acc(pair, equal="time")
    return {"face_acc": accuracy, "face_acc_delta_pt": 100 * (accuracy["interleaved"] - accuracy["full"]),
            "samples_per_s_median": {kind: median_samples_per_s(run) for kind, run in pair.items()},
            "runs": settings, "from": [str(r) for r in runs]}


def read_result(path: Path, device: str | None = None, clash: str = "", benchmark: str | None = None) -> dict[str, Any]:
    """The benchmark result at ``path`` (of ``benchmark``, when given); with ``device``, it must have
    been measured there. Otherwise a one-line error naming the file (ending in ``clash`` for a device)."""
    result = read_json(path, "result")
    kind = result.get("benchmark") if isinstance(result, dict) else None
    if kind is None or (benchmark is not None and kind != benchmark):
        raise InputError(path, f"not {'an ' + benchmark if benchmark else 'a benchmark'} result")
    if device is not None and result.get("device") != device:
        raise InputError(path, f"measured on {result.get('device')}, {clash or f'not on {device}'}")
    return result


def companion(name: str, device: str, results: Path) -> dict[str, Any] | None:
    """The result ``name`` of another benchmark beside ``--out``, if there is one; it must be of ``device``."""
    path = results / name
    if not path.is_file():
        return None
    return read_result(path, device, f"the result it joins on {device}")


def source(name: str) -> str:
    """Where a companion result is kept in the checkout (the ``from`` of the figures taken from it)."""
    return f"benchmarks/results/{name}"


SHORT_RUNS = "iflame_short_throughput"  # gpu_session.sh short-throughput: train-iflame runs KIND-MODE


def short_throughput(device: str, results: Path) -> dict[str, Any] | None:
    """``short_throughput``: the median samples/s of ``train-iflame`` runs of both kinds on the synth
    data, per mode (eager, compiled) of which both runs are there; each run must be of ``device``."""
    figures: dict[str, Any] = {}
    for mode in ("eager", "compiled"):
        pair = {kind: results / SHORT_RUNS / f"{kind}-{mode}" for kind in ("interleaved", "full")}
        if not all(run.is_dir() for run in pair.values()):
            continue
        summaries = {kind: read_summary(run) for kind, run in pair.items()}
        for kind, summary in summaries.items():
            if summary.get("device") != device:
                raise InputError(pair[kind] / "summary.json",
                                 f"measured on {summary.get('device')}, not on {device} (the result it joins)")
        rates = {kind: median_samples_per_s(run) for kind, run in pair.items()}
        # Wall time holds what the median leaves out: the first step and, compiled, every recompile.
        figures[mode] = {"samples_per_s_median": rates, "ratio": rates["interleaved"] / rates["full"],
                         "steps": summaries["full"]["last_step"],
                         "wall_time_s": {kind: s["wall_time_s"] for kind, s in summaries.items()}}
    return figures | {"from": source(SHORT_RUNS)} if figures else None


def with_companion_figures(summary: dict[str, Any], results: Path) -> dict[str, Any]:
    """``summary`` with the figures that other benchmarks measure, copied from their results beside
    ``--out`` (each a run of its own on the same device, named under ``from``):

    - ``train_step_fastest``: ``iflame_step_variants.py``'s fastest interleaved setting at 48 x 800 faces
      and the full-attention step of the same setting (``train_step_time_ratio_fastest``);
    - ``first_step``: ``first_step.py``'s first interleaved step on a fresh machine with and without
      fla's recorded kernel configs, and the full-attention one;
    - ``short_sequences``: ``linear_attention_forms.py``'s crossover length (where fla's chunked form
      starts to beat the parallel one) and its model steps at the synth data's lengths;
    - ``short_throughput``: the steady samples/s of ``gpu_session.sh short-throughput``'s runs;
    - decoding: every decoding figure of ``iflame_vs_full_decode.json`` (``--only decode``, a later run
      than a full one may be) in place of this result's own, which are dropped (``decode_from``).
    """
    device, figures = summary["device"], {}
    decode = companion(DECODE_RESULT.name, device, results)
    if decode:
        def is_decoding(key: str) -> bool:
            return key.startswith(("decode", "kv_cache_ratio")) or key in ("cache_bytes", "plain_transformer_cache_bytes")

        summary = {k: v for k, v in summary.items() if not is_decoding(k)}
        figures |= {k: v for k, v in decode.items() if is_decoding(k)}
        for kind in ("interleaved", "full"):
            figures[kind] = ({k: v for k, v in summary[kind].items() if not is_decoding(k)}
                             | {k: v for k, v in decode[kind].items() if is_decoding(k)})
        figures["decode_from"] = source(DECODE_RESULT.name)
    variants = companion("iflame_step_variants.json", device, results)
    if variants:
        rows = [r for r in variants["rows"] if not r["operators_free"] and r["step_s"] is not None]
        fastest = min((r for r in rows if r["attention"] == "interleaved"), key=lambda r: r["step_s"])
        same = next(r for r in rows if r["attention"] == "full" and all(
            r[k] == fastest[k] for k in ("grad_checkpoint", "compiled")))
        figures["train_step_fastest"] = {
            "batch": variants["batch"], "faces": variants["faces"], "target_s": variants["target_s"],
            **{k: fastest[k] for k in ("grad_checkpoint", "compiled")},
            **{r["attention"]: {"step_s": r["step_s"], "peak_gb": r["peak_gb"]} for r in (fastest, same)},
            "from": source("iflame_step_variants.json")}
        figures["train_step_time_ratio_fastest"] = fastest["step_s"] / same["step_s"]
    first = companion("first_step.json", device, results)
    if first:
        rows = {(r["attention"], r["fla_configs"]): r for r in first["rows"]}
        figures["first_step"] = {
            "batch": first["batch"], "faces": first["faces"],
            "interleaved_recorded_configs_s": rows["interleaved", "recorded"]["first_step_s"],
            "interleaved_autotuned_s": rows["interleaved", "autotuned"]["first_step_s"],
            "full_s": rows["full", None]["first_step_s"],
            "steady_step_s": {"interleaved": rows["interleaved", "recorded"]["steady_step_s"],
                              "full": rows["full", None]["steady_step_s"]},
            "from": source("first_step.json")}
    forms = companion("linear_attention_forms.json", device, results)
    if forms:
        shortest = min(r["faces"] for r in forms["model"]["rows"])
        steps = {r["attention"]: r["step_ms"] for r in forms["model"]["rows"]
                 if r["faces"] == shortest and r["linear_form"] in ("-", "as_dispatched")}
        figures["short_sequences"] = {
            "crossover_len": forms["crossover_len"], "faces": shortest, "batch": forms["model"]["batch"],
            "step_ms": steps, "step_time_ratio": steps["interleaved"] / steps["full"],
            "from": source("linear_attention_forms.json")}
    throughput = short_throughput(device, results)
    if throughput:
        figures["short_throughput"] = throughput
    return summary | figures


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def size_tag(faces: int) -> str:
    """The suffix of the long setting's keys: ``4k`` at 4,000 faces, ``60faces`` at 60."""
    return f"{faces // 1000}k" if faces % 1000 == 0 else f"{faces}faces"


def batch_that_fits(peak_one: int, peak_two: int, budget: int) -> int:
    """The largest batch whose step peak, a line in the batch through the peaks of 1 and 2 sequences
    (model, gradients and optimiser state once, activations per sequence), stays within ``budget``
    bytes; at least 1."""
    per_sequence = peak_two - peak_one
    if per_sequence <= 0:
        raise MeshforgeError(f"a second sequence added no memory to the step ({peak_one} -> {peak_two} bytes)")
    return max(1, (budget - (peak_one - per_sequence)) // per_sequence)


def checkpoint_hint(cfg: IFlameConfig) -> str:
    return "" if cfg.grad_checkpoint else ": try --grad-checkpoint"


def fit_batch(configs: dict[str, IFlameConfig], device: torch.device, faces: int) -> tuple[int, dict[str, Any]]:
    """The largest batch of ``faces``-face sequences at which the training steps of both ``configs``
    fit in :data:`MEMORY_FRACTION` of the free GPU memory (:func:`batch_that_fits` for each), and
    what it was fitted from."""
    peaks = {}
    for kind, cfg in configs.items():
        peaks[kind] = []
        for batch in (1, 2):
            step = train_step(cfg, device, batch, faces, steps=1, warmup=1)
            torch.cuda.empty_cache()
            if step["oom"]:
                raise MeshforgeError(f"{kind}: {batch} sequence(s) of {faces} faces do not fit in GPU memory"
                                     + checkpoint_hint(cfg))
            peaks[kind].append(step["peak_bytes"])
    free, _ = torch.cuda.mem_get_info(device)
    budget = int(MEMORY_FRACTION * free)
    fits = {kind: batch_that_fits(*peak, budget) for kind, peak in peaks.items()}
    fit = {"free_bytes": free, "budget_bytes": budget}
    for kind, peak in peaks.items():
        fit[kind] = {"peak_bytes_b1": peak[0], "peak_bytes_b2": peak[1], "batch": fits[kind]}
    return min(fits.values()), fit


def linear_forms(device: torch.device, tokens: int) -> dict[str, str]:
    """Which linear-attention form each level's blocks run in training (``linear_attention``'s choice)."""
    lengths = {"tokens": tokens, "vertices": tokens // 3, "faces": tokens // TOKENS_PER_FACE}
    if device.type != "cuda":
        return dict.fromkeys(lengths, "torch chunked")
    return {level: {"parallel": "fused parallel", "chunked": "fla chunked"}[cuda_form(n, stateful=False)]
            for level, n in lengths.items()}


def long_train(configs: dict[str, IFlameConfig], device: torch.device, faces: int, batch: int | None,
               steps: int) -> dict[str, Any]:
    """Both models' training steps on ``faces``-face sequences at one batch: ``batch``, or (None) the
    largest both fit in (:func:`fit_batch`); halved while either runs out of memory."""
    fit = None
    if batch is None:
        console.print(f"fitting the batch of {faces}-face sequences to GPU memory")
        batch, fit = fit_batch(configs, device, faces)
        console.print(f"batch {batch} (full attention fits {fit['full']['batch']}, "
                      f"interleaved {fit['interleaved']['batch']})")
    rule = (f"the largest at which both models' steps fit in {MEMORY_FRACTION:.0%} of the free GPU memory "
            "(each a line through its peaks at 1 and 2 sequences)" if fit else "given (--long-batch)")
    cfg, out_of_memory = configs["full"], []
    while True:
        measured = {}
        for kind in ("full", "interleaved"):
            console.print(f"[bold]{kind}[/bold]: training step at {batch} x {faces} faces")
            measured[kind] = train_step(configs[kind], device, batch, faces, steps, warmup=LONG_WARMUP)
            if device.type == "cuda":
                torch.cuda.empty_cache()
            if measured[kind]["oom"]:
                break
        else:
            break
        if batch == 1:
            raise MeshforgeError(f"one sequence of {faces} faces runs out of GPU memory" + checkpoint_hint(cfg))
        out_of_memory.append(batch)
        batch //= 2
    tokens = TOKENS_PER_FACE * (faces + 1)
    return {
        "faces": faces, "tokens_per_sequence": tokens, "batch": batch, "tokens_per_step": batch * tokens,
        "batch_rule": rule + (f", halved after running out of memory at {out_of_memory}" if out_of_memory else ""),
        "fit": fit, "device": device_name(device), "dim": cfg.dim, "n_heads": cfg.n_heads,
        "grad_checkpoint": cfg.grad_checkpoint, "warmup_steps": LONG_WARMUP, "train_steps": steps,
        "linear_attention_forms": linear_forms(device, tokens),
        "interleaved": measured["interleaved"], "full": measured["full"],
    }


def add_long(summary: dict[str, Any], long: dict[str, Any]) -> None:
    """Put the long setting's figures into ``summary`` (replacing those of the same faces)."""
    tag = size_tag(long["faces"])
    inter, full = long["interleaved"], long["full"]
    summary[f"train_step_time_ratio_{tag}"] = ratio(inter["step_s"], full["step_s"])
    summary[f"peak_memory_ratio_{tag}"] = ratio(inter["peak_bytes"], full["peak_bytes"])
    summary.setdefault("long_sequences", {})[tag] = long


def existing_summary(out: Path, device: torch.device) -> dict[str, Any]:
    """The result at ``out`` that ``--only long`` adds to (a bare one if there is none yet)."""
    if not out.exists():
        return {"benchmark": "iflame_vs_full", "device": device_name(device)}
    return read_result(out, device_name(device), f"this run is on {device_name(device)}: pass another --out",
                       benchmark="iflame_vs_full")


def main(argv: list[str] | None = None) -> None:
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
    parser.add_argument("--long-faces", type=int, default=4000,
                        help="faces of the long setting's training steps (0: none)")
    parser.add_argument("--long-batch", type=int,
                        help="its batch (default: the largest both models' steps fit in on the GPU)")
    # Steps of seconds each at 4,000 faces: two timed ones keep the section within about two minutes.
    parser.add_argument("--long-train-steps", type=int, default=2, help="its timed steps (after one warm-up)")
    parser.add_argument("--runs", type=Path, nargs=2, metavar=("INTERLEAVED", "FULL"))
    parser.add_argument("--time-runs", type=Path, nargs=2, metavar=("INTERLEAVED", "FULL"),
                        help="two train-iflame runs stopped by the same --time-limit-min: face-acc at equal wall time")
    parser.add_argument("--only", choices=["decode", "long"],
                        help="decode: skip the training steps (and their bound); long: the long setting alone, "
                             "merged into --out")
    parser.add_argument("--out", type=Path, help=f"JSON, the table PNG beside it (default {RESULT.name}, "
                        f"{DECODE_RESULT.name} with --only decode)")
    parser.add_argument("--rescore-face-acc", action="store_true",
                        help="only replace the face-acc figures of --out with those of --runs and/or --time-runs "
                             "(after retraining them)")
    parser.add_argument("--collect", action="store_true",
                        help="only copy into --out the figures of the benchmarks whose results lie beside it "
                             "(iflame_step_variants, first_step, linear_attention_forms, iflame_vs_full_decode, "
                             "the short-throughput runs; same device)")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = DECODE_RESULT if args.only == "decode" else RESULT
    if args.rescore_face_acc:
        if not (args.runs or args.time_runs):
            parser.error("--rescore-face-acc needs --runs or --time-runs")
        rescore_face_acc(args.out, args.runs, args.time_runs)
        return
    if args.collect:
        write(with_companion_figures(read_result(args.out, benchmark="iflame_vs_full"), args.out.parent), args.out)
        return
    # Checked before any timing, so that a bad combination fails in seconds, not after the benchmark.
    if args.windows < 2 or not 1 <= args.window_faces <= args.decode_faces:
        parser.error("need --windows >= 2 and 1 <= --window-faces <= --decode-faces")
    if args.only and (args.runs or args.time_runs):
        parser.error("--runs and --time-runs compare trained runs: not with --only")
    long = args.long_faces > 0 and args.only != "decode"
    if args.long_faces < 0 or (args.only == "long" and not long):
        parser.error("--long-faces must be positive with --only long, 0 or more without")
    if (args.long_batch is not None and args.long_batch < 1) or args.long_train_steps < 1:
        parser.error("--long-batch and --long-train-steps must be at least 1")
    device = resolve_device(args.device)
    if long and args.long_batch is None and device.type != "cuda":
        parser.error("--long-batch is needed off CUDA (by default the batch is fitted to GPU memory)")
    max_len = TOKENS_PER_FACE * (max(args.faces, args.decode_faces, args.long_faces) + 1)
    base = {"dim": args.dim, "n_heads": args.heads, "max_seq_len": max_len, "grad_checkpoint": args.grad_checkpoint}
    configs = {kind: IFlameConfig(**base, attention=kind) for kind in ("interleaved", "full")}
    if args.only == "long":
        summary = existing_summary(args.out, device)
    else:
        summary = train_and_decode(args, configs, device)
    if long:
        add_long(summary, long_train(configs, device, args.long_faces, args.long_batch, args.long_train_steps))
    write(summary, args.out)


def train_and_decode(args: argparse.Namespace, configs: dict[str, IFlameConfig],
                     device: torch.device) -> dict[str, Any]:
    """The summary of every figure but the long setting's: training steps at ``--faces`` (unless
    ``--only decode``), decoding, caches, face accuracy of ``--runs``."""
    accuracy, runs = face_acc(dict(zip(("interleaved", "full"), args.runs))) if args.runs else ({}, None)
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
    plain = IFlame(replace(configs["full"], blocks=(0, 0, 0, 0, 24))).to(device)
    plain_cache = plain.init_cache(1, TOKENS_PER_FACE * args.decode_faces, device, torch.bfloat16).nbytes()
    del plain

    inter, full = results["interleaved"], results["full"]
    # With --only decode there are no training figures: their ratios are None.
    train_i, train_f, bound = inter.get("train", {}), full.get("train", {}), free or {}

    def decode_ratio(batch: int) -> float | None:
        key = f"decode_b{batch}"
        return ratio(inter[key]["tokens_per_s"], full[key]["tokens_per_s"])

    return {
        "benchmark": "iflame_vs_full",
        "device": device_name(device),
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
        "face_acc_equal_time": equal_time_figures(args.time_runs) if args.time_runs else None,
        "decode_method": (
            f"{args.windows} timed windows of {args.window_faces} faces ({TOKENS_PER_FACE * args.window_faces} "
            f"sequential greedy steps) at starts evenly spread over faces [0, {args.decode_faces - args.window_faces}] "
            "(cache.seek to the start), after one untimed warm-up window; tokens_per_s = batch / "
            f"trapezoid-rule mean over start positions of the windows' seconds per step, i.e. the throughput of a "
            f"whole {args.decode_faces}-face generation; generation_s = that mean x {TOKENS_PER_FACE * args.decode_faces} steps"
        ),
        "settings": vars(args) | {"runs": [str(r) for r in args.runs or []],
                                  "time_runs": [str(r) for r in args.time_runs or []], "out": str(args.out)},
        "interleaved": inter,
        "full": full,
        "plain_transformer_cache_bytes": plain_cache,
    }


def table_rows(summary: dict[str, Any]) -> list[dict[str, str]]:
    """The results table (figure, interleaved, full, ratio) of a summary (with ``--only long`` and no
    earlier result, of the long setting alone)."""
    inter, full, free = summary.get("interleaved"), summary.get("full"), summary.get("attention_free_train")
    accuracy, settings = summary.get("face_acc"), summary.get("settings")
    rows: list[dict[str, str]] = []

    def cell(value: float | None, spec: str) -> str:
        return "-" if value is None else format(value, spec)

    def row(name: str, a: float | None, b: float | None, fmt: str) -> None:
        rows.append({"figure": name, "interleaved": cell(a, fmt), "full": cell(b, fmt), "ratio": cell(ratio(a, b), ".3f")})

    if free is not None:  # not with --only decode
        size = f"{settings['batch']} x {settings['faces']} faces"
        row(f"train step, {size} (s)", inter["train"]["step_s"], full["train"]["step_s"], ".3f")
        row("train step, attention free (s)", free["step_s"], full["train"]["step_s"], ".3f")
        row(f"peak memory, {size} (GB)", inter["train"]["peak_gb"], full["train"]["peak_gb"], ".2f")
        row("peak memory, attention free (GB)", free["peak_gb"], full["train"]["peak_gb"], ".2f")
    for long in summary.get("long_sequences", {}).values():
        size = f"{long['batch']} x {long['faces']} faces"
        row(f"train step, {size} (s)", long["interleaved"]["step_s"], long["full"]["step_s"], ".3f")
        row(f"peak memory, {size} (GB)", long["interleaved"]["peak_gb"], long["full"]["peak_gb"], ".2f")
    if inter is not None:  # not with --only long alone
        for key in (k for k in inter if k.startswith("decode_")):
            batch = key.rsplit("_b", 1)[1]
            mode = " (eager)" if key.startswith("decode_eager") else ""
            row(f"decode tokens/s, batch {batch}{mode}", inter[key]["tokens_per_s"], full[key]["tokens_per_s"], ",.0f")
        row(f"cache MB at {settings['decode_faces']} faces", inter["cache_bytes"] / 1e6, full["cache_bytes"] / 1e6, ".1f")
    if accuracy:
        steps = summary.get("face_acc_runs", {}).get("steps")
        row("val face-acc" + (f", {steps} steps each" if steps else ""), accuracy["interleaved"], accuracy["full"], ".4f")
    timed = summary.get("face_acc_equal_time")
    if timed:
        limit, steps = timed["runs"]["time_limit_min"], timed["runs"]["steps"]
        row(f"val face-acc, {limit:g} min each ({steps['interleaved']} / {steps['full']} steps)",
            timed["face_acc"]["interleaved"], timed["face_acc"]["full"], ".4f")
        rates = timed.get("samples_per_s_median")
        if rates:
            compiled = ", compiled" if timed["runs"].get("compile") else ""
            row(f"train-iflame samples/s, synth data{compiled} (median)", rates["interleaved"], rates["full"], ".0f")
    fastest = summary.get("train_step_fastest")
    if fastest:
        setting = ", ".join(("checkpointing" if fastest["grad_checkpoint"] else "no checkpointing",
                             "compiled" if fastest["compiled"] else "eager"))
        row(f"train step, {fastest['batch']} x {fastest['faces']} faces, {setting} (s)",
            fastest["interleaved"]["step_s"], fastest["full"]["step_s"], ".3f")
    short = summary.get("short_sequences")
    if short:
        row(f"train step, {short['batch']} x {short['faces']} faces (ms)",
            short["step_ms"]["interleaved"], short["step_ms"]["full"], ".1f")
    for mode, pair in summary.get("short_throughput", {}).items():
        if mode != "from":
            rates = pair["samples_per_s_median"]
            row(f"train-iflame samples/s, synth data, {mode} (median, {pair['steps']} steps)",
                rates["interleaved"], rates["full"], ".0f")
            if "wall_time_s" in pair:
                row(f"train-iflame wall time, synth data, {mode}, {pair['steps']} steps (s)",
                    pair["wall_time_s"]["interleaved"], pair["wall_time_s"]["full"], ".0f")
    first = summary.get("first_step")
    if first:
        row("first step, fresh machine, fla configs recorded (s)", first["interleaved_recorded_configs_s"],
            first["full_s"], ".1f")
        row("first step, fresh machine, fla autotuning (s)", first["interleaved_autotuned_s"], first["full_s"], ".1f")
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


def rescore_face_acc(out: Path, runs: list[Path] | None, time_runs: list[Path] | None) -> None:
    """Replace the face-acc figures of the result ``out`` with those of ``runs`` (the same steps)
    and/or ``time_runs`` (the same training time), retrained; the timings stay as measured. The
    summary records which figures came later, and from where."""
    summary = read_result(out, benchmark="iflame_vs_full")
    if runs:
        accuracy, run_settings = face_acc(dict(zip(("interleaved", "full"), runs)))
        summary.update(
            face_acc=accuracy,
            face_acc_delta_pt=100 * (accuracy["interleaved"] - accuracy["full"]),
            face_acc_runs=run_settings,
            face_acc_rescored_from=[str(r) for r in runs],
        )
    if time_runs:
        summary["face_acc_equal_time"] = equal_time_figures(time_runs)
    write(summary, out)


if __name__ == "__main__":
    main()

"""Where the time of a decoding step goes, kernel by kernel: what bounds batch-1 tokens/s.

    python benchmarks/decode_profile.py [--batch 1] [--faces 4000] [--window-faces 20] [--out benchmarks/results]
    python benchmarks/decode_profile.py --device cpu --tiny --faces 4   # CPU smoke test (eager steps, aten ops)

On CUDA the sampler's decoder replays one CUDA graph per token (:class:`meshforge.sample.decoding.GraphDecoder`):
the host is out of the loop, and a step's time is the GPU time of its kernels plus the gaps between
them (a kernel of the graph starts only after the one it depends on has finished and its successor
has been scheduled). For each attention kind, a window of ``--window-faces`` faces (every phase of a
face, in order, as a generation runs them) is decoded at the start and at the end of a ``--faces``
generation: once timed (CUDA-synchronised wall clock), once under ``torch.profiler``, whose kernel
records give per token (the loop is ``iflame_vs_full.py``'s: each token's argmax counts, and the
window's one position seek)

- ``kernels``: kernels launched (the graph's nodes; the reference model's docstring counts 67),
- ``busy_us``: their summed GPU time, ``gap_us``: ``wall_us - busy_us``,
- ``top``: the kernels by GPU time (name, launches and microseconds per token).

and the bounds: ``tokens_per_s_no_gaps`` (batch / busy: every gap gone, the kernels as they are) and
``kernels_for_target`` (how many kernels of the measured mean cost, gap included, fit the time a token
has at ``--target`` tokens/s). On CPU the steps run eagerly and the "kernels" are the leaf aten ops.
Writes ``decode_profile.json`` (device named) and ``decode_profile.png`` (the table).
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from meshforge.data.tokens import TOKENS_PER_FACE, Vocab
from meshforge.io import atomic_write_json
from meshforge.models.iflame import IFlame, IFlameConfig
from meshforge.render import render_table_png
from meshforge.runtime import console, device_name, resolve_device
from meshforge.sample.decoding import bf16_weights, make_decoder

RESULTS = Path(__file__).parent / "results"
VOCAB = Vocab(7)
TOP_KERNELS = 12
TINY = {"dim": 64, "n_heads": 2, "blocks": (1, 1, 1, 1, 1)}


def kernel_records(prof: profile, device: torch.device) -> list[tuple[str, float]]:
    """(name, microseconds) of every kernel the profile saw: CUDA kernels, or on CPU the leaf aten ops."""
    if device.type == "cuda":  # device events but record_function's GPU shadows (meshforge.train.profiling)
        return [(e.name, e.time_range.elapsed_us()) for e in prof.events()
                if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)]  # fmt: skip
    return [(e.name, e.time_range.elapsed_us()) for e in prof.events()
            if e.device_type == DeviceType.CPU and e.name.startswith("aten::") and not e.cpu_children]  # fmt: skip


def window_profile(decoder, device: torch.device, start_face: int, faces: int, batch: int) -> dict[str, Any]:
    """Per-token wall time, kernels and GPU time of ``faces`` faces decoded from ``start_face`` on."""
    steps = TOKENS_PER_FACE * faces
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    first = torch.full((batch,), VOCAB.start, dtype=torch.long, device=device)

    def run() -> None:
        token = first
        decoder.cache.seek(TOKENS_PER_FACE * start_face)
        for _ in range(steps):
            token = decoder.step(token)[:, : VOCAB.levels].argmax(-1)

    run()  # warm: kernels loaded, allocator pools grown
    sync()
    start = time.perf_counter()
    run()
    sync()
    wall_us = (time.perf_counter() - start) / steps * 1e6
    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        run()
        sync()
    records = kernel_records(prof, device)
    if not records:
        return {"start_token": TOKENS_PER_FACE * start_face, "wall_us": wall_us, "kernels": None,
                "note": "the profiler recorded no kernels (CUPTI unavailable?)"}  # fmt: skip
    by_name: dict[str, list[float]] = defaultdict(list)
    for name, us in records:
        by_name[name].append(us)
    busy_us = sum(us for _, us in records) / steps
    top = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:TOP_KERNELS]
    return {
        "start_token": TOKENS_PER_FACE * start_face,
        "wall_us": wall_us,
        "kernels": len(records) / steps,
        "busy_us": busy_us,
        "gap_us": wall_us - busy_us,
        "top": [{"kernel": name[:90], "launches": len(us) / steps, "us": sum(us) / steps} for name, us in top],
    }


def bounds(window: dict[str, Any], batch: int, target: float) -> dict[str, float]:
    """What the window's figures allow: tokens/s as measured, with no gaps, and the kernel count at ``target``."""
    per_kernel_us = window["wall_us"] / window["kernels"]
    return {
        "tokens_per_s": batch * 1e6 / window["wall_us"],
        "tokens_per_s_no_gaps": batch * 1e6 / window["busy_us"],
        "us_per_kernel": per_kernel_us,
        "gap_us_per_kernel": window["gap_us"] / window["kernels"],
        "kernels_for_target": batch * 1e6 / target / per_kernel_us,
    }


@torch.inference_mode()
def profile_kind(config: IFlameConfig, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(0)
    model = IFlame(config).to(device).eval()
    model = bf16_weights(model) if device.type == "cuda" else model
    decoder = make_decoder(model, args.batch, TOKENS_PER_FACE * args.faces, device)
    windows = []
    for start_face in sorted({0, args.faces - args.window_faces}):
        window = window_profile(decoder, device, start_face, args.window_faces, args.batch)
        if window["kernels"]:
            window |= bounds(window, args.batch, args.target)
        windows.append(window)
    return {"cuda_graphs": device.type == "cuda", "windows": windows}


def table_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for kind, figures in result["kinds"].items():
        for w in figures["windows"]:
            row = {"attention": kind, "start token": w["start_token"], "wall us/token": round(w["wall_us"], 1)}
            if w["kernels"]:
                row |= {"kernels/token": round(w["kernels"], 1), "busy us": round(w["busy_us"], 1),
                        "gap us": round(w["gap_us"], 1), "tok/s": round(w["tokens_per_s"]),
                        "tok/s, no gaps": round(w["tokens_per_s_no_gaps"]),
                        f"kernels for {result['target_tokens_per_s']:g} tok/s": round(w["kernels_for_target"], 1)}  # fmt: skip
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--faces", type=int, default=4000, help="the generation whose start and end are profiled")
    parser.add_argument("--window-faces", type=int, default=20, help="faces decoded per profiled window")
    parser.add_argument("--target", type=float, default=4000.0, help="tokens/s the kernel-count bound is taken at")
    parser.add_argument("--attention", nargs="+", default=["interleaved", "full"], choices=["interleaved", "full"])
    parser.add_argument("--tiny", action="store_true", help=f"a small model ({TINY}) for smoke tests")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.batch < 1 or not 1 <= args.window_faces <= args.faces:
        parser.error("need --batch >= 1 and 1 <= --window-faces <= --faces")
    device = resolve_device(args.device)
    size = TINY if args.tiny else {}
    result: dict[str, Any] = {
        "benchmark": "decode_profile",
        "device": device_name(device),
        "torch": torch.__version__,
        "batch": args.batch, "faces": args.faces, "window_faces": args.window_faces,
        "target_tokens_per_s": args.target,
        "model": {k: v for k, v in asdict(IFlameConfig(**size)).items() if k in ("dim", "n_heads", "blocks", "full_every")},
        "kinds": {},
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    for kind in args.attention:
        config = IFlameConfig(**size, attention=kind, max_seq_len=TOKENS_PER_FACE * (args.faces + 1))
        result["kinds"][kind] = profile_kind(config, device, args)
        atomic_write_json(args.out / "decode_profile.json", result)  # each kind kept if a deadline stops the run
    rows = table_rows(result)
    render_table_png(rows, args.out / "decode_profile.png", title=f"Decoding step, batch {args.batch}, {result['device']}")
    for row in rows:
        console.print(row)


if __name__ == "__main__":
    main()

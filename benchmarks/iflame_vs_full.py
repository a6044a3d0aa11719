"""iFlame (interleaved attention) against its full-attention baseline, same code and sizes, on one GPU.

    python benchmarks/iflame_vs_full.py [--batch 48] [--faces 800] [--decode-faces 4000]
        [--runs RUN_INTERLEAVED RUN_FULL --data DATASET]

Measures, for both ``attention`` settings of the reference model (512 wide, 16 heads, 4/4/8/4/4):
training step time and peak memory (forward + backward + AdamW, bf16 autocast, random tokens of
``--faces`` faces), decoding throughput at batch 1 and 16 (``model.step`` with greedy feedback, so
every step depends on the previous one), and the attention-cache bytes at ``--decode-faces``. The
cache is also compared with a plain 24-block full-attention transformer at the token level (the
comparison behind iFlame's "about 1/8"). With ``--runs`` (two ``train-iflame`` runs trained with the
same recipe and token budget) it adds their val face accuracy. Writes
``benchmarks/results/iflame_vs_full.json`` naming the device; ``--device cpu`` with small sizes is
a smoke test.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from rich.table import Table
from torch.nn import functional as F

from meshforge.data.tokens import TOKENS_PER_FACE, Vocab
from meshforge.io import atomic_write_json
from meshforge.models.iflame import IFlame, IFlameConfig
from meshforge.runtime import console, resolve_device

RESULT = Path(__file__).parent / "results" / "iflame_vs_full.json"
VOCAB = Vocab(7)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else nullcontext()


def timed(fn: Callable[[], None], device: torch.device, warmup: int, repeat: int) -> float:
    """Seconds per call of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    synchronize(device)
    return (time.perf_counter() - start) / repeat


def train_step(cfg: IFlameConfig, device: torch.device, batch: int, faces: int, steps: int) -> dict[str, Any]:
    torch.manual_seed(0)
    model = IFlame(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randint(0, VOCAB.levels, (batch, TOKENS_PER_FACE * (faces + 1)), device=device)

    def step() -> None:
        with autocast(device):
            logits = model(x)
        loss = F.cross_entropy(logits.float().flatten(0, 1), x.roll(-1, 1).flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    try:
        seconds = timed(step, device, warmup=2, repeat=steps)
    except torch.cuda.OutOfMemoryError:
        return {"step_s": None, "peak_bytes": None, "oom": True}
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"step_s": seconds, "peak_bytes": peak, "oom": False}


@torch.inference_mode()
def decode(model: IFlame, device: torch.device, batch: int, faces: int) -> dict[str, Any]:
    """Tokens/s of cached decoding, greedy over coordinates, for ``faces`` faces per sequence."""
    steps = TOKENS_PER_FACE * faces
    dtype = torch.bfloat16 if device.type == "cuda" else None
    cache = model.init_cache(batch, steps, device, dtype)
    token = torch.full((batch,), VOCAB.start, dtype=torch.long, device=device)
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        with autocast(device):
            token = model.step(token, cache)[:, : VOCAB.levels].argmax(-1)
    synchronize(device)
    seconds = time.perf_counter() - start
    return {"tokens_per_s": batch * steps / seconds, "seconds": seconds, "cache_bytes": cache.nbytes()}


def face_acc(run: Path, data: Path, device: torch.device) -> float:
    from meshforge.data.shards import TokenDataset
    from meshforge.metrics.tokens import token_metrics
    from meshforge.train.checkpoint import load_model

    _, model, _ = load_model(run, device)
    dtype = torch.bfloat16 if device.type == "cuda" else None
    return token_metrics(model, TokenDataset(data, "val"), autocast=dtype)["face_acc"]


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a / b


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--faces", type=int, default=800)
    parser.add_argument("--train-steps", type=int, default=5)
    parser.add_argument("--decode-faces", type=int, default=4000)
    parser.add_argument("--decode-batches", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--dim", type=int, default=512, help="smaller for a smoke test")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--grad-checkpoint", action="store_true", help="recompute block activations in backward")
    parser.add_argument("--runs", type=Path, nargs=2, metavar=("INTERLEAVED", "FULL"))
    parser.add_argument("--data", type=Path, help="token dataset of --runs (its val split)")
    parser.add_argument("--out", type=Path, default=RESULT)
    args = parser.parse_args()
    device = resolve_device(args.device)
    max_len = TOKENS_PER_FACE * (max(args.faces, args.decode_faces) + 1)
    base = {"dim": args.dim, "n_heads": args.heads, "max_seq_len": max_len, "grad_checkpoint": args.grad_checkpoint}
    configs = {kind: IFlameConfig(**base, attention=kind) for kind in ("interleaved", "full")}

    results: dict[str, dict[str, Any]] = {}
    for kind, cfg in configs.items():
        console.print(f"[bold]{kind}[/bold]: training step at {args.batch} x {args.faces} faces")
        results[kind] = {"train": train_step(cfg, device, args.batch, args.faces, args.train_steps)}
        torch.manual_seed(0)
        model = IFlame(cfg).to(device).eval()
        for batch in args.decode_batches:
            console.print(f"[bold]{kind}[/bold]: decoding {args.decode_faces} faces at batch {batch}")
            results[kind][f"decode_b{batch}"] = decode(model, device, batch, args.decode_faces)
        results[kind]["cache_bytes"] = model.init_cache(1, TOKENS_PER_FACE * args.decode_faces, device, torch.bfloat16).nbytes()
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    plain = IFlame(IFlameConfig(**base, attention="full", blocks=(0, 0, 0, 0, 24))).to(device)
    plain_cache = plain.init_cache(1, TOKENS_PER_FACE * args.decode_faces, device, torch.bfloat16).nbytes()
    del plain

    inter, full = results["interleaved"], results["full"]
    first_batch = args.decode_batches[0]
    accuracy = {}
    if args.runs:
        if args.data is None:
            parser.error("--runs needs --data")
        accuracy = {kind: face_acc(run, args.data, device) for kind, run in zip(("interleaved", "full"), args.runs)}
    summary = {
        "benchmark": "iflame_vs_full",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "train_step_time_ratio": ratio(inter["train"]["step_s"], full["train"]["step_s"]),
        "peak_memory_ratio": ratio(inter["train"]["peak_bytes"], full["train"]["peak_bytes"]),
        "decode_throughput_ratio": ratio(
            inter[f"decode_b{first_batch}"]["tokens_per_s"], full[f"decode_b{first_batch}"]["tokens_per_s"]
        ),
        "kv_cache_ratio": ratio(inter["cache_bytes"], full["cache_bytes"]),
        "kv_cache_ratio_vs_plain_transformer": ratio(inter["cache_bytes"], plain_cache),
        "face_acc_delta_pt": 100 * (accuracy["interleaved"] - accuracy["full"]) if accuracy else None,
        "face_acc": accuracy or None,
        "settings": vars(args) | {"runs": [str(r) for r in args.runs or []], "data": str(args.data or "")},
        "interleaved": inter,
        "full": full,
        "plain_transformer_cache_bytes": plain_cache,
    }

    table = Table(title=f"iFlame interleaved vs full on {summary['device']}")
    for column in ("figure", "interleaved", "full", "ratio"):
        table.add_column(column, justify="right")

    def row(name: str, a: float | None, b: float | None, fmt: str) -> None:
        def cell(value: float | None, spec: str) -> str:
            return "-" if value is None else format(value, spec)

        table.add_row(name, cell(a, fmt), cell(b, fmt), cell(ratio(a, b), ".3f"))

    def gigabytes(r: dict[str, Any]) -> float | None:
        peak = r["train"]["peak_bytes"]
        return None if peak is None else peak / 1e9

    row("train step (s)", inter["train"]["step_s"], full["train"]["step_s"], ".3f")
    row("peak memory (GB)", gigabytes(inter), gigabytes(full), ".2f")
    for batch in args.decode_batches:
        key = f"decode_b{batch}"
        row(f"decode tokens/s, batch {batch}", inter[key]["tokens_per_s"], full[key]["tokens_per_s"], ",.0f")
    row(f"cache MB at {args.decode_faces} faces", inter["cache_bytes"] / 1e6, full["cache_bytes"] / 1e6, ".1f")
    if accuracy:
        row("val face-acc", accuracy["interleaved"], accuracy["full"], ".4f")
    console.print(table)
    atomic_write_json(args.out, summary)
    console.print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

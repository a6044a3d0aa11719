"""`meshforge eval --metric M`: score a checkpoint or a folder of samples; prints and writes JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from meshforge import workspace
from meshforge.errors import InputError, MeshforgeError
from meshforge.io import atomic_write_json
from meshforge.runtime import resolve_device
from meshforge.stages import RunContext, Stage

TOKEN_METRICS = {"face-acc": "face_acc", "perplexity": "perplexity"}
# The checkpoint kind a metric scores (cov-mmd-1nna scores samples instead).
METRIC_KIND = {"face-acc": "iflame", "perplexity": "iflame", "recon": "ss-vae"}


def _default_checkpoint(options: dict) -> Path | None:
    kind = METRIC_KIND.get(options.get("metric"))
    return workspace.newest_run(kind) if kind else None


def _default_samples(options: dict) -> Path | None:
    if options.get("metric") != "cov-mmd-1nna":
        return None
    return workspace.run_samples(workspace.newest_run("iflame", "ss-dit"))


def _default_data(options: dict) -> Path | None:
    if options.get("checkpoint") is not None:
        return workspace.run_dataset(options["checkpoint"])
    return workspace.samples_dataset(options["samples"]) if options.get("samples") is not None else None


@dataclass
class EvalConfig:
    metric: Literal["face-acc", "perplexity", "recon", "cov-mmd-1nna"] = field(
        metadata={
            "help": "face-acc/perplexity: teacher-forced over non-PAD val tokens; recon: Chamfer, F-score, "
            "normal consistency; cov-mmd-1nna: COV, MMD, 1-NNA of samples against the split."
        },
    )
    data: Path = field(
        metadata={
            "help": "Dataset folder (tokens for face-acc/perplexity, sparse SDF for recon, tokens or SDF for "
            "cov-mmd-1nna; default: the dataset the checkpoint was trained on)."
        },
    )
    checkpoint: Path | None = field(
        default=None,
        metadata={
            "help": "Checkpoint: a run folder, its checkpoints folder or a step folder (default: the newest "
            "run of the metric's model under ./runs)."
        },
    )
    samples: Path | None = field(
        default=None,
        metadata={"help": "Folder of sampled meshes (cov-mmd-1nna; default: the newest run's samples/)."},
    )
    out: Path | None = field(default=None, metadata={"help": "JSON file to write the result to."})
    split: Literal["train", "val"] = field(default="val", metadata={"help": "Dataset split to evaluate on."})
    n: int | None = field(
        default=None,
        metadata={"help": "Evaluate on the first N meshes of the split (default: all)."},
    )
    max_faces: int | None = field(
        default=None,
        metadata={
            "help": "face-acc/perplexity: score only the first N faces of each mesh, as train-iflame "
            "--max-faces (default: what the checkpoint was trained on)."
        },
    )
    batch_size: int = field(default=16, metadata={"help": "Meshes per forward pass."})
    ema: bool = field(
        default=True,
        metadata={
            "help": "face-acc/perplexity/recon: use the checkpoint's EMA weights when it has them (--no-ema: "
            "as trained)."
        },
    )

    def __post_init__(self) -> None:
        needs = "samples" if self.metric == "cov-mmd-1nna" else "checkpoint"
        if getattr(self, needs) is None:
            raise ValueError(f"--metric {self.metric} needs --{needs}")
        if self.n is not None and self.n < 1:
            raise ValueError("n must be at least 1")
        if self.max_faces is not None and self.max_faces < 1:
            raise ValueError("max_faces must be at least 1")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")


def _token_metrics(cfg: EvalConfig, device: torch.device) -> dict[str, Any]:
    from meshforge.data.shards import TokenDataset
    from meshforge.data.tokens import TOKENS_PER_FACE
    from meshforge.metrics.tokens import token_metrics
    from meshforge.train.checkpoint import load_model
    from meshforge.train.tasks.iflame import checkpoint_max_faces

    kind, model, meta = load_model(cfg.checkpoint, device, ema=cfg.ema)
    if kind != "iflame":
        raise InputError(cfg.checkpoint, f"is a {kind!r} checkpoint; --metric {cfg.metric} needs an iFlame ('iflame')")
    dataset = TokenDataset(cfg.data, cfg.split)
    if len(dataset) == 0:
        raise MeshforgeError(f"{cfg.data}: the {cfg.split} split is empty")
    if dataset.vocab.size != model.config.vocab_size:
        raise MeshforgeError(
            f"{cfg.data} holds {dataset.vocab.bits}-bit tokens (vocabulary {dataset.vocab.size}) but checkpoint "
            f"{meta['path']} was trained on a vocabulary of {model.config.vocab_size}: tokenize with its --bits"
        )
    capacity = model.config.max_seq_len // TOKENS_PER_FACE - 1
    if cfg.max_faces is not None and cfg.max_faces > capacity:
        raise MeshforgeError(
            f"--max-faces {cfg.max_faces} is more than checkpoint {meta['path']} handles "
            f"({capacity} faces in max_seq_len {model.config.max_seq_len})"
        )
    max_faces = cfg.max_faces or checkpoint_max_faces(meta)
    amp = torch.bfloat16 if device.type == "cuda" else None
    max_len = TOKENS_PER_FACE * (max_faces + 1)
    result = token_metrics(model, dataset, batch_size=cfg.batch_size, max_meshes=cfg.n, max_len=max_len, autocast=amp)
    return {**result, "kind": kind, "step": meta.get("step"), "checkpoint": meta["path"], "max_faces": max_faces,
            "weights": meta["weights"]}


def _library(module: str, function: str, metric: str) -> Any:
    """A metric function imported only when asked for (its dependencies may be heavy or absent)."""
    import importlib

    try:
        return getattr(importlib.import_module(module), function)
    except (ImportError, AttributeError) as exc:
        raise MeshforgeError(f"--metric {metric} is not available ({exc})") from None


def _recon(cfg: EvalConfig, device: torch.device, seed: int) -> dict[str, Any]:
    evaluate_reconstruction = _library("meshforge.metrics.recon", "evaluate_reconstruction", cfg.metric)
    return evaluate_reconstruction(cfg.checkpoint, cfg.data, split=cfg.split, n=cfg.n, device=device, seed=seed, ema=cfg.ema)


def _generative(cfg: EvalConfig, device: torch.device, seed: int) -> dict[str, Any]:
    evaluate_generation = _library("meshforge.metrics.geometry", "evaluate_generation", cfg.metric)
    return evaluate_generation(cfg.samples, cfg.data, split=cfg.split, n=cfg.n, device=device, seed=seed)


def run(cfg: EvalConfig, ctx: RunContext) -> dict:
    device = resolve_device(ctx.device)
    if cfg.metric in TOKEN_METRICS:
        result = _token_metrics(cfg, device)
        headline = {cfg.metric: result[TOKEN_METRICS[cfg.metric]]}
    elif cfg.metric == "recon":
        result = headline = _recon(cfg, device, ctx.seed)
    else:
        result = headline = _generative(cfg, device, ctx.seed)
    if "weights" in result:
        print(f"weights: {result['weights']} ({'the moving average' if result['weights'] == 'ema' else 'as trained'})")
    for name, value in headline.items():
        if isinstance(value, float):
            print(f"{name}: {value:.4f}")
    record = {"metric": cfg.metric, "data": str(cfg.data), "split": cfg.split, **result}
    if cfg.out is not None:
        atomic_write_json(cfg.out, record)
    return record


stage = Stage(
    name="eval",
    help="Evaluate: face-acc / perplexity (iFlame), recon (SS-VAE), cov-mmd-1nna (sampled meshes).",
    config=EvalConfig,
    run=run,
    inputs=("data", "checkpoint", "samples"),
    outputs=("out",),
    workspace={"checkpoint": _default_checkpoint, "samples": _default_samples, "data": _default_data},
)

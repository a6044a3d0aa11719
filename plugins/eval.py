"""`meshforge eval --metric M`: score a checkpoint or a folder of samples; prints and writes JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from meshforge import workspace
from meshforge.errors import InputError
from meshforge.io import atomic_write_json
from meshforge.models.registry import checkpoint_kind, model_spec, spec_for_metric
from meshforge.stages import RunContext, Stage

SAMPLE_METRICS = ("cov-mmd-1nna",)  # metrics of sampled meshes; the others score a checkpoint


def _default_checkpoint(options: dict) -> Path | None:
    spec = spec_for_metric(options.get("metric"))
    return workspace.newest_run(spec.kind) if spec else None


def _default_samples(options: dict) -> Path | None:
    if options.get("metric") not in SAMPLE_METRICS:
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
        needs = "samples" if self.metric in SAMPLE_METRICS else "checkpoint"
        if getattr(self, needs) is None:
            raise ValueError(f"--metric {self.metric} needs --{needs}")
        if self.n is not None and self.n < 1:
            raise ValueError("n must be at least 1")
        if self.max_faces is not None and self.max_faces < 1:
            raise ValueError("max_faces must be at least 1")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")


def _generative(cfg: EvalConfig, device: torch.device, seed: int) -> dict[str, Any]:
    from meshforge.metrics.geometry import evaluate_generation

    return evaluate_generation(cfg.samples, cfg.data, split=cfg.split, n=cfg.n, device=device, seed=seed)


def _checkpoint(cfg: EvalConfig, device: torch.device, seed: int) -> dict[str, Any]:
    """The metric from the evaluator of the checkpoint's model, when its model reports that metric."""
    spec = model_spec(checkpoint_kind(cfg.checkpoint))
    if cfg.metric not in spec.metrics:
        needs = spec_for_metric(cfg.metric)
        raise InputError(cfg.checkpoint, f"is a {spec.kind!r} checkpoint; --metric {cfg.metric} needs "
                         f"a {needs.kind!r} checkpoint" if needs else f"--metric {cfg.metric} scores no checkpoint")
    return spec.evaluate_function()(cfg, device, seed)


def run(cfg: EvalConfig, ctx: RunContext) -> dict:
    device = ctx.torch_device
    score = _generative if cfg.metric in SAMPLE_METRICS else _checkpoint
    result = score(cfg, device, ctx.seed)
    # A metric reported under its own name is the headline; otherwise every figure is.
    key = cfg.metric.replace("-", "_")
    headline = {cfg.metric: result[key]} if key in result else result
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

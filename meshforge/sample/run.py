"""`meshforge sample`: a checkpoint in, a folder of meshes + ``grid.png`` + ``stats.json`` out.

The checkpoint's kind picks the sampler: ``iflame`` samples face tokens autoregressively
(:mod:`meshforge.sample.iflame`) that decode to quantised meshes; ``ss-dit`` integrates the
rectified flow, decodes the latents with its VAE and re-meshes the SDF (:mod:`meshforge.sample.flow`).
Both end in :func:`meshforge.sample.export.write_samples`, so the outputs look the same.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from meshforge.data.tokens import Vocab, decode_tokens
from meshforge.errors import InputError, MeshforgeError
from meshforge.render import Mesh
from meshforge.runtime import seed_everything
from meshforge.sample.export import FORMATS, mesh_from_canonical, postprocess, write_samples
from meshforge.sample.iflame import check_shaping


@dataclass
class SampleStageConfig:
    """Options of ``meshforge sample``; options of the other model kind are ignored."""

    checkpoint: Path
    out: Path
    n: int = 16
    batch_size: int = 16
    formats: list[str] = field(default_factory=lambda: ["obj"])
    # iFlame
    temperature: float = 1.0  # 0: greedy
    top_k: int | None = None
    top_p: float | None = None
    max_faces: int = 800
    cuda_graphs: bool = True
    # SS-DiT (the released Direct3D-S2 pipeline samples 30 steps at guidance 7)
    steps: int = 30
    cfg_scale: float = 7.0
    sampler: Literal["euler", "heun"] = "euler"  # ODE integrator
    image: Path | None = None
    class_label: str | None = None
    # Post-processing of every mesh (as the released Direct3D-S2 pipeline does)
    simplify: int | None = None  # decimate to at most this many faces (needs meshforge[post])
    fill_holes: bool = False

    def __post_init__(self) -> None:
        if self.n < 1 or self.batch_size < 1:
            raise ValueError("n and batch_size must be at least 1")
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise ValueError(f"formats must be among {', '.join(FORMATS)} (got {self.formats})")
        check_shaping(self.temperature, self.top_k, self.top_p)
        if self.max_faces < 1 or self.steps < 1:
            raise ValueError("max_faces and steps must be at least 1")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.image is not None and self.class_label is not None:
            raise ValueError("give an image or a class label, not both")
        if self.simplify is not None and self.simplify < 4:
            raise ValueError(f"simplify must be at least 4 faces, got {self.simplify}")


Sampler = Callable[
    [nn.Module, dict[str, Any], SampleStageConfig, torch.device, int], tuple[list[Mesh], dict[str, Any]]
]


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def vocab_of(meta: dict[str, Any]) -> Vocab:
    """The token vocabulary a checkpoint was trained with (from its model config's ``vocab_size``)."""
    size = int(meta["model_config"]["vocab_size"])
    bits = (size - 3).bit_length() - 1
    if bits < 2 or Vocab(bits).size != size:
        raise InputError(meta.get("path", "checkpoint"), f"vocab_size {size} is not 2**bits + 3")
    return Vocab(bits)


def sample_iflame(
    model: nn.Module, meta: dict[str, Any], cfg: SampleStageConfig, device: torch.device, seed: int
) -> tuple[list[Mesh], dict[str, Any]]:
    """Unconditional face-token sampling, decoded to meshes; reports time and tokens/s."""
    if cfg.image is not None or cfg.class_label is not None:
        raise MeshforgeError("iFlame checkpoints are unconditional: drop --image / --class-label")
    from meshforge.sample.iflame import SampleConfig, sample_tokens

    vocab = vocab_of(meta)
    options = SampleConfig(
        n=cfg.n,
        batch_size=cfg.batch_size,
        max_faces=cfg.max_faces,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        seed=seed,
        cuda_graphs=cfg.cuda_graphs,
    )
    sequences, timing = sample_tokens(model, vocab, options, device)
    meshes = [mesh_from_canonical(decode_tokens(s, vocab)) for s in sequences]
    return meshes, {
        "time_s": round(timing["time_s"], 3),
        "tokens": timing["tokens"],
        "tokens_per_s": round(timing["tokens_per_s"], 1),
    }


def sample_dit(
    model: nn.Module, meta: dict[str, Any], cfg: SampleStageConfig, device: torch.device, seed: int
) -> tuple[list[Mesh], dict[str, Any]]:
    """Rectified-flow sampling of sparse latents, decoded to meshes; reports time and meshes/s."""
    from meshforge.sample.flow import sample_meshes

    start = time.perf_counter()
    meshes = sample_meshes(
        model,
        meta,
        n=cfg.n,
        batch_size=cfg.batch_size,
        steps=cfg.steps,
        cfg_scale=cfg.cfg_scale,
        sampler=cfg.sampler,
        image=cfg.image,
        class_label=cfg.class_label,
        seed=seed,
        device=device,
    )
    _synchronize(device)
    elapsed = time.perf_counter() - start
    return list(meshes), {"time_s": round(elapsed, 3), "meshes_per_s": round(len(meshes) / elapsed, 3)}


SAMPLERS: dict[str, Sampler] = {"iflame": sample_iflame, "ss-dit": sample_dit}


def sample_to_dir(cfg: SampleStageConfig, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Load the checkpoint, sample ``cfg.n`` meshes with its kind's sampler, write them to ``cfg.out``.

    Returns the stats without the per-mesh records (those are in ``stats.json``).
    """
    from meshforge.train.checkpoint import load_model

    if cfg.image is not None and not cfg.image.is_file():
        raise InputError(cfg.image, "no such image")
    kind, model, meta = load_model(cfg.checkpoint, device)
    if kind not in SAMPLERS:
        raise MeshforgeError(
            f"{meta.get('path', cfg.checkpoint)}: a {kind!r} checkpoint does not sample meshes "
            f"(expected {' or '.join(SAMPLERS)})"
        )
    seed_everything(seed)
    with torch.no_grad():
        meshes, extra = SAMPLERS[kind](model, meta, cfg, device, seed)
    if cfg.simplify is not None or cfg.fill_holes:
        meshes = [postprocess(m, cfg.simplify, cfg.fill_holes) for m in meshes]
    stats = write_samples(
        meshes,
        cfg.out,
        cfg.formats,
        extra_stats={
            "kind": kind,
            "checkpoint": meta.get("path"),
            "step": meta.get("step"),
            "seed": seed,
            **extra,
        },
    )
    return {k: v for k, v in stats.items() if k != "meshes"}

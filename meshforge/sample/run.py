"""`meshforge sample`: a checkpoint in, a folder of meshes + ``grid.png`` + ``stats.json`` out.

The sampler is the one the checkpoint's model spec names (:mod:`meshforge.models.registry`): ``iflame`` samples face tokens autoregressively
(:mod:`meshforge.sample.iflame`) that decode to quantised meshes, or completes the first faces
of given meshes (``prompt``: written beside each completion, and green in the grid); ``ss-dit`` integrates the
rectified flow, decodes the latents with its VAE and re-meshes the SDF (:mod:`meshforge.sample.flow`).
Both end in :func:`meshforge.sample.export.write_samples`, so the outputs look the same.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from meshforge.data.tokens import TOKENS_PER_FACE, Vocab, decode_tokens, encode_mesh
from meshforge.errors import InputError, MeshforgeError
from meshforge.models.iflame import IFlame, checkpoint_max_faces
from meshforge.models.registry import LoadedModel, checkpoint_kind, load_model, model_spec
from meshforge.models.ss_dit import LatentFlow
from meshforge.render import Mesh
from meshforge.runtime import console, seed_everything
from meshforge.sample.export import FORMATS, mesh_from_canonical, postprocess, write_samples
from meshforge.sample.flow import FlowSampling, sample_meshes
from meshforge.sample.iflame import SampleConfig, TokenSampling, sample_tokens


@dataclass(kw_only=True)
class SampleStageConfig(TokenSampling, FlowSampling):
    """Options of ``meshforge sample``: the samplers' own options (:class:`TokenSampling` for iFlame,
    :class:`FlowSampling` for SS-DiT; those of the other model kind are ignored) and these."""

    checkpoint: Path = field(
        metadata={
            "help": "Checkpoint: a run folder, its checkpoints folder or a step folder (default: the newest "
            "iFlame or SS-DiT run under ./runs)."
        },
    )
    out: Path = field(
        metadata={"help": "Folder for sample_000.obj ..., grid.png and stats.json (default: RUN/samples)."},
    )
    n: int = field(default=16, metadata={"help": "Number of meshes to sample."})
    batch_size: int = field(default=16, metadata={"help": "Meshes sampled at once."})
    formats: list[str] = field(
        default_factory=lambda: ["obj"],
        metadata={"help": "Mesh file formats to write (obj, ply, glb)."},
    )
    ema: bool = field(
        default=True,
        metadata={
            "help": "Use the checkpoint's EMA weights when it has them (--no-ema: the weights as trained)."
        },
    )
    # iFlame
    max_faces: int | None = field(
        default=None,
        metadata={
            "help": "iFlame: stop a mesh after this many faces (default: what the checkpoint was trained "
            "on)."
        },
    )
    prompt: Path | None = field(
        default=None,
        metadata={
            "help": "iFlame: complete meshes from this mesh file or token dataset folder (its val meshes in "
            "turn); writes NAME_prompt files beside the completions, prompt faces green in grid.png."
        },
    )
    prompt_faces: int = field(
        default=4,
        metadata={
            "help": "iFlame with --prompt: leading faces (canonical order) of each mesh fed as the prompt."
        },
    )
    # Post-processing of every mesh (as the released Direct3D-S2 pipeline does)
    simplify: int | None = field(
        default=None,
        metadata={
            "help": "Decimate every mesh to at most this many faces (needs fast-simplification: "
            "meshforge[post])."
        },
    )
    fill_holes: bool = field(
        default=False,
        metadata={"help": "Fill the holes of every mesh (boundary loops) before writing it."},
    )

    def __post_init__(self) -> None:
        TokenSampling.__post_init__(self)
        FlowSampling.__post_init__(self)
        if self.n < 1 or self.batch_size < 1:
            raise ValueError("n and batch_size must be at least 1")
        bad = [f for f in self.formats if f not in FORMATS]
        if bad or not self.formats:
            raise ValueError(f"formats must be among {', '.join(FORMATS)} (got {self.formats})")
        if (self.max_faces is not None and self.max_faces < 1) or self.prompt_faces < 1:
            raise ValueError("max_faces and prompt_faces must be at least 1")
        if self.simplify is not None and self.simplify < 4:
            raise ValueError(f"simplify must be at least 4 faces, got {self.simplify}")


# A sampler (what a ModelSpec names, see meshforge.models.registry) returns the meshes, stats for
# stats.json and, when it completed prompts, the prompts.
Sampler = Callable[
    [LoadedModel, SampleStageConfig, torch.device, int],
    tuple[list[Mesh], dict[str, Any], list[Mesh] | None],
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


def prompt_tokens(path: Path, n: int, faces: int, vocab: Vocab) -> list[np.ndarray]:
    """``n`` prompts, each the first ``faces`` faces (fewer if a mesh has fewer) of a mesh in canonical
    order, as coordinate tokens: from a mesh file (its meshes in turn), or from a token dataset
    folder (its val meshes in turn, re-quantised if its bits differ from the checkpoint's)."""
    from meshforge.data.canonical import canonicalize
    from meshforge.data.meshio import load_meshes
    from meshforge.data.shards import TokenDataset

    path = Path(path)
    if path.is_dir():
        if not (path / "manifest.json").is_file():
            raise InputError(path, "not a mesh file or a token dataset folder (no manifest.json)")
        dataset = TokenDataset(path, "val", bits=vocab.bits)
        if len(dataset) == 0:
            raise InputError(path, "the token dataset's val split is empty: no meshes to prompt with")
        meshes = [dataset.tokens(i % len(dataset)) for i in range(min(n, len(dataset)))]
    elif path.is_file():
        meshes = [encode_mesh(canonicalize(m.vertices, m.faces, bits=vocab.bits, name=str(path))) for m in load_meshes(path)]
    else:
        raise InputError(path, "no such prompt file or folder")
    return [meshes[i % len(meshes)][: TOKENS_PER_FACE * faces] for i in range(n)]


def sample_iflame(
    loaded: LoadedModel[IFlame], cfg: SampleStageConfig, device: torch.device, seed: int
) -> tuple[list[Mesh], dict[str, Any], list[Mesh] | None]:
    """Face-token sampling (unconditional, or completing prompts), decoded to meshes; reports time and tokens/s."""
    if cfg.image is not None or cfg.class_label is not None:
        raise MeshforgeError("iFlame checkpoints are unconditional: drop --image / --class-label (or complete meshes with --prompt)")
    vocab = vocab_of(loaded.meta)
    prompts = prompt_tokens(cfg.prompt, cfg.n, cfg.prompt_faces, vocab) if cfg.prompt is not None else None
    options = SampleConfig(
        n=cfg.n,
        batch_size=cfg.batch_size,
        max_faces=cfg.max_faces or checkpoint_max_faces(loaded.meta),
        seed=seed,
        **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(TokenSampling)},
    )
    sequences, timing = sample_tokens(loaded.model, vocab, options, device, prompts=prompts)
    meshes = [mesh_from_canonical(decode_tokens(s, vocab)) for s in sequences]
    stats = {
        "time_s": round(timing["time_s"], 3),
        "tokens": timing["tokens"],
        "tokens_per_s": round(timing["tokens_per_s"], 1),
    }
    if prompts is None:
        return meshes, stats, None
    stats["prompt"] = str(cfg.prompt)
    return meshes, stats, [mesh_from_canonical(decode_tokens(p, vocab)) for p in prompts]


def oversized_structures(counts: list[int], grid: int, first: int = 0) -> list[str]:
    """A warning for each sample whose structure occupies more of the ``grid^3`` latent grid than a
    surface usually does: a box filling the grid has a shell of two voxels, ``12 / grid`` of it, so a
    share above ``24 / grid`` points at an undertrained structure flow (and a slow latent flow on its
    many voxels)."""
    bound = 24 / grid
    return [
        f"sample {first + i}: the structure flow occupies {count / grid**3:.0%} of the {grid}^3 latent grid "
        f"({count:,} voxels), over twice the shell of a box filling the grid: its checkpoint looks undertrained, "
        "and sampling so many voxels is slow"
        for i, count in enumerate(counts)
        if count > bound * grid**3
    ]


def sample_dit(
    loaded: LoadedModel[LatentFlow], cfg: SampleStageConfig, device: torch.device, seed: int
) -> tuple[list[Mesh], dict[str, Any], None]:
    """Rectified-flow sampling of sparse latents, decoded to meshes; reports time, meshes/s and each
    sample's number of latent voxels (warning, as they come, of structures far larger than a surface)."""
    if cfg.prompt is not None:
        raise MeshforgeError("--prompt completes meshes with an iFlame checkpoint; an SS-DiT samples whole shapes")
    options = FlowSampling(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(FlowSampling)})
    latent_voxels: list[int] = []

    def check_structure(counts: list[int]) -> None:
        for warning in oversized_structures(counts, loaded.model.config.resolution, first=len(latent_voxels)):
            console.print(f"[yellow]{warning}[/yellow]")
        latent_voxels.extend(counts)

    start = time.perf_counter()
    meshes = sample_meshes(loaded.model, loaded.meta, n=cfg.n, batch_size=cfg.batch_size, options=options,
                           seed=seed, device=device, on_structure=check_structure)
    _synchronize(device)
    elapsed = time.perf_counter() - start
    stats = {"time_s": round(elapsed, 3), "meshes_per_s": round(len(meshes) / elapsed, 3), "latent_voxels": latent_voxels}
    return list(meshes), stats, None


def sample_to_dir(cfg: SampleStageConfig, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """Load the checkpoint, sample ``cfg.n`` meshes with its kind's sampler, write them to ``cfg.out``.

    Returns the stats without the per-mesh records (those are in ``stats.json``).
    """
    if cfg.image is not None and not cfg.image.is_file():
        raise InputError(cfg.image, "no such image")
    sampler: Sampler = model_spec(checkpoint_kind(cfg.checkpoint)).sample_function()
    loaded = load_model(cfg.checkpoint, device, ema=cfg.ema)
    kind, meta = loaded.kind, loaded.meta
    console.print(f"sampling with the {'EMA' if meta['weights'] == 'ema' else 'trained'} weights of {meta['path']}")
    seed_everything(seed)
    with torch.no_grad():
        meshes, extra, prompts = sampler(loaded, cfg, device, seed)
    if cfg.simplify is not None or cfg.fill_holes:
        meshes = [postprocess(m, cfg.simplify, cfg.fill_holes) for m in meshes]
    stats = write_samples(
        meshes,
        cfg.out,
        cfg.formats,
        prompts=prompts,
        extra_stats={
            "kind": kind,
            "checkpoint": meta.get("path"),
            "step": meta.get("step"),
            "weights": meta["weights"],
            "seed": seed,
            **extra,
        },
    )
    return {k: v for k, v in stats.items() if k != "meshes"}

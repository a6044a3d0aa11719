"""Rectified-flow sampling: structure -> sparse latents -> SS-VAE decoder -> sparse marching cubes.

The flows of :mod:`meshforge.models.ss_dit` carry data (t = 0) to noise (t = 1) along straight
lines, ``x_t = (1 - t) x_0 + t eps`` with velocity ``v = eps - x_0``. Sampling integrates the ODE
``dx/dt = v(x, t)`` backwards from pure noise at t = 1 to t = 0 on a grid of ``steps`` intervals,
with Euler (one model call per step) or Heun (two, second order), and classifier-free guidance
``v = v_uncond + scale * (v_cond - v_uncond)`` (scale 1: the conditional model alone; the released
Direct3D-S2 pipeline samples 30 steps at scale 7).

A mesh is made in three steps:

1. the structure flow samples the occupancy of the ``G^3`` latent grid (dense ``(G/p)^3`` tokens of
   ``p^3`` occupancy bits; a bit is set where the sample ends above 0);
2. the sparse DiT samples the latent features on those voxels;
3. the SS-VAE named in the checkpoint decodes them to a sparse SDF, re-meshed by marching cubes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from meshforge.errors import InputError, MeshforgeError
from meshforge.models.conditioning import Cond
from meshforge.models.registry import load_model
from meshforge.models.ss_dit import LatentFlow, SSDiT, occupied_voxels
from meshforge.models.ss_vae import SSVAE
from meshforge.render import Mesh
from meshforge.sparse.tensor import SparseTensor

Velocity = Callable[[torch.Tensor, float], torch.Tensor]
StructureHook = Callable[[list[int]], None]
SamplerName = Literal["euler", "heun"]


@dataclass(kw_only=True)
class FlowSampling:
    """How the flows are integrated and conditioned; the options ``meshforge sample`` exposes for
    SS-DiT checkpoints too (the released Direct3D-S2 pipeline samples 30 steps at guidance 7)."""

    steps: int = field(default=30, metadata={"help": "SS-DiT: ODE integration steps."})
    cfg_scale: float = field(
        default=7.0,
        metadata={"help": "SS-DiT: classifier-free guidance scale (conditional models)."},
    )
    sampler: SamplerName = field(
        default="euler",
        metadata={"help": "SS-DiT: ODE integrator (Heun: two model calls per step, more accurate)."},
    )
    image: Path | None = field(default=None, metadata={"help": "SS-DiT: condition on this image."})
    class_label: str | None = field(default=None, metadata={"help": "SS-DiT: condition on this class label."})

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.cfg_scale < 0:
            raise ValueError(f"cfg_scale must be >= 0, got {self.cfg_scale}")
        if self.image is not None and self.class_label is not None:
            raise ValueError("give an image or a class label, not both")


def time_grid(steps: int, shift: float = 1.0, device: torch.device | str = "cpu") -> torch.Tensor:
    """``steps + 1`` times from 1 down to 0, uniform, then warped by ``shift t / (1 + (shift - 1) t)``
    (SD3's timestep shift; ``shift > 1`` spends more steps at high noise)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    t = torch.linspace(1.0, 0.0, steps + 1, device=device, dtype=torch.float64)
    return shift * t / (1 + (shift - 1) * t)


def integrate(velocity: Velocity, x: torch.Tensor, steps: int, sampler: SamplerName = "euler",
              shift: float = 1.0) -> torch.Tensor:
    """Solve ``dx/dt = velocity(x, t)`` from t = 1 to t = 0.

    Euler is exact when the velocity is constant along the path (a perfectly straight flow);
    Heun's predictor-corrector averages the slopes at both ends of a step, second order.
    """
    if sampler not in ("euler", "heun"):
        raise MeshforgeError(f"unknown sampler {sampler!r} (expected euler or heun)")
    grid = time_grid(steps, shift).tolist()
    for t, t_next in itertools.pairwise(grid):
        dt = t_next - t  # negative: integrating towards the data
        v = velocity(x, t)
        if sampler == "heun":
            x_pred = x + dt * v
            v = 0.5 * (v + velocity(x_pred, t_next))
        x = x + dt * v
    return x


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: 0 is unconditional, 1 conditional, above 1 extrapolates past it."""
    return v_uncond + scale * (v_cond - v_uncond)


def duplicate(x: SparseTensor) -> SparseTensor:
    """The batch twice over (items ``b`` and ``b + B`` hold the same voxels): both CFG branches in one pass."""
    shifted = x.coords.clone()
    shifted[:, 0] += x.batch_size
    return SparseTensor(x.feats.repeat(2, 1), torch.cat([x.coords, shifted]), x.spatial_shape, 2 * x.batch_size)


def guided_velocity(model: SSDiT, template: SparseTensor, cond: Cond | None, uncond: Cond | None,
                    scale: float) -> Velocity:
    """``v(x, t)`` of a denoiser on ``template``'s voxels, guided when an unconditional branch is given."""
    batch = template.batch_size
    both = Cond.cat([cond, uncond]) if uncond is not None else None
    pair = duplicate(template) if uncond is not None else None

    def velocity(feats: torch.Tensor, t: float) -> torch.Tensor:
        if pair is None:
            ts = torch.full((batch,), t, device=feats.device)
            return model(template.replace(feats), ts, cond).feats.float()
        ts = torch.full((2 * batch,), t, device=feats.device)
        v = model(pair.replace(feats.repeat(2, 1)), ts, both).feats.float()
        return cfg_combine(v[: len(feats)], v[len(feats) :], scale)

    return velocity


def _vae(model: LatentFlow, device: torch.device) -> SSVAE:
    path = model.config.vae_checkpoint
    if not path:
        raise MeshforgeError("this SS-DiT checkpoint names no VAE checkpoint to decode its latents with")
    if not Path(path).exists():
        raise InputError(path, "the SS-VAE checkpoint this SS-DiT decodes with is missing")
    return load_model(Path(path), device, expect=SSVAE).model


@torch.no_grad()
def sample_latents(model: LatentFlow, condition: torch.Tensor | None, n: int, steps: int, cfg_scale: float,
                   sampler: SamplerName, generator: torch.Generator, device: torch.device,
                   shift: float = 1.0, on_structure: StructureHook | None = None) -> SparseTensor:
    """``n`` latents (denormalised, on the ``G^3`` grid): structure flow, then the sparse DiT.

    ``on_structure`` gets each item's number of occupied latent voxels between the two flows (the
    sparse DiT's cost grows with them).
    """
    cfg = model.config
    drop = torch.zeros(n, dtype=torch.bool, device=device)
    condition = condition.to(device) if condition is not None else None
    cond = model.conditioner(condition, drop)
    guide = cond is not None and cfg_scale != 1.0
    uncond = model.conditioner(condition, ~drop) if guide else None

    structure = model.structure_tensor(torch.zeros(0, 4, dtype=torch.int32, device=device), n)
    noise = torch.randn(structure.feats.shape, generator=generator, device=device)
    bits = integrate(guided_velocity(model.structure, structure, cond, uncond, cfg_scale), noise, steps, sampler, shift)
    coords = occupied_voxels(structure.replace(bits), cfg.structure_patch)
    if on_structure is not None:
        on_structure(torch.bincount(coords[:, 0].long(), minlength=n).tolist())

    template = model.latent_tensor(coords, torch.zeros(len(coords), cfg.latent_channels, device=device), n)
    noise = torch.randn(template.feats.shape, generator=generator, device=device)
    latents = integrate(guided_velocity(model.dit, template, cond, uncond, cfg_scale), noise, steps, sampler, shift)
    return template.replace(model.denormalize(latents))


def sample_meshes(
    model: LatentFlow,
    meta: dict[str, Any],
    n: int,
    batch_size: int = 16,
    options: FlowSampling | None = None,
    seed: int = 0,
    device: torch.device | str = "cpu",
    vae: torch.nn.Module | None = None,
    on_structure: StructureHook | None = None,
) -> list[Mesh]:
    """``n`` meshes (normalised vertices, faces) from an ``ss-dit`` checkpoint's model.

    The condition comes from ``options.image`` / ``options.class_label`` (``options`` defaults to
    :class:`FlowSampling`'s defaults) as the model's conditioner reads them
    (a class model without a label cycles through its classes). ``vae`` overrides the decoder
    named in the model's config. Noise is drawn from one generator seeded with ``seed``, so a
    sample depends on ``(seed, batch_size)``. ``meta`` (the checkpoint's metadata) is part of the
    samplers' common signature; everything this one needs is in the model's config.
    ``on_structure``: see :func:`sample_latents` (called once per batch).
    """
    options = options or FlowSampling()
    device = torch.device(device)
    model = model.to(device).eval()
    vae = (vae or _vae(model, device)).to(device).eval()
    generator = torch.Generator(device=device).manual_seed(seed)
    condition = model.conditioner.for_sampling(n, options.image, options.class_label)
    # On CUDA the networks run under bf16 autocast, as in training and evaluation (so the same
    # kernels); the ODE state and the velocities stay float32.
    amp = torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()
    meshes: list[Mesh] = []
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        part = condition[start : start + count] if condition is not None else None
        with amp:
            latents = sample_latents(model, part, count, options.steps, options.cfg_scale, options.sampler, generator,
                                     device, on_structure=on_structure)
            # Decoded one shape at a time: at 1024^3 a shape alone has ~1e7 finest voxels.
            for coords, feats in latents.items():
                meshes.extend(vae.decode_to_mesh(SparseTensor.from_items([coords], [feats], latents.spatial_shape)))
    return meshes

"""SS-VAE: the sparse SDF variational autoencoder of Direct3D-S2 (paper section 3).

A shape is a sparse SDF volume: the voxels of an ``R^3`` grid within ``band`` voxels of the surface,
each with its signed distance. The model never leaves that sparse format:

encoder   SDF -> linear embed -> per level: residual sparse conv blocks, 3D average pooling by 2
          -> at ``R / f`` (``f = 2^levels``): + 3D sinusoidal position, shifted-window attention
          -> Gaussian latent (mu, logvar) on the coarse voxels
decoder   latent -> + position, shifted-window attention, residual blocks
          -> per level: predict which of each voxel's 8 children exist, make those children,
             residual blocks -> SDF of every voxel of the finest level

Distances are in units of the band (``sdf * R / band``, so in [-1, 1] inside it) at every
resolution: one network serves the multi-resolution training of section 3.3.

Training is teacher-forced: the decoder keeps the children that really exist at each level (the
encoder's own octree) and learns existence with a binary cross-entropy; at the finest level it
also keeps the children it wrongly predicts, the "extra" voxels of eq. (1), whose target is the
truncated distance. At inference it keeps the children whose logit is positive.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from meshforge.models.registry import ModelSpec, register_model
from meshforge.runtime import seeded_normals
from meshforge.sparse.attention import SparseWindowAttention, sinusoidal_position_encoding
from meshforge.sparse.conv import SparseSubMConv3d, SparseUpsample, avg_pool
from meshforge.sparse.marching_cubes import marching_cubes
from meshforge.sparse.tensor import SparseTensor, children, coord_keys, lookup


@dataclass
class SSVAEConfig:
    channels: list[int] = field(default_factory=lambda: [32, 64, 128])  # width per level, finest first
    latent_channels: int = 8
    res_blocks: int = 1  # residual conv blocks per level, in the encoder and in the decoder
    attn_blocks: int = 2  # window-attention blocks at the coarsest level, in each of them
    heads: int = 4
    window: int = 8  # attention windows of window^3 latent voxels, shifted by window/2 on odd blocks
    mlp_ratio: int = 4
    band: float = 3.0  # the data's truncation band (voxels of the input grid); train-vae sets it
    conv_backend: Literal["spconv", "torch"] = "spconv"
    # Recompute each residual block in backward: its activations are most of a step's memory at R 1024
    # (tens of millions of finest voxels); the price is a second forward pass through the blocks.
    grad_checkpoint: bool = False

    def __post_init__(self) -> None:
        if len(self.channels) < 2 or min(self.channels) < 1:
            raise ValueError(f"channels needs at least two positive widths (one per level), got {self.channels}")
        if self.channels[-1] % self.heads:
            raise ValueError(f"the coarsest width {self.channels[-1]} is not divisible by heads {self.heads}")
        for name in ("latent_channels", "heads", "window", "mlp_ratio"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.res_blocks < 0 or self.attn_blocks < 0:
            raise ValueError("res_blocks and attn_blocks must be non-negative")
        if self.band <= 0:
            raise ValueError(f"band must be positive, got {self.band}")

    @property
    def levels(self) -> int:
        return len(self.channels) - 1

    @property
    def factor(self) -> int:
        """Downsampling factor f: the latent grid is R / f."""
        return 2**self.levels


# ---------------------------------------------------------------------------------------------
# Blocks


class ResBlock(nn.Module):
    """Pre-norm residual block of two 3x3x3 submanifold convolutions; starts as the identity."""

    def __init__(self, channels: int, backend: str, grad_checkpoint: bool = False) -> None:
        super().__init__()
        self.grad_checkpoint = grad_checkpoint
        self.norm1, self.norm2 = nn.LayerNorm(channels), nn.LayerNorm(channels)
        self.conv1 = SparseSubMConv3d(channels, channels, 3, backend=backend)
        self.conv2 = SparseSubMConv3d(channels, channels, 3, backend=backend)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: SparseTensor) -> SparseTensor:
        if self.grad_checkpoint and torch.is_grad_enabled():
            # Only the input features are kept; the voxels (and the convolutions' neighbour maps cached
            # on them) are the same object in the recomputation.
            return x.replace(checkpoint(lambda feats: self.output_feats(x.replace(feats)), x.feats, use_reentrant=False))
        return x.replace(self.output_feats(x))

    def output_feats(self, x: SparseTensor) -> torch.Tensor:
        """The block's output features: ``x`` plus the residual."""
        h = self.conv1(x.replace(F.silu(self.norm1(x.feats))))
        h = self.conv2(h.replace(F.silu(self.norm2(h.feats))))
        return x.feats + h.feats


class AttentionBlock(nn.Module):
    """Pre-norm transformer block with (shifted-)window sparse attention."""

    def __init__(self, dim: int, heads: int, window: int, shifted: bool, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SparseWindowAttention(dim, heads, window, shifted)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_ratio * dim), nn.GELU(), nn.Linear(mlp_ratio * dim, dim))

    def forward(self, x: SparseTensor) -> SparseTensor:
        x = x.replace(x.feats + self.attn(x.replace(self.norm1(x.feats))).feats)
        return x.replace(x.feats + self.mlp(self.norm2(x.feats)))


def attention_stack(cfg: SSVAEConfig) -> nn.ModuleList:
    dim = cfg.channels[-1]
    return nn.ModuleList(AttentionBlock(dim, cfg.heads, cfg.window, i % 2 == 1, cfg.mlp_ratio) for i in range(cfg.attn_blocks))


def res_stack(channels: int, cfg: SSVAEConfig) -> nn.ModuleList:
    return nn.ModuleList(ResBlock(channels, cfg.conv_backend, cfg.grad_checkpoint) for _ in range(cfg.res_blocks))


def run(blocks: nn.ModuleList, x: SparseTensor) -> SparseTensor:
    for block in blocks:
        x = block(x)
    return x


def with_position(x: SparseTensor) -> SparseTensor:
    return x.replace(x.feats + sinusoidal_position_encoding(x.coords[:, 1:], x.channels).to(x.feats.dtype))


class Upsample(nn.Module):
    """One decoder level up: existence logits of the 8 children of every voxel, and the kept children."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_channels)
        self.exist_head = nn.Linear(in_channels, 8)
        self.up = SparseUpsample(in_channels, out_channels, factor=2)

    def forward(self, x: SparseTensor, truth: torch.Tensor | None, extra: bool) -> tuple[SparseTensor, torch.Tensor]:
        """Children kept: the true ones (``truth`` over :func:`children` order, plus the predicted
        ones when ``extra``), or without ``truth`` those with a positive logit."""
        h = x.replace(F.silu(self.norm(x.feats)))
        logits = self.exist_head(h.feats).flatten()
        predicted = logits > 0
        keep = predicted if truth is None else (truth | predicted if extra else truth)
        return self.up(h, keep), logits


# ---------------------------------------------------------------------------------------------
# The model


@dataclass
class VAEOutput:
    """What a teacher-forced pass gives the losses (eq. 1-3 and the pruning BCE)."""

    sdf: SparseTensor  # [N, 1] predicted SDF (band units) on the decoded finest voxels, extras included
    exist_logits: torch.Tensor  # [K] logits of every candidate child at every level
    exist_target: torch.Tensor  # [K] bool: the child is a voxel of the input's octree
    mu: torch.Tensor  # [M, latent_channels]
    logvar: torch.Tensor


class SSVAE(nn.Module):
    def __init__(self, config: SSVAEConfig) -> None:
        super().__init__()
        self.config = cfg = config
        widths = cfg.channels
        self.sdf_embed = nn.Linear(1, widths[0])
        self.enc_levels = nn.ModuleList(res_stack(c, cfg) for c in widths[:-1])
        self.enc_widen = nn.ModuleList(nn.Linear(a, b) for a, b in itertools.pairwise(widths))
        self.enc_bottom = res_stack(widths[-1], cfg)
        self.enc_attn = attention_stack(cfg)
        self.enc_norm = nn.LayerNorm(widths[-1])
        self.to_latent = nn.Linear(widths[-1], 2 * cfg.latent_channels)

        self.from_latent = nn.Linear(cfg.latent_channels, widths[-1])
        self.dec_attn = attention_stack(cfg)
        self.dec_bottom = res_stack(widths[-1], cfg)
        # Decoder levels run coarse to fine: entry i goes from width widths[-1 - i] to widths[-2 - i].
        self.dec_up = nn.ModuleList(Upsample(a, b) for a, b in zip(widths[:0:-1], widths[-2::-1]))
        self.dec_levels = nn.ModuleList(res_stack(c, cfg) for c in widths[-2::-1])
        self.out_norm = nn.LayerNorm(widths[0])
        self.sdf_head = nn.Linear(widths[0], 1)

    # -- encoder --------------------------------------------------------------------------------

    def encode_levels(self, x: SparseTensor) -> tuple[list[SparseTensor], torch.Tensor, torch.Tensor]:
        """The encoder's tensor at every level (finest first, latent grid last), mu and logvar.

        ``x.feats`` is ``[N, 1]``, the SDF in band units; every spatial size must be divisible by f.
        """
        if any(s % self.config.factor for s in x.spatial_shape):
            raise ValueError(f"grid {x.spatial_shape} is not divisible by the VAE's downsampling factor {self.config.factor}")
        h = x.replace(self.sdf_embed(x.feats))
        levels = []
        for blocks, widen in zip(self.enc_levels, self.enc_widen):
            h = run(blocks, h)
            levels.append(h)
            h = avg_pool(h, 2)
            h = h.replace(widen(h.feats))
        h = run(self.enc_attn, with_position(run(self.enc_bottom, h)))
        levels.append(h)
        mu, logvar = self.to_latent(self.enc_norm(h.feats)).chunk(2, dim=-1)
        return levels, mu, logvar.clamp(-30.0, 20.0)

    def encode(self, x: SparseTensor, sample: bool = False) -> SparseTensor:
        """The latent on the ``R / f`` grid: the posterior mean, or a sample from it."""
        levels, mu, logvar = self.encode_levels(x)
        return levels[-1].replace(reparameterize(mu, logvar) if sample else mu)

    # -- decoder --------------------------------------------------------------------------------

    def decode(
        self, z: SparseTensor, guide: list[torch.Tensor] | None = None, extra: bool = False
    ) -> tuple[SparseTensor, list[torch.Tensor], list[torch.Tensor]]:
        """(SDF in band units on the decoded finest voxels, existence logits per level, truth per level).

        ``guide``: the keys of the true voxels of every level, finest first (teacher forcing: the
        true children are kept, and with ``extra`` the wrongly predicted ones of the finest level
        too). Without a guide the children with a positive logit are kept and no truth is returned.
        """
        h = z.replace(self.from_latent(z.feats))
        h = run(self.dec_bottom, run(self.dec_attn, with_position(h)))
        logits_per_level, truth_per_level = [], []
        for i, (up, blocks) in enumerate(zip(self.dec_up, self.dec_levels)):
            level = self.config.levels - 1 - i  # the level these children belong to
            truth = None
            if guide is not None:
                fine_shape = tuple(2 * s for s in h.spatial_shape)
                truth = torch.isin(coord_keys(children(h.coords), fine_shape), guide[level])
                truth_per_level.append(truth)
            h, logits = up(h, truth, extra=extra and level == 0)
            logits_per_level.append(logits)
            h = run(blocks, h)
        sdf = self.sdf_head(self.out_norm(h.feats))
        return h.replace(sdf), logits_per_level, truth_per_level

    # -- training and inference -------------------------------------------------------------------

    def forward(self, x: SparseTensor, sample: bool = True, seeds: list[int] | None = None) -> VAEOutput:
        """Teacher-forced reconstruction of ``x`` (SDF in band units) from a posterior sample (or the mean).

        With ``seeds`` (one per item) each item's posterior noise comes from its own seed
        (:func:`meshforge.runtime.seeded_normals`) instead of the global generator.
        """
        levels, mu, logvar = self.encode_levels(x)
        noise = None
        if sample and seeds is not None:
            (noise,) = seeded_normals(seeds, [(levels[-1].batch_offsets, mu.shape[1])], mu.device, mu.dtype)
        z = levels[-1].replace(reparameterize(mu, logvar, noise) if sample else mu)
        guide = [level.keys for level in levels[:-1]]  # levels[0] has the input's voxels
        sdf, logits, truth = self.decode(z, guide, extra=True)
        return VAEOutput(sdf, torch.cat(logits), torch.cat(truth), mu, logvar)

    @torch.no_grad()
    def reconstruct(self, x: SparseTensor) -> SparseTensor:
        """Encode (posterior mean) and decode with predicted pruning: SDF in band units."""
        return self.decode(self.encode(x))[0]

    def to_distance(self, sdf: SparseTensor) -> torch.Tensor:
        """Band units -> signed distance in normalised mesh units on the tensor's grid."""
        return sdf.feats[:, 0].float() * self.config.band / sdf.spatial_shape[0]

    def to_meshes(self, sdf: SparseTensor, level: float = 0.0) -> list[tuple[np.ndarray, np.ndarray]]:
        """One mesh (normalised vertices, faces) per item of a decoded SDF batch: sparse marching
        cubes at distance ``level`` (normalised units), on the device the SDF is on."""
        distance = self.to_distance(sdf)
        offsets = sdf.batch_offsets.tolist()
        return [
            marching_cubes(sdf.coords[a:b, 1:], distance[a:b], sdf.spatial_shape[0], level=level)
            for a, b in itertools.pairwise(offsets)
        ]

    @torch.no_grad()
    def decode_to_mesh(self, latent: SparseTensor, level: float = 0.0) -> list[tuple[np.ndarray, np.ndarray]]:
        """Meshes of a batch of latents (see :meth:`to_meshes`)."""
        return self.to_meshes(self.decode(latent)[0], level)


def reparameterize(mu: torch.Tensor, logvar: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    return mu + (torch.randn_like(mu) if noise is None else noise) * (0.5 * logvar).exp()


# ---------------------------------------------------------------------------------------------
# Losses


def loss_terms(x: SparseTensor, sharp: torch.Tensor, out: VAEOutput) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(sum, count) of each loss term of a teacher-forced pass over input ``x`` (SDF in band units).

    ``in``, ``extra``, ``sharp``: squared SDF errors on the input voxels, on the extra voxels, and on
    the input voxels flagged sharp (eq. 1); ``kl``: KL divergence of the posterior from N(0, I)
    per latent voxel; ``prune``: binary cross-entropy of the existence logits. Sums and counts,
    not means, so that data-parallel ranks can form means over the global batch.

    An extra voxel lies outside the band, where the data has no distance; its target is the
    truncated distance with the sign of its true siblings. Those lie within sqrt(3) voxels of it
    and inside the band, so for a band wider than sqrt(3) voxels (SDFs are 1-Lipschitz) they
    share its sign.
    """
    # Losses in fp32 (at least) whatever the autocast dtype of the network.
    pred = out.sdf.feats[:, 0].float()
    mu, logvar, logits = out.mu.float(), out.logvar.float(), out.exist_logits.float()
    rows = lookup(x.keys, out.sdf.keys)
    is_in = rows >= 0
    truth = x.feats[:, 0].float()
    target = torch.empty_like(pred)
    target[is_in] = truth[rows[is_in]]
    coarse, parent = x.coarsen(2)
    sibling_sum = truth.new_zeros(len(coarse)).index_add_(0, parent, truth)
    extra_parent = out.sdf.coords[~is_in].clone()
    extra_parent[:, 1:] = extra_parent[:, 1:].div(2, rounding_mode="floor")
    shape = tuple(s // 2 for s in x.spatial_shape)
    parent_rows = lookup(coord_keys(coarse, shape), coord_keys(extra_parent, shape))
    target[~is_in] = torch.where(sibling_sum[parent_rows] < 0, -1.0, 1.0)
    err = (pred - target).square()
    on_sharp = torch.zeros_like(is_in)
    on_sharp[is_in] = sharp[rows[is_in]]
    kl = 0.5 * (mu.square() + logvar.exp() - 1 - logvar).sum(-1)
    bce = F.binary_cross_entropy_with_logits(logits, out.exist_target.float(), reduction="sum")
    return {
        "in": (err[is_in].sum(), is_in.sum().float()),
        "extra": (err[~is_in].sum(), (~is_in).sum().float()),
        "sharp": (err[on_sharp].sum(), on_sharp.sum().float()),
        "kl": (kl.sum(), kl.new_tensor(float(len(kl)))),
        "prune": (bce, bce.new_tensor(float(len(logits)))),
    }


register_model(ModelSpec("ss-vae", SSVAEConfig, SSVAE, evaluator="meshforge.metrics.recon:evaluate_checkpoint",
                         metrics=("recon",)))

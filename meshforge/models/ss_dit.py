"""SS-DiT: the sparse-latent diffusion transformer of Direct3D-S2 (paper section 4), with rectified flow.

Generation runs in two flows that share one conditioner, like TRELLIS, on which Direct3D-S2 builds:

structure  which voxels of the ``G^3`` latent grid (``G = R / f``) are occupied. The binary occupancy
           is cut into ``p^3`` patches (space-to-depth, lossless): ``(G / p)^3`` dense tokens of
           ``p^3`` channels, +1 occupied / -1 empty. A small DiT denoises them (full attention).
latent     the VAE's latent features on the occupied voxels: a sparse DiT (SSA, or full / window
           attention for ablation) denoises ``[N, C]`` channel-normalised latents.

Both are :class:`SSDiT` denoisers over a :class:`SparseTensor` (the structure's tensor is simply
dense). A block is AdaLN-Zero (shift / scale / gate from timestep + pooled condition), self-attention,
cross-attention to the condition tokens, MLP; tokens carry a 3D sinusoidal position of their voxel,
and the output head starts at zero, so an untrained model predicts zero velocity.

Rectified flow, in TRELLIS's / SD3's convention: ``x_t = (1 - t) x_0 + t eps`` with ``t`` in [0, 1]
(0 is data, 1 is noise), velocity ``v = dx_t / dt = eps - x_0``; the model regresses ``v`` at
logit-normal timesteps; sampling integrates from t = 1 down to 0 (:mod:`meshforge.sample.flow`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from meshforge.kernels.attention import DenseBackend, sdpa, varlen_attention
from meshforge.kernels.ssa import SSAConfig, build_layout, compress_kv, spatial_sparse_attention
from meshforge.kernels.utils import group_ids, offsets_of
from meshforge.models.conditioning import Cond, ConditionerConfig, build_conditioner
from meshforge.models.layers import RMSNorm
from meshforge.models.registry import ModelSpec, register_model
from meshforge.runtime import seeded_normals
from meshforge.sparse.attention import sinusoidal_position_encoding
from meshforge.sparse.tensor import SparseTensor, Windows


@dataclass
class SSDiTConfig:
    """One denoising transformer; its input width and condition width come from :class:`LatentFlowConfig`."""

    dim: int = 384
    depth: int = 8
    heads: int = 6
    kv_heads: int = 2  # key/value heads (GQA groups): SSA's selection scores are summed per group
    mlp_ratio: float = 4.0
    attention: Literal["ssa", "full", "window"] = "ssa"
    window: int = 8  # m_win: window attention and SSA's window branch, shifted by window/2 on odd blocks
    ssa_block_cmp: int = 4  # m_cmp: compression blocks of m_cmp^3 voxels
    ssa_block_slc: int = 8  # m_slc: selection blocks (a multiple of m_cmp)
    ssa_topk: int = 8  # selection blocks each query attends to
    # Queries sharing one top-k selection (SSAConfig.query_tile; the paper selects per query):
    # smaller tiles follow each query's own choice more closely (benchmarks/ssa_selection.py).
    ssa_query_tile: int = 64
    # Kernels of the full / window attention ("auto": flash-attn's varlen kernel where it runs, else
    # SDPA without cuDNN; "flash" / "cudnn" / "efficient" / "math": that SDPA kernel alone; see
    # meshforge.kernels.attention for "flash_attn" and "reference").
    dense_backend: DenseBackend = "auto"
    grad_checkpoint: bool = False  # recompute each block's activations in backward (long latents)

    def __post_init__(self) -> None:
        for name in ("dim", "depth", "heads", "kv_heads", "window", "ssa_block_cmp", "ssa_block_slc", "ssa_topk"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.dim % self.heads or (self.dim // self.heads) % 2:
            raise ValueError(f"dim {self.dim} must split into {self.heads} heads of an even size")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads {self.heads} must be a multiple of kv_heads {self.kv_heads}")
        if self.ssa_block_slc % self.ssa_block_cmp:
            raise ValueError(f"ssa_block_slc {self.ssa_block_slc} must be a multiple of ssa_block_cmp {self.ssa_block_cmp}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {self.mlp_ratio}")
        if self.ssa_query_tile < 16 or self.ssa_query_tile & (self.ssa_query_tile - 1):
            raise ValueError(f"ssa_query_tile must be a power of two >= 16, got {self.ssa_query_tile}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


def _structure_default() -> SSDiTConfig:
    return SSDiTConfig(dim=256, depth=6, heads=4, kv_heads=4, attention="full")


@dataclass
class LatentFlowConfig:
    """The ``ss-dit`` checkpoint's model: structure flow + latent flow + conditioner.

    ``resolution``, ``latent_channels``, ``latent_mean`` / ``latent_std`` and ``vae_checkpoint``
    describe the latent space and are filled in by ``train-dit`` from the latent dataset.
    """

    dit: SSDiTConfig = field(default_factory=SSDiTConfig)
    structure: SSDiTConfig = field(default_factory=_structure_default)
    cond: ConditionerConfig = field(default_factory=ConditionerConfig)
    latent_channels: int = 8
    resolution: int = 16  # G: the latent grid, R / f
    structure_patch: int = 2  # p: the structure flow works on (G / p)^3 tokens of p^3 occupancy bits
    latent_mean: list[float] = field(default_factory=list)  # per channel; empty: 0
    latent_std: list[float] = field(default_factory=list)  # per channel; empty: 1
    vae_checkpoint: str = ""  # the SS-VAE whose decoder turns latents into SDF

    def __post_init__(self) -> None:
        if self.latent_channels < 1 or self.structure_patch < 1:
            raise ValueError("latent_channels and structure_patch must be at least 1")
        if self.resolution < 1 or self.resolution % self.structure_patch:
            raise ValueError(f"resolution {self.resolution} must be a positive multiple of structure_patch {self.structure_patch}")
        for name in ("latent_mean", "latent_std"):
            values = getattr(self, name)
            if values and len(values) != self.latent_channels:
                raise ValueError(f"{name} has {len(values)} values for {self.latent_channels} latent channels")
        if any(s <= 0 for s in self.latent_std):
            raise ValueError("latent_std must be positive")

    @property
    def structure_grid(self) -> int:
        return self.resolution // self.structure_patch


# ---------------------------------------------------------------------------------------------
# Attention


def batch_windows(x: SparseTensor) -> Windows:
    """Each non-empty batch item as one attention "window": full attention within every sequence.

    Empty items get no window: an all-masked window would put NaNs into the padded attention.
    Cached on the tensor, like the other coordinate structures: every block of a forward shares it.
    """
    if "batch_windows" not in x.cache:
        counts = x.batch_offsets.diff()
        counts = counts[counts > 0]
        x.cache["batch_windows"] = Windows(
            perm=torch.arange(len(x), device=x.device),
            cu_seqlens=offsets_of(counts).int(),
            window_ids=group_ids(counts, total=len(x)),
            max_len=int(counts.max()) if len(counts) else 0,
        )
    return x.cache["batch_windows"]


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: SparseTensor, mask: torch.Tensor) -> torch.Tensor:
    """Token i of item b attends to the valid condition tokens of item b.

    ``q [N, H, D]`` in ``x``'s row order, ``k, v [B, L, H, D]``, ``mask [B, L]`` (at least one valid
    token per item). Queries are padded per item for one batched SDPA call.
    """
    b = x.coords[:, 0].long()
    counts = x.batch_offsets.diff().long()
    slot = torch.arange(len(q), device=q.device) - x.batch_offsets[:-1].long()[b]
    max_len = int(counts.max()) if len(counts) else 0
    padded = q.new_zeros(x.batch_size, max_len, *q.shape[1:])
    padded[b, slot] = q
    out = sdpa(
        padded.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask[:, None, None, :]
    )
    return out.transpose(1, 2)[b, slot]


class SelfAttention(nn.Module):
    """Multi-head self-attention over the tokens of each item, with GQA key/value heads.

    ``ssa``: Direct3D-S2's spatial sparse attention (compression + top-k block selection + window,
    mixed by sigmoid gates predicted from the input) via :mod:`meshforge.kernels.ssa`; ``full``: dense
    attention within each item; ``window``: attention within ``window^3`` cubes (shifted when asked).
    """

    def __init__(self, cfg: SSDiTConfig, shifted: bool) -> None:
        super().__init__()
        self.cfg = cfg
        self.shift = cfg.window // 2 if shifted else 0
        hd = cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.heads * hd)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.kv_heads * hd)
        # RMS-normalised queries and keys keep attention logits bounded in bf16 (as in TRELLIS).
        self.q_norm, self.k_norm = RMSNorm(hd), RMSNorm(hd)
        self.proj = nn.Linear(cfg.heads * hd, cfg.dim)
        if cfg.attention == "ssa":
            self.ssa = SSAConfig(block_cmp=cfg.ssa_block_cmp, block_slc=cfg.ssa_block_slc, topk=cfg.ssa_topk,
                                 window=cfg.window, shift=self.shift, query_tile=cfg.ssa_query_tile)
            self.gates = nn.Linear(cfg.dim, 3 * cfg.heads)  # sigmoid weights of the three branches
            # Intra-block position encoding of the compression branch's keys and values, k_cmp =
            # mean over the block of (k + PE); the paper's extra sparse conv before the mean is left out.
            self.cmp_pe_k = nn.Parameter(torch.randn(cfg.ssa_block_cmp**3, cfg.kv_heads, hd) * 0.02)
            self.cmp_pe_v = nn.Parameter(torch.randn(cfg.ssa_block_cmp**3, cfg.kv_heads, hd) * 0.02)

    def project(self, x: SparseTensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Queries ``[N, heads, D]`` and keys, values ``[N, kv_heads, D]``, queries and keys RMS-normalised."""
        cfg, n = self.cfg, len(x)
        k, v = self.kv(x.feats).view(n, 2, cfg.kv_heads, cfg.head_dim).unbind(1)
        # The norms return their input's dtype (bf16 under CUDA autocast, like v): the SSA kernels
        # and flash-attn are not autocast-aware and need one dtype for all three.
        return self.q_norm(self.q(x.feats).view(n, cfg.heads, cfg.head_dim)), self.k_norm(k), v

    def forward(self, x: SparseTensor) -> torch.Tensor:
        cfg, n = self.cfg, len(x)
        q, k, v = self.project(x)
        if cfg.attention == "ssa":
            gates, layout, k_cmp, v_cmp = self.ssa_operands(k, v, x)
            out = spatial_sparse_attention(q, k, v, gates, x.coords, x.batch_offsets, self.ssa, k_cmp, v_cmp,
                                           layout=layout)
        else:
            groups = cfg.heads // cfg.kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
            if cfg.attention == "full":
                items = batch_windows(x)
                out = varlen_attention(q, k, v, items.cu_seqlens, items.max_len, cfg.dense_backend)
            else:
                windows = x.windows(cfg.window, self.shift)
                q, k, v = (t[windows.perm] for t in (q, k, v))
                grouped = varlen_attention(q, k, v, windows.cu_seqlens, windows.max_len, cfg.dense_backend)
                out = torch.empty_like(grouped)
                out[windows.perm] = grouped
        return self.proj(out.reshape(n, -1))

    def ssa_operands(self, k: torch.Tensor, v: torch.Tensor, x: SparseTensor):
        """SSA's other inputs: branch gates ``[N, heads, 3]``, the block layout, compressed keys and values."""
        gates = torch.sigmoid(self.gates(x.feats).view(len(x), self.cfg.heads, 3)).to(k.dtype)
        # The block layout depends only on the coordinates: built once, shared by every layer.
        key = ("ssa-layout", self.ssa)
        if key not in x.cache:
            x.cache[key] = build_layout(x.coords, x.batch_offsets, self.ssa)
        layout = x.cache[key]
        k_cmp, v_cmp = compress_kv(k, v, layout, self.cmp_pe_k.to(k.dtype), self.cmp_pe_v.to(v.dtype))
        return gates, layout, k_cmp, v_cmp


class CrossAttention(nn.Module):
    def __init__(self, dim: int, cond_dim: int, heads: int) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(cond_dim, 2 * dim)
        self.q_norm, self.k_norm = RMSNorm(self.head_dim), RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: SparseTensor, h: torch.Tensor, cond: Cond) -> torch.Tensor:
        bsz, length, _ = cond.tokens.shape
        q = self.q_norm(self.q(h).view(len(h), self.heads, self.head_dim))
        k, v = self.kv(cond.tokens).view(bsz, length, 2, self.heads, self.head_dim).unbind(2)
        return self.proj(cross_attention(q, self.k_norm(k), v, x, cond.mask).reshape(len(h), -1))


# ---------------------------------------------------------------------------------------------
# Blocks


def modulate(h: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, x: SparseTensor) -> torch.Tensor:
    """AdaLN: per-item shift and scale ``[B, dim]`` applied to the tokens ``h [N, dim]`` of each item of ``x``."""
    return h * (1 + x.per_row(scale)) + x.per_row(shift)


class DiTBlock(nn.Module):
    """AdaLN-Zero transformer block: modulated self-attention, cross-attention, modulated MLP."""

    def __init__(self, cfg: SSDiTConfig, cond_dim: int, shifted: bool) -> None:
        super().__init__()
        dim = cfg.dim
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(cfg, shifted)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6) if cond_dim else None
        self.cross = CrossAttention(dim, cond_dim, cfg.heads) if cond_dim else None
        self.norm3 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.modulation = nn.Linear(dim, 6 * dim)
        # Zero gates and shifts: every block starts as the identity (DiT's adaLN-Zero).
        nn.init.zeros_(self.modulation.weight)
        nn.init.zeros_(self.modulation.bias)

    def forward(self, x: SparseTensor, c: torch.Tensor, cond: Cond | None) -> SparseTensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(c)).chunk(6, dim=-1)
        h = x.feats
        h = h + x.per_row(gate1) * self.attn(x.replace(modulate(self.norm1(h), shift1, scale1, x)))
        if self.cross is not None:
            h = h + self.cross(x, self.norm2(h), cond)
        h = h + x.per_row(gate2) * self.mlp(modulate(self.norm3(h), shift2, scale2, x))
        return x.replace(h)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of ``1000 t`` (the diffusion models' scale) through a two-layer MLP."""

    def __init__(self, dim: int, frequencies: int = 256) -> None:
        super().__init__()
        self.frequencies = frequencies
        self.mlp = nn.Sequential(nn.Linear(frequencies, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.frequencies // 2
        freqs = torch.exp(-math.log(10_000.0) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
        angles = 1000.0 * t.float()[:, None] * freqs
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=-1).to(self.mlp[0].weight.dtype))


def _block_feats(block: DiTBlock, x: SparseTensor, feats: torch.Tensor, c: torch.Tensor, cond: Cond | None) -> torch.Tensor:
    """``block`` on ``x``'s voxels with ``feats``: a function of tensors, for activation checkpointing."""
    return block(x.replace(feats), c, cond).feats


class SSDiT(nn.Module):
    """Velocity of a noisy sparse tensor: ``forward(x_t, t [B], cond) -> SparseTensor [N, in_channels]``."""

    def __init__(self, cfg: SSDiTConfig, in_channels: int, cond_dim: int) -> None:
        super().__init__()
        self.config = cfg
        self.in_embed = nn.Linear(in_channels, cfg.dim)
        self.t_embed = TimestepEmbedder(cfg.dim)
        self.cond_embed = nn.Linear(cond_dim, cfg.dim) if cond_dim else None
        self.blocks = nn.ModuleList(DiTBlock(cfg, cond_dim, shifted=i % 2 == 1) for i in range(cfg.depth))
        self.out_norm = nn.LayerNorm(cfg.dim, elementwise_affine=False, eps=1e-6)
        self.out_modulation = nn.Linear(cfg.dim, 2 * cfg.dim)
        self.head = nn.Linear(cfg.dim, in_channels)
        for layer in (self.out_modulation, self.head):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: SparseTensor, t: torch.Tensor, cond: Cond | None = None) -> SparseTensor:
        h = self.in_embed(x.feats) + sinusoidal_position_encoding(x.coords[:, 1:], self.config.dim).to(x.feats.dtype)
        c = self.t_embed(t)
        if self.cond_embed is not None:
            c = c + self.cond_embed(cond.vector)
        h = x.replace(h)
        for block in self.blocks:
            if self.config.grad_checkpoint and torch.is_grad_enabled():
                # The block's activations are recomputed in backward; the coordinate structures
                # (SSA layouts, windows) live in the tensor's cache and are not rebuilt.
                h = h.replace(checkpoint(_block_feats, block, h, h.feats, c, cond, use_reentrant=False))
            else:
                h = block(h, c, cond)
        shift, scale = self.out_modulation(F.silu(c)).chunk(2, dim=-1)
        return x.replace(self.head(modulate(self.out_norm(h.feats), shift, scale, x)))


# ---------------------------------------------------------------------------------------------
# Rectified flow


def interpolate(x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``x_t = (1 - t) x_0 + t eps``; ``t`` broadcasts against the rows (one value per row)."""
    t = t[:, None].to(x0.dtype)
    return (1 - t) * x0 + t * eps


def velocity_target(x0: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """``dx_t / dt`` along the straight path: ``eps - x_0``."""
    return eps - x0


def logit_normal_timesteps(n: int, mean: float, std: float, device: torch.device | str = "cpu",
                           generator: torch.Generator | None = None) -> torch.Tensor:
    """``t = sigmoid(mean + std * z)``, ``z ~ N(0, 1)``: SD3's density, most steps at mid noise."""
    z = torch.randn(n, device=device, generator=generator)
    return torch.sigmoid(mean + std * z)


def flow_loss_terms(model: SSDiT, x0: SparseTensor, t: torch.Tensor, cond: Cond | None,
                    eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of squared velocity errors, element count) of one batch at per-item times ``t [B]``."""
    eps = torch.randn_like(x0.feats) if eps is None else eps
    per_row = t[x0.coords[:, 0].long()]
    xt = x0.replace(interpolate(x0.feats, eps, per_row))
    v = model(xt, t, cond).feats.float()
    err = (v - velocity_target(x0.feats, eps).float()).square()
    return err.sum(), err.new_tensor(float(err.numel()))


# ---------------------------------------------------------------------------------------------
# Structure <-> patch tokens


def patch_offsets(p: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Offset (dx, dy, dz) of occupancy channel ``c = (dx * p + dy) * p + dz`` of a patch, int32 [p^3, 3]."""
    r = torch.arange(p, device=device)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3).int()


def dense_coords(batch_size: int, grid: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Every cell of ``batch_size`` grids of ``grid^3``, int32 ``(b, x, y, z)`` in key order."""
    r = torch.arange(grid, device=device)
    cells = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)
    b = torch.arange(batch_size, device=device).repeat_interleave(len(cells))
    return torch.cat([b[:, None], cells.repeat(batch_size, 1)], dim=1).int()


def occupancy_patches(coords: torch.Tensor, batch_size: int, resolution: int, patch: int) -> SparseTensor:
    """Occupied latent voxels ``coords [N, 4]`` as the structure flow's data: dense ``(G/p)^3`` tokens
    of ``p^3`` channels, +1 where the voxel is occupied and -1 elsewhere."""
    grid = resolution // patch
    c = coords.long()
    cell = ((c[:, 0] * grid + c[:, 1] // patch) * grid + c[:, 2] // patch) * grid + c[:, 3] // patch
    channel = ((c[:, 1] % patch) * patch + c[:, 2] % patch) * patch + c[:, 3] % patch
    feats = torch.full((batch_size * grid**3, patch**3), -1.0, device=coords.device)
    feats[cell, channel] = 1.0
    return SparseTensor(feats, dense_coords(batch_size, grid, coords.device), (grid,) * 3, batch_size)


def occupied_voxels(patches: SparseTensor, patch: int) -> torch.Tensor:
    """Inverse of :func:`occupancy_patches`: int32 ``(b, x, y, z)`` of the channels above 0, in key order.

    An item with no positive channel keeps its single highest one, so that every sample has a
    structure to put latents on.
    """
    feats = patches.feats
    occupied = feats > 0
    per_item = feats.view(patches.batch_size, -1)
    empty = ~occupied.view(patches.batch_size, -1).any(dim=1)
    if empty.any():
        best = per_item.argmax(dim=1)
        flat = occupied.view(patches.batch_size, -1)
        flat[empty, best[empty]] = True
    rows, channels = occupied.nonzero(as_tuple=True)
    cells = patches.coords[rows]
    voxels = cells.clone()
    voxels[:, 1:] = cells[:, 1:] * patch + patch_offsets(patch, feats.device)[channels]
    grid = patches.spatial_shape[0] * patch
    keys = ((voxels[:, 0].long() * grid + voxels[:, 1]) * grid + voxels[:, 2]) * grid + voxels[:, 3]
    return voxels[torch.argsort(keys)]


# ---------------------------------------------------------------------------------------------
# The model


class LatentFlow(nn.Module):
    """Conditioner + structure flow + latent flow; what an ``ss-dit`` checkpoint holds."""

    def __init__(self, config: LatentFlowConfig) -> None:
        super().__init__()
        self.config = cfg = config
        self.conditioner = build_conditioner(cfg.cond)
        cond_dim = self.conditioner.token_dim
        self.structure = SSDiT(cfg.structure, cfg.structure_patch**3, cond_dim)
        self.dit = SSDiT(cfg.dit, cfg.latent_channels, cond_dim)
        mean = cfg.latent_mean or [0.0] * cfg.latent_channels
        std = cfg.latent_std or [1.0] * cfg.latent_channels
        # Buffers rather than parameters: set by the data, not learned, and saved with the weights.
        self.register_buffer("latent_mean", torch.tensor(mean, dtype=torch.float32))
        self.register_buffer("latent_std", torch.tensor(std, dtype=torch.float32))

    def normalize(self, feats: torch.Tensor) -> torch.Tensor:
        return (feats - self.latent_mean) / self.latent_std

    def denormalize(self, feats: torch.Tensor) -> torch.Tensor:
        return feats * self.latent_std + self.latent_mean

    def latent_tensor(self, coords: torch.Tensor, feats: torch.Tensor, batch_size: int) -> SparseTensor:
        g = self.config.resolution
        return SparseTensor(feats, coords, (g, g, g), batch_size)

    def structure_tensor(self, coords: torch.Tensor, batch_size: int) -> SparseTensor:
        return occupancy_patches(coords, batch_size, self.config.resolution, self.config.structure_patch)

    def forward(self, coords: torch.Tensor, feats: torch.Tensor, batch_size: int, condition: torch.Tensor | None,
                drop: torch.Tensor, t_latent: torch.Tensor, t_structure: torch.Tensor,
                seeds: list[int] | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(sum, count) of the squared velocity errors of both flows on one training batch.

        ``coords [N, 4]`` and raw ``feats [N, C]`` are the latents of ``batch_size`` shapes;
        ``drop [B]`` flags the items whose condition is replaced by the null one (CFG dropout).
        With ``seeds`` (one per item) each item's noise of both flows comes from its own seed
        (:func:`meshforge.runtime.seeded_normals`) instead of the global generator.
        """
        cond = self.conditioner(condition, drop)
        latents = self.latent_tensor(coords, self.normalize(feats), batch_size)
        structure = self.structure_tensor(coords, batch_size)
        eps_latent = eps_structure = None
        if seeds is not None:
            eps_latent, eps_structure = seeded_normals(
                seeds, [(latents.batch_offsets, latents.channels), (structure.batch_offsets, structure.channels)],
                coords.device, latents.feats.dtype)
        return {
            "latent": flow_loss_terms(self.dit, latents, t_latent, cond, eps_latent),
            "structure": flow_loss_terms(self.structure, structure, t_structure, cond, eps_structure),
        }


register_model(ModelSpec("ss-dit", LatentFlowConfig, LatentFlow, sampler="meshforge.sample.run:sample_dit"))
